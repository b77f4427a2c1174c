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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from .comm import Hop, Ring
from .kernels import AtenCpuKernel, Flipped, Kernel, MaskedTile, ReferenceKernel, acc_dtype
from .merge import merge_into
from .tiles import Mask, Tile, needed_steps, visits

Tensor = torch.Tensor
KV = tuple[Tensor, Tensor]  # a key/value block (batch, seq, kv_heads, dim)

_REFERENCE = ReferenceKernel()


@dataclass(frozen=True)
class Engine:
    """How the rings of one call run, the same forward and backward: the scale, the layout, the
    ring, the fused tile kernel and the mask (api.py builds it from the checked call; benchmarks
    build it directly)."""

    scale: float
    layout: str
    ring: Ring
    kernel: Kernel
    mask: Mask = Mask()
    softcap: Optional[float] = None

    def schedule(self, local_len: int) -> tuple[tuple[int, ...], bool]:
        """(needed steps, relay?): relay when the steps are a prefix 0..m of the ring."""
        steps = needed_steps(self.layout, self.ring.world_size, local_len, self.mask)
        return steps, steps == tuple(range(len(steps)))

    def visits(
        self, q_rank: int, kv_rank: int, local_len: int, device: torch.device
    ) -> Sequence[tuple[Tile, Optional[Tensor]]]:
        """What to compute of q_rank's queries against kv_rank's block: (tile, its mask where the
        mask's mod cut it, else None)."""
        return visits(self.layout, q_rank, kv_rank, self.ring.world_size, local_len, self.mask, str(device))


def _rows(t: Tile) -> slice:
    return slice(t.q_start, t.q_start + t.q_len)


def _cols(t: Tile) -> slice:
    return slice(t.k_start, t.k_start + t.k_len)


def _heads_first(x: Tensor) -> Tensor:
    """(batch, seq, heads, dim) -> the kernels' (batch, heads, seq, dim), as a view (no copy)."""
    return x.transpose(1, 2)


def _receive_buffers(kv: KV, steps: int) -> list[KV]:
    """Double buffers for visiting K/V blocks; the caller's own k, v are never written."""
    return [(torch.empty_like(kv[0]), torch.empty_like(kv[1])) for _ in range(min(2, steps - 1))]


def _finite(*xs: Tensor) -> bool:
    """Every element of every x is finite. inf and NaN survive a sum, so one reduction per
    tensor and one host read decide it (20x faster than isfinite().all() on CPU); only a sum
    that is not finite (a non-finite element, or finite ones that overflowed) is looked at
    element by element."""
    sums = [x.sum(dtype=acc_dtype(x.dtype)) for x in xs]
    if bool(torch.isfinite(sums[0] if len(sums) == 1 else torch.stack(sums).sum())):
        return True
    return all(bool(torch.isfinite(x).all()) for x in xs)


def _reference_args(t: Tile, softcap: Optional[float], keep: Optional[Tensor]) -> dict[str, object]:
    """What the reference kernel needs beyond causal to compute tile t (keep: a masked tile's mask)."""
    if keep is not None:
        return dict(softcap=softcap, keep=keep)
    return dict(band=t.reference_band, softcap=softcap)


def _tile_kernel(
    kernel: Kernel, t: Tile, finite: bool, softcap: Optional[float], keep: Optional[Tensor]
) -> tuple[Kernel, dict[str, object]]:
    """The kernel and extra arguments for tile t: the fused `kernel` where it is exact
    (anti-causal squares on flipped inputs, masked tiles with an additive mask on the CPU kernel
    or, on CUDA, the memory-efficient op), else the reference kernel."""
    if t.band is None and softcap is None and finite and not isinstance(kernel, ReferenceKernel):
        if keep is None:
            return (Flipped(kernel) if t.anti else kernel), {}
        if isinstance(kernel, AtenCpuKernel) or kernel.name.startswith("cuda_"):
            return MaskedTile(keep), {}
    return _REFERENCE, _reference_args(t, softcap, keep)


