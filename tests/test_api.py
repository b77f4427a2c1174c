"""The front door's communication, counted exactly (PyTorch context parallel's style): a
validated call makes ONE verdict gather before any ring traffic, Ulysses and the transformers
integration included; validate=False makes none; W-1 kv hops forward, W-1 kv + W dkv back."""

import pytest
import torch
import torch.distributed as dist
from helpers import count_comms

import ringwise


def ring_counts(validate):
    W = dist.get_world_size()
    q, k, v = (torch.randn(1, 8, 4, 8, requires_grad=True) for _ in range(3))
    with count_comms() as fwd:
        out = ringwise.ring_attention(q, k, v, causal=True, validate=validate)
    with count_comms() as bwd:
        out.sum().backward()
    return W, dict(fwd.counts), dict(bwd.counts)


@pytest.mark.parametrize("W", [2, 3])
@pytest.mark.parametrize("validate", [True, False])
def test_a_validated_call_makes_one_gather_and_the_ring_its_hops(cluster, W, validate):
    for _, fwd, bwd in cluster(W).run(ring_counts, validate):
        hops = W - 1
        assert fwd == ({"all_gather_object": 1} if validate else {}) | {
            "batch_isend_irecv": hops,
            "p2p_isend": 2 * hops,
            "p2p_irecv": 2 * hops,
        }  # K and V
        # K, V per kv hop; dK and dV travel as one stacked tensor
        assert bwd == {"batch_isend_irecv": hops + W, "p2p_isend": 2 * hops + W, "p2p_irecv": 2 * hops + W}


def ulysses_counts():
    from ringwise.attention.ulysses import mesh_groups

    ug, rg = mesh_groups(2, 2)
    q, k, v = (
        ringwise.shard(torch.randn(1, 32, 4, 8), 1, "zigzag", rg, ulysses_group=ug).requires_grad_() for _ in range(3)
    )
    saved = []
    with (
        count_comms() as fwd,
        torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t),
    ):
        out = ringwise.ring_attention(q, k, v, causal=True, group=rg, ulysses_group=ug)
    with count_comms() as bwd:
        out.sum().backward()
    return dict(fwd.counts), dict(bwd.counts), saved, tuple(q.shape)


def test_ulysses_mesh_makes_one_gather_too(cluster):
    """2 x 2 mesh from mesh_groups: one all_gather_object (over the whole mesh, not one per
    group), the two all-to-alls each way, and the ring of 2's hops."""
    for fwd, bwd, saved, seq_shape in cluster(4).run(ulysses_counts):
        # the backward keeps the head chunks (q, k, v, out: (1, 16, 2, 8); lse), not the sequence shards
        assert seq_shape == (1, 8, 4, 8) and seq_shape not in saved and len(saved) == 5, saved
        assert fwd == {
            "all_gather_object": 1,
            "all_to_all_single": 2,
            "batch_isend_irecv": 1,
            "p2p_isend": 2,
            "p2p_irecv": 2,
        }
        assert bwd == {"all_to_all_single": 2, "batch_isend_irecv": 3, "p2p_isend": 4, "p2p_irecv": 4}


def test_lse_is_not_differentiable():
    """A loss that reads lse gets an error, never a silently partial gradient."""
    q, k, v = (torch.randn(1, 8, 2, 8, requires_grad=True) for _ in range(3))
    out, lse = ringwise.ring_attention(q, k, v, causal=True, return_lse=True)
    assert out.requires_grad and not lse.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        lse.sum().backward()


def test_autocast_runs_the_op_in_the_autocast_dtype():
    """Under torch.autocast the op casts q, k, v to the autocast dtype, as SDPA does (a trainer's bf16 autocast
    hands float32 q and k with a bfloat16 v): the result is the op's on the cast inputs, bit for bit, and the
    gradients come back in each input's own dtype."""
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 12, 4, 8, generator=g, requires_grad=True) for _ in range(2))
    v = torch.randn(1, 12, 4, 8, generator=g).to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ringwise.ring_attention(q, k, v, causal=True)
    want = ringwise.ring_attention(q.bfloat16(), k.bfloat16(), v, causal=True)
    assert out.dtype == torch.bfloat16 and torch.equal(out, want)
    out.float().sum().backward()
    assert (q.grad.dtype, k.grad.dtype, v.grad.dtype) == (torch.float32, torch.float32, torch.bfloat16)
    with pytest.raises(ValueError, match="dtype"):  # outside autocast, mixed dtypes are still refused
        ringwise.ring_attention(q, k, v, causal=True)


def refused_counts():
    """Rank 1 passes a bad window: every rank raises the same error, and nothing but the
    verdict gather was sent."""
    q = torch.randn(1, 8, 4, 8)
    with count_comms() as c:
        try:
            ringwise.ring_attention(q, q, q, causal=True, window=-1 if dist.get_rank() == 1 else None)
        except ValueError as e:
            return str(e), dict(c.counts)
    return None, dict(c.counts)


def test_a_refused_call_sends_nothing_but_the_verdict(cluster):
    results = cluster(3).run(refused_counts)
    assert len({e for e, _ in results}) == 1 and "rank 1: window must be an int >= 0" in results[0][0]
    assert all(c == {"all_gather_object": 1} for _, c in results)


def _llama(seed=0):
    from transformers import LlamaConfig

    import ringwise.integrations.transformers as rw

    cfg = LlamaConfig(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(seed)
    return rw.from_config(cfg).eval()


def hf_counts(mesh):
    import ringwise.integrations.transformers as rw

    ug, rg = None, None
    if mesh:
        from ringwise.attention.ulysses import mesh_groups

        ug, rg = mesh_groups(*mesh)
    rw.use_ring(group=rg, ulysses_group=ug)
    model = _llama()
    batch = rw.shard_batch(torch.randint(0, 61, (1, 16 * dist.get_world_size())))
    batch.pop("labels")
    with count_comms() as c, torch.no_grad():
        model(**batch)
    rw.use_ring()
    return dict(c.counts)


@pytest.mark.parametrize("W,mesh", [(2, None), (4, (2, 2))], ids=["ring2", "U2xR2"])
def test_transformers_forward_makes_one_gather(cluster, W, mesh):
    """A 4-layer Llama forward: the integration's objections ride in the op's one gather."""
    pytest.importorskip("transformers")
    for counts in cluster(W).run(hf_counts, mesh):
        assert counts.get("all_gather_object") == 1, counts


def two_models():
    """Two models in one process, each with its own ring (layouts zigzag and contiguous):
    each gives its single-process logits."""
    import ringwise.integrations.transformers as rw

    rw.use_ring()
    ids = torch.randint(0, 61, (1, 16 * dist.get_world_size()))
    alone, _ = dist.new_subgroups_by_enumeration([[r] for r in range(dist.get_world_size())])
    errors = []
    for layout in ("zigzag", "contiguous"):
        shard = ringwise.SeqShard(layout)
        model = _llama()
        rw.configure(model, shard)
        whole = _llama()
        rw.configure(whole, ringwise.SeqShard(layout, group=alone))
        batch = rw.shard_batch(ids, shard=shard)
        batch.pop("labels")
        with torch.no_grad():
            got = model(**batch).logits
            want = whole(**rw.shard_batch(ids, shard=rw.shard_of(whole))).logits
        assert rw.shard_of(model) is shard
        errors.append((got - shard.shard(want)).abs().max().item())
    return errors


def test_two_models_with_different_rings_in_one_process(cluster):
    pytest.importorskip("transformers")
    for errors in cluster(2).run(two_models):
        assert max(errors) < 1e-5, errors
