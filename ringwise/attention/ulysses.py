"""Ulysses x ring (USP): head-parallel all-to-all inside a group, the ring across groups.

The ranks form a (ulysses x ring) mesh: each rank is in one ulysses group (size U, e.g.
the GPUs of a node) and one ring group (size R, e.g. one GPU per node). The sequence is
sharded over the whole mesh (ringwise.shard with both groups): the ring layout cuts it
into R ring shards and each ring shard is cut contiguously into U pieces.

Forward: one all-to-all over the ulysses group turns (batch, S/(U*R), heads, dim) into
(batch, S/R, heads/U, dim) for q, k and v together (sequence gather, head scatter); the
unchanged ring runs over the ring group on its head chunk; a second all-to-all returns
out (and lse) to the sequence sharding. Backward mirrors it: the ring's own Function does
the ring backward, the two autograd Functions here do the all-to-alls in reverse.

GQA: k/v heads travel unexpanded when kv_heads % U == 0; otherwise each kv head is sent
U/gcd(kv_heads, U) times, the least that gives every rank whole query groups, and the
copies' gradients are summed (float32) on the way back.

Use: ug, rg = mesh_groups(U, R) (or a DeviceMesh with "ulysses" as its innermost dim:
mesh.get_group("ulysses"), mesh.get_group("ring")); x_local = ringwise.shard(x, 1, layout,
group=rg, ulysses_group=ug); ringwise.positions(S, layout, group=rg, ulysses_group=ug) for
RoPE; ring_attention(q, k, v, ..., group=rg, ulysses_group=ug). A ring of size 1 is pure
Ulysses (group=None is the default group, not "no ring").
"""
from __future__ import annotations

import math
import os
from collections import Counter

import torch
import torch.distributed as dist

from .comm import STAGED_BYTES, TRANSPORT_ENV, TRANSPORTS, _cuda_on_gloo
from .layout import check_layout

# All-to-alls per stream since the last reset: a forward makes one "qkv" and one "out",
# a backward one "dout" and one "dqkv" (none when U = 1). The tests assert these.
ALL_TO_ALL_COUNTS: Counter = Counter()

# Keyword arguments of ring_attention that hold one value per query head: sliced to the
# rank's heads after the head scatter.
PER_HEAD = ("sinks",)


def mesh_groups(ulysses: int, ring: int | None = None, timeout=None):
    """(ulysses_group, ring_group) of this rank on a ulysses x ring mesh of the default group.

    timeout (a timedelta): the groups' collective timeout (None: the backend's default);
    give it the job's timeout so that a stalled rank ends the job instead of hanging it.

    Global rank g sits at ring rank g // U, ulysses rank g % U: consecutive ranks (one
    node) form a ulysses group. Every rank must call this (it creates process groups).
    """
    world = dist.get_world_size()
    ring = world // ulysses if ring is None else ring
    if ulysses < 1 or ring < 1 or ulysses * ring != world:
        raise ValueError(f"mesh_groups: ulysses={ulysses} x ring={ring} must equal the world size {world}")
    ug, _ = dist.new_subgroups_by_enumeration([[r * ulysses + u for u in range(ulysses)] for r in range(ring)],
                                              timeout=timeout)
    rg, _ = dist.new_subgroups_by_enumeration([[r * ulysses + u for r in range(ring)] for u in range(ulysses)],
                                              timeout=timeout)
    return ug, rg


def kv_copies(heads: int, kv_heads: int, ulysses_size: int) -> int:
    """Copies of each kv head that travel so every ulysses rank gets whole GQA groups."""
    return ulysses_size // math.gcd(kv_heads, ulysses_size)


def valid_degrees(heads: int) -> list[int]:
    return [d for d in range(1, heads + 1) if heads % d == 0]


