"""Which parts of a (query shard, key/value shard) pair need computing, and how.

Under a causal mask a pair of segments is *full* (every key precedes every query),
*empty* (every key follows every query: skipped, never computed) or *partial*. For the
three layouts a partial pair is always one of two square shapes that the fused kernels
run natively with ``is_causal=True``:

* diagonal: same global positions, key j visible to query i iff j <= i;
* shifted (striped layout, key rank after query rank): j visible iff j < i, which is
  the diagonal shape on q[1:] x k[:-1].

With packed documents (global boundaries, as flash-attn's cu_seqlens) each segment pair is
cut per shared document, and each piece is again full, a causal square, or a full block of
later queries against a causal square's keys, so any document lengths work in any layout.

A sliding window (key j visible iff i - w <= j <= i in global positions, flash-attn's
``window_size=(w, 0)``) cuts each of those pieces once more. A piece wholly inside the
window stays as it is, one wholly outside is dropped. The window's far edge (j >= i - w) is
the mirror image of the causal edge, so a full piece it crosses splits the same way into
full blocks and one *anti-causal* square (j >= i), which is a causal square on reversed rows
and keys: the fused kernels run it on flipped inputs. A causal square wider than the
window is cut into row blocks of w+1 rows, each a causal square plus the previous keys'
anti-causal square. Windows under MIN_FUSED_WINDOW tokens would make many tiny calls
that way, so there a piece becomes one *band* tile (key j visible iff lo <= i - j <= hi,
tile-local), trimmed to its bounding box, which the reference kernel computes chunk by chunk
over only the keys each chunk can see.

Two masks are not made of causal edges: a window that also reaches forward (key j visible
iff i - left <= j <= i + right, full attention: EmbeddingGemma's bidirectional windows) and
*groups* (causal, plus every pair inside one group's contiguous span: Gemma 3's image tokens,
a prefix-LM's prefix). Both give every query an interval of visible keys, [lo(i), hi(i)] in
global positions (documents cut it), so their pieces come from the rows' intervals instead
(`interval_pair_tiles`): per block of ROW_BLOCK rows, the keys every row sees are one full
tile, and the keys some rows see are edge tiles, each a causal or anti-causal square when
its rows' intervals make one, else a *masked* tile carrying its rows' key bounds, which the
fused CPU kernel computes with an additive mask (the reference kernel elsewhere).

A mask's `mod` (any function of global positions) is and-ed in last, in blocks of MOD_BLOCK
rows and keys (`visits`): a block it leaves whole keeps its fused shape, one it empties is
dropped, one it cuts carries its bool mask.

Adjacent full tiles are merged so that each ring step is as few kernel calls as possible
(e.g. zigzag's off-diagonal steps are one call each). `needed_steps` tells the ring which
steps any rank needs at all, so hops that would only carry skipped blocks are never sent.
All three are cached per argument tuple (the `Mask` among them): pure memoization (their
result depends on the arguments and the module constants MIN_FUSED_WINDOW, ROW_BLOCK and
MOD_BLOCK alone), so nothing needs clearing unless a test changes a constant
(`clear_caches`).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Literal, Union

import torch

from .layout import Segment, global_indices, segments

# Pieces of a segment pair, (q0, q1, k0, k1, mask) in local indices: _causal_tiles' mask says causal
# or not; a Piece's is its Kind, "full", "causal", "anti" or a band (lo, hi) (see Tile).
CausalPiece = tuple[int, int, int, int, bool]
Kind = Union[Literal["full", "causal", "anti"], tuple[int, int]]
Piece = tuple[int, int, int, int, Kind]


Spans = tuple[tuple[int, int], ...]  # groups: (start, stop) global spans, sorted and disjoint
MaskMod = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Mask:
    """One call's mask, in global positions, the same on every rank (hashable: tilings are cached
    by it). Key j is visible to query i iff ((causal: j <= i, else j <= i + right) and
    j >= i - window, or i and j in one group) and in one document, and mod(i, j)."""

    causal: bool = False
    docs: tuple[int, ...] | None = None  # global document bounds (cu_seqlens), chunks among them
    window: int | None = None  # keys at most this many positions before the query
    right: int | None = None  # full attention: keys at most this many after it
    groups: Spans | None = None  # spans whose tokens see each other whole (causal)
    mod: MaskMod | None = None  # any further mask: mod(query positions, key positions) -> bool

    @property
    def by_intervals(self) -> bool:
        """Whether the tiling reads each row's key interval (groups, a two-sided window)."""
        return self.right is not None or bool(self.groups)


