"""What a rank watches of processes: its peers' heartbeats, their exits, its own memory (/proc).

Each rank stamps the job's store every second (`Heartbeat`); when a collective fails or times
out, `name_failed_peers` names the peers behind it: one on this host that exited (read from
/proc), one whose stamp went stale (frozen or hung; killed when on this host, since a
SIGSTOPped process ignores the launcher's SIGTERM). `peak_memory_mib` is this process's peak
memory (the CUDA allocator's, or the kernel's VmHWM from /proc/self/status); every rank calls
`return_large_frees` first, so that a freed tensor leaves the resident set and VmHWM counts only
memory that was in use at once.
"""

from __future__ import annotations

import multiprocessing.util
import os
import signal
import socket
import threading
import time

import torch
import torch.distributed as dist


class Heartbeat:
    """Each rank stamps the job's store every second from a thread; when a collective
    times out, `silent_ranks` names the ranks whose stamp went stale (a frozen process
    stops all its threads; a busy one keeps stamping)."""

    PERIOD = 1.0

    def __init__(self):
        self.store = dist.distributed_c10d._get_default_store()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self._stop = threading.Event()
        self._beat()
        self._thread = threading.Thread(target=self._run, name="ringwise-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self):
        self.store.set(f"ringwise/heartbeat/{self.rank}", f"{time.time()} {socket.gethostname()} {os.getpid()}")

    def _run(self):
        while not self._stop.wait(self.PERIOD):
            try:
                self._beat()
            except Exception:  # the store is gone: the job is ending
                return

    def peers(self) -> list[tuple[int, str, int, float]]:
        """(rank, host, pid, seconds since its last stamp) of every other rank."""
        now, found = time.time(), []
        for r in range(self.world):
            if r != self.rank:
                stamp, host, pid = self.store.get(f"ringwise/heartbeat/{r}").decode().split()
                found.append((r, host, int(pid), now - float(stamp)))
        return found

    def stop(self):
        self._stop.set()


def _has_exited(pid: int) -> bool:
    """A process of this host that is gone or a zombie (its sockets are closed by then)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        return False


def name_failed_peers(error: BaseException, heartbeat: Heartbeat | None, timeout: float) -> BaseException:
    """The error to end the job with: names the peers behind it, when peers are to blame.

    A peer on this host that exited (killed, crashed) is named at once: its death is what
    closed the connection this rank failed on, and the launcher may see this rank's error
    first. A peer whose heartbeat went stale stopped responding; one on this host is killed,
    as a frozen (SIGSTOPped) process ignores the launcher's SIGTERM, which would hold the job
    for another 30 s."""
    if heartbeat is None:
        return error
    try:
        peers = heartbeat.peers()
    except Exception:
        return error
    here = socket.gethostname()
    local = [(r, pid) for r, host, pid, _ in peers if host == here]
    silent = [p for p in peers if p[3] > min(timeout / 2, 10.0)]
    # a peer's sockets close just before it turns zombie: look again briefly, unless a peer
    # is already silent (a dead peer's closed connection fails this rank at once, before its
    # stamp can go stale; a stale one is frozen, and looking again only delays the report)
    for attempt in range(1 if silent else 20):
        if attempt:
            time.sleep(0.05)
        exited = [f"rank {r} (pid {pid} on {here})" for r, pid in local if _has_exited(pid)]
        if exited:
            return RuntimeError(
                f"rank {heartbeat.rank}: {', '.join(exited)} exited while the job ran "
                f"(killed or crashed; its own error, if any, is above). Cause here: {error}"
            )
    if not silent:
        return error
    names = []
    for rank, host, pid, seconds in silent:
        names.append(f"rank {rank} (pid {pid} on {host}, silent for {seconds:.0f} s)")
        if host == here:  # at exit: after this rank's error is recorded for the launcher
            # (multiprocessing's exit hook runs in a forked rank too, where atexit does not)
            multiprocessing.util.Finalize(None, _kill, args=(pid,), exitpriority=0)
    return RuntimeError(
        f"rank {heartbeat.rank}: {', '.join(names)} stopped responding (frozen or hung); "
        f"the job ends after the --timeout of {timeout:g} s. Cause: {error}"
    )


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


MMAP_THRESHOLD = 65536  # bytes: glibc's M_MMAP_THRESHOLD in every rank


def return_large_frees() -> bool:
    """glibc's mmap threshold fixed at 64 KiB in this process (as MALLOC_MMAP_THRESHOLD_=65536 at
    start-up would), then the heap's free pages handed back: every allocation of 64 KiB or more
    (a tensor's storage) is its own mapping, unmapped when freed, so the resident set, and its peak
    VmHWM, count only memory in use. glibc's default threshold rises with the sizes freed (up to
    32 MiB) and keeps freed blocks in the heap: two runs of the same job then read peaks that differ
    by the heap's history. Call it at a rank's start, before big allocations (the launcher does).
    False where the C library is not glibc (no mallopt): VmHWM may then count freed memory."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return False
    if mallopt(-3, MMAP_THRESHOLD) != 1:  # -3: M_MMAP_THRESHOLD; mallopt returns 1 on success
        return False
    malloc_trim(0)  # what was freed before now leaves the resident set too
    return True


def peak_memory_mib(device: torch.device) -> float:
    """This process's peak memory so far: the CUDA allocator's peak on a GPU (live tensors'
    bytes: freed ones never count), the kernel's peak resident set (VmHWM) on a CPU (honest
    once `return_large_frees` ran in the process)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return proc_status_kb("VmHWM") / 1024.0


def proc_status_kb(field: str) -> int:
    """A kB figure of /proc/self/status (Linux), e.g. VmRSS or VmHWM."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")
