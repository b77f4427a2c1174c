"""Measured per-rank training memory against the planner's analytic model.

The planner (ringwise.plan) predicts, per device, the activation memory of a training
step under full activation checkpointing: the saved layer inputs plus the peak of one
layer's recompute (paper Table 1, ring row: 6bch attention, 2bch FFN, scaled to float32).
Here the same function is evaluated for our model's shapes and compared with a real
forward+backward (per-layer checkpointing on) across W gloo ranks, for several (S, W).
Model state (parameters, gradients, optimizer) is excluded on both sides.
"""

from __future__ import annotations

from dataclasses import replace

from tqdm import tqdm

from ringwise import plan
from ringwise.model import model_config
from ringwise.testing.cluster import LocalCluster
from ringwise.testing.memory import mib

from . import draw, write_results
from .common import step_memory
from .flags import memory_flags as add_arguments  # noqa: F401 (defined in flags.py: the CLI needs no suite)


def planned_bytes(preset: str, global_len: int, world: int) -> dict:
    """The planner's ring activation bytes per device for our model (float32, 1 checkpoint/layer)."""
    cfg = model_config(preset)
    shape = plan.ModelShape(preset, cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, cfg.vocab_size)
    memory = replace(plan.DEFAULT_MEMORY, checkpoints_per_layer=1, bytes_per_element=4.0)
    parts = plan.training_memory("ring", shape, world, global_len, 1, memory)
    return {
        "checkpoints": parts["checkpoints"],
        "layer peak": parts["layer peak"],
        "total": parts["checkpoints"] + parts["layer peak"],
    }


def counted_bytes(preset: str, global_len: int, world: int) -> float:
    """ringwise's own per-token buffers (``plan.ringwise_activation_bytes``) for our model."""
    cfg = model_config(preset)
    shape = plan.ModelShape(preset, cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, cfg.vocab_size)
    return plan.ringwise_activation_bytes(shape, global_len // world, world)["total"]


QUICK = dict(memory_cases=["1024:1", "1024:2"])


def run(args) -> dict:
    rows = []
    cases = [tuple(int(x) for x in c.split(":")) for c in args.memory_cases]
    for S, W in tqdm(cases, desc="memory bench", unit="case"):
        with LocalCluster(W, threads_per_rank=1, track_memory=True) as cluster:
            res = cluster.run(step_memory, args.memory_model, S, "zigzag", 1, 1024, True, timeout=3600)
        measured = max(p for p, _ in res)
        planned = planned_bytes(args.memory_model, S, W)
        counted = counted_bytes(args.memory_model, S, W)
        rows.append(
            dict(
                seq=S,
                world=W,
                measured_mib=mib(measured),
                planned_mib=mib(planned["total"]),
                planned_checkpoints_mib=mib(planned["checkpoints"]),
                planned_layer_peak_mib=mib(planned["layer peak"]),
                ratio=measured / planned["total"],
                counted_mib=mib(counted),
                counted_ratio=measured / counted,
            )
        )
    cfg = model_config(args.memory_model)
    lines = [
        f"Model preset `{args.memory_model}` ({cfg.n_layers} layers, dim {cfg.dim}, ffn {cfg.ffn_dim}), "
        "batch 1, causal zigzag, per-layer activation checkpointing, float32; measured: per-rank peak "
        "resident memory of one forward+backward above the model state (max over ranks); planned: "
        "`ringwise.plan.training_memory('ring', ...)` checkpoints + layer peak (the paper's Table 1 "
        "accounting); counted: `ringwise.plan.ringwise_activation_bytes` (ringwise's own per-token buffers).",
        "",
        "| S | W | tokens per rank | measured MiB | planned MiB (checkpoints + layer peak) | measured / planned "
        "| counted MiB | measured / counted |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['seq']} | {r['world']} | {r['seq'] // r['world']} | {r['measured_mib']:.1f} | "
            f"{r['planned_mib']:.1f} ({r['planned_checkpoints_mib']:.1f} + {r['planned_layer_peak_mib']:.1f}) | "
            f"{r['ratio']:.2f} | {r['counted_mib']:.1f} | {r['counted_ratio']:.2f} |"
        )
    ratios = [r["ratio"] for r in rows]
    counted_ratios = [r["counted_ratio"] for r in rows]
    lines += [
        "",
        f"measured / planned ranges {min(ratios):.2f} to {max(ratios):.2f}; "
        f"measured / counted {min(counted_ratios):.2f} to {max(counted_ratios):.2f}.",
    ]
    md = "\n".join(lines) + "\n"
    out = write_results(args.out, "memory", dict(rows=rows), md)
    draw(
        "bars",
        [f"S={r['seq']}\nW={r['world']}" for r in rows],
        {
            "measured": [r["measured_mib"] for r in rows],
            "counted (ringwise buffers)": [r["counted_mib"] for r in rows],
            "planned (paper's Table 1)": [r["planned_mib"] for r in rows],
        },
        out / "memory.png",
        ylabel="per-rank activation peak, MiB",
        title=f"Measured vs planned memory, preset {args.memory_model}",
    )
    print(md)
    return dict(rows=rows)
