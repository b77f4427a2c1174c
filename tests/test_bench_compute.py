"""The per-rank compute benchmark: its LoopbackRing must run each rank's real ring schedule.

With every rank's shard of K and V identical, a loopback hop delivers exactly the block the
real ring would, so rank r alone must reproduce the whole-sequence float64 reference on its
own rows (out, lse and dq; dK/dV partials are the ring's to sum, not the rank's)."""

import json

import pytest
import torch
from helpers import count_comms, max_err, reference_attention

import ringwise
from ringwise.attention.kernels import select_kernel
from ringwise.attention.layout import global_indices
from ringwise.attention.ring import Engine, ring_backward, ring_forward
from ringwise.attention.tiles import Mask
from ringwise.bench.compute import LoopbackRing, rank_inputs
from ringwise.cli import main


def _periodic(block, layout, world):
    """A global tensor whose shard is `block` on every rank."""
    b, L, h, d = block.shape
    whole = torch.empty(b, L * world, h, d, dtype=block.dtype)
    for r in range(world):
        whole[:, global_indices(layout, r, world, L * world)] = block
    return whole


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", ringwise.LAYOUTS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_loopback_rank_reproduces_its_rows_of_the_whole_sequence(world, layout, causal):
    g = torch.Generator().manual_seed(world)
    L, heads, kv_heads, d = 12, 4, 2, 16
    q = torch.randn(2, L * world, heads, d, generator=g, dtype=torch.float64, requires_grad=True)
    k_block, v_block = (torch.randn(2, L, kv_heads, d, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = _periodic(k_block, layout, world), _periodic(v_block, layout, world)
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64)
    ref_out, ref_lse = reference_attention(q, k, v, causal=causal)
    (ref_dq,) = torch.autograd.grad(ref_out, q, dout)
    kernel = select_kernel("auto", q.device, q.dtype, d)
    scale = d**-0.5
    for r in range(world):
        idx = global_indices(layout, r, world, L * world)
        q_r, k_r, v_r, dout_r = rank_inputs((q.detach(), k, v, dout), layout, r, world)
        assert torch.equal(k_r, k_block) and torch.equal(v_r, v_block)
        engine = Engine(scale, layout, LoopbackRing(r, world), kernel, Mask(causal))
        with count_comms() as c:
            out, lse = ring_forward(q_r, k_r, v_r, engine)
        assert c.hops["kv"] == world - 1  # every ring step visited, as on a real ring
        dq, _, _ = ring_backward(dout_r, q_r, k_r, v_r, out, lse, engine)
        assert max_err(out, ref_out[:, idx]) < 1e-12
        assert max_err(lse, ref_lse[:, :, idx]) < 1e-12
        assert max_err(dq, ref_dq[:, idx]) < 1e-12


def test_loopback_ring_refuses_a_rank_outside_it():
    with pytest.raises(ValueError, match="rank 3 is not in a ring of 3"):
        LoopbackRing(3, 3)


def test_bench_compute_quick(tmp_path):
    assert (
        main(
            ["bench", "compute", "--quick", "--compute-heads", "2", "--compute-head-dim", "16", "--out", str(tmp_path)]
        )
        == 0
    )
    data = json.loads((tmp_path / "compute.json").read_text())
    assert sorted({(r["world"], r["rank"]) for r in data["rows"]}) == [(2, 0), (2, 1), (3, 0), (3, 1), (3, 2)]
    assert [s["world"] for s in data["summary"]] == [2, 3]
    assert all(r["seconds"] > 0 and r["rate_ratio"] > 0 for r in data["rows"])
    assert all(s["imbalance"] >= 1 for s in data["summary"])
    assert (tmp_path / "compute.md").read_text().count("\n| ") == 3  # header and one row per W


def test_bench_compute_refuses_a_length_the_layout_cannot_split(tmp_path):
    with pytest.raises(ValueError, match="--compute-worlds 3"):
        main(["bench", "compute", "--compute-seq", "1024", "--compute-worlds", "2", "3", "--out", str(tmp_path)])
    assert not (tmp_path / "compute.json").exists()
