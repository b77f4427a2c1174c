"""Ring attention: the autograd Function and the public op.

Forward: each rank keeps its query shard; the key/value shards travel W-1 hops around
the ring. At every step the next hop is posted before the visiting block's tiles are
computed and waited after them, and each tile's (out, lse) is merged exactly in float32.

Backward: a second ring carries (K, V) and their float32 gradient accumulators (dK, dV).
Each rank adds the visiting block's share, using the final out and lse, and passes the
accumulator on; after W dkv hops every accumulator is home. dQ never moves.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .comm import Ring
from .kernels import acc_dtype, default_scale, select_kernel, BACKENDS
from .layout import check_layout, check_local_len
from .tiles import step_tiles
from .merge import merge_into


def _rows(t):
    return slice(t.q_start, t.q_start + t.q_len)


def _cols(t):
    return slice(t.k_start, t.k_start + t.k_len)


def _heads_first(x):
    """(batch, seq, heads, dim) -> the kernels' (batch, heads, seq, dim), as a view (no copy)."""
    return x.transpose(1, 2)


def _receive_buffers(kv, W):
    """Double buffers for visiting K/V blocks; the caller's own k, v are never written."""
    return [tuple(torch.empty_like(x) for x in kv) for _ in range(min(2, W - 1))]


def ring_forward(q, k, v, causal, scale, layout, ring: Ring, kernel, docs=None):
    """q, k, v: (batch, seq, heads, dim). Returns out (input dtype, same layout) and lse (batch, heads, seq).

    Buffers are the paper's: the query block, the visiting K/V block and its receive
    buffers, and the float32 output accumulator. Kernels read strided views, no copies.
    """
    W, rank, L = ring.world_size, ring.rank, q.shape[1]
    dt = acc_dtype(q.dtype)
    out = torch.zeros(q.shape, dtype=dt, device=q.device)
    lse = torch.full((q.shape[0], q.shape[2], L), float("-inf"), dtype=dt, device=q.device)
    qh, out_h = _heads_first(q), _heads_first(out)
    kv = (k.contiguous(), v.contiguous())  # the first visitor is our own block: no copy
    inbox = _receive_buffers(kv, W)
    for step in range(W):
        hop = ring.exchange("kv", kv, inbox[step % 2]) if step < W - 1 else None
        kh, vh = _heads_first(kv[0]), _heads_first(kv[1])
        for t in step_tiles(layout, rank, (rank - step) % W, W, L, causal, docs):
            rows, cols = _rows(t), _cols(t)
            o_b, lse_b = kernel.forward(qh[:, :, rows], kh[:, :, cols], vh[:, :, cols], t.causal, scale)
            merge_into(out_h[:, :, rows], lse[:, :, rows], o_b, lse_b)
        if hop is not None:
            hop.wait()
            kv = inbox[step % 2]
    return out.to(q.dtype), lse


