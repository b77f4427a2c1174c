"""Ring attention's engine: the forward and backward rings of one rank (no checks, no autograd;
api.py validates, registers the op and calls these).

Forward: each rank keeps its query shard; the key/value shards travel around the ring.
At every step the next hop is posted before the visiting block's tiles are computed and
waited after them, and each tile's (out, lse) is merged exactly in float32.

Only the ring steps some rank needs are made (`needed_steps`: a sliding window or short
packed documents leave late steps, or middle ones, with nothing to compute). When they are
a prefix 0..m the blocks are relayed m hops; otherwise each needed block goes straight from
its owner (step s: send to rank+s, receive from rank-s), one hop per needed step.

Backward: a second ring carries (K, V) and their float32 gradient accumulators (dK, dV).
Each rank adds the visiting block's share, using the final out and lse. Relayed, the
accumulator rides the ring with its block and takes one last hop home; direct, each
partial goes straight back to its owner. dQ never moves.

Sinks (one logit per head with a zero value, GPT-OSS) are one more lse merge after the
ring; soft-capping and the window's band tiles run on the reference kernel, and so does
any visiting block whose inputs are not all finite (checked once per call for q and the
scale, once per visiting block for k/v), and any fused tile whose lse comes out non-finite
(scores that overflowed): the fused CPU kernel returns lse = 0 for rows whose scores are all
-inf (which the merge would take as real) and loses NaN on tiles under 16 rows. So out and
lse always follow the reference kernel's semantics, whatever the kernel: a row with no finite
score has lse = -inf and adds nothing; NaN inputs give NaN. On CUDA the input check is one
host sync per visiting block, and the per-tile overflow check is skipped (it would be a sync
per tile): there, finite inputs whose scores overflow float32 keep the fused kernel's result.
"""
from __future__ import annotations

import math

import torch

from .comm import Ring
from .kernels import acc_dtype, Flipped, ReferenceKernel
from .tiles import needed_steps, step_tiles
from .merge import merge_into

_REFERENCE = ReferenceKernel()


def _rows(t):
    return slice(t.q_start, t.q_start + t.q_len)


def _cols(t):
    return slice(t.k_start, t.k_start + t.k_len)


def _heads_first(x):
    """(batch, seq, heads, dim) -> the kernels' (batch, heads, seq, dim), as a view (no copy)."""
    return x.transpose(1, 2)


def _receive_buffers(kv, steps):
    """Double buffers for visiting K/V blocks; the caller's own k, v are never written."""
    return [tuple(torch.empty_like(x) for x in kv) for _ in range(min(2, steps - 1))]


def _finite(*xs) -> bool:
    """Every element of every x is finite. inf and NaN survive a sum, so one reduction per
    tensor and one host read decide it (20x faster than isfinite().all() on CPU); only a sum
    that is not finite (a non-finite element, or finite ones that overflowed) is looked at
    element by element."""
    sums = [x.sum(dtype=acc_dtype(x.dtype)) for x in xs]
    if bool(torch.isfinite(sums[0] if len(sums) == 1 else torch.stack(sums).sum())):
        return True
    return all(bool(torch.isfinite(x).all()) for x in xs)


def _tile_kernel(kernel, t, finite: bool, softcap):
    """The kernel and extra arguments for tile t: the fused `kernel` where it is exact
    (anti-causal squares on flipped inputs), else the reference kernel."""
    if t.band is None and softcap is None and finite and not isinstance(kernel, ReferenceKernel):
        return (Flipped(kernel) if t.anti else kernel), {}
    return _REFERENCE, dict(band=t.reference_band, softcap=softcap)


def _schedule(layout, W, L, causal, docs, window):
    """(needed steps, relay?): relay when the steps are a prefix 0..m of the ring."""
    steps = needed_steps(layout, W, L, causal, docs, window)
    return steps, steps == tuple(range(len(steps)))


def _post_kv(ring, steps, n, relay, held, own, inbox):
    """Post the hop that brings the block of step steps[n+1] (None after the last step)."""
    if n + 1 >= len(steps):
        return None
    if relay:
        return ring.exchange("kv", held, inbox[n % 2])
    return ring.exchange("kv", own, inbox[n % 2], offset=steps[n + 1])


