"""PNG figures for training runs (`draw_run`: what `ringwise train` / `finetune` draw from a
run's files after the job) and the primitives the benchmarks draw with too.

matplotlib is an optional dependency (``pip install ringwise[plot]``), imported only when
a plot is drawn, so the library and the training job run without it.  Figures are drawn
with the object-oriented API on an Agg canvas: no pyplot global state, no display needed,
nothing leaks between calls, and the user's own backend choice is left alone.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Sequence

__all__ = [
    "draw_run",
    "plot_retrieval_heatmap",
    "plot_retrieval_heatmaps",
    "plot_loss_curve",
    "plot_lines",
    "plot_bars",
]


def _figure(figsize):
    """A fresh matplotlib Figure on an Agg canvas, or a clear ImportError."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            "ringwise plotting needs matplotlib: pip install 'ringwise[plot]' (or pip install matplotlib)"
        ) from e
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, format="png")
    return path


def _tolist(x) -> list:
    """Lists, tuples, numpy arrays and torch tensors alike, without importing either."""
    return x.tolist() if hasattr(x, "tolist") else list(x)


def _human(n: int) -> str:
    """4096 -> '4K', 524288 -> '512K', 1048576 -> '1M' (context lengths on an axis)."""
    for div, unit in ((1 << 20, "M"), (1 << 10, "K")):
        if n >= div and n % (div // 8) == 0:
            v = n / div
            return f"{v:g}{unit}"
    return str(n)


def plot_retrieval_heatmap(
    acc, context_lengths: Sequence[int], depths: Sequence[float], path, title: str = "Line retrieval accuracy"
) -> Path:
    """Needle-in-a-haystack heatmap: x context length, y needle depth (%), color accuracy.

    ``acc[i][j]`` is the accuracy (0..1) at ``depths[i]`` and ``context_lengths[j]``;
    NaN marks a cell not evaluated (drawn grey).  Red is 0, green is 1, and each cell is
    annotated with its value.  Returns the PNG path.
    """
    return plot_retrieval_heatmaps({"": acc}, context_lengths, depths, path, title=title)


def plot_retrieval_heatmaps(
    panels: Mapping[str, object],
    context_lengths: Sequence[int],
    depths: Sequence[float],
    path,
    title: str = "Line retrieval accuracy",
) -> Path:
    """Heatmaps side by side on one color scale, one per ``panels`` item (its label -> an ``acc`` as
    plot_retrieval_heatmap's, e.g. ``{"before": ..., "after": ...}``), under one title."""
    grids = {}
    for label, acc in panels.items():
        rows = [[float(v) for v in _tolist(r)] for r in _tolist(acc)]
        if len(rows) != len(depths) or any(len(r) != len(context_lengths) for r in rows):
            shape = (len(rows), len(rows[0]) if rows else 0)
            raise ValueError(
                f"acc{f' {label!r}' if label else ''} has shape {shape}, expected (len(depths), "
                f"len(context_lengths)) = ({len(depths)}, {len(context_lengths)})"
            )
        grids[label] = rows
    import numpy as np  # matplotlib depends on numpy, so it is present once _figure succeeds

    n = max(1, len(grids))
    fig = _figure((0.2 + n * (1.0 + 0.9 * len(context_lengths)) + 1.0, 1.4 + 0.5 * len(depths)))
    axes = fig.subplots(1, n, squeeze=False, sharey=True)[0]
    cmap = _red_to_green()
    for ax, (label, rows) in zip(axes, grids.items()):
        data = np.ma.masked_invalid(np.array(rows, dtype=float))
        im = ax.imshow(data, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto", origin="upper")
        for i, row in enumerate(rows):
            for j, v in enumerate(row):
                ax.text(j, i, "-" if math.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(context_lengths)), [_human(int(n)) for n in context_lengths])
        ax.set_xlabel("context length (tokens)")
        if label:
            ax.set_title(label)
    axes[0].set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
    axes[0].set_ylabel("needle depth")
    if n == 1 and not next(iter(grids)):
        axes[0].set_title(title)
    else:
        fig.suptitle(title)
    fig.colorbar(im, ax=list(axes), label="accuracy")
    return _save(fig, path)


def _red_to_green():
    from matplotlib import colormaps

    return colormaps["RdYlGn"].with_extremes(bad="lightgrey")


def _plain_log_labels(axis):
    """Label a log axis '0.01', '2', '100' rather than in mathtext powers; minor ticks
    (2, 3, 5 x 10^k) get labels only when the axis spans under two decades."""
    from matplotlib.ticker import FuncFormatter

    def minor(v, _pos):
        lo, hi = axis.get_view_interval()
        if v <= 0 or lo <= 0 or hi / lo > 100:
            return ""
        mantissa = v / 10 ** math.floor(math.log10(v))
        return f"{v:g}" if any(abs(mantissa - m) < 1e-6 for m in (2, 3, 5)) else ""

    axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    axis.set_minor_formatter(FuncFormatter(minor))


def _ema(values: list[float], alpha: float) -> list[float]:
    out, s = [], None
    for v in values:
        s = v if s is None else alpha * s + (1 - alpha) * v
        out.append(s)
    return out


def plot_loss_curve(
    steps,
    losses,
    path,
    title: str = "Training loss",
    extra: Mapping | None = None,
    smooth: float | None = None,
    logy: bool = False,
    lr=None,
) -> Path:
    """Loss against step (integer ticks), raw values faint with an exponential moving average on top.

    ``smooth`` is the EMA factor in [0, 1) (``None``: 0.9 when there are more than 50
    points, else no smoothing line).  ``extra`` adds labelled curves, e.g.
    ``{"eval": (eval_steps, eval_losses)}``.  ``lr``, one value per step, is drawn dashed
    against a second axis on the right (the schedule).  Returns the PNG path.
    """
    steps, losses = [float(s) for s in _tolist(steps)], [float(v) for v in _tolist(losses)]
    if len(steps) != len(losses):
        raise ValueError(f"steps and losses differ in length: {len(steps)} vs {len(losses)}")
    if lr is not None and len(_tolist(lr)) != len(steps):
        raise ValueError(f"lr has {len(_tolist(lr))} values for {len(steps)} steps")
    if smooth is None:
        smooth = 0.9 if len(losses) > 50 else 0.0
    if not 0.0 <= smooth < 1.0:
        raise ValueError(f"smooth must be in [0, 1), got {smooth}")
    fig = _figure((7, 4))
    from matplotlib.ticker import MaxNLocator  # (matplotlib is there once _figure succeeds)

    ax = fig.add_subplot()
    if smooth > 0:
        ax.plot(steps, losses, color="C0", alpha=0.3, linewidth=1, label="train (raw)")
        ax.plot(steps, _ema(losses, smooth), color="C0", linewidth=2, label=f"train (EMA {smooth:g})")
    else:
        ax.plot(
            steps,
            losses,
            color="C0",
            linewidth=1.5,
            marker="o" if len(steps) <= 20 else None,
            markersize=3,
            label="train",
        )
    for k, (label, (xs, ys)) in enumerate((extra or {}).items()):
        ax.plot(_tolist(xs), _tolist(ys), color=f"C{k + 1}", marker="o", markersize=3, linewidth=1.5, label=label)
    if logy:
        ax.set_yscale("log")
        _plain_log_labels(ax.yaxis)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if lr is not None:
        ax2 = ax.twinx()
        ax2.plot(steps, [float(v) for v in _tolist(lr)], color="C3", linestyle="--", linewidth=1, label="learning rate")
        ax2.set_ylabel("learning rate")
        ax2.set_ylim(bottom=0)
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        more = ax2.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels)
    return _save(fig, path)


