"""Failure paths of the training job: a frozen rank ends the job, naming it, within the timeout."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _ranks(launcher: int) -> list[int]:
    """Pids of the ranks the launcher spawned, in rank order (started one after another)."""
    kids = []
    for d in Path("/proc").iterdir():
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == launcher and b"spawn_main" in cmd:
            kids.append(int(d.name))
    return sorted(kids)


@pytest.mark.parametrize("frozen", [1, 0])
def test_a_frozen_rank_ends_the_job_naming_it(tmp_path, frozen):
    """SIGSTOP one rank mid-training: the job exits non-zero within --timeout (plus the
    launcher's teardown), and the error names the frozen rank."""
    timeout = 6
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ringwise.train", "--world", "2", "--model", "tiny", "--seq-len", "64",
           "--batch", "2", "--steps", "100000", "--ckpt-every", "100000", "--threads", "1",
           "--timeout", str(timeout), "--out", str(out), "--no-plots"]
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stopped = None
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait until it trains
            metrics = out / "metrics.jsonl"
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
                break
            assert job.poll() is None, job.stdout.read()
            time.sleep(0.2)
        stopped = _ranks(job.pid)[frozen]
        os.kill(stopped, signal.SIGSTOP)
        t0 = time.monotonic()
        output, _ = job.communicate(timeout=timeout + 60)
        elapsed = time.monotonic() - t0
    finally:
        if stopped is not None and Path(f"/proc/{stopped}").exists():
            os.kill(stopped, signal.SIGKILL)
        if job.poll() is None:
            job.kill()
            job.wait()
    assert job.returncode == 1
    last = next(line for line in reversed(output.splitlines()) if line.startswith("ringwise train: "))
    assert last.startswith("ringwise train: the job failed: "), last
    assert f"rank {frozen} (pid {stopped}" in last and "stopped responding" in last, output[-3000:]
    assert elapsed < timeout + 10, elapsed  # the timeout, then the launcher's 5 s teardown
