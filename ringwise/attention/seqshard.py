"""`SeqShard`: how one job cuts its sequences, said once.

A sequence-parallel job passes the same (layout, ring group, ulysses group) to `shard`,
`positions`, `unshard`, `pad_to_multiple` and `ring_attention`, and shifts its labels on the
global sequence before sharding them. Writing that per call site lets one of them drift
(another group, another layout, labels shifted after sharding, which crosses shard
boundaries wrongly). A `SeqShard` holds the three once; its methods are the layout.py
functions with those arguments filled in, and `ring_kwargs()` gives the same to
`ring_attention` (or to `ringwise.model.Transformer`). On a (ulysses x ring) mesh that is
not the whole default group (data-parallel replicas of it), `mesh_group` names the group of
exactly its ranks, where ring_attention's verdict gathers.

Torch, layout.py and checks.py only: nothing above `ringwise.attention` is imported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, TypedDict, Union

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup
from torch.types import Device

from . import layout as _layout
from .checks import parse_bounds

IGNORE_INDEX = -100  # labels the loss skips (cross_entropy's default); ringwise.model re-exports it


class RingKwargs(TypedDict, total=False):
    """ring_attention's sharding keywords, as SeqShard.ring_kwargs gives them (mesh_group where one is set)."""

    layout: str
    group: Optional[ProcessGroup]
    ulysses_group: Optional[ProcessGroup]
    mesh_group: Optional[ProcessGroup]


class _Shards(TypedDict):
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor


class ShardedBatch(_Shards, total=False):
    """What SeqShard.shard_batch gives: this rank's input_ids, position_ids and labels, and the global
    document bounds (cu_seqlens) where documents were given."""

    cu_seqlens: list[int]


