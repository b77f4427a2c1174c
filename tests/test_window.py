"""Sliding windows, attention sinks and soft-capping: tiles, hop schedule, and real gloo rings
against a float64 reference on the whole sequence."""

import itertools

import pytest
import torch
import torch.distributed as dist
from helpers import (
    DTYPES,
    check_against_reference,
    count_comms,
    expected_hops,
    feature_id,
    make_inputs,
    make_sinks,
    max_err,
    options,
    packed,
    reference_attention,
    schedule_from_mask,
    visible_mask,
)
from helpers import case_id as ring_case_id

import ringwise
from ringwise.attention import tiles
from ringwise.attention.kernels import AtenCpuKernel, Flipped, ReferenceKernel
from ringwise.attention.layout import global_indices
from ringwise.attention.tiles import Mask, needed_steps, step_tiles

KERNEL_TOL = {"float32": 1e-5, "bfloat16": 3e-2}  # single-device error vs float64, relative to the largest value


def ring_run(case):
    """On each rank: forward + backward of this rank's shard; local results and hop counts."""
    q, k, v, dout = make_inputs(case)
    dt, layout = DTYPES[case["dtype"]], case["layout"]
    ql, kl, vl = (ringwise.shard(x.to(dt), 1, layout).requires_grad_() for x in (q, k, v))
    sinks = make_sinks(case)
    sinks = None if sinks is None else sinks.float().requires_grad_()
    with count_comms() as fwd:
        out, lse = ringwise.ring_attention(ql, kl, vl, layout=layout, return_lse=True, sinks=sinks, **options(case))
    with count_comms() as bwd:
        out.backward(ringwise.shard(dout.to(dt), 1, layout))
    return dict(
        out=out.detach(),
        lse=lse,
        dq=ql.grad,
        dk=kl.grad,
        dv=vl.grad,
        dsinks=None if sinks is None else sinks.grad,
        fwd=dict(fwd.hops),
        bwd=dict(bwd.hops),
    )


def check(case, results):
    """Ring error <= 2 x (single-device error) + eps for out, lse, dq, dk, dv and d sinks; the
    single-device run (it shares the window/sink/softcap code) within KERNEL_TOL on its own."""
    return check_against_reference(case, results, kernel_tol=KERNEL_TOL[case["dtype"]])


# ---------------------------------------------------------------- tiling, single process


@pytest.fixture(params=["band tiles", "fused squares"])
def min_fused_window(request, monkeypatch):
    """Tile small windows both ways: as band tiles (the default under MIN_FUSED_WINDOW) and as
    causal / anti-causal squares (what larger windows get)."""
    if request.param == "fused squares":
        monkeypatch.setattr(tiles, "MIN_FUSED_WINDOW", 1)
    tiles.clear_caches()
    yield request.param
    tiles.clear_caches()


@pytest.mark.parametrize("layout,W", list(itertools.product(ringwise.LAYOUTS, [1, 2, 3, 4, 5])))
def test_window_tiles_cover_exactly_the_band(layout, W, min_fused_window):
    """Every visible pair exactly once, for windows inside a chunk, across shards and past the
    end, with and without packed documents; the step schedule matches the mask."""
    L = 8
    S = L * W
    for window, docs in itertools.product([0, 1, 3, 5, 8, 11, S - 1, S + 4], [None, tuple(packed([3, 1, S - 6, 2]))]):
        covered = torch.zeros(S, S, dtype=torch.int64)
        for r, src in itertools.product(range(W), range(W)):
            qpos, kpos = global_indices(layout, r, W, S), global_indices(layout, src, W, S)
            for t in step_tiles(layout, r, src, W, L, Mask(True, docs, window)):
                assert sum((t.band is not None, t.causal, t.anti)) <= 1
                assert not t.anti or t.q_len == t.k_len
                if min_fused_window == "fused squares":
                    assert t.band is None
                for i, j in itertools.product(range(t.q_len), range(t.k_len)):
                    covered[qpos[t.q_start + i], kpos[t.k_start + j]] += t.visible(i, j)
        vis = visible_mask(S, True, window, docs)
        assert torch.equal(covered, vis.long()), (window, docs)
        assert needed_steps(layout, W, L, Mask(True, docs, window)) == schedule_from_mask(layout, W, S, vis)


