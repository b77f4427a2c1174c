"""Per-rank compute of the ring, transfers excluded: does splitting the sequence cost throughput?

One process plays rank r of a W-rank ring: `LoopbackRing` answers every hop with a
device-local copy of what the rank sends, so the rank runs exactly its own step sequence
(its tiles, kernel calls and float32 merges, forward and backward) with no transfer and no
other process. Its time T(r, W) against the whole sequence in one process on the same
kernel, T(1), gives the per-token rate ratio

    T(1) / (W * T(r, W))

1.0 means the split costs nothing; below it, smaller tiles, more kernel launches and more
merges cost throughput. A ring step lasts as long as its slowest rank, so the minimum over
ranks is the figure (issue 9's target: >= 0.9 at W = 8). The hop copies are timed with the
compute (c*d bytes per hop against c^2*d FLOPs), so the ratio errs low, never high.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from ringwise.attention.kernels import default_scale, select_kernel
from ringwise.attention.layout import check_layout, global_indices, split_unit
from ringwise.attention.ring import Engine, ring_backward, ring_forward
from ringwise.attention.tiles import Mask
from ringwise.train.config import DTYPES

from . import draw, public_args, write_results
from .common import LoopbackRing
from .flags import compute_flags as add_arguments  # noqa: F401 (defined in flags.py: the CLI needs no suite)
from .timing import median_time

TARGET = 0.9  # issue 9: the slowest rank at W = 8 keeps >= 90% of one process's per-token rate


def rank_inputs(whole, layout: str, rank: int, world: int):
    """Rank's shard (dim 1, in `layout`) of each whole (batch, seq, heads, dim) tensor."""
    idx = global_indices(layout, rank, world, whole[0].shape[1]).to(whole[0].device)
    return tuple(x.index_select(1, idx) for x in whole)


def rank_step(q, k, v, dout, rank: int, world: int, layout: str, causal: bool, kernel):
    """Forward and backward of rank's ring steps, every hop a loopback copy: a () -> None."""
    engine = Engine(default_scale(q.shape[-1]), layout, LoopbackRing(rank, world), kernel, Mask(causal))

    def step():
        out, lse = ring_forward(q, k, v, engine)
        ring_backward(dout, q, k, v, out, lse, engine)

    return step


QUICK = dict(compute_seq_len=1152, compute_worlds=[2, 3], repeats=1)


def _settings(args):
    """(device, dtype, seq, heads, kv_heads, head_dim, worlds) from the flags and the device's defaults;
    every bad setting named at once, before anything is timed."""
    device = torch.device(getattr(args, "device", "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no GPU here (torch.cuda.is_available() is False)")
    cuda = device.type == "cuda"
    dtype = DTYPES[getattr(args, "gpu_dtype", "bf16")] if cuda else torch.float32
    seq = args.compute_seq_len or (131072 if cuda else 8192)
    heads = args.compute_heads or (32 if cuda else 8)
    head_dim = args.compute_head_dim or (128 if cuda else 64)
    kv_heads = args.compute_kv_heads or heads
    check_layout(args.compute_layout)
    worlds = sorted(set(args.compute_worlds))
    problems = [
        f"--compute-worlds {W}: {seq} tokens do not split over {W} ranks in layout "
        f"{args.compute_layout} (need a multiple of {split_unit(args.compute_layout, W)})"
        for W in worlds
        if W < 1 or seq % split_unit(args.compute_layout, W)
    ]
    if heads % kv_heads:
        problems.append(f"--compute-heads {heads} is not a multiple of --compute-kv-heads {kv_heads}")
    if problems:  # refuse before timing anything
        raise ValueError("; ".join(problems))
    return device, dtype, seq, heads, kv_heads, head_dim, worlds


def run(args) -> dict:
    device, dtype, seq, heads, kv_heads, head_dim, worlds = _settings(args)
    causal, layout, repeats = args.compute_mask == "causal", args.compute_layout, max(1, args.repeats)
    kernel = select_kernel(args.compute_kernel, device, dtype, head_dim)
    g = torch.Generator(device=device).manual_seed(0)
    shapes = [
        (1, seq, heads, head_dim),
        (1, seq, kv_heads, head_dim),
        (1, seq, kv_heads, head_dim),
        (1, seq, heads, head_dim),
    ]
    whole = tuple(torch.randn(s, generator=g, device=device, dtype=dtype) for s in shapes)  # q, k, v, dout

    rows = []
    with tqdm(total=1 + sum(worlds), desc="per-rank compute bench", unit="rank") as bar:
        q, k, v, dout = whole
        one = median_time(rank_step(q, k, v, dout, 0, 1, layout, causal, kernel), repeats, device=device)
        bar.update()
        for W in worlds:
            for r in range(W):
                q, k, v, dout = rank_inputs(whole, layout, r, W)
                t = median_time(rank_step(q, k, v, dout, r, W, layout, causal, kernel), repeats, device=device)
                rows.append(dict(world=W, rank=r, seconds=t, rate_ratio=one / (W * t)))
                bar.update()
    summary = []
    for W in worlds:
        ts = [r["seconds"] for r in rows if r["world"] == W]
        summary.append(
            dict(
                world=W,
                slowest_rank_ratio=one / (W * max(ts)),
                mean_ratio=one / sum(ts),
                imbalance=max(ts) / (sum(ts) / W),
            )
        )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    lines = [
        f"{name}, torch {torch.__version__}: S = {seq}, {heads} heads ({kv_heads} kv) x {head_dim}, "
        f"{str(dtype).replace('torch.', '')}, {args.compute_mask}, layout {layout}, kernel {kernel.name}, "
        f"forward+backward, median of {repeats} after a warm-up.",
        f"One process, whole sequence: {one * 1e3:.2f} ms. Rank r of W alone, every hop a local copy: "
        "rate ratio = T(1) / (W T(r, W)); the ring runs at its slowest rank's.",
        "",
        "| W | slowest rank: rate ratio | all ranks: T(1) / sum T(r, W) | slowest / mean rank time |",
        "|---|---|---|---|",
    ]
    for s in summary:
        lines.append(f"| {s['world']} | {s['slowest_rank_ratio']:.3f} | {s['mean_ratio']:.3f} | {s['imbalance']:.3f} |")
    md = "\n".join(lines) + "\n"
    out = write_results(
        args.out,
        "compute",
        dict(args=public_args(args), device=name, one_process_seconds=one, rows=rows, summary=summary),
        md,
    )
    xs = [s["world"] for s in summary]
    series = {
        "slowest rank": [s["slowest_rank_ratio"] for s in summary],
        "mean over ranks": [s["mean_ratio"] for s in summary],
        "one process (1.0)": [1.0] * len(xs),
        "target at W = 8 (0.9)": [TARGET] * len(xs),
    }
    draw(
        "lines",
        {k: xs for k in series},
        series,
        out / "compute.png",
        xlabel="ring ranks W (emulated, transfers excluded)",
        ylabel="per-token rate / one process's",
        title=f"Per-rank compute, S={seq}, {args.compute_mask} {layout}",
        logx=True,
    )
    print(md)
    return dict(rows=rows, summary=summary)
