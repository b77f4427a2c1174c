"""Which examples form the global batch at a step, and how they stack into tensors.

Every example is a pure function of ``(seed, index)`` and every batch a pure function of
``(seed, step)``: nothing depends on worker count, world size or the order in which
examples are asked for, so a resumed or re-sharded run sees exactly the same data.
"""

from __future__ import annotations

import math
import random
from functools import lru_cache
from typing import Any, Sequence

import torch


def _rng(*parts) -> random.Random:
    """A ``random.Random`` keyed by ``parts``.

    Seeding with a string hashes it with SHA-512 (Python's seed version 2), so the
    stream is stable across processes, platforms and Python's hash randomisation, and
    distinct keys such as (seed, index) never collide the way ``seed * K + index`` can.
    """
    return random.Random("ringwise/" + "/".join(str(p) for p in parts))


_PERM_LIMIT = 1 << 22  # above this, an O(1)-memory affine permutation replaces randperm


@lru_cache(maxsize=4)
def _epoch_perm(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(_rng("perm", seed, epoch).getrandbits(63))
    return torch.randperm(n, generator=g)


def _epoch_affine(n: int, seed: int, epoch: int) -> tuple[int, int]:
    rng = _rng("affine", seed, epoch)
    while True:
        a = rng.randrange(1, n) if n > 1 else 1
        if math.gcd(a, n) == 1:
            return a, rng.randrange(n)


def sample_indices(step: int, global_batch: int, dataset_len: int | None, seed: int = 0) -> list[int]:
    """Dataset indices of the global batch at training ``step``, a pure function of its args.

    Samples are consumed as one stream, ``global_batch`` per step; stream position ``p``
    belongs to epoch ``p // dataset_len`` and maps through that epoch's seeded shuffle,
    so each epoch is a permutation of the dataset and resuming at step k replays exactly
    the batches an uninterrupted run would have seen (a batch may straddle two epochs).
    Datasets larger than 2**22 use a seeded affine permutation ``(a*p + b) mod n``
    instead of materialising one.  ``dataset_len=None`` means an unbounded i.i.d.
    dataset (e.g. ``RetrievalDataset``) and returns the stream positions themselves.

    Split the returned list across data-parallel replicas as you like; sequence-parallel
    ranks of one replica must all use the same indices.
    """
    if step < 0 or global_batch < 1:
        raise ValueError(f"need step >= 0 and global_batch >= 1, got step={step}, global_batch={global_batch}")
    positions = range(step * global_batch, (step + 1) * global_batch)
    if dataset_len is None:
        return list(positions)
    if dataset_len < 1:
        raise ValueError(f"dataset_len must be >= 1 or None, got {dataset_len}")
    out = []
    for p in positions:
        epoch, i = divmod(p, dataset_len)
        if dataset_len <= _PERM_LIMIT:
            out.append(int(_epoch_perm(dataset_len, seed, epoch)[i]))
        else:
            a, b = _epoch_affine(dataset_len, seed, epoch)
            out.append((a * i + b) % dataset_len)
    return out


def collate(examples: Sequence[dict]) -> dict:
    """Stack example dicts into a batch: tensors -> ``[batch, ...]``, numbers and tuples of
    numbers (``answer_span``, ``depth``) -> tensors, anything else -> list."""
    if not examples:
        raise ValueError("collate needs at least one example")
    batch: dict[str, Any] = {}
    for key in examples[0]:
        vals = [ex[key] for ex in examples]
        if isinstance(vals[0], torch.Tensor):
            batch[key] = torch.stack(vals)
        elif isinstance(vals[0], (int, float, tuple, list)):
            batch[key] = torch.tensor(vals)
        else:
            batch[key] = vals
    return batch
