"""The state dicts ``optimizer.state[p]`` handed out, and what the user changed in them.

torch's ``opt.state[p]`` is the state itself: ``opt.state[p]["exp_avg"].zero_()`` or
``opt.state[p]["step"] = ...`` change it. shardopt's view hands out a copy fetched from the
shard (a plain dict, as torch's), so such changes would be lost silently. :class:`Handouts`
keeps each dict it hands out (with its keys, each tensor's version counter, other values as
they are) and, before the shards are next used for anything (the proxy's ``backend``, which
every call and every read of the state goes through), writes back to its shard every dict
changed since: a value replaced, added or removed, a tensor changed in place. The dicts are
then expired: the shards' state moves on without them (a step), so a dict changed after that
is not written back; the use of the shards after that warns about it (``RuntimeWarning``),
and forgets it (the dicts are held until then only). Writes through ``tensor.data`` are
invisible to version counters, as for parameters.

Talks to: the backend's ``set_param_state``.
"""

from __future__ import annotations

import warnings
from typing import Any

from shardopt.client.state_reads import StateReads, mark, same


class Handouts:
    """The dicts handed out since the shards were last used, and those of the use before.

    Args:
        reads: the proxy's record of its last ``state_dict()``, told of every write back.
    """

    def __init__(self, reads: StateReads) -> None:
        self._reads = reads
        # (pid, the dict, its marks), held: a change made in place through a dict dropped at
        # once (opt.state[p]["exp_avg"].zero_()) must still count
        self._live: list[tuple[int, dict, Any]] = []
        self._expired: list[tuple[int, dict, Any]] = []
        self._settling = False

    def hand_out(self, pid: int, state: dict[str, Any]) -> dict[str, Any]:
        """``state`` (parameter ``pid``'s, fresh from its shard), noted as handed out."""
        self._live.append((pid, state, _marks(state)))
        return state

    def settle(self, backend: Any) -> None:
        """Writes back the live dicts changed since they were handed out, then expires them;
        warns about the expired ones changed since they expired (not written back), and
        forgets those."""
        if self._settling or not (self._live or self._expired):
            return
        self._settling = True  # writing back uses the backend, which would settle again
        try:
            stale = sorted({pid for pid, state, marks in self._expired if not _same(state, marks)})
            live, self._live, self._expired = self._live, [], []
            if stale:
                warnings.warn(
                    f"optimizer.state of parameter ids {stale} was changed in place after the "
                    "shards moved on (a step, a load, a read of the state since it was read): "
                    "not applied. Read optimizer.state[p] again and change that, or assign "
                    "optimizer.state[p] = ...",
                    RuntimeWarning,
                    stacklevel=4,
                )
            for pid, state, marks in live:
                if not _same(state, marks):
                    self._reads.changed()
                    backend.set_param_state(pid, dict(state))
                self._expired.append((pid, state, _marks(state)))
        finally:
            self._settling = False


class _Items(list):
    """The marks of a list's or a tuple's items, and which of the two it was."""

    def __init__(self, kind: type, items: list) -> None:
        super().__init__(items)
        self.kind = kind


def _marks(value: Any) -> Any:
    """What :func:`_same` compares ``value`` with later: :func:`state_reads.mark` of each
    value, inside dicts, lists and tuples too (LBFGS's state holds lists of tensors)."""
    if isinstance(value, dict):
        return {k: _marks(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return _Items(type(value), [_marks(v) for v in value])
    return mark(value)


def _same(value: Any, marks: Any) -> bool:
    """Whether ``value`` is still what ``marks`` noted: the same keys and items, the same
    tensors unchanged in place, equal other values (:func:`state_reads.same`)."""
    if isinstance(value, dict):
        return (
            isinstance(marks, dict)
            and value.keys() == marks.keys()
            and all(_same(v, marks[k]) for k, v in value.items())
        )
    if isinstance(value, (list, tuple)):
        return (
            isinstance(marks, _Items)
            and marks.kind is type(value)
            and len(marks) == len(value)
            and all(_same(v, m) for v, m in zip(value, marks))
        )
    return isinstance(marks, tuple) and same(value, marks)
