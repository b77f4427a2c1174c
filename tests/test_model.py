"""The Blockwise Transformer and the training step: exact across ring sizes and layouts."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from helpers import CEILINGS, assert_within_budget, train_args

from ringwise.model import ModelConfig, Transformer, model_config
from ringwise.train import compute_gradients, make_mesh, shard_model, step, task_for
from ringwise.train.loop import Run

TINY = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, ffn_chunk=5, loss_chunk=7)


def test_blockwise_ffn_and_loss_match_plain():
    """Chunked + recomputed feed-forward and loss equal the plain ones, values and grads."""
    torch.manual_seed(0)
    model = Transformer(TINY).double()
    ffn = model.layers[0].ffn
    x = torch.randn(2, 23, 32, dtype=torch.float64, requires_grad=True)
    blocked = ffn(x)
    plain = ffn.w2(F.silu(ffn.w1(x)) * ffn.w3(x))
    g = torch.randn_like(plain)
    gb = torch.autograd.grad(blocked, [x] + list(ffn.parameters()), g)
    gp = torch.autograd.grad(plain, [x] + list(ffn.parameters()), g)
    assert torch.allclose(blocked, plain, atol=1e-14)
    assert all(torch.allclose(a, b, atol=1e-13) for a, b in zip(gb, gp))

    h = torch.randn(2, 23, 32, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, TINY.vocab_size, (2, 23))
    labels[0, :4] = -100
    loss_b = model.loss_sum(h, labels)
    loss_p = F.cross_entropy(model.output(h).flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    assert torch.allclose(loss_b, loss_p, atol=1e-12)
    assert torch.allclose(torch.autograd.grad(loss_b, h)[0], torch.autograd.grad(loss_p, h)[0], atol=1e-13)


def test_blockwise_keeps_only_chunk_inputs():
    """No (seq x ffn_dim) hidden is saved for backward: only chunk inputs and outputs."""
    cfg = ModelConfig(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=1024, ffn_chunk=8)
    ffn = Transformer(cfg).layers[0].ffn
    x = torch.randn(1, 64, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        ffn(x)
    assert max(saved) < 64 * 1024  # a whole hidden would be 64 x 1024


def test_the_training_calls_agree_and_take_packed_documents(monkeypatch):
    """loss, token_losses and predict (the calls the training job makes of either model) on one
    process: loss is forward's, token_losses sum to it (0 where unlabelled), predict is the greedy
    token at the labelled positions; packed documents (cu_seqlens) are each document alone; the first
    loss after set_ring is validated, later ones are not, evaluation's calls always are."""
    import ringwise.model as rw_model
    from ringwise.attention.seqshard import SeqShard

    torch.manual_seed(0)
    model = Transformer(TINY).double()
    ids, labels = torch.randint(0, TINY.vocab_size, (2, 2, 24))
    labels[:, :5] = -100
    pos = torch.arange(24)
    validated = []
    real = rw_model.ring_attention
    monkeypatch.setattr(rw_model, "ring_attention", lambda *a, **kw: validated.append(kw["validate"]) or real(*a, **kw))
    model.set_ring(SeqShard("contiguous"))
    loss, n = model.loss(ids, pos, labels)
    assert validated == [True, True]  # a call per layer
    assert torch.equal(loss, model(ids, pos, labels, layout="contiguous")[0]) and n == 38
    validated.clear()
    model.loss(ids, pos, labels)
    per_token = model.token_losses(ids, pos, labels)
    predicted, mask = model.predict(ids, pos, labels)
    assert validated == [False] * 2 + [True] * 4
    assert per_token.shape == (2, 24) and (per_token[:, :5] == 0).all()
    assert torch.allclose(per_token.sum(), loss, rtol=1e-12)
    h = model.hidden(ids, pos)
    assert torch.equal(mask, labels != -100) and torch.equal(predicted, model.output(h[mask]).argmax(-1))

    packed, _ = model.loss(ids, pos, labels, [0, 10, 24])
    alone = sum(model(ids[:, a:b], pos[a:b], labels[:, a:b])[0] for a, b in ((0, 10), (10, 24)))
    assert torch.allclose(packed, alone, rtol=1e-12) and not torch.allclose(packed, loss, rtol=1e-6)
    with pytest.raises(ValueError, match="cu_seqlens"):
        Transformer(replace(TINY, attention="sdpa")).loss(ids, pos, labels, [0, 10, 24])