def ring_backward(dout, q, k, v, out, lse, causal, scale, layout, ring: Ring, kernel, docs=None):
    """Gradients of q, k, v (input dtype, (batch, seq, heads, dim)) from the final out and lse."""
    W, rank, L = ring.world_size, ring.rank, q.shape[1]
    dt = acc_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=dt, device=q.device)
    qh, dq_h, out_h, dout_h = _heads_first(q), _heads_first(dq), _heads_first(out), _heads_first(dout)
    kv = (k.contiguous(), v.contiguous())
    inbox = _receive_buffers(kv, W)
    dkv_shape = (2,) + tuple(k.shape)
    dkv_in = None
    dkv_hop = None
    for step in range(W):
        kv_hop = ring.exchange("kv", kv, inbox[step % 2]) if step < W - 1 else None
        kh, vh = _heads_first(kv[0]), _heads_first(kv[1])
        dkv = torch.zeros(dkv_shape, dtype=dt, device=q.device)
        dk_h, dv_h = _heads_first(dkv[0]), _heads_first(dkv[1])
        for t in step_tiles(layout, rank, (rank - step) % W, W, L, causal, docs):
            rows, cols = _rows(t), _cols(t)
            dq_t, dk_t, dv_t = kernel.backward(
                dout_h[:, :, rows], qh[:, :, rows], kh[:, :, cols], vh[:, :, cols],
                out_h[:, :, rows], lse[:, :, rows].contiguous(), t.causal, scale,
            )
            dq_h[:, :, rows] += dq_t
            dk_h[:, :, cols] += dk_t
            dv_h[:, :, cols] += dv_t
        if W > 1:
            if dkv_hop is not None:  # the accumulator of the block we just visited
                dkv_hop.wait()
                dkv += dkv_in
            dkv_in = torch.empty_like(dkv)
            dkv_hop = ring.exchange("dkv", [dkv], [dkv_in])
        if kv_hop is not None:
            kv_hop.wait()
            kv = inbox[step % 2]
    if dkv_hop is not None:
        dkv_hop.wait()
        dkv = dkv_in  # our own block's gradient, back from its last visit
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, layout, ring, kernel, docs):
        out, lse = ring_forward(q, k, v, causal, scale, layout, ring, kernel, docs)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (causal, scale, layout, ring, kernel, docs)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_backward(dout, q, k, v, out, lse, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None


def _document_bounds(cu_seqlens, total: int) -> tuple[int, ...]:
    """cu_seqlens (global, flash-attn style: 0, len0, len0+len1, ..., total) as a checked tuple."""
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point():
            raise ValueError("cu_seqlens must be a 1-D integer tensor or a list of ints")
        cu_seqlens = cu_seqlens.tolist()
    bounds = tuple(int(b) for b in cu_seqlens)
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != total:
        raise ValueError(f"cu_seqlens must start at 0 and end at the global sequence length {total} "
                         f"(local length x ranks), got {list(bounds)[:4]}...{list(bounds)[-2:]}")
    if any(b >= c for b, c in zip(bounds, bounds[1:])):
        raise ValueError("cu_seqlens must be strictly increasing (documents of length >= 1)")
    return bounds


def _bounds_from_document_ids(document_ids) -> list[int]:
    """Per-token document ids of the global sequence -> cu_seqlens; each document contiguous."""
    ids = torch.as_tensor(document_ids)
    if ids.dim() != 1 or ids.is_floating_point():
        raise ValueError("document_ids must be a 1-D integer tensor over the global sequence")
    starts = (torch.nonzero(ids[1:] != ids[:-1]).flatten() + 1).tolist()
    docs = ids[[0] + starts]
    if len(torch.unique(docs)) != len(docs):
        raise ValueError("document_ids must keep each document contiguous (an id reappears after another one)")
    return [0] + starts + [len(ids)]


def _local_problems(q, k, v, layout, backend, ring) -> str | None:
    """Everything wrong with this rank's arguments that needs no communication."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            return f"{name} must be a 4-D tensor (batch, seq, heads, head_dim), got {getattr(x, 'shape', type(x))}"
    if not q.is_floating_point():
        return f"q, k, v must be floating point, got {q.dtype}"
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            return f"{name}.dtype={x.dtype} differs from q.dtype={q.dtype}; cast all three to one dtype"
        if x.device != q.device:
            return f"{name} is on {x.device} but q is on {q.device}; move all three to one device"
        for dim, what in ((0, "batch"), (1, "sequence length"), (3, "head_dim")):
            if x.shape[dim] != q.shape[dim]:
                return (f"{name} has {what} {x.shape[dim]} but q has {q.shape[dim]} "
                        f"(q {tuple(q.shape)}, {name} {tuple(x.shape)}); shapes are (batch, seq, heads, head_dim)")
    if k.shape[2] != v.shape[2]:
        return f"k has {k.shape[2]} heads but v has {v.shape[2]}; they must match"
    if q.shape[2] % k.shape[2]:
        return (f"q has {q.shape[2]} heads, not a multiple of the {k.shape[2]} key/value heads; "
                "GQA/MQA needs heads % kv_heads == 0")
    if q.shape[1] == 0:
        return "the local sequence is empty"
    try:
        check_layout(layout)
        check_local_len(q.shape[1], layout, ring.world_size)
    except ValueError as e:
        return str(e)
    if backend not in BACKENDS:
        return f"backend={backend!r} is unknown; use one of {', '.join(BACKENDS)}"
    return None


def _validate(q, k, v, causal, layout, backend, ring: Ring, docs=None, doc_problem=None) -> None:
    """Raise the same error on every rank, before any ring communication.

    Ranks exchange their local verdict and signature (one small all-gather), so a
    problem on one rank, or shapes that differ between ranks, stop all of them alike.
    """
    problem = _local_problems(q, k, v, layout, backend, ring) or doc_problem
    if ring.world_size == 1:
        if problem:
            raise ValueError(f"ring_attention: {problem}")
        return
    sig = None if problem else (tuple(q.shape), tuple(k.shape), str(q.dtype), bool(causal), layout, docs)
    gathered = [None] * ring.world_size
    dist.all_gather_object(gathered, (problem, sig), group=ring.group)
    for r, (p, _) in enumerate(gathered):
        if p:
            raise ValueError(f"ring_attention: rank {r}: {p}")
    for r, (_, s) in enumerate(gathered):
        if s != gathered[0][1]:
            names = ("q shape", "k/v shape", "dtype", "causal", "layout", "cu_seqlens")
            diffs = [f"{n}: rank 0 {a} vs rank {r} {b}" for n, a, b in zip(names, gathered[0][1], s) if a != b]
            raise ValueError(
                "ring_attention: every rank must pass the same batch, local sequence length, heads, dtype, "
                "causal and layout (shard the global sequence with ringwise.shard); " + "; ".join(diffs)
            )


def ring_attention(q, k, v, *, causal=False, softmax_scale=None, layout="zigzag", group=None,
                   return_lse=False, backend="auto", validate=True, cu_seqlens=None, document_ids=None,
                   ulysses_group=None):
    """Exact softmax attention over a sequence sharded across the ranks of `group`.

    q: (batch, local_seq, heads, head_dim); k, v: (batch, local_seq, kv_heads, head_dim),
    heads % kv_heads == 0. Each rank passes its shard in the given `layout` (see
    ringwise.shard); `causal` masks by *global* position. Returns out like q, and with
    return_lse also the float32 log-sum-exp (batch, heads, local_seq) (not differentiable).
    With world size 1 or no process group this is plain blockwise attention.
    cu_seqlens: packed documents, as global boundaries (0, len0, len0+len1, ..., total), the
    same on every rank; attention stays inside each document (causal within it if causal).
    Documents may have any lengths and span shards in every layout. document_ids: the same
    as per-token ids over the global sequence (each document contiguous), instead of cu_seqlens.
    validate=False skips the cross-rank argument check (one small all-gather per call).
    ulysses_group: Ulysses x ring (USP, see ulysses.py): inputs sharded with
    ringwise.shard(x, 1, layout, group, ulysses_group=ulysses_group); an all-to-all over
    ulysses_group trades sequence for heads before the ring over `group` and back after it.
    """
    if ulysses_group is not None:  # every argument, whatever its name, goes on to the ring unchanged
        forwarded = dict(locals())
        from .ulysses import ulysses_attention

        return ulysses_attention(**forwarded)
    ring = Ring(group)
    docs, doc_problem = None, None
    if cu_seqlens is not None and document_ids is not None:
        raise ValueError("ring_attention: pass cu_seqlens or document_ids, not both")
    if (cu_seqlens is not None or document_ids is not None) and isinstance(q, torch.Tensor) and q.dim() == 4:
        try:
            if document_ids is not None:
                cu_seqlens = _bounds_from_document_ids(document_ids)
            docs = _document_bounds(cu_seqlens, q.shape[1] * ring.world_size)
        except (ValueError, TypeError) as e:
            doc_problem = str(e)
    if validate:
        _validate(q, k, v, causal, layout, backend, ring, docs, doc_problem)
    elif doc_problem:
        raise ValueError(f"ring_attention: {doc_problem}")
    scale = default_scale(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    kernel = select_kernel(backend, q.device, q.dtype, q.shape[-1])
    out, lse = _RingAttention.apply(q, k, v, bool(causal), scale, layout, ring, kernel, docs)
    return (out, lse) if return_lse else out
