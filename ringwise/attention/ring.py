"""Ring attention: the autograd Function and the public op.

Forward: each rank keeps its query shard; the key/value shards travel around the ring.
At every step the next hop is posted before the visiting block's tiles are computed and
waited after them, and each tile's (out, lse) is merged exactly in float32.

Only the ring steps some rank needs are made (`needed_steps`: a sliding window or short
packed documents leave late steps, or middle ones, with nothing to compute). When they are
a prefix 0..m the blocks are relayed m hops; otherwise each needed block goes straight from
its owner (step s: send to rank+s, receive from rank-s), one hop per needed step.

Backward: a second ring carries (K, V) and their float32 gradient accumulators (dK, dV).
Each rank adds the visiting block's share, using the final out and lse. Relayed
(`RelayedGrads`), the accumulator rides the ring with its block and takes one last hop
home; direct (`DirectGrads`), each partial goes straight back to its owner. dQ never moves.

Sinks (one logit per head with a zero value, GPT-OSS) are one more lse merge after the
ring. Every tile, forward and backward alike, runs through `_run_tile`, which picks its
kernel by one rule: soft-capping and the window's band tiles run on the reference kernel,
and so does any visiting block whose inputs are not all finite (checked once per call for
q, the scale and, backward, dout and out; once per visiting block for k/v), and any fused
tile whose result comes out non-finite, lse forward and dq/dk/dv backward (scores or
gradients that overflowed): the fused CPU kernel returns lse = 0 for rows whose scores are
all -inf (which the merge would take as real), loses NaN on tiles under 16 rows, and in
float16 its backward rounds dS = P (dP - D) to float16, which overflows where the
reference's float32 does not (large dO and V, gradients still finite). So out, lse and the
gradients always follow the reference kernel's semantics, whatever the kernel: a row with
no finite score has lse = -inf and adds nothing; NaN inputs give NaN. On CUDA the input
check is one host sync per visiting block, and the per-tile result check is skipped (it
would be a sync per tile): there, finite inputs whose scores or gradients overflow keep
the fused kernel's result.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.distributed as dist

from .comm import Ring, resolve_transport
from .kernels import acc_dtype, default_scale, select_kernel, BACKENDS, Flipped, ReferenceKernel
from .layout import check_layout, check_local_len
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


def _run_tile(direction, kernel, t, finite: bool, softcap, scale, *tensors):
    """Tile t's "forward" (q, k, v -> out, lse) or "backward" (dout, q, k, v, out, lse ->
    dq, dk, dv) on `_tile_kernel`'s kernel. A fused result that is not finite (lse forward,
    every gradient backward) is recomputed on the reference kernel where the check costs no
    host sync (CPU), so both directions follow the reference's semantics (module docstring)."""
    kern, extra = _tile_kernel(kernel, t, finite, softcap)
    res = getattr(kern, direction)(*tensors, t.causal, scale, **extra)
    checked = res[1:] if direction == "forward" else res
    if not isinstance(kern, ReferenceKernel) and checked[0].device.type == "cpu" and not _finite(*checked):
        res = getattr(_REFERENCE, direction)(*tensors, t.causal, scale, band=t.reference_band, softcap=softcap)
    return res


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
            o_b, lse_b = _run_tile("forward", kernel, t, finite, softcap, scale,
                                   qh[:, :, rows], kh[:, :, cols], vh[:, :, cols])
            merge_into(out_h[:, :, rows], lse[:, :, rows], o_b, lse_b)
        if hop is not None:
            hop.wait()
            kv = inbox[n % 2]
    if sinks is not None:  # one more key per row, value 0: the same exact merge
        merge_into(out_h, lse, out_h.new_zeros(()), sinks.detach().to(dt)[None, :, None].expand(lse.shape))
    return out.to(q.dtype), lse


