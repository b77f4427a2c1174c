"""`ringwise bench context --model PATH`: a real transformers checkpoint's training memory per token
and its longest sequence within a per-process budget, plain transformers against ringwise.

Methods, each on live processes of the cluster harness (glibc's mmap threshold set low, so a peak
counts no freed tensor):
  transformers   one process with every thread: AutoModelForCausalLM (SDPA attention), gradient
                 checkpointing, the model's own loss over the whole sequence (full logits), AdamW
  ringwise W=N   the `ringwise finetune` training step (ringwise.train.loop.step: FSDP2 over N ranks,
                 ring attention, the loss in vocabulary chunks, clipping, AdamW) with one memory option:
                 none, checkpoint-layers, save-attention (with checkpoint-layers), ffn-tile (with
                 checkpoint-layers; the other options untiled, --ffn-tile 0)
A probe is one training step at a length, after a warm-up step that made the optimizer state; its
figure is each process's peak above what the process held just before the step (`state`: the
runtime, the weights, their gradients and the optimizer state). The longest sequence is searched by doubling then
bisection in steps of --granularity tokens per process, up to --context-max-tokens per process;
memory per token is the slope of the peak between the longest probe (over the budget, where the
search found a limit) and the longest probe at most half as long.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any, cast

import torch
from tqdm import tqdm

from ringwise.testing.cluster import LocalCluster
from ringwise.testing.memory import PeakMemory, mib
from ringwise.train.watchdog import proc_status_kb

from . import draw, public_args, write_results

# option -> TrainConfig fields (--ffn-tile 0: untiled; None: tiled at the model's own choice)
OPTIONS: dict[str, dict[str, Any]] = {
    "none": dict(checkpoint_layers=False, ffn_tile=0),
    "checkpoint-layers": dict(checkpoint_layers=True, ffn_tile=0),
    "save-attention": dict(checkpoint_layers=True, save_attention=True, ffn_tile=0),
    "ffn-tile": dict(checkpoint_layers=True, ffn_tile=None),
}
WARM_UP_TOKENS = 64  # tokens per process of the step that makes the optimizer state
DEFAULTS = dict(budget_mib=512.0, context_worlds=[1, 2, 4], granularity=256)  # where the flags say None

_held: dict[str, Any] = {}  # per process: the model being measured (built once per cluster, kept across probes)


class _RandomTokens:
    """A task for loop.step: one sequence of random tokens of the model's vocabulary."""

    def __init__(self, vocab: int, length: int):
        g = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, vocab, (length + 1,), generator=g)
        self.train_data = [dict(input_ids=tokens[:-1], labels=tokens[1:], cu_seqlens=[0, length])]


def _finetune_run(path: str, option: str, max_tokens: int):
    """This rank's `ringwise finetune` model and optimizer on the cluster's process group (built once)."""
    from ringwise.train.config import FINETUNE_DEFAULTS, TrainConfig
    from ringwise.train.loop import Run
    from ringwise.train.mesh import make_mesh
    from ringwise.train.pretrained import build_pretrained

    key = f"ringwise {path} {option}"
    if key not in _held:
        _held.clear()
        gc.collect()
        base = dict(FINETUNE_DEFAULTS, pretrained=path, seq_len=max_tokens, dtype="fp32", device="cpu", warmup=1)
        cfg = TrainConfig(**base, **OPTIONS[option])
        mesh = make_mesh(1, torch.device("cpu"), 600.0)
        model = build_pretrained(cfg, mesh)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
        _held[key] = Run(cfg, mesh, cast(Any, None), model, optimizer)
    return _held[key]


