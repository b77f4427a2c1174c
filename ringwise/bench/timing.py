"""The one timer every benchmark uses, so their numbers mean the same thing.

Median seconds of `repeats` runs after `warmup` untimed ones. Across ranks (a process
group initialised) every run starts after a barrier and counts as the slowest rank's
time (all_reduce MAX), since the ring is as fast as its slowest member. On a CUDA device
runs are timed with CUDA events, so queued kernels are counted, not just their launch.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.distributed as dist


def _seconds(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median_time(
    fn: Callable[[], object], repeats: int, *, warmup: int = 1, device: torch.device | str = "cpu", group=None
) -> float:
    """Median seconds of fn() over `repeats` runs after `warmup` untimed ones (the slowest
    rank's per run when torch.distributed is initialised; `group` narrows that to a subgroup)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}; time at least one run")
    device = torch.device(device)
    ranked = dist.is_available() and dist.is_initialized()
    times = []
    for i in range(warmup + repeats):
        if ranked:
            dist.barrier(group=group)
        seconds = _seconds(fn, device)
        if ranked:
            t = torch.tensor(seconds, dtype=torch.float64, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
            seconds = t.item()
        if i >= warmup:
            times.append(seconds)
    return statistics.median(times)
