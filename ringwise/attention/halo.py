"""Short convolutions and linear recurrences over a sequence-sharded sequence: what each shard needs
from the ones before it.

Every call first agrees across ranks (one small object all-gather): a rank's problem, or shapes and
options that differ, is raised on every rank alike before any data moves.

A depthwise causal convolution of kernel K (Mamba's, gated DeltaNet's, LFM2's conv1d) reads, for
every token, the K - 1 tokens before it in global order. On a ring each rank holds one segment
(contiguous) or two (zigzag) of the sequence; the tokens before a segment's first ones are the
last K - 1 of the segment that precedes it globally, on another rank (zigzag: each of a rank's two
chunks has its own predecessor). `halos` brings them: every rank's segment tails go to every rank
in one differentiable all-gather (torch.distributed.nn.functional: its backward sums each tail's
gradient home to the rank that owns it), and each rank cuts its segments' predecessors out of it:
(W x segments x K - 1) tokens a call, against the segments' own length. Before position 0 and
before a document's start (packed documents, global `cu_seqlens`) the halo is zeros.

`causal_conv1d` is the convolution itself, exact against one process on the whole sequence,
documents included (no token sees one of another document). `sharded_scan` is the same for a
diagonal affine recurrence (state-space and linear-recurrent layers): one all-gather of each
segment's summary, composed in global order. The striped layout spreads every token's
predecessors over other ranks: refused (re-lay such a sequence contiguous first).

`sharded_state_scan` carries a matrix state (B, heads, dk, dv) through any kernel of the delta-rule
family (linear attention, DeltaNet, gated DeltaNet, KDA): the state's dv columns never mix, so a
segment's exit state is A @ entry + C, and one kernel run from the entry [0 | I] on values [v | 0]
gives [C | A] (and, read out by the queries, every token's C^T q and A^T q: the output from any entry
state E is C^T q + (A^T q)^T E, so one run serves). One all-gather of every segment's (C, A) composes
each segment's true entry state, from which the segment's outputs follow exactly. `sharded_decay_scan` is the same for
a state that decays elementwise (Mamba2's SSD, lightning attention): a run from zero gives C, a run
on zero inputs from ones the decay. Both run on one engine (`_kernel_scan`), which also cuts the
chain at packed documents' starts and returns the state after the last token on every rank (what
a generation's decode starts from).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from .comm import all_gather_objects
from .layout import Segment, check_layout, segments

Tensor = torch.Tensor


def _world(group: Optional[ProcessGroup]) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def agree(what: str, problem: Optional[str], call: tuple[object, ...], group: Optional[ProcessGroup]) -> None:
    """Raise the same error on every rank before any data moves: a rank's problem with its call, or calls
    that differ between ranks (shapes, width, layout, documents). One small object all-gather."""
    rank, W = _world(group)
    if W == 1:
        if problem:
            raise ValueError(f"{what}: {problem}")
        return
    views = all_gather_objects((problem, call), group)
    for r, (p, _) in enumerate(views):
        if p:
            raise ValueError(f"{what}: rank {r}: {p}")
    differ = [r for r, (_, c) in enumerate(views) if c != views[0][1]]
    if differ:
        raise ValueError(
            f"{what}: every rank must pass the same shapes and options (shard the global sequence with "
            f"ringwise.shard); rank 0 {views[0][1]} vs rank {differ[0]} {views[differ[0]][1]}"
        )


def _layout_problem(layout: str, W: int, L: int, width: int) -> Optional[str]:
    """What keeps this layout from giving each segment its predecessors whole (None: nothing)."""
    if layout == "striped" and W > 1:
        return (
            "each token's predecessors must be on one neighbour, but the striped layout spreads them over every "
            "rank; shard the sequence contiguous or zigzag for these layers"
        )
    try:
        segs = segments(layout, 0, W, L)
    except ValueError as e:
        return str(e)
    shortest = min(s.length for s in segs)
    if width > shortest:
        return (
            f"a halo of {width} tokens is longer than a segment ({shortest} tokens): the preceding tokens "
            "would come from several ranks; use fewer ranks or a longer sequence"
        )
    return None


def _doc_start(docs: Optional[tuple[int, ...]], g: int) -> int:
    """The global start of the document holding position g (0 without documents)."""
    return 0 if docs is None else docs[bisect.bisect_right(docs, g) - 1]


def _all_gather(x: Tensor, group: Optional[ProcessGroup], W: int) -> tuple[Tensor, ...]:
    """Every rank's x, differentiably (torch.distributed.nn.functional: the backward sums each rank's gradient
    home); (x,) alone on one rank."""
    if W == 1:
        return (x,)
    import warnings

    import torch.distributed.nn.functional as dnn

    with warnings.catch_warnings():  # torch 2.13 points to its private functional collectives instead
        warnings.simplefilter("ignore", FutureWarning)
        return tuple(dnn.all_gather(x.contiguous(), group=group))  # type: ignore[no-untyped-call]


def _entering_states(
    mine: Tensor,
    layout: str,
    group: Optional[ProcessGroup],
    L: int,
    state_of: Callable[[Tensor], Tensor],
    compose: Callable[[Tensor, Tensor], Tensor],
    resets: frozenset[int] = frozenset(),
) -> tuple[dict[tuple[int, int], Tensor], Tensor]:
    """({(rank, segment): the state entering that segment}, the state after the sequence's last token), from every
    rank's segment summaries (mine: this rank's, (segments, ...)) gathered once; every rank composes the same chain
    in global order, from a zero state at position 0 and at every global position in `resets` (a document's
    start): state <- compose(summary, state). state_of(summary) has the state's shape."""
    rank, W = _world(group)
    gathered = _all_gather(mine, group, W)
    order = sorted((seg.global_start, r, i) for r in range(W) for i, seg in enumerate(segments(layout, r, W, L)))
    # position 0's zero state, still read off the gather: every rank's backward must take part in the gather's
    state = torch.where(torch.zeros((), dtype=torch.bool, device=mine.device), state_of(gathered[rank][0]), 0.0)
    entering: dict[tuple[int, int], Tensor] = {}
    for start, r, i in order:
        if start in resets:
            state = state * 0
        entering[(r, i)] = state
        state = compose(gathered[r][i], state)
    return entering, state