def test_schedules_skip_unneeded_steps():
    """The issue's examples: a window inside one contiguous shard needs one hop; zigzag with a
    small window needs steps {0, 1, W-1} (2 hops at W=4, not 3); a window as long as the
    sequence is plain causal."""
    assert needed_steps("contiguous", 4, 16, Mask(True, window=5)) == (0, 1)
    assert needed_steps("zigzag", 4, 16, Mask(True, window=3)) == (0, 1, 3)
    assert needed_steps("striped", 4, 16, Mask(True, window=2)) == (0, 1, 2)
    for layout in ringwise.LAYOUTS:
        assert (
            needed_steps(layout, 4, 16, Mask(True, window=64))
            == needed_steps(layout, 4, 16, Mask(True))
            == (0, 1, 2, 3)
        )
        assert step_tiles(layout, 1, 0, 4, 16, Mask(True, window=64)) == step_tiles(layout, 1, 0, 4, 16, Mask(True))


def test_flipped_fused_kernel_is_the_anti_causal_square():
    """aten_cpu on reversed rows and keys == the reference kernel with key j visible iff j >= i."""
    torch.manual_seed(5)
    q, k, v = torch.randn(2, 4, 37, 16, dtype=torch.float64), *torch.randn(2, 2, 2, 37, 16, dtype=torch.float64)
    dout = torch.randn_like(q)
    (o1, l1), (o2, l2) = (
        Flipped(AtenCpuKernel()).forward(q, k, v, False, 0.3),
        ReferenceKernel(chunk=8).forward(q, k, v, False, 0.3, band=(-36, 0)),
    )
    assert max_err(o1, o2) < 1e-12 and max_err(l1, l2) < 1e-12
    g1 = Flipped(AtenCpuKernel()).backward(dout, q, k, v, o1, l1, False, 0.3)
    g2 = ReferenceKernel(chunk=8).backward(dout, q, k, v, o1, l1, False, 0.3, band=(-36, 0))
    assert all(max_err(a, b) < 1e-11 for a, b in zip(g1, g2))


def test_reference_kernel_band_and_softcap_match_dense():
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 2, 9, 8, dtype=torch.float64) for _ in range(3))
    i, j = torch.arange(9)[:, None], torch.arange(9)[None, :]
    for band in [(0, 2), (-3, 1), (4, 20)]:
        vis = (i - j >= band[0]) & (i - j <= band[1])
        out, lse = ReferenceKernel(chunk=4).forward(q, k, v, False, 0.4, band=band, softcap=2.0)
        ref, ref_lse = reference_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask=vis, scale=0.4, softcap=2.0
        )
        assert max_err(out, ref.transpose(1, 2)) < 1e-12
        assert max_err(lse.clamp_min(-1e9), ref_lse.clamp_min(-1e9)) < 1e-12  # -inf rows alike


# ---------------------------------------------------------------- rings vs float64

