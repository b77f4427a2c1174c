"""Starting the ranks: the local launcher (PyTorch's elastic launcher, the code torchrun runs) and
torchrun's environment.

`elastic_run(fn, nproc, ...)` runs fn on nproc local ranks (or, under torchrun, on this rank
directly: the same script runs locally and on a cluster); each local rank is forked from a
forkserver that imported torch once, and dies with the launcher however the launcher ends.
Every rank it runs sets glibc's mmap threshold low first (watchdog.return_large_frees), so that
its peak memory counts no freed tensor. `failure_causes` turns a failed launch into each rank's cause, a line each.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import threading

from .watchdog import return_large_frees


def free_port() -> int:
    """A free TCP port of 127.0.0.1 (for a client-side choice; ringwise's own stores bind theirs, see loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_method(*preload: str) -> str:
    """ "forkserver" where the platform has it (else "spawn"), with `preload` imported once in the server.

    A spawned rank imports torch afresh (2-3 s of CPU each, most of a small job's start-up);
    a forkserver imports it once and forks every rank from that clean, single-threaded
    process, so no parent's threads or state are inherited. The server's environment is the
    one at its first use: set per-rank variables in the rank, not in the parent before start.
    torch._dynamo is preloaded too: the first call of a custom op (ring attention) imports it,
    ~0.45 s of CPU that every rank would pay again.
    """
    import multiprocessing as mp

    if "forkserver" not in mp.get_all_start_methods():
        return "spawn"
    mp.set_forkserver_preload(["torch", "torch.distributed", "torch._dynamo", *preload])  # ignored once the server runs
    return "forkserver"


def die_with(launcher: int) -> None:
    """This rank is killed when process `launcher` ends, however it ends: a launcher killed
    outright leaves no ranks training on their own. (Ranks are forked by a forkserver, which
    outlives the launcher while any rank lives, so the parent-death signal cannot serve.)"""
    import select

    if not hasattr(os, "pidfd_open"):  # not Linux: the launcher's own teardown is all there is
        return
    try:
        fd = os.pidfd_open(launcher)
    except ProcessLookupError:
        os._exit(1)

    def watch():
        select.select([fd], [], [])  # readable once the launcher has exited
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="ringwise-launcher-watch", daemon=True).start()


class _Rank:
    """An entrypoint that first ties its rank's life to the launcher that made it (picklable by reference)."""

    def __init__(self, entrypoint):
        self.entrypoint, self.launcher = entrypoint, os.getpid()
        functools.update_wrapper(self, entrypoint)  # the launcher names it, and its errors, by these

    def __call__(self, *args):
        die_with(self.launcher)
        return_large_frees()  # before the rank allocates anything big: honest peak memory
        return self.entrypoint(*args)


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def elastic_run(entrypoint, nproc: int, *args, log_dir: str | None = None) -> None:
    """Run entrypoint(*args) on nproc local ranks through PyTorch's elastic launcher (torchrun's code).

    Under torchrun (RANK and WORLD_SIZE set) it calls entrypoint directly: the same script
    runs locally and on a cluster. The ranks' error files go below `log_dir`
    (`rank_errors` reads them back).
    """
    if under_torchrun():
        return_large_frees()  # this process is the rank (the command sets it earlier still)
        entrypoint(*args)
        return
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from .loopback import register_rendezvous

    config = LaunchConfig(  # one node: the rendezvous is a store on 127.0.0.1, the ranks its clients
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"ringwise-{os.getpid()}",
        rdzv_backend=register_rendezvous(),
        max_restarts=0,
        monitor_interval=0.2,
        start_method=start_method(entrypoint.__module__),
        logs_specs=DefaultLogsSpecs(log_dir=log_dir),
    )
    elastic_launch(config, _Rank(entrypoint))(*args)


def rank_errors(log_dir: str) -> list[str]:
    """The error messages the ranks of an elastic_run recorded (one per failed rank, local rank order)."""
    import json
    from pathlib import Path

    found = []
    for path in sorted(Path(log_dir).glob("*/attempt_*/*/error.json")):
        try:
            message = json.loads(path.read_text())["message"]
        except (OSError, ValueError, KeyError):
            continue
        found.append(message.get("message", str(message)) if isinstance(message, dict) else str(message))
    return found


def failure_causes(e, logs: str) -> list[str]:
    """From an elastic_run's ChildFailedError `e` and its log_dir: what each rank recorded, every rank a
    signal ended (a killed rank leaves no record, and its peers' errors may be timed before the launcher
    sees it die), then the first to exit."""

    def line(rank, failure):
        message = failure.message.get("message") if isinstance(failure.message, dict) else failure.message
        return f"rank {rank} (exit code {failure.exitcode}): {message}"

    first = e.get_first_failure()[0]
    signalled = [line(r, f) for r, f in sorted(e.failures.items()) if f.exitcode < 0 and r != first]
    return list(dict.fromkeys(rank_errors(logs) + signalled + ["first to exit: " + line(first, e.failures[first])]))
