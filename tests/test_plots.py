import math

import pytest

pytest.importorskip("matplotlib")

from ringwise.train.plots import (  # noqa: E402
    plot_bars,
    plot_lines,
    plot_loss_curve,
    plot_retrieval_heatmap,
    plot_retrieval_heatmaps,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_MAGIC


def test_retrieval_heatmap(tmp_path):
    lengths = [1024, 4096, 65536, 524288]
    depths = [0.0, 0.25, 0.5, 0.75, 1.0]
    acc = [[1.0, 0.9, 0.5, float("nan")] for _ in depths]  # nan: cell not evaluated
    out = plot_retrieval_heatmap(acc, lengths, depths, tmp_path / "sub" / "heat.png", title="t")
    assert out == tmp_path / "sub" / "heat.png"
    assert_png(out)
    with pytest.raises(ValueError, match="shape"):
        plot_retrieval_heatmap([[1.0]], lengths, depths, tmp_path / "bad.png")


def test_retrieval_heatmaps_side_by_side(tmp_path):
    """Before and after on one color scale, one title (the sample size goes there)."""
    before, after = [[0.5, 0.0], [0.0, 0.5]], [[1.0, 0.5], [0.5, 1.0]]
    out = plot_retrieval_heatmaps(
        {"before": before, "after": after},
        [64, 128],
        [0.0, 1.0],
        tmp_path / "two.png",
        title="Passkey retrieval, 2 documents per cell",
    )
    assert_png(out)
    with pytest.raises(ValueError, match="'after' has shape"):
        plot_retrieval_heatmaps({"before": before, "after": [[1.0]]}, [64, 128], [0.0, 1.0], tmp_path / "bad.png")


def test_retrieval_heatmap_accepts_tensors(tmp_path):
    torch = pytest.importorskip("torch")
    out = plot_retrieval_heatmap(torch.rand(3, 2), [128, 256], [0.0, 0.5, 1.0], tmp_path / "h.png")
    assert_png(out)


@pytest.mark.parametrize("n", [10, 200])
def test_loss_curve(tmp_path, n):
    steps = list(range(n))
    losses = [5.0 * math.exp(-s / 50) + 0.1 * ((s * 7) % 3) for s in steps]
    extra = {"eval": (steps[::5], losses[::5])}
    out = plot_loss_curve(steps, losses, tmp_path / f"loss{n}.png", title="loss", extra=extra, logy=True)
    assert_png(out)
    with pytest.raises(ValueError):
        plot_loss_curve([1, 2], [1.0], tmp_path / "bad.png")
    assert_png(plot_loss_curve(steps, losses, tmp_path / f"lr{n}.png", lr=[1e-3 * (s + 1) / n for s in steps]))
    with pytest.raises(ValueError, match="lr has 1 values for 2 steps"):
        plot_loss_curve([1, 2], [1.0, 0.5], tmp_path / "bad.png", lr=[1e-3])


def test_lines(tmp_path):
    ws = [1, 2, 4, 8]
    out = plot_lines(
        {"ring": ws, "plain": ws[:2]},
        {"ring": [1.0, 1.0, 1.0, 1.0], "plain": [1.0, 2.0]},
        tmp_path / "mem.png",
        xlabel="world size",
        ylabel="peak GiB",
        title="memory",
        logx=True,
        logy=True,
    )
    assert_png(out)
    with pytest.raises(ValueError, match="same labels"):
        plot_lines({"a": [1]}, {"b": [1]}, tmp_path / "bad.png")


def test_bars(tmp_path):
    out = plot_bars(
        ["8192:1", "16384:2"],
        {"measured": [120.0, 118.5], "planned": [33.0, None]},
        tmp_path / "bars.png",
        ylabel="MiB",
        title="memory",
        logy=True,
    )
    assert_png(out)
    with pytest.raises(ValueError, match="2 groups"):
        plot_bars(["a", "b"], {"x": [1.0]}, tmp_path / "bad.png")


def test_missing_matplotlib_gives_clear_error(tmp_path, monkeypatch):
    import sys

    for name in ["matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"]:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'ringwise\[plot\]'"):
        plot_lines({"a": [1]}, {"a": [1]}, tmp_path / "x.png")


def test_benchmarks_skip_the_picture_not_the_results(tmp_path, monkeypatch, capsys):
    """Without matplotlib a benchmark says the plot was skipped and how to get it."""
    import sys

    from ringwise.bench import draw

    assert_png(draw("lines", {"a": [1, 2]}, {"a": [1, 2]}, tmp_path / "ok.png"))
    for name in ["matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"]:
        monkeypatch.setitem(sys.modules, name, None)
    assert draw("bars", ["x"], {"a": [1.0]}, tmp_path / "no.png") is None
    assert not (tmp_path / "no.png").exists()
    out = capsys.readouterr().out
    assert "plot skipped" in out and "pip install 'ringwise[plot]'" in out


def test_modules_import_without_matplotlib():
    import subprocess
    import sys

    code = "import sys, ringwise.data, ringwise.train.plots; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_runs_plots_are_drawn_from_its_files(tmp_path):
    """draw_run (what `ringwise train` / `finetune` draw after the job): the loss curve from metrics.jsonl;
    from summary.json the retrieval heatmap, and finetune's perplexity by position and passkey heatmap."""
    import json

    from ringwise.train.plots import draw_run

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(dict(step=s, loss=3.0 / s)) + "\n" for s in (1, 2, 3)))
    grid = dict(accuracy=[[1.0, 0.5], [0.25, 0.0]], lengths=[64, 128], depths=[0.0, 1.0])
    (tmp_path / "summary.json").write_text(json.dumps(dict(retrieval=grid)))
    draw_run(tmp_path)
    assert_png(tmp_path / "loss.png")
    assert_png(tmp_path / "retrieval.png")
    assert not (tmp_path / "ppl_by_position.png").exists()
    ppl = dict(
        before=dict(starts=[0, 64, 128], ppl=[9.0, None, 7.0]), after=dict(starts=[0, 64, 128], ppl=[8.0, 6.0, 5.0])
    )
    (tmp_path / "retrieval.png").unlink()
    (tmp_path / "summary.json").write_text(json.dumps(dict(perplexity=ppl, passkey=grid)))
    draw_run(tmp_path)
    assert_png(tmp_path / "ppl_by_position.png")
    assert_png(tmp_path / "retrieval.png")
    # as a finetune run writes them: the learning rate per step, sample sizes, the passkey grid before and after
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps(dict(step=s, loss=3.0 / s, lr=1e-5 * s)) + "\n" for s in (1, 2, 3))
    )
    sized = {k: dict(v, tokens=[10, 0, 12], sequences=2) for k, v in ppl.items()}
    (tmp_path / "summary.json").write_text(
        json.dumps(
            dict(config=dict(eval_per_cell=2), perplexity=sized, passkey=dict(grid, before=[[0.0, 0.5], [0.5, 0.0]]))
        )
    )
    draw_run(tmp_path)
    for name in ("loss.png", "ppl_by_position.png", "retrieval.png"):
        assert_png(tmp_path / name)


def test_a_curves_label_says_how_much_was_evaluated():
    from ringwise.train.plots import _evaluated, _per_cell

    label = _evaluated("before", dict(sequences=8, tokens=[7000.0, 680.0, 0]))
    assert label == "before training (8 sequences, 7,680 tokens)"
    assert _evaluated("after", dict(sequences=1, tokens=[5.0])) == "after training (1 sequence, 5 tokens)"
    assert _evaluated("after", {}) == "after training"
    assert _per_cell(2) == ", 2 documents per cell" and _per_cell(None) == ""
