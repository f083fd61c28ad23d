"""How many OpenMP threads this thread's torch ops use, set for a block without touching
torch's process-wide settings.

A step's copies on the client (gradients into the shards' buffers, parameters back into the
user's tensors) are torch ``copy_`` calls; above a few hundred KB torch runs them on its
OpenMP team. A copy is bound by memory bandwidth, so on a small machine a second thread barely
shortens it; what it costs comes after: libgomp's idle workers spin for milliseconds before they
sleep (an 80 MB copy on 2 threads: 4.9 ms wall, 17 ms of CPU, against 4.7 ms wall and 4.7 ms of
CPU on one), on the very CPUs the shards of this node are about to step on. :func:`at_most`
runs a block with this thread's team cut to ``n``, which is what ``omp_set_num_threads`` sets:
the calling thread's own team size (an OpenMP data-environment setting), which is what torch's
``parallel_for`` reads (``torch.get_num_threads()``). ``torch.set_num_threads`` is not used for
it: it also stores a process-wide default that threads starting meanwhile would take, and
clears oneDNN's cache of compiled kernels (the user's convolutions would be compiled again).

Where no OpenMP runtime is loaded (another build of torch, a platform without
``/proc/self/maps``), the block runs as it is.

Talks to: the OpenMP runtime torch loaded (libgomp, libomp or libiomp5), through ctypes.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch

logger = logging.getLogger(__name__)

_RUNTIMES = ("libgomp", "libomp", "libiomp5")


@functools.lru_cache(maxsize=1)
def runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime whose team size torch reads in this process, or None.

    Several may be loaded (torch's own and another library's): the one is found by setting a
    team size through each and seeing which one ``torch.get_num_threads()`` follows.
    """
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            paths = sorted({line.split()[-1] for line in maps if "/" in line})
    except OSError:
        return None
    candidates = [
        path
        for name in _RUNTIMES
        for path in paths
        if path.rsplit("/", 1)[-1].startswith((name + ".", name + "-"))  # libgomp-a1b2.so.1
    ]
    before = torch.get_num_threads()  # settles torch's own setting for this thread first
    probe = 1 if before > 1 else 2
    for path in candidates:
        try:
            lib = ctypes.CDLL(path)  # already loaded: the same instance as its other users'
            lib.omp_get_max_threads.restype = ctypes.c_int
            lib.omp_set_num_threads.argtypes = (ctypes.c_int,)
        except (OSError, AttributeError) as err:
            logger.debug("OpenMP runtime %s not usable: %s", path, err)
            continue
        lib.omp_set_num_threads(probe)
        follows = torch.get_num_threads() == probe
        lib.omp_set_num_threads(before)
        if follows:
            return lib
    return None


@contextmanager
def at_most(threads: int | None) -> Iterator[None]:
    """Runs the block with this thread's torch ops on at most ``threads`` OpenMP threads
    (None: as they are). Other threads, and this one after the block, keep their team size.

    Example:
        >>> with at_most(1):
        ...     torch.get_num_threads() == 1 or runtime() is None
        True
    """
    lib = runtime() if threads is not None else None
    before = torch.get_num_threads() if lib is not None else 0  # settles torch's own first
    if lib is None or before <= max(1, threads) or lib.omp_get_max_threads() != before:
        yield
        return
    lib.omp_set_num_threads(max(1, threads))
    try:
        yield
    finally:
        lib.omp_set_num_threads(before)
