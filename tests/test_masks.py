"""Masks beyond causal edges: block groups (causal plus every pair inside a group: Gemma 3's images,
a prefix-LM's prefix), bidirectional windows (full attention, keys i - left .. i + right) and
chunks (Llama 4's chunked layers): the interval tiling, the masked tile kernel, and real gloo rings
against a float64 reference on the whole sequence, with the hops each mask needs counted."""

import itertools

import pytest
import torch
from helpers import case_id as ring_case_id
from helpers import (
    case_mask,
    check_against_reference,
    count_comms,
    expected_hops,
    feature_id,
    max_err,
    packed,
    schedule_from_mask,
    visible_mask,
)
from test_window import ring_run  # forward + backward of a rank's shard, sinks included, hops counted

import ringwise
from ringwise.attention import tiles
from ringwise.attention.checks import group_spans
from ringwise.attention.kernels import MaskedTile, ReferenceKernel
from ringwise.attention.layout import global_indices
from ringwise.attention.tiles import Mask, needed_steps, step_tiles, visits

KERNEL_TOL = {"float32": 1e-5, "bfloat16": 3e-2}


def groups_of(spans, total):
    """Per-token group ids (-1 outside every span) for global (start, stop) spans."""
    ids = torch.full((total,), -1, dtype=torch.long)
    for n, (a, b) in enumerate(spans):
        ids[a:b] = n
    return ids


# ---------------------------------------------------------------- tiling, single process

TOTAL = 48
MASKS = [  # (causal, cu_seqlens, window, right, group spans)
    (True, None, None, None, ((3, 9), (20, 21), (30, 45))),  # images in a causal sequence
    (True, None, None, None, ((0, 16),)),  # a prefix-LM's prefix
    (True, packed([10, 15, 23]), 6, None, ((3, 9), (12, 20), (30, 45))),  # and a window, and documents
    (True, None, 3, None, ((0, 48),)),  # one group over everything: full attention
    (False, None, 5, 3, None),  # a bidirectional window
    (False, packed([7, 23, 18]), 2, 0, None),
    (False, None, 0, 7, None),  # keys only after the query
    (False, None, 40, 40, None),
]


@pytest.fixture(params=[5, tiles.ROW_BLOCK], ids=lambda n: f"rows{n}")
def row_block(request, monkeypatch):
    """Tile in blocks of 5 rows (many edges: every shape the blocks can take) and the default."""
    monkeypatch.setattr(tiles, "ROW_BLOCK", request.param)
    tiles.clear_caches()
    yield request.param
    tiles.clear_caches()


@pytest.mark.parametrize("layout,W", list(itertools.product(ringwise.LAYOUTS, [1, 2, 3, 4, 5])))
def test_interval_tiles_cover_exactly_the_mask(layout, W, row_block):
    """Every visible pair exactly once, nothing else, in every layout; the hop schedule is the
    steps the global mask needs."""
    S = 60 if W == 5 else TOTAL
    L = S // W
    if layout == "zigzag" and L % 2:
        pytest.skip("zigzag needs an even local length")
    for causal, docs, window, right, spans in MASKS:
        docs = None if docs is None or docs[-1] != S else tuple(docs)
        spans = None if spans is None else tuple((a, min(b, S)) for a, b in spans)
        covered = torch.zeros(S, S, dtype=torch.long)
        for r, kr in itertools.product(range(W), range(W)):
            qi, ki = global_indices(layout, r, W, S), global_indices(layout, kr, W, S)
            for t in step_tiles(layout, r, kr, W, L, Mask(causal, docs, window, right, spans)):
                for i, j in itertools.product(range(t.q_len), range(t.k_len)):
                    covered[qi[t.q_start + i], ki[t.k_start + j]] += t.visible(i, j)
        ids = None if spans is None else groups_of(spans, S)
        vis = visible_mask(S, causal, window if right is None else (window, right), docs, group_ids=ids)
        assert torch.equal(covered, vis.long()), (causal, docs, window, right, spans)
        assert needed_steps(layout, W, L, Mask(causal, docs, window, right, spans)) == schedule_from_mask(
            layout, W, S, vis
        )


def test_interval_tiles_are_fused_shapes_where_they_can_be():
    """Row blocks are cut at a group's edges, so a group in a causal sequence is full tiles and causal
    squares (no masked tile, a handful of fused calls); so is a wide bidirectional window."""
    t = step_tiles("contiguous", 0, 0, 1, 512, Mask(True, groups=((700, 800),)))
    assert all(x.bounds is None for x in t)  # the group is outside: plain causal
    t = step_tiles("contiguous", 0, 0, 1, 512, Mask(True, groups=((100, 120),)))
    assert all(x.bounds is None for x in t) and len(t) <= 8  # plain causal: 4
    t = step_tiles("contiguous", 0, 0, 1, 512, Mask(False, window=300, right=300))
    assert all(x.bounds is None for x in t)  # full, causal and anti-causal squares


