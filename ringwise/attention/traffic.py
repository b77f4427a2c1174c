"""The attention's own traffic, counted only while someone records it.

The ring (comm.Ring.exchange), the host transport (comm) and the Ulysses exchanges (ulysses)
report what they send through `report`; each open `recording()` adds it up. Nothing is kept
when nobody records, so there is no module-level tally for a test or a benchmark to reset:
a count is what happened inside its `with` block. Counting is per process (each rank counts
its own traffic); recordings nest (each open one counts everything).

torch.distributed's calls themselves (gathers, batches of P2P ops) are counted by
ringwise.testing.comms.count_comms, which opens a recording too, so one context sees both.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass(eq=False)
class Traffic:
    """What one `recording()` saw.

    hops: ring hops per stream ("kv" forward and backward, "dkv" backward);
    all_to_all: Ulysses all-to-alls per stream ("qkv", "out" forward; "dout", "dqkv" backward);
    staged: bytes the host transport copied, per direction ("to_host", "to_device").
    """

    hops: Counter[str] = field(default_factory=Counter)
    all_to_all: Counter[str] = field(default_factory=Counter)
    staged: Counter[str] = field(default_factory=Counter)


_KINDS = ("hops", "all_to_all", "staged")
_lock = threading.Lock()
_recordings: list[Traffic] = []  # the open recordings (not counts: each holds its own)


def report(kind: str, key: str, n: int = 1) -> None:
    """Add n to `key` of `kind` ("hops", "all_to_all" or "staged") in every open recording."""
    if kind not in _KINDS:
        raise ValueError(f"traffic kind {kind!r} is unknown; use one of {', '.join(_KINDS)}")
    if not _recordings:  # the common case: nobody listens, nothing to do
        return
    with _lock:
        listeners = list(_recordings)
    for t in listeners:
        getattr(t, kind)[key] += n


@contextlib.contextmanager
def recording() -> Iterator[Traffic]:
    """Count the attention's traffic while active; yields a Traffic that fills in as it happens."""
    t = Traffic()
    with _lock:
        _recordings.append(t)
    try:
        yield t
    finally:
        with _lock:
            _recordings.remove(t)