def plot_lines(
    xs_by_label: Mapping[str, Sequence[float]],
    ys_by_label: Mapping[str, Sequence[float]],
    path,
    xlabel: str = "",
    ylabel: str = "",
    title: str = "",
    logx: bool = False,
    logy: bool = False,
) -> Path:
    """Generic labelled line plot for benchmarks (e.g. peak memory against world size).

    ``xs_by_label[label]`` and ``ys_by_label[label]`` are one series; both dicts must have
    the same labels.  ``logx`` uses base 2, since world sizes and sequence lengths are
    powers of two.  Returns the PNG path.
    """
    if set(xs_by_label) != set(ys_by_label):
        raise ValueError(
            f"xs_by_label and ys_by_label need the same labels: {sorted(xs_by_label)} vs {sorted(ys_by_label)}"
        )
    fig = _figure((7, 4.5))
    ax = fig.add_subplot()
    for label in ys_by_label:
        xs, ys = _tolist(xs_by_label[label]), _tolist(ys_by_label[label])
        if len(xs) != len(ys):
            raise ValueError(f"series {label!r}: {len(xs)} x values but {len(ys)} y values")
        ax.plot(xs, ys, marker="o", markersize=4, linewidth=1.5, label=str(label))
    if logx:
        ax.set_xscale("log", base=2)
        xs = sorted({float(x) for label in xs_by_label for x in _tolist(xs_by_label[label])})
        if 0 < len(xs) <= 16:  # few points (world sizes): tick exactly at them
            ax.set_xticks(xs, [f"{x:g}" for x in xs])
    if logy:
        ax.set_yscale("log")
        _plain_log_labels(ax.yaxis)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3, which="both")
    if ys_by_label:
        ax.legend()
    return _save(fig, path)


