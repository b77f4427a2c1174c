"""Does the transfer hide behind the compute? (the paper's overlap condition, measured)

For a sweep of block sizes c (tokens per rank), W ranks run causal-free ring attention
forward+backward three ways, side by side:
  ring      the real thing (hops posted before each block's compute, waited after it);
  compute   the same kernel calls, every hop a local copy of what it sends (same work, no transfer);
  comm      the same hops with no compute.
If the transfer is hidden, ring ~= compute. The paper predicts hiding once
c >= F / B (F: FLOP/s per rank, B: bytes/s per link; 4dc^2 FLOPs against 4cd bytes of
K and V in bf16 per step; here float32, so c >= 2F/B). F is measured with a matmul and
B with the comm-only runs at the largest block.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from tqdm import tqdm

from ringwise.attention.comm import Ring
from ringwise.attention.kernels import default_scale, select_kernel
from ringwise.attention.ring import Engine, ring_backward, ring_forward
from ringwise.testing.cluster import LocalCluster

from . import draw, write_results
from .common import LoopbackRing
from .flags import overlap_flags as add_arguments  # noqa: F401 (defined in flags.py: the CLI needs no suite)
from .timing import median_time


def measure(block, heads, head_dim, repeats):
    """Seconds for ring / compute-only / comm-only forward+backward at this block size."""
    g = torch.Generator().manual_seed(dist.get_rank())
    q, k, v, dout = (torch.randn(1, block, heads, head_dim, generator=g) for _ in range(4))
    scale = default_scale(head_dim)
    kernel = select_kernel("auto", q.device, q.dtype, head_dim)
    real = Ring()
    silent = LoopbackRing(real.rank, real.world_size)  # the compute of each step, no transfer

    def fwd_bwd(ring):
        engine = Engine(scale, "contiguous", ring, kernel)
        out, lse = ring_forward(q, k, v, engine)
        ring_backward(dout, q, k, v, out, lse, engine)

    def comm_only():
        W = real.world_size
        kv: tuple[torch.Tensor, ...] = (k, v)
        bufs = [tuple(torch.empty_like(x) for x in kv) for _ in range(2)]
        for step in range(W - 1):  # forward: W-1 kv hops
            real.exchange("kv", kv, bufs[step % 2]).wait()
            kv = bufs[step % 2]
        kv = (k, v)
        dkv, dkv_in = torch.zeros((2,) + k.shape), torch.empty((2,) + k.shape)
        for step in range(W):  # backward: W-1 kv hops and W dkv hops
            hops = [real.exchange("dkv", [dkv], [dkv_in])]
            if step < W - 1:
                hops.append(real.exchange("kv", kv, bufs[step % 2]))
            for h in hops:
                h.wait()

    return dict(
        ring=median_time(lambda: fwd_bwd(real), repeats),
        compute=median_time(lambda: fwd_bwd(silent), repeats),
        comm=median_time(comm_only, repeats),
    )


def matmul_flops(n=1024, repeats=5):
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / median_time(lambda: a @ b, repeats)


QUICK = dict(blocks=[64, 256], repeats=1)


def run(args) -> dict:
    heads, head_dim, W = args.overlap_heads, args.head_dim, args.overlap_world
    rows = []
    with LocalCluster(W, threads_per_rank=1) as cluster:
        flops = cluster.run(matmul_flops)[0]
        for c in tqdm(args.blocks, desc="overlap bench", unit="block"):
            t = cluster.run(measure, c, heads, head_dim, max(1, args.repeats), timeout=3600)[0]
            rows.append(
                dict(
                    block=c,
                    **t,
                    hidden_fraction=max(0.0, min(1.0, 1 - (t["ring"] - t["compute"]) / t["comm"]))
                    if t["comm"] > 0
                    else 1.0,
                )
            )
    # bytes per second of one link, from the largest block's comm-only time
    big = rows[-1]
    hops_bytes = (2 * (W - 1) * 2 + 2 * W) * big["block"] * heads * head_dim * 4  # kv fwd+bwd, dkv (fp32)
    bandwidth = hops_bytes / big["comm"]
    hidden_dim = heads * head_dim
    predicted_c = 2 * flops / bandwidth  # float32 K and V: 8cd bytes against 4dc^2 FLOPs
    lines = [
        f"W={W} ranks x 1 thread, {heads} heads x {head_dim}, float32, non-causal forward+backward, "
        f"median of {max(1, args.repeats)}.",
        f"Measured: matmul {flops / 1e9:.1f} GFLOP/s per rank; ring link {bandwidth / 1e9:.2f} GB/s "
        f"(from the comm-only run at c={big['block']}).",
        f"Paper's condition (float32): c >= 2F/B = {predicted_c:.0f} tokens.",
        "",
        "| block c | ring s | compute only s | comm only s | ring / compute | transfer hidden |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['block']} | {r['ring']:.4f} | {r['compute']:.4f} | {r['comm']:.4f} | "
            f"{r['ring'] / r['compute']:.3f} | {100 * r['hidden_fraction']:.0f}% |"
        )
    hidden_from = next((r["block"] for r in rows if r["ring"] <= 1.05 * r["compute"]), None)
    lines += [
        "",
        f"Smallest block with ring within 5% of compute-only: {hidden_from}; predicted c >= {predicted_c:.0f}.",
    ]
    md = "\n".join(lines) + "\n"
    out = write_results(
        args.out,
        "overlap",
        dict(
            rows=rows,
            flops=flops,
            bandwidth=bandwidth,
            predicted_block=predicted_c,
            hidden_from=hidden_from,
            hidden_dim=hidden_dim,
        ),
        md,
    )
    xs = [r["block"] for r in rows]
    draw(
        "lines",
        {k: xs for k in ("ring", "compute only", "comm only")},
        {
            "ring": [r["ring"] for r in rows],
            "compute only": [r["compute"] for r in rows],
            "comm only": [r["comm"] for r in rows],
        },
        out / "overlap.png",
        xlabel="block size c (tokens per rank)",
        ylabel="seconds (fwd+bwd)",
        title=f"Overlap: ring vs its compute and its transfer (predicted c >= {predicted_c:.0f})",
        logx=True,
        logy=True,
    )
    print(md)
    return dict(rows=rows)
