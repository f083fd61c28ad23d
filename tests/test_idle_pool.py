"""The idle-host bookkeeping every process pool shares (:mod:`shardopt.core.idle_pool`): taken by
key, most recently used first, bounded in number (the oldest let go) and in time, and the
node filter replica hosts use. Pure bookkeeping: the pools' Ray side is covered by
test_group.py (a closed group's hosts serve the next) and test_ft.py (replica hosts reused)."""

from __future__ import annotations

import time

import pytest

from shardopt.core.idle_pool import IdlePool


def test_takes_by_key_most_recent_first_and_lets_the_oldest_go():
    pool = IdlePool(max_idle=3)
    assert pool.give("a1", "a", node="n1") == []
    assert pool.give("b1", "b") == []
    assert pool.give("a2", "a", node="n2") == []
    assert pool.give("a3", "a", node="n1") == ["a1"]  # the oldest, beyond 3
    assert len(pool) == 3
    assert pool.take("a", accept=lambda idle: idle.node != "n1") == ["a2"]
    assert pool.take("a", count=5) == ["a3"]  # only what there is
    assert pool.take("c") == []
    assert pool.take("b", count=2) == ["b1"]
    assert len(pool) == 0
    none_kept = IdlePool(max_idle=0)
    assert none_kept.give("x", "a") == ["x"]  # a pool of none lets every item go at once
    with pytest.raises(ValueError, match="max_idle"):
        IdlePool(max_idle=-1)


def test_items_idle_too_long_expire_and_clear_takes_all():
    pool = IdlePool(max_idle=4, idle_timeout_s=0.05)
    pool.give("old", "a")
    time.sleep(0.1)
    pool.give("new", "a")
    assert pool.expired() == ["old"]
    assert pool.take("a") == ["new"]
    forever = IdlePool(max_idle=4)
    forever.give("x", "a")
    assert forever.expired() == []
    assert forever.clear() == ["x"] and len(forever) == 0
