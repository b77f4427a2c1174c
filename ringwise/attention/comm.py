"""The ring: every rank sends to rank+1 and receives from rank-1 of its group.

A hop may also skip ahead (offset s: send to rank+s, receive from rank-s), for schedules
that need only some ring steps (sliding windows): a block then goes straight to the rank
that needs it instead of being relayed through ranks that would skip it.

A hop is posted as one batched isend/irecv *before* the compute it should hide behind
and waited *after* it. Every rank issues the same operations in the same order, so the
ring works on gloo and NCCL alike, inside any sub-group, with no barriers.

Every hop goes through the ring's transport: "direct" hands the tensors themselves to the
process group; "host" stages them through (pinned) host buffers and sends those over gloo,
so that several ranks can share one GPU (NCCL refuses two ranks on one device). Both make
the same hops in the same order.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Optional, TypeVar, Union, cast

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from .traffic import report

T = TypeVar("T")

if TYPE_CHECKING:
    from torch.distributed import Work

    # dist.isend or dist.irecv, as a P2POp calls it: (tensor, peer, group, tag) -> its work
    P2PFunction = Callable[[torch.Tensor, Optional[int], Optional[ProcessGroup], int], Optional[Work]]
    # (dist.isend or dist.irecv, tensor, global peer rank): one op of a hop
    P2P = tuple[P2PFunction, torch.Tensor, int]

# Each stream's P2P tag, the same on every rank, so that a kv and a dkv hop in flight together
# never match each other's messages. Hops and host-staged bytes are reported to traffic.py
# (a W-rank forward makes W-1 kv hops, a backward W-1 kv hops plus W dkv hops, fewer where a
# window or packed documents leave ring steps unneeded).
STREAM_TAGS = {"kv": 0, "dkv": 1}

TRANSPORT_ENV = "RINGWISE_TRANSPORT"
TRANSPORTS = ("auto", "direct", "host")


def _cuda_on_gloo(group: Optional[ProcessGroup]) -> bool:
    """True if this group would carry CUDA tensors over gloo (which has no CUDA P2P)."""
    backend = str(dist.get_backend(group)).lower()
    if ":" not in backend:  # one backend for every device
        return backend == "gloo"
    per_device = dict(part.split(":", 1) for part in backend.split(","))
    return per_device.get("cuda", "gloo") == "gloo"


def resolve_transport(transport: str | None) -> str:
    """The transport argument, else $RINGWISE_TRANSPORT, else "auto"; checked."""
    name = transport if transport is not None else os.environ.get(TRANSPORT_ENV, "auto")
    if name not in TRANSPORTS:
        where = "transport" if transport is not None else f"${TRANSPORT_ENV}"
        raise ValueError(
            f"{where}={name!r} is unknown; use one of {', '.join(TRANSPORTS)} "
            "(host: stage through host memory over gloo, for several ranks on one GPU)"
        )
    return name


def post_direct(ops: Sequence[P2P], group: Optional[ProcessGroup], tag: int) -> Hop:
    """ops: (dist.isend or dist.irecv, tensor, global peer rank); all posted as one batch."""
    return Hop(dist.batch_isend_irecv([dist.P2POp(op, t, peer, group, tag) for op, t, peer in ops]))


def _host_buffer(t: torch.Tensor) -> torch.Tensor:
    # A new pinned buffer per hop: torch's caching host allocator recycles them, and no
    # buffer is shared between hops in flight.
    return torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)


def stages_through_host(
    transport: str, cuda_on_gloo: Union[bool, Callable[[], bool]], tensors: Iterable[torch.Tensor]
) -> bool:
    """The one rule for hops and all-to-alls alike: "host" always stages, "auto" stages CUDA
    tensors that the group would carry over gloo, "direct" never stages. cuda_on_gloo: the
    group's _cuda_on_gloo, or a callable giving it (asked only for CUDA tensors under "auto")."""
    if transport == "host":
        return True
    if transport != "auto" or not any(t.is_cuda for t in tensors):
        return False
    return cuda_on_gloo() if callable(cuda_on_gloo) else cuda_on_gloo


def _to_host(t: torch.Tensor) -> torch.Tensor:
    buf = _host_buffer(t)
    buf.copy_(t)
    report("staged", "to_host", t.numel() * t.element_size())
    return buf


def _from_host(t: torch.Tensor, buf: torch.Tensor) -> None:
    t.copy_(buf)
    report("staged", "to_device", t.numel() * t.element_size())


def all_to_all_bytes(send: torch.Tensor, group: Optional[ProcessGroup], transport: str) -> torch.Tensor:
    """One all_to_all_single of a (U, n) byte buffer over the transport (Ulysses' exchanges)."""
    if not stages_through_host(transport, lambda: _cuda_on_gloo(group), [send]):
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=group)
        return recv
    host_send = _to_host(send)
    host_recv = torch.empty_like(host_send)
    dist.all_to_all_single(host_recv, host_send, group=group)
    recv = torch.empty_like(send)
    _from_host(recv, host_recv)
    return recv


