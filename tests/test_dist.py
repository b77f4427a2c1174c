"""Multi-process behaviour beyond numerics: layouts, gradcheck, sub-groups, errors, failures."""

import pytest
import torch
import torch.distributed as dist
from helpers import max_err, reference_attention

import ringwise
from ringwise.testing.cluster import ClusterError, LocalCluster


def shard_roundtrip(layout, global_len):
    x = torch.arange(2 * global_len * 3, dtype=torch.float32).view(2, global_len, 3)
    local = ringwise.shard(x, 1, layout)
    pos = ringwise.positions(global_len, layout)
    ok_pos = torch.equal(local[0, :, 0], x[0, pos, 0])
    return ok_pos, torch.equal(ringwise.unshard(local, 1, layout), x), local.shape[1]


@pytest.mark.parametrize("W", [2, 3, 4])
@pytest.mark.parametrize("layout", ringwise.LAYOUTS)
def test_shard_unshard_roundtrip(cluster, W, layout):
    S = 2 * W * 5
    for ok_pos, ok_round, n in cluster(W).run(shard_roundtrip, layout, S):
        assert ok_pos and ok_round and n == S // W


def shard_padding(layout, global_len):
    x = torch.ones(1, global_len)
    with pytest.raises(ValueError, match="pad_to_multiple"):
        ringwise.shard(x, 1, layout)
    padded, n_pad = ringwise.pad_to_multiple(x, 1, layout)
    return padded.shape[1], n_pad, ringwise.shard(x, 1, layout, pad=True).shape[1]


def test_shard_needs_padding(cluster):
    for total, n_pad, local in cluster(3).run(shard_padding, "zigzag", 13):
        assert (total, n_pad, local) == (18, 5, 6)


class _SumGradAcrossRanks(torch.autograd.Function):
    """Identity forward; backward sums the gradient of a replicated input over the ranks."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g)
        return g


class _GatherShards(torch.autograd.Function):
    """All-gather forward; backward keeps this rank's slice (every rank gets the same grad)."""

    @staticmethod
    def forward(ctx, local, layout):
        ctx.layout = layout
        return ringwise.unshard(local, 1, layout)

    @staticmethod
    def backward(ctx, g):
        return ringwise.shard(g, 1, ctx.layout), None


def gradcheck_ring(layout, causal):
    """gradcheck of the whole-sequence function q, k, v -> out, built from shards on every rank."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(1, 8 if layout == "zigzag" else 6, h, 3, generator=g, dtype=torch.float64) for h in (2, 1, 1)
    )

    def f(q, k, v):
        ql, kl, vl = (ringwise.shard(_SumGradAcrossRanks.apply(x), 1, layout) for x in (q, k, v))
        return _GatherShards.apply(ringwise.ring_attention(ql, kl, vl, causal=causal, layout=layout), layout)

    inputs = tuple(x.requires_grad_() for x in (q, k, v))
    return torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("W,layout,causal", [(2, "zigzag", True), (3, "striped", True), (3, "contiguous", False)])
def test_gradcheck_through_the_ring(cluster, W, layout, causal):
    assert all(cluster(W).run(gradcheck_ring, layout, causal))


def subgroup_rings():
    """Two rings in one world: ranks {0, 2} and {1, 3}; each attends over its own sequence."""
    rank = dist.get_rank()
    groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    group = groups[rank % 2]
    g = torch.Generator().manual_seed(rank % 2)
    q, k, v = (torch.randn(1, 16, 2, 8, generator=g) for _ in range(3))
    out = ringwise.ring_attention(
        *(ringwise.shard(x, 1, "zigzag", group) for x in (q, k, v)), causal=True, layout="zigzag", group=group
    )
    ref, _ = reference_attention(q, k, v, causal=True)
    return max_err(ringwise.unshard(out, 1, "zigzag", group), ref)


def test_rings_inside_subgroups(cluster):
    assert max(cluster(4).run(subgroup_rings)) < 1e-5


def expect_error(make_args, match):
    """Every rank calls ring_attention with its args; returns each rank's error message."""
    rank, W = dist.get_rank(), dist.get_world_size()
    kwargs = dict(causal=True, layout="zigzag")
    q, k, v, extra = make_args(rank, W)
    kwargs.update(extra)
    with pytest.raises(ValueError, match=match) as info:
        ringwise.ring_attention(q, k, v, **kwargs)
    return str(info.value)


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def args_local_len_differs(rank, W):
    n = 6 if rank == 1 else 4
    return _t(1, n, 2, 8), _t(1, n, 2, 8), _t(1, n, 2, 8), {}


def args_dtype_on_rank0(rank, W):
    return _t(1, 4, 2, 8), _t(1, 4, 2, 8, dtype=torch.float64 if rank == 0 else torch.float32), _t(1, 4, 2, 8), {}


def args_odd_zigzag(rank, W):
    return _t(1, 5, 2, 8), _t(1, 5, 2, 8), _t(1, 5, 2, 8), {}


def args_heads(rank, W):
    return _t(1, 4, 3, 8), _t(1, 4, 2, 8), _t(1, 4, 2, 8), {}


def args_layout_differs(rank, W):
    return _t(1, 4, 2, 8), _t(1, 4, 2, 8), _t(1, 4, 2, 8), {"layout": "striped" if rank == 2 else "zigzag"}