def halos(
    x: Tensor,
    width: int,
    layout: str = "zigzag",
    group: Optional[ProcessGroup] = None,
    cu_seqlens: Optional[list[int]] = None,
) -> list[Tensor]:
    """For each of this rank's segments (layout.segments, in local order), the `width` tokens before
    it in global order: (batch, width, ...) tensors cut from x's dim 1, zeros before position 0 and
    before the start of the segment's first document. Differentiable; every rank must call it alike
    (one all-gather)."""
    check_layout(layout)
    rank, W = _world(group)
    L = x.shape[1]
    docs = None if cu_seqlens is None else tuple(int(b) for b in cu_seqlens)
    call = (layout, width, tuple(x.shape), str(x.dtype), docs)
    agree("halos (a sharded convolution)", _layout_problem(layout, W, L, width), call, group)
    segs = segments(layout, rank, W, L)
    if width == 0:
        return [x[:, :0] for _ in segs]
    tails = torch.stack([x[:, s.local_start + s.length - width : s.local_start + s.length] for s in segs])
    gathered = _all_gather(tails, group, W)
    # global position of each segment's last token -> (rank, segment index)
    ends = {seg.global_last: (r, i) for r in range(W) for i, seg in enumerate(segments(layout, r, W, L))}
    out = []
    for s in segs:
        g = s.global_start
        owner = ends.get(g - 1)
        if owner is None:  # the sequence's start: zeros, still read off the gather (every rank's backward
            # must take part in the gather's, so every rank's output depends on it)
            own = gathered[rank][0]
            halo = torch.where(torch.zeros((), dtype=torch.bool, device=x.device), own, torch.zeros_like(own))
        else:
            halo = gathered[owner[0]][owner[1]]
        start = _doc_start(docs, g)
        if g - width < start:  # positions before the sequence or the document: zeros
            keep = (torch.arange(g - width, g, device=x.device) >= start).view((1, width) + (1,) * (x.dim() - 2))
            halo = halo * keep.to(halo.dtype)
        out.append(halo)
    return out