class _Mesh:
    """This rank's place in the (ulysses x ring) mesh; raises if it is in neither group."""

    def __init__(self, ulysses_group, group, transport: str = "auto"):
        self.transport = transport  # "host": all-to-alls staged through host memory, as the ring's hops
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("ring_attention: ulysses_group needs an initialised process group")
        self.group, self.ulysses_group = group, ulysses_group
        self.rank = dist.get_rank()
        self.u = dist.get_rank(ulysses_group)
        self.r = dist.get_rank(group)
        if self.u < 0 and self.r < 0:
            raise ValueError(
                f"ring_attention: this process (global rank {self.rank}) is in neither ulysses_group nor group; "
                "every rank of the mesh must be in one ulysses group and one ring group "
                "(build them with ringwise.attention.ulysses.mesh_groups or a DeviceMesh)")
        self.size = dist.get_world_size(ulysses_group) if self.u >= 0 else 0
        self.ring_size = dist.get_world_size(group) if self.r >= 0 else 0


def _describe(value):
    """A comparable summary of a keyword argument (integer tensors by value, others by shape)."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            return ("tensor", tuple(value.shape), str(value.dtype))
        return ("tensor", value.tolist())
    if isinstance(value, (list, tuple)):
        return tuple(_describe(x) for x in value)
    return repr(value)


def _local_problem(q, k, v, layout, mesh: _Mesh) -> str | None:
    if mesh.u < 0:
        return (f"global rank {mesh.rank} is in group but not in ulysses_group; pass the ulysses group "
                "that contains this rank")
    if mesh.r < 0:
        return (f"global rank {mesh.rank} is in ulysses_group but not in group (the ring); pass the ring "
                "group that contains this rank (a group of size 1 for pure Ulysses)")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            return f"{name} must be a 4-D tensor (batch, seq, heads, head_dim), got {getattr(x, 'shape', type(x))}"
    H, Hk, U = q.shape[2], k.shape[2], mesh.size
    if H < 1 or Hk < 1:
        return f"q has {H} heads and k {Hk}; both need at least one"
    if k.shape != v.shape or k.shape[:2] != q.shape[:2]:
        return f"k {tuple(k.shape)} and v {tuple(v.shape)} must match q {tuple(q.shape)} in batch and sequence"
    if H % Hk:
        return f"q has {H} heads, not a multiple of the {Hk} key/value heads; GQA/MQA needs heads % kv_heads == 0"
    if H % U:
        return (f"the ulysses group has {U} ranks, which does not divide the {H} query heads; "
                f"valid ulysses degrees for {H} heads: {', '.join(map(str, valid_degrees(H)))}")
    try:
        check_layout(layout)
    except ValueError as e:
        return str(e)
    if layout == "zigzag" and mesh.ring_size > 1 and (q.shape[1] * U) % 2:
        return ("layout='zigzag' needs an even ring shard (local length x ulysses size); pad the global "
                "sequence with ringwise.pad_to_multiple(x, dim, layout='zigzag', group=group, "
                "ulysses_group=ulysses_group) or pass pad=True to ringwise.shard")
    return None


def _gather(info, group):
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, info, group=group)
    return out


def _mesh_verdict(infos: dict) -> str | None:
    """What is wrong with the mesh or the arguments, judged alike from every rank's view."""
    for g in sorted(infos):
        if infos[g]["problem"]:
            return f"rank {g}: {infos[g]['problem']}"
    first = infos[min(infos)]
    U, R = len(first["ulysses"]), len(first["ring"])
    for g in sorted(infos):
        i = infos[g]
        if (len(i["ulysses"]), len(i["ring"])) != (U, R):
            return (f"the groups do not form one mesh: rank {first['rank']} has ulysses {U} x ring {R} but rank {g} "
                    f"has {len(i['ulysses'])} x {len(i['ring'])}; every rank needs the same U and R")
    for g in sorted(infos):
        i = infos[g]
        shared = sorted(set(i["ulysses"]) & set(i["ring"]))
        if shared != [g]:
            return (f"the groups do not tile the ranks: rank {g}'s ulysses_group {i['ulysses']} and group "
                    f"{i['ring']} share ranks {shared}; they must cross in exactly that rank (a U x R mesh)")
        for n in i["ring"]:
            if n in infos and infos[n]["u"] != i["u"]:
                return (f"ranks {g} and {n} share a ring group but are ulysses ranks {i['u']} and {infos[n]['u']}: "
                        "a ring must join ranks that hold the same head chunk (same ulysses rank)")
        for n in i["ulysses"]:
            if n in infos and infos[n]["r"] != i["r"]:
                return (f"ranks {g} and {n} share a ulysses group but are ring ranks {i['r']} and {infos[n]['r']}: "
                        "a ulysses group must hold one ring shard (same ring rank)")
    if len(infos) != U * R:
        return f"the groups do not tile the ranks: {len(infos)} ranks reached, a {U} x {R} mesh has {U * R}"
    for g in sorted(infos):
        if infos[g]["sig"] != first["sig"]:
            diffs = [f"{n}: rank {min(infos)} {a} vs rank {g} {b}"
                     for n, a, b in zip(first["names"], first["sig"], infos[g]["sig"]) if a != b]
            return ("every rank must pass the same batch, local sequence length, heads, dtype and arguments "
                    "(shard the global sequence with ringwise.shard(..., group=, ulysses_group=)); " + "; ".join(diffs))
    return None


