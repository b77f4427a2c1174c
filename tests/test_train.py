"""The training job: DCP checkpoints (exact resume, resharding, atomicity, fallback, export),
the launcher's checks and lock, bf16, the CLI."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_offload_changes_no_bit, offload_step, train_args

from ringwise.cli import main
from ringwise.model import Transformer, model_config
from ringwise.train import checkpoint, make_mesh, run_on_mesh
from ringwise.train.config import problems


def run_job(cfg):
    """One rank of a training job on the test cluster's process group."""
    run_on_mesh(cfg, make_mesh(cfg.dp, torch.device("cpu"), timeout=30, ulysses=cfg.ulysses))
    return True


def full_params(cfg):
    """The model of the run's newest checkpoint, loaded on this mesh, gathered whole."""
    from ringwise.train.loop import build

    run = build(cfg, make_mesh(cfg.dp, torch.device("cpu"), timeout=30, ulysses=cfg.ulysses))
    checkpoint.resume(Path(cfg.out) / "checkpoints", run.model, run.optimizer)
    return {k: v.full_tensor() for k, v in run.model.state_dict().items()}


def built_params(cfg):
    """The model as training builds it (meta device, sharded, shards filled), gathered whole."""
    from ringwise.train.loop import build

    run = build(cfg, make_mesh(cfg.dp, torch.device("cpu"), timeout=30, ulysses=cfg.ulysses))
    return {k: v.full_tensor() for k, v in run.model.state_dict().items()}


def test_the_loop_asks_its_task_not_the_configuration():
    """What differs between retrieval, text and finetune runs is the task's (tasks.py), picked once:
    loop.py reads neither cfg.pretrained nor cfg.data."""
    import ast
    import inspect

    from ringwise.train import loop, tasks

    read = {n.attr for n in ast.walk(ast.parse(inspect.getsource(loop))) if isinstance(n, ast.Attribute)}
    assert not read & {"pretrained", "data"}
    assert type(tasks.task_for(train_args())) is tasks.RetrievalTask
    assert type(tasks.task_for(train_args(data="text", text=["corpus.txt"]))) is tasks.TextTask
    assert type(tasks.task_for(train_args(pretrained="model", data="documents"))) is tasks.FinetuneTask


def test_sharded_build_equals_the_whole_model(cluster):
    """Training never builds the model whole: each rank fills its shards one parameter at a
    time, and the result is exactly the model built whole in one process."""
    torch.manual_seed(0)
    whole = Transformer(model_config("tiny")).state_dict()
    for params in cluster(3).run(built_params, job_args("unused", seed=0)):
        assert whole.keys() == params.keys() and all(torch.equal(whole[k], params[k]) for k in whole)


def ffn_chunks(cfg):
    from ringwise.train.loop import build

    run = build(cfg, make_mesh(1, torch.device("cpu"), timeout=30))
    return [layer.ffn.chunk for layer in run.model.layers], run.model.cfg.loss_chunk


def test_ffn_tile_sets_the_own_models_feed_forward_chunk(cluster):
    """--ffn-tile N: ringwise's own model runs its SwiGLU blockwise in chunks of N tokens; 0: one untiled
    call (the loss keeps its chunks); default: the preset's ffn_chunk."""
    got = {t: cluster(1).run(ffn_chunks, job_args("unused", ffn_tile=t))[0] for t in (None, 0, 16)}
    layers = len(got[None][0])
    assert got == {None: ([1024] * layers, 1024), 0: ([None] * layers, 1024), 16: ([16] * layers, 1024)}


def fsdp_units(preset):
    from torch.distributed.fsdp import FSDPModule

    from ringwise.train import shard_model

    with torch.device("meta"):
        model = Transformer(model_config(preset))
    shard_model(model, make_mesh(1, torch.device("cpu"), timeout=30), torch.bfloat16)
    return sum(isinstance(m, FSDPModule) for m in model.modules())