class _GradRoute:
    """How this rank's float32 dK/dV shares reach the blocks' owners, on the "dkv" stream.
    add() takes the share of a visiting block after its tiles: it waits for the hop that
    the previous add() posted (so each hop overlaps one step of tiles) and posts the next.
    finish() waits for the last hop and returns our own block's (2, ...) gradient."""

    def __init__(self, ring: Ring, n_steps: int):
        self.ring, self.n_steps = ring, n_steps
        self._hop = self._inbox = self._home = None

    def _send(self, dkv, offset: int):
        self._inbox = torch.empty_like(dkv)
        self._hop = self.ring.exchange("dkv", [dkv], [self._inbox], offset=offset)

    def _received(self):
        """Wait for the hop in flight; what it brought (None if there was none)."""
        if self._hop is None:
            return None
        self._hop.wait()
        self._hop = None
        return self._inbox


class RelayedGrads(_GradRoute):
    """Steps 0..m: a block's accumulator rides the ring with the block, one hop a step, each
    rank adding its share; after the last step it takes one hop home (offset -m)."""

    def add(self, n: int, s: int, dkv):
        got = self._received()
        if got is not None:  # the accumulator of the block we just visited
            dkv += got
        if n + 1 < self.n_steps:
            self._send(dkv, 1)
        elif n > 0:
            self._send(dkv, -s)
        else:  # a one-step ring: our own block, already home
            self._home = dkv

    def finish(self):
        got = self._received()
        return self._home if got is None else got


class DirectGrads(_GradRoute):
    """Any steps: the share of step s's block goes straight back to its owner (offset -s),
    which sums its own share (step 0) and the partials as they arrive."""

    def add(self, n: int, s: int, dkv):
        got = self._received()
        if got is not None:  # a partial of our own block, back from the rank that visited it
            self._home += got
        if n == 0:  # step 0 (always the first) is our own block
            self._home = dkv
        else:
            self._send(dkv, -s)

    def finish(self):
        got = self._received()
        if got is not None:
            self._home += got
        return self._home


def ring_backward(dout, q, k, v, out, lse, causal, scale, layout, ring: Ring, kernel, docs=None, window=None,
                  softcap=None):
    """Gradients of q, k, v (input dtype, (batch, seq, heads, dim)) from the final out and lse.

    The same ring as ring_forward, with dK/dV shares routed home by RelayedGrads or
    DirectGrads (as the schedule relays K/V or sends each block direct); dQ never moves.
    """
    W, rank, L = ring.world_size, ring.rank, q.shape[1]
    dt = acc_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=dt, device=q.device)
    qh, dq_h, out_h, dout_h = _heads_first(q), _heads_first(dq), _heads_first(out), _heads_first(dout)
    own = (k.contiguous(), v.contiguous())
    kv = own
    steps, relay = _schedule(layout, W, L, causal, docs, window)
    inbox = _receive_buffers(own, len(steps))
    q_finite = math.isfinite(scale) and _finite(q, dout, out)
    route = (RelayedGrads if relay else DirectGrads)(ring, len(steps))
    for n, s in enumerate(steps):
        kv_hop = _post_kv(ring, steps, n, relay, kv, own, inbox)
        tiles = step_tiles(layout, rank, (rank - s) % W, W, L, causal, docs, window)
        finite = q_finite and bool(tiles) and _finite(*kv)
        kh, vh = _heads_first(kv[0]), _heads_first(kv[1])
        dkv = torch.zeros((2,) + tuple(k.shape), dtype=dt, device=q.device)
        dk_h, dv_h = _heads_first(dkv[0]), _heads_first(dkv[1])
        for t in tiles:
            rows, cols = _rows(t), _cols(t)
            dq_t, dk_t, dv_t = _run_tile("backward", kernel, t, finite, softcap, scale,
                                         dout_h[:, :, rows], qh[:, :, rows], kh[:, :, cols], vh[:, :, cols],
                                         out_h[:, :, rows], lse[:, :, rows].contiguous())
            dq_h[:, :, rows] += dq_t
            dk_h[:, :, cols] += dk_t
            dv_h[:, :, cols] += dv_t
        route.add(n, s, dkv)
        if kv_hop is not None:
            kv_hop.wait()
            kv = inbox[n % 2]
    home = route.finish()
    return dq.to(q.dtype), home[0].to(k.dtype), home[1].to(v.dtype)


