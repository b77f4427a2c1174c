"""Ulysses x ring (USP) against the float64 whole-sequence reference, on real gloo meshes.

Meshes are (U ulysses) x (R ring): 1x4 (pure ring), 2x2, 4x1 (pure Ulysses), 2x3 and 3x2.
Each test sends one job per mesh that runs many small cases on every rank.
"""

import itertools

import pytest
import torch
import torch.distributed as dist
from helpers import (
    DTYPES,
    VARLEN,
    check_errors,
    count_comms,
    make_inputs,
    make_sinks,
    options,
    reference_attention,
    schedule_from_mask,
    visible_mask,
)
from helpers import expected_hops as ring_hops

import ringwise
from ringwise.attention.layout import global_indices
from ringwise.attention.ulysses import _local_heads, kv_copies, mesh_groups

MESHES = [(1, 4), (2, 2), (4, 1), (2, 3), (3, 2)]
_GROUPS = {}  # per worker process; every rank builds the same groups in the same order


def groups(key):
    """(ulysses_group, ring_group) of this rank for a named mesh, built once per process."""
    if key not in _GROUPS:
        if key == "disjoint":  # ulysses {0,1}, ring {0,2}: rank 3 in neither, ranks 1, 2 in one each
            a, b = dist.new_group([0, 1]), dist.new_group([0, 2])
            _GROUPS[key] = (a, b)
        elif key == "overlap":  # ulysses and ring groups both {0,1},{2,3}
            _GROUPS[key] = (
                dist.new_subgroups_by_enumeration([[0, 1], [2, 3]])[0],
                dist.new_subgroups_by_enumeration([[0, 1], [2, 3]])[0],
            )
        elif key == "crossed":  # ulysses {0,1},{2,3}; rings {0,3},{1,2} join different head chunks
            _GROUPS[key] = (
                dist.new_subgroups_by_enumeration([[0, 1], [2, 3]])[0],
                dist.new_subgroups_by_enumeration([[0, 3], [1, 2]])[0],
            )
        elif key == "uneven":  # ulysses {0,1},{2},{3}; rings {0,2},{1,3}: U differs between ranks
            _GROUPS[key] = (
                dist.new_subgroups_by_enumeration([[0, 1], [2], [3]])[0],
                dist.new_subgroups_by_enumeration([[0, 2], [1, 3]])[0],
            )
        else:
            _GROUPS[key] = mesh_groups(*key)
    return _GROUPS[key]


def variants(U):
    """(dtype, batch, heads, kv_heads): MHA, GQA 8:2 (6:2 where U = 3) and MQA."""
    gqa, mqa = ((6, 2), (6, 1)) if U == 3 else ((8, 2), (4, 1))
    return [("float32", 2, 2 * U, 2 * U), ("bfloat16", 1) + gqa, ("float32", 1) + mqa]


def grid(U, R):
    cases = [
        dict(
            mesh=(U, R),
            layout=layout,
            causal=causal,
            dtype=dt,
            batch=b,
            heads=h,
            kv_heads=hk,
            head_dim=16,
            seq=48,
            seed=100 * U + 10 * R + i,
        )
        for i, (layout, causal, (dt, b, h, hk)) in enumerate(
            itertools.product(ringwise.LAYOUTS, [False, True], variants(U))
        )
    ]
    cases += [
        dict(
            mesh=(U, R),
            layout=layout,
            causal=causal,
            dtype="float32",
            batch=1,
            heads=variants(U)[2][2],
            kv_heads=variants(U)[2][3],
            head_dim=16,
            seq=48,
            seed=7 + i,
            cu_seqlens=VARLEN[1 + i % 2],
        )
        for i, (layout, causal) in enumerate(itertools.product(ringwise.LAYOUTS, [False, True]))
    ]
    return cases