def test_large_models_are_gathered_one_layer_at_a_time(cluster):
    """FSDP units: one per layer (plus the root) for a 7B shape, one for the demo's 0.5M."""
    assert cluster(1).run(fsdp_units, "llama-7b") == [33]
    assert cluster(1).run(fsdp_units, "small") == [1]


def losses(folder):
    return [json.loads(line)["loss"] for line in open(folder / "metrics.jsonl")]


def job_args(out, **kw):
    base = dict(
        out=str(out),
        steps=6,
        ckpt_every=3,
        threads=1,
        seq_len=96,
        batch=4,
        lr=3e-3,
        warmup=2,
        eval_per_cell=1,
        eval_lengths=[96],
        eval_depths=[0.5],
        no_plots=True,
    )
    return train_args(**{**base, **kw})


def close(a, b):
    return len(a) == len(b) and all(abs(x - y) <= 1e-5 * abs(y) for x, y in zip(a, b))


def test_resume_is_bit_identical_and_reshards(cluster, tmp_path):
    """Same mesh: a resumed run's losses equal the uninterrupted run's bit for bit, and the
    steps logged after the checkpoint (before the "kill") are not logged twice. Other world
    sizes and mesh shapes (4 -> 2, 2 -> 3, dp x cp 2x2 -> 1x4): the checkpoint's parameters
    load exactly, and the losses agree to float32 round-off. --offload-params (the model state in host
    memory) saves and resumes the same: the same-mesh run runs under it throughout and still equals the
    plain run bit for bit, and the 2 -> 3 resume loads a plain run's checkpoint under it."""
    straight = tmp_path / "straight"
    cluster(2).run(run_job, job_args(straight))
    same = tmp_path / "same"
    cluster(2).run(run_job, job_args(same, stop_after=3, offload_params=True))
    with open(same / "metrics.jsonl", "a") as f:  # step 3 was logged, then the job was killed
        f.write(json.dumps(dict(step=3, loss=0.0)) + "\n")
    cluster(2).run(run_job, job_args(same, resume=True, offload_params=True))
    assert losses(same) == losses(straight)

    for (w0, dp0), (w1, dp1) in [((4, 1), (2, 1)), ((2, 1), (3, 1)), ((4, 2), (4, 1))]:
        out = tmp_path / f"w{w0}dp{dp0}-w{w1}dp{dp1}"
        cluster(w0).run(run_job, job_args(out, dp=dp0, stop_after=3))
        saved = checkpoint.consolidated(checkpoint.newest_intact(out / "checkpoints")[0])["model"]
        offload = w1 == 3
        loaded = cluster(w1).run(full_params, job_args(out, dp=dp1, resume=True, offload_params=offload))
        for params in loaded:  # resharded exactly, on every rank
            assert saved.keys() == params.keys() and all(torch.equal(saved[k], params[k]) for k in saved)
        cluster(w1).run(run_job, job_args(out, dp=dp1, resume=True, offload_params=offload))
        assert close(losses(out), losses(straight)), (w0, dp0, w1, dp1, losses(out), losses(straight))
        meta = checkpoint.read_meta(checkpoint.newest_intact(out / "checkpoints")[0])
        assert (meta["step"], meta["world"], meta["mesh"]) == (6, w1, dict(dp=dp1, cp=w1 // dp1, ulysses=1))


def test_damaged_and_unfinished_checkpoints(cluster, tmp_path):
    """keep-last-N; an interrupted save's temp folder is removed; a truncated newest checkpoint
    is named and skipped for the newest intact one, and the resumed run is still exact."""
    out = tmp_path / "run"
    cluster(2).run(run_job, job_args(out, steps=6, ckpt_every=2, keep=2))
    first = losses(out)
    folder = out / "checkpoints"
    assert [p.name for p in checkpoint.checkpoints(folder)] == ["step-00000004", "step-00000006"]
    unfinished = folder / ".tmp-step-00000008"
    unfinished.mkdir()
    (unfinished / "__0_0.distcp").write_bytes(b"half a shard")
    newest = folder / "step-00000006"
    shard = next(p for p in newest.iterdir() if p.suffix == ".distcp")
    shard.write_bytes(shard.read_bytes()[:-10])
    assert "truncated or damaged" in checkpoint.problem(newest)
    assert checkpoint.newest_intact(folder)[0].name == "step-00000004"

    cluster(2).run(run_job, job_args(out, steps=6, ckpt_every=2, keep=2, resume=True))
    assert not unfinished.exists()
    assert losses(out) == first  # resumed from step 4, steps 4-5 replayed exactly, logged once
    assert checkpoint.problem(folder / "step-00000006") is None  # rewritten whole

    # Damage the size check cannot see: the newest fails to load on every rank, is named, skipped.
    meta = folder / "step-00000006" / ".metadata"
    meta.write_bytes(b"\0" * meta.stat().st_size)
    logs = cluster(2).run(resume_log, job_args(out, steps=6, ckpt_every=2, keep=2, resume=True))
    for said, step in logs:
        assert step == 4 and "step-00000006 failed to load" in said, said


def test_a_save_after_a_fallback_keeps_the_intact_checkpoint(cluster, tmp_path):
    """--keep 1 with a damaged newer checkpoint: resuming falls back to the intact one, and the
    next save prunes neither the checkpoint it just wrote nor count the damaged one as kept."""
    out = tmp_path / "run"
    cluster(2).run(run_job, job_args(out, steps=6, ckpt_every=2, keep=3, stop_after=6))
    folder = out / "checkpoints"
    for step in (4, 6):  # two damaged checkpoints newer than step 2
        shard = next(p for p in (folder / f"step-0000000{step}").iterdir() if p.suffix == ".distcp")
        shard.write_bytes(shard.read_bytes()[:-10])
    cluster(2).run(run_job, job_args(out, steps=6, ckpt_every=2, keep=1, resume=True, stop_after=3))
    assert checkpoint.newest_intact(folder)[0].name == "step-00000003"  # the save after the fallback
    assert not (folder / "step-00000002").exists()  # the older intact one pruned (keep 1)


def test_stop_after_at_or_below_the_resume_step_still_saves(cluster, tmp_path):
    """--stop-after 1 again after resuming at step 1: the one step trained is checkpointed, not lost."""
    out = tmp_path / "run"
    cluster(2).run(run_job, job_args(out, steps=4, ckpt_every=4, stop_after=1))
    cluster(2).run(run_job, job_args(out, steps=4, ckpt_every=4, stop_after=1, resume=True))
    assert checkpoint.read_meta(checkpoint.newest_intact(out / "checkpoints")[0])["step"] == 2
    assert len(losses(out)) == 2


def resume_log(cfg):
    from ringwise.train.loop import build

    run, said = build(cfg, make_mesh(cfg.dp, torch.device("cpu"), timeout=30, ulysses=cfg.ulysses)), []
    meta = checkpoint.resume(Path(cfg.out) / "checkpoints", run.model, run.optimizer, log=said.append)
    return "\n".join(said), meta["step"]


def rng_round_trip(cfg, save: bool):
    """Save (or not) this rank's seeded random state, draw from it, resume: which state is back?"""
    import torch.distributed as dist

    from ringwise.train.loop import build

    run = build(cfg, make_mesh(cfg.dp, torch.device("cpu"), timeout=30, ulysses=cfg.ulysses))
    folder = Path(cfg.out) / "rng-checkpoints"
    torch.manual_seed(1000 + dist.get_rank())
    before = torch.get_rng_state()
    if save:
        checkpoint.save(folder, 1, run.model, run.optimizer, {}, keep=1)
    torch.rand(100)  # the state moves on
    moved = torch.get_rng_state()
    checkpoint.resume(folder, run.model, run.optimizer)
    return dict(
        restored=torch.equal(torch.get_rng_state(), before),
        kept=torch.equal(torch.get_rng_state(), moved),
        draw=torch.rand(4),
    )


def test_each_rank_resumes_its_own_random_state(cluster, tmp_path):
    """Ranks draw different random numbers; a checkpoint keeps each rank's state (DCP alone would
    keep one copy), and a resume on more ranks leaves the new ranks' states alone."""
    cfg = job_args(tmp_path / "run")
    two = cluster(2).run(rng_round_trip, cfg, True)
    assert all(r["restored"] for r in two) and not torch.equal(two[0]["draw"], two[1]["draw"])
    names = sorted(p.name for p in checkpoint.newest_intact(tmp_path / "run" / "rng-checkpoints")[0].iterdir())
    assert [n for n in names if n.startswith("rng-")] == ["rng-rank-00000.pt", "rng-rank-00001.pt"]
    three = cluster(3).run(rng_round_trip, cfg, False)
    assert [r["restored"] for r in three] == [True, True, False] and three[2]["kept"]
    assert torch.equal(three[0]["draw"], two[0]["draw"]) and torch.equal(three[1]["draw"], two[1]["draw"])


def test_export_writes_one_loadable_file(cluster, tmp_path, capsys):
    out = tmp_path / "run"
    cluster(2).run(run_job, job_args(out, steps=2, ckpt_every=2))
    assert main(["export", str(out), str(tmp_path / "model.pt")]) == 0
    state = checkpoint.load_export(tmp_path / "model.pt")  # weights_only=True
    assert state["step"] == 2
    model = Transformer(model_config("tiny"))
    model.load_state_dict(state["model"])  # every key, right shapes: usable for inference in one process
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "x.pt")]) == 2
    assert "no intact checkpoint" in capsys.readouterr().err


