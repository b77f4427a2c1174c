"""Ulysses x ring (USP): head-parallel all-to-all inside a group, the ring across groups.

The ranks form a (ulysses x ring) mesh: each rank is in one ulysses group (size U, e.g.
the GPUs of a node) and one ring group (size R, e.g. one GPU per node). The sequence is
sharded over the whole mesh (ringwise.shard with both groups): the ring layout cuts it
into R ring shards and each ring shard is cut contiguously into U pieces.

Forward: one all-to-all over the ulysses group turns (batch, S/(U*R), heads, dim) into
(batch, S/R, heads/U, dim) for q, k and v together (sequence gather, head scatter); the
unchanged ring engine runs over the ring group on its head chunk; a second all-to-all
returns out and lse to the sequence sharding. Backward mirrors it: dO goes to the head
chunks, the ring backward runs there, and one all-to-all brings dQ, dK, dV back. The
checks and the autograd op around both live in api.py; this module is the engine.

A validated call's verdict is one all-gather over the group that holds exactly the mesh's
ranks: `mesh_group` as the caller names it (ring_attention's mesh_group=, SeqShard's
mesh_group), by default the default group, which is the mesh `mesh_groups` builds. A mesh
inside a larger job (data-parallel replicas of it) names its own group.

GQA: k/v heads travel unexpanded when kv_heads % U == 0; otherwise each kv head is sent
U/gcd(kv_heads, U) times, the least that gives every rank whole query groups, and the
copies' gradients are summed (float32) on the way back.

Use: ug, rg = mesh_groups(U, R) (or a DeviceMesh with "ulysses" as its innermost dim:
mesh.get_group("ulysses"), mesh.get_group("ring")); x_local = ringwise.shard(x, 1, layout,
group=rg, ulysses_group=ug); ringwise.positions(S, layout, group=rg, ulysses_group=ug) for
RoPE; ring_attention(q, k, v, ..., group=rg, ulysses_group=ug). A ring of size 1 is pure
Ulysses (group=None is the default group, not "no ring").

Each all-to-all is reported to traffic.py: a forward makes one "qkv" and one "out", a
backward one "dout" and one "dqkv" (none when U = 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from .checks import (
    MeshView,
    valid_degrees,  # noqa: F401  (public here since the first release)
)
from .comm import all_to_all_bytes
from .ring import Engine, ring_backward, ring_forward, sink_grad
from .traffic import report

Tensor = torch.Tensor
Shape = tuple[int, ...]

# Keyword arguments of ring_attention that hold one value per query head: sliced to the
# rank's heads after the head scatter.
PER_HEAD = ("sinks",)


def mesh_groups(
    ulysses: int, ring: int | None = None, timeout: Optional[timedelta] = None
) -> tuple[ProcessGroup, ProcessGroup]:
    """(ulysses_group, ring_group) of this rank on a ulysses x ring mesh of the default group.

    timeout (a timedelta): the groups' collective timeout (None: the backend's default);
    give it the job's timeout so that a stalled rank ends the job instead of hanging it.

    Global rank g sits at ring rank g // U, ulysses rank g % U: consecutive ranks (one
    node) form a ulysses group. Every rank must call this (it creates process groups). The
    mesh is the whole default group, where ring_attention's verdict gathers by default.
    """
    world = dist.get_world_size()
    ring = world // ulysses if ring is None else ring
    if ulysses < 1 or ring < 1 or ulysses * ring != world:
        raise ValueError(f"mesh_groups: ulysses={ulysses} x ring={ring} must equal the world size {world}")
    # new_subgroups_by_enumeration: unannotated in torch; (this rank's group, every group)
    ug, _ = dist.new_subgroups_by_enumeration(  # type: ignore[no-untyped-call]
        [[r * ulysses + u for u in range(ulysses)] for r in range(ring)], timeout=timeout
    )
    rg, _ = dist.new_subgroups_by_enumeration(  # type: ignore[no-untyped-call]
        [[r * ulysses + u for r in range(ring)] for u in range(ulysses)], timeout=timeout
    )
    return ug, rg


def kv_copies(heads: int, kv_heads: int, ulysses_size: int) -> int:
    """Copies of each kv head that travel so every ulysses rank gets whole GQA groups."""
    return ulysses_size // math.gcd(kv_heads, ulysses_size)


class SeqMesh:
    """This rank's place in the (ulysses x ring) mesh: u, r are -1 where it is not a member.
    mesh_group (None: the default group) holds exactly the mesh's ranks: the verdict's gather."""

    def __init__(
        self,
        ulysses_group: Optional[ProcessGroup],
        group: Optional[ProcessGroup],
        transport: str = "auto",
        mesh_group: Optional[ProcessGroup] = None,
    ) -> None:
        self.transport = transport  # "host": all-to-alls staged through host memory, as the ring's hops
        self.group, self.ulysses_group, self.mesh_group = group, ulysses_group, mesh_group
        self.rank = dist.get_rank()
        self.u = dist.get_rank(ulysses_group)
        self.r = dist.get_rank(group)
        self.size = dist.get_world_size(ulysses_group) if self.u >= 0 else 0
        self.ring_size = dist.get_world_size(group) if self.r >= 0 else 0
        self.in_mesh_group = mesh_group is None or dist.get_rank(mesh_group) >= 0

    def membership_problem(self) -> str | None:
        if self.u < 0 and self.r < 0:
            return (
                f"global rank {self.rank} is in neither ulysses_group nor group; every rank of the mesh "
                "must be in one ulysses group and one ring group (build them with "
                "ringwise.attention.ulysses.mesh_groups or a DeviceMesh)"
            )
        if self.u < 0:
            return (
                f"global rank {self.rank} is in group but not in ulysses_group; pass the ulysses group "
                "that contains this rank"
            )
        if self.r < 0:
            return (
                f"global rank {self.rank} is in ulysses_group but not in group (the ring); pass the ring "
                "group that contains this rank (a group of size 1 for pure Ulysses)"
            )
        return None

    def ranks(self) -> MeshView:
        """This rank's view of the mesh, for the cross-rank check (checks.mesh_problem)."""
        world = dist.group.WORLD if self.group is None else self.group
        view: MeshView = {
            "u": self.u,
            "r": self.r,
            "ulysses": dist.get_process_group_ranks(self.ulysses_group) if self.u >= 0 else [],
            "ring": dist.get_process_group_ranks(world) if self.r >= 0 else [],
        }
        return view


