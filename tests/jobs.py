"""A long local training job run as a user runs it (`python -m ringwise.train`), and its processes."""

import subprocess
import sys
import time
from pathlib import Path

import pytest


class Job:
    """A long training job on 2 local ranks (its output in a file: a pipe could fill and stall it)."""

    def __init__(self, out: Path, timeout: float):
        self.out, self.log = out, out.parent / f"{out.name}.log"
        cmd = [
            sys.executable,
            "-m",
            "ringwise.train",
            "--world",
            "2",
            "--model",
            "tiny",
            "--seq-len",
            "64",
            "--batch",
            "2",
            "--steps",
            "100000",
            "--ckpt-every",
            "100000",
            "--threads",
            "1",
            "--timeout",
            str(timeout),
            "--out",
            str(out),
            "--no-plots",
        ]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)

    def wait_training(self, deadline: float) -> None:
        """Until it has trained two steps."""
        metrics = self.out / "metrics.jsonl"
        while time.monotonic() < deadline:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
                return
            if self.proc.poll() is not None:
                pytest.fail(self.output())
            time.sleep(0.2)
        self.proc.kill()
        pytest.fail("the job did not start training in time")

    def ranks(self) -> list[int]:
        return _ranks(self.proc.pid)

    def output(self) -> str:
        return self.log.read_text()

    def report(self) -> str:
        out = self.output()
        assert "ringwise train: the job failed:" in out, out[-3000:]
        return out[out.index("ringwise train: the job failed:") :]

    def end(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _children() -> dict[int, list[tuple[int, bytes]]]:
    """Every process's children as (pid, command line), read once from /proc."""
    kids: dict[int, list[tuple[int, bytes]]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmd = (d / "cmdline").read_bytes()
            except (OSError, ValueError, IndexError):
                continue
            kids.setdefault(ppid, []).append((int(d.name), cmd))
    return kids


def _ranks(launcher: int) -> list[int]:
    """Pids of the ranks the launcher started, in rank order (forked one after another by its
    forkserver, or spawned by the launcher itself where there is no forkserver)."""
    kids = _children()
    mine = kids.get(launcher, [])
    servers = [pid for pid, cmd in mine if b"forkserver" in cmd]
    if servers:
        return sorted(pid for pid, _ in kids.get(servers[0], []))
    return sorted(pid for pid, cmd in mine if b"spawn_main" in cmd)


def descendants(pid: int) -> list[int]:
    """pid and every process below it."""
    kids = _children()
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(child for child, _ in kids.get(p, []))
    return found