def run_case(case):
    """Forward + backward on this rank's piece of the mesh; local results and traffic counts."""
    ug, rg = groups(case["mesh"])
    dt, layout = DTYPES[case["dtype"]], case["layout"]
    q, k, v, dout = make_inputs(case)

    def piece(x):
        return ringwise.shard(x.to(dt), 1, layout, group=rg, ulysses_group=ug)

    ql, kl, vl = (piece(x).requires_grad_() for x in (q, k, v))
    before = [x.detach().clone() for x in (ql, kl, vl)]
    with count_comms() as forward:
        out, lse = ringwise.ring_attention(
            ql,
            kl,
            vl,
            causal=case["causal"],
            layout=layout,
            group=rg,
            ulysses_group=ug,
            return_lse=True,
            cu_seqlens=case.get("cu_seqlens"),
        )
    with count_comms() as backward:
        out.backward(piece(dout))
    assert all(torch.equal(a, b) for a, b in zip(before, (ql, kl, vl))), "the op wrote into its inputs"
    fwd, bwd = ((dict(c.hops), dict(c.all_to_all)) for c in (forward, backward))
    # without lse and without the argument check: the same out, bit for bit
    again = ringwise.ring_attention(
        ql,
        kl,
        vl,
        causal=case["causal"],
        layout=layout,
        group=rg,
        ulysses_group=ug,
        validate=False,
        cu_seqlens=case.get("cu_seqlens"),
    )
    assert torch.equal(again, out)
    # unshard inverts shard; pad=True pads to the mesh's split unit
    assert torch.equal(ringwise.unshard(ql.detach(), 1, layout, group=rg, ulysses_group=ug), q.to(dt))
    assert ringwise.shard(q[:, 1:], 1, layout, group=rg, pad=True, ulysses_group=ug).shape == ql.shape
    return dict(
        out=out.detach(),
        lse=lse,
        dq=ql.grad,
        dk=kl.grad,
        dv=vl.grad,
        u=dist.get_rank(ug),
        r=dist.get_rank(rg),
        fwd=fwd,
        bwd=bwd,
        positions=ringwise.positions(case["seq"], layout, group=rg, ulysses_group=ug),
    )


def run_cases(cases):
    return [run_case(c) for c in cases]


def assemble(results, name, case):
    """The global tensor from every rank's piece (the inverse of shard, no communication)."""
    U, R = case["mesh"]
    seq_dim = 2 if name == "lse" else 1
    first = results[0][name]
    out = torch.empty(first.shape[:seq_dim] + (case["seq"],) + first.shape[seq_dim + 1 :], dtype=first.dtype)
    for res in results:
        out.index_copy_(seq_dim, global_indices(case["layout"], res["r"], R, case["seq"], res["u"], U), res[name])
    return out


def check_case(case, results):
    """SeqMesh error <= 2 x (single-device kernel error) + eps for out, lse and every gradient."""
    check_errors(case, {name: assemble(results, name, case) for name in ("out", "lse", "dq", "dk", "dv")}, label=case)
    for res in results:
        assert torch.equal(
            res["positions"],
            global_indices(case["layout"], res["r"], case["mesh"][1], case["seq"], res["u"], case["mesh"][0]),
        )


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: f"U{m[0]}xR{m[1]}")
def test_mesh_matches_reference(cluster, mesh):
    """Every layout, causal and full, MHA/GQA/MQA, packed documents; gradients; traffic counts."""
    U, R = mesh
    cases = grid(U, R)
    per_rank = cluster(U * R).run(run_cases, cases, timeout=300)
    for i, case in enumerate(cases):
        results = [rank[i] for rank in per_rank]
        check_case(case, results)
        hops = expected_hops(case)
        for res in results:  # the ring's hops (only needed steps) and 2 all-to-alls each way
            assert res["fwd"] == (hops[0], ({"qkv": 1, "out": 1} if U > 1 else {}))
            assert res["bwd"] == (hops[1], ({"dout": 1, "dqkv": 1} if U > 1 else {}))


def expected_hops(case):
    """(forward, backward) ring hops of the case's ring of R, read off the global mask (not the
    tiling under test): R-1 kv forward, R-1 kv + R dkv backward, fewer where packed documents
    leave ring steps unneeded."""
    U, R = case["mesh"]
    vis = visible_mask(case["seq"], case["causal"], None, case.get("cu_seqlens"))
    return ring_hops(schedule_from_mask(case["layout"], R, case["seq"], vis), R)


def test_kv_copies_are_the_least_that_keep_whole_groups():
    assert kv_copies(8, 2, 2) == 1 and kv_copies(8, 4, 4) == 1  # kv_heads % U == 0: unexpanded
    assert kv_copies(8, 2, 4) == 2  # 2 q heads per rank need 1 kv head: 4 kv heads travel, 1 per rank
    assert kv_copies(4, 1, 4) == 4 and kv_copies(6, 2, 3) == 3


def test_per_head_arguments_are_cut_to_the_local_heads():
    class SeqMesh:
        size, u = 4, 2

    sinks = torch.arange(8.0)
    kw = _local_heads(dict(sinks=sinks, causal=True, window=(3, 0)), 8, SeqMesh())
    assert torch.equal(kw["sinks"], torch.tensor([4.0, 5.0])) and kw["causal"] and kw["window"] == (3, 0)


def bad_call(key, heads=4, seq_of_rank=None):
    """ring_attention on a bad mesh or bad arguments; the error message (or None) and traffic."""
    ug, rg = groups(key)
    L = (seq_of_rank or {}).get(dist.get_rank(), 4)
    q = torch.randn(1, L, heads, 8)
    with count_comms() as c:
        try:
            ringwise.ring_attention(q, q, q, causal=True, layout="contiguous", group=rg, ulysses_group=ug)
            error = None
        except ValueError as e:
            error = str(e)
    return error, dict(c.hops), dict(c.all_to_all)