def _sink_grad(dout, out, lse, sinks):
    """d sinks = -sum over batch and rows of exp(sink - lse_final) * rowsum(dO * O_final)."""
    dt = lse.dtype
    delta = (dout.to(dt) * out.to(dt)).sum(-1).transpose(1, 2)  # (batch, heads, seq)
    p_sink = torch.exp(sinks.detach().to(dt)[None, :, None] - lse)
    return -(p_sink * delta).sum((0, 2)).to(sinks.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, causal, scale, layout, ring, kernel, docs, window, softcap):
        out, lse = ring_forward(q, k, v, causal, scale, layout, ring, kernel, docs, window, sinks, softcap)
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        ctx.args = (causal, scale, layout, ring, kernel, docs, window, softcap)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        # the sink's zero value adds nothing to out, so q/k/v use the final (sunk) lse as is
        dq, dk, dv = ring_backward(dout, q, k, v, out, lse, *ctx.args)
        dsinks = _sink_grad(dout, out, lse, sinks) if sinks is not None and ctx.needs_input_grad[3] else None
        return dq, dk, dv, dsinks, None, None, None, None, None, None, None, None


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


def _check_tensors(q, k, v) -> str | None:
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
    for name, n in (("q heads", q.shape[2]), ("k/v heads (kv_heads)", k.shape[2]), ("head_dim", q.shape[3])):
        if n < 1:
            return f"{name} is {n}; shapes are (batch, seq, heads, head_dim) with every size >= 1"
    if q.shape[2] % k.shape[2]:
        return (f"q has {q.shape[2]} heads, not a multiple of the {k.shape[2]} key/value heads; "
                "GQA/MQA needs heads % kv_heads == 0")
    if q.shape[1] == 0:
        return "the local sequence is empty"
    return None


def _check_options(q, causal, scale, window, sinks, softcap, backend) -> str | None:
    if isinstance(scale, torch.Tensor) and scale.numel() == 1 and not scale.dtype.is_complex:
        scale = scale.item()
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        return f"softmax_scale must be a real number or None (1/sqrt(head_dim)), got {scale!r}"
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 0:
            return (f"window must be an int >= 0 (keys at most `window` positions before the query, "
                    f"flash-attn's window_size=(window, 0)) or None, got {window!r}")
        if not causal:
            return "window needs causal=True (a left sliding window: i - window <= j <= i)"
    if sinks is not None:
        if not isinstance(sinks, torch.Tensor) or sinks.dim() != 1 or sinks.shape[0] != q.shape[2]:
            return (f"sinks must be a 1-D tensor of one logit per query head ({q.shape[2]}), "
                    f"got {getattr(sinks, 'shape', type(sinks))}")
        if not sinks.is_floating_point() or sinks.device != q.device:
            return f"sinks must be a floating point tensor on {q.device}, got {sinks.dtype} on {sinks.device}"
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or not 0 < softcap < math.inf:
            return f"softcap must be a finite number > 0 (scores -> softcap * tanh(scores / softcap)), got {softcap!r}"
        if backend not in ("auto", "reference"):
            return (f"softcap is computed by the reference kernel only, but backend={backend!r}; "
                    "use backend='auto' or 'reference'")
    if backend not in BACKENDS:
        return f"backend={backend!r} is unknown; use one of {', '.join(BACKENDS)}"
    return None


def _prepare(q, k, v, ring, causal, scale, layout, backend, cu_seqlens, document_ids, window, sinks, softcap):
    """Check this rank's arguments without any communication: (problem or None, docs, kernel).

    Every check lives here (nothing may raise before the collective check), so a problem
    found on one rank stops every rank with the same error instead of a hang.
    """
    try:
        problem = _check_tensors(q, k, v) or _check_options(q, causal, scale, window, sinks, softcap, backend)
        if problem:
            return problem, None, None
        check_layout(layout)
        check_local_len(q.shape[1], layout, ring.world_size)
        docs = None
        if cu_seqlens is not None and document_ids is not None:
            return "pass cu_seqlens or document_ids, not both", None, None
        if document_ids is not None:
            cu_seqlens = _bounds_from_document_ids(document_ids)
        if cu_seqlens is not None:
            docs = _document_bounds(cu_seqlens, q.shape[1] * ring.world_size)
        kernel = _REFERENCE if softcap is not None else select_kernel(backend, q.device, q.dtype, q.shape[-1])
        return None, docs, kernel
    except (ValueError, TypeError, RuntimeError) as e:
        return str(e), None, None