def _run_tile(
    direction: Literal["forward", "backward"],
    kernel: Kernel,
    t: Tile,
    finite: bool,
    softcap: Optional[float],
    scale: float,
    *tensors: Tensor,
    keep: Optional[Tensor] = None,
) -> tuple[Tensor, ...]:
    """Tile t's "forward" (q, k, v -> out, lse) or "backward" (dout, q, k, v, out, lse ->
    dq, dk, dv) on `_tile_kernel`'s kernel. A fused result that is not finite (lse forward,
    every gradient backward) is recomputed on the reference kernel where the check costs no
    host sync (CPU), so both directions follow the reference's semantics (module docstring)."""
    device = tensors[0].device
    kern, extra = _tile_kernel(kernel, t, finite, softcap, keep)
    causal = t.causal and keep is None
    res: tuple[Tensor, ...] = getattr(kern, direction)(*tensors, causal, scale, **extra)
    checked = res[1:] if direction == "forward" else res
    if direction == "forward" and isinstance(kern, MaskedTile):  # its rows that see no key have lse -inf
        checked = (res[1].nan_to_num(nan=math.nan, posinf=math.inf, neginf=0.0),)
    if not isinstance(kern, ReferenceKernel) and device.type == "cpu" and not _finite(*checked):
        res = getattr(_REFERENCE, direction)(*tensors, causal, scale, **_reference_args(t, softcap, keep))
    return res


def _post_kv(
    ring: Ring, steps: Sequence[int], n: int, relay: bool, held: KV, own: KV, inbox: list[KV]
) -> Optional[Hop]:
    """Post the hop that brings the block of step steps[n+1] (None after the last step)."""
    if n + 1 >= len(steps):
        return None
    if relay:
        return ring.exchange("kv", held, inbox[n % 2])
    return ring.exchange("kv", own, inbox[n % 2], offset=steps[n + 1])


def ring_forward(
    q: Tensor, k: Tensor, v: Tensor, engine: Engine, sinks: Optional[Tensor] = None
) -> tuple[Tensor, Tensor]:
    """q, k, v: (batch, seq, heads, dim). Returns out (input dtype, same layout) and lse (batch, heads, seq).

    Buffers are the paper's: the query block, the visiting K/V block and its receive
    buffers, and the float32 output accumulator. Kernels read strided views, no copies.
    sinks: (heads,) logits merged in last; the returned lse includes them.
    """
    ring, scale = engine.ring, engine.scale
    W, rank, L = ring.world_size, ring.rank, q.shape[1]
    dt = acc_dtype(q.dtype)
    out = torch.zeros(q.shape, dtype=dt, device=q.device)
    lse = torch.full((q.shape[0], q.shape[2], L), float("-inf"), dtype=dt, device=q.device)
    qh, out_h = _heads_first(q), _heads_first(out)
    own: KV = (k.contiguous(), v.contiguous())  # the first visitor is our own block: no copy
    kv = own
    steps, relay = engine.schedule(L)
    inbox = _receive_buffers(own, len(steps))
    q_finite = math.isfinite(scale) and _finite(q)
    for n, s in enumerate(steps):
        hop = _post_kv(ring, steps, n, relay, kv, own, inbox)
        visits = engine.visits(rank, (rank - s) % W, L, q.device)
        finite = q_finite and bool(visits) and _finite(*kv)
        kh, vh = _heads_first(kv[0]), _heads_first(kv[1])
        for t, keep in visits:
            rows, cols = _rows(t), _cols(t)
            o_b, lse_b = _run_tile(
                "forward",
                engine.kernel,
                t,
                finite,
                engine.softcap,
                scale,
                qh[:, :, rows],
                kh[:, :, cols],
                vh[:, :, cols],
                keep=keep,
            )
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

    def __init__(self, ring: Ring, n_steps: int) -> None:
        self.ring, self.n_steps = ring, n_steps
        self._hop: Optional[Hop] = None
        self._inbox: Optional[Tensor] = None
        self._home: Optional[Tensor] = None  # our own block's gradient, once it is known

    def _send(self, dkv: Tensor, offset: int) -> None:
        self._inbox = torch.empty_like(dkv)
        self._hop = self.ring.exchange("dkv", [dkv], [self._inbox], offset=offset)

    def _received(self) -> Optional[Tensor]:
        """Wait for the hop in flight; what it brought (None if there was none)."""
        if self._hop is None:
            return None
        self._hop.wait()
        self._hop = None
        return self._inbox


