"""The command line end to end, at smoke-test sizes."""

import json

from ringwise.cli import main


def test_demo_small(capsys):
    assert main(["demo", "--world", "3", "--seq-len", "384", "--heads", "2", "--head-dim", "16"]) == 0
    out = capsys.readouterr().out
    assert "max |error| vs float64 reference" in out and "time ratio SDPA / ring" in out
    # the printed errors are float32-sized, not garbage
    errors = out.split("reference:")[1].split("\n")[0]
    assert all(float(part.split()[1]) < 1e-4 for part in errors.split(","))


def test_bench_attention_quick(tmp_path):
    assert main(["bench", "attention", "--quick", "--seq-len", "512", "--heads", "2", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "attention.json").read_text())["rows"]
    assert {(r["impl"], r["causal"], r["layout"]) for r in rows} >= {("ring", True, "zigzag"), ("sdpa", False, "-")}
    assert all(r["seconds"] > 0 for r in rows)


def test_plan_tables(capsys):
    assert main(["plan", "--table2"]) == 0
    out = capsys.readouterr().out
    assert "a100-ib" in out and "24.96" in out


def test_plan_bad_preset(capsys):
    assert main(["plan", "--model", "nope"]) == 2
    assert (
        "--model nope: must be a transformers config.json or folder, or one of llama-3b, llama-7b, llama-13b, "
        "llama-30b, llama-65b" in capsys.readouterr().err
    )


def test_bench_overlap_quick(tmp_path):
    assert (
        main(["bench", "overlap", "--quick", "--head-dim", "16", "--overlap-heads", "2", "--out", str(tmp_path)]) == 0
    )
    data = json.loads((tmp_path / "overlap.json").read_text())
    assert [r["block"] for r in data["rows"]] == [64, 256]
    assert data["flops"] > 0 and data["bandwidth"] > 0
    assert all(r["ring"] > 0 and r["compute"] > 0 and r["comm"] > 0 for r in data["rows"])


