"""Where each rank stands and how ranks cooperate: devices and backends, process groups, the
(dp, cp) mesh, FSDP2.

The job's ranks form a `DeviceMesh` of shape (dp, cp): a cp row is one ring (one
replica's sequence shards), a dp column the replicas. Every parameter is sharded by
FSDP2 over the whole mesh flattened ("dp_cp"), which is also the gradient path: cp ranks
hold the same parameters but different tokens, and each rank's loss is already divided
by the global token count, so gradients are reduce-scattered as a plain SUM. Every group
gets the job's timeout (a rank that stops responding is named by watchdog.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, cast

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..attention.seqshard import SeqShard

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ..model import Transformer


def placement(
    device: str = "auto", backend: str | None = None, local_ranks: int = 1, gpus: int | None = None
) -> tuple[str, str]:
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
        raise ValueError(
            f"--backend nccl: {local_ranks} ranks per node but {gpus} GPU(s), and NCCL refuses two ranks "
            "on one GPU; use --backend gloo (ranks share GPUs, hops staged through host memory) or "
            f"at most {gpus} rank(s) per node"
        )
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
        # torch's stub names it Options, but at runtime Options is the inherited Backend.Options
        backend, opts = "gloo", dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
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
    seq_group: ProcessGroup | None = None

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
        names = self.device_mesh.mesh_dim_names or ()  # (make_mesh names every dimension)
        return self.device_mesh.size(names.index("ulysses")) if "ulysses" in names else 1

    @property
    def ulysses_group(self):
        """The Ulysses group (consecutive ranks: one node), or None without Ulysses."""
        return self.device_mesh.get_group("ulysses") if self.ulysses > 1 else None

    def seqshard(self, layout: str) -> SeqShard:
        """How this rank's replica cuts each sequence: `layout` over the cp (ring) and ulysses groups."""
        return SeqShard(layout, self.cp_group, self.ulysses_group, self.seq_group)


def make_mesh(dp: int, device: torch.device, timeout: float, ulysses: int = 1) -> Mesh:
    """The (dp, cp) mesh; with ulysses > 1 a (dp, cp, ulysses) mesh whose innermost dimension
    (consecutive ranks, i.e. one node) trades sequence for heads by all-to-all."""
    world = dist.get_world_size()
    if dp < 1 or ulysses < 1 or world % (dp * ulysses):
        raise ValueError(f"--dp {dp} x --ulysses {ulysses} must divide the world size {world}")
    opts = _group_options(device, timeout)
    if ulysses > 1:
        dm = init_device_mesh(
            device.type,
            (dp, world // (dp * ulysses), ulysses),
            mesh_dim_names=("dp", "cp", "ulysses"),
            backend_override={"dp": opts, "cp": opts, "ulysses": opts},
        )
        flat = dm._flatten("dp_cp", backend_override=opts)
        # the ranks that share one sequence: attention's verdict is one gather over them
        seq = dm["cp", "ulysses"]._flatten("cp_ulysses", backend_override=opts)
        return Mesh(dm, flat, device, seq.get_group())
    dm = init_device_mesh(
        device.type, (dp, world // dp), mesh_dim_names=("dp", "cp"), backend_override={"dp": opts, "cp": opts}
    )
    flat = dm._flatten("dp_cp", backend_override=opts)  # torchtitan's idiom for sharding over several dims
    return Mesh(dm, flat, device)


PER_LAYER_BYTES = 64 * 2**20


def shard_model(
    model: torch.nn.Module,
    mesh: Mesh,
    compute_dtype: torch.dtype | None = None,
    per_layer: bool | None = None,
    offload: bool = False,
) -> None:
    """FSDP2 over the whole mesh: parameters, gradients and optimizer state live in 1/world
    shards and are gathered only while they compute. Parameters stay in their own dtype
    (float32 master weights and optimizer state); a lower `compute_dtype` (bf16) is what
    layers compute in, with gradients reduced in float32. Gradients are a plain SUM (not
    averaged): each rank's loss is already divided by the global token count.

    per_layer: each layer its own unit (gathered one layer at a time: what large models
    need) or one unit for the whole model (fewest collectives). Default: per layer once
    the gathered parameters would exceed PER_LAYER_BYTES (64 MiB) in the compute dtype.

    offload (--offload-params): FSDP2's CPUOffloadPolicy on every unit: the parameter shards, their
    gradients and so the optimizer state (built over them) live in host memory, pinned on CUDA; each
    unit's shards are copied to the device for its all-gather and its gradients back after the
    reduce-scatter, and the optimizer step runs on the CPU. A model built on the meta device is then
    materialized with `materialize` (its shards on the host, its buffers on the device)."""
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        FSDPModule,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    param_dtype = next(model.parameters()).dtype
    if compute_dtype is None or compute_dtype == param_dtype:
        policy = MixedPrecisionPolicy()
    else:
        policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=param_dtype)
    if per_layer is None:
        itemsize = (compute_dtype or param_dtype).itemsize
        per_layer = sum(p.numel() for p in model.parameters()) * itemsize > PER_LAYER_BYTES
    # pinned host memory needs an accelerator (on a CPU run pin_memory raises): pinned on CUDA only
    where = CPUOffloadPolicy(pin_memory=mesh.device.type == "cuda") if offload else OffloadPolicy()
    if per_layer:
        # Transformer's ModuleList, or PretrainedLM's decoder layers (a property: module attribute typing can't say)
        for layer in cast("Iterable[torch.nn.Module]", model.layers):
            fully_shard(layer, mesh=mesh.shard_mesh, mp_policy=policy, offload_policy=where)
    fully_shard(model, mesh=mesh.shard_mesh, mp_policy=policy, offload_policy=where)
    for method in ("predict", "token_losses"):  # evaluation's entry points (not forward) gather parameters too
        if hasattr(model, method):
            register_fsdp_forward_method(model, method)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM


def materialize(model: torch.nn.Module, device: torch.device, offload: bool = False) -> None:
    """Storage for a sharded model built on the meta device (values uninitialised: fill_shards or a
    checkpoint's load fills them). Its parameter shards on `device`, or, under offload (shard_model's
    CPUOffloadPolicy, which requires its shards on the host), in host memory; buffers, which FSDP does
    not manage, on `device` either way."""
    model.to_empty(device="cpu" if offload else device)
    if offload and device.type != "cpu":
        for m in model.modules():
            for name, b in m._buffers.items():
                if b is not None:
                    m._buffers[name] = torch.empty_like(b, device=device)


@torch.no_grad()
def fill_shards(model: Transformer, seed: int) -> None:
    """Initial values into a sharded model built on the meta device (after `to_empty`): each
    parameter's whole value is made once, this rank keeps its shard, and the next parameter
    follows, so no process ever holds the whole model. Same values as `Transformer(cfg)` made
    whole with torch.manual_seed(seed) (see Transformer.initial_value)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for name, p in model.named_parameters():
        shard = cast(DTensor, p)  # shard_model made every parameter a DTensor
        whole = model.initial_value(name, seed).to(shard.device_mesh.device_type).to(p.dtype)
        local = distribute_tensor(whole, shard.device_mesh, shard.placements, src_data_rank=None).to_local()
        shard.to_local().copy_(local)  # into FSDP's own storage, wherever it lives (host memory under offload)
