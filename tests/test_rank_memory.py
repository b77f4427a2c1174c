"""A training rank's peak memory counts no freed tensor, however the rank was started.

The rank sets glibc's mmap threshold low at start-up (ringwise.train.watchdog.return_large_frees):
ringwise's launcher does it in every rank it starts, and under torchrun the rank does it itself.
Without it, glibc keeps freed blocks in the heap, and the peak resident set (VmHWM, what
metrics.jsonl's peak_rss_mib reads) counts them long after the tensors are gone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

MIB = 2**20
BIG_MIB = 200


def _freed_big_then_small_step(out: str) -> None:
    """Allocate 200 MiB as 1 MiB tensors with small live ones between them, free the big ones,
    then restart the peak and run a small step (a 10 MiB tensor): the step's peak above the
    resident set before all this, in MiB, goes to `out`."""
    import torch

    from ringwise.train.watchdog import peak_memory_mib, proc_status_kb

    base = proc_status_kb("VmRSS") / 1024
    big, pins = [], []
    for _ in range(BIG_MIB):
        big.append(torch.ones(2**18))  # 1 MiB
        pins.append(torch.ones(8192))  # 32 KiB kept alive between them (too big for the heap's small holes)
    held = proc_status_kb("VmRSS") / 1024 - base
    del big
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM restarts at the current resident set
    step = torch.ones(10 * 2**18)  # the small step: 10 MiB
    peak = peak_memory_mib(torch.device("cpu")) - base
    del step, pins
    Path(out).write_text(json.dumps(dict(held=held, peak=peak)))


def _in_subprocess(code: str, out: Path, env: dict[str, str]) -> dict:
    tests = str(Path(__file__).parent)
    subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {tests!r}); {code}"],
        check=True,
        env={**os.environ, **env},
        timeout=120,
    )
    return json.loads(out.read_text())


# glibc's default threshold rises to the largest block freed (up to 32 MiB), so in a real job 1 MiB
# blocks soon come from the heap; the processes here start there (as a job does after its first
# big frees), where the heap's history would otherwise decide it
HIGH_THRESHOLD = dict(MALLOC_MMAP_THRESHOLD_=str(4 * MIB))
ENTRY = "from test_rank_memory import _freed_big_then_small_step as f"


@pytest.mark.parametrize("launched_by", ["ringwise", "torchrun"])
def test_a_ranks_peak_does_not_count_a_freed_tensor(launched_by, tmp_path):
    out = tmp_path / "peak.json"
    launch = f"from ringwise.train.launcher import elastic_run; {ENTRY}; elastic_run(f, 1, {str(out)!r})"
    # ringwise's launcher forks the rank; under torchrun's environment the process itself is the rank
    torchrun = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0") if launched_by == "torchrun" else {}
    got = _in_subprocess(launch, out, {**HIGH_THRESHOLD, **torchrun})
    assert got["held"] >= BIG_MIB * 0.95, got  # the rank did hold the big tensors
    assert got["peak"] < 40, got  # the 10 MiB step, not the 200 MiB freed before it

    # the same work in a process that never set the threshold: its peak counts the freed memory
    # (what metrics.jsonl read before; if glibc ever returns such memory by itself, this says so)
    plain = tmp_path / "plain.json"
    control = _in_subprocess(f"{ENTRY}; f({str(plain)!r})", plain, HIGH_THRESHOLD)
    assert control["peak"] > BIG_MIB * 0.9, control