@dataclass(frozen=True)
class SeqShard:
    """The sharding of a sequence over a ring `group` (None: the default group), each ring
    shard cut into contiguous pieces over `ulysses_group` (None: no Ulysses); `mesh_group`:
    the group of exactly the (ulysses x ring) mesh's ranks (None: the default group).

    Sizes and ranks are read from the groups when asked, so a SeqShard may be made before
    the process group is initialised; without one it is a single piece (world 1).
    """

    layout: str = "zigzag"
    group: Optional[ProcessGroup] = None
    ulysses_group: Optional[ProcessGroup] = None
    mesh_group: Optional[ProcessGroup] = None

    def __post_init__(self) -> None:
        _layout.check_layout(self.layout)

    # -- sizes -----------------------------------------------------------------------------
    @property
    def ring_size(self) -> int:
        return _layout._world(self.group)[1]

    @property
    def ulysses_size(self) -> int:
        return _layout._ulysses_world(self.ulysses_group)[1]

    @property
    def world(self) -> int:
        """Number of pieces the sequence is cut into: ring size x ulysses size."""
        return self.ring_size * self.ulysses_size

    @property
    def unit(self) -> int:
        """A global length must be a multiple of this to be split (see `pad`)."""
        return _layout.split_unit(self.layout, self.ring_size, self.ulysses_size)

    # -- tensors ---------------------------------------------------------------------------
    def shard(self, x: torch.Tensor, dim: int = 1, pad: bool = False) -> torch.Tensor:
        """This rank's piece of a global tensor every rank holds whole (pad=True pads it first with 0)."""
        return _layout.shard(x, dim, self.layout, self.group, pad=pad, ulysses_group=self.ulysses_group)

    def unshard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The global tensor on every rank, gathered from the pieces (collective: every rank calls it)."""
        return _layout.unshard(x, dim, self.layout, self.group, ulysses_group=self.ulysses_group)

    def positions(self, global_len: int, device: Device = None) -> torch.Tensor:
        """Global position of each local token (int64), for rotary embeddings and masks."""
        return _layout.positions(global_len, self.layout, self.group, device=device, ulysses_group=self.ulysses_group)

    def pad_len(self, n: int) -> int:
        """How many tokens a global length n lacks to be split (0 when it already can)."""
        return (-n) % self.unit

    def pad(self, x: torch.Tensor, dim: int = 1, value: float = 0) -> tuple[torch.Tensor, int]:
        """x padded with `value` at the end of `dim` so it can be split; (padded, n_pad).

        Trailing pads change nothing that real tokens see under a causal mask; as loss
        targets they must be IGNORE_INDEX (`shard_batch(pad=True)` does that)."""
        return _layout.pad_to_multiple(x, dim, self.layout, self.group, value=value, ulysses_group=self.ulysses_group)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x in place over the pieces of the sequence (ring, then ulysses group), e.g. a
        token count; a no-op without an initialised process group. Collective."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(x, group=self.group)
            if self.ulysses_group is not None:
                dist.all_reduce(x, group=self.ulysses_group)
        return x

    # -- batches ---------------------------------------------------------------------------
    def shard_batch(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        cu_seqlens: Union[Sequence[int], torch.Tensor, None] = None,
        pad: bool = False,
        pad_id: int = 0,
    ) -> ShardedBatch:
        """A global (batch, seq) batch -> this rank's input_ids, position_ids and labels.

        Labels (default: input_ids) are shifted on the *global* sequence before sharding:
        each token's target is the next global token, and the last token of every document
        (cu_seqlens: global boundaries 0, len0, ..., seq; None: one document) gets
        IGNORE_INDEX, so no target crosses a document or a shard boundary. position_ids are
        the global positions of the local tokens, (batch, local_seq).

        pad=True first pads the sequence to a length the sharding splits: input_ids with
        pad_id, labels with IGNORE_INDEX. With cu_seqlens the pads form one more document,
        and the result's "cu_seqlens" says so. "cu_seqlens" (a list of ints, for
        ring_attention) is in the result only when cu_seqlens is given.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"shard_batch: input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        labels = input_ids if labels is None else labels
        if labels.shape != input_ids.shape:
            raise ValueError(
                f"shard_batch: labels shape {tuple(labels.shape)} must equal input_ids shape {tuple(input_ids.shape)}"
            )
        b, s = input_ids.shape
        bounds = None if cu_seqlens is None else self._bounds(cu_seqlens, s)
        shifted = torch.full_like(labels, IGNORE_INDEX)
        shifted[:, :-1] = labels[:, 1:]
        if bounds is not None:
            shifted[:, torch.as_tensor(bounds[1:], dtype=torch.long, device=labels.device) - 1] = IGNORE_INDEX
        if pad:
            input_ids, n_pad = self.pad(input_ids, 1, value=pad_id)
            shifted, _ = self.pad(shifted, 1, value=IGNORE_INDEX)
            if bounds is not None and n_pad:
                bounds = bounds + [s + n_pad]
            s += n_pad
        out: ShardedBatch = {
            "input_ids": self.shard(input_ids),
            "position_ids": self.positions(s, device=input_ids.device)[None].expand(b, -1),
            "labels": self.shard(shifted),
        }
        if bounds is not None:
            out["cu_seqlens"] = bounds
        return out

    @staticmethod
    def _bounds(cu_seqlens: object, seq: int) -> list[int]:
        """cu_seqlens as a list of ints, checked before anything is shifted or sent."""
        bounds, problem = parse_bounds(cu_seqlens, seq, what=f"sequence length {seq} (0, len0, len0+len1, ..., {seq})")
        if bounds is None:  # exactly when there is a problem
            raise ValueError(f"shard_batch: {problem}")
        return list(bounds)

    def ring_kwargs(self) -> RingKwargs:
        """layout=, group=, ulysses_group= (and mesh_group= where one is set) for ring_attention
        (and Transformer.hidden/forward)."""
        kw: RingKwargs = {"layout": self.layout, "group": self.group, "ulysses_group": self.ulysses_group}
        if self.mesh_group is not None:
            kw["mesh_group"] = self.mesh_group
        return kw
