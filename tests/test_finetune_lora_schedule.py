"""ringwise finetune --lora R and --seq-len as a schedule (LEN:STEPS,...).

LoRA: peft's adapters injected into the transformers model before FSDP2 shards it (base weights frozen,
the optimizer given the adapters only); three steps at W = 2 equal W = 1 (losses and adapter weights) to
float32 rounding; the merged export loads with transformers and gives base + adapter's logits; bad ranks
and unknown target modules are refused before any rank starts.
The schedule: each stage trains at its own length (the metrics record the length of the shards as
trained), a run stopped in stage 2 resumes there, and bad schedules are refused with the reason."""

import json

import pytest
import torch
import torch.distributed as dist

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
peft = pytest.importorskip("peft")

from hf_models import save_tiny_checkpoint, word_documents  # noqa: E402

from ringwise.train.config import TrainConfig  # noqa: E402
from ringwise.train.pretrained import dtype_kwarg  # noqa: E402

SEQ = 48


@pytest.fixture(scope="module")
def checkpoint_and_text(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    model = save_tiny_checkpoint(root / "model", "llama", tie_word_embeddings=True)
    text = root / "text"
    text.mkdir()
    (text / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in word_documents(30, seed=5)))
    return model, text


def config(model, text, out, **kw):
    base = dict(
        pretrained=str(model),
        text=[str(text)],
        data="documents",
        seq_len=SEQ,
        batch=2,
        steps=3,
        lr=1e-2,
        warmup=1,
        weight_decay=0.1,
        ckpt_every=100,
        eval_sequences=1,
        eval_bucket=16,
        eval_per_cell=1,
        eval_depths=[0.5],
        out=str(out),
        no_plots=True,
        timeout=60.0,
        lora=4,
        lora_alpha=8,
    )
    base.update(kw)
    return TrainConfig(**base)


# ---------------------------------------------------------------- LoRA


def lora_job(cfg_dict):
    """Three of the loop's steps; the losses, the whole adapters after them, what the optimizer holds and
    whether the frozen base got a gradient or moved."""
    from ringwise.train.loop import setup, step
    from ringwise.train.mesh import make_mesh

    cfg = TrainConfig(**cfg_dict)
    run = setup(cfg, make_mesh(1, torch.device("cpu"), cfg.timeout))
    named = dict(run.model.named_parameters())
    base_before = {n: p.full_tensor().clone() for n, p in named.items() if not p.requires_grad}
    losses = [step(run, s)["loss"] for s in range(cfg.steps)]
    optimized = {id(p) for g in run.optimizer.param_groups for p in g["params"]}
    adapters = {n: p.full_tensor() for n, p in named.items() if p.requires_grad}
    base_moved = [n for n, before in base_before.items() if not torch.equal(named[n].full_tensor(), before)]
    only_adapters = optimized == {id(p) for p in named.values() if p.requires_grad}
    if dist.get_rank() == 0:
        return losses, adapters, base_moved, only_adapters, len(base_before)


def test_lora_steps_agree_across_world_sizes(cluster, checkpoint_and_text, tmp_path):
    model, text = checkpoint_and_text
    runs = {
        "W1": (1, {}),
        "W2": (2, {}),
        # layer checkpointing (transformers', non-reentrant) around the adapters, the feed-forward in 3 tiles,
        # the model state in host memory (CPUOffloadPolicy over frozen and trained shards alike)
        "W2-ckpt-ffn-tile8-offload": (2, dict(checkpoint_layers=True, ffn_tile=8, offload_params=True)),
    }
    got = {
        name: cluster(world).run(lora_job, vars(config(model, text, tmp_path / name, **kw)))[0]
        for name, (world, kw) in runs.items()
    }
    l1, a1, _, _, frozen = got["W1"]
    assert frozen > 0 and sorted(a1) and len(a1) == 2 * 7 * 2  # A and B of 7 projections in each of 2 layers
    assert all(".lora_A." in n or ".lora_B." in n for n in a1)
    assert len(set(l1)) == 3, l1  # the adapters changed the model
    for n in a1:
        assert not torch.equal(a1[n], torch.zeros_like(a1[n])), n  # every B moved off its zero start
    for name, (losses, adapters, moved, only_adapters, _) in got.items():
        assert moved == [] and only_adapters, name  # the base frozen, the optimizer given the adapters only
        assert sorted(adapters) == sorted(a1), name
        assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(losses, l1)), (name, losses, l1)
        for n in a1:
            scale = a1[n].abs().max()
            assert (adapters[n] - a1[n]).abs().max() <= 1e-5 * scale, (name, n, (adapters[n] - a1[n]).abs().max())


