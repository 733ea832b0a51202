"""CPU timing conditions: freed memory stays in the process.

With glibc's default settings a freed buffer of a few MiB goes back to the kernel, and the next
call's buffer of the same size is faulted in again, page by page. On the 2-core virtual machines
these results come from that costs about 0.3 ms per MiB, as much as the kernels being compared at
some sizes, and how much of it a variant pays depends on the order of the allocations before it
rather than on its code (one LSTM case measured anywhere from 13 to 20 ms with what ran before
it). jemalloc and tcmalloc keep freed memory by default, and PyTorch's CPU performance guide
recommends either; :func:`keep_freed_memory` asks glibc for the same, once for the whole
benchmark run, every variant alike. ``python -m fastseq bench --malloc default`` leaves glibc as it is.

Blocks above 32 MiB are mapped afresh whatever glibc is told. PyTorch backs such tensors with
transparent huge pages when ``THP_MEM_ALLOC_ENABLE=1`` is in the environment before it first
allocates (``make bench`` sets it): a 64 MiB buffer then takes 32 faults instead of 16384 (filling
a fresh one went from 17 to 2.7 ms here). :func:`huge_pages_setting` says whether that is on.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 32 << 20  # glibc's largest; bigger blocks are always mapped afresh
_TRIM_THRESHOLD = 1 << 30

SETTING = "glibc malloc keeps freed memory (mallopt: mmap threshold 32 MiB, trim threshold 1 GiB)"


def huge_pages_setting() -> str | None:
    """A description of PyTorch's huge-page allocation when the environment turns it on."""
    if os.environ.get("THP_MEM_ALLOC_ENABLE") == "1":
        return "large CPU tensors on transparent huge pages (THP_MEM_ALLOC_ENABLE=1)"
    return None


def keep_freed_memory() -> str | None:
    """Set glibc's malloc to keep freed memory for this process; returns :data:`SETTING`, or
    ``None`` where the C library is not glibc (nothing is changed there)."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD):
        return SETTING
    return None
