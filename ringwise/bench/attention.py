"""Ring attention vs single-process SDPA on the same global sequence, same total threads.

W ranks x (T/W) threads run the ring; one process with T threads runs
torch.nn.functional.scaled_dot_product_attention on the whole sequence. Forward +
backward, non-causal and causal per layout. The ratio SDPA time / ring time is the
efficiency of the ring: 1.0 means the ring costs nothing over the fused kernel.

With --device cuda: one process on one GPU, ringwise at W = 1 (its own kernel calls and
float32 merge) against SDPA's flash and cuDNN backends, forward+backward, timed with CUDA
events, in ms and TFLOP/s over --gpu-seq-lens, causal and full.
"""

from __future__ import annotations

import functools

import torch
from tqdm import tqdm

import ringwise
from ringwise.testing.cluster import LocalCluster
from ringwise.train.config import DTYPES

from . import draw, public_args, write_results
from .common import (
    add_sdpa_ratios,
    fwd_bwd_step,
    random_inputs,
    sdpa_seconds,
    time_sdpa,  # noqa: F401 (it was defined here; still importable from here)
)
from .flags import attention_flags as add_arguments  # noqa: F401 (defined in flags.py: the CLI needs no suite)
from .timing import median_time


def time_ring(batch, seq, heads, head_dim, causal, layout, repeats):
    """Ring forward+backward on this rank's shard; the slowest rank's time per iteration."""
    inputs = [ringwise.shard(x, 1, layout) for x in random_inputs(batch, seq, heads, head_dim)]
    ring = functools.partial(ringwise.ring_attention, causal=causal, layout=layout)
    return median_time(fwd_bwd_step(ring, inputs), repeats)


# ---------------------------------------------------------------- one GPU

GPU_IMPLS = ("ringwise", "ringwise_flash", "sdpa_flash", "sdpa_cudnn")


def attention_flops(batch, seq, heads, head_dim, causal) -> float:
    """Forward+backward matmul FLOPs, FlashAttention's convention: 4*B*H*S^2*D forward,
    2.5x that backward, halved under a causal mask."""
    return 3.5 * 4 * batch * heads * seq * seq * head_dim * (0.5 if causal else 1.0)


def _attention_fn(impl, causal):
    """impl -> f(q, k, v) on (batch, seq, heads, dim) tensors."""
    if impl.startswith("ringwise"):
        backend = "cuda_flash" if impl == "ringwise_flash" else "auto"
        return lambda q, k, v: ringwise.ring_attention(q, k, v, causal=causal, backend=backend)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sdp_backend = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}[impl]

    def sdpa(q, k, v):
        with sdpa_kernel(sdp_backend):  # that backend or an error, never a silent other one
            out = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
            )
        return out.transpose(1, 2)

    return sdpa


def device_rows(seqs, batch, heads, head_dim, dtype, device, repeats, impls=GPU_IMPLS, bar=None) -> list[dict]:
    """Forward+backward of every impl, causal and full, per sequence length; one row each.
    A case that cannot run (out of memory, a backend this GPU lacks) gets its error, not a time."""
    device = torch.device(device)
    rows = []
    for seq in seqs:  # each length's tensors are let go of when its call returns, before the next
        rows += _length_rows(seq, batch, heads, head_dim, dtype, device, repeats, impls, bar)
    return rows


def _length_rows(seq, batch, heads, head_dim, dtype, device, repeats, impls, bar) -> list[dict]:
    """device_rows' rows of one sequence length."""
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v, dout = (
        torch.randn(batch, seq, heads, head_dim, generator=g, device=device, dtype=dtype) for _ in range(4)
    )
    leaves = [x.requires_grad_() for x in (q, k, v)]
    for causal in (True, False):
        for impl in impls:
            fn = _attention_fn(impl, causal)

            def step():
                for x in leaves:
                    x.grad = None
                fn(*leaves).backward(dout)

            row = dict(impl=impl, seq=seq, causal=causal, ms=None, tflops=None, error=None)
            try:
                row["ms"] = median_time(step, repeats, device=device) * 1e3
                row["tflops"] = attention_flops(batch, seq, heads, head_dim, causal) / (row["ms"] * 1e-3) / 1e12
            except (RuntimeError, ValueError) as e:  # reported in the table, next case goes on
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            if row["error"] and device.type == "cuda":  # after the except block has let go of the tensors
                torch.cuda.empty_cache()
            rows.append(row)
            if bar is not None:
                bar.update()
    return rows