def _validate(problem, sig, ring: Ring) -> None:
    """Raise the same error on every rank, before any ring communication.

    Ranks exchange their local verdict and signature (one small all-gather), so a
    problem on one rank, or shapes that differ between ranks, stop all of them alike.
    """
    if ring.world_size == 1:
        if problem:
            raise ValueError(f"ring_attention: {problem}")
        return
    gathered = [None] * ring.world_size
    dist.all_gather_object(gathered, (problem, None if problem else sig), group=ring.group)
    for r, (p, _) in enumerate(gathered):
        if p:
            raise ValueError(f"ring_attention: rank {r}: {p}")
    for r, (_, s) in enumerate(gathered):
        if s != gathered[0][1]:
            diffs = [f"{n}: rank 0 {a} vs rank {r} {b}" for (n, a), (_, b) in zip(gathered[0][1], s) if a != b]
            raise ValueError(
                "ring_attention: every rank must pass the same batch, local sequence length, heads, dtype, "
                "causal, layout, documents, window, sinks, softcap and transport (shard the global sequence with "
                "ringwise.shard); " + "; ".join(diffs)
            )


def ring_attention(q, k, v, *, causal=False, softmax_scale=None, layout="zigzag", group=None,
                   return_lse=False, backend="auto", validate=True, cu_seqlens=None, document_ids=None,
                   window=None, sinks=None, softcap=None, ulysses_group=None, transport=None):
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
    window (causal only): query i sees keys i - window .. i (global positions; flash-attn's
    window_size=(window, 0)); ring steps with nothing in the window make no hop.
    sinks: (heads,) per-head sink logits (GPT-OSS), one extra key per row with a zero value;
    differentiable; the returned lse includes it. softcap: scores -> softcap * tanh(scores /
    softcap) (Gemma 2), on the reference kernel (backend 'auto' or 'reference').
    A row with no finite score gets out = 0 and lse = -inf; NaN inputs give NaN.
    validate=False skips the cross-rank argument check (one small all-gather per call).
    ulysses_group: Ulysses x ring (USP, see ulysses.py): inputs sharded with
    ringwise.shard(x, 1, layout, group, ulysses_group=ulysses_group); an all-to-all over
    ulysses_group trades sequence for heads before the ring over `group` and back after it.
    transport: how hops travel, "direct", "host" (staged through pinned host memory over gloo,
    for several ranks on one GPU) or "auto" (None: $RINGWISE_TRANSPORT, else auto); see comm.py.
    """
    if ulysses_group is not None:  # every argument, whatever its name, goes on to the ring unchanged
        forwarded = dict(locals())
        from .ulysses import ulysses_attention

        return ulysses_attention(**forwarded)
    try:  # a bad transport name is one more problem for the collective check, not an early raise
        transport_problem = None
        resolve_transport(transport)
    except ValueError as e:
        transport_problem, transport = str(e), "direct"
    ring = Ring(group, transport)
    problem, docs, kernel = _prepare(q, k, v, ring, causal, softmax_scale, layout, backend, cu_seqlens,
                                     document_ids, window, sinks, softcap)
    problem = problem or transport_problem
    if validate:
        sig = None if problem else (
            ("q shape", tuple(q.shape)), ("k/v shape", tuple(k.shape)), ("dtype", str(q.dtype)),
            ("causal", bool(causal)), ("layout", layout), ("cu_seqlens", docs), ("window", window),
            ("sinks", sinks is not None), ("softcap", softcap), ("transport", ring.transport))
        _validate(problem, sig, ring)
    elif problem:
        raise ValueError(f"ring_attention: {problem}")
    scale = default_scale(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    window = None if window is None else int(window)
    softcap = None if softcap is None else float(softcap)
    out, lse = _RingAttention.apply(q, k, v, sinks, bool(causal), scale, layout, ring, kernel, docs, window, softcap)
    return (out, lse) if return_lse else out