def test_bf16_training_lowers_the_loss(cluster, tmp_path):
    """--dtype bf16: bf16 compute through FSDP2's MixedPrecisionPolicy, float32 master
    weights and optimizer state; the loss falls over a few steps."""
    out = tmp_path / "bf16"
    cluster(2).run(run_job, job_args(out, dtype="bf16", steps=8, ckpt_every=8, lr=1e-2, loss_on="all"))
    got = losses(out)
    assert all(map(torch.isfinite, torch.tensor(got))) and got[-1] < 0.8 * got[0], got
    fp32 = tmp_path / "fp32"
    cluster(2).run(run_job, job_args(fp32, dtype="fp32", steps=1, ckpt_every=1, lr=1e-2, loss_on="all"))
    assert 0 < abs(got[0] - losses(fp32)[0]) < 1e-2 * got[0]  # computed in bf16 indeed, and close
    state = checkpoint.consolidated(checkpoint.newest_intact(out / "checkpoints")[0])
    assert {v.dtype for v in state["model"].values()} == {torch.float32}


def test_dtype_defaults_to_bf16_on_cuda_and_fp32_on_cpu():
    from ringwise.train import TrainConfig

    assert TrainConfig().compute_dtype(torch.device("cuda", 0)) == torch.bfloat16
    assert TrainConfig().compute_dtype(torch.device("cpu")) == torch.float32
    assert TrainConfig(dtype="fp32").compute_dtype(torch.device("cuda", 0)) == torch.float32
    assert TrainConfig(dtype="bf16").compute_dtype(torch.device("cpu")) == torch.bfloat16