def ringwise_probe(path: str, option: str, max_tokens: int, length: int) -> dict:
    """One `ringwise finetune` step of a `length`-token sequence on this rank's ring: this rank's peak."""
    import torch.distributed as dist

    from ringwise.train.loop import step

    run = _finetune_run(path, option, max_tokens)
    vocab = run.model.hf.get_output_embeddings().weight.shape[0]
    if not getattr(run, "warmed", False):
        warm = WARM_UP_TOKENS * dist.get_world_size()
        run.cfg, run.task = run.cfg.replace(seq_len=warm), cast(Any, _RandomTokens(vocab, warm))
        step(run, 0)
        run.warmed = True  # type: ignore[attr-defined]
    run.cfg, run.task = run.cfg.replace(seq_len=length), cast(Any, _RandomTokens(vocab, length))
    return _measured(lambda: step(run, 1), run.model.parameters())


def transformers_probe(path: str, length: int) -> dict:
    """One step of plain transformers in this process (SDPA, gradient checkpointing, full loss, AdamW)."""
    key = f"transformers {path}"
    if key not in _held:
        from transformers import AutoModelForCausalLM

        from ringwise.train.pretrained import dtype_kwarg

        _held.clear()
        gc.collect()
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", **dtype_kwarg(torch.float32))
        # transformers 5's name; 4.x has only the old one (which 5 keeps as a warning alias)
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
        model.config.use_cache = False
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, betas=(0.9, 0.95), weight_decay=0.1)
        _held[key] = (model, optimizer)
        _transformers_step(model, optimizer, WARM_UP_TOKENS)
    model, optimizer = _held[key]
    return _measured(lambda: _transformers_step(model, optimizer, length), model.parameters())


def _measured(work, parameters) -> dict:
    """work()'s peak bytes above the model state (`state`: what the process holds before it, with the
    weights' gradients allocated as zeros, as a step that accumulates into them finds them), and its seconds.
    The step frees its gradients at its end (zero_grad(set_to_none=True)), after its peak."""
    for p in parameters:
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    gc.collect()
    state = proc_status_kb("VmRSS") * 1024
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        work()
        seconds = time.perf_counter() - t0
    return dict(peak=mem.peak_bytes, state=state, seconds=seconds)


