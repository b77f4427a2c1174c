"""Measurements that more than one benchmark suite takes, so that no suite imports another.

* the SDPA yardstick: whole-sequence fused SDPA forward+backward in one process, and each
  row's SDPA time / its own (attention, ulysses, peers);
* `LoopbackRing`: one rank of a ring alone, every hop a local copy (compute, overlap);
* `step_memory`: one training step's peak memory and time on a rank (scaling, context, memory).

Dtype names map to torch dtypes through ringwise.train.config.DTYPES, as in every command.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from ringwise.attention.comm import Hop, Ring
from ringwise.attention.seqshard import SeqShard
from ringwise.model import Transformer, model_config
from ringwise.testing.cluster import LocalCluster
from ringwise.testing.memory import PeakMemory

from .timing import median_time

# ---------------------------------------------------------------- the SDPA yardstick


def random_inputs(batch, seq, heads, head_dim, seed=0):
    """q, k, v and the output gradient, (batch, seq, heads, head_dim) each, the same for every caller."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, seq, heads, head_dim, generator=g) for _ in range(4)]


def fwd_bwd_step(attention, inputs):
    """fn() for the timer: forward+backward of attention(q, k, v) on fresh leaves."""
    q, k, v, dout = inputs

    def step():
        qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
        attention(qg, kg, vg).backward(dout)

    return step


def time_sdpa(batch, seq, heads, head_dim, causal, repeats):
    """Whole-sequence fused SDPA forward+backward; seconds per iteration (median)."""
    inputs = [x.transpose(1, 2) for x in random_inputs(batch, seq, heads, head_dim)]
    sdpa = functools.partial(torch.nn.functional.scaled_dot_product_attention, is_causal=causal)
    return median_time(fwd_bwd_step(sdpa, inputs), repeats)


def sdpa_seconds(batch, seq, heads, head_dim, threads, repeats, bar=None) -> dict[bool, float]:
    """The yardstick, {causal: seconds} for full then causal: whole-sequence SDPA
    forward+backward in one process with all the threads."""
    seconds = {}
    with LocalCluster(1, threads_per_rank=threads) as single:
        for causal in (False, True):
            if bar is not None:
                bar.set_postfix_str(f"sdpa causal={causal}")
            seconds[causal] = single.run(time_sdpa, batch, seq, heads, head_dim, causal, repeats, timeout=3600)[0]
            if bar is not None:
                bar.update()
    return seconds


def add_sdpa_ratios(rows: list[dict]) -> None:
    """Each row's SDPA time / its time, from the rows of impl "sdpa" (1.0: sharding costs
    nothing over the fused kernel)."""
    sdpa = {r["causal"]: r["seconds"] for r in rows if r["impl"] == "sdpa"}
    for r in rows:
        r["sdpa_over_this"] = sdpa[r["causal"]] / r["seconds"]


# ---------------------------------------------------------------- one rank alone


class LoopbackRing(Ring):
    """Rank `rank` of a `world_size`-rank ring, alone: each hop's receive buffer gets a copy
    of the tensor sent with it (same shapes, finite values), and nothing leaves the process.
    The ring code runs rank's real schedule; only the visiting blocks' values are its own."""

    def __init__(self, rank: int, world_size: int):  # no process group: Ring.__init__ would read one
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a ring of {world_size}")
        self.group, self.transport = None, "direct"
        self.rank, self.world_size = rank, world_size
        self._to_global = lambda r: r
        self.next_peer, self.prev_peer = self.peer(1), self.peer(-1)

    def post(self, ops, tag):
        sends = [t for op, t, _ in ops if op is dist.isend]
        recvs = [t for op, t, _ in ops if op is dist.irecv]
        for s, r in zip(sends, recvs, strict=True):
            r.copy_(s)
        return Hop([])


# ---------------------------------------------------------------- one training step


def step_memory(
    preset: str,
    global_len: int,
    layout: str,
    batch: int,
    chunk: int,
    checkpoint_layers: bool = False,
    overrides: dict | None = None,
):
    """Peak bytes on this rank and the slowest rank's seconds of one training forward+backward (after a warm-up)."""
    torch.manual_seed(0)
    cfg = model_config(
        preset, ffn_chunk=chunk, loss_chunk=chunk, checkpoint_layers=checkpoint_layers, **(overrides or {})
    )
    model = Transformer(cfg)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (batch, global_len + 1), generator=g)
    seq = SeqShard(layout)
    ids, labels = (seq.shard(t) for t in (tokens[:, :-1], tokens[:, 1:]))
    pos = seq.positions(global_len)

    peak = 0

    def step():
        nonlocal peak
        with PeakMemory() as mem:
            loss, n = model(ids, pos, labels, **seq.ring_kwargs())
            (loss / (batch * global_len)).backward()
        model.zero_grad(set_to_none=False)
        peak = mem.peak_bytes

    # the warm-up allocates the gradients and connection buffers; the slowest rank's time
    seconds = median_time(step, 1)
    return peak, seconds