def last_tokens(x: Tensor, width: int, layout: str = "zigzag", group: Optional[ProcessGroup] = None) -> Tensor:
    """The sequence's last `width` tokens (batch, width, ...) on every rank, from this rank's shard x (batch, local
    tokens, ...): a short convolution's state after a sharded prefill (what its decode continues from). One
    all-gather of each segment's tail; the last segment must hold `width` tokens."""
    check_layout(layout)
    rank, W = _world(group)
    L = x.shape[1]
    agree("last_tokens", _layout_problem(layout, W, L, width), (layout, width, tuple(x.shape), str(x.dtype)), group)
    segs = segments(layout, rank, W, L)
    tails = torch.stack([x[:, s.local_start + s.length - width : s.local_start + s.length] for s in segs])
    gathered = _all_gather(tails, group, W)
    last = max((seg.global_last, r, i) for r in range(W) for i, seg in enumerate(segments(layout, r, W, L)))
    return gathered[last[1]][last[2]]


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    layout: str = "zigzag",
    group: Optional[ProcessGroup] = None,
    cu_seqlens: Optional[list[int]] = None,
) -> Tensor:
    """Depthwise causal convolution of this rank's shard x (batch, local tokens, channels) with
    weight (channels, kernel) (or nn.Conv1d's (channels, 1, kernel)): out[t] = bias + sum over k of
    weight[:, k] * x[t - kernel + 1 + k] in global order, tokens before the sequence or the token's
    document counting as zero. The same as one process on the whole sequence (in the same dtype)."""
    w = weight.reshape(weight.shape[0], -1)
    K = w.shape[1]
    rank, W = _world(group)
    L = x.shape[1]
    docs = None if cu_seqlens is None else tuple(int(b) for b in cu_seqlens)
    parts = []
    for s, halo in zip(segments(layout, rank, W, L), halos(x, K - 1, layout, group, cu_seqlens)):
        ext = torch.cat([halo, x[:, s.local_start : s.local_start + s.length]], dim=1)  # (B, K-1+n, C)
        pos = s.global_start + torch.arange(s.length, device=x.device)
        first = None
        if docs is not None:  # each token's document start
            bounds = torch.tensor(docs, device=x.device)
            first = bounds[torch.searchsorted(bounds, pos, right=True) - 1]
        y = x.new_zeros(x.shape[0], s.length, x.shape[2])
        for k in range(K):
            src = ext[:, k : k + s.length]  # the token k - (K - 1) before each
            if first is not None:
                src = src * (pos + k - (K - 1) >= first).to(src.dtype)[None, :, None]
            y = y + src * w[:, k]
        parts.append(y if bias is None else y + bias)
    return torch.cat(parts, dim=1)


def linear_scan(a: Tensor, b: Tensor) -> Tensor:
    """States h_t = a_t * h_{t-1} + b_t from h_{-1} = 0 along dim 1, elementwise: the plain reference
    scan (one step a token); a model's own scan kernel computes the same."""
    h = torch.zeros_like(b[:, 0])
    out = []
    for t in range(b.shape[1]):
        h = a[:, t] * h + b[:, t]
        out.append(h)
    return torch.stack(out, dim=1)