class RelayedGrads(_GradRoute):
    """Steps 0..m: a block's accumulator rides the ring with the block, one hop a step, each
    rank adding its share; after the last step it takes one hop home (offset -m)."""

    def add(self, n: int, s: int, dkv: Tensor) -> None:
        got = self._received()
        if got is not None:  # the accumulator of the block we just visited
            dkv += got
        if n + 1 < self.n_steps:
            self._send(dkv, 1)
        elif n > 0:
            self._send(dkv, -s)
        else:  # a one-step ring: our own block, already home
            self._home = dkv

    def finish(self) -> Tensor:
        got = self._received()
        home = self._home if got is None else got
        assert home is not None, "a ring of more than one step receives its accumulator home"
        return home


class DirectGrads(_GradRoute):
    """Any steps: the share of step s's block goes straight back to its owner (offset -s),
    which sums its own share (step 0) and the partials as they arrive."""

    def add(self, n: int, s: int, dkv: Tensor) -> None:
        got = self._received()
        if got is not None:  # a partial of our own block, back from the rank that visited it
            assert self._home is not None, "step 0, our own block, comes first"
            self._home += got
        if n == 0:  # step 0 (always the first) is our own block
            self._home = dkv
        else:
            self._send(dkv, -s)

    def finish(self) -> Tensor:
        got = self._received()
        assert self._home is not None, "step 0, our own block, comes first"
        if got is not None:
            self._home += got
        return self._home


def ring_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, engine: Engine
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of q, k, v (input dtype, (batch, seq, heads, dim)) from the final out and lse.

    The same ring as ring_forward, with dK/dV shares routed home by RelayedGrads or
    DirectGrads (as the schedule relays K/V or sends each block direct); dQ never moves.
    """
    ring, scale = engine.ring, engine.scale
    W, rank, L = ring.world_size, ring.rank, q.shape[1]
    dt = acc_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=dt, device=q.device)
    qh, dq_h, out_h, dout_h = _heads_first(q), _heads_first(dq), _heads_first(out), _heads_first(dout)
    own: KV = (k.contiguous(), v.contiguous())
    kv = own
    steps, relay = engine.schedule(L)
    inbox = _receive_buffers(own, len(steps))
    q_finite = math.isfinite(scale) and _finite(q, dout, out)
    route: RelayedGrads | DirectGrads = RelayedGrads(ring, len(steps)) if relay else DirectGrads(ring, len(steps))
    for n, s in enumerate(steps):
        kv_hop = _post_kv(ring, steps, n, relay, kv, own, inbox)
        visits = engine.visits(rank, (rank - s) % W, L, q.device)
        finite = q_finite and bool(visits) and _finite(*kv)
        kh, vh = _heads_first(kv[0]), _heads_first(kv[1])
        dkv = torch.zeros((2,) + tuple(k.shape), dtype=dt, device=q.device)
        dk_h, dv_h = _heads_first(dkv[0]), _heads_first(dkv[1])
        for t, keep in visits:
            rows, cols = _rows(t), _cols(t)
            dq_t, dk_t, dv_t = _run_tile(
                "backward",
                engine.kernel,
                t,
                finite,
                engine.softcap,
                scale,
                dout_h[:, :, rows],
                qh[:, :, rows],
                kh[:, :, cols],
                vh[:, :, cols],
                out_h[:, :, rows],
                lse[:, :, rows].contiguous(),
                keep=keep,
            )
            dq_h[:, :, rows] += dq_t
            dk_h[:, :, cols] += dk_t
            dv_h[:, :, cols] += dv_t
        route.add(n, s, dkv)
        if kv_hop is not None:
            kv_hop.wait()
            kv = inbox[n % 2]
    home = route.finish()
    return dq.to(q.dtype), home[0].to(k.dtype), home[1].to(v.dtype)


def sink_grad(dout: Tensor, out: Tensor, lse: Tensor, sinks: Tensor) -> Tensor:
    """d sinks = -sum over batch and rows of exp(sink - lse_final) * rowsum(dO * O_final)."""
    dt = lse.dtype
    delta = (dout.to(dt) * out.to(dt)).sum(-1).transpose(1, 2)  # (batch, heads, seq)
    p_sink = torch.exp(sinks.detach().to(dt)[None, :, None] - lse)
    return -(p_sink * delta).sum((0, 2)).to(sinks.dtype)
