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

Adjacent full tiles are merged so that each ring step is as few kernel calls as possible
(e.g. zigzag's off-diagonal steps are one call each).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import lru_cache

from .layout import Segment, segments


@dataclass(frozen=True)
class Tile:
    """Attend local queries [q_start, q_start+q_len) to visiting keys [k_start, k_start+k_len)."""

    q_start: int
    q_len: int
    k_start: int
    k_len: int
    causal: bool

    @property
    def work(self) -> float:
        """Score entries computed, in units of q*k (a causal square counts half)."""
        return self.q_len * self.k_len * (0.5 if self.causal else 1.0)


def _causal_tiles(qa: int, qb: int, ka: int, kb: int, t: int) -> list[tuple[int, int, int, int, bool]]:
    """Queries i in [qa, qb) against keys j in [ka, kb) where key j is visible iff j <= i + t.

    In the aligned key coordinate b = j - t this is b <= i, which splits into at most a full
    block of keys before every query, one causal square on the overlap, and a full block
    of later queries against the overlap. Returns (q0, q1, k0, k1, causal) in local indices.
    """
    lo, hi = ka - t, kb - t  # keys in aligned coordinates
    oa, ob = max(lo, qa), min(hi, qb)
    tiles = []
    if lo < min(hi, qa):
        tiles.append((qa, qb, lo + t, min(hi, qa) + t, False))
    if oa < ob:
        tiles.append((oa, ob, oa + t, ob + t, True))
        if ob < qb:
            tiles.append((ob, qb, oa + t, ob + t, False))
    return tiles


def _index_range(seg: Segment, g0: int, g1: int) -> tuple[int, int]:
    """Indices i in [0, seg.length) whose global position lies in [g0, g1)."""
    lo = max(0, -(-(g0 - seg.global_start) // seg.stride))
    hi = min(seg.length, -(-(g1 - seg.global_start) // seg.stride))
    return lo, max(lo, hi)


def segment_pair_tiles(q: Segment, k: Segment, causal: bool, docs: tuple[int, ...] | None = None) -> list[Tile]:
    """The tiles for one query segment against one key segment.

    docs: global document boundaries (cu_seqlens: 0, ..., total); attention stays inside a
    document. Pairs that share no document give no tiles.
    """
    if causal and q.stride != k.stride:
        raise ValueError(f"no causal tiling for query segment {q} against key segment {k}")
    # key j visible to query i  iff  k.global_start + j*stride <= q.global_start + i*stride
    t = (q.global_start - k.global_start) // q.stride
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
        out += [Tile(q.local_start + a, b - a, k.local_start + c, d - c, cz) for a, b, c, d, cz in parts]
    return out


def _merge_full(tiles: list[Tile]) -> list[Tile]:
    """Fuse full tiles that share a query range and touch along keys, then the converse."""
    changed = True
    while changed:
        changed = False
        for i, a in enumerate(tiles):
            for j, b in enumerate(tiles):
                if i == j or a.causal or b.causal:
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
def step_tiles(layout: str, q_rank: int, kv_rank: int, world_size: int, local_len: int, causal: bool,
               docs: tuple[int, ...] | None = None) -> tuple[Tile, ...]:
    """Tiles for q_rank's queries against the key/value shard that kv_rank owns."""
    qs = segments(layout, q_rank, world_size, local_len)
    ks = segments(layout, kv_rank, world_size, local_len)
    tiles = [t for a in qs for b in ks for t in segment_pair_tiles(a, b, causal, docs)]
    return tuple(_merge_full(tiles))