def sharded_scan(
    a: Tensor,
    b: Tensor,
    layout: str = "zigzag",
    group: Optional[ProcessGroup] = None,
    cu_seqlens: Optional[list[int]] = None,
    local_scan: Callable[[Tensor, Tensor], Tensor] = linear_scan,
) -> tuple[Tensor, Tensor]:
    """The states of a diagonal affine recurrence h_t = a_t * h_{t-1} + b_t (elementwise: Mamba's,
    RG-LRU's, a scalar decay per head broadcast) over the global sequence, for this rank's shard
    (batch, local tokens, ...): h starts at 0, and again at each document's start.

    Each segment of the rank (contiguous: one, zigzag: two) is scanned from a zero state
    (`local_scan`: a model's own kernel, or the reference) and summarised as (product of its a,
    its last state); one differentiable all-gather of every segment's summary lets each rank
    compose its predecessors' in global order into the state entering each of its segments, and
    h = (zero-state scan) + (running product of a) * (entering state). Exact (the same algebra as the
    sequential scan, in another order of additions); backward through the gather sums each summary's
    gradient home. Returns (the states, the state after the sequence's last token: the same on every
    rank, what a decode continues from)."""
    check_layout(layout)
    rank, W = _world(group)
    L = a.shape[1]
    problem = _layout_problem(layout, W, L, 0)
    if problem is None and a.shape != b.shape:
        problem = f"the decays a {tuple(a.shape)} and the inputs b {tuple(b.shape)} must have one shape"
    call = (layout, tuple(a.shape), str(a.dtype), None if cu_seqlens is None else tuple(int(c) for c in cu_seqlens))
    agree("sharded_scan", problem, call, group)
    segs = segments(layout, rank, W, L)
    docs = None if cu_seqlens is None else torch.tensor([int(c) for c in cu_seqlens], device=a.device)
    zero_states, products, summaries = [], [], []
    for s in segs:
        a_s, b_s = a[:, s.local_start : s.local_start + s.length], b[:, s.local_start : s.local_start + s.length]
        if docs is not None:  # a document's first token forgets the state before it
            pos = s.global_start + torch.arange(s.length, device=a.device)
            starts = torch.isin(pos, docs)
            a_s = a_s * (~starts).to(a_s.dtype).view((1, s.length) + (1,) * (a.dim() - 2))
        h0, p = local_scan(a_s, b_s), torch.cumprod(a_s, dim=1)
        zero_states.append(h0)
        products.append(p)
        summaries.append(torch.stack([p[:, -1], h0[:, -1]]))
    mine = torch.stack(summaries)  # (segments, 2, batch, ...): (product of decays, last state)
    entering, final = _entering_states(
        mine, layout, group, L, state_of=lambda m: m[1], compose=lambda m, h: m[0] * h + m[1]
    )
    out = [h0 + p * entering[(rank, i)][:, None] for i, (h0, p) in enumerate(zip(zero_states, products))]
    return torch.cat(out, dim=1), final