def gradients_and_step(cfg, dtype_name, per_layer=None):
    """Loss, grads and post-step parameters of the global batch at step 0, on this mesh."""
    dtype = getattr(torch, dtype_name)
    mesh = make_mesh(cfg.dp, torch.device("cpu"), timeout=30, ulysses=cfg.ulysses)
    torch.manual_seed(cfg.seed)
    model = Transformer(model_config(cfg.model, ffn_chunk=16, loss_chunk=16)).to(dtype)
    shard_model(model, mesh, per_layer=per_layer)  # FSDP2 over the whole (dp, cp) mesh: the one gradient path
    model.set_ring(mesh.seqshard(cfg.layout))
    # SGD with momentum: the stepped parameters are linear in the gradients, so the float32
    # budget carries over. (AdamW's first step, g / (|g| + 1e-8), amplifies the round-off of
    # near-zero gradients without bound, making a max-error comparison a coin toss.)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
    run = Run(cfg, mesh, task_for(cfg), model, optimizer)

    def whole(t):  # FSDP holds DTensor shards
        return t.full_tensor().flatten()

    loss, n = compute_gradients(run, 0)
    grads = torch.cat([whole(p.grad) for p in model.parameters()]).clone()
    optimizer.zero_grad(set_to_none=True)
    step(run, 0)
    params = torch.cat([whole(p.detach()) for p in model.parameters()])
    return dict(loss=loss, tokens=n, grads=grads, params=params)


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.fixture(scope="module")
def single_process(cluster):
    """The W=1 run in float64 (the reference) and in float32 (the error budget)."""
    args = train_args(layout="contiguous")
    return {dt: cluster(1).run(gradients_and_step, args, dt)[0] for dt in ("float64", "float32")}


@pytest.mark.parametrize(
    "world,dp,layout,per_layer",
    [
        (2, 1, "zigzag", None),
        (3, 1, "striped", None),
        (4, 1, "contiguous", None),
        (3, 1, "zigzag", True),
        (4, 1, "striped", None),
        (4, 2, "zigzag", True),
        (4, 2, "contiguous", None),
        (2, 2, "striped", None),
        (4, (1, 2), "zigzag", None),
        (4, (1, 4), "striped", None),
        (4, (2, 2), "contiguous", None),
        (6, (1, 2), "zigzag", None),
    ],
    ids=str,
)
def test_training_step_is_exact_across_ranks(cluster, single_process, world, dp, layout, per_layer):
    """Same global batch and seed: loss, every gradient and the stepped parameters of a
    W-rank run equal the one-process run within float32 round-off (measured against float64)."""
    ref, f32 = single_process["float64"], single_process["float32"]
    dp, ulysses = dp if isinstance(dp, tuple) else (dp, 1)  # (dp, U): a (dp, ring, ulysses) mesh
    args = train_args(layout=layout, dp=dp, ulysses=ulysses)
    results = cluster(world).run(gradients_and_step, args, "float32", per_layer)  # FSDP units: auto or per layer
    for r in results:  # every rank ends with the same full gradient
        assert r["tokens"] == ref["tokens"]
        for name, eps in (("grads", 1e-7), ("params", 1e-7)):
            assert_within_budget(
                name, _err(r[name], ref[name]), _err(f32[name], ref[name]), eps, ceiling=CEILINGS["float32"]
            )
        assert_within_budget(
            "loss", abs(r["loss"] - ref["loss"]), abs(f32["loss"] - ref["loss"]), 1e-6, ceiling=CEILINGS["float32"]
        )


def test_initial_values_come_from_the_cpu_generator_whatever_the_default_device():
    """A model built under a default-device context (the GPU bench builds it `with cuda:`) draws its
    initial values on the CPU: a CUDA default device refuses the CPU generator (seen on an H200),
    and another generator would give other values."""
    cfg = model_config("tiny")
    whole = Transformer(cfg)
    with torch.device("meta"):
        elsewhere = Transformer(cfg)
        values = {name: elsewhere.initial_value(name, 0) for name, _ in elsewhere.named_parameters()}
    for name, value in values.items():
        assert value.device.type == "cpu" and torch.equal(value, whole.initial_value(name, 0)), name
