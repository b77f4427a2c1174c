"""Peak memory of a piece of work, measured, on CPU and CUDA.

CUDA: the caching allocator's peak. CPU: torch keeps no allocator statistics, so we
read the kernel's peak resident set (VmHWM) after resetting it through
/proc/self/clear_refs. That counts every byte the process touched, so run with
glibc's mmap threshold set low (`return_large_frees`, the training ranks' own, from
ringwise.train.watchdog) to make freed tensors leave the resident set at once;
`LocalCluster(..., track_memory=True)` does this for its ranks.
"""

from __future__ import annotations

import torch

from ..train.watchdog import proc_status_kb, return_large_frees

__all__ = ["PeakMemory", "mib", "return_large_frees"]


class PeakMemory:
    """`with PeakMemory(device) as m: work()`; then m.peak_bytes is the peak above the start."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.peak_bytes = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self._base = proc_status_kb("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self.peak_bytes = max(0, proc_status_kb("VmHWM") * 1024 - self._base)


def mib(n_bytes: float) -> float:
    return n_bytes / 2**20
