"""Failure paths of the training job: a frozen rank ends the job, naming it, within the timeout."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _start(out, timeout):
    """A long training job on 2 local ranks, once it has trained two steps."""
    cmd = [sys.executable, "-m", "ringwise.train", "--world", "2", "--model", "tiny", "--seq-len", "64",
           "--batch", "2", "--steps", "100000", "--ckpt-every", "100000", "--threads", "1",
           "--timeout", str(timeout), "--out", str(out), "--no-plots"]
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            return job
        if job.poll() is not None:
            pytest.fail(job.stdout.read())
        time.sleep(0.2)
    job.kill()
    pytest.fail("the job did not start training within 120 s")


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
    job = _start(tmp_path / "run", timeout)
    stopped = None
    try:
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
    report = output[output.index("ringwise train: the job failed:"):]
    assert f"rank {frozen} (pid {stopped}" in report and "stopped responding" in report, output[-3000:]
    assert elapsed < timeout + 10, elapsed


def test_a_killed_rank_ends_the_job_at_once(tmp_path):
    timeout = 60
    job = _start(tmp_path / "run", timeout)
    try:
        victim = _ranks(job.pid)[1]
        os.kill(victim, signal.SIGKILL)
        t0 = time.monotonic()
        output, _ = job.communicate(timeout=timeout)
        elapsed = time.monotonic() - t0
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert job.returncode == 1
    report = output[output.index("ringwise train: the job failed:"):]
    assert "rank 1 (exit code -9): Signal 9 (SIGKILL)" in report, report
    assert elapsed < 10, elapsed  # not the timeout: a dead peer's connection closes
    assert not (tmp_path / "run" / ".lock").exists()


def _wait_on_silent_peer(timeout):
    """Rank 0 waits on rank 1 in each mesh group; rank 1 stays silent. Seconds until each gives up."""
    import torch
    import torch.distributed as dist

    from ringwise.train import make_mesh

    mesh = make_mesh(1, torch.device("cpu"), timeout)
    groups = {"cp": mesh.cp_group, "dp_cp": mesh.shard_mesh.get_group()}
    if dist.get_rank() == 1:
        time.sleep(len(groups) * timeout + 2)
        return {}
    took = {}
    for name, group in groups.items():
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="Timed out"):
            dist.all_reduce(torch.ones(1), group=group)
        took[name] = time.monotonic() - t0
    return took


def test_every_mesh_group_has_the_jobs_timeout():
    """The ring (cp) group and FSDP's flattened group time out after the job's timeout,
    not gloo's default 30 minutes."""
    from ringwise.lab.cluster import LocalCluster

    with LocalCluster(2, pg_timeout=60) as c:
        took = c.run(_wait_on_silent_peer, 2.0, timeout=60)[0]
    assert set(took) == {"cp", "dp_cp"} and all(1.5 < t < 10 for t in took.values()), took
