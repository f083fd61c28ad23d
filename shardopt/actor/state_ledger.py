"""Which parameters of a shard have optimizer state, and what each reader must learn of it.

A shard's optimizer keeps state in torch's insertion-ordered ``optimizer.state``; the proxy
mirrors which parameters have some (``optimizer.state``'s keys and order, as torch shows them).
A :class:`StateLedger` answers two kinds of reader:

- the proxy of a plain optimizer, the only one changing the shard: the ids that gained state
  since it last asked (:meth:`StateLedger.gained`), which a step's answer carries;
- each worker of a shard group, whose state others change too: :meth:`StateLedger.news`
  against the mark of what the worker last learnt (:class:`~shardopt.core.records.StateNews`).

Talks to nothing: it reads the shard's optimizer's state, which the shard hands it.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from shardopt.core.records import StateNews


class StateLedger:
    """Args:
    state: returns the optimizer's state as it is now (a load replaces the dict).
    id_of: ``id(parameter)`` -> the parameter's global id, for the shard's parameters.
    """

    def __init__(self, state: Callable[[], dict[Any, Any]], id_of: dict[int, int]) -> None:
        self._state = state
        self._id_of = id_of
        self._told = 0  # keys the proxy has been told of (gained)
        # changes whenever state is dropped or replaced (a step only adds keys); random at the
        # start, so that a shard rebuilt elsewhere never matches a mark of the old one
        self._epoch = uuid.uuid4().int >> 65

    def gained(self) -> tuple[int, ...]:
        """The ids that gained state since the last call (sorted, as torch meets them in a
        step: global ids follow the param groups' order)."""
        state = self._state()
        told, self._told = self._told, len(state)
        return self._added(state, told)

    def replaced(self) -> None:
        """State was dropped or replaced (a load, a deletion): every reader's mark is stale,
        and the proxy that did it knows what is there now."""
        self._epoch += 1
        self._told = len(self._state())

    def news(self, seen: tuple[int, int] | None) -> StateNews:
        """What a reader whose last :class:`StateNews` had the mark ``seen`` must learn."""
        state = self._state()
        mark = (self._epoch, len(state))
        if seen == mark:
            return StateNews(mark, (), False)
        if seen is not None and seen[0] == mark[0] and seen[1] <= mark[1]:
            return StateNews(mark, self._added(state, seen[1]), False)
        return StateNews(mark, self._ids(state.keys()), True)

    def _added(self, state: dict[Any, Any], count: int) -> tuple[int, ...]:
        """The ids of the keys after the first ``count`` (sorted, as torch meets them in a step)."""
        return tuple(sorted(self._ids(itertools.islice(state.keys(), count, None))))

    def _ids(self, params: Iterable[Any]) -> tuple[int, ...]:
        return tuple(self._id_of[id(p)] for p in params if id(p) in self._id_of)