@pytest.mark.parametrize(
    "make_args,match",
    [
        (args_local_len_differs, "same batch, local sequence length"),
        (args_dtype_on_rank0, "rank 0: k.dtype=torch.float64 differs"),
        (args_odd_zigzag, "even local sequence length"),
        (args_heads, "multiple of the 2 key/value heads"),
        (args_layout_differs, "layout: rank 0 zigzag vs rank 2 striped"),
    ],
)
def test_bad_input_raises_on_every_rank(cluster, make_args, match):
    messages = cluster(3).run(expect_error, make_args, match)
    assert len(set(messages)) == 1  # the same error everywhere


def not_in_group():
    group = dist.new_group([0, 1])
    if dist.get_rank() == 2:
        with pytest.raises(ValueError, match="not a member of the given group"):
            ringwise.ring_attention(_t(1, 4, 2, 8), _t(1, 4, 2, 8), _t(1, 4, 2, 8), group=group)
    return True


def test_rank_outside_group(cluster):
    assert all(cluster(3).run(not_in_group))


@pytest.mark.parametrize(
    "q_shape,k_shape,match",
    [
        ((2, 8, 2, 8), (1, 8, 2, 8), "k has batch 1 but q has 2"),
        ((1, 8, 2, 8), (1, 6, 2, 8), "k has sequence length 6"),
        ((1, 8, 2, 8), (1, 8, 2, 4), "k has head_dim 4"),
        ((1, 8, 4, 8), (1, 8, 3, 8), "heads % kv_heads == 0"),
        ((8, 2, 8), (8, 2, 8), "4-D tensor"),
    ],
)
def test_bad_shapes_single_process(q_shape, k_shape, match):
    with pytest.raises(ValueError, match=match):
        ringwise.ring_attention(_t(*q_shape), _t(*k_shape), _t(*k_shape))


def test_bad_names_and_devices():
    q = _t(1, 8, 2, 8)
    with pytest.raises(ValueError, match="layout='diagonal' is unknown"):
        ringwise.ring_attention(q, q, q, layout="diagonal")
    with pytest.raises(ValueError, match="backend='triton' is unknown"):
        ringwise.ring_attention(q, q, q, backend="triton")
    with pytest.raises(ValueError, match="runs on cuda tensors"):
        ringwise.ring_attention(q, q, q, backend="cuda_flash")
    with pytest.raises(ValueError, match="cast all three"):
        ringwise.ring_attention(q, q.double(), q)


def die_mid_ring():
    """Rank 1 exits during the forward ring; the others must raise, not hang."""
    import os

    rank = dist.get_rank()
    q = torch.randn(1, 64, 2, 16)
    if rank == 1:
        os._exit(3)
    ringwise.ring_attention(q, q, q, layout="contiguous", validate=False)
    return "finished"


def test_dead_rank_fails_fast():
    with LocalCluster(3, pg_timeout=10) as c:
        with pytest.raises(ClusterError, match="rank 1"):
            c.run(die_mid_ring, timeout=30)


@pytest.mark.parametrize(
    "cu_seqlens,match",
    [
        ([1, 8], "start at 0 and end at the global sequence length 8"),
        ([0, 5], "start at 0 and end at the global sequence length 8"),
        ([0, 4, 4, 8], "strictly increasing"),
        (torch.tensor([[0, 8]]), "1-D integer tensor"),
    ],
)
def test_bad_cu_seqlens(cu_seqlens, match):
    q = _t(1, 8, 2, 8)
    with pytest.raises(ValueError, match=match):
        ringwise.ring_attention(q, q, q, causal=True, cu_seqlens=cu_seqlens)


def args_docs_differ(rank, W):
    docs = [0, 3, 4 * W] if rank == 1 else [0, 4 * W]
    return _t(1, 4, 2, 8), _t(1, 4, 2, 8), _t(1, 4, 2, 8), {"cu_seqlens": docs}


def args_bad_docs_on_one_rank(rank, W):
    docs = [0, 5] if rank == 2 else [0, 4 * W]
    return _t(1, 4, 2, 8), _t(1, 4, 2, 8), _t(1, 4, 2, 8), {"cu_seqlens": docs}


@pytest.mark.parametrize(
    "make_args,match",
    [
        (args_docs_differ, "cu_seqlens: rank 0"),
        (args_bad_docs_on_one_rank, "rank 2: cu_seqlens must start at 0"),
    ],
)
def test_document_errors_on_every_rank(cluster, make_args, match):
    messages = cluster(3).run(expect_error, make_args, match)
    assert len(set(messages)) == 1


def test_document_ids_equal_cu_seqlens():
    torch.manual_seed(0)
    q, k, v = _t(1, 12, 2, 8), _t(1, 12, 2, 8), _t(1, 12, 2, 8)
    ids = torch.tensor([7] * 5 + [3] + [9] * 6)
    a = ringwise.ring_attention(q, k, v, causal=True, document_ids=ids)
    b = ringwise.ring_attention(q, k, v, causal=True, cu_seqlens=[0, 5, 6, 12])
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="contiguous"):
        ringwise.ring_attention(q, k, v, document_ids=torch.tensor([1] * 4 + [2] * 4 + [1] * 4))


def _dynamo_loaded_before_any_op():
    import sys

    return "torch._dynamo" in sys.modules


def test_a_fresh_rank_has_what_its_first_op_imports():
    """A rank is forked from a server that imported torch._dynamo (a custom op's first call
    imports it: ~0.45 s of CPU per rank otherwise); this module does not import it itself."""
    with LocalCluster(1) as c:
        assert c.run(_dynamo_loaded_before_any_op) == [True]
