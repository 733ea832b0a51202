"""CPU timing conditions: what a call pays for memory, measured apart from what its kernels pay.

With glibc's default settings a freed buffer of a few MiB goes back to the kernel, and every block
over 32 MiB is mapped afresh on each allocation, so the next call's buffers are faulted in again,
page by page. On the 2-core virtual machines these results come from, that costs about 0.3 ms
per MiB (4 KiB pages), and what it costs at a given moment depends on the machine's memory state
(free and unfragmented memory for huge pages, page cache to reclaim) and on what was allocated
before, rather than on the code being measured.

So a CPU benchmark run keeps every freed block in the process (:func:`keep_freed_memory`: no
``mmap`` for any size, no trimming, what jemalloc and tcmalloc do and PyTorch's CPU performance
guide recommends), and the time of a call is its kernels' time. What a loop that gets fresh memory
on every call pays on top of it is measured apart: :func:`release_freed_memory` hands the kept
pages back to the kernel before each such call, and :func:`minor_faults` counts the pages faulted
in. PyTorch backs large CPU tensors with transparent huge pages when ``THP_MEM_ALLOC_ENABLE=1`` is
in the environment before it first allocates (``make bench`` sets it): a fresh 64 MiB buffer then
takes 32 faults instead of 16384. :func:`huge_pages_setting` says whether that is on.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import resource

# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_TRIM_THRESHOLD = 2**31 - 1  # the largest mallopt takes (an int): trim only past 2 GiB free

SETTING = "glibc malloc keeps freed memory (mallopt: one arena, no mmap, trim threshold 2 GiB)"


@functools.cache
def _libc():
    """glibc's ``mallopt`` and ``malloc_trim``, or ``None`` where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    malloc_trim.argtypes, malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return mallopt, malloc_trim


def huge_pages_setting() -> str | None:
    """A description of PyTorch's huge-page allocation when the environment turns it on."""
    if os.environ.get("THP_MEM_ALLOC_ENABLE") == "1":
        return "large CPU tensors on transparent huge pages (THP_MEM_ALLOC_ENABLE=1)"
    return None


def keep_freed_memory() -> str | None:
    """Set glibc's malloc to keep every freed block in this process, of any size; returns
    :data:`SETTING`, or ``None`` where the C library is not glibc (nothing is changed there).

    One arena for every thread: a thread's own arena would map blocks over 64 MiB afresh whatever
    the settings. Call it before worker threads first allocate."""
    libc = _libc()
    if libc is None:
        return None
    mallopt, _ = libc
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    if all(mallopt(param, value) for param, value in settings):
        return SETTING
    return None


def release_freed_memory() -> bool:
    """Hand every whole free page the process keeps back to the kernel (``malloc_trim(0)``), so
    that the next allocations are faulted in afresh; ``False`` where that cannot be done."""
    libc = _libc()
    if libc is None:
        return False
    libc[1](0)
    return True


def minor_faults() -> int:
    """Minor page faults of this process so far (all threads): pages faulted in from nothing."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
