"""Peak tensor memory of one call: :func:`peak_memory`.

What it measures: the highest amount of *tensor storage* held through PyTorch's allocator at any
moment during the call, minus what was held when the call began. Tensors the call returns count
(they are still alive at its end); autograd's saved activations count while they are alive. Python
objects, the allocator's cached-but-free blocks, and memory a kernel obtains outside the allocator
(``malloc`` in C++ code, NumPy buffers of the Triton interpreter) do not.

How:

* CUDA: the caching allocator's own counters, ``torch.cuda.reset_peak_memory_stats`` then
  ``torch.cuda.max_memory_allocated``, minus ``torch.cuda.memory_allocated`` at entry. Exact, and
  covers every stream of the device.
* CPU: there is no peak counter, so the call runs under ``torch.autograd.profiler.profile(
  profile_memory=True)``, which records one ``[memory]`` event per allocation (+bytes) and free
  (-bytes). Sorted by time, the running sum of those events is the live memory above the entry
  level; its maximum is the peak. It sees the allocations of the calling thread and of the threads
  that inherit its profiler state (the autograd engine, intra-op workers). A free of a tensor that
  existed before the call is not recorded (the profiler never saw its size), so a call that frees
  its inputs and then allocates reads high by up to the freed amount.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable

import torch

MEMORY_EVENT = "[memory]"


def peak_memory(fn: Callable, *args, device: torch.device | str | None = None, **kwargs) -> int:
    """Bytes of peak tensor memory allocated while ``fn(*args, **kwargs)`` runs, above entry.

    ``device`` selects whose allocator is watched (``device`` is consumed here, not passed to
    ``fn``). By default: the device of the first tensor in ``args``/``kwargs``, else CUDA when a
    GPU is present, else CPU. The result of ``fn`` is discarded after the measurement.
    """
    device = _resolve_device(device, args, kwargs)
    if device.type == "cuda":
        return _cuda_peak(device, fn, args, kwargs)
    if device.type == "cpu":
        return _cpu_peak(fn, args, kwargs)
    raise ValueError(f"peak_memory: unsupported device {device}")


def _resolve_device(device, args, kwargs) -> torch.device:
    if device is not None:
        return torch.device(device)
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _cuda_peak(device: torch.device, fn, args, kwargs) -> int:
    # Finish queued work first so that its allocations neither count nor hide in the baseline.
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    result = fn(*args, **kwargs)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - baseline
    del result
    return max(peak, 0)


def _cpu_peak(fn, args, kwargs) -> int:
    profiler = torch.autograd.profiler.profile(profile_memory=True)
    with _quiet_stderr():
        profiler.__enter__()
    try:
        result = fn(*args, **kwargs)
    finally:
        with _quiet_stderr():
            profiler.__exit__(None, None, None)
    del result
    # The raw results keep every [memory] event; the parsed `profiler.events()` folds the ones
    # made inside an op into that op's totals and so loses their order.
    events = [e for e in profiler.kineto_results.events() if e.name() == MEMORY_EVENT]
    return peak_of_running_sum((e.start_ns(), e.nbytes()) for e in events if _on_cpu(e))


def _on_cpu(event) -> bool:
    kinds = torch.autograd.DeviceType
    return event.device_type() in (kinds.CPU, kinds.MKLDNN, kinds.IDEEP)


def peak_of_running_sum(timed_deltas) -> int:
    """Max over time of the running sum of ``(time, delta_bytes)`` pairs, starting from 0.

    Pairs with equal times keep their given order (the sort is stable).
    """
    live = peak = 0
    for _, delta in sorted(timed_deltas, key=lambda pair: pair[0]):
        live += delta
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def _quiet_stderr():
    """Send file descriptor 2 to /dev/null for the block.

    Kineto, the profiler's backend, writes a few log lines straight to fd 2 on every start and
    stop (plus an error on CUDA builds without a GPU). Measured once per benchmark variant they
    would bury the progress bar, so only the profiler's start and stop run in here, never ``fn``.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
