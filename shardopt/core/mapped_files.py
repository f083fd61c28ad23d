"""Pages of files this process maps (``torch.load(path, mmap=True)``), handed back once read.

A state dict loaded with ``mmap=True`` holds no tensor in memory: its tensors are views of the
file, paged in as they are read. Once :meth:`~shardopt.client.ray_shards.RayShards.load_state`
has packed one shard's part, those pages are not needed again, yet they stay in the process's
resident set until the kernel needs the memory. :func:`page_out` asks the kernel to reclaim
them at once (``madvise(MADV_PAGEOUT)``, Linux 5.4+), only for tensors inside file-backed
mappings: the kernel drops clean file pages (read again from the file if touched) and writes
anything else out first, so nothing is ever lost, whatever the caller did to the tensors.
Anonymous memory (ordinary tensors) is never touched. Elsewhere it does nothing.

Talks to nothing but the kernel (``/proc/self/maps``, ``madvise``).
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import ctypes.util
import mmap
import sys
from collections.abc import Iterable

import torch

MADV_PAGEOUT = 21
"""Linux's ``madvise`` advice to reclaim pages now (not in Python's ``mmap`` module)."""


def file_backed_ranges() -> list[tuple[int, int]]:
    """(start, end) addresses of this process's mappings of regular files, sorted."""
    if not sys.platform.startswith("linux"):
        return []
    ranges = []
    with contextlib.suppress(OSError), open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) < 6 or fields[4] == "0" or fields[5].startswith("["):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return sorted(ranges)


def page_out(tensors: Iterable[torch.Tensor]) -> int:
    """Asks the kernel to reclaim the pages of those ``tensors`` that live in file mappings.

    Returns:
        The bytes advised (0 where there are none, or off Linux).
    """
    ranges = file_backed_ranges()
    if not ranges:
        return 0
    starts = [start for start, _ in ranges]
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    page = mmap.PAGESIZE
    advised = 0
    for tensor in tensors:
        if tensor.device.type != "cpu" or not tensor.numel():
            continue
        ptr = tensor.data_ptr()
        end = ptr + tensor.numel() * tensor.element_size()
        k = bisect.bisect_right(starts, ptr) - 1
        if k < 0 or end > ranges[k][1]:
            continue  # not (wholly) inside one file mapping: leave it alone
        first, last = ptr // page * page, -(-end // page) * page
        if libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_PAGEOUT) == 0:
            advised += last - first
    return advised
