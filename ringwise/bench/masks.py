"""Masks through the ring: packed documents with chunks, image groups, bidirectional windows and a
mask_mod, against plain causal attention, on W ranks, forward + backward.

Each mask's cost is set against its visible area: "time per visible pair / causal's" is 1.0 when
a mask costs exactly its share of causal's work (skipped tiles and hops are free, masked tiles
cost nothing extra). Its bytes are what each rank receives over the ring (K/V hops forward and
backward, float32 dK/dV accumulators backward), against what an all-gather design moves
(PyTorch context parallel: K and V all-gathered forward and again backward, dK/dV
reduce-scattered), which sends everything whatever the mask. Shapes are MagiAttention's varlen
benchmark scaled to a 2-core machine: documents of mixed lengths, Llama 4's chunk (8192) and
images of 256 tokens scaled by S / 65536.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

import ringwise
from ringwise.attention.tiles import Mask, key_bounds
from ringwise.attention.traffic import recording
from ringwise.testing.cluster import LocalCluster

from . import draw, public_args, write_results
from .common import fwd_bwd_step
from .flags import masks_flags as add_arguments  # noqa: F401 (defined in flags.py: the CLI needs no suite)
from .timing import median_time

DOC_SHARES = (0.25, 0.0625, 0.125, 0.03125, 0.375, 0.15625)  # of S: mixed lengths, summing to 1


def longformer(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """A mask_mod: the first 64 positions are global keys, the rest seen within 256 positions."""
    return (k_pos < 64) | (q_pos - k_pos <= 256)


def masks(seq: int) -> dict[str, dict]:
    """name -> ring_attention's mask options, for a global sequence of `seq` tokens."""
    lengths = [int(seq * f) for f in DOC_SHARES]
    lengths[-1] += seq - sum(lengths)
    docs = [0]
    for n in lengths:
        docs.append(docs[-1] + n)
    image = max(1, 256 * seq // 65536)
    groups = torch.full((seq,), -1, dtype=torch.long)
    for d, (a, b) in enumerate(zip(docs, docs[1:])):
        if b - a >= 4 * image:  # one image near the start of each long document
            groups[a + image : a + 2 * image] = d
    chunk = max(2, 8192 * seq // 65536)
    window = max(1, 4096 * seq // 65536)
    return {
        "causal": dict(causal=True),
        "documents": dict(causal=True, cu_seqlens=docs),
        "documents + chunks": dict(causal=True, cu_seqlens=docs, chunk=chunk),
        "documents + images": dict(causal=True, cu_seqlens=docs, group_ids=groups),
        "documents + bidirectional window": dict(causal=False, cu_seqlens=docs, window=(window, window)),
        "mask_mod (Longformer)": dict(causal=True, mask_mod=longformer),
    }


def visible_pairs(seq: int, options: dict) -> int:
    """The mask's visible (query, key) pairs, counted from its definition row block by row block."""
    from ringwise.attention.checks import chunked_bounds, group_spans

    docs = options.get("cu_seqlens")
    docs = chunked_bounds(None if docs is None else tuple(docs), options.get("chunk"), seq)
    ids = options.get("group_ids")
    spans = None if ids is None else group_spans(ids, seq, True, docs)[0]
    window = options.get("window")
    left, right = window if isinstance(window, tuple) else (window, None)
    total = 0
    keys = torch.arange(seq)
    for r0 in range(0, seq, 1024):
        pos = torch.arange(r0, min(seq, r0 + 1024))
        lo, hi = key_bounds(pos, Mask(options["causal"], docs, left, right, spans))
        seen = (keys[None, :] >= lo[:, None]) & (keys[None, :] <= hi[:, None])
        if options.get("mask_mod") is not None:
            seen &= options["mask_mod"](pos[:, None], keys[None, :])
        total += int(seen.sum())
    return total


def time_mask(name, seq, heads, kv_heads, head_dim, repeats, layout="zigzag"):
    """On each rank: forward+backward seconds (slowest rank, median) and the ring hops of one iteration."""
    options = masks(seq)[name]
    g = torch.Generator().manual_seed(0)
    shapes = [(1, seq, heads, head_dim), (1, seq, kv_heads, head_dim), (1, seq, kv_heads, head_dim)]
    q, k, v, dout = (ringwise.shard(torch.randn(s, generator=g), 1, layout) for s in shapes + shapes[:1])

    def attention(q, k, v):
        return ringwise.ring_attention(q, k, v, layout=layout, **options)

    fwd_bwd = fwd_bwd_step(attention, (q, k, v, dout))
    last: list = []

    def step():
        with recording() as traffic:
            fwd_bwd()
        last[:] = [traffic]

    return median_time(step, repeats), dict(last[0].hops)


QUICK = dict(masks_seq_len=1024, masks_repeats=1, masks_worlds=[2])


def run(args) -> dict:
    seq, H, Hk, D = args.masks_seq_len, args.masks_heads, args.masks_kv_heads, args.masks_head_dim
    names = list(masks(seq))
    area = {n: visible_pairs(seq, masks(seq)[n]) for n in names}
    rows = []
    with tqdm(total=len(names) * len(args.masks_worlds), desc="masks bench", unit="case") as bar:
        for W in args.masks_worlds:
            kv_bytes = 2 * (seq // W) * Hk * D * 4  # one rank's K and V, float32
            gather = 2 * (W - 1) * kv_bytes + (W - 1) * kv_bytes  # K, V forward and backward; dK, dV back
            with LocalCluster(W, threads_per_rank=1) as cluster:
                for n in names:
                    bar.set_postfix_str(f"W={W} {n}")
                    t, hops = cluster.run(time_mask, n, seq, H, Hk, D, args.masks_repeats, timeout=3600)[0]
                    ring = (hops.get("kv", 0) + hops.get("dkv", 0)) * kv_bytes  # dK/dV float32, as big as K/V
                    rows.append(
                        dict(
                            mask=n, world=W, seconds=t, visible=area[n], hops=hops, ring_bytes=ring, gather_bytes=gather
                        )
                    )
                    bar.update()
    for r in rows:
        causal = next(c for c in rows if c["mask"] == "causal" and c["world"] == r["world"])
        r["area_vs_causal"] = r["visible"] / causal["visible"]
        r["time_vs_causal"] = r["seconds"] / causal["seconds"]
        r["time_per_pair_vs_causal"] = r["time_vs_causal"] / r["area_vs_causal"]
        r["bytes_vs_gather"] = r["ring_bytes"] / r["gather_bytes"] if r["gather_bytes"] else 0.0
    lines = [
        f"Global sequence {seq} (documents {', '.join(str(int(seq * f)) for f in DOC_SHARES)} where packed), "
        f"{H} heads ({Hk} kv) x {D}, float32, forward+backward, zigzag, one thread a rank, median of "
        f"{args.masks_repeats}. Bytes: what one rank receives over the ring per iteration, against an "
        "all-gather of K/V (forward and backward) with a reduce-scatter of dK/dV.",
        "",
        "| W | mask | visible / causal | seconds | time / causal | time per visible pair / causal | "
        "ring hops (kv, dkv) | ring bytes / all-gather bytes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['world']} | {r['mask']} | {r['area_vs_causal']:.3f} | {r['seconds']:.3f} | "
            f"{r['time_vs_causal']:.3f} | {r['time_per_pair_vs_causal']:.2f} | "
            f"{r['hops'].get('kv', 0)}, {r['hops'].get('dkv', 0)} | {r['bytes_vs_gather']:.2f} |"
        )
    md = "\n".join(lines) + "\n"
    out = write_results(args.out, "masks", dict(args=public_args(args), rows=rows), md)
    W = max(args.masks_worlds)
    draw(
        "bars",
        names,
        {
            "time / causal": [r["time_vs_causal"] for r in rows if r["world"] == W],
            "visible pairs / causal": [r["area_vs_causal"] for r in rows if r["world"] == W],
        },
        out / "masks.png",
        ylabel="relative to plain causal",
        title=f"Masks through a {W}-rank ring, S={seq}",
    )
    print(md)
    return dict(rows=rows)