def delta_rule(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, initial_state: Optional[Tensor] = None
) -> tuple[Tensor, Tensor]:
    """The gated delta rule token by token, in the inputs' dtype (the reference kernel; float64 in tests):
    S_t = (I - beta_t k_t k_t^T) diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T, out_t = S_t^T q_t, with q, k
    (batch, tokens, heads, dk), v (batch, tokens, heads, dv), beta (batch, tokens, heads), S (batch,
    heads, dk, dv) from initial_state (zeros if None), and the log decays g either (batch, tokens,
    heads), one per head (gated DeltaNet), or (batch, tokens, heads, dk), one per key channel (Kimi
    Delta Attention). Returns (out, final state)."""
    B, T, H, dk = k.shape
    S = q.new_zeros(B, H, dk, v.shape[-1]) if initial_state is None else initial_state.to(q.dtype)
    per_channel = g.dim() == k.dim()
    outs = []
    for t in range(T):
        kt, vt, bt = k[:, t], v[:, t], beta[:, t, :, None]
        S = S * (g[:, t].exp()[..., None] if per_channel else g[:, t].exp()[..., None, None])
        v_new = (vt - torch.einsum("bhk,bhkv->bhv", kt, S)) * bt
        S = S + kt[..., None] * v_new[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(outs, dim=1), S


Kernel = Callable[..., tuple[Tensor, Tensor]]


def _doc_pieces(s: Segment, docs: Optional[tuple[int, ...]]) -> list[tuple[int, int]]:
    """A segment's (local start, length) pieces, cut at every document start inside it (not at its first token)."""
    cuts = [] if docs is None else [d for d in docs if s.global_start < d < s.global_start + s.length]
    starts = [s.global_start, *cuts]
    ends = [*cuts, s.global_start + s.length]
    return [(s.local_start + a - s.global_start, e - a) for a, e in zip(starts, ends)]


class Piece(NamedTuple):
    """A stretch of the sequence run through a model's kernel, from an entry state the kernel has not seen yet:
    exit() -> (C, T), its exit state as apply(T, entry) + C (C and T of one shape but their last dim), and
    output(entry or None: zero) -> its outputs."""

    exit: Callable[[], tuple[Tensor, Tensor]]
    output: Callable[[Optional[Tensor]], Tensor]


def _kernel_scan(
    what: str,
    prepare: Callable[[dict[str, Tensor]], Piece],
    apply: Callable[[Tensor, Tensor], Tensor],
    tensors: dict[str, Tensor],
    layout: str,
    group: Optional[ProcessGroup],
    cu_seqlens: Optional[list[int]],
    call: tuple[object, ...],
) -> tuple[Tensor, Tensor]:
    """The engine of every state-passing scan: prepare(a piece's tensors) runs a model's kernel on a stretch of
    the sequence (Piece). Per segment one summary (a document start inside it: its last document's part, T = 0),
    one all-gather of them all, the chain composed in global order (reset at document starts), and each piece's
    outputs from its true entry state. Returns (this rank's outputs, the state after the sequence's last token:
    the same on every rank)."""
    check_layout(layout)
    rank, W = _world(group)
    L = next(iter(tensors.values())).shape[1]
    docs = None if cu_seqlens is None else tuple(int(c) for c in cu_seqlens)
    agree(what, _layout_problem(layout, W, L, 0), (layout, docs, *call), group)
    segs = segments(layout, rank, W, L)

    def cut(start: int, length: int) -> dict[str, Tensor]:
        return {name: x[:, start : start + length] for name, x in tensors.items()}

    pieces = [[(start, prepare(cut(start, n))) for start, n in _doc_pieces(s, docs)] for s in segs]
    summaries, width = [], 0
    for s, mine in zip(segs, pieces):
        start, last = mine[-1]
        C, T = last.exit()
        if start != s.local_start:  # the segment's last document starts inside it: its entry state is forgotten
            T = torch.zeros_like(T)
        summaries.append(torch.cat([C, T], dim=-1))
        width = C.shape[-1]
    entering, final = _entering_states(
        torch.stack(summaries),
        layout,
        group,
        L,
        state_of=lambda m: m[..., :width],
        compose=lambda m, h: apply(m[..., width:], h) + m[..., :width],
        resets=frozenset(docs or ()),
    )
    outs = [
        piece.output(entering[(rank, i)] if j == 0 else None)
        for i, mine in enumerate(pieces)
        for j, (_, piece) in enumerate(mine)
    ]
    return torch.cat(outs, dim=1), final


def sharded_state_scan(
    kernel: Kernel,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    per_token: dict[str, Tensor],
    layout: str = "zigzag",
    group: Optional[ProcessGroup] = None,
    cu_seqlens: Optional[list[int]] = None,
) -> tuple[Tensor, Tensor]:
    """A delta-rule-family layer over the global sequence, for this rank's shard: `kernel(q, k, v,
    initial_state=S, **per_token)` -> (out, final state) is the model's own scan (transformers'
    torch_chunk_gated_delta_rule, flash-linear-attention's, or delta_rule), q, k (batch, local tokens,
    heads, dk), v (..., dv), per_token tensors (batch, local tokens, ...) such as g and beta; its state
    S (batch, heads, dk, dv) is read out as S^T q. The state starts at zero at position 0 and at each
    document's start (global cu_seqlens).

    Per piece one kernel run on values [v | 0] from [0 | I]: its state is [C_t | A_t] at every token
    (the exit state from an entry E is A E + C, module docstring), so its outputs are C_t^T q and
    A_t^T q, and the true output is C_t^T q + (A_t^T q)^T E: the entry state enters without another
    run. One differentiable all-gather of the segments' (C, A); every rank composes the chain in
    global order. Exact against one process (the same algebra); about 2x one local run (the run is
    dv + dk wide instead of dv). Returns (outputs, the state after the sequence's last token, on
    every rank)."""
    B, _, H, dk = k.shape
    dv = v.shape[-1]

    def prepare(t: dict[str, Tensor]) -> Piece:
        n, heads = t["v"].shape[1], t["v"].shape[2]
        v_aug = torch.cat([t["v"], v.new_zeros(B, n, heads, dk)], dim=-1)
        eye = torch.eye(dk, dtype=v.dtype, device=v.device).expand(B, heads, dk, dk)
        start = torch.cat([v.new_zeros(B, heads, dk, dv), eye], dim=-1)
        extra = {name: x for name, x in t.items() if name not in ("q", "k", "v")}
        out, final = kernel(t["q"], t["k"], v_aug, initial_state=start, **extra)

        def output(entry: Optional[Tensor]) -> Tensor:
            if entry is None:
                return out[..., :dv]
            return out[..., :dv] + torch.einsum("bthk,bhkv->bthv", out[..., dv:], entry.to(out.dtype))

        return Piece(lambda: (final[..., :dv], final[..., dv:]), output)

    call = (tuple(q.shape), tuple(k.shape), tuple(v.shape), str(q.dtype), sorted(per_token))
    return _kernel_scan(
        "sharded_state_scan",
        prepare,
        lambda A, h: A @ h,
        dict(q=q, k=k, v=v, **per_token),
        layout,
        group,
        cu_seqlens,
        call,
    )


def sharded_decay_scan(
    kernel: Kernel,
    x: Tensor,
    per_token: dict[str, Tensor],
    layout: str = "zigzag",
    group: Optional[ProcessGroup] = None,
    cu_seqlens: Optional[list[int]] = None,
) -> tuple[Tensor, Tensor]:
    """A layer whose state decays elementwise over the global sequence, for this rank's shard: `kernel(x,
    initial_state=S, **per_token)` -> (out, final state) is the model's own scan (Mamba2's SSD chunk scan, an
    RG-LRU or Mamba scan, lightning attention), with x (batch, local tokens, ...) entering the state linearly and
    each token's transition a decay (elementwise, any broadcast) that depends on per_token tensors only. The state
    starts at zero at position 0 and at each document's start (global cu_seqlens).

    Per segment: a run from zero gives the exit state's constant part C, a run on zero inputs from ones its decay
    a; one differentiable all-gather of them; every rank composes the chain in global order; one run from the
    true entry state gives the outputs (pieces that start a document keep the run from zero). Exact against one
    process; about 3x one local run. Returns (outputs, the state after the sequence's last token, on every
    rank)."""

    def prepare(t: dict[str, Tensor]) -> Piece:
        extra = {name: y for name, y in t.items() if name != "x"}
        out, C = kernel(t["x"], initial_state=None, **extra)

        def exit() -> tuple[Tensor, Tensor]:
            _, a = kernel(torch.zeros_like(t["x"]), initial_state=torch.ones_like(C), **extra)
            return C, a

        def output(entry: Optional[Tensor]) -> Tensor:
            return out if entry is None else kernel(t["x"], initial_state=entry, **extra)[0]

        return Piece(exit, output)

    call = (tuple(x.shape), str(x.dtype), sorted((n, tuple(y.shape)) for n, y in per_token.items()))
    return _kernel_scan(
        "sharded_decay_scan",
        prepare,
        lambda a, h: a * h,
        dict(x=x, **per_token),
        layout,
        group,
        cu_seqlens,
        call,
    )
