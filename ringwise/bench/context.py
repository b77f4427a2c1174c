"""The longest sequence that trains within a fixed per-process memory budget (paper Table 3).

For each method, the longest global sequence whose forward+backward of a small model keeps
every process's peak resident memory (above its model state) within --budget-mib, found
by doubling then bisection on real runs:
  vanilla  one process, materialised attention scores, plain FFN and loss
  memeff   one process, fused SDPA attention, plain FFN and loss
  bpt      one process, blockwise attention + blockwise FFN and loss
  ring     W processes, ring attention + blockwise FFN and loss (W from --context-worlds)
The paper's claim: ring on W devices trains W times the BPT length.

With --device cuda: one GPU, a ~1B LLaMA-shaped model in bf16 with layer checkpointing;
the longest sequence whose forward+backward runs without running out of GPU memory while
12 bytes per parameter stay reserved for fp32 master weights and Adam moments (vanilla,
memeff = SDPA, bpt = ringwise at W = 1 with blockwise FFN and loss), and the BPT step's
tokens/s and MFU at --gpu-mfu-seq-len.
"""

from __future__ import annotations

import gc

import torch
from tqdm import tqdm

from ringwise.testing.cluster import LocalCluster
from ringwise.testing.memory import mib

from . import draw, write_results
from .common import step_memory
from .context_model import DEFAULTS as MODEL_DEFAULTS
from .context_model import largest
from .context_model import run as run_model
from .flags import context_flags as add_arguments  # noqa: F401 (defined in flags.py: the CLI needs no suite)
from .timing import median_time

METHODS = {
    "vanilla": dict(attention="vanilla", blockwise=False),
    "memeff": dict(attention="sdpa", blockwise=False),
    "bpt": dict(attention="ring", blockwise=True),
}


def fits(cluster, preset, seq, budget_bytes, overrides):
    res = cluster.run(step_memory, preset, seq, "zigzag", 1, 1024, False, overrides, timeout=3600)
    return max(p for p, _ in res) <= budget_bytes, max(p for p, _ in res)


def longest(cluster, preset, unit, budget_bytes, overrides, bar, label):
    """Largest multiple of `unit` that fits, by doubling and bisection (in units)."""
    probes = []

    def ok(k):
        good, peak = fits(cluster, preset, k * unit, budget_bytes, overrides)
        probes.append((k * unit, mib(peak), good))
        bar.set_postfix_str(f"{label} S={k * unit} peak={mib(peak):.0f}MiB {'fits' if good else 'over'}")
        return good

    return largest(ok) * unit, probes


# ---------------------------------------------------------------- one GPU

# ~1.1B parameters, LLaMA-shaped: 16 layers, d 2048, 16 heads x 128 (8 kv heads), SwiGLU 8192.
GPU_MODEL = dict(vocab_size=32000, dim=2048, n_layers=16, n_heads=16, n_kv_heads=8, ffn_dim=8192)
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0}  # dense, SXM
STATE_BYTES_PER_PARAM = 12  # fp32 master weights + Adam's two moments, beside bf16 params and grads


def train_flops(cfg, seq: int) -> float:
    """Model FLOPs of one causal forward+backward (recomputation not counted): 6 x weights x
    tokens for the matmuls (embedding lookup excluded) plus causal attention, 3.5 x 4 x S^2 x
    dim / 2 per layer."""
    weights = sum(p.numel() for name, p in _param_shapes(cfg)) - cfg.vocab_size * cfg.dim
    return 6.0 * weights * seq + cfg.n_layers * 3.5 * 4 * seq * seq * cfg.head_dim * cfg.n_heads / 2


def _param_shapes(cfg):
    from ringwise.model import Transformer

    with torch.device("meta"):
        return list(Transformer(cfg).named_parameters())