def _exchange(
    sends: Sequence[Tensor], group: Optional[ProcessGroup], stream: str, transport: str = "auto"
) -> list[Tensor]:
    """One all-to-all: row j of every send tensor (U, ...) goes to ulysses rank j.

    The tensors travel as bytes in one buffer, whatever their dtypes (lse stays float32).
    Returns tensors shaped like the sends, row i received from rank i. The transport is the
    ring's (comm.all_to_all_bytes): staged through host memory where hops are.
    """
    U = sends[0].shape[0]
    rows = [x.contiguous().view(U, -1).view(torch.uint8) for x in sends]
    recv = all_to_all_bytes(torch.cat(rows, dim=1), group, transport)
    report("all_to_all", stream)
    out: list[Tensor] = []
    at = 0
    for x, row in zip(sends, rows):
        n = row.shape[1]
        out.append(recv[:, at : at + n].contiguous().view(x.dtype).view(x.shape))
        at += n
    return out


def seq_to_heads(xs: Sequence[Tensor], mesh: SeqMesh, stream: str) -> list[Tensor]:
    """(B, L, h*U, ...) each -> (B, U*L, h, ...): gather the ring shard, keep head chunk u."""
    U = mesh.size
    sends = [torch.unflatten(x, 2, (U, x.shape[2] // U)).movedim(2, 0) for x in xs]  # (U, B, L, h, ...)
    return [y.movedim(0, 1).flatten(1, 2) for y in _exchange(sends, mesh.ulysses_group, stream, mesh.transport)]


def heads_to_seq(xs: Sequence[Tensor], mesh: SeqMesh, stream: str) -> list[Tensor]:
    """(B, U*L, h, ...) each -> (B, L, U*h, ...): the inverse of seq_to_heads."""
    U = mesh.size
    sends = [torch.unflatten(x, 1, (U, x.shape[1] // U)).movedim(1, 0) for x in xs]  # (U, B, L, h, ...)
    return [y.movedim(0, 2).flatten(2, 3) for y in _exchange(sends, mesh.ulysses_group, stream, mesh.transport)]


def head_chunk(heads: int, mesh: SeqMesh) -> slice:
    """This rank's query heads after the head scatter."""
    h = heads // mesh.size
    return slice(mesh.u * h, (mesh.u + 1) * h)


def _local_heads(ring_kwargs: Mapping[str, object], heads: int, mesh: SeqMesh) -> dict[str, object]:
    """Per-head arguments (PER_HEAD, one value per query head) cut to this rank's head chunk."""
    out = dict(ring_kwargs)
    for name in PER_HEAD:
        x = out.get(name)
        if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == heads:
            out[name] = x[head_chunk(heads, mesh)]
    return out


def head_chunk_shapes(
    q_shape: Sequence[int], kv_heads: int, ulysses_size: int
) -> tuple[Shape, Shape, Shape, Shape, Shape]:
    """Shapes of what ulysses_forward keeps for the backward: q, k, v, out (batch, U*L, heads/U or
    kv heads x copies / U, dim) and lse (batch, heads/U, U*L), for the op's fake (meta) rule."""
    B, L, H, D = q_shape
    U = ulysses_size
    hk = kv_heads * kv_copies(H, kv_heads, U) // U
    qh, kh = (B, U * L, H // U, D), (B, U * L, hk, D)
    return qh, kh, kh, qh, (B, H // U, U * L)


def ulysses_forward(
    q: Tensor, k: Tensor, v: Tensor, sinks: Optional[Tensor], mesh: SeqMesh, engine: Engine
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """(out, lse, saved): the ring engine on this rank's head chunk between two all-to-alls.

    saved: the head-chunk tensors ulysses_backward needs (no all-to-all repeated)."""
    heads = q.shape[2]
    copies = kv_copies(heads, k.shape[2], mesh.size)
    if copies > 1:
        k, v = k.repeat_interleave(copies, 2), v.repeat_interleave(copies, 2)
    qh, kh, vh = seq_to_heads([q, k, v], mesh, "qkv")
    local_sinks = None if sinks is None else sinks[head_chunk(heads, mesh)]
    out_h, lse_h = ring_forward(qh, kh, vh, engine, sinks=local_sinks)
    out, lse = heads_to_seq([out_h, lse_h.transpose(1, 2).unsqueeze(-1)], mesh, "out")
    return out, lse.squeeze(-1).transpose(1, 2).contiguous(), [qh, kh, vh, out_h, lse_h]


def ulysses_backward(
    dout: Tensor, saved: Sequence[Tensor], sinks: Optional[Tensor], kv_heads: int, mesh: SeqMesh, engine: Engine
) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """(dq, dk, dv, dsinks or None) from ulysses_forward's saved head chunk; dsinks is zero outside
    this rank's heads (summing parameter gradients over the mesh completes it)."""
    qh, kh, vh, out_h, lse_h = saved
    (dout_h,) = seq_to_heads([dout], mesh, "dout")
    dqkv = ring_backward(dout_h, qh, kh, vh, out_h, lse_h, engine)
    dq, dk, dv = heads_to_seq(list(dqkv), mesh, "dqkv")
    copies = kv_copies(dq.shape[2], kv_heads, mesh.size)
    if copies > 1:  # sum each kv head's copies in float32
        dk, dv = (torch.unflatten(d, 2, (-1, copies)).sum(3, dtype=torch.float32).to(d.dtype) for d in (dk, dv))
    dsinks: Optional[Tensor] = None
    if sinks is not None:
        chunk = head_chunk(dq.shape[2], mesh)
        dsinks = torch.zeros_like(sinks)
        dsinks[chunk] = sink_grad(dout_h, out_h, lse_h, sinks[chunk])
    return dq, dk, dv, dsinks