@pytest.mark.parametrize(
    "key,kwargs,expect",
    [
        ((4, 1), dict(heads=6), "valid ulysses degrees for 6 heads: 1, 2, 3, 6"),
        ((2, 2), dict(seq_of_rank={3: 6}), "every rank must pass the same"),
        ("disjoint", {}, None),
        ("overlap", {}, "do not tile"),
        ("crossed", {}, "same head chunk"),
        ("uneven", {}, "every rank needs the same U and R"),
    ],
    ids=["heads", "shapes", "neither-group", "overlap", "crossed-rings", "uneven"],
)
def test_bad_mesh_raises_one_clear_error_on_every_rank(cluster, key, kwargs, expect):
    results = cluster(4).run(bad_call, key, **kwargs, timeout=60)
    for rank, (error, hops, a2a) in enumerate(results):
        assert error is not None, f"rank {rank} raised nothing"
        assert hops == {} and a2a == {}, f"rank {rank} sent traffic before the error: {hops} {a2a}"
        if expect:
            assert expect in error, error
    # one verdict over the mesh's group (here the default group): the same error on every rank, rank 3 of
    # "disjoint" (in neither group) included
    assert len({e for e, _, _ in results}) == 1, [e for e, _, _ in results]
    if key == "disjoint":
        assert "rank 1: global rank 1 is in ulysses_group but not in group" in results[0][0]


def replica_call(named):
    """Two data-parallel replicas of a 2 x 1 mesh on 4 ranks ({0, 1} and {2, 3}), each with its own
    sequence length: with its mesh group named, each replica's verdict gathers over its own ranks and
    its result is exact; unnamed, the verdict gathers over the default group and says what to pass."""
    if "replicas" not in _GROUPS:
        ug = dist.new_subgroups_by_enumeration([[0, 1], [2, 3]])[0]
        alone = dist.new_subgroups_by_enumeration([[r] for r in range(4)])[0]
        _GROUPS["replicas"] = (ug, alone, dist.new_subgroups_by_enumeration([[0, 1], [2, 3]])[0])
    ug, rg, mesh = _GROUPS["replicas"]
    replica = dist.get_rank() // 2
    x = torch.randn(1, 8 * (replica + 1), 2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(replica))
    shard = ringwise.SeqShard("zigzag", rg, ug, mesh if named else None)
    try:
        with count_comms() as c:
            out = ringwise.ring_attention(*(shard.shard(x) for _ in range(3)), causal=True, **shard.ring_kwargs())
    except ValueError as e:
        return str(e), dict(c.counts)
    want = shard.shard(reference_attention(x, x, x, causal=True)[0])
    return (out - want).abs().max().item(), dict(c.counts)


def test_a_mesh_inside_a_larger_job_names_its_group(cluster):
    named = cluster(4).run(replica_call, True, timeout=60)
    assert all(err < 1e-12 for err, _ in named), named
    assert all(counts["all_gather_object"] == 1 for _, counts in named), named
    unnamed = cluster(4).run(replica_call, False, timeout=60)
    assert len({e for e, _ in unnamed}) == 1 and "pass mesh_group=" in unnamed[0][0], unnamed
    assert all(counts == {"all_gather_object": 1} for _, counts in unnamed), unnamed