def test_bench_scaling_quick(tmp_path):
    assert (
        main(
            [
                "bench",
                "scaling",
                "--quick",
                "--scaling-model",
                "tiny",
                "--scaling-worlds",
                "1",
                "2",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    rows = json.loads((tmp_path / "scaling.json").read_text())["rows"]
    assert {(r["sweep"], r["world"]) for r in rows} == {("weak", 1), ("weak", 2), ("strong", 1), ("strong", 2)}
    assert all(r["peak_mib_max"] > 0 for r in rows)


def test_bench_memory_quick(tmp_path):
    assert main(["bench", "memory", "--quick", "--memory-model", "tiny", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "memory.json").read_text())["rows"]
    assert [(r["seq"], r["world"]) for r in rows] == [(1024, 1), (1024, 2)]
    assert all(r["measured_mib"] > 0 and r["planned_mib"] > 0 for r in rows)


def test_bench_context_quick(tmp_path):
    assert main(["bench", "context", "--quick", "--out", str(tmp_path)]) == 0
    rows = {
        (r["method"], r["world"]): r["max_seq"] for r in json.loads((tmp_path / "context.json").read_text())["rows"]
    }
    assert set(rows) == {("vanilla", 1), ("memeff", 1), ("bpt", 1), ("ring", 2)}
    assert rows[("vanilla", 1)] <= rows[("memeff", 1)] <= rows[("bpt", 1)] < rows[("ring", 2)]


def test_median_time_skips_warmup_and_takes_the_median(monkeypatch):
    """One timer for every bench: warm-up runs are not counted, the median of the rest is."""
    import pytest

    from ringwise.bench import timing

    clock = iter([0, 100, 100, 101, 101, 104, 104, 106])  # runs of 100 (warm-up), 1, 3, 2 seconds
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    calls = []
    assert timing.median_time(lambda: calls.append(1), 3) == 2
    assert len(calls) == 4
    with pytest.raises(ValueError, match="repeats"):
        timing.median_time(lambda: None, 0)


def test_every_bench_suite_names_its_module():
    """`ringwise bench all` walks SUITES; the memory suite lives in memory_plan.py (one memory.py in the package)."""
    from ringwise.bench import OPTIONAL, SUITES, suite

    for name in SUITES + OPTIONAL:
        assert callable(suite(name).run) and callable(suite(name).add_arguments)
    assert suite("memory").__name__ == "ringwise.bench.memory_plan"


def test_bench_decode_quick(tmp_path):
    assert (
        main(
            [
                "bench",
                "decode",
                "--quick",
                "--decode-heads",
                "4",
                "--decode-kv-heads",
                "2",
                "--decode-head-dim",
                "16",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    rows = json.loads((tmp_path / "decode.json").read_text())["rows"]
    assert {(r["world"], r["seq"]) for r in rows} == {(1, 1024), (1, 4096), (2, 1024), (2, 4096)}
    assert all(r["total"] > 0 and r["sdpa"] > 0 for r in rows)
    two = [r for r in rows if r["world"] == 2]
    # the bytes each rank gathers per call do not grow with the cache: (out, lse) of one token plus the header
    assert len({r["gather_bytes"] for r in two}) == 1 and two[0]["gather_bytes"] == 4 * (6 + 4 * 16 + 4)
    assert all(r["gather"] > 0 and r["tree_all_reduces"] > 0 and r["kv_ring"] > 0 for r in two)
    e2e = json.loads((tmp_path / "decode.json").read_text())["end_to_end"]  # ringwise.generate, W = 1 and 2
    assert [(r["world"], r["prompt"]) for r in e2e] == [(1, 256), (2, 256)]
    assert all(r["ttft"] > 0 and r["step"] > 0 for r in e2e) and e2e[0]["step_vs_one_process"] == 1.0
    assert "End to end" in (tmp_path / "decode.md").read_text()


# ---------------------------------------------------------------- one vocabulary, checked whole


def _options(command):
    from ringwise.cli import build_parser

    sub = next(a for a in build_parser((command,))._actions if getattr(a, "choices", None))
    return sub.choices[command]._option_string_actions


def test_every_command_speaks_one_vocabulary():
    """The same flag for the same thing (docs/cli.md): --model, --seq-len, --world (processes to start),
    --device (where ranks run), --backend (gloo | nccl), --dtype (bf16 | fp32); no old spelling left."""
    from ringwise.cli import COMMANDS

    flags = {name: _options(name) for name in COMMANDS}
    for name in ("train", "finetune", "generate", "plan"):
        assert "--model" in flags[name], name
    for name in ("train", "finetune", "demo", "plan", "bench"):
        assert "--seq-len" in flags[name], name
    for name in ("train", "finetune", "generate", "demo"):
        assert flags[name]["--world"].type is int and flags[name]["--world"].nargs is None, name
    for name in ("train", "finetune", "generate"):
        assert set(flags[name]["--device"].choices) == {"auto", "cpu", "cuda"}
        assert set(flags[name]["--backend"].choices) == {"gloo", "nccl"}
    for name in ("train", "finetune"):
        assert set(flags[name]["--dtype"].choices) == {"bf16", "fp32"}
    assert set(flags["bench"]["--gpu-dtype"].choices) | set(flags["bench"]["--decode-dtype"].choices) <= {
        "bf16",
        "fp16",
        "fp32",
    }
    assert set(flags["bench"]["--device"].choices) == {"cpu", "cuda"}
    old = {
        "--seq",
        "--global-len",
        "--ring-worlds",
        "--compute-seq",
        "--compute-backend",
        "--ulysses-seq",
        "--peer-seq",
        "--gpu-seqs",
        "--decode-seqs",
        "--gpu-max-seq",
        "--gpu-mfu-seq",
    }
    for name, options in flags.items():
        assert not old & set(options), (name, old & set(options))
    assert "--world" not in flags["bench"] and "--ulysses" not in flags["bench"]  # --worlds sweeps; bench ulysses
    assert "--device" not in flags["plan"] and "--hardware" in flags["plan"]  # plan's is an accelerator model
    assert flags["plan"]["--model"].choices is None  # a config.json, a folder or a preset: checked with the rest


def test_help_shows_every_default_and_the_version(capsys):
    import pytest

    from ringwise import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"ringwise {__version__}"
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in (
        "--lr LR (default: 2e-05)",
        "--steps STEPS (default: 100)",
        "--seq-len SEQ_LEN global tokens",
        "(default: 1024)",
        "--eval-depths [EVAL_DEPTHS ...] passkey depths in [0, 1] (default: 0.0 0.25",
    ):
        assert shown in text, shown
    assert " --model PATH " in text and "[--model" not in text and "[--text" not in text  # required, as such
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: ringwise bench SUITE [--quick]")
    assert text.index("SUITE:") < text.index("  attention  ") < text.index("every suite:") < text.index("\ndecode (")


def test_every_problem_of_a_command_line_at_once(capsys):
    """Bad values, choices, unknown and missing flags, and the command's own checks: one list, status 2,
    no traceback, nothing started."""
    assert main(["generate", "--world", "0", "--temperature", "hot", "--bogus", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ringwise generate: 5 problems with the flags:"), err
    for what in (
        "--temperature hot: must be a number",
        "unrecognized --bogus 1",
        "--model RUN_DIR|EXPORT.pt|HF_FOLDER: required",
        "give one of --prompt TEXT, --prompts FILE and --retrieval K (got none)",
        "--world must be >= 1, got 0",
    ):
        assert what in err, (what, err)
    assert (
        main(
            [
                "plan",
                "--model",
                "7b",
                "--hardware",
                "tpu-v9",
                "--devices",
                "12",
                "--devices-per-node",
                "8",
                "--seq-len",
                "-1",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    for what in (
        "--model 7b: must be a transformers config.json or folder, or one of llama-3b,",
        "--hardware tpu-v9: must be one of a100-nvlink,",
        "--seq-len -1: must be a positive integer",
        "--devices 12 must be a multiple of --devices-per-node 8",
    ):
        assert what in err, (what, err)
    assert main(["demo", "--seq-len", "100", "--world", "3", "--heads", "x"]) == 2
    err = capsys.readouterr().err
    assert "--heads x: must be an integer" in err and "--seq-len 100 must be a multiple of 6" in err
    assert main(["finetune", "--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert "--model PATH: required" in err and "--text FILE: required" in err and "--steps 0" in err, err
    assert main(["export"]) == 2 and "RUN_DIR, OUT" in capsys.readouterr().err
    assert main(["bench", "attention", "--worlds", "1", "x", "--decode-dtype", "float32"]) == 2
    err = capsys.readouterr().err
    assert "--worlds x: must be an integer" in err and "--decode-dtype float32: must be one of fp32, bf16" in err


def test_summary_says_what_was_asked_what_ran_and_how_fast(tmp_path, monkeypatch):
    """After the job: the command line, every flag as resolved, wall time, step time, tokens/s, peak memory."""
    from ringwise.cli import parse
    from ringwise.train.config import TrainConfig
    from ringwise.train.summary import complete_summary

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    args = parse(
        [
            "train",
            "--world",
            "2",
            "--model",
            "tiny",
            "--seq-len",
            "64",
            "--batch",
            "4",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
        ]
    )
    cfg = TrainConfig.from_args(args)
    records = [dict(step=s, loss=1.0, seconds=0.5, peak_rss_mib=100.0 + s) for s in range(4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "summary.json").write_text(json.dumps(dict(final_loss=1.0, steps=4)))
    complete_summary(tmp_path, cfg, args._flags, args._argv, 12.5)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["command"].startswith("ringwise train --world 2 --model tiny")
    config = summary["config"]
    assert config["world"] == 2 and config["device"] == "cpu" and config["backend"] == "gloo"
    assert config["dtype"] == "fp32" and config["threads"] >= 1 and config["eval_lengths"] == [32, 64]
    assert config["model"] == "tiny" and config["lr"] == 3e-3 and config["mesh"] == dict(dp=1, cp=2, ulysses=1)
    assert "out" not in config and "pretrained" not in config  # not a flag of train
    assert summary["final_loss"] == 1.0 and summary["wall_time_s"] == 12.5 and summary["train_time_s"] == 2.0
    assert summary["tokens_per_s"] == 4 * 4 * 64 / 2.0 and summary["peak_memory_mib"] == 103.0
    complete_summary(tmp_path, cfg, args._flags, args._argv, 3.0)  # evaluated again: this invocation's numbers
    assert json.loads((tmp_path / "summary.json").read_text())["wall_time_s"] == 3.0