def test_needed_steps_skip_what_no_group_reaches():
    """Groups add keys only inside their own span: a group within one contiguous shard adds no hop,
    one across two shards adds the step back (W - 1: the earlier rank sees the later one's keys),
    nothing more; a narrow bidirectional window on a contiguous ring needs steps 0, 1 and W-1
    (the neighbours), never the rest."""
    assert needed_steps("contiguous", 4, 16, Mask(True, window=3, groups=((2, 9),))) == (0, 1)
    assert needed_steps("contiguous", 4, 16, Mask(True, window=3, groups=((10, 20),))) == (0, 1, 3)
    assert needed_steps("contiguous", 4, 16, Mask(False, window=3, right=3)) == (0, 1, 3)


def test_masked_cpu_kernel_matches_reference_with_blind_rows():
    """The fused CPU kernel with an additive mask == the reference kernel with the same mask, out,
    lse and gradients, in float64, GQA, including rows that see no key (out 0, lse -inf)."""
    torch.manual_seed(4)
    q = torch.randn(2, 6, 37, 16, dtype=torch.float64)
    k, v = torch.randn(2, 2, 3, 29, 16, dtype=torch.float64)
    keep = torch.rand(37, 29) < 0.4
    keep[5] = False
    keep[17] = False
    o1, l1 = MaskedTile(keep).forward(q, k, v, False, 0.3)
    o2, l2 = ReferenceKernel(chunk=8).forward(q, k, v, False, 0.3, keep=keep)
    assert torch.isneginf(l1[:, :, [5, 17]]).all() and (o1[:, :, [5, 17]] == 0).all()
    seen = torch.isfinite(l2)
    assert torch.equal(seen, torch.isfinite(l1)) and int(seen.sum()) == 2 * 6 * 35
    assert max_err(o1, o2) < 1e-12 and max_err(l1[seen], l2[seen]) < 1e-12
    dout = torch.randn_like(q)
    lse = torch.logaddexp(l1, torch.zeros_like(l1))  # a final lse as another tile would leave it: finite
    g1 = MaskedTile(keep).backward(dout, q, k, v, o1, lse, False, 0.3)
    g2 = ReferenceKernel(chunk=8).backward(dout, q, k, v, o1, lse, False, 0.3, keep=keep)
    assert all(max_err(a, b) < 1e-11 for a, b in zip(g1, g2))


# ---------------------------------------------------------------- real rings against float64


S = 48
IMAGES = groups_of(((3, 11), (19, 20), (26, 41)), S).tolist()
KINDS = {  # mask name -> the case's mask options
    "groups": dict(causal=True, group_ids=IMAGES),
    "prefix": dict(causal=True, group_ids=groups_of(((0, 21),), S).tolist()),
    "groups-window-docs": dict(causal=True, group_ids=IMAGES, window=5, cu_seqlens=packed([12, 7, 29])),
    "bidirectional": dict(causal=False, window=(6, 4)),
    "bidirectional-docs": dict(causal=False, window=(3, 9), cu_seqlens=packed([5, 30, 13])),
    "chunk": dict(causal=True, chunk=10),
    "chunk-window-docs": dict(causal=True, chunk=16, window=5, cu_seqlens=packed([7, 1, 40])),
    "chunk-full": dict(causal=False, chunk=13),
    "mask_mod": dict(causal=True, mask_mod="dilated"),
    "mask_mod-sparse": dict(causal=True, mask_mod="sparse_global"),  # steps with nothing visible: not sent
    "mask_mod-groups-docs": dict(causal=True, mask_mod="dilated", group_ids=IMAGES, cu_seqlens=packed([12, 7, 29])),
}
MASK_GRID = (
    [
        dict(
            world=W,
            layout=layout,
            dtype="float32",
            batch=1,
            heads=3,
            kv_heads=1,
            head_dim=64,
            seq=S,
            seed=1100 + i,
            **mask,
        )
        for i, (W, layout, mask) in enumerate(itertools.product([1, 2, 3, 4], ringwise.LAYOUTS, KINDS.values()))
    ]
    + [
        dict(
            world=W,
            layout=layout,
            dtype="bfloat16",
            batch=2,
            heads=4,
            kv_heads=2,
            head_dim=32,
            seq=S,
            seed=1300 + i,
            **m,
        )
        for i, (W, layout, m) in enumerate(
            itertools.product([3], ringwise.LAYOUTS, [KINDS["groups"], KINDS["bidirectional"]])
        )
    ]
    + [  # a real model's heads: SmolLM2's GQA 9:3 at head_dim 128 (masked tiles on the fused kernel, odd ring)
        dict(
            world=3, layout=lay, dtype="float32", batch=1, heads=9, kv_heads=3, head_dim=128, seq=S, seed=1500 + i, **m
        )
        for i, (lay, m) in enumerate(
            itertools.product(
                ringwise.LAYOUTS, [KINDS["groups-window-docs"], KINDS["bidirectional"], KINDS["mask_mod"]]
            )
        )
    ]
    + [  # with per-head sinks and soft-capping (on the reference kernel, masked tiles included)
        dict(
            world=W,
            layout=layout,
            dtype="float32",
            batch=1,
            heads=4,
            kv_heads=2,
            head_dim=16,
            seq=S,
            seed=1400 + i,
            **m,
        )
        for i, (W, layout, m) in enumerate(
            itertools.product(
                [2, 3],
                ringwise.LAYOUTS,
                [
                    dict(KINDS["groups-window-docs"], sinks=True, softcap=4.0),
                    dict(KINDS["bidirectional-docs"], sinks=True, softcap=3.0),
                    dict(KINDS["chunk"], sinks=True),
                    dict(KINDS["mask_mod"], softcap=5.0, sinks=True),
                ],
            )
        )
    ]
)


