"""Ring attention vs single-process SDPA on the same global sequence, same total threads.

W ranks x (T/W) threads run the ring; one process with T threads runs
torch.nn.functional.scaled_dot_product_attention on the whole sequence. Forward +
backward, non-causal and causal per layout. The ratio SDPA time / ring time is the
efficiency of the ring: 1.0 means the ring costs nothing over the fused kernel.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import ringwise
from ringwise.lab.cluster import LocalCluster

from . import draw, write_results


def _inputs(batch, seq, heads, head_dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, seq, heads, head_dim, generator=g) for _ in range(4)]


def time_sdpa(batch, seq, heads, head_dim, causal, repeats):
    """Whole-sequence fused SDPA forward+backward; seconds per iteration (median)."""
    q, k, v, dout = (x.transpose(1, 2) for x in _inputs(batch, seq, heads, head_dim))
    times = []
    for i in range(repeats + 1):
        qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
        t0 = time.perf_counter()
        out = torch.nn.functional.scaled_dot_product_attention(qg, kg, vg, is_causal=causal)
        out.backward(dout)
        if i:  # the first run warms up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_ring(batch, seq, heads, head_dim, causal, layout, repeats):
    """Ring forward+backward on this rank's shard; the slowest rank's time per iteration."""
    q, k, v, dout = (ringwise.shard(x, 1, layout) for x in _inputs(batch, seq, heads, head_dim))
    times = []
    for i in range(repeats + 1):
        qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
        dist.barrier()
        t0 = time.perf_counter()
        out = ringwise.ring_attention(qg, kg, vg, causal=causal, layout=layout)
        out.backward(dout)
        elapsed = torch.tensor(time.perf_counter() - t0, dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if i:
            times.append(elapsed.item())
    return statistics.median(times)


def add_arguments(p):
    p.add_argument("--seq", type=int, default=16384, help="global sequence length")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--world", type=int, nargs="+", default=[1, 2], help="ring sizes to measure")
    p.add_argument("--threads", type=int, default=2, help="total threads, shared by the ranks")
    p.add_argument("--repeats", type=int, default=3, help="timed iterations per case (after one warm-up)")


QUICK = dict(seq=2048, repeats=1)


def run(args) -> dict:
    if getattr(args, "ulysses", False):  # --ulysses: ring, Ulysses and hybrid meshes (bench/ulysses.py)
        from . import ulysses

        return ulysses.run(args)
    args.world = list(dict.fromkeys(args.world))  # a repeated size would run its cases twice
    bad = [W for W in args.world if W < 1 or args.threads % W]
    if bad:  # refuse before any timing, not after minutes of it
        raise ValueError(f"--threads {args.threads} must be divisible by every --world size (same total threads "
                         f"for ring and SDPA); not by {bad}")
    shape = (args.batch, args.seq, args.heads, args.head_dim)
    cases = [("sdpa", 1, False, None), ("sdpa", 1, True, None)]
    for W in args.world:
        cases.append(("ring", W, False, "zigzag"))
        cases += [("ring", W, True, layout) for layout in ringwise.LAYOUTS]
    rows = []
    with tqdm(total=len(cases), desc="attention bench", unit="case") as bar:
        with LocalCluster(1, threads_per_rank=args.threads) as single:
            for kind, W, causal, layout in cases[:2]:
                bar.set_postfix_str(f"sdpa causal={causal}")
                t = single.run(time_sdpa, *shape, causal, args.repeats, timeout=3600)[0]
                rows.append(dict(impl="sdpa", world=1, threads=args.threads, causal=causal, layout="-", seconds=t))
                bar.update()
        for W in args.world:
            with LocalCluster(W, threads_per_rank=args.threads // W) as ring:
                for kind, w, causal, layout in cases[2:]:
                    if w != W:
                        continue
                    bar.set_postfix_str(f"ring W={W} causal={causal} {layout}")
                    t = ring.run(time_ring, *shape, causal, layout, args.repeats, timeout=3600)[0]
                    rows.append(dict(impl="ring", world=W, threads=args.threads // W, causal=causal, layout=layout, seconds=t))
                    bar.update()
    sdpa = {r["causal"]: r["seconds"] for r in rows if r["impl"] == "sdpa"}
    for r in rows:
        r["sdpa_over_this"] = sdpa[r["causal"]] / r["seconds"]
    lines = [
        f"Global sequence {args.seq}, batch {args.batch}, {args.heads} heads x {args.head_dim}, float32, "
        f"forward+backward, {args.threads} threads in total, median of {args.repeats}.",
        "",
        "| impl | ranks x threads | mask | layout | seconds | SDPA time / this |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        mask = "causal" if r["causal"] else "full"
        lines.append(f"| {r['impl']} | {r['world']} x {r['threads']} | {mask} | {r['layout']} | "
                     f"{r['seconds']:.3f} | {r['sdpa_over_this']:.3f} |")
    for W in (w for w in args.world if w > 1):  # one rank has nothing to balance
        by = {r["layout"]: r["seconds"] for r in rows if r["impl"] == "ring" and r["world"] == W and r["causal"]}
        lines.append("")
        lines.append(f"W={W} causal load balance: contiguous / zigzag time = {by['contiguous'] / by['zigzag']:.2f}, "
                     f"contiguous / striped = {by['contiguous'] / by['striped']:.2f}")
    md = "\n".join(lines) + "\n"
    out = write_results(args.out, "attention", dict(args={k: v for k, v in vars(args).items() if not k.startswith("_")},
                                                       rows=rows), md)
    ring = [r for r in rows if r["impl"] == "ring"]
    series = {}
    for r in ring:
        label = f"{'causal ' + r['layout'] if r['causal'] else 'full'}"
        series.setdefault(label, []).append(r)
    draw("lines", {k: [r["world"] for r in v] for k, v in series.items()},
         {k: [r["sdpa_over_this"] for r in v] for k, v in series.items()},
         out / "attention.png", xlabel="ring ranks W (same total threads as SDPA)",
         ylabel="SDPA time / ring time", title=f"Ring vs single-process SDPA, S={args.seq}", logx=True)
    print(md)
    return dict(rows=rows)