def run_device(args) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "--device cuda: torch sees no GPU here (torch.cuda.is_available() is False); "
            "run on a machine with an NVIDIA GPU and a CUDA build of torch, or drop --device"
        )
    dtype = DTYPES[args.gpu_dtype]
    shape = dict(batch=args.batch, heads=args.gpu_heads, head_dim=args.gpu_head_dim)
    with tqdm(total=len(args.gpu_seq_lens) * 2 * len(GPU_IMPLS), desc="attention bench (one GPU)", unit="case") as bar:
        rows = device_rows(args.gpu_seq_lens, dtype=dtype, device=device, repeats=args.repeats, bar=bar, **shape)
    ref = {(r["seq"], r["causal"]): r["ms"] for r in rows if r["impl"] == "sdpa_cudnn"}
    for r in rows:
        base = ref.get((r["seq"], r["causal"]))
        r["cudnn_over_this"] = base / r["ms"] if base and r["ms"] else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    lines = [
        f"{name}, torch {torch.__version__}: batch {args.batch}, {args.gpu_heads} heads x {args.gpu_head_dim}, "
        f"{args.gpu_dtype}, forward+backward, median of {args.repeats} after a warm-up (CUDA events). "
        "ringwise = ring_attention at W = 1 (backend auto; ringwise_flash: backend cuda_flash); "
        "sdpa_* = F.scaled_dot_product_attention forced to one backend. TFLOP/s: 3.5 x 4BHS^2D, "
        "halved if causal.",
        "",
        "| S | mask | impl | ms | TFLOP/s | SDPA cuDNN time / this |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        mask = "causal" if r["causal"] else "full"
        if r["error"]:
            lines.append(f"| {r['seq']} | {mask} | {r['impl']} | - | - | {r['error']} |")
            continue
        ratio = f"{r['cudnn_over_this']:.3f}" if r["cudnn_over_this"] else "-"
        lines.append(f"| {r['seq']} | {mask} | {r['impl']} | {r['ms']:.2f} | {r['tflops']:.0f} | {ratio} |")
    md = "\n".join(lines) + "\n"
    write_results(args.out, "attention_gpu", dict(args=public_args(args), device=name, rows=rows), md)
    print(md)
    return dict(rows=rows)


QUICK = dict(seq_len=2048, repeats=1, gpu_seq_lens=[4096, 8192])


def run(args) -> dict:
    if getattr(args, "device", "cpu") != "cpu":
        return run_device(args)
    args.worlds = list(dict.fromkeys(args.worlds))  # a repeated size would run its cases twice
    bad = [W for W in args.worlds if W < 1 or args.threads % W]
    if bad:  # refuse before any timing, not after minutes of it
        raise ValueError(
            f"--threads {args.threads} must be divisible by every --worlds size (same total threads "
            f"for ring and SDPA); not by {bad}"
        )
    shape = (args.batch, args.seq_len, args.heads, args.head_dim)
    cases: list[tuple[str, int, bool, str | None]] = [("sdpa", 1, False, None), ("sdpa", 1, True, None)]
    for W in args.worlds:
        cases.append(("ring", W, False, "zigzag"))
        cases += [("ring", W, True, layout) for layout in ringwise.LAYOUTS]
    rows = []
    with tqdm(total=len(cases), desc="attention bench", unit="case") as bar:
        for causal, t in sdpa_seconds(*shape, args.threads, args.repeats, bar).items():
            rows.append(dict(impl="sdpa", world=1, threads=args.threads, causal=causal, layout="-", seconds=t))
        for W in args.worlds:
            with LocalCluster(W, threads_per_rank=args.threads // W) as ring:
                for _kind, w, causal, layout in cases[2:]:
                    if w != W:
                        continue
                    bar.set_postfix_str(f"ring W={W} causal={causal} {layout}")
                    t = ring.run(time_ring, *shape, causal, layout, args.repeats, timeout=3600)[0]
                    rows.append(
                        dict(impl="ring", world=W, threads=args.threads // W, causal=causal, layout=layout, seconds=t)
                    )
                    bar.update()
    add_sdpa_ratios(rows)
    lines = [
        f"Global sequence {args.seq_len}, batch {args.batch}, {args.heads} heads x {args.head_dim}, float32, "
        f"forward+backward, {args.threads} threads in total, median of {args.repeats}.",
        "",
        "| impl | ranks x threads | mask | layout | seconds | SDPA time / this |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        mask = "causal" if r["causal"] else "full"
        lines.append(
            f"| {r['impl']} | {r['world']} x {r['threads']} | {mask} | {r['layout']} | "
            f"{r['seconds']:.3f} | {r['sdpa_over_this']:.3f} |"
        )
    for W in (w for w in args.worlds if w > 1):  # one rank has nothing to balance
        by = {r["layout"]: r["seconds"] for r in rows if r["impl"] == "ring" and r["world"] == W and r["causal"]}
        lines.append("")
        lines.append(
            f"W={W} causal load balance: contiguous / zigzag time = {by['contiguous'] / by['zigzag']:.2f}, "
            f"contiguous / striped = {by['contiguous'] / by['striped']:.2f}"
        )
    md = "\n".join(lines) + "\n"
    out = write_results(args.out, "attention", dict(args=public_args(args), rows=rows), md)
    ring = [r for r in rows if r["impl"] == "ring"]
    series: dict[str, list] = {}
    for r in ring:
        label = f"{'causal ' + r['layout'] if r['causal'] else 'full'}"
        series.setdefault(label, []).append(r)
    draw(
        "lines",
        {k: [r["world"] for r in v] for k, v in series.items()},
        {k: [r["sdpa_over_this"] for r in v] for k, v in series.items()},
        out / "attention.png",
        xlabel="ring ranks W (same total threads as SDPA)",
        ylabel="SDPA time / ring time",
        title=f"Ring vs single-process SDPA, S={args.seq_len}",
        logx=True,
    )
    print(md)
    return dict(rows=rows)
