"""How a global sequence is split across the W ranks of a ring.

Three layouts, all of equal-length local shards:

* ``contiguous``: rank r holds tokens [r*L, (r+1)*L). Simple, but under a causal mask
  rank W-1 does W times the work of rank 0.
* ``striped``: token t lives on rank t mod W (Striped Attention, Brandon et al.). Every
  rank sees an almost identical causal triangle.
* ``zigzag``: the sequence is cut into 2W chunks; rank r holds chunks r and 2W-1-r
  (Megatron/TE load balancing). Every rank does exactly the same causal work.

With Ulysses (see ulysses.py) the mesh is (ulysses x ring): the layout first splits the
sequence into R ring shards, then each ring shard is cut contiguously into U pieces, one
per rank of the ulysses group. The helpers below take that group as `ulysses_group`
(None: no Ulysses, a plain ring).

A local shard is described by *segments*: runs of local tokens whose global positions
form an arithmetic progression. The mask classifier works on segments, so it needs no
per-token tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup
from torch.types import Device

LAYOUTS = ("contiguous", "striped", "zigzag")


@dataclass(frozen=True)
class Segment:
    """Local tokens [local_start, local_start+length) sit at global positions
    global_start + i*stride for i in range(length)."""

    local_start: int
    length: int
    global_start: int
    stride: int

    @property
    def global_last(self) -> int:
        return self.global_start + (self.length - 1) * self.stride


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is unknown; use one of {', '.join(LAYOUTS)}")
    return layout


def split_unit(layout: str, world_size: int, ulysses_size: int = 1) -> int:
    """The global length must be a multiple of this for the layout to split it evenly
    over world_size ring ranks, each ring shard into ulysses_size equal pieces."""
    check_layout(layout)
    return (2 * world_size if layout == "zigzag" else world_size) * ulysses_size


def check_local_len(local_len: int, layout: str, world_size: int) -> None:
    """Zigzag holds two equal chunks per rank, so its local length must be even."""
    if layout == "zigzag" and world_size > 1 and local_len % 2:
        raise ValueError(
            f"layout='zigzag' needs an even local sequence length (two chunks per rank), got {local_len}; "
            "pad the global sequence with ringwise.pad_to_multiple(x, dim, layout='zigzag') "
            "or use layout='contiguous' or 'striped'"
        )


def segments(layout: str, rank: int, world_size: int, local_len: int) -> tuple[Segment, ...]:
    """The segments of rank's shard when every rank holds local_len tokens."""
    check_layout(layout)
    W, L = world_size, local_len
    if W == 1 or layout == "contiguous":
        return (Segment(0, L, rank * L, 1),)
    if layout == "striped":
        return (Segment(0, L, rank, W),)
    check_local_len(L, layout, W)
    c = L // 2
    return (Segment(0, c, rank * c, 1), Segment(c, c, (2 * W - 1 - rank) * c, 1))


def global_indices(
    layout: str, rank: int, world_size: int, global_len: int, ulysses_rank: int = 0, ulysses_size: int = 1
) -> torch.Tensor:
    """Global positions of rank's local tokens, in local order (int64).

    With ulysses_size U > 1: piece ulysses_rank of the U contiguous pieces of ring shard `rank`.
    """
    unit = split_unit(layout, world_size, ulysses_size)
    if global_len % unit:
        over = f"{world_size} ranks" if ulysses_size == 1 else f"{world_size} ring x {ulysses_size} ulysses ranks"
        raise ValueError(
            f"global length {global_len} cannot be split by layout={layout!r} over {over}: "
            f"it must be a multiple of {unit}; pad it with ringwise.pad_to_multiple(x, dim, layout={layout!r}) "
            "(with the same group and ulysses_group) or pass pad=True to ringwise.shard"
        )
    segs = segments(layout, rank, world_size, global_len // world_size)
    idx = torch.cat([s.global_start + s.stride * torch.arange(s.length) for s in segs])
    piece = len(idx) // ulysses_size
    return idx[ulysses_rank * piece : (ulysses_rank + 1) * piece]


def _world(group: Optional[ProcessGroup]) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the given group; pass a group that contains this rank")
    return rank, dist.get_world_size(group)


def _ulysses_world(ulysses_group: Optional[ProcessGroup]) -> tuple[int, int]:
    """(rank, size) in the ulysses group; None means no Ulysses (not the default group)."""
    return (0, 1) if ulysses_group is None else _world(ulysses_group)


def pad_to_multiple(
    x: torch.Tensor,
    dim: int,
    layout: str = "zigzag",
    group: Optional[ProcessGroup] = None,
    value: float = 0,
    ulysses_group: Optional[ProcessGroup] = None,
) -> tuple[torch.Tensor, int]:
    """Pad x at the end of `dim` so the layout can split it; returns (padded, n_pad).

    Trailing pads do not change what real tokens see under a causal mask; with a
    non-causal mask or as loss targets the caller must ignore them (labels = -100).
    """
    _, W = _world(group)
    unit = split_unit(layout, W, _ulysses_world(ulysses_group)[1])
    n_pad = (-x.shape[dim]) % unit
    if n_pad == 0:
        return x, 0
    shape = list(x.shape)
    shape[dim] = n_pad
    return torch.cat([x, x.new_full(shape, value)], dim=dim), n_pad


def positions(
    global_len: int,
    layout: str = "zigzag",
    group: Optional[ProcessGroup] = None,
    device: Device = None,
    ulysses_group: Optional[ProcessGroup] = None,
) -> torch.Tensor:
    """Global position of each local token (for rotary embeddings and masks)."""
    rank, W = _world(group)
    u, U = _ulysses_world(ulysses_group)
    return global_indices(layout, rank, W, global_len, u, U).to(device)


def shard(
    x: torch.Tensor,
    dim: int = 1,
    layout: str = "zigzag",
    group: Optional[ProcessGroup] = None,
    pad: bool = False,
    ulysses_group: Optional[ProcessGroup] = None,
) -> torch.Tensor:
    """This rank's part of a global tensor that every rank holds whole.

    group is the ring; ulysses_group (optional) cuts each ring shard into contiguous pieces.
    """
    if pad:
        x, _ = pad_to_multiple(x, dim, layout, group, ulysses_group=ulysses_group)
    rank, W = _world(group)
    u, U = _ulysses_world(ulysses_group)
    idx = global_indices(layout, rank, W, x.shape[dim], u, U).to(x.device)
    return x.index_select(dim, idx)


def unshard(
    x_local: torch.Tensor,
    dim: int = 1,
    layout: str = "zigzag",
    group: Optional[ProcessGroup] = None,
    ulysses_group: Optional[ProcessGroup] = None,
) -> torch.Tensor:
    """Reassemble the global tensor on every rank from the local shards (all-gathers:
    first the ulysses pieces into the ring shard, then the ring shards)."""
    _, U = _ulysses_world(ulysses_group)
    if U > 1:
        pieces = [torch.empty_like(x_local) for _ in range(U)]
        dist.all_gather(pieces, x_local.contiguous(), group=ulysses_group)
        x_local = torch.cat(pieces, dim=dim)
    rank, W = _world(group)
    if W == 1:
        return x_local
    parts = [torch.empty_like(x_local) for _ in range(W)]
    dist.all_gather(parts, x_local.contiguous(), group=group)
    global_len = x_local.shape[dim] * W
    gathered = torch.cat(parts, dim=dim)
    order = torch.cat([global_indices(layout, r, W, global_len) for r in range(W)])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(global_len)
    return gathered.index_select(dim, inverse.to(x_local.device))