def plot_bars(
    groups: Sequence[str],
    values_by_series: Mapping[str, Sequence[float]],
    path,
    ylabel: str = "",
    title: str = "",
    logy: bool = False,
) -> Path:
    """Grouped bar chart: one group per case (``groups``), one bar per series in each group.

    For side-by-side comparisons that have no numeric x axis (measured vs planned memory per
    case, seconds per package).  A ``None`` or NaN value leaves its bar out.
    """
    groups = [str(g) for g in groups]
    fig = _figure((max(6.0, 1.2 * len(groups) + 2), 4.5))
    ax = fig.add_subplot()
    n = max(1, len(values_by_series))
    width = 0.8 / n
    for i, (label, values) in enumerate(values_by_series.items()):
        values = _tolist(values)
        if len(values) != len(groups):
            raise ValueError(f"series {label!r}: {len(values)} values for {len(groups)} groups")
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        keep = [(x, v) for x, v in zip(xs, values) if v is not None and not math.isnan(v)]
        bars = ax.bar([x for x, _ in keep], [v for _, v in keep], width=width, label=str(label))
        ax.bar_label(bars, fmt="%.3g", fontsize=7, padding=1)
    ax.set_xticks(range(len(groups)), groups)
    if logy:
        ax.set_yscale("log")
        _plain_log_labels(ax.yaxis)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3, which="both")
    if values_by_series:
        ax.legend()
    return _save(fig, path)


def _per_cell(n) -> str:
    return "" if n is None else f", {n} document{'s' * (n != 1)} per cell"


def _evaluated(name: str, r: dict) -> str:
    """'before training (8 sequences, 7,680 tokens)': a perplexity curve's label with its sample size."""
    n, tokens = r.get("sequences"), sum(t for t in r.get("tokens") or [] if t)
    size = ", ".join(
        part
        for part in (
            f"{n} sequence{'s' * (n != 1)}" if n is not None else "",
            f"{tokens:,.0f} tokens" if tokens else "",
        )
        if part
    )
    return f"{name} training" + (f" ({size})" if size else "")


def draw_run(out) -> None:
    """A run's plots from its metrics.jsonl and summary.json, into its folder: loss.png (with the
    learning rate); finetune's ppl_by_position.png and retrieval.png (passkey), before and after, with
    their sample sizes; the retrieval task's retrieval.png."""
    out = Path(out)
    recs = [json.loads(line) for line in open(out / "metrics.jsonl") if line.strip()]
    lr = [r["lr"] for r in recs] if recs and all("lr" in r for r in recs) else None
    plot_loss_curve(
        [r["step"] for r in recs],
        [r["loss"] for r in recs],
        out / "loss.png",
        title="Training loss (global mean per labelled token)",
        lr=lr,
    )
    summary = json.loads((out / "summary.json").read_text())
    per_cell = (summary.get("config") or {}).get("eval_per_cell")
    if "perplexity" in summary:  # finetune: held-out perplexity by position inside the document
        runs = {name: r for name, r in summary["perplexity"].items() if r}
        xs = {_evaluated(name, r): [s for s, p in zip(r["starts"], r["ppl"]) if p] for name, r in runs.items()}
        ys = {_evaluated(name, r): [p for p in r["ppl"] if p] for name, r in runs.items()}
        plot_lines(
            xs,
            ys,
            out / "ppl_by_position.png",
            xlabel="position inside the document (bucket start, tokens)",
            ylabel="held-out perplexity",
            title="Perplexity by position, before and after fine-tuning",
        )
    if "passkey" in summary:
        r = summary["passkey"]
        panels = (
            {"before fine-tuning": r["before"], "after fine-tuning": r["accuracy"]}
            if r.get("before")
            else {"after fine-tuning": r["accuracy"]}
        )
        plot_retrieval_heatmaps(
            panels, r["lengths"], r["depths"], out / "retrieval.png", title=f"Passkey retrieval{_per_cell(per_cell)}"
        )
    if "retrieval" in summary:
        r = summary["retrieval"]
        plot_retrieval_heatmap(
            r["accuracy"],
            r["lengths"],
            r["depths"],
            out / "retrieval.png",
            title=f"Line retrieval accuracy after training{_per_cell(per_cell)}",
        )
