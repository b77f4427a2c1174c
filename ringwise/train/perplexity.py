"""Held-out perplexity by position: what a longer context bought (ringwise finetune's evaluation).

Each held-out window runs through the ring as in training (the same documents, the same
sharding), every token's loss is kept, and tokens are bucketed by their position inside
their own document (the context they can see: attention stays inside each document), in
buckets of --eval-bucket tokens up to the trained length. Sums and counts are reduced over
every rank, so the numbers are the whole held-out set's, whatever the mesh.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ..model import IGNORE_INDEX


@torch.no_grad()
def perplexity_by_position(run, eager_if) -> dict:
    """{bucket, starts, ppl, tokens, loss} over the first --eval-sequences held-out windows (at least
    one per data-parallel replica; every replica runs as many forwards, as FSDP's gathers need)."""
    cfg, mesh, data = run.cfg, run.mesh, run.held_out
    per_replica = max(1, min(cfg.eval_sequences, len(data)) // mesh.dp)
    width = cfg.eval_bucket
    n_buckets = -(-cfg.seq_len // width)
    sums = torch.zeros(n_buckets, dtype=torch.float64, device=run.device)
    counts = torch.zeros(n_buckets, dtype=torch.float64, device=run.device)
    seqshard = run.seqshard
    pos = seqshard.positions(cfg.seq_len, device=run.device)
    was_training = run.model.training
    run.model.eval()
    try:
        with eager_if(cfg.compile):
            for j in range(per_replica):
                ex = data[(j * mesh.dp + mesh.dp_rank) % len(data)]
                ids, labels, offset = (seqshard.shard(ex[k][None]).to(run.device)
                                       for k in ("input_ids", "labels", "doc_offset"))
                losses = run.model(ids, pos, labels, cu_seqlens=ex["cu_seqlens"], per_token=True,
                                   **seqshard.ring_kwargs())
                keep = labels != IGNORE_INDEX
                bucket = (offset // width).clamp_max(n_buckets - 1)[keep]
                sums.index_add_(0, bucket, losses[keep].double())
                counts.index_add_(0, bucket, torch.ones_like(bucket, dtype=torch.float64))
    finally:
        run.model.train(was_training)
    dist.all_reduce(sums)
    dist.all_reduce(counts)
    ppl = [math.exp(s / c) if c else None for s, c in zip(sums.tolist(), counts.tolist())]
    total = counts.sum().item()
    return dict(bucket=width, starts=[b * width for b in range(n_buckets)], ppl=ppl, tokens=counts.tolist(),
                loss=sums.sum().item() / total if total else None)
