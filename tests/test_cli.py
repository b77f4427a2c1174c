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
    assert "--model nope: must be one of llama-3b, llama-7b, llama-13b, llama-30b, llama-65b" in capsys.readouterr().err


def test_bench_overlap_quick(tmp_path):
    assert main(["bench", "overlap", "--quick", "--head-dim", "16", "--overlap-heads", "2", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "overlap.json").read_text())
    assert [r["block"] for r in data["rows"]] == [64, 256]
    assert data["flops"] > 0 and data["bandwidth"] > 0
    assert all(r["ring"] > 0 and r["compute"] > 0 and r["comm"] > 0 for r in data["rows"])


def test_bench_scaling_quick(tmp_path):
    assert main(["bench", "scaling", "--quick", "--scaling-model", "tiny", "--scaling-worlds", "1", "2",
                 "--out", str(tmp_path)]) == 0
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
    rows = {(r["method"], r["world"]): r["max_seq"] for r in json.loads((tmp_path / "context.json").read_text())["rows"]}
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
    assert main(["bench", "decode", "--quick", "--decode-heads", "4", "--decode-kv-heads", "2", "--decode-head-dim", "16",
                 "--out", str(tmp_path)]) == 0
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