@dataclass(frozen=True)
class Tile:
    """Attend local queries [q_start, q_start+q_len) to visiting keys [k_start, k_start+k_len)."""

    q_start: int
    q_len: int
    k_start: int
    k_len: int
    causal: bool
    band: tuple[int, int] | None = None  # (lo, hi): key j visible iff lo <= i - j <= hi (tile-local)
    anti: bool = False  # a square where key j is visible iff j >= i
    # masked: row i sees tile-local keys [bounds[0][i], bounds[1][i]) (empty where they are equal)
    bounds: tuple[tuple[int, ...], tuple[int, ...]] | None = None

    @property
    def full(self) -> bool:
        return not (self.causal or self.anti) and self.band is None and self.bounds is None

    def keep(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The tile's (q_len, k_len) bool mask, True where the key is visible."""
        i = torch.arange(self.q_len, device=device)[:, None]
        j = torch.arange(self.k_len, device=device)[None, :]
        seen = torch.ones(self.q_len, self.k_len, dtype=torch.bool, device=device)
        if self.causal:
            seen &= j <= i
        if self.anti:
            seen &= j >= i
        if self.band is not None:
            seen &= (i - j >= self.band[0]) & (i - j <= self.band[1])
        if self.bounds is not None:
            lo, hi = (torch.tensor(b, device=device)[:, None] for b in self.bounds)
            seen &= (j >= lo) & (j < hi)
        return seen

    @property
    def reference_band(self) -> tuple[int, int] | None:
        """The tile's band for the reference kernel (an anti-causal square is i - j <= 0)."""
        return (1 - self.k_len, 0) if self.anti else self.band

    @property
    def work(self) -> float:
        """Score entries computed, in units of q*k (a causal or anti-causal square counts half)."""
        return self.q_len * self.k_len * (0.5 if self.causal or self.anti else 1.0)

    def visible(self, i: int, j: int) -> bool:
        """Whether tile-local key j is visible to tile-local query i."""
        if (self.causal and j > i) or (self.anti and j < i):
            return False
        if self.bounds is not None:
            return self.bounds[0][i] <= j < self.bounds[1][i]
        return self.band is None or self.band[0] <= i - j <= self.band[1]


def _causal_tiles(qa: int, qb: int, ka: int, kb: int, t: int) -> list[CausalPiece]:
    """Queries i in [qa, qb) against keys j in [ka, kb) where key j is visible iff j <= i + t.

    In the aligned key coordinate b = j - t this is b <= i, which splits into at most a full
    block of keys before every query, one causal square on the overlap, and a full block
    of later queries against the overlap. Returns (q0, q1, k0, k1, causal) in local indices.
    """
    lo, hi = ka - t, kb - t  # keys in aligned coordinates
    oa, ob = max(lo, qa), min(hi, qb)
    tiles: list[CausalPiece] = []
    if lo < min(hi, qa):
        tiles.append((qa, qb, lo + t, min(hi, qa) + t, False))
    if oa < ob:
        tiles.append((oa, ob, oa + t, ob + t, True))
        if ob < qb:
            tiles.append((ob, qb, oa + t, ob + t, False))
    return tiles


MIN_FUSED_WINDOW = 64  # narrower windows: one band tile on the reference kernel per piece


def _anticausal_tiles(qa: int, qb: int, ka: int, kb: int, t: int) -> list[Piece]:
    """Queries i in [qa, qb) against keys j in [ka, kb) where key j is visible iff j >= i + t.

    The mirror of _causal_tiles: a full block of keys after every query, one anti-causal
    square on the overlap, and a full block of earlier queries against the overlap.
    Returns (q0, q1, k0, k1, kind) in local indices, kind "full" or "anti".
    """
    lo, hi = ka - t, kb - t  # keys in aligned coordinates
    oa, ob = max(lo, qa), min(hi, qb)
    tiles: list[Piece] = []
    if max(lo, qb) < hi:
        tiles.append((qa, qb, max(lo, qb) + t, hi + t, "full"))
    if oa < ob:
        tiles.append((oa, ob, oa + t, ob + t, "anti"))
        if qa < oa:
            tiles.append((qa, oa, oa + t, ob + t, "full"))
    return tiles


def _window_tiles(parts: list[CausalPiece], t: int, w: int) -> list[Piece]:
    """Cut causal pieces (from _causal_tiles) to keys with i - (j - t) <= w, i.e. j >= i + t - w.

    Returns (q0, q1, k0, k1, kind) with kind "full", "causal", "anti" or a band (lo, hi).
    Every visible pair of a piece has i - (j - t) >= 0, so only the far edge is new.
    """
    out: list[Piece] = []
    for q0, q1, k0, k1, causal in parts:
        lo_d = 0 if causal else q0 - (k1 - 1) + t  # smallest i - j + t among the piece's pairs
        hi_d = (q1 - 1) - k0 + t
        if hi_d <= w:
            out.append((q0, q1, k0, k1, "causal" if causal else "full"))
        elif lo_d > w:
            continue
        elif not causal:
            out += _anticausal_tiles(q0, q1, k0, k1, t - w)
        elif w + 1 >= MIN_FUSED_WINDOW:  # rows in blocks of w+1: a causal square and the keys before it
            for r in range(q0, q1, w + 1):
                r2 = min(r + w + 1, q1)
                out.append((r, r2, r + t, r2 + t, "causal"))
                out += _anticausal_tiles(r, r2, max(q0, r - w) + t, r + t, t - w)
        else:  # one band tile over the bounding box
            qb, ka = min(q1, k1 - t + w + 1), max(k0, q0 + t - w)
            kb = min(k1, qb + t)
            off = q0 - ka + t
            out.append((q0, qb, ka, kb, (-off, w - off)))
    return out


def _index_range(seg: Segment, g0: int, g1: int) -> tuple[int, int]:
    """Indices i in [0, seg.length) whose global position lies in [g0, g1)."""
    lo = max(0, -(-(g0 - seg.global_start) // seg.stride))
    hi = min(seg.length, -(-(g1 - seg.global_start) // seg.stride))
    return lo, max(lo, hi)


def segment_pair_tiles(
    q: Segment, k: Segment, causal: bool, docs: tuple[int, ...] | None = None, window: int | None = None
) -> list[Tile]:
    """The tiles for one query segment against one key segment.

    docs: global document boundaries (cu_seqlens: 0, ..., total); attention stays inside a
    document. Pairs that share no document give no tiles. window (causal only): keys at
    most `window` global positions before the query.
    """
    if causal and q.stride != k.stride:
        raise ValueError(f"no causal tiling for query segment {q} against key segment {k}")
    if window is not None and not causal:
        raise ValueError("a sliding window needs causal=True")
    # key j visible to query i  iff  k.global_start + j*stride <= q.global_start + i*stride
    t = (q.global_start - k.global_start) // q.stride
    if window is not None:
        # global distance = (i - j + t) * stride + rem, 0 <= rem < stride: <= window iff
        # i - j + t <= (window - rem) // stride
        w = (window - (q.global_start - k.global_start - t * q.stride)) // q.stride
        if w < 0:
            return []
    spans = [(0, q.length, 0, k.length)]
    if docs is not None:
        lo_doc = max(0, bisect.bisect_right(docs, min(q.global_start, k.global_start)) - 1)
        hi_doc = bisect.bisect_right(docs, max(q.global_last, k.global_last))
        spans = []
        for d in range(lo_doc, min(hi_doc, len(docs) - 1)):
            qa, qb = _index_range(q, docs[d], docs[d + 1])
            ka, kb = _index_range(k, docs[d], docs[d + 1])
            if qa < qb and ka < kb:
                spans.append((qa, qb, ka, kb))
    out = []
    for qa, qb, ka, kb in spans:
        parts = _causal_tiles(qa, qb, ka, kb, t) if causal else [(qa, qb, ka, kb, False)]
        pieces: list[Piece]
        if window is not None:
            pieces = _window_tiles(parts, t, w)
        else:
            pieces = [(a, b, c, d, "causal" if p_causal else "full") for a, b, c, d, p_causal in parts]
        out += [_tile(q.local_start + a, b - a, k.local_start + c, d - c, kind) for a, b, c, d, kind in pieces]
    return out


ROW_BLOCK = 256  # rows per block of the interval tiling
_FAR = 1 << 62  # an unbounded interval end


def key_bounds(pos: torch.Tensor, mask: Mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive global bounds [lo, hi] of the keys that queries at global positions `pos` see
    under the mask without its mod. Each part of it is an interval containing the query, so
    their union is one."""
    causal, docs, window, right, groups = mask.causal, mask.docs, mask.window, mask.right, mask.groups
    lo = pos - window if window is not None else torch.full_like(pos, -_FAR)
    hi = pos.clone() if causal else (pos + right if right is not None else torch.full_like(pos, _FAR))
    if groups:
        starts = torch.tensor([a for a, _ in groups])
        stops = torch.tensor([b for _, b in groups])
        g = (torch.searchsorted(starts, pos, right=True) - 1).clamp_min(0)
        inside = (pos >= starts[g]) & (pos < stops[g])
        lo = torch.where(inside, torch.minimum(lo, starts[g]), lo)
        hi = torch.where(inside, torch.maximum(hi, stops[g] - 1), hi)
    if docs is not None:
        bounds = torch.tensor(docs)
        d = (torch.searchsorted(bounds, pos, right=True) - 1).clamp(0, len(docs) - 2)
        lo, hi = torch.maximum(lo, bounds[d]), torch.minimum(hi, bounds[d + 1] - 1)
    return lo, hi


def _square(a: torch.Tensor, b: torch.Tensor, k0: int, k1: int) -> Kind | None:
    """The kind of rows with key ranges [a, b) on keys [k0, k1) when it is a fused shape:
    "full", "causal" or "anti" (square tiles), else None."""
    n, rel = len(a), torch.arange(len(a))
    if bool(((a <= k0) & (b >= k1)).all()):
        return "full"
    if k1 - k0 == n and bool((a <= k0).all()) and bool((b - k0 == rel + 1).all()):
        return "causal"
    if k1 - k0 == n and bool((b >= k1).all()) and bool((a - k0 == rel).all()):
        return "anti"
    return None


def _edge(a: torch.Tensor, b: torch.Tensor, r0: int, k0: int, k1: int) -> list[Piece | Tile]:
    """Rows r0.. with key ranges [a, b), on keys [k0, k1): nothing, one fused piece or a masked tile."""
    a, b = a.clamp(k0, k1), b.clamp(k0, k1)
    b = torch.maximum(a, b)
    seen = (b > a).nonzero().flatten()
    if k0 >= k1 or not len(seen):
        return []
    first, last = int(seen[0]), int(seen[-1]) + 1  # rows at either end that see none of these keys
    a, b, r0 = a[first:last], b[first:last], r0 + first
    kind = _square(a, b, k0, k1)
    if kind is not None:
        return [(r0, r0 + len(a), k0, k1, kind)]
    bounds = (tuple((a - k0).tolist()), tuple((b - k0).tolist()))
    return [Tile(r0, len(a), k0, k1 - k0, False, bounds=bounds)]


def interval_pair_tiles(q: Segment, k: Segment, mask: Mask) -> list[Tile]:
    """The tiles of one segment pair under a mask of key intervals (`key_bounds`), in local indices.

    Each block of rows (ROW_BLOCK, cut where the key ranges bend) becomes at most three
    tiles: the keys every row sees (full), and the edges on either side, where the square that
    makes a causal (or anti-causal) edge a fused call is taken whole from the full part.
    """
    pos = q.global_start + q.stride * torch.arange(q.length)
    lo, hi = key_bounds(pos, mask)
    # local key j sits at k.global_start + j * stride: [lo, hi] -> local [a, b)
    a = (-((k.global_start - lo) // k.stride)).clamp(0, k.length)
    b = ((hi - k.global_start) // k.stride + 1).clamp(0, k.length)
    b = torch.maximum(a, b)
    # Row blocks of ROW_BLOCK rows (a window's edges are squares of w + 1 rows: no taller, but
    # not under MIN_FUSED_WINDOW), also cut where the rows' key ranges change slope (a group or a
    # document starts or ends, a window meets the shard's edge), so that each block's edges are
    # fused squares wherever the mask allows; masked tiles are left where it does not.
    sides = [w for w in (mask.window, mask.right) if w is not None]
    block = max(MIN_FUSED_WINDOW, min(ROW_BLOCK, min(sides) + 1)) if sides else ROW_BLOCK
    cut = set(range(0, q.length, block)) | {q.length}
    if q.length > 2:
        bends = set()
        for x in (a, b):
            slope = x[1:] - x[:-1]
            bends |= set((torch.nonzero(slope[1:] != slope[:-1]).flatten() + 1).tolist())
        if len(bends) <= q.length // 16:  # a few edges; many (a tiny window on a strided shard): blocks alone
            cut |= bends
    cuts = sorted(cut)
    out: list[Tile] = []
    for r0, r1 in zip(cuts, cuts[1:]):
        ar, br = a[r0:r1], b[r0:r1]
        seen = br > ar
        if not bool(seen.any()):
            continue
        first, last = int(seen.nonzero()[0]), int(seen.nonzero()[-1]) + 1  # trim rows that see nothing
        ar, br, r = ar[first:last], br[first:last], r0 + first
        n = len(ar)
        k_lo, k_hi = int(ar.min()), int(br.max())
        f0, f1 = int(ar.max()), int(br.min())  # keys every row sees: [f0, f1)
        if f0 >= f1:
            f0 = f1 = k_lo
        if f1 - f0 >= 1 and k_hi - n >= f0 and _square(ar, br, k_hi - n, k_hi) == "causal":
            f1 = min(f1, k_hi - n)  # the right edge as one causal square
        if f1 - f0 >= 1 and k_lo + n <= f1 and _square(ar, br, k_lo, k_lo + n) == "anti":
            f0 = max(f0, k_lo + n)  # the left edge as one anti-causal square
        parts: list[Piece | Tile] = [(r, r + n, f0, f1, "full")] if f0 < f1 else []
        parts += _edge(ar, br, r, k_lo, f0) + _edge(ar, br, r, max(f0, f1), k_hi)
        for p in parts:
            if isinstance(p, Tile):
                out.append(
                    Tile(q.local_start + p.q_start, p.q_len, k.local_start + p.k_start, p.k_len, False, bounds=p.bounds)
                )
            else:
                q0, q1, k0, k1, kind = p
                out.append(_tile(q.local_start + q0, q1 - q0, k.local_start + k0, k1 - k0, kind))
    return out


def _tile(q_start: int, q_len: int, k_start: int, k_len: int, kind: Kind) -> Tile:
    if isinstance(kind, tuple):
        return Tile(q_start, q_len, k_start, k_len, False, band=kind)
    return Tile(q_start, q_len, k_start, k_len, kind == "causal", anti=kind == "anti")


def _merge_full(tiles: list[Tile]) -> list[Tile]:
    """Fuse full tiles that share a query range and touch along keys, then the converse."""
    changed = True
    while changed:
        changed = False
        for i, a in enumerate(tiles):
            for j, b in enumerate(tiles):
                if i == j or not (a.full and b.full):
                    continue
                if (a.q_start, a.q_len) == (b.q_start, b.q_len) and a.k_start + a.k_len == b.k_start:
                    merged = Tile(a.q_start, a.q_len, a.k_start, a.k_len + b.k_len, False)
                elif (a.k_start, a.k_len) == (b.k_start, b.k_len) and a.q_start + a.q_len == b.q_start:
                    merged = Tile(a.q_start, a.q_len + b.q_len, a.k_start, a.k_len, False)
                else:
                    continue
                tiles = [t for n, t in enumerate(tiles) if n not in (i, j)] + [merged]
                changed = True
                break
            if changed:
                break
    return sorted(tiles, key=lambda t: (t.q_start, t.k_start))


@lru_cache(maxsize=4096)
def step_tiles(layout: str, q_rank: int, kv_rank: int, world_size: int, local_len: int, mask: Mask) -> tuple[Tile, ...]:
    """Tiles for q_rank's queries against the key/value shard that kv_rank owns, under the mask
    without its `mod` (see `visits`). Groups and two-sided windows tile by intervals."""
    qs = segments(layout, q_rank, world_size, local_len)
    ks = segments(layout, kv_rank, world_size, local_len)
    if mask.by_intervals:
        tiles = [t for a in qs for b in ks for t in interval_pair_tiles(a, b, mask)]
    else:
        tiles = [t for a in qs for b in ks for t in segment_pair_tiles(a, b, mask.causal, mask.docs, mask.window)]
    return tuple(_merge_full(tiles))


@lru_cache(maxsize=1024)
def needed_steps(layout: str, world_size: int, local_len: int, mask: Mask) -> tuple[int, ...]:
    """Ring steps s (rank r visits the shard of rank (r - s) mod W) that some rank has anything to
    compute in (`visits`: mask.mod included, the whole mask evaluated once per argument tuple).

    A function of its arguments alone, so every rank derives the same schedule. Step 0
    (the own shard) is always in it.
    """
    W = world_size
    need = {s for s in range(W) for r in range(W) if visits(layout, r, (r - s) % W, W, local_len, mask)}
    return tuple(sorted(need | {0}))


MOD_BLOCK = 256  # mask_mod is applied in blocks of this many rows and keys


def _sub_tiles(
    t: Tile, q_pos: torch.Tensor, k_pos: torch.Tensor, mask_mod: MaskMod
) -> list[tuple[Tile, torch.Tensor | None]]:
    """Tile t cut into MOD_BLOCK x MOD_BLOCK blocks with mask_mod and-ed in: a block it leaves as
    the tile had it keeps the tile's shape (full, or a causal square), one it empties is dropped,
    one it cuts carries its (rows, keys) bool mask."""
    seen = t.keep(q_pos.device)
    rows = q_pos[t.q_start : t.q_start + t.q_len, None]
    keys = k_pos[None, t.k_start : t.k_start + t.k_len]
    out: list[tuple[Tile, torch.Tensor | None]] = []
    for r0 in range(0, t.q_len, MOD_BLOCK):
        r1 = min(t.q_len, r0 + MOD_BLOCK)
        for c0 in range(0, t.k_len, MOD_BLOCK):
            c1 = min(t.k_len, c0 + MOD_BLOCK)
            own = seen[r0:r1, c0:c1]
            if not bool(own.any()):
                continue
            mod = torch.as_tensor(mask_mod(rows[r0:r1], keys[:, c0:c1]), dtype=torch.bool, device=own.device)
            kept = own & mod.expand_as(own)
            if not bool(kept.any()):
                continue
            block = Tile(t.q_start + r0, r1 - r0, t.k_start + c0, c1 - c0, False)
            if bool(kept.all()):
                out.append((block, None))
            elif r1 - r0 == c1 - c0 and torch.equal(kept, torch.ones_like(kept).tril()):
                out.append((Tile(block.q_start, block.q_len, block.k_start, block.k_len, True), None))
            else:
                out.append((block, kept))
    return out


@lru_cache(maxsize=1024)
def visits(
    layout: str, q_rank: int, kv_rank: int, world_size: int, local_len: int, mask: Mask, device: str = "cpu"
) -> tuple[tuple[Tile, torch.Tensor | None], ...]:
    """What to compute of q_rank's queries against kv_rank's block: step_tiles' tiles (with mask.mod,
    their blocks and-ed with it, `_sub_tiles`, full ones merged again), each with its (rows, keys)
    bool mask on `device` where it is a masked tile (an interval tiling's edge, or a block mod cut),
    else None (a fused shape). Cached per argument tuple, so the ring builds no mask per call: mod
    must be a pure function of global positions, the same on every rank."""
    tiles = step_tiles(layout, q_rank, kv_rank, world_size, local_len, mask)
    if mask.mod is None:
        return tuple((t, None if t.bounds is None else t.keep(device)) for t in tiles)
    W, total = world_size, local_len * world_size
    q_pos, k_pos = (global_indices(layout, r, W, total) for r in (q_rank, kv_rank))
    pieces = [p for t in tiles for p in _sub_tiles(t, q_pos, k_pos, mask.mod)]
    full = _merge_full([t for t, keep in pieces if keep is None and t.full])
    rest = [(t, keep.to(device) if keep is not None else None) for t, keep in pieces if keep is not None or not t.full]
    return tuple([(t, None) for t in full] + rest)


def clear_caches() -> None:
    """Forget every cached tiling (after a test changes one of the module's constants)."""
    for cached in (step_tiles, visits, needed_steps):
        cached.cache_clear()