def test_bench_ulysses_quick(tmp_path):
    """`bench ulysses` runs the mesh suite (here SDPA, ring 1x2 and Ulysses 2x1, MQA)."""
    import json

    from ringwise.cli import main

    assert (
        main(
            [
                "bench",
                "ulysses",
                "--ulysses-meshes",
                "1x2",
                "2x1",
                "--ulysses-seq-len",
                "128",
                "--ulysses-repeats",
                "1",
                "--ulysses-head-dim",
                "16",
                "--ulysses-heads",
                "4",
                "--ulysses-kv-heads",
                "1",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    rows = json.loads((tmp_path / "ulysses.json").read_text())["rows"]
    assert [(r["impl"], r["mesh"]) for r in rows[::2]] == [("sdpa", "1 process"), ("ring", "1x2"), ("ulysses", "2x1")]
    assert all(r["seconds"] > 0 and r["all_to_alls"] == (4 if r["ulysses"] > 1 else 0) for r in rows)
    assert (tmp_path / "ulysses.md").exists()


def run_windowed(cases):
    """Window, sinks and soft-capping through the (ulysses x ring) mesh: local results."""
    out = []
    for case in cases:
        ug, rg = groups(case["mesh"])
        q, k, v, dout = make_inputs(case)
        layout = case["layout"]

        def piece(x):
            return ringwise.shard(x, 1, layout, group=rg, ulysses_group=ug)

        ql, kl, vl = (piece(x).requires_grad_() for x in (q, k, v))
        sinks = make_sinks(case).float().requires_grad_()
        o, lse = ringwise.ring_attention(
            ql, kl, vl, layout=layout, group=rg, ulysses_group=ug, return_lse=True, sinks=sinks, **options(case)
        )
        o.backward(piece(dout))
        out.append(
            dict(
                out=o.detach(),
                lse=lse,
                dq=ql.grad,
                dk=kl.grad,
                dv=vl.grad,
                dsinks=sinks.grad,
                u=dist.get_rank(ug),
                r=dist.get_rank(rg),
            )
        )
    return out


@pytest.mark.parametrize("layout", ringwise.LAYOUTS)
def test_window_sinks_softcap_compose_with_ulysses(cluster, layout):
    """A 2 x 2 mesh with a sliding window across shards, per-head sinks (cut to each rank's heads)
    and soft-capping, packed documents, block groups, a bidirectional window and chunks too: within
    2 x the single-device error of float64."""
    base = dict(
        mesh=(2, 2),
        layout=layout,
        causal=True,
        dtype="float32",
        batch=1,
        heads=4,
        kv_heads=2,
        head_dim=16,
        seq=48,
        sinks=True,
    )
    cases = [
        dict(base, seed=1, window=13),
        dict(base, seed=2, window=5, softcap=3.0),
        dict(base, seed=3, window=20, cu_seqlens=VARLEN[1]),
        # the masks of test_masks.py: image groups with a window, a bidirectional window, chunks
        dict(base, seed=4, window=6, group_ids=[-1] * 5 + [0] * 14 + [-1] * 9 + [1] * 12 + [-1] * 8),
        dict(base, seed=5, causal=False, window=(7, 3), cu_seqlens=VARLEN[2]),
        dict(base, seed=6, chunk=20, softcap=3.0),
    ]
    per_rank = cluster(4).run(run_windowed, cases, timeout=300)
    for i, case in enumerate(cases):
        results = [rank[i] for rank in per_rank]
        got = {n: assemble(results, n, case) for n in ("out", "lse", "dq", "dk", "dv")}
        got["dsinks"] = sum(r["dsinks"].double() for r in results)  # per-rank partials, like any parameter
        check_errors(case, got, label=case)


def run_transports(case):
    """The same mesh call with direct and with host-staged traffic: outputs, gradients, staged bytes."""
    ug, rg = groups(case["mesh"])
    q, k, v, dout = make_inputs(case)
    got = {}
    for transport in ("direct", "host"):
        ql, kl, vl = (
            ringwise.shard(x.float(), 1, case["layout"], group=rg, ulysses_group=ug).requires_grad_() for x in (q, k, v)
        )
        with count_comms() as c:
            o = ringwise.ring_attention(
                ql, kl, vl, causal=True, layout=case["layout"], group=rg, ulysses_group=ug, transport=transport
            )
            o.backward(ringwise.shard(dout.float(), 1, case["layout"], group=rg, ulysses_group=ug))
        got[transport] = dict(out=o.detach(), dq=ql.grad, dk=kl.grad, dv=vl.grad, staged=dict(c.staged))
    return got


@pytest.mark.parametrize("mesh", [(4, 1), (2, 2)], ids=["U4xR1", "U2xR2"])
def test_host_staged_transport_carries_the_all_to_alls_too(cluster, mesh):
    """transport='host' (several ranks on one GPU): the all-to-alls go through host buffers like
    the ring's hops, with results identical to direct traffic. At U4xR1 there are no ring hops,
    so every staged byte is an all-to-all's: q, k, v forward, out with its float32 lse (the op
    always returns lse, in the same buffer), dout and dq, dk, dv back."""
    case = dict(
        mesh=mesh,
        layout="zigzag",
        causal=True,
        dtype="float32",
        batch=1,
        heads=4,
        kv_heads=4,
        head_dim=16,
        seq=48,
        seed=5,
    )
    for got in cluster(4).run(run_transports, case, timeout=120):
        for name in ("out", "dq", "dk", "dv"):
            assert torch.equal(got["direct"][name], got["host"][name]), name
        assert got["direct"]["staged"] == {}
        staged = got["host"]["staged"]
        assert staged["to_host"] == staged["to_device"] > 0
        if mesh == (4, 1):  # one local (12 tokens x 4 heads x 16) float32 tensor each
            local, lse = 48 // 4 * 4 * 16 * 4, 48 // 4 * 4 * 4
            assert staged["to_host"] == 3 * local + (local + lse) + local + 3 * local
