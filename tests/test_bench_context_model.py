"""`ringwise bench context --model PATH`'s plumbing on a tiny random checkpoint and a tiny budget:
every method searched, the search's answer read off its own probes, the table, the JSON and the plot."""

from __future__ import annotations

import json

import pytest
from hf_models import save_tiny_checkpoint

from ringwise.bench.context_model import per_token
from ringwise.cli import main

BUDGET_MIB, GRANULARITY, CAP = 0.75, 32, 256


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("context") / "model", "llama", tie_word_embeddings=True)


def test_bench_context_model(tiny, tmp_path):
    flags = ["--budget-mib", str(BUDGET_MIB), "--granularity", str(GRANULARITY), "--context-max-tokens", str(CAP)]
    flags += ["--context-worlds", "2", "--out", str(tmp_path)]
    assert main(["bench", "context", "--model", str(tiny), *flags]) == 0
    rows = json.loads((tmp_path / "context_model.json").read_text())["rows"]
    assert [(r["method"], r["world"], r["option"]) for r in rows] == [
        ("transformers", 1, "checkpoint-layers"),
        ("ringwise", 2, "checkpoint-layers"),
    ]
    for r in rows:
        W, probes = r["world"], r["probes"]
        assert [p["seq"] for p in probes] == sorted({p["seq"] for p in probes})  # each length probed once
        assert all(p["seq"] % (GRANULARITY * W) == 0 and p["per_process"] * W == p["seq"] for p in probes)
        assert all(p["fits"] == (p["peak_mib"] <= BUDGET_MIB) for p in probes)
        assert all(len(p["peak_mib_per_process"]) == W and p["state_mib"] > 0 for p in probes)
        fitting = {p["seq"] for p in probes if p["fits"]}
        assert r["max_seq"] in fitting | {0} and r["max_seq"] <= CAP * W
        if r["max_seq"] < CAP * W:  # the search stopped at a probe one step longer that was over budget
            assert any(p["seq"] == r["max_seq"] + GRANULARITY * W and not p["fits"] for p in probes)
        assert r["per_token_kib"] is not None and r["per_token_kib"] == per_token(probes)
    table = (tmp_path / "context_model.md").read_text()
    assert table.count("\n| ") == 1 + len(rows) and "| ringwise finetune | 2 | checkpoint-layers |" in table
    assert (tmp_path / "context_model.png").stat().st_size > 0


def test_per_token_is_the_slope_up_to_the_longest_probe():
    probe = lambda seq, peak, world=2: dict(seq=seq, per_process=seq // world, peak_mib=peak)
    probes = [probe(256, 10.0), probe(512, 12.0), probe(1024, 16.0), probe(1536, 18.0), probe(2048, 40.0)]
    assert per_token(probes) == (40.0 - 16.0) * 1024 / (1024 - 512)  # 2048 against 1024: the longest at most half
    assert per_token(probes[:4]) == (18.0 - 12.0) * 1024 / (768 - 256)  # 1536 against 512
    assert per_token(probes[:1]) is None and per_token([]) is None  # one length: no slope
