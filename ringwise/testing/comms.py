"""Count the communication a piece of code makes: every collective and P2P call.

Tests and benchmarks assert exact communication counts (a W-rank forward makes W-1 hops;
an argument check costs one all_gather_object; a refused call sends nothing), in the style
of PyTorch context parallel's CommDebugMode. `count_comms()` wraps the collective and P2P
functions of the `torch.distributed` module while it is active:

    with count_comms() as comms:
        out = ringwise.ring_attention(q, k, v, causal=True)
    assert comms.counts["batch_isend_irecv"] == W - 1

Kinds are named as the torch functions ("all_gather_object", "all_to_all_single", "isend",
...); a `batch_isend_irecv` also counts its ops as "p2p_isend" / "p2p_irecv" (by
`P2POp.op`). The attention's tensor all-gathers (decode_attention's) count as
`ALL_GATHER_SINGLE`: torch's all_gather_single, or on a torch before 2.13 all_gather_into_tensor.
Only calls made through the module (`dist.all_reduce(...)`, as ringwise does) are seen; a
wrapped function that calls another through the module counts once (the outermost call).
Everything is restored on exit, also on an exception. Contexts nest: each active context
counts every call. Counting is per process (each rank counts its own calls).

The same context records what the attention reports of its own traffic
(ringwise.attention.traffic): `.hops` (ring hops per stream, "kv"/"dkv"), `.all_to_all`
(Ulysses exchanges per stream) and `.staged` (bytes the host transport copied), so one
context counts all communication, and nothing is left to reset between uses.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch.distributed as dist

from ringwise.attention.traffic import Traffic, recording

# Every public collective / P2P function of torch.distributed (those a given torch lacks are
# skipped), plus the deprecated private all-gather / reduce-scatter spellings.
KINDS = (
    "all_gather",
    "all_gather_coalesced",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_gather_single",
    "all_reduce",
    "all_reduce_coalesced",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "monitored_barrier",
    "batch_isend_irecv",
    "broadcast",
    "broadcast_object_list",
    "gather",
    "gather_object",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "reduce_scatter_single",
    "scatter",
    "scatter_object_list",
    "send",
    "recv",
    "isend",
    "irecv",
    "send_object_list",
    "recv_object_list",
    "_all_gather_base",
    "_reduce_scatter_base",
)

# The kind ringwise.attention.comm.all_gather_single counts as: torch's all_gather_single (2.13+), else its
# older name all_gather_into_tensor (which 2.13 deprecates)
ALL_GATHER_SINGLE = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"

T = TypeVar("T")


@dataclass(eq=False)
class CommCounts:
    """What one `count_comms()` context saw: kind -> number of calls, and the attention's traffic."""

    counts: Counter[str] = field(default_factory=Counter)
    traffic: Traffic = field(default_factory=Traffic)

    @property
    def hops(self) -> Counter[str]:
        """Ring hops per stream ("kv", "dkv")."""
        return self.traffic.hops

    @property
    def all_to_all(self) -> Counter[str]:
        """Ulysses all-to-alls per stream ("qkv", "out", "dout", "dqkv")."""
        return self.traffic.all_to_all

    @property
    def staged(self) -> Counter[str]:
        """Bytes the host transport staged, per direction ("to_host", "to_device")."""
        return self.traffic.staged

    @property
    def total(self) -> int:
        """Calls made (p2p_* ops inside a batch are parts of one call, not extra calls)."""
        return sum(n for kind, n in self.counts.items() if not kind.startswith("p2p_"))

    def __repr__(self) -> str:
        return f"CommCounts({dict(sorted(self.counts.items()))})"


_lock = threading.Lock()
_active: list[CommCounts] = []  # every open context, outermost first
_installed: dict[str, tuple[object, object]] = {}  # kind -> (the function that was there, our wrapper of it)
_state = threading.local()  # .depth: wrapped calls in progress on this thread
_WRAPPED = "__ringwise_counted__"  # a wrapper's attribute: the function it counts


def _p2p_kind(op: object) -> str:
    fn = getattr(op, "op", None)
    name = getattr(fn, "__name__", str(fn))
    return "p2p_irecv" if "recv" in name else "p2p_isend" if "send" in name else f"p2p_{name}"


def _wrap(kind: str, fn: Callable[..., T]) -> Callable[..., T]:
    @functools.wraps(fn)
    def counted(*args: Any, **kwargs: Any) -> T:  # fn's own arguments
        depth = getattr(_state, "depth", 0)
        if depth == 0:
            with _lock:
                sinks = list(_active)
            extra: Counter[str] = Counter()
            if kind == "batch_isend_irecv":
                ops = args[0] if args else kwargs.get("p2p_op_list", ())
                extra.update(_p2p_kind(op) for op in ops)
            for c in sinks:
                c.counts[kind] += 1
                c.counts.update(extra)
        _state.depth = depth + 1
        try:
            return fn(*args, **kwargs)
        finally:
            _state.depth = depth

    setattr(counted, _WRAPPED, fn)
    return counted


def _unwrap(op: T) -> T:
    fn: T = getattr(op, _WRAPPED, op)
    return fn


class _P2POp(dist.P2POp):
    """dist.P2POp while counting: holds the real isend / irecv (torch checks `op.op is isend`),
    whichever of ours or torch's the caller passed."""

    def __new__(cls, op: Callable[..., object], *args: Any, **kwargs: Any) -> _P2POp:  # P2POp's own arguments
        p2p: _P2POp = super().__new__(cls, _unwrap(op), *args, **kwargs)
        return p2p

    def __init__(self, op: Callable[..., object], *args: Any, **kwargs: Any) -> None:
        super().__init__(_unwrap(op), *args, **kwargs)


_P2POp.__name__ = _P2POp.__qualname__ = "P2POp"


def _install() -> None:
    for kind in KINDS:
        fn = getattr(dist, kind, None)
        if fn is None or not callable(fn):
            continue
        _installed[kind] = (fn, _wrap(kind, fn))
        setattr(dist, kind, _installed[kind][1])
    _installed["P2POp"] = (dist.P2POp, _P2POp)
    dist.P2POp = _P2POp  # type: ignore[misc]  # torch's class swapped for the counting one, while counting


def _uninstall() -> None:
    for kind, (fn, wrapper) in _installed.items():
        if getattr(dist, kind, None) is wrapper:  # something patched over us (a test's monkeypatch): leave it
            setattr(dist, kind, fn)
    _installed.clear()


@contextlib.contextmanager
def count_comms() -> Iterator[CommCounts]:
    """Count the torch.distributed collective and P2P calls made while active, and the
    attention's own traffic; yields a CommCounts whose `.counts` (a Counter), `.hops`,
    `.all_to_all` and `.staged` fill in as calls are made."""
    with recording() as traffic:
        c = CommCounts(traffic=traffic)
        with _lock:
            if not _active:
                _install()
            _active.append(c)
        try:
            yield c
        finally:
            with _lock:
                _active.remove(c)
                if not _active:
                    _uninstall()
