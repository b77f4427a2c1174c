"""Where each rank stands and how ranks cooperate: process groups, the (dp, cp) mesh,
FSDP2, the silent-rank detector, and the launcher.

The job's ranks form a `DeviceMesh` of shape (dp, cp): a cp row is one ring (one
replica's sequence shards), a dp column the replicas. Every parameter is sharded by
FSDP2 over the whole mesh flattened ("dp_cp"), which is also the gradient path: cp ranks
hold the same parameters but different tokens, and each rank's loss is already divided
by the global token count, so gradients are reduce-scattered as a plain SUM. Every group
gets the job's timeout; a rank that stops responding is named by its stale heartbeat.
"""
from __future__ import annotations

import functools
import multiprocessing.util
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


def free_port() -> int:
    """A free TCP port of 127.0.0.1 (for a client-side choice; ringwise's own stores bind theirs, see loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_method(*preload: str) -> str:
    """"forkserver" where the platform has it (else "spawn"), with `preload` imported once in the server.

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
        entrypoint(*args)
        return
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from .loopback import register_rendezvous

    config = LaunchConfig(  # one node: the rendezvous is a store on 127.0.0.1, the ranks its clients
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"ringwise-{os.getpid()}",
        rdzv_backend=register_rendezvous(), max_restarts=0,
        monitor_interval=0.2, start_method=start_method(entrypoint.__module__), logs_specs=DefaultLogsSpecs(log_dir=log_dir),
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
    """From an elastic_run's ChildFailedError `e` and its log_dir: what each rank recorded, every rank a signal ended (a killed rank leaves no record, and
    its peers' errors may be timed before the launcher sees it die), then the first to exit."""
    def line(rank, failure):
        message = failure.message.get("message") if isinstance(failure.message, dict) else failure.message
        return f"rank {rank} (exit code {failure.exitcode}): {message}"

    first = e.get_first_failure()[0]
    signalled = [line(r, f) for r, f in sorted(e.failures.items()) if f.exitcode < 0 and r != first]
    return list(dict.fromkeys(rank_errors(logs) + signalled + ["first to exit: " + line(first, e.failures[first])]))


def placement(device: str = "auto", backend: str | None = None, local_ranks: int = 1,
              gpus: int | None = None) -> tuple[str, str]:
    """(device type, backend) for a job of `local_ranks` processes per node with `gpus` GPUs.

    device "auto" is cuda where there is a GPU. backend None is NCCL when every rank has a GPU
    of its own, else gloo: NCCL refuses two ranks on one GPU, so ranks that share one (a test, a
    one-GPU machine) run their collectives over gloo and their ring hops through host memory
    (the ring's "auto" transport), for correctness, not speed. Raises ValueError naming the fix."""
    gpus = torch.cuda.device_count() if gpus is None else gpus
    kind = ("cuda" if gpus else "cpu") if device == "auto" else device
    if kind == "cuda" and not gpus:
        raise ValueError("--device cuda: torch sees no GPU here; use --device cpu (or auto)")
    if backend == "nccl" and kind != "cuda":
        raise ValueError("--backend nccl needs --device cuda (and a GPU); use gloo on CPU")
    if backend == "nccl" and local_ranks > gpus:
        raise ValueError(f"--backend nccl: {local_ranks} ranks per node but {gpus} GPU(s), and NCCL refuses two ranks "
                         "on one GPU; use --backend gloo (ranks share GPUs, hops staged through host memory) or "
                         f"at most {gpus} rank(s) per node")
    return kind, backend or ("nccl" if kind == "cuda" and local_ranks <= gpus else "gloo")


def init_distributed(device: str, backend: str | None, timeout: float) -> torch.device:
    """Join the job's default group with `timeout`; returns this rank's device.

    On CUDA the rank binds to GPU LOCAL_RANK (modulo the GPUs, when ranks share them) and the
    default group is `cpu:gloo,cuda:<backend>`, so tensor collectives run on the GPU and CPU
    object collectives still have a backend."""
    from .loopback import keep_sockets_on_loopback

    kind, backend = placement(device, backend, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    keep_sockets_on_loopback()
    if kind == "cuda":
        index = int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()
        torch.cuda.set_device(index)
        dist.init_process_group(f"cpu:gloo,cuda:{backend}", timeout=timedelta(seconds=timeout))
        return torch.device("cuda", index)
    dist.init_process_group("gloo", timeout=timedelta(seconds=timeout))
    return torch.device("cpu")


def _group_options(device: torch.device, timeout: float):
    """(backend, options) that give init_device_mesh's subgroups the job's timeout
    (without them new groups get the backend's default: 30 minutes on gloo). The backend is
    the default group's for this device: NCCL, or gloo where ranks share a GPU."""
    if device.type == "cuda" and "cuda:nccl" in dist.get_backend_config():
        backend, opts = "nccl", dist.ProcessGroupNCCL.Options()
    else:
        backend, opts = "gloo", dist.ProcessGroupGloo._Options()
    opts._timeout = timedelta(seconds=timeout)
    return backend, opts


@dataclass
class Mesh:
    """This rank's place in the (dp, cp) mesh, or (dp, cp, ulysses) with --ulysses U > 1."""

    device_mesh: DeviceMesh  # dims ("dp", "cp") or ("dp", "cp", "ulysses")
    shard_mesh: DeviceMesh  # all ranks as one dimension ("dp_cp"): what FSDP2 shards parameters over
    device: torch.device
    # with --ulysses: the ranks that share one sequence (cp x ulysses), where attention's verdict is one
    # gather (SeqShard's mesh_group); None without Ulysses
    seq_group: object = None

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def world(self) -> int:
        return self.device_mesh.size()

    @property
    def dp(self) -> int:
        return self.device_mesh.size(0)

    @property
    def cp(self) -> int:
        return self.device_mesh.size(1)

    @property
    def dp_rank(self) -> int:
        return self.device_mesh.get_local_rank("dp")

    @property
    def cp_group(self):
        """The ring: its own group, so ring P2P never interleaves with FSDP's collectives."""
        return self.device_mesh.get_group("cp")

    @property
    def ulysses(self) -> int:
        names = self.device_mesh.mesh_dim_names
        return self.device_mesh.size(names.index("ulysses")) if "ulysses" in names else 1

    @property
    def ulysses_group(self):
        """The Ulysses group (consecutive ranks: one node), or None without Ulysses."""
        return self.device_mesh.get_group("ulysses") if self.ulysses > 1 else None


def make_mesh(dp: int, device: torch.device, timeout: float, ulysses: int = 1) -> Mesh:
    """The (dp, cp) mesh; with ulysses > 1 a (dp, cp, ulysses) mesh whose innermost dimension
    (consecutive ranks, i.e. one node) trades sequence for heads by all-to-all."""
    world = dist.get_world_size()
    if dp < 1 or ulysses < 1 or world % (dp * ulysses):
        raise ValueError(f"--dp {dp} x --ulysses {ulysses} must divide the world size {world}")
    opts = _group_options(device, timeout)
    if ulysses > 1:
        dm = init_device_mesh(device.type, (dp, world // (dp * ulysses), ulysses),
                              mesh_dim_names=("dp", "cp", "ulysses"),
                              backend_override={"dp": opts, "cp": opts, "ulysses": opts})
        flat = dm._flatten("dp_cp", backend_override=opts)
        # the ranks that share one sequence: attention's verdict is one gather over them
        seq = dm["cp", "ulysses"]._flatten("cp_ulysses", backend_override=opts)
        return Mesh(dm, flat, device, seq.get_group())
    dm = init_device_mesh(device.type, (dp, world // dp), mesh_dim_names=("dp", "cp"),
                          backend_override={"dp": opts, "cp": opts})
    flat = dm._flatten("dp_cp", backend_override=opts)  # torchtitan's idiom for sharding over several dims
    return Mesh(dm, flat, device)


PER_LAYER_BYTES = 64 * 2**20


def shard_model(model: torch.nn.Module, mesh: Mesh, compute_dtype: torch.dtype | None = None,
                per_layer: bool | None = None) -> None:
    """FSDP2 over the whole mesh: parameters, gradients and optimizer state live in 1/world
    shards and are gathered only while they compute. Parameters stay in their own dtype
    (float32 master weights and optimizer state); a lower `compute_dtype` (bf16) is what
    layers compute in, with gradients reduced in float32. Gradients are a plain SUM (not
    averaged): each rank's loss is already divided by the global token count.

    per_layer: each layer its own unit (gathered one layer at a time: what large models
    need) or one unit for the whole model (fewest collectives). Default: per layer once
    the gathered parameters would exceed PER_LAYER_BYTES (64 MiB) in the compute dtype."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    param_dtype = next(model.parameters()).dtype
    if compute_dtype is None or compute_dtype == param_dtype:
        policy = MixedPrecisionPolicy()
    else:
        policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=param_dtype)
    if per_layer is None:
        itemsize = (compute_dtype or param_dtype).itemsize
        per_layer = sum(p.numel() for p in model.parameters()) * itemsize > PER_LAYER_BYTES
    if per_layer:
        for layer in model.layers:
            fully_shard(layer, mesh=mesh.shard_mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh.shard_mesh, mp_policy=policy)
    if hasattr(model, "labelled_predictions"):  # evaluation's entry point gathers parameters too
        register_fsdp_forward_method(model, "labelled_predictions")
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM


@torch.no_grad()
def fill_shards(model: torch.nn.Module, seed: int) -> None:
    """Initial values into a sharded model built on the meta device (after `to_empty`): each
    parameter's whole value is made once, this rank keeps its shard, and the next parameter
    follows, so no process ever holds the whole model. Same values as `Transformer(cfg)` made
    whole with torch.manual_seed(seed) (see Transformer.initial_value)."""
    from torch.distributed.tensor import distribute_tensor

    for name, p in model.named_parameters():
        whole = model.initial_value(name, seed).to(p.device, p.dtype)
        p.copy_(distribute_tensor(whole, p.device_mesh, p.placements, src_data_rank=None))


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
            return RuntimeError(f"rank {heartbeat.rank}: {', '.join(exited)} exited while the job ran "
                                f"(killed or crashed; its own error, if any, is above). Cause here: {error}")
    if not silent:
        return error
    names = []
    for rank, host, pid, seconds in silent:
        names.append(f"rank {rank} (pid {pid} on {host}, silent for {seconds:.0f} s)")
        if host == here:  # at exit: after this rank's error is recorded for the launcher
            # (multiprocessing's exit hook runs in a forked rank too, where atexit does not)
            multiprocessing.util.Finalize(None, _kill, args=(pid,), exitpriority=0)
    return RuntimeError(f"rank {heartbeat.rank}: {', '.join(names)} stopped responding (frozen or hung); "
                        f"the job ends after the --timeout of {timeout:g} s. Cause: {error}")


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def peak_memory_mib(device: torch.device) -> float:
    """This process's peak memory so far: the CUDA allocator's peak on a GPU, the kernel's
    peak resident set (VmHWM) on a CPU."""
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