def check_mesh(q, k, v, mesh: _Mesh, layout, ring_kwargs: dict) -> None:
    """Raise one clear error on every rank of the mesh before any all-to-all.

    Two small all-gathers (over the ulysses group, then the ring group) give every rank
    every other rank's verdict, group membership and argument signature. A rank that is
    in only one group still joins that group's gather, so nobody waits for it.
    """
    names = ("q shape", "k shape", "v shape", "dtype", "layout") + tuple(sorted(ring_kwargs))
    sig = tuple(tuple(x.shape) if isinstance(x, torch.Tensor) else None for x in (q, k, v))
    sig += (str(getattr(q, "dtype", None)), layout) + tuple(_describe(ring_kwargs[n]) for n in sorted(ring_kwargs))
    me = dict(rank=mesh.rank, u=mesh.u, r=mesh.r, problem=_local_problem(q, k, v, layout, mesh), sig=sig, names=names,
              ulysses=dist.get_process_group_ranks(mesh.ulysses_group) if mesh.u >= 0 else [],
              ring=(dist.get_process_group_ranks(dist.group.WORLD if mesh.group is None else mesh.group)
                    if mesh.r >= 0 else []))
    infos = _gather(me, mesh.ulysses_group) if mesh.u >= 0 else [me]
    if mesh.r >= 0:
        infos = [i for part in _gather(infos, mesh.group) for i in part]
    verdict = _mesh_verdict({i["rank"]: i for i in infos})
    if verdict:
        raise ValueError(f"ring_attention (ulysses): {verdict}")


def _exchange(sends: list[torch.Tensor], group, stream: str, transport: str = "auto") -> list[torch.Tensor]:
    """One all_to_all_single: row j of every send tensor (U, ...) goes to ulysses rank j.

    The tensors travel as bytes in one buffer, whatever their dtypes (lse stays float32).
    Returns tensors shaped like the sends, row i received from rank i. With the "host"
    transport (or CUDA tensors on a gloo group, which has no CUDA all-to-all) the buffer is
    staged through host memory, as the ring's hops are (comm.py): several ranks on one GPU.
    """
    U = sends[0].shape[0]
    rows = [x.contiguous().view(U, -1).view(torch.uint8) for x in sends]
    buf = torch.cat(rows, dim=1)
    staged = transport == "host" or (transport == "auto" and buf.is_cuda and _cuda_on_gloo(group))
    if staged:
        send = torch.empty(buf.shape, dtype=buf.dtype, pin_memory=buf.is_cuda)
        send.copy_(buf)
        STAGED_BYTES["to_host"] += buf.numel()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=group)
        recv = recv.to(buf.device)
        STAGED_BYTES["to_device"] += buf.numel()
    else:
        recv = torch.empty_like(buf)
        dist.all_to_all_single(recv, buf, group=group)
    ALL_TO_ALL_COUNTS[stream] += 1
    out, at = [], 0
    for x, row in zip(sends, rows):
        n = row.shape[1]
        out.append(recv[:, at:at + n].contiguous().view(x.dtype).view(x.shape))
        at += n
    return out


