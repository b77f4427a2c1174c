"""Failure paths of the training job: a frozen rank ends the job, naming it, within the timeout."""

import os
import signal
import socket
import time
from pathlib import Path

import pytest
from jobs import Job


def test_a_frozen_or_killed_rank_ends_the_job_naming_it(tmp_path):
    """Three jobs at once: SIGSTOP one rank mid-training (rank 1 in one job, rank 0 in another) and
    SIGKILL rank 1 of the third. Each frozen job exits non-zero within --timeout (plus the launcher's
    teardown) naming its frozen rank; the killed one at once (a dead peer's connection closes, no
    timeout), naming its dead rank, its lock released."""
    timeout, killed_timeout = 6, 60
    jobs = {frozen: Job(tmp_path / f"frozen{frozen}", timeout) for frozen in (1, 0)}
    jobs["killed"] = Job(tmp_path / "killed", killed_timeout)
    stopped, elapsed = {}, {}
    try:
        deadline = time.monotonic() + 120
        for job in jobs.values():
            job.wait_training(deadline)
        victim = jobs["killed"].ranks()[1]
        for frozen in (1, 0):
            stopped[frozen] = jobs[frozen].ranks()[frozen]
            os.kill(stopped[frozen], signal.SIGSTOP)
        os.kill(victim, signal.SIGKILL)
        t0 = time.monotonic()
        for name, job in jobs.items():
            job.proc.wait(timeout=(killed_timeout if name == "killed" else timeout) + 60)
            elapsed[name] = time.monotonic() - t0
    finally:
        for pid in stopped.values():
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)
        for job in jobs.values():
            job.end()
    for frozen in (1, 0):
        job = jobs[frozen]
        assert job.proc.returncode == 1, job.output()[-3000:]
        report = job.report()
        assert f"rank {frozen} (pid {stopped[frozen]}" in report and "stopped responding" in report, report
        assert elapsed[frozen] < timeout + 10, elapsed
    job = jobs["killed"]
    assert job.proc.returncode == 1, job.output()[-3000:]
    report = job.report()
    # the launcher's own record, or rank 0's when the launcher saw rank 0's error first
    assert (
        "rank 1 (exit code -9): Signal 9 (SIGKILL)" in report
        or f"rank 1 (pid {victim} on {socket.gethostname()}) exited while the job ran" in report
    ), report
    assert elapsed["killed"] < 10, elapsed  # not the timeout: a dead peer's connection closes
    assert not (tmp_path / "killed" / ".lock").exists()


def _wait_on_silent_peer(timeout):
    """Rank 0 waits on rank 1 in each mesh group; rank 1 stays silent. Seconds until each gives up."""
    import torch
    import torch.distributed as dist

    from ringwise.train import make_mesh

    mesh = make_mesh(1, torch.device("cpu"), timeout)
    groups = {"cp": mesh.cp_group, "dp_cp": mesh.shard_mesh.get_group()}
    if dist.get_rank() == 1:  # returns to its idle rank loop: alive, and silent on every group
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
    from ringwise.testing.cluster import LocalCluster

    with LocalCluster(2, pg_timeout=60) as c:
        took = c.run(_wait_on_silent_peer, 1.0, timeout=60)[0]
    assert set(took) == {"cp", "dp_cp"} and all(0.8 < t < 10 for t in took.values()), took
