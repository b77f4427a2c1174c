"""The longest sequence that trains within a fixed per-process memory budget (paper Table 3).

For each method, the longest global sequence whose forward+backward of a small model keeps
every process's peak resident memory (above its model state) within --budget-mib, found
by doubling then bisection on real runs:
  vanilla  one process, materialised attention scores, plain FFN and loss
  memeff   one process, fused SDPA attention, plain FFN and loss
  bpt      one process, blockwise attention + blockwise FFN and loss
  ring     W processes, ring attention + blockwise FFN and loss (W from --ring-worlds)
The paper's claim: ring on W devices trains W times the BPT length.
"""
from __future__ import annotations

from tqdm import tqdm

from ringwise.lab.cluster import LocalCluster
from ringwise.lab.memory import mib

from . import draw, write_results
from .scaling import step_memory

METHODS = {"vanilla": dict(attention="vanilla", blockwise=False),
           "memeff": dict(attention="sdpa", blockwise=False),
           "bpt": dict(attention="ring", blockwise=True)}


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

    if not ok(1):
        return 0, probes
    hi = 2
    while ok(hi):
        hi *= 2
    lo = hi // 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo * unit, probes


def add_arguments(p):
    p.add_argument("--budget-mib", type=float, default=32.0, help="context: per-process memory budget")
    p.add_argument("--context-model", default="tiny", help="context: model preset")
    p.add_argument("--ring-worlds", type=int, nargs="+", default=[2, 4, 8], help="context: ring sizes")
    p.add_argument("--granularity", type=int, default=512, help="context: search step in tokens per process")


QUICK = dict(budget_mib=8.0, ring_worlds=[2], granularity=256)  # 4 MiB resolved only 1-2 steps: flaky


def run(args) -> dict:
    budget = args.budget_mib * 2**20
    rows = []
    jobs = [(name, 1, ov) for name, ov in METHODS.items()] + [("ring", W, {}) for W in args.ring_worlds]
    with tqdm(total=len(jobs), desc="max-context bench", unit="method") as bar:
        for name, W, overrides in jobs:
            with LocalCluster(W, threads_per_rank=max(1, 2 // W), track_memory=True) as cluster:
                best, probes = longest(cluster, args.context_model, args.granularity * W, budget, overrides, bar,
                                       f"{name} W={W}")
            rows.append(dict(method=name, world=W, max_seq=best, probes=probes))
            bar.update()
    bpt = next(r["max_seq"] for r in rows if r["method"] == "bpt")
    lines = [f"Longest causal sequence whose forward+backward of preset `{args.context_model}` keeps each "
             f"process within {args.budget_mib:.0f} MiB above its model state (searched in steps of "
             f"{args.granularity} tokens per process).", "",
             "| method | processes | longest sequence | x BPT | target |", "|---|---|---|---|---|"]
    for r in rows:
        target = f">= {0.9 * r['world']:.1f}" if r["method"] == "ring" else ""
        lines.append(f"| {r['method']} | {r['world']} | {r['max_seq']} | {r['max_seq'] / bpt:.2f} | {target} |")
    md = "\n".join(lines) + "\n"
    out = write_results(args.out, "context", dict(rows=rows, budget_mib=args.budget_mib), md)
    ring = [r for r in rows if r["method"] == "ring"]
    draw("lines", {"ring (measured)": [r["world"] for r in ring], "W x BPT": [r["world"] for r in ring]},
         {"ring (measured)": [r["max_seq"] for r in ring], "W x BPT": [r["world"] * bpt for r in ring]},
         out / "context.png", xlabel="processes W", ylabel="longest sequence (tokens)",
         title=f"Max context at {args.budget_mib:.0f} MiB per process", logx=True, logy=True)
    print(md)
    return dict(rows=rows)