def test_train_on_a_ulysses_ring_mesh(cluster, tmp_path):
    """--ulysses 2 on 4 ranks (ring 2 x ulysses 2): trains, evaluates, and its first loss equals
    the plain ring's on the same batch (the same model, exact attention either way)."""
    out = tmp_path / "usp"
    cluster(4).run(run_job, job_args(out, ulysses=2, steps=2, ckpt_every=2, loss_on="all"))
    ring = tmp_path / "ring"
    cluster(4).run(run_job, job_args(ring, steps=1, ckpt_every=1, loss_on="all"))
    assert abs(losses(out)[0] - losses(ring)[0]) <= 1e-5 * losses(ring)[0]
    meta = checkpoint.read_meta(checkpoint.newest_intact(out / "checkpoints")[0])
    assert meta["mesh"] == dict(dp=1, cp=2, ulysses=2)
    assert "retrieval" in json.loads((out / "summary.json").read_text())  # evaluation ran on the mesh too


def test_train_on_text_files(cluster, tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "text"
    cluster(2).run(run_job, job_args(out, data="text", text=[str(text)], steps=2))
    assert len(losses(out)) == 2 and all(loss > 0 for loss in losses(out))
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert len(rec["peak_rss_mib_per_rank"]) == 2 and rec["peak_rss_mib"] == max(rec["peak_rss_mib_per_rank"]) > 0
    meta = checkpoint.read_meta(checkpoint.newest_intact(out / "checkpoints")[0])
    assert meta["task"] is None  # no retrieval grid: nothing for `ringwise generate --retrieval` to answer


@pytest.fixture
def no_ranks(monkeypatch):
    import ringwise.train.job as job

    monkeypatch.setattr(job, "elastic_run", lambda *a: pytest.fail("ranks started despite bad flags"))


@pytest.mark.parametrize(
    "flags,match",
    [
        (["--eval-decoys", "2"], "decoys=2 needs id_pool"),
        (["--fmt", "registers", "--loss-on", "recall"], "without id_pool"),
        (["--fmt", "registers", "--seq-len", "128"], "or let ids recur"),
        (["--dp", "3"], "--dp 3 must divide the world size 2"),
        (["--world", "0"], "--world 0: must be a positive integer"),
        (["--world", "-2"], "--world -2: must be a positive integer"),
        (["--steps", "-5"], "--steps -5: must be a positive integer"),
        (["--ckpt-every", "-1"], "--ckpt-every -1: must be a positive integer"),
        (["--batch", "0"], "--batch 0: must be a positive integer"),
        (["--seq-len", "66"], "--seq-len 66 must be a positive multiple of 4"),
        (["--batch", "3", "--dp", "2"], "--batch 3 must be divisible by --dp 2"),
        (["--lr", "nan"], "--lr nan: must be a finite number > 0"),
        (["--timeout", "0"], "--timeout 0.0: must be a finite number > 0"),
        (["--data", "text", "--text", "missing.txt"], "--text: no such file or folder: missing.txt"),
        (["--ulysses", "3"], "--dp 1 x --ulysses 3 must divide the world size 2"),
        (["--world", "8", "--ulysses", "8", "--seq-len", "64"], "--ulysses 8 must divide the 4 attention heads"),
        (["--ulysses", "0"], "--ulysses 0: must be a positive integer"),
        (
            ["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cpu", "--backend", "nccl"],
            "--device cuda: torch sees no GPU"
            if not torch.cuda.is_available()
            else "--backend nccl needs --device cuda",
        ),
    ],
)
def test_train_refuses_bad_flags_before_starting_ranks(tmp_path, flags, match, no_ranks, capsys):
    assert main(["train", "--world", "2", "--seq-len", "64", "--out", str(tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err and len(err.splitlines()) <= 4, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "device,backend,ranks,gpus,want",
    [
        ("auto", None, 4, 0, ("cpu", "gloo")),
        ("auto", None, 1, 1, ("cuda", "nccl")),
        ("auto", None, 8, 8, ("cuda", "nccl")),
        ("auto", None, 2, 1, ("cuda", "gloo")),  # two ranks share one GPU: gloo, host-staged ring hops
        ("cuda", "gloo", 1, 1, ("cuda", "gloo")),
        ("cpu", None, 2, 8, ("cpu", "gloo")),  # CPU training on a GPU machine
        ("cuda", None, 1, 0, "--device cuda: torch sees no GPU"),
        ("cpu", "nccl", 1, 1, "--backend nccl needs --device cuda"),
        ("auto", "nccl", 1, 0, "--backend nccl needs --device cuda"),
        ("auto", "nccl", 2, 1, "NCCL refuses two ranks on one GPU; use --backend gloo"),
    ],
)
def test_placement_of_ranks_on_devices(device, backend, ranks, gpus, want):
    """Where the ranks run and how they talk: decided from the flags and the node's GPUs alone,
    so the launcher's check and every rank reach the same answer."""
    from ringwise.train.mesh import placement

    if isinstance(want, str):
        with pytest.raises(ValueError, match=want):
            placement(device, backend, ranks, gpus)
    else:
        assert placement(device, backend, ranks, gpus) == want


def test_every_problem_is_reported_at_once(tmp_path, no_ranks, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02")
    (tmp_path / "afile").write_text("x")
    assert (
        main(
            [
                "train",
                "--world",
                "2",
                "--steps",
                "0",
                "--lr",
                "nan",
                "--out",
                str(tmp_path / "afile"),
                "--data",
                "text",
                "--text",
                str(tmp_path / "blob.bin"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    for what in ("4 problems", "--steps 0", "--lr nan", "afile: is a file", "blob.bin is not UTF-8 text"):
        assert what in err, err
    cfg = job_args(tmp_path / "x", data="text", text=[str(tmp_path / "empty")])
    assert problems(cfg) == [f"--text: {tmp_path / 'empty'} is a folder with no files in it"]


def test_a_folder_runs_one_job_at_a_time(tmp_path, no_ranks, capsys):
    out = tmp_path / "run"
    with checkpoint.RunLock(out):
        with pytest.raises(checkpoint.LockHeld, match=f"pid {os.getpid()} on {socket.gethostname()}"):
            checkpoint.RunLock(out).acquire()
        assert main(["train", "--world", "2", "--seq-len", "64", "--out", str(out)]) == 2
        assert f"in use by another job (pid {os.getpid()}" in capsys.readouterr().err
    assert not (out / ".lock").exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".lock").write_text(f"{dead.pid} {socket.gethostname()}")  # a killed job's lock
    with checkpoint.RunLock(out):
        assert (out / ".lock").read_text() == f"{os.getpid()} {socket.gethostname()}"


def test_a_killed_holders_lock_is_free_at_once(tmp_path):
    """The lock is a flock held for the job's life: another process is refused while the holder
    lives, and the kernel frees it the moment the holder is killed (no stale-lock race)."""
    out = tmp_path / "run"
    code = (
        "import sys, time; from ringwise.train.checkpoint import RunLock; RunLock(sys.argv[1]).acquire(); "
        "print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(checkpoint.LockHeld, match=f"pid {holder.pid} on {socket.gethostname()}"):
            checkpoint.RunLock(out).acquire()
    finally:
        holder.kill()
        holder.wait()
    with checkpoint.RunLock(out):
        assert (out / ".lock").read_text() == f"{os.getpid()} {socket.gethostname()}"


def test_fresh_start_refuses_a_folder_with_checkpoints(cluster, tmp_path, no_ranks, capsys):
    out = tmp_path / "run"
    cluster(2).run(run_job, job_args(out, steps=2, ckpt_every=2))
    assert main(["train", "--world", "2", "--model", "tiny", "--seq-len", "96", "--out", str(out)]) == 2
    assert "holds checkpoints up to step 2: pass --resume" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--world",
                "2",
                "--model",
                "tiny",
                "--seq-len",
                "96",
                "--batch",
                "4",
                "--seed",
                "5",
                "--out",
                str(out),
                "--resume",
            ]
        )
        == 2
    )
    assert "--seed: checkpoint 0, now 5" in capsys.readouterr().err


def demo_flags():
    """`make demo`'s DEMO_FLAGS, read from the Makefile so the test follows the demo."""
    text = (Path(__file__).parents[1] / "Makefile").read_text().replace("\\\n", " ")
    line = next(line for line in text.splitlines() if line.startswith("DEMO_FLAGS ?="))
    return line.split("?=", 1)[1].split()


def test_train_cli_end_to_end(tmp_path):
    """`ringwise train` with the demo's flags (shortened) through PyTorch's elastic launcher:
    metrics, plots, summary, checkpoint, lock released."""
    out = tmp_path / "run"
    flags = demo_flags()
    assert "--id-pool" in flags and "--loss-on" in flags
    assert (
        main(
            [
                "train",
                *flags,
                "--world",
                "2",
                "--model",
                "tiny",
                "--steps",
                "3",
                "--batch",
                "4",
                "--eval-per-cell",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert len(losses(out)) == 3
    for name in ("loss.png", "retrieval.png", "summary.json"):
        assert (out / name).stat().st_size > 0
    assert checkpoint.read_meta(checkpoint.newest_intact(out / "checkpoints")[0])["step"] == 3
    assert not (out / ".lock").exists()
    # `make demo` again resumes its folder: a finished run trains nothing more and re-evaluates
    (out / "summary.json").unlink()
    assert (
        main(
            [
                "train",
                *flags,
                "--world",
                "2",
                "--model",
                "tiny",
                "--steps",
                "3",
                "--batch",
                "4",
                "--eval-per-cell",
                "1",
                "--out",
                str(out),
                "--resume",
            ]
        )
        == 0
    )
    assert len(losses(out)) == 3
    assert json.loads((out / "summary.json").read_text())["final_loss"] == losses(out)[-1]  # not NaN


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_train_on_one_gpu_under_nccl(tmp_path):
    """`ringwise train` on one GPU: NCCL for every collective (loss totals, peak memory, FSDP2,
    checkpoint save and resume, evaluation), bf16 by default, GPU peak memory in the metrics."""
    out = tmp_path / "gpu"
    flags = [
        "train",
        "--world",
        "1",
        "--model",
        "tiny",
        "--seq-len",
        "128",
        "--batch",
        "2",
        "--steps",
        "4",
        "--ckpt-every",
        "2",
        "--eval-per-cell",
        "1",
        "--eval-lengths",
        "128",
        "--no-plots",
        "--out",
        str(out),
    ]
    assert main(flags + ["--stop-after", "2"]) == 0
    assert main(flags + ["--resume"]) == 0
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in recs] == [0, 1, 2, 3] and all(r["peak_gpu_mib"] > 0 for r in recs)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)
    assert json.loads((out / "summary.json").read_text())["retrieval"]["accuracy"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_train_two_ranks_share_one_gpu(tmp_path):
    """`ringwise train --world 2` on one GPU: gloo (NCCL refuses two ranks on one GPU), ring hops
    staged through host memory, FSDP2 and checkpoints over gloo's CUDA collectives; in fp32 its
    losses equal one rank's on the same GPU."""
    common = [
        "train",
        "--model",
        "tiny",
        "--seq-len",
        "128",
        "--batch",
        "2",
        "--steps",
        "3",
        "--ckpt-every",
        "3",
        "--eval-per-cell",
        "1",
        "--eval-lengths",
        "128",
        "--no-plots",
        "--dtype",
        "fp32",
    ]
    assert main(common + ["--world", "2", "--out", str(tmp_path / "w2")]) == 0
    assert main(common + ["--world", "1", "--out", str(tmp_path / "w1")]) == 0
    two, one = ([json.loads(line) for line in open(tmp_path / w / "metrics.jsonl")] for w in ("w2", "w1"))
    assert len(two) == len(one) == 3 and all(r["peak_gpu_mib"] > 0 for r in two)
    for a, b in zip(two, one):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(b["loss"]), (a["loss"], b["loss"])


def _rank0_disk_full():
    def fail():
        raise OSError(28, "No space left on device")

    try:
        checkpoint._on_rank0(fail, "finishing step-00000002")
    except RuntimeError as e:
        return str(e)
    return None


def _rank1_disk_full():
    import torch.distributed as dist

    def fail():
        if dist.get_rank() == 1:
            raise OSError(28, "No space left on device")

    try:
        checkpoint._collectively(fail, "saving the random state into step-x")
    except RuntimeError as e:
        return str(e)
    return None


def test_a_per_rank_write_that_fails_on_one_rank_fails_every_rank_alike(cluster):
    """Each rank writes its own random state; one rank's disk full stops all of them at once."""
    said = cluster(3).run(_rank1_disk_full, timeout=20)
    assert said[0] == said[1] == said[2] and "saving the random state into step-x failed on rank 1" in said[0]


def test_a_save_that_fails_on_rank0_fails_every_rank_alike(cluster):
    """Rank 0 alone renames and prunes: if that fails (disk full), every rank raises its error at
    once instead of waiting at a barrier for the timeout."""
    said = cluster(2).run(_rank0_disk_full, timeout=20)
    assert said[0] == said[1] and "finishing step-00000002 failed on rank 0" in said[0] and "No space" in said[0]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_offload_params_changes_no_bit_of_a_step(cluster, world):
    """--offload-params: every FSDP unit of the own model runs under CPUOffloadPolicy (each parameter's
    shard held on the host), and a step (clipped: grad_clip far below the gradient's norm) gives the
    same loss, parameters and AdamW moments, bit for bit: on a CPU run the policy's host-device copies
    are no-ops and the optimizer ran on the CPU already, so the same kernels run in the same order."""
    cfg = job_args("unused", grad_clip=1e-3, dp=1)
    for got in cluster(world).run(offload_step, cfg):
        assert_offload_changes_no_bit(got)


# One rank on one GPU (NCCL), in its own process: one clipped step with and without --offload-params; what
# stays allocated on the GPU after it, the state's bytes, the loss and the parameters (whole at W=1).
_GPU_OFFLOAD_JOB = """
import gc, json, sys, torch, torch.distributed as dist
from ringwise.train import make_mesh
from ringwise.train.config import TrainConfig
from ringwise.train.loop import build, step
from ringwise.train.mesh import init_distributed
device = init_distributed("cuda", None, 120)
got, params = {}, {}
for offload in (False, True):
    cfg = TrainConfig(model="base", seq_len=256, batch=2, steps=2, lr=1e-3, warmup=1, grad_clip=1e-3,
                      offload_params=offload, out=sys.argv[1])
    run = build(cfg, make_mesh(1, device, 120))
    n = sum(p.numel() for p in run.model.parameters())
    loss = step(run, 0)["loss"]
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    state = [t for p in run.model.parameters() for t in (p, *run.optimizer.state[p].values()) if t.dim() > 0]
    devices = sorted({t.to_local().device.type for t in state})
    params[offload] = [p.to_local().detach().cpu() for p in run.model.parameters()]
    got[offload] = dict(params=n, loss=loss, held=held, devices=devices)
    del run, state
    gc.collect()
    torch.cuda.empty_cache()
got["param_diff"] = max((a - b).abs().max().item() for a, b in zip(params[False], params[True]))
dist.destroy_process_group()
print(json.dumps(got))
"""


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offload_params_on_a_gpu_moves_the_model_state_to_the_host(tmp_path):
    """--offload-params on one GPU under NCCL: the parameter shards and AdamW moments live in host memory,
    and after a step the GPU holds less than a quarter of the weights' and moments' 12 bytes per parameter
    (without it, at least those 12 bytes: the measure sees the state). The first step's loss is the same
    (the same forward on the same weights, copied to the GPU to compute; float32 rounding allowed) and the
    parameters after it agree to float32 rounding (AdamW ran on the CPU instead of the GPU)."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        env["MASTER_PORT"] = str(s.getsockname()[1])
    done = subprocess.run(
        [sys.executable, "-c", _GPU_OFFLOAD_JOB, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    plain, offloaded = got["false"], got["true"]
    n = plain["params"]
    assert plain["devices"] == ["cuda"] and offloaded["devices"] == ["cpu"]
    # what the run keeps besides the state (cuBLAS's workspaces: 64 MiB on an H200) is the same in both runs:
    # the offloaded run holds at least the weights' and moments' 12 bytes per parameter less, less 3 of slack
    assert plain["held"] - offloaded["held"] >= 9 * n, (plain["held"], offloaded["held"], n)
    assert abs(offloaded["loss"] - plain["loss"]) <= 1e-6 * abs(plain["loss"])
    assert got["param_diff"] <= 1e-6