def case_id(c):
    return ring_case_id(c) + feature_id(c)


@pytest.mark.parametrize("case", MASK_GRID, ids=case_id)
def test_mask_ring_matches_reference(grid_results, case):
    """out, lse and gradients within the error budget of float64 on the whole sequence; exactly the
    hops the global mask needs (steps no rank needs are never sent)."""
    results = grid_results(ring_run, MASK_GRID, case)
    check_against_reference(case, results, kernel_tol=KERNEL_TOL[case["dtype"]])
    steps = schedule_from_mask(case["layout"], case["world"], case["seq"], case_mask(case))
    fwd, bwd = expected_hops(steps, case["world"])
    for r in results:
        assert (r["fwd"], r["bwd"]) == (fwd, bwd)


@pytest.mark.parametrize("block", [5, 256])
@pytest.mark.parametrize("layout,W", [("zigzag", 2), ("striped", 3), ("contiguous", 4)])
def test_mask_mod_blocks_cover_exactly_the_mask(layout, W, block, monkeypatch):
    """mask_mod applied in blocks (of 5: many full, causal, emptied and cut blocks; and the default):
    every visible pair of the mask and-ed with mask_mod exactly once, the schedule the global one."""
    from helpers import dilated, sparse_global

    monkeypatch.setattr(tiles, "MOD_BLOCK", block)
    S = TOTAL
    L = S // W
    pos = torch.arange(S)
    for mod in (dilated, sparse_global):
        for causal, docs, window, right, spans in MASKS[:5]:
            tiles.clear_caches()
            docs = None if docs is None else tuple(docs)
            mask = Mask(causal, docs, window, right, spans, mod)
            covered = torch.zeros(S, S, dtype=torch.long)
            for r, kr in itertools.product(range(W), range(W)):
                qi, ki = global_indices(layout, r, W, S), global_indices(layout, kr, W, S)
                for t, keep in visits(layout, r, kr, W, L, mask):
                    seen = t.keep() if keep is None else keep
                    rows, cols = qi[t.q_start : t.q_start + t.q_len], ki[t.k_start : t.k_start + t.k_len]
                    covered[rows[:, None], cols[None, :]] += seen.long()
            ids = None if spans is None else groups_of(spans, S)
            vis = visible_mask(S, causal, window if right is None else (window, right), docs, group_ids=ids)
            vis &= mod(pos[:, None], pos[None, :])
            assert torch.equal(covered, vis.long()), (mod.__name__, causal, docs, window, right, spans)
            assert needed_steps(layout, W, L, mask) == schedule_from_mask(layout, W, S, vis)
    tiles.clear_caches()


