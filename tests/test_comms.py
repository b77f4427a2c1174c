"""count_comms: every torch.distributed collective / P2P call counted once, everything restored."""

import os
import tempfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

import ringwise
from ringwise.attention.comm import all_gather_single
from ringwise.testing.comms import ALL_GATHER_SINGLE, KINDS, count_comms


@pytest.fixture
def one_rank_group():
    """A real 1-process gloo group in the test process, torn down afterwards."""
    assert not dist.is_initialized()
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group(
            "gloo",
            init_method="file://" + os.path.join(d, "store"),
            rank=0,
            world_size=1,
            timeout=timedelta(seconds=30),
        )
        try:
            yield
        finally:
            dist.destroy_process_group()


def originals():
    return {k: getattr(dist, k) for k in KINDS if hasattr(dist, k)}


def torch_originals():
    return {k: getattr(c10d, k) for k in KINDS if hasattr(dist, k)}


def test_counts_calls_on_one_rank(one_rank_group):
    before = originals()
    x = torch.ones(3)
    with count_comms() as c:
        out = [None]
        dist.all_gather_object(out, {"a": 1})
        dist.all_reduce(x)
        dist.all_reduce(x)
        dist.broadcast(x, 0)
        dist.barrier()
        dist.all_gather([torch.empty(3)], x)
        all_gather_single(torch.empty(3), x)  # torch's all_gather_single (all_gather_into_tensor before 2.13)
        dist.all_to_all_single(torch.empty(3), x)
    assert out == [{"a": 1}] and torch.equal(x, torch.ones(3))  # the calls really ran
    assert c.counts == {
        "all_gather_object": 1,
        "all_reduce": 2,
        "broadcast": 1,
        "barrier": 1,
        "all_gather": 1,
        ALL_GATHER_SINGLE: 1,
        "all_to_all_single": 1,
    }
    assert c.total == 8
    assert originals() == before  # every attribute restored
    dist.all_reduce(x)  # after the context: not counted
    assert c.counts["all_reduce"] == 2


def test_outermost_call_counts_once(one_rank_group, monkeypatch):
    """A wrapped function that calls another through the module is one call, not two."""
    real = dist.broadcast

    def broadcast_via_all_reduce(tensor, src, group=None, async_op=False):
        dist.all_reduce(tensor)
        return real(tensor, src, group=group, async_op=async_op)

    monkeypatch.setattr(dist, "broadcast", broadcast_via_all_reduce)
    with count_comms() as c:
        dist.broadcast(torch.ones(2), 0)
        dist.all_reduce(torch.ones(2))
    assert c.counts == {"broadcast": 1, "all_reduce": 1}
    assert dist.broadcast is broadcast_via_all_reduce


def test_contexts_nest_and_each_counts(one_rank_group):
    with count_comms() as outer:
        dist.barrier()
        with count_comms() as inner:
            dist.barrier()
            dist.all_reduce(torch.ones(1))
        dist.barrier()
    assert outer.counts == {"barrier": 3, "all_reduce": 1}
    assert inner.counts == {"barrier": 1, "all_reduce": 1}


def test_exception_restores(one_rank_group):
    before = originals()
    with pytest.raises(ZeroDivisionError):
        with count_comms() as c:
            dist.barrier()
            assert dist.barrier is not before["barrier"]  # wrapped while active
            raise ZeroDivisionError
    assert originals() == before
    assert c.counts == {"barrier": 1}


def test_a_failing_call_still_counts_and_restores(one_rank_group):
    before = originals()
    with pytest.raises((RuntimeError, ValueError)):
        with count_comms() as c:
            dist.broadcast(torch.ones(1), src=5)  # no rank 5 in a 1-rank group (gloo: RuntimeError)
    assert c.counts == {"broadcast": 1} and originals() == before
    with count_comms() as c:  # the failed call left no depth behind: the next one counts
        dist.barrier()
    assert c.counts == {"barrier": 1}


def test_covers_every_public_collective():
    for kind in (
        "all_gather_object",
        "all_gather",
        "all_gather_into_tensor",
        "all_reduce",
        "reduce_scatter_tensor",
        "all_to_all_single",
        "all_to_all",
        "broadcast",
        "broadcast_object_list",
        "barrier",
        "send",
        "recv",
        "isend",
        "irecv",
        "batch_isend_irecv",
        "gather_object",
        "scatter",
        "gather",
        "reduce",
        "reduce_scatter",
        "scatter_object_list",
        "send_object_list",
        "recv_object_list",
    ):
        assert kind in KINDS and callable(getattr(dist, kind))