def ring_forward(q, k, v, causal, scale, layout, ring: Ring, kernel, docs=None, window=None, sinks=None,
                 softcap=None):
    """q, k, v: (batch, seq, heads, dim). Returns out (input dtype, same layout) and lse (batch, heads, seq).

    Buffers are the paper's: the query block, the visiting K/V block and its receive
    buffers, and the float32 output accumulator. Kernels read strided views, no copies.
    sinks: (heads,) logits merged in last; the returned lse includes them.
    """
    W, rank, L = ring.world_size, ring.rank, q.shape[1]
    dt = acc_dtype(q.dtype)
    out = torch.zeros(q.shape, dtype=dt, device=q.device)
    lse = torch.full((q.shape[0], q.shape[2], L), float("-inf"), dtype=dt, device=q.device)
    qh, out_h = _heads_first(q), _heads_first(out)
    own = (k.contiguous(), v.contiguous())  # the first visitor is our own block: no copy
    kv = own
    steps, relay = _schedule(layout, W, L, causal, docs, window)
    inbox = _receive_buffers(own, len(steps))
    q_finite = math.isfinite(scale) and _finite(q)
    for n, s in enumerate(steps):
        hop = _post_kv(ring, steps, n, relay, kv, own, inbox)
        tiles = step_tiles(layout, rank, (rank - s) % W, W, L, causal, docs, window)
        finite = q_finite and bool(tiles) and _finite(*kv)
        kh, vh = _heads_first(kv[0]), _heads_first(kv[1])
        for t in tiles:
            rows, cols = _rows(t), _cols(t)
            kern, extra = _tile_kernel(kernel, t, finite, softcap)
            o_b, lse_b = kern.forward(qh[:, :, rows], kh[:, :, cols], vh[:, :, cols], t.causal, scale, **extra)
            # scores that overflowed: checked where it costs no host sync (CPU); see the docstring
            if not isinstance(kern, ReferenceKernel) and lse_b.device.type == "cpu" and not _finite(lse_b):
                o_b, lse_b = _REFERENCE.forward(qh[:, :, rows], kh[:, :, cols], vh[:, :, cols], t.causal, scale,
                                                band=t.reference_band)
            merge_into(out_h[:, :, rows], lse[:, :, rows], o_b, lse_b)
        if hop is not None:
            hop.wait()
            kv = inbox[n % 2]
    if sinks is not None:  # one more key per row, value 0: the same exact merge
        merge_into(out_h, lse, out_h.new_zeros(()), sinks.detach().to(dt)[None, :, None].expand(lse.shape))
    return out.to(q.dtype), lse


def ring_backward(dout, q, k, v, out, lse, causal, scale, layout, ring: Ring, kernel, docs=None, window=None,
                  softcap=None):
    """Gradients of q, k, v (input dtype, (batch, seq, heads, dim)) from the final out and lse."""
    W, rank, L = ring.world_size, ring.rank, q.shape[1]
    dt = acc_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=dt, device=q.device)
    qh, dq_h, out_h, dout_h = _heads_first(q), _heads_first(dq), _heads_first(out), _heads_first(dout)
    own = (k.contiguous(), v.contiguous())
    kv = own
    steps, relay = _schedule(layout, W, L, causal, docs, window)
    inbox = _receive_buffers(own, len(steps))
    q_finite = math.isfinite(scale) and _finite(q, dout, out)
    dkv_shape = (2,) + tuple(k.shape)
    home = None  # our own block's gradient, once known (direct: summed as partials arrive)
    dkv_in = dkv_hop = None
    for n, s in enumerate(steps):
        kv_hop = _post_kv(ring, steps, n, relay, kv, own, inbox)
        tiles = step_tiles(layout, rank, (rank - s) % W, W, L, causal, docs, window)
        finite = q_finite and bool(tiles) and _finite(*kv)
        kh, vh = _heads_first(kv[0]), _heads_first(kv[1])
        dkv = torch.zeros(dkv_shape, dtype=dt, device=q.device)
        dk_h, dv_h = _heads_first(dkv[0]), _heads_first(dkv[1])
        for t in tiles:
            rows, cols = _rows(t), _cols(t)
            kern, extra = _tile_kernel(kernel, t, finite, softcap)
            dq_t, dk_t, dv_t = kern.backward(
                dout_h[:, :, rows], qh[:, :, rows], kh[:, :, cols], vh[:, :, cols],
                out_h[:, :, rows], lse[:, :, rows].contiguous(), t.causal, scale, **extra,
            )
            dq_h[:, :, rows] += dq_t
            dk_h[:, :, cols] += dk_t
            dv_h[:, :, cols] += dv_t
        if dkv_hop is not None:
            dkv_hop.wait()
            if relay:  # the accumulator of the block we just visited
                dkv += dkv_in
            else:  # a partial of our own block, back from the rank that visited it
                home += dkv_in
        if n == 0 and (not relay or len(steps) == 1):
            home = dkv
        elif relay:  # pass the accumulator on, or after the last step send it to its owner
            dkv_in = torch.empty_like(dkv)
            dkv_hop = ring.exchange("dkv", [dkv], [dkv_in], offset=1 if n + 1 < len(steps) else -s)
        else:
            dkv_in = torch.empty_like(dkv)
            dkv_hop = ring.exchange("dkv", [dkv], [dkv_in], offset=-s)
        if kv_hop is not None:
            kv_hop.wait()
            kv = inbox[n % 2]
    if dkv_hop is not None:
        dkv_hop.wait()
        if relay:
            home = dkv_in
        else:
            home += dkv_in
    return dq.to(q.dtype), home[0].to(k.dtype), home[1].to(v.dtype)


def sink_grad(dout, out, lse, sinks):
    """d sinks = -sum over batch and rows of exp(sink - lse_final) * rowsum(dO * O_final)."""
    dt = lse.dtype
    delta = (dout.to(dt) * out.to(dt)).sum(-1).transpose(1, 2)  # (batch, heads, seq)
    p_sink = torch.exp(sinks.detach().to(dt)[None, :, None] - lse)
    return -(p_sink * delta).sum((0, 2)).to(sinks.dtype)
