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

Adjacent full tiles are merged so that each ring step is as few kernel calls as possible
(e.g. zigzag's off-diagonal steps are one call each). `needed_steps` tells the ring which
steps any rank needs at all, so hops that would only carry skipped blocks are never sent.
Both are cached per argument tuple: pure memoization (their result depends on the arguments
and the module constant MIN_FUSED_WINDOW alone), so nothing needs clearing unless a test
changes that constant.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Union

from .layout import Segment, segments

# Pieces of a segment pair, (q0, q1, k0, k1, mask) in local indices: _causal_tiles' mask says causal
# or not; a Piece's is its Kind, "full", "causal", "anti" or a band (lo, hi) (see Tile).
CausalPiece = tuple[int, int, int, int, bool]
Kind = Union[Literal["full", "causal", "anti"], tuple[int, int]]
Piece = tuple[int, int, int, int, Kind]


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

    @property
    def full(self) -> bool:
        return not (self.causal or self.anti) and self.band is None

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
def step_tiles(
    layout: str,
    q_rank: int,
    kv_rank: int,
    world_size: int,
    local_len: int,
    causal: bool,
    docs: tuple[int, ...] | None = None,
    window: int | None = None,
) -> tuple[Tile, ...]:
    """Tiles for q_rank's queries against the key/value shard that kv_rank owns."""
    qs = segments(layout, q_rank, world_size, local_len)
    ks = segments(layout, kv_rank, world_size, local_len)
    tiles = [t for a in qs for b in ks for t in segment_pair_tiles(a, b, causal, docs, window)]
    return tuple(_merge_full(tiles))


@lru_cache(maxsize=1024)
def needed_steps(
    layout: str,
    world_size: int,
    local_len: int,
    causal: bool,
    docs: tuple[int, ...] | None = None,
    window: int | None = None,
) -> tuple[int, ...]:
    """Ring steps s (rank r visits the shard of rank (r - s) mod W) that some rank has tiles for.

    A function of its arguments alone, so every rank derives the same schedule. Step 0
    (the own shard) is always in it: the diagonal is always visible.
    """
    W = world_size
    need = {
        s for s in range(W) for r in range(W) if step_tiles(layout, r, (r - s) % W, W, local_len, causal, docs, window)
    }
    return tuple(sorted(need | {0}))