def gpu_step(model, seq: int, device) -> tuple[int, float] | None:
    """(peak bytes above the start, seconds) of one forward+backward at seq tokens; None if
    the GPU runs out of memory."""
    from ringwise.testing.memory import PeakMemory

    g = torch.Generator(device=device).manual_seed(1)
    tokens = torch.randint(0, model.cfg.vocab_size, (1, seq + 1), generator=g, device=device)
    pos = torch.arange(seq, device=device)
    oom = False

    def step():
        loss, _ = model(tokens[:, :-1], pos, tokens[:, 1:], layout="contiguous")
        (loss / seq).backward()

    try:
        with PeakMemory(device) as mem:
            seconds = median_time(step, 1, warmup=0, device=device)
    except torch.cuda.OutOfMemoryError:
        oom = True  # handled outside the except block, so the traceback's tensors are freed
    model.zero_grad(set_to_none=False)
    if oom:
        gc.collect()
        torch.cuda.empty_cache()
        return None
    return mem.peak_bytes, seconds


def _method_row(method, args, device, peak, unit, bar) -> tuple[dict, dict | None]:
    """run_device's row of one method, and its MFU measurement (bpt's only; else None). The model and
    its reserve are let go of when this returns."""
    from ringwise.model import Transformer, model_config

    mfu = None
    cfg = model_config("llama-3b", checkpoint_layers=True, **GPU_MODEL, **METHODS[method])
    torch.manual_seed(0)
    with device:  # initialised on the GPU: seconds, not a minute on the CPU
        model = Transformer(cfg).to(torch.bfloat16)
    # the optimizer state's memory, held (unused) until this returns
    _reserve = torch.empty(STATE_BYTES_PER_PARAM * model.num_params(), dtype=torch.uint8, device=device)
    probes = []

    def ok(k):
        res = gpu_step(model, k * unit, device)
        probes.append(
            dict(
                seq=k * unit,
                fits=res is not None,
                peak_gib=None if res is None else res[0] / 2**30,
                seconds=None if res is None else res[1],
            )
        )
        bar.set_postfix_str(f"{method} S={k * unit} {'fits' if res else 'out of memory'}")
        print(
            f"{method}: S={k * unit} "
            + (
                f"fits, peak {res[0] / 2**30:.1f} GiB above the model state, {res[1]:.2f} s" if res else "out of memory"
            ),
            flush=True,
        )
        return res is not None

    best = largest(ok, args.gpu_max_seq_len // unit) * unit
    row = dict(method=method, max_seq=best, probes=probes, params=model.num_params())
    if method == "bpt":
        gpu_step(model, args.gpu_mfu_seq_len, device)  # warm-up
        res = gpu_step(model, args.gpu_mfu_seq_len, device)
        if res is not None:
            tps = args.gpu_mfu_seq_len / res[1]
            achieved = train_flops(cfg, args.gpu_mfu_seq_len) / res[1] / 1e12
            mfu = dict(
                seq=args.gpu_mfu_seq_len,
                seconds=res[1],
                tokens_per_s=tps,
                tflops=achieved,
                mfu=achieved / peak if peak else None,
            )
    return row, mfu


def run_device(args) -> dict:
    if not torch.cuda.is_available():
        raise ValueError(
            "--device cuda: torch sees no GPU here (torch.cuda.is_available() is False); "
            "run on a machine with an NVIDIA GPU and a CUDA build of torch, or drop --device"
        )
    device = torch.device("cuda", torch.cuda.current_device())
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    unit = args.gpu_granularity
    rows, mfu = [], None
    with tqdm(total=len(args.gpu_methods), desc="max-context bench (one GPU)", unit="method") as bar:
        for method in args.gpu_methods:
            row, method_mfu = _method_row(method, args, device, peak, unit, bar)
            rows.append(row)
            mfu = method_mfu or mfu
            gc.collect()  # the method's model and reserve are gone: let go of their GPU memory before the next
            torch.cuda.empty_cache()
            bar.update()
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    lines = [
        f"{name} ({total:.0f} GiB), torch {torch.__version__}: ~{rows[0]['params'] / 1e9:.2f}B-parameter "
        f"LLaMA-shaped model ({GPU_MODEL}), bf16, layer checkpointing, batch 1, causal; "
        f"{STATE_BYTES_PER_PARAM} B/parameter held back for fp32 master weights and Adam moments. Longest "
        f"sequence whose forward+backward runs (searched in steps of {unit}, up to {args.gpu_max_seq_len}).",
        "",
        "| method | longest sequence | at the search cap |",
        "|---|---|---|",
    ]
    for r in rows:
        capped = "yes" if r["max_seq"] >= args.gpu_max_seq_len // unit * unit else ""
        lines.append(f"| {r['method']} | {r['max_seq'] if r['max_seq'] else f'< {unit}'} | {capped} |")
    if mfu:
        share = f", MFU {mfu['mfu']:.1%} of {peak:.0f} TFLOP/s" if mfu["mfu"] is not None else ""
        lines += [
            "",
            f"BPT training step at S = {mfu['seq']}: {mfu['seconds']:.2f} s, {mfu['tokens_per_s']:.0f} "
            f"tokens/s, {mfu['tflops']:.0f} model TFLOP/s{share} (recomputation not counted).",
        ]
    md = "\n".join(lines) + "\n"
    write_results(args.out, "context_gpu", dict(device=name, rows=rows, mfu=mfu, model=GPU_MODEL), md)
    print(md)
    return dict(rows=rows, mfu=mfu)


QUICK = dict(budget_mib=8.0, context_worlds=[2], granularity=256)  # 4 MiB resolved only 1-2 steps: flaky
PRESET_DEFAULTS = dict(budget_mib=32.0, context_worlds=[2, 4, 8], granularity=512)  # where the flags say None


def run(args) -> dict:
    if getattr(args, "model", None) and getattr(args, "device", "cpu") != "cpu":
        raise ValueError("--model PATH: measured on CPU only (drop --device cuda)")
    for key, value in (MODEL_DEFAULTS if getattr(args, "model", None) else PRESET_DEFAULTS).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.model:
        return run_model(args)
    if getattr(args, "device", "cpu") != "cpu":
        return run_device(args)
    budget = args.budget_mib * 2**20
    rows = []
    jobs = [(name, 1, ov) for name, ov in METHODS.items()] + [("ring", W, {}) for W in args.context_worlds]
    with tqdm(total=len(jobs), desc="max-context bench", unit="method") as bar:
        for name, W, overrides in jobs:
            with LocalCluster(W, threads_per_rank=max(1, 2 // W), track_memory=True) as cluster:
                best, probes = longest(
                    cluster, args.context_model, args.granularity * W, budget, overrides, bar, f"{name} W={W}"
                )
            rows.append(dict(method=name, world=W, max_seq=best, probes=probes))
            bar.update()
    bpt = next(r["max_seq"] for r in rows if r["method"] == "bpt")
    lines = [
        f"Longest causal sequence whose forward+backward of preset `{args.context_model}` keeps each "
        f"process within {args.budget_mib:.0f} MiB above its model state (searched in steps of "
        f"{args.granularity} tokens per process).",
        "",
        "| method | processes | longest sequence | x BPT | target |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        target = f">= {0.9 * r['world']:.1f}" if r["method"] == "ring" else ""
        lines.append(f"| {r['method']} | {r['world']} | {r['max_seq']} | {r['max_seq'] / bpt:.2f} | {target} |")
    md = "\n".join(lines) + "\n"
    out = write_results(args.out, "context", dict(rows=rows, budget_mib=args.budget_mib), md)
    ring = [r for r in rows if r["method"] == "ring"]
    draw(
        "lines",
        {"ring (measured)": [r["world"] for r in ring], "W x BPT": [r["world"] for r in ring]},
        {"ring (measured)": [r["max_seq"] for r in ring], "W x BPT": [r["world"] * bpt for r in ring]},
        out / "context.png",
        xlabel="processes W",
        ylabel="longest sequence (tokens)",
        title=f"Max context at {args.budget_mib:.0f} MiB per process",
        logx=True,
        logy=True,
    )
    print(md)
    return dict(rows=rows)