WINDOWS = [0, 3, 13, 30, 100]  # global length 48: inside a shard's chunk, across shards, past the end
WINDOW_GRID = [
    dict(
        world=W,
        layout=layout,
        causal=True,
        dtype="float32",
        batch=1,
        heads=4,
        kv_heads=2,
        head_dim=16,
        seq=48,
        seed=700 + i,
        window=w,
    )
    for i, (W, layout, w) in enumerate(itertools.product([1, 2, 3, 4], ringwise.LAYOUTS, WINDOWS))
]
WINDOW_GRID += (
    [  # packed documents, and bfloat16
        dict(
            world=W,
            layout=layout,
            causal=True,
            dtype="float32",
            batch=1,
            heads=4,
            kv_heads=1,
            head_dim=16,
            seq=48,
            seed=800 + i,
            window=w,
            cu_seqlens=packed([7, 1, 1, 13, 2, 24]),
        )
        for i, (W, layout, w) in enumerate(itertools.product([2, 3, 4], ringwise.LAYOUTS, [4, 17]))
    ]
    + [
        dict(
            world=W,
            layout=layout,
            causal=True,
            dtype="bfloat16",
            batch=2,
            heads=2,
            kv_heads=2,
            head_dim=32,
            seq=48,
            seed=900 + W,
            window=9,
        )
        for W, layout in itertools.product([3, 4], ringwise.LAYOUTS)
    ]
    + [  # windows >= MIN_FUSED_WINDOW: causal and anti-causal squares on the fused kernel
        dict(
            world=W,
            layout=layout,
            causal=True,
            dtype="float32",
            batch=1,
            heads=2,
            kv_heads=1,
            head_dim=8,
            seq=240,
            seed=950 + i,
            window=w,
            **extra,
        )
        for i, (W, layout, w, extra) in enumerate(
            itertools.product(
                [1, 2, 3, 4], ringwise.LAYOUTS, [64, 100, 170], [{}, dict(cu_seqlens=packed([90, 3, 147]))]
            )
        )
    ]
)


def case_id(c):
    return ring_case_id(c) + feature_id(c)


@pytest.mark.parametrize("case", WINDOW_GRID, ids=case_id)
def test_window_ring_matches_reference(grid_results, case):
    results = grid_results(ring_run, WINDOW_GRID, case)
    check(case, results)
    vis = visible_mask(case["seq"], True, case["window"], case.get("cu_seqlens"))
    fwd, bwd = expected_hops(schedule_from_mask(case["layout"], case["world"], case["seq"], vis), case["world"])
    for r in results:
        assert (r["fwd"], r["bwd"]) == (fwd, bwd)


@pytest.mark.parametrize(
    "layout,window,fwd,bwd",
    [
        ("contiguous", 5, {"kv": 1}, {"kv": 1, "dkv": 2}),  # window inside one shard: one relay hop + home
        ("zigzag", 3, {"kv": 2}, {"kv": 2, "dkv": 2}),  # steps {0, 1, 3}: direct sends, not 3 relays
        ("striped", 2, {"kv": 2}, {"kv": 2, "dkv": 3}),
        ("zigzag", 64, {"kv": 3}, {"kv": 3, "dkv": 4}),  # window >= sequence: plain causal
    ],
)
def test_window_hop_counts_at_four_ranks(cluster, layout, window, fwd, bwd):
    case = dict(
        world=4,
        layout=layout,
        causal=True,
        dtype="float32",
        batch=1,
        heads=2,
        kv_heads=1,
        head_dim=8,
        seq=64,
        seed=31,
        window=window,
    )
    results = cluster(4).run(ring_run, case)
    check(case, results)
    assert all((r["fwd"], r["bwd"]) == (fwd, bwd) for r in results)


SINK_CAP_GRID = [
    dict(
        world=W,
        layout=layout,
        causal=causal,
        dtype="float32",
        batch=2,
        heads=4,
        kv_heads=2,
        head_dim=16,
        seq=24,
        seed=600 + i,
        q_scale=3.0,
        **extra,
    )
    for i, (W, layout, causal, extra) in enumerate(
        itertools.product(
            [1, 2, 3],
            ringwise.LAYOUTS,
            [True, False],
            [dict(sinks=True), dict(softcap=5.0), dict(sinks=True, softcap=2.0)],
        )
    )
] + [
    dict(
        world=W,
        layout=layout,
        causal=True,
        dtype="float32",
        batch=1,
        heads=4,
        kv_heads=2,
        head_dim=16,
        seq=24,
        seed=650 + W,
        sinks=True,
        softcap=3.0,
        window=5,
        cu_seqlens=packed([5, 11, 8]),
    )
    for W, layout in itertools.product([2, 3], ringwise.LAYOUTS)
]