def test_mask_mod_skips_steps_it_empties():
    """sparse_global on a contiguous causal ring of 8 x 6: ranks 1-3 see rank 0's first keys (steps
    1-3), every rank its own keys and the previous rank's last 3 (step 1); steps 4-7, which causal
    attention alone needs, carry nothing and are not sent. A window of 10 as well leaves steps 0-2."""
    from helpers import sparse_global

    assert needed_steps("contiguous", 8, 6, Mask(True)) == tuple(range(8))
    assert needed_steps("contiguous", 8, 6, Mask(True, mod=sparse_global)) == (0, 1, 2, 3)
    assert needed_steps("contiguous", 8, 6, Mask(True, window=10, mod=sparse_global)) == (0, 1, 2)


def test_chunk_inside_a_shard_sends_nothing(cluster):
    """Chunks no longer than a contiguous shard and aligned to it: no rank needs another's keys."""
    case = dict(
        world=3, layout="contiguous", dtype="float32", batch=1, heads=2, kv_heads=1, head_dim=8, seq=48, seed=5, chunk=8
    )
    case["causal"] = True
    results = cluster(3).run(ring_run, case)
    check_against_reference(case, results)
    assert all((r["fwd"], r["bwd"]) == ({}, {}) for r in results)


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "kwargs,words",
    [
        (dict(causal=True, window=(4, 2)), "causal attention sees no key after the query"),
        (dict(causal=False, window=4), "needs its reach after the query too"),
        (dict(causal=True, chunk=0), "chunk must be an int >= 1"),
        (dict(causal=False, group_ids=[0] * 8), "with causal=False every key is visible already"),
        (dict(causal=True, group_ids=[0, 0, -1, 0, -1, -1, -1, -1]), "each group contiguous"),
        (dict(causal=True, group_ids=[-1, 0, 0, 0, -1, -1, -1, -1], cu_seqlens=[0, 2, 8]), "crosses a document"),
        (dict(causal=True, group_ids=[-1, 0, 0, 0, -1, -1, -1, -1], chunk=2), "crosses a document or chunk"),
        (dict(causal=True, group_ids=[0, 0]), "over the global sequence (8 tokens)"),
    ],
)
def test_bad_masks_are_refused_with_the_reason(kwargs, words):
    q = torch.randn(1, 8, 2, 8)
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        ringwise.ring_attention(q, q, q, layout="contiguous", **kwargs)


def _differing_chunks():
    """Rank 0 passes chunk=8, rank 1 chunk=16: both raise the same mismatch before any hop."""
    import torch.distributed as dist

    q = torch.randn(1, 16, 2, 8)
    with count_comms() as comms:
        try:
            ringwise.ring_attention(q, q, q, causal=True, chunk=8 * (1 + dist.get_rank()))
        except ValueError as e:
            return str(e), dict(comms.hops)
    return "no error", dict(comms.hops)


def test_ranks_with_different_masks_fail_alike(cluster):
    said = cluster(2).run(_differing_chunks)
    assert said[0] == said[1] and "chunk: rank 0 8 vs rank 1 16" in said[0][0] and said[0][1] == {}


def test_group_spans_from_ids():
    ids = torch.tensor([-1, 0, 0, -1, 5, 5, 5, -2])
    assert group_spans(ids, 8, True, None) == (((1, 3), (4, 7)), None)
    assert group_spans(ids, 8, True, (0, 4, 8)) == (((1, 3), (4, 7)), None)


# ---------------------------------------------------------------- the bench


def test_masks_bench_counts_area_and_bytes(tmp_path):
    """`ringwise bench masks --quick`: each mask's visible pairs are the definition's (counted here pair
    by pair), chunks inside the shards send nothing, and plain causal's bytes are its hops' K/V."""
    import json

    from ringwise.bench.masks import longformer, masks
    from ringwise.cli import main

    assert main(["bench", "masks", "--quick", "--out", str(tmp_path)]) == 0
    rows = {r["mask"]: r for r in json.loads((tmp_path / "masks.json").read_text())["rows"]}
    S = 1024
    for name, o in masks(S).items():
        ids = o.get("group_ids")
        vis = visible_mask(S, o["causal"], o.get("window"), o.get("cu_seqlens"), o.get("chunk"), ids)
        if o.get("mask_mod") is not None:
            pos = torch.arange(S)
            vis &= longformer(pos[:, None], pos[None, :])
        assert rows[name]["visible"] == int(vis.sum()), name
    assert rows["documents + chunks"]["hops"] == {} and rows["documents + chunks"]["ring_bytes"] == 0
    kv_bytes = 2 * (S // 2) * 2 * 64 * 4
    assert rows["causal"]["hops"] == {"kv": 2, "dkv": 2} and rows["causal"]["ring_bytes"] == 4 * kv_bytes
    assert (tmp_path / "masks.md").exists()
