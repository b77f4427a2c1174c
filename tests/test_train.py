"""The training job: checkpoints, exact resume (also on another ring size), the CLI."""
import json
from pathlib import Path

import pytest
import torch

from ringwise import checkpoints
from ringwise.cli import main
from ringwise.model import ModelConfig
from ringwise.train import _run
from test_model import train_args


def run_job(args):
    _run(args, "gloo")
    return True


def losses(folder):
    return [json.loads(line)["loss"] for line in open(folder / "metrics.jsonl")]


def job_args(out, **kw):
    base = dict(out=str(out), steps=6, ckpt_every=3, threads=1, seq_len=96, batch=4, lr=3e-3, warmup=2,
                eval_per_cell=1, eval_lengths=[96], eval_depths=[0.5], no_plots=True)
    base.update(kw)
    return train_args(**base)


def test_resume_reproduces_the_uninterrupted_run(cluster, tmp_path):
    straight, same_w, other_w = tmp_path / "straight", tmp_path / "same", tmp_path / "other"
    cluster(2).run(run_job, job_args(straight))
    cluster(2).run(run_job, job_args(same_w, stop_after=3))
    assert len(losses(same_w)) == 3
    assert [p.name for p in checkpoints.complete_checkpoints(same_w / "checkpoints")] == ["ckpt-00000003.pt"]
    cluster(2).run(run_job, job_args(same_w, resume=True))
    assert losses(same_w) == losses(straight)  # same W: bit for bit

    cluster(2).run(run_job, job_args(other_w, stop_after=3))
    cluster(3).run(run_job, job_args(other_w, resume=True))  # resume on a different ring size
    a, b = losses(other_w), losses(straight)
    assert len(a) == 6 and a[:3] == b[:3]
    assert all(abs(x - y) <= 1e-5 * abs(y) for x, y in zip(a[3:], b[3:])), (a, b)


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    folder = tmp_path / "ck"
    checkpoints.save(folder, dict(step=3, payload=torch.ones(3)))

    def dies_mid_write(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save(folder, dict(step=6, payload=torch.ones(3)))
    monkeypatch.undo()
    assert any(p.name.startswith(".ckpt-00000006.pt.tmp") for p in folder.iterdir())
    state = checkpoints.load_latest(folder)
    assert state["step"] == 3 and torch.equal(state["payload"], torch.ones(3))


def test_checkpoints_keep_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        checkpoints.save(tmp_path, dict(step=step), keep=2)
    assert [p.name for p in checkpoints.complete_checkpoints(tmp_path)] == ["ckpt-00000003.pt", "ckpt-00000004.pt"]


def test_resume_refuses_a_different_run(tmp_path):
    args = job_args(tmp_path)
    state = dict(config=ModelConfig(dim=64).to_dict(), args=checkpoints.run_args(args))
    with pytest.raises(ValueError, match="model.dim: checkpoint 64, now 32"):
        checkpoints.check_compatible(state, ModelConfig(dim=32, n_heads=4), args)
    args.seed = 5
    with pytest.raises(ValueError, match="--seed: checkpoint 0, now 5"):
        checkpoints.check_compatible(dict(config={}, args=checkpoints.run_args(job_args(tmp_path))), ModelConfig(), args)
    args = job_args(tmp_path, loss_on="recall", id_pool=9, fmt="registers")
    with pytest.raises(ValueError, match="--loss-on: checkpoint 'answer', now 'recall'"):
        checkpoints.check_compatible(dict(config={}, args=checkpoints.run_args(job_args(tmp_path))), ModelConfig(), args)


@pytest.mark.parametrize("flags,match", [
    (["--eval-decoys", "2"], "decoys=2 needs id_pool"),
    (["--fmt", "registers", "--loss-on", "recall"], "without id_pool"),
    (["--fmt", "registers", "--seq-len", "128"], "or let ids recur"),
    (["--dp", "3"], "--dp 3 must divide the world size 2"),
])
def test_train_refuses_bad_flags_before_starting_ranks(tmp_path, flags, match, monkeypatch):
    import ringwise.train as train

    monkeypatch.setattr(train, "elastic_run", lambda *a: pytest.fail("ranks started despite bad flags"))
    with pytest.raises(ValueError, match=match):
        main(["train", "--world", "2", "--seq-len", "64", "--out", str(tmp_path), *flags])
    assert not (tmp_path / "metrics.jsonl").exists()


def demo_flags():
    """`make demo`'s DEMO_FLAGS, read from the Makefile so the test follows the demo."""
    text = (Path(__file__).parents[1] / "Makefile").read_text().replace("\\\n", " ")
    line = next(line for line in text.splitlines() if line.startswith("DEMO_FLAGS ?="))
    return line.split("?=", 1)[1].split()


def test_train_cli_end_to_end(tmp_path):
    """`ringwise train` with the demo's flags (shortened) through PyTorch's elastic launcher:
    metrics, plots, summary, checkpoint."""
    out = tmp_path / "run"
    flags = demo_flags()
    assert "--id-pool" in flags and "--loss-on" in flags
    assert main(["train", *flags, "--world", "2", "--model", "tiny", "--steps", "3", "--batch", "4",
                 "--eval-per-cell", "1", "--out", str(out)]) == 0
    assert len(losses(out)) == 3
    for name in ("loss.png", "retrieval.png", "summary.json"):
        assert (out / name).stat().st_size > 0
    assert checkpoints.load_latest(out / "checkpoints")["step"] == 3


def test_train_on_text_files(cluster, tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "text"
    cluster(2).run(run_job, job_args(out, data="text", text=[str(text)], steps=2))
    assert len(losses(out)) == 2 and all(l > 0 for l in losses(out))


def test_fsdp_run_resumes_without_fsdp_on_another_ring(cluster, tmp_path):
    """Checkpoints hold whole state: an FSDP run continues unsharded on 3 ranks, same losses."""
    straight, mixed = tmp_path / "straight", tmp_path / "mixed"
    cluster(2).run(run_job, job_args(straight, steps=4, ckpt_every=2))
    cluster(2).run(run_job, job_args(mixed, steps=4, ckpt_every=2, stop_after=2, fsdp=True))
    cluster(3).run(run_job, job_args(mixed, steps=4, ckpt_every=2, resume=True))
    a, b = losses(mixed), losses(straight)
    assert len(a) == 4 and all(abs(x - y) <= 1e-5 * abs(y) for x, y in zip(a, b)), (a, b)