def seq_to_heads(xs, mesh: _Mesh, stream: str):
    """(B, L, h*U, ...) each -> (B, U*L, h, ...): gather the ring shard, keep head chunk u."""
    U = mesh.size
    sends = [x.unflatten(2, (U, x.shape[2] // U)).movedim(2, 0) for x in xs]  # (U, B, L, h, ...)
    return [y.movedim(0, 1).flatten(1, 2) for y in _exchange(sends, mesh.ulysses_group, stream, mesh.transport)]


def heads_to_seq(xs, mesh: _Mesh, stream: str):
    """(B, U*L, h, ...) each -> (B, L, U*h, ...): the inverse of seq_to_heads."""
    U = mesh.size
    sends = [x.unflatten(1, (U, x.shape[1] // U)).movedim(1, 0) for x in xs]  # (U, B, L, h, ...)
    return [y.movedim(0, 2).flatten(2, 3) for y in _exchange(sends, mesh.ulysses_group, stream, mesh.transport)]


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mesh, copies):
        ctx.mesh, ctx.copies = mesh, copies
        if copies > 1:
            k, v = k.repeat_interleave(copies, 2), v.repeat_interleave(copies, 2)
        return tuple(seq_to_heads([q, k, v], mesh, "qkv"))

    @staticmethod
    def backward(ctx, dq, dk, dv):
        dq, dk, dv = heads_to_seq([dq, dk, dv], ctx.mesh, "dqkv")
        if ctx.copies > 1:  # sum each kv head's copies in float32
            dk, dv = (d.unflatten(2, (-1, ctx.copies)).sum(3, dtype=torch.float32).to(d.dtype) for d in (dk, dv))
        return dq, dk, dv, None, None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, lse, mesh):
        ctx.mesh = mesh
        if lse is None:
            return heads_to_seq([out], mesh, "out")[0]
        out, lse = heads_to_seq([out, lse.transpose(1, 2).unsqueeze(-1)], mesh, "out")
        lse = lse.squeeze(-1).transpose(1, 2).contiguous()
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, *_):
        return seq_to_heads([dout], ctx.mesh, "dout")[0], None, None


def _local_heads(ring_kwargs: dict, heads: int, mesh: _Mesh) -> dict:
    """Per-head arguments (PER_HEAD, one value per query head) cut to this rank's head chunk."""
    out = dict(ring_kwargs)
    h = heads // mesh.size
    for name in PER_HEAD:
        x = out.get(name)
        if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == heads:
            out[name] = x[mesh.u * h:(mesh.u + 1) * h]
    return out


def ulysses_attention(q, k, v, *, ulysses_group, group=None, layout="zigzag", return_lse=False, validate=True,
                      **ring_kwargs):
    """ring_attention on a (ulysses x ring) mesh; called by ring_attention(..., ulysses_group=).

    q, k, v: this rank's piece (batch, S/(U*R), heads, head_dim) of ringwise.shard(x, 1, layout,
    group, ulysses_group=ulysses_group). Every other keyword goes unchanged to the ring.
    """
    from .ring import ring_attention

    transport = ring_kwargs.get("transport") or os.environ.get(TRANSPORT_ENV, "auto")
    # a bad name goes on to the ring, whose collective check reports it on every rank
    mesh = _Mesh(ulysses_group, group, transport if transport in TRANSPORTS else "auto")
    if validate:
        check_mesh(q, k, v, mesh, layout, ring_kwargs)
    elif mesh.u < 0 or mesh.r < 0:
        raise ValueError(f"ring_attention (ulysses): {_local_problem(q, k, v, layout, mesh)}")
    heads = q.shape[2]
    if mesh.size > 1:
        q, k, v = _SeqToHeads.apply(q, k, v, mesh, kv_copies(heads, k.shape[2], mesh.size))
    out, lse = ring_attention(q, k, v, layout=layout, group=group, return_lse=True, validate=validate,
                              **_local_heads(ring_kwargs, heads, mesh))
    if mesh.size == 1:
        return (out, lse) if return_lse else out
    return _HeadsToSeq.apply(out, lse if return_lse else None, mesh)