@pytest.mark.parametrize("case", SINK_CAP_GRID, ids=case_id)
def test_sinks_and_softcap_match_reference(grid_results, case):
    check(case, grid_results(ring_run, SINK_CAP_GRID, case))


def test_softcap_refuses_fused_backend():
    q = torch.randn(1, 8, 2, 8)
    with pytest.raises(ValueError, match="softcap.*backend='aten_cpu'"):
        ringwise.ring_attention(q, q, q, softcap=5.0, backend="aten_cpu")
    with pytest.raises(
        ValueError, match=r"window=3 on full attention needs its reach after the query too: window=\(left, right\)"
    ):
        ringwise.ring_attention(q, q, q, window=3)


def test_sinks_gradient_reaches_a_parameter():
    """sinks as an nn.Parameter: gradient flows (single process) and equals the reference."""
    torch.manual_seed(4)
    q, k, v = torch.randn(1, 12, 4, 8), torch.randn(1, 12, 2, 8), torch.randn(1, 12, 2, 8)
    sinks = torch.nn.Parameter(torch.randn(4))
    ringwise.ring_attention(q, k, v, causal=True, sinks=sinks, window=4).sum().backward()
    sr = sinks.detach().double().requires_grad_()
    ref, _ = reference_attention(q, k, v, mask=visible_mask(12, True, 4), sinks=sr)
    (g,) = torch.autograd.grad(ref.sum(), sr)
    assert max_err(sinks.grad, g) < 1e-5


def windowed_subgroup_ring():
    """Ranks 1..4 of a 6-rank world form the ring (group rank r is global rank r + 1; ranks 0
    and 5 are outside it), so the direct sends of a zigzag window schedule must name peers by
    global rank. (6 ranks: the suite's 6-rank cluster is already up for the Ulysses meshes.)"""
    group = dist.new_group([1, 2, 3, 4])
    if dist.get_rank() not in (1, 2, 3, 4):
        return None
    case = dict(
        world=4,
        layout="zigzag",
        causal=True,
        dtype="float32",
        batch=1,
        heads=2,
        kv_heads=1,
        head_dim=8,
        seq=32,
        seed=12,
        window=2,
    )
    q, k, v, dout = make_inputs(case)
    ql, kl, vl = (ringwise.shard(x.float(), 1, "zigzag", group).requires_grad_() for x in (q, k, v))
    with count_comms() as c:
        out = ringwise.ring_attention(ql, kl, vl, causal=True, window=2, layout="zigzag", group=group)
        out.backward(ringwise.shard(dout.float(), 1, "zigzag", group))
    grads = [ringwise.unshard(x.grad, 1, "zigzag", group) for x in (ql, kl, vl)]
    return dict(out=ringwise.unshard(out.detach(), 1, "zigzag", group), grads=grads, hops=dict(c.hops))


def test_window_direct_sends_inside_a_subgroup(cluster):
    everyone = cluster(6).run(windowed_subgroup_ring)
    assert everyone[0] is None and everyone[5] is None
    results = everyone[1:5]
    case = dict(
        world=4,
        layout="zigzag",
        causal=True,
        dtype="float32",
        batch=1,
        heads=2,
        kv_heads=1,
        head_dim=8,
        seq=32,
        seed=12,
        window=2,
    )
    q, k, v, dout = make_inputs(case)
    qr, kr, vr = (x.detach().requires_grad_() for x in (q, k, v))
    ref, _ = reference_attention(qr, kr, vr, mask=visible_mask(32, True, 2))
    ref_grads = torch.autograd.grad(ref, (qr, kr, vr), dout)
    for r in results:
        assert r["hops"] == {"kv": 4, "dkv": 2}  # steps {0, 1, 3}: 2 kv hops forward, 2 backward
        assert max_err(r["out"], ref) < 1e-5
        assert all(max_err(g, rg) < 1e-5 for g, rg in zip(r["grads"], ref_grads))