def _transformers_step(model, optimizer, length: int) -> None:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, length + 1), generator=g)
    # labels shifted by the model's loss: ids[:, :length] predicts ids[:, 1:], as ringwise's step does
    loss = model(input_ids=ids[:, :length], labels=ids[:, :length]).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def largest(ok, max_units: int | None = None) -> int:
    """Largest k >= 1 (at most max_units) with ok(k), by doubling then bisection; 0 if not ok(1)."""
    if not ok(1):
        return 0
    lo, hi = 1, 2
    while (max_units is None or hi <= max_units) and ok(hi):
        lo, hi = hi, hi * 2
    if max_units is not None and hi > max_units:
        if lo == max_units or not ok(max_units):
            hi = max_units
        else:
            return max_units
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def search(cluster, probe, args, world: int, bar, label: str) -> dict:
    """The method's longest sequence within the budget (doubling, then bisection) and its probes."""
    budget = args.budget_mib * 2**20
    unit = args.granularity * world
    probes: list[dict] = []

    def ok(k: int) -> bool:
        length = k * unit
        got = cluster.run(*probe(length), timeout=3600)
        row = dict(
            seq=length,
            per_process=length // world,
            peak_mib=mib(max(r["peak"] for r in got)),
            peak_mib_per_process=[round(mib(r["peak"]), 1) for r in got],
            state_mib=mib(max(r["state"] for r in got)),
            seconds=max(r["seconds"] for r in got),
        )
        row["fits"] = row["peak_mib"] <= args.budget_mib
        probes.append(row)
        bar.set_postfix_str(f"{label} S={length} peak={row['peak_mib']:.0f}MiB {'fits' if row['fits'] else 'over'}")
        return max(r["peak"] for r in got) <= budget

    best = largest(ok, args.context_max_tokens // args.granularity) * unit
    if per_token(probes) is None and 2 * args.granularity <= args.context_max_tokens:
        ok(2 * min(p["seq"] for p in probes) // unit)  # the slope's second length (the first probe was over)
    return dict(max_seq=best, probes=sorted(probes, key=lambda p: p["seq"]), per_token_kib=per_token(probes))


def per_token(probes: list[dict]) -> float | None:
    """KiB per token of a process: the peak's slope between the longest probe (the one over the budget,
    where the search found one) and the longest probe at most half as long (None where none was probed:
    `search` probes twice the shortest length then)."""
    if not probes:
        return None
    top = max(probes, key=lambda p: p["seq"])
    lower = [p for p in probes if p["seq"] * 2 <= top["seq"]]
    if not lower:
        return None
    low = max(lower, key=lambda p: p["seq"])
    return (top["peak_mib"] - low["peak_mib"]) * 1024 / (top["per_process"] - low["per_process"])


def _probe(method: str, path: str, option: str, max_tokens: int) -> Callable[[int], tuple]:
    """length -> the cluster job (function and arguments) of one probe of `method`."""
    if method == "transformers":
        return lambda n: (transformers_probe, path, n)
    return lambda n: (ringwise_probe, path, option, max_tokens, n)


def run(args) -> dict:
    path, rows = args.model, []
    jobs: list[tuple[str, int, str]] = [("transformers", 1, "checkpoint-layers")]
    jobs += [("ringwise", W, option) for W in args.context_worlds for option in args.context_options]
    with tqdm(total=len(jobs), desc=f"max-context bench ({path})", unit="method") as bar:
        for method, W, option in jobs:
            threads = 2 if method == "transformers" else max(1, 2 // W)
            with LocalCluster(W, threads_per_rank=threads, track_memory=True, pg_timeout=600.0) as cluster:
                found = search(
                    cluster,
                    _probe(method, path, option, args.context_max_tokens * W),
                    args,
                    W,
                    bar,
                    f"{method} W={W} {option}",
                )
            rows.append(dict(method=method, world=W, option=option, **found))
            bar.update()
    md = table(args, rows)
    out = write_results(args.out, "context_model", dict(args=public_args(args), rows=rows), md)
    label = lambda r: "transformers" if r["method"] == "transformers" else f"ringwise W={r['world']}, {r['option']}"
    xs = {label(r): [p["per_process"] for p in r["probes"]] for r in rows}
    ys = {label(r): [p["peak_mib"] for p in r["probes"]] for r in rows}
    draw(
        "lines",
        xs,
        ys,
        out / "context_model.png",
        xlabel="tokens per process",
        ylabel="peak MiB above the state",
        title=f"{path.rstrip('/').rsplit('/', 1)[-1]}: training step memory (budget {args.budget_mib:.0f} MiB)",
        logx=True,
    )
    print(md)
    return dict(rows=rows)


def table(args, rows: list[dict]) -> str:
    lines = [
        f"`{args.model}`, float32, batch 1, causal: the longest sequence whose training step keeps every "
        f"process within {args.budget_mib:.0f} MiB above its state (runtime, weights, gradients, optimizer "
        f"moments: the resident set between steps) (searched in steps of "
        f"{args.granularity} tokens per process, up to {args.context_max_tokens}), and memory per token of a "
        "process (the peak's slope between the longest probe and the longest at most half as long).",
        "",
        "| method | processes | option | longest sequence | KiB per token per process | state MiB per process |"
        " seconds at the longest |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        top = next((p for p in r["probes"] if p["seq"] == r["max_seq"]), None)
        slope = f"{r['per_token_kib']:.0f}" if r["per_token_kib"] is not None else "-"
        name = "transformers (SDPA, full loss)" if r["method"] == "transformers" else "ringwise finetune"
        longest = r["max_seq"] or f"< {args.granularity * r['world']}"
        state = (top or r["probes"][0])["state_mib"]
        seconds = f"{top['seconds']:.1f}" if top else "-"
        lines.append(f"| {name} | {r['world']} | {r['option']} | {longest} | {slope} | {state:.0f} | {seconds} |")
    return "\n".join(lines) + "\n"
