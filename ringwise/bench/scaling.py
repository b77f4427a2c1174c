"""Per-rank memory of training the Blockwise Transformer as the ring grows.

Two sweeps, each a real forward+backward of the model across W gloo processes, with
per-rank peak resident memory measured above the state held before the step
(parameters, gradients, optimizer state are excluded: they do not depend on W):

* weak scaling: fixed tokens per rank, W = 1, 2, 4, 8, so the global sequence grows
  W-fold. Ring attention promises flat per-rank memory.
* strong scaling: fixed global sequence; per-rank memory should fall like 1/W.
"""

from __future__ import annotations

from tqdm import tqdm

from ringwise.testing.cluster import LocalCluster
from ringwise.testing.memory import mib

from . import draw, public_args, write_results
from .common import step_memory
from .flags import scaling_flags as add_arguments  # noqa: F401 (defined in flags.py: the CLI needs no suite)

QUICK = dict(tokens_per_rank=256, scaling_seq_len=1024, scaling_worlds=[1, 2, 4])


def run(args) -> dict:
    rows = []
    sweeps = [("weak", W, args.tokens_per_rank * W) for W in args.scaling_worlds]
    sweeps += [("strong", W, args.scaling_seq_len) for W in args.scaling_worlds]
    chunk = 1024
    with tqdm(total=len(sweeps), desc="scaling bench", unit="run") as bar:
        for W in args.scaling_worlds:
            with LocalCluster(W, threads_per_rank=1, track_memory=True) as cluster:
                for kind, w, global_len in sweeps:
                    if w != W:
                        continue
                    bar.set_postfix_str(f"{kind} W={W} S={global_len}")
                    res = cluster.run(
                        step_memory, args.scaling_model, global_len, args.scaling_layout, 1, chunk, timeout=3600
                    )
                    rows.append(
                        dict(
                            sweep=kind,
                            world=W,
                            global_len=global_len,
                            tokens_per_rank=global_len // W,
                            peak_mib_max=max(mib(p) for p, _ in res),
                            peak_mib_min=min(mib(p) for p, _ in res),
                            seconds=max(s for _, s in res),
                        )
                    )
                    bar.update()
    weak = [r for r in rows if r["sweep"] == "weak"]
    strong = [r for r in rows if r["sweep"] == "strong"]
    lines = [
        f"Model preset `{args.scaling_model}`, batch 1, causal {args.scaling_layout}, forward+backward of the "
        "training loss; per-rank peak resident memory above the model/optimizer state, max over ranks.",
        "",
    ]
    for title, part in (
        ("Weak scaling (fixed tokens per rank)", weak),
        ("Strong scaling (fixed global length)", strong),
    ):
        lines += [
            f"**{title}**",
            "",
            "| W | global tokens | tokens per rank | peak MiB per rank | seconds |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['world']} | {r['global_len']} | {r['tokens_per_rank']} | {r['peak_mib_max']:.1f} | "
            f"{r['seconds']:.2f} |"
            for r in part
        ]
        lines.append("")
    summary = {}
    w2 = [r for r in weak if r["world"] >= 2]
    if len(w2) >= 2:
        lo, hi = min(r["peak_mib_max"] for r in w2), max(r["peak_mib_max"] for r in w2)
        summary["weak_spread_from_W2"] = hi / lo - 1
        lines.append(
            f"Weak scaling: per-rank peak varies by {100 * (hi / lo - 1):.1f}% from W=2 to "
            f"W={w2[-1]['world']} while the global sequence grows {w2[-1]['world'] // w2[0]['world']}x."
        )
    if len(strong) >= 2:
        summary["strong_ratio"] = strong[0]["peak_mib_max"] / strong[-1]["peak_mib_max"]
        lines.append(
            f"Strong scaling: per-rank peak falls {summary['strong_ratio']:.2f}x from W={strong[0]['world']} "
            f"to W={strong[-1]['world']}."
        )
    md = "\n".join(lines) + "\n"
    out = write_results(args.out, "scaling", dict(args=public_args(args), rows=rows, summary=summary), md)
    draw(
        "lines",
        {"fixed tokens per rank": [r["world"] for r in weak], "fixed global length": [r["world"] for r in strong]},
        {
            "fixed tokens per rank": [r["peak_mib_max"] for r in weak],
            "fixed global length": [r["peak_mib_max"] for r in strong],
        },
        out / "scaling.png",
        xlabel="ranks W",
        ylabel="peak MiB per rank",
        title="Per-rank training memory vs ring size",
        logx=True,
    )
    print(md)
    return dict(rows=rows, summary=summary)
