"""ringwise against other ring-attention packages, same workload, same processes.

Optional (`pip install 'ringwise[peers]'`, never in CI): each rank runs the same local
shards through ringwise.ring_attention and through lucidrains' ring-attention-pytorch
(`ring_flash_attn` with its ring on, `ring_reduce_col=True`), forward+backward, and the
slowest rank's median time and per-rank peak memory are compared side by side.
The paper authors' JAX package (ringattention 0.1.2, on W simulated CPU devices sharing the
same cores) is timed in a subprocess when it is installed (it needs jax 0.4.x, e.g.
`pip install ringattention==0.1.2 jax==0.4.35 jaxlib==0.4.35 flax==0.10.2`); its memory
is not measured. A single-process SDPA row (whole sequence, all threads in one process) is
the yardstick: it shows how fast a ring can be at best on this machine, next to the peers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

import ringwise
from ringwise.testing.cluster import LocalCluster
from ringwise.testing.memory import PeakMemory, mib

from . import draw, write_results
from .common import sdpa_seconds
from .flags import peers_flags as add_arguments  # noqa: F401 (defined in flags.py: the CLI needs no suite)
from .timing import median_time


def _run_impl(name, q, k, v, dout, causal, repeats):
    if name == "ringwise":

        def attn(q, k, v):
            return ringwise.ring_attention(q, k, v, causal=causal, layout="zigzag" if causal else "contiguous")
    else:
        from ring_attention_pytorch import ring_flash_attn

        def attn(q, k, v):
            return ring_flash_attn(
                q, k, v, causal=causal, ring_reduce_col=True, striped_ring_attn=causal, bucket_size=1024
            )

    peak = 0

    def step():  # the peak of the last run is reported
        nonlocal peak
        qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, k, v))
        with PeakMemory() as mem:
            attn(qg, kg, vg).backward(dout)
        peak = mem.peak_bytes

    return median_time(step, repeats), peak


def compare(seq, heads, head_dim, causal, repeats):
    g = torch.Generator().manual_seed(0)
    whole = [torch.randn(1, seq, heads, head_dim, generator=g) for _ in range(4)]
    # each package gets its own balanced layout for causal (zigzag / striped), contiguous otherwise
    ours = [ringwise.shard(x, 1, "zigzag" if causal else "contiguous") for x in whole]
    theirs = [ringwise.shard(x, 1, "striped" if causal else "contiguous") for x in whole]
    result = {}
    for name, xs in (("ringwise", ours), ("ring-attention-pytorch", theirs)):
        q, k, v, dout = xs
        result[name] = _run_impl(name, q, k, v, dout, causal, repeats)
    return result


QUICK = dict(peer_seq_len=1024, repeats=1)


def run(args) -> dict:
    try:
        import ring_attention_pytorch  # noqa: F401
    except ImportError as e:
        raise SystemExit("bench peers needs the peers extra: pip install 'ringwise[peers]'") from e
    rows = []
    with LocalCluster(
        args.peer_world, threads_per_rank=max(1, args.threads // args.peer_world), track_memory=True
    ) as c:
        for causal in (False, True):
            res = c.run(
                compare, args.peer_seq_len, args.heads, args.head_dim, causal, max(1, args.repeats), timeout=3600
            )
            for name in res[0]:
                rows.append(
                    dict(impl=name, causal=causal, seconds=res[0][name][0], peak_mib=max(mib(r[name][1]) for r in res))
                )
    for causal, t in sdpa_seconds(
        1, args.peer_seq_len, args.heads, args.head_dim, args.threads, max(1, args.repeats)
    ).items():
        rows.append(
            dict(
                impl=f"SDPA, 1 process x {args.threads} threads (reference, not a ring)",
                causal=causal,
                seconds=t,
                peak_mib=None,
            )
        )
    try:
        import ringattention  # noqa: F401

        for causal in (False, True):
            env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={args.peer_world}")
            cmd = [
                sys.executable,
                "-m",
                "ringwise.bench.jax_peer",
                str(args.peer_world),
                str(args.peer_seq_len),
                str(args.heads),
                str(args.head_dim),
                "1" if causal else "0",
                str(max(1, args.repeats)),
            ]
            res = json.loads(
                subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=3600)
                .stdout.strip()
                .splitlines()[-1]
            )
            rows.append(dict(impl="ringattention (JAX)", causal=causal, seconds=res["seconds"], peak_mib=None))
    except ImportError:
        print("ringattention (JAX) not installed: skipped")
    lines = [
        f"W={args.peer_world} ranks, global sequence {args.peer_seq_len}, {args.heads} heads x {args.head_dim}, "
        "float32, "
        f"forward+backward, median of {max(1, args.repeats)}; causal runs use each package's balanced layout.",
        "",
        "| impl | mask | seconds | peak MiB per rank | ringwise speed-up |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        ours = next(x for x in rows if x["impl"] == "ringwise" and x["causal"] == r["causal"])
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"
        lines.append(
            f"| {r['impl']} | {'causal' if r['causal'] else 'full'} | {r['seconds']:.3f} | "
            f"{peak} | {r['seconds'] / ours['seconds']:.2f}x |"
        )
    md = "\n".join(lines) + "\n"
    out = write_results(args.out, "peers", dict(rows=rows), md)
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    seconds = {(r["impl"], r["causal"]): r["seconds"] for r in rows}
    draw(
        "bars",
        ["full", "causal"],
        {i: [seconds.get((i, False)), seconds.get((i, True))] for i in impls},
        out / "peers.png",
        ylabel="seconds, forward+backward (lower is better)",
        title=f"W={args.peer_world}, S={args.peer_seq_len}: ringwise vs other packages",
    )
    print(md)
    return dict(rows=rows)
