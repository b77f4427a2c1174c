"""Qwen3-Next's gated DeltaNet layers through the ring (ringwise.integrations.hf_linear): the short convolution
and the gated delta rule's matrix state carried across ranks, next to its full-attention layers on ringwise.

The oracle is transformers' own model in one process (SDPA attention: eager's softmax is float32) in float64, with
its delta-rule kernel (which computes in float32 whatever the model's dtype) replaced by hf_linear's float64 one; that
kernel is held to transformers' on its own first. The ring runs in float64 (to round-off) and in float32
(transformers' kernel: within 2x the float32 one-process error), W = 2, 3, 4, contiguous and zigzag; loss, logits and
every parameter gradient; the striped layout and a cache refused alike on every rank."""

import itertools

import pytest
import torch
import torch.distributed as dist

transformers = pytest.importorskip("transformers")

from helpers import CEILINGS, EPS, assemble, assert_within_budget, max_err  # noqa: E402
from hf_versions import EAGER_EXPERTS, config_class  # noqa: E402

import ringwise.integrations.transformers as rw  # noqa: E402
from ringwise.integrations.hf_linear import float64_gated_delta_rule  # noqa: E402

SEQ = 48


def make_config(name="qwen3_next"):
    """Three gated DeltaNet layers and one full-attention layer; GQA in both (4:2), MoE with a shared expert."""
    assert name == "qwen3_next"
    return config_class("Qwen3NextConfig")(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        linear_num_value_heads=4,
        linear_num_key_heads=2,
        linear_key_head_dim=8,
        linear_value_head_dim=6,
        linear_conv_kernel_dim=4,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def global_ids():
    return torch.randint(3, 64, (1, SEQ), generator=torch.Generator().manual_seed(1))


def _modeling():
    from transformers.models.qwen3_next import modeling_qwen3_next

    return modeling_qwen3_next


def test_float64_kernel_is_transformers_kernel():
    """hf_linear's float64 delta rule (token by token) is transformers' chunked kernel (float32 inside): outputs and
    final states agree within float32 round-off, GQA and key/query normalisation included."""
    g = torch.Generator().manual_seed(3)
    B, T, hk, hv, dk, dv = 2, 37, 2, 4, 8, 6
    q, k = (torch.randn(B, T, hk, dk, generator=g) for _ in range(2))
    v = torch.randn(B, T, hv, dv, generator=g)
    decay, beta = -torch.rand(B, T, hv, generator=g), torch.rand(B, T, hv, generator=g)
    state = torch.randn(B, hv, dk, dv, generator=g)
    want, want_state = _modeling().torch_chunk_gated_delta_rule(
        q, k, v, g=decay, beta=beta, initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=True
    )
    got, got_state = float64_gated_delta_rule(
        *(x.double() for x in (q, k, v, decay, beta, state)), use_qk_l2norm_in_kernel=True
    )
    assert got.dtype == torch.float64
    assert max_err(got, want) < 1e-5 and max_err(got_state, want_state) < 1e-5


def single_run(dtype):
    """transformers' model in one process, eager attention; in float64 its delta-rule kernel is the float64 one."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        make_config(), attn_implementation="sdpa", **EAGER_EXPERTS
    ).to(dtype)
    modeling = _modeling()
    kernel = modeling.torch_chunk_gated_delta_rule

    def float64_kernel(query, key, value, g, beta, initial_state=None, use_qk_l2norm_in_kernel=False, **_):
        return float64_gated_delta_rule(query, key, value, g, beta, initial_state, use_qk_l2norm_in_kernel)

    ids = global_ids()
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    try:
        if dtype == torch.float64:
            modeling.torch_chunk_gated_delta_rule = float64_kernel
        logits = model(input_ids=ids, use_cache=False).logits
    finally:
        modeling.torch_chunk_gated_delta_rule = kernel
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    loss.backward()
    return dict(logits=logits.detach(), grads={n: p.grad for n, p in model.named_parameters() if p.grad is not None})


def ring_run(case):
    rw.use_ring(layout=case["layout"])
    torch.manual_seed(0)
    model = rw.from_config(make_config(), **EAGER_EXPERTS).to(getattr(torch, case["dtype"]))
    batch = rw.shard_batch(global_ids())
    labels = batch.pop("labels")
    logits = model(**batch, use_cache=False).logits
    # this rank's share of the mean next-token loss, in the logits' dtype (rw.causal_lm_loss and the model's own loss
    # compute it in float32, as transformers does; test_hf_loss covers them)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / (SEQ - 1)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for g in grads.values():
        dist.all_reduce(g)
    share = loss.detach().clone()
    dist.all_reduce(share)
    return dict(logits=logits.detach(), grads=grads, loss=share)


GRID = [
    dict(world=W, layout=layout, dtype=dtype)
    for (W, layout), dtype in itertools.product(
        [(2, "zigzag"), (3, "zigzag"), (3, "contiguous"), (4, "contiguous")], ["float64", "float32"]
    )
]


@pytest.mark.parametrize("case", GRID, ids=lambda c: f"W{c['world']}-{c['layout']}-{c['dtype']}")
def test_qwen3_next_is_exact_on_the_ring(grid_results, case):
    results = grid_results(ring_run, GRID, case)
    ref = single_run(torch.float64)
    logits = assemble([r["logits"] for r in results], case["layout"], 1)
    ids = global_ids()
    want_loss = torch.nn.functional.cross_entropy(ref["logits"][0, :-1], ids[0, 1:])
    assert results[0]["grads"].keys() == ref["grads"].keys()
    if case["dtype"] == "float64":
        assert max_err(logits, ref["logits"]) < 1e-10
        assert abs(results[0]["loss"].item() - want_loss.item()) < 1e-12
        for n, g in results[0]["grads"].items():
            # the norms and the decay rates A_log run in float32 (the model upcasts those weights), so their
            # gradients are float32 sums over each rank's tokens: float32 round-off relative to the gradient
            rel = EPS["float32"] if "norm" in n or n.endswith("A_log") else 1e-10
            assert max_err(g, ref["grads"][n]) < rel * max(1e-3, ref["grads"][n].abs().max().item()), n
        return
    f32 = single_run(torch.float32)
    err32 = max_err(f32["logits"], ref["logits"])
    assert_within_budget("logits", max_err(logits, ref["logits"]), err32, 1e-6, ceiling=CEILINGS["float32"])
    for n, g in results[0]["grads"].items():
        own = max_err(f32["grads"][n], ref["grads"][n])
        assert_within_budget(n, max_err(g, ref["grads"][n]), own, 1e-7, ceiling=CEILINGS["float32"])


def refused_run(how):
    rw.use_ring(layout="striped" if how == "striped" else "zigzag")
    model = rw.from_config(make_config(), **EAGER_EXPERTS)
    batch = rw.shard_batch(global_ids())
    batch.pop("labels")
    try:
        model(**batch, use_cache=how == "cache")
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.parametrize("how", ["striped", "cache"])
def test_refused_alike_with_the_reason(cluster, how):
    messages = cluster(2).run(refused_run, how)
    assert messages[0] is not None and all(m == messages[0] for m in messages), messages
    assert ("striped layout" if how == "striped" else "use_cache=False") in messages[0], messages[0]
