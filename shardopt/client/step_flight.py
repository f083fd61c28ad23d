"""One step of a plain optimizer while it is in flight: what was sent to which shard, what is
still to be answered, and what came back.

:class:`~shardopt.client.local.LocalShards` sends each shard its step as soon as its gradients
are packed and reads the answers as they come; a :class:`StepInFlight` holds that bookkeeping
for the length of one step, so that the step's phases (sending, answering, and landing the
answers of a step stopped part-way) share it.

Talks to: nothing; :func:`result_of` reads an answer through :mod:`shardopt.client.lanes`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from shardopt.client.lanes import answer_of
from shardopt.core.net_lane import NetLaneClient
from shardopt.core.records import StepRequest


@dataclass
class StepInFlight:
    """The bookkeeping of one step (see the module docstring)."""

    step_id: int
    params: list[torch.Tensor]
    """The user's parameters, flat, in the shard map's order."""
    sent: dict[int, tuple[StepRequest, torch.Tensor]] = field(default_factory=dict)
    """Per shard sent: the step's request (for replicas and retries) and its gradient buffer."""
    pending: dict[Any, int] = field(default_factory=dict)
    """What to wait on (a lane or a Ray ref), to its shard: the answers not read yet."""
    outgoing: dict[int, StepRequest] = field(default_factory=dict)
    """Per shard: the request as it went out (what a lane that broke resends through Ray)."""
    touched: dict[int, list[int]] = field(default_factory=dict)
    """Per shard: the slots the step changes."""
    failures: dict[int, Exception] = field(default_factory=dict)
    """Per shard: what it raised."""
    applied: list[int] = field(default_factory=list)
    """The shards that answered that they applied it."""
    new_state: list[int] = field(default_factory=list)
    """The ids of parameters whose state the step created."""


def result_of(answer: Any) -> Any:
    """A shard's answer, with its parameters in it where they came apart (a network lane's
    inline ones, a direct step's tensor)."""
    result = answer_of(answer)
    if isinstance(answer, NetLaneClient) and answer.has_params:  # sent inline
        result = replace(result, params=answer.params)
    if isinstance(result, tuple):  # a direct step: its parameters as a tensor
        result, values = result
        result = replace(result, params=values)
    return result
