"""The ring: every rank sends to rank+1 and receives from rank-1 of its group.

A hop may also skip ahead (offset s: send to rank+s, receive from rank-s), for schedules
that need only some ring steps (sliding windows): a block then goes straight to the rank
that needs it instead of being relayed through ranks that would skip it.

A hop is posted as one batched isend/irecv *before* the compute it should hide behind
and waited *after* it. Every rank issues the same operations in the same order, so the
ring works on gloo and NCCL alike, inside any sub-group, with no barriers.
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.distributed as dist

# Hops posted per stream ("kv", "dkv") since the last reset: the tests assert that a
# W-rank forward makes W-1 kv hops and a backward W-1 kv hops plus W dkv hops (and
# fewer where a window or packed documents leave ring steps unneeded).
HOP_COUNTS: Counter = Counter()
_STREAM_TAGS: dict[str, int] = {}


class Ring:
    """Point-to-point neighbours of this rank within `group` (None: the default group)."""

    def __init__(self, group=None):
        self.group = group
        if dist.is_available() and dist.is_initialized():
            self.rank = dist.get_rank(group)
            if self.rank < 0:
                raise ValueError(
                    f"this process (global rank {dist.get_rank()}) is not a member of the given group; "
                    "call ring_attention only on the ranks of the group you pass"
                )
            self.world_size = dist.get_world_size(group)
        else:
            self.rank, self.world_size = 0, 1
        if self.world_size > 1:
            # P2P ops name peers by global rank, whatever the group.
            self._to_global = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
            self.next_peer = self.peer(1)
            self.prev_peer = self.peer(-1)

    def peer(self, offset: int) -> int:
        """Global rank of the group member `offset` places after this one (mod world size)."""
        return self._to_global((self.rank + offset) % self.world_size)

    def exchange(self, stream: str, send: list[torch.Tensor], recv: list[torch.Tensor], offset: int = 1) -> "Hop":
        """Post send[i] -> rank+offset and recv[i] <- rank-offset, all as one batch (one hop).

        Returns a handle. Each stream has its own tag, so a kv and a dkv hop in flight
        together never match each other's messages.
        """
        tag = _STREAM_TAGS.setdefault(stream, len(_STREAM_TAGS))
        to, frm = (self.next_peer, self.prev_peer) if offset == 1 else (self.peer(offset), self.peer(-offset))
        ops = []
        for s, r in zip(send, recv, strict=True):
            ops.append(dist.P2POp(dist.isend, s, to, self.group, tag))
            ops.append(dist.P2POp(dist.irecv, r, frm, self.group, tag))
        HOP_COUNTS[stream] += 1
        return Hop(dist.batch_isend_irecv(ops))


class Hop:
    def __init__(self, works):
        self.works = works

    def wait(self) -> None:
        for w in self.works:
            w.wait()
