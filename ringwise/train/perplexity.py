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
from .config import EVAL_SEQUENCES


@torch.no_grad()
def perplexity_by_position(run, eager_if) -> dict:
    """{bucket, starts, ppl, tokens, loss, sequences} over the first --eval-sequences held-out windows
    (default EVAL_SEQUENCES, or all where fewer), dealt round-robin to the data-parallel replicas; every
    replica runs as many forwards, as FSDP's gathers need, a replica short of a window repeating one
    that it does not count. `sequences` is how many were evaluated: exactly --eval-sequences (the
    flag's check refuses more than the held-out share holds)."""
    cfg, mesh, data = run.cfg, run.mesh, run.task.held_out
    n = min(cfg.eval_sequences or EVAL_SEQUENCES, len(data))
    per_replica = -(-n // mesh.dp)
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
                i = j * mesh.dp + mesh.dp_rank
                ex = data[i % n]
                ids, labels, offset = (
                    seqshard.shard(ex[k][None]).to(run.device) for k in ("input_ids", "labels", "doc_offset")
                )
                losses = run.model.token_losses(ids, pos, labels, ex["cu_seqlens"])
                keep = labels != IGNORE_INDEX
                if i >= n:  # a repeated window: run (the replicas' forwards pair up), not counted
                    keep = torch.zeros_like(keep)
                bucket = (offset // width).clamp_max(n_buckets - 1)[keep]
                sums.index_add_(0, bucket, losses[keep].double())
                counts.index_add_(0, bucket, torch.ones_like(bucket, dtype=torch.float64))
    finally:
        run.model.train(was_training)
    dist.all_reduce(sums)
    dist.all_reduce(counts)
    ppl = [math.exp(s / c) if c else None for s, c in zip(sums.tolist(), counts.tolist())]
    total = counts.sum().item()
    return dict(
        bucket=width,
        starts=[b * width for b in range(n_buckets)],
        ppl=ppl,
        tokens=counts.tolist(),
        loss=sums.sum().item() / total if total else None,
        sequences=n,
    )
