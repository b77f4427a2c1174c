"""A ring of local processes for tests, demos and benchmarks.

`LocalCluster(W)` starts W processes joined in one gloo (or NCCL) process group whose
store (held by the caller) and sockets listen on 127.0.0.1 alone, and keeps them alive,
so many small jobs share one start-up. `run(fn, ...)` calls fn on every rank and returns
the per-rank results. Nothing hangs: every job has a deadline; a rank that raises, dies
or overruns tears the cluster down and the caller gets one exception with every rank's
traceback (stack dumps for ranks that hung).
"""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import pickle
import queue
import tempfile
import time
import traceback
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Optional

from ..train.launcher import die_with, start_method
from ..train.loopback import LOOPBACK, keep_sockets_on_loopback, loopback_store

if TYPE_CHECKING:
    import torch.distributed as dist


class ClusterError(RuntimeError):
    """A job failed on some rank; the message holds every rank's report."""


def _worker(owner, rank, world_size, port, backend, threads, pg_timeout, tasks, results, dump_path, track_memory):
    die_with(owner)
    if track_memory:
        from .memory import return_large_frees

        return_large_frees()
    os.environ.update(
        MASTER_ADDR=LOOPBACK, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    dump = open(dump_path, "w")
    try:
        keep_sockets_on_loopback()
        timeout = timedelta(seconds=pg_timeout)
        store = dist.TCPStore(LOOPBACK, port, world_size, False, timeout)  # a client of the cluster's store
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
        results.put((rank, "ready", None))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
        return
    while True:
        item = tasks.get()
        if item is None:
            break
        fn, args, kwargs, deadline = pickle.loads(item)
        faulthandler.dump_traceback_later(deadline, file=dump, exit=True)
        try:
            payload: tuple[str, bytes | str] = ("ok", pickle.dumps(fn(*args, **kwargs)))
        except BaseException:
            payload = ("error", traceback.format_exc())
        faulthandler.cancel_dump_traceback_later()
        results.put((rank,) + payload)
    dist.destroy_process_group()


class LocalCluster:
    """W live ranks in one process group; use as a context manager or call close()."""

    def __init__(
        self,
        world_size: int,
        backend: str = "gloo",
        threads_per_rank: int = 1,
        pg_timeout: float = 60.0,
        start_timeout: float = 120.0,
        track_memory: bool = False,
    ):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        ctx: Any = mp.get_context(start_method(__name__))  # a SpawnContext or ForkServerContext (both make Process)
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._dumpdir = tempfile.mkdtemp(prefix="ringwise-cluster-")
        self._store: Optional["dist.TCPStore"] = loopback_store(
            pg_timeout
        )  # held here, for the cluster's life: no rank hosts it
        port = self._store.port
        self._procs = [
            ctx.Process(
                target=_worker,
                daemon=True,
                args=(
                    os.getpid(),
                    r,
                    world_size,
                    port,
                    backend,
                    threads_per_rank,
                    pg_timeout,
                    self._tasks[r],
                    self._results,
                    self._dump_path(r),
                    track_memory,
                ),
            )
            for r in range(world_size)
        ]
        for p in self._procs:
            p.start()
        self.closed = False
        self._collect("start-up", start_timeout, expect="ready")

    def _dump_path(self, rank):
        return os.path.join(self._dumpdir, f"rank{rank}.txt")

    def _collect(self, what, timeout, expect="ok"):
        got: dict[int, object] = {}
        errors: dict[int, str] = {}
        end = time.monotonic() + timeout
        while len(got) + len(errors) < self.world_size:
            if errors:  # others may be blocked on the failed rank: give them a moment, then stop
                end = min(end, time.monotonic() + 5)
            try:
                rank, status, payload = self._results.get(timeout=max(0.05, min(1.0, end - time.monotonic())))
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive() and r not in got and r not in errors]
                for r in dead:
                    errors[r] = f"process exited with code {self._procs[r].exitcode}"
                if time.monotonic() >= end:
                    break
                continue
            if status == expect:
                got[rank] = payload
            else:
                errors[rank] = payload
        if len(got) == self.world_size:
            return [got[r] for r in range(self.world_size)]
        self.close()
        report = []
        for r in range(self.world_size):
            if r in errors:
                report.append(f"--- rank {r} failed:\n{errors[r]}")
            elif r not in got:
                report.append(f"--- rank {r} did not finish within {timeout:.0f}s; its stacks:\n{self._read_dump(r)}")
        raise ClusterError(f"{what} failed on a {self.world_size}-rank cluster:\n" + "\n".join(report))

    def _read_dump(self, rank):
        try:
            with open(self._dump_path(rank)) as f:
                return f.read() or "(no stack dump)"
        except OSError:
            return "(no stack dump)"

    def run(self, fn, *args, timeout: float = 120.0, **kwargs) -> list:
        """fn(*args, **kwargs) on every rank (fn must be importable by name); per-rank results."""
        if self.closed:
            raise ClusterError("the cluster is closed (an earlier job failed or close() was called)")
        item = pickle.dumps((fn, args, kwargs, timeout))
        for q in self._tasks:
            q.put(item)
        return [pickle.loads(x) for x in self._collect(getattr(fn, "__name__", "job"), timeout + 10)]

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for q in self._tasks:
            try:
                q.put(None)
            except (OSError, ValueError):
                pass
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        self._store = None  # its server stops with the last reference

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
