"""Which parts of a (query shard, key/value shard) pair need computing, and how.

Under a causal mask a pair of segments is *full* (every key precedes every query),
*empty* (every key follows every query: skipped, never computed) or *partial*. For the
three layouts a partial pair is always one of two square shapes that the fused kernels
run natively with ``is_causal=True``:

* diagonal: same global positions, key j visible to query i iff j <= i;
* shifted (striped layout, key rank after query rank): j visible iff j < i, which is
  the diagonal shape on q[1:] x k[:-1].

Adjacent full tiles are merged so that each ring step is as few kernel calls as possible
(e.g. zigzag's off-diagonal steps are one call each).
"""
from __future__ import annotations

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


def segment_pair_tiles(q: Segment, k: Segment, causal: bool) -> list[Tile]:
    """The tiles for one query segment against one key segment."""
    full = [Tile(q.local_start, q.length, k.local_start, k.length, False)]
    if not causal or k.global_last <= q.global_start:
        return full
    if k.global_start > q.global_last:
        return []
    if q.stride == k.stride and q.length == k.length:
        # key j visible to query i  iff  (j - i) * stride <= q.global_start - k.global_start
        offset = (q.global_start - k.global_start) // q.stride
        if offset == 0:
            return [Tile(q.local_start, q.length, k.local_start, k.length, True)]
        if offset == -1:
            n = q.length - 1
            return [Tile(q.local_start + 1, n, k.local_start, n, True)] if n else []
    raise ValueError(f"no causal tiling for query segment {q} against key segment {k}")


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
def step_tiles(layout: str, q_rank: int, kv_rank: int, world_size: int, local_len: int, causal: bool) -> tuple[Tile, ...]:
    """Tiles for q_rank's queries against the key/value shard that kv_rank owns."""
    qs = segments(layout, q_rank, world_size, local_len)
    ks = segments(layout, kv_rank, world_size, local_len)
    tiles = [t for a in qs for b in ks for t in segment_pair_tiles(a, b, causal)]
    return tuple(_merge_full(tiles))