def test_every_kind_is_wrapped_while_active_and_p2pops_hold_torchs_functions(one_rank_group):
    assert originals() == torch_originals()
    with count_comms():
        assert all(getattr(dist, k) is not c10d_fn for k, c10d_fn in torch_originals().items())
        op = dist.P2POp(dist.isend, torch.ones(1), 0)
        assert op.op is c10d.isend and isinstance(op, c10d.P2POp)  # torch's batch code checks `op.op is isend`
    assert originals() == torch_originals() and dist.P2POp is c10d.P2POp


def test_ring_attention_single_process_sends_nothing():
    q = torch.randn(1, 8, 2, 4)
    with count_comms() as c:
        ringwise.ring_attention(q, q, q, causal=True)
    assert c.counts == {}


# ---------------------------------------------------------------- two real ranks


def two_rank_job():
    rank = dist.get_rank()
    with count_comms() as c:
        got = [None, None]
        dist.all_gather_object(got, rank)
        x = torch.full((2,), float(rank))
        y = torch.empty(2)
        peer = 1 - rank
        ops = [dist.P2POp(dist.isend, x, peer), dist.P2POp(dist.irecv, y, peer)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()
        if rank == 0:
            dist.send(x, 1)
        else:
            dist.recv(y, 0)
        dist.barrier()
    restored = originals() == torch_originals() and dist.P2POp is c10d.P2POp
    return dict(counts=dict(c.counts), got=got, y=y, restored=restored)


def two_rank_hops(layout):
    """A real 2-rank ring, forward and backward: the calls by kind, and the ring's own hop counts
    (reported by the ring to the same context)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 8, 2, 4, generator=g) for _ in range(3))
    ql, kl, vl = (ringwise.shard(x, 1, layout).requires_grad_() for x in (q, k, v))
    with count_comms() as fwd:
        out = ringwise.ring_attention(ql, kl, vl, causal=True, layout=layout)
    with count_comms() as bwd:
        out.sum().backward()
    return dict(
        fwd=dict(fwd.counts),
        bwd=dict(bwd.counts),
        fwd_hops=sum(fwd.hops.values()),
        bwd_hops=sum(bwd.hops.values()),
        restored=dist.P2POp is dist.distributed_c10d.P2POp,
    )


def test_two_ranks(cluster):
    results = cluster(2).run(two_rank_job, timeout=60)
    for rank, r in enumerate(results):
        assert r["got"] == [0, 1]
        assert torch.equal(r["y"], torch.full((2,), float(1 - rank)))
        assert r["restored"]
        p2p = {"send": 1} if rank == 0 else {"recv": 1}
        assert r["counts"] == {
            "all_gather_object": 1,
            "batch_isend_irecv": 1,
            "p2p_isend": 1,
            "p2p_irecv": 1,
            "barrier": 1,
            **p2p,
        }


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_two_rank_ring_traffic(cluster, layout):
    """Every hop the ring counts is one batch_isend_irecv seen here (1 forward; 1 kv + 2 dkv
    backward), each with as many sends as receives; the only other call is the forward's
    argument check (at most one all_gather_object); the backward makes no collective."""
    for r in cluster(2).run(two_rank_hops, layout, timeout=60):
        assert (r["fwd_hops"], r["bwd_hops"]) == (1, 3), r
        assert r["fwd"]["batch_isend_irecv"] == r["fwd_hops"] and r["bwd"]["batch_isend_irecv"] == r["bwd_hops"], r
        for counts in (r["fwd"], r["bwd"]):
            assert counts["p2p_isend"] == counts["p2p_irecv"] >= counts["batch_isend_irecv"], r
        assert set(r["fwd"]) <= {"batch_isend_irecv", "p2p_isend", "p2p_irecv", "all_gather_object"}, r
        assert r["fwd"].get("all_gather_object", 0) <= 1, r
        assert set(r["bwd"]) == {"batch_isend_irecv", "p2p_isend", "p2p_irecv"}, r
        assert r["restored"]


def test_the_attentions_own_traffic_counts_inside_its_context_only():
    """Hops, all-to-alls and staged bytes the attention reports reach every open context (the
    same count_comms that counts the torch.distributed calls), and nothing outside one."""
    from ringwise.attention.traffic import recording, report

    report("hops", "kv")  # nobody records: nothing is kept anywhere
    with count_comms() as outer:
        report("hops", "kv")
        with recording() as inner:
            report("staged", "to_host", 8)
            report("all_to_all", "qkv")
    report("hops", "dkv")
    assert (outer.hops, outer.staged, outer.all_to_all) == ({"kv": 1}, {"to_host": 8}, {"qkv": 1})
    assert (inner.hops, inner.staged, inner.all_to_all) == ({}, {"to_host": 8}, {"qkv": 1})
    with pytest.raises(ValueError, match="unknown"):
        report("hop", "kv")