def test_lora_command_resumes_and_exports_merged_and_adapter(checkpoint_and_text, tmp_path, capsys):
    import shutil

    from ringwise.cli import main
    from ringwise.train import checkpoint

    model, text = checkpoint_and_text
    model = shutil.copytree(model, tmp_path / "model")  # removed at the end: the export needs it
    out = tmp_path / "run"
    flags = ["finetune", "--model", str(model), "--text", str(text), "--world", "2", "--seq-len", str(SEQ)]
    flags += ["--steps", "3", "--lr", "1e-2", "--warmup", "1", "--eval-sequences", "1", "--eval-bucket", "16"]
    flags += [
        "--eval-per-cell",
        "1",
        "--eval-depths",
        "0.5",
        "--eval-lengths",
        str(SEQ),
        "--lora",
        "4",
        "--lora-alpha",
        "8",
    ]
    flags += ["--no-plots"]
    flags += ["--out", str(out)]
    assert main(flags + ["--stop-after", "1"]) == 0
    on_one = [*flags[: flags.index("--world") + 1], "1", *flags[flags.index("--world") + 2 :]]
    assert main(on_one + ["--resume"]) == 0  # the adapters and their AdamW moments, resharded onto one rank
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [0, 1, 2]
    other = [*flags[: flags.index("--lora") + 1], "8", *flags[flags.index("--lora") + 2 :]]
    assert main(other + ["--resume"]) == 2  # another rank: another run

    # a checkpoint holds the adapters and their AdamW moments, not the frozen base (read from --model again)
    saved = checkpoint.consolidated(checkpoint.newest_intact(out / "checkpoints")[0])
    assert saved["model"] and all(".lora_A." in k or ".lora_B." in k for k in saved["model"]), sorted(saved["model"])
    assert len(saved["model"]) == 2 * 7 * 2

    merged, adapter = tmp_path / "merged", tmp_path / "adapter"
    assert main(["export", str(out), str(merged), "--hf"]) == 0
    assert main(["export", str(out), str(adapter), "--adapter"]) == 0
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
    plain = transformers.AutoModelForCausalLM.from_pretrained(merged, **dtype_kwarg(torch.float32))
    assert not any("lora" in k or "base_layer" in k for k in plain.state_dict())  # a plain transformers model
    base = transformers.AutoModelForCausalLM.from_pretrained(model, **dtype_kwarg(torch.float32))
    with_adapter = peft.PeftModel.from_pretrained(base, adapter)
    ids = torch.randint(0, plain.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = with_adapter(input_ids=ids).logits
        got = plain(input_ids=ids).logits
        untouched = transformers.AutoModelForCausalLM.from_pretrained(model)(input_ids=ids).logits
    assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (got - want).abs().max()
    assert (want - untouched).abs().max() > 1e-3 * want.abs().max()  # the adapters changed the logits
    assert torch.equal(plain.state_dict()["model.embed_tokens.weight"], base.state_dict()["model.embed_tokens.weight"])
    shutil.rmtree(model)
    capsys.readouterr()
    assert main(["export", str(out), str(tmp_path / "again"), "--hf"]) == 2
    assert "whose checkpoints hold the adapters only, and its base model" in capsys.readouterr().err


def test_bad_lora_flags_are_refused_before_any_rank_starts(checkpoint_and_text, tmp_path, capsys):
    from ringwise.cli import main

    model, text = checkpoint_and_text
    flags = ["finetune", "--model", str(model), "--text", str(text), "--world", "2", "--seq-len", str(SEQ)]
    flags += ["--eval-lengths", str(SEQ)]
    assert main([*flags, "--lora", "0", "--lora-alpha", "-2", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "--lora 0: LoRA's rank must be a positive integer" in err and "--lora-alpha -2" in err, err
    assert main([*flags, "--lora", "4", "--lora-targets", "q_proj", "qkv", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "1 problem" in err and "--lora-targets qkv: no linear module of --model" in err and "up_proj" in err, err
    assert main([*flags, "--lora-alpha", "4", "--out", str(tmp_path / "c")]) == 2
    assert "--lora-alpha needs --lora R" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing started
    full = tmp_path / "full"
    assert main(["export", str(full), str(tmp_path / "x"), "--adapter"]) == 2


# ---------------------------------------------------------------- --seq-len LEN:STEPS,...

SCHEDULE = [[24, 2], [48, 2]]


def schedule_job(cfg_dict):
    from ringwise.train.loop import run_on_mesh
    from ringwise.train.mesh import make_mesh

    cfg = TrainConfig(**cfg_dict)
    run_on_mesh(cfg, make_mesh(cfg.dp, torch.device("cpu"), cfg.timeout, cfg.ulysses))
    if dist.get_rank() == 0:
        return [json.loads(line) for line in open(f"{cfg.out}/metrics.jsonl")]


def test_a_schedule_trains_each_stage_at_its_length_and_resumes_in_stage_two(cluster, checkpoint_and_text, tmp_path):
    model, text = checkpoint_and_text
    # with --lora 4 (the config's): the resume reads adapter-only checkpoints, the base from --model again
    kw = dict(seq_len=48, seq_schedule=SCHEDULE, steps=4, eval_lengths=[48])
    straight = cluster(2).run(schedule_job, vars(config(model, text, tmp_path / "straight", **kw)))[0]
    # the metrics' seq_len is the length of the sequences as trained (each rank's shard x the ring)
    assert [(r["step"], r["stage"], r["seq_len"]) for r in straight] == [(0, 1, 24), (1, 1, 24), (2, 2, 48), (3, 2, 48)]
    assert [r["tokens_per_s"] * r["seconds"] for r in straight] == pytest.approx([48, 48, 96, 96])
    resumed_cfg = config(model, text, tmp_path / "stopped", **kw, stop_after=3)
    assert cluster(2).run(schedule_job, vars(resumed_cfg))[0][-1]["step"] == 2  # stopped after step 3 of 4
    resumed = cluster(2).run(schedule_job, vars(resumed_cfg.replace(stop_after=None, resume=True)))[0]
    assert [(r["step"], r["stage"], r["seq_len"]) for r in resumed] == [
        (s, r["stage"], r["seq_len"]) for s, r in enumerate(straight)
    ]
    assert all(abs(a["loss"] - b["loss"]) <= 1e-6 * b["loss"] for a, b in zip(resumed, straight)), (resumed, straight)


def test_bad_schedules_are_refused_with_the_reason(checkpoint_and_text, tmp_path, capsys):
    from ringwise.cli import main
    from ringwise.train.config import seq_len_or_schedule

    assert seq_len_or_schedule("4096:200,16384:100,65536:50") == [[4096, 200], [16384, 100], [65536, 50]]
    assert seq_len_or_schedule("2048") == 2048
    model, text = checkpoint_and_text
    flags = ["finetune", "--model", str(model), "--text", str(text), "--world", "2", "--out", str(tmp_path / "a")]
    for schedule, reason in (
        ("48:2,24:2", "--seq-len 48:2,24:2: the stages' lengths must increase"),
        ("24:0,48:2", "--seq-len 24:0,48:2: stage '24:0': its length and steps must be positive integers"),
        ("24-2", "--seq-len 24-2: must be an integer or a schedule LEN:STEPS"),
        ("24:2,48", "--seq-len 24:2,48: stage '48' is not LEN:STEPS"),
        ("26:2,48:2", "--seq-len 26 (the stage 26:2) must be a positive multiple of 4"),
    ):
        assert main([*flags, "--seq-len", schedule]) == 2
        err = capsys.readouterr().err
        assert reason in err, (reason, err)
    assert main([*flags, "--seq-len", "24:2,48:2", "--steps", "5", "--eval-lengths", "48"]) == 2
    err = capsys.readouterr().err
    assert "1 problem" in err and "--steps 5 and --seq-len 24:2,48:2 disagree: the schedule trains 4 steps" in err
    assert not (tmp_path / "a").exists()


def test_the_schedule_command_resumes_into_stage_two_and_logs_each_stage(checkpoint_and_text, tmp_path, capfd):
    from ringwise.cli import main
    from ringwise.train.loop import stage_line

    model, text = checkpoint_and_text
    out = tmp_path / "run"
    flags = ["finetune", "--model", str(model), "--text", str(text), "--world", "2", "--seq-len", "24:1,48:1"]
    flags += ["--eval-lengths", "48", "--eval-sequences", "1", "--eval-bucket", "16", "--eval-per-cell", "1"]
    flags += ["--eval-depths", "0.5", "--no-plots", "--out", str(out)]
    assert main([*flags, "--stop-after", "1"]) == 0
    capfd.readouterr()
    assert main([*flags, "--resume", "--rope-theta", "20000"]) == 2  # another RoPE: another run
    assert "--rope-theta: checkpoint None, now 20000.0" in capfd.readouterr().err
    assert main([*flags, "--resume"]) == 0
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [(r["step"], r["stage"], r["seq_len"]) for r in records] == [(0, 1, 24), (1, 2, 48)]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["seq_len"] == "24:1,48:1" and summary["config"]["steps"] == 2
    assert summary["tokens_per_s"] == round((24 + 48) / sum(r["seconds"] for r in records), 1)  # each at its length
    # the line each stage's first step (or a resumed run's first) logs: its length, steps and RoPE
    cfg = config(model, text, out, lora=None, lora_alpha=None, seq_len=48, seq_schedule=SCHEDULE, steps=4)
    assert stage_line(cfg, 0) == (
        "stage 1/2: 24 tokens per sequence, steps 0-1; the model's RoPE (the same in every stage, "
        "max_position_embeddings 48+)"
    )
    yarn = cfg.replace(rope_scaling="yarn", rope_factor=4.0, rope_theta=5e5)
    assert stage_line(yarn, 3) == (
        "stage 2/2: 48 tokens per sequence, steps 2-3, resumed at step 3; RoPE yarn scaling x4 theta 500000 "
        "(the same in every stage, max_position_embeddings 48+)"
    )