def all_gather_single(output: torch.Tensor, tensor: torch.Tensor, group: Optional[ProcessGroup] = None) -> None:
    """Every rank's `tensor` into `output` (world_size x its numel, in group rank order), blocking:
    torch's all_gather_single, or on a torch before 2.13 its older name all_gather_into_tensor,
    which 2.13 deprecates with a FutureWarning on every call. Looked up on the module at each
    call (count_comms wraps the module's functions)."""
    if hasattr(dist, "all_gather_single"):
        dist.all_gather_single(output, tensor, group=group)
    else:
        dist.all_gather_into_tensor(output, tensor, group=group)


def all_gather_objects(obj: T, group: Optional[ProcessGroup] = None) -> list[T]:
    """Every rank's `obj` (picklable; each rank sends one of the same kind), in group rank order:
    one all_gather_object."""
    parts: list[object] = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, obj, group=group)
    return cast("list[T]", parts)  # filled by the gather, one T from every rank


def post_host_staged(ops: Sequence[P2P], group: Optional[ProcessGroup], tag: int) -> Hop:
    """Like post_direct, through host buffers: sends are copied to host before posting (a
    blocking copy, so the device data is there when gloo reads it); receives land in host
    buffers and are copied into their tensors by Hop.wait(). Runs with CPU tensors too."""
    staged_ops: list[P2P] = []
    unstage: list[tuple[torch.Tensor, torch.Tensor]] = []
    for op, t, peer in ops:
        if op is dist.isend:
            buf = _to_host(t)
        else:
            buf = _host_buffer(t)
            unstage.append((t, buf))
        staged_ops.append((op, buf, peer))
    hop = post_direct(staged_ops, group, tag)
    hop.unstage = unstage
    return hop


class Ring:
    """Point-to-point neighbours of this rank within `group` (None: the default group)."""

    def __init__(self, group: Optional[ProcessGroup] = None, transport: str | None = None) -> None:
        """transport: "direct", "host" or "auto" (None: $RINGWISE_TRANSPORT, default "auto");
        auto stages CUDA tensors through host memory exactly when the group carries them
        over gloo, and sends everything else directly."""
        self.group = group
        self.transport = resolve_transport(transport)
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
            self._to_global: Callable[[int], int] = (
                (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
            )
            self.next_peer = self.peer(1)
            self.prev_peer = self.peer(-1)
            self._cuda_on_gloo: Optional[bool] = None  # the group's backend, read once (not on every hop)

    def _carries_cuda_on_gloo(self) -> bool:
        if self._cuda_on_gloo is None:
            self._cuda_on_gloo = _cuda_on_gloo(self.group)
        return self._cuda_on_gloo

    def post(self, ops: Sequence[P2P], tag: int) -> Hop:
        """Post (dist.isend/dist.irecv, tensor, global peer) ops as one hop over the transport."""
        host = stages_through_host(self.transport, self._carries_cuda_on_gloo, [t for _, t, _ in ops])
        return (post_host_staged if host else post_direct)(ops, self.group, tag)

    def peer(self, offset: int) -> int:
        """Global rank of the group member `offset` places after this one (mod world size)."""
        return self._to_global((self.rank + offset) % self.world_size)

    def exchange(self, stream: str, send: Sequence[torch.Tensor], recv: Sequence[torch.Tensor], offset: int = 1) -> Hop:
        """Post send[i] -> rank+offset and recv[i] <- rank-offset, all as one batch (one hop).

        Returns a handle. Each stream has its own tag (STREAM_TAGS), so a kv and a dkv hop in
        flight together never match each other's messages.
        """
        tag = STREAM_TAGS[stream]
        to, frm = (self.next_peer, self.prev_peer) if offset == 1 else (self.peer(offset), self.peer(-offset))
        ops: list[P2P] = []
        for s, r in zip(send, recv, strict=True):
            ops.append((dist.isend, s, to))
            ops.append((dist.irecv, r, frm))
        report("hops", stream)
        return self.post(ops, tag)


class Hop:
    """A posted batch of P2P ops: wait() waits for them (and copies host-staged receives back)."""

    def __init__(self, works: list[Work], unstage: Sequence[tuple[torch.Tensor, torch.Tensor]] = ()) -> None:
        self.works = works
        self.unstage = unstage  # (tensor, host buffer) pairs to copy back after the receives

    def wait(self) -> None:
        for w in self.works:
            w.wait()
        for t, buf in self.unstage:
            _from_host(t, buf)
        self.unstage = ()
