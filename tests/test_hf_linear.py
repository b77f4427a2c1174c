"""Hybrid models' delta-rule layers through the ring (ringwise.integrations.hf_linear): the gated DeltaNet of Qwen3-Next
and Qwen3.5 (a vision-language model: the dense and MoE ones on rw.shard_multimodal_batch, images across shard
boundaries) and Kimi Linear's KDA (a decay per key channel), the short convolution and the delta rule's matrix state
carried across ranks, and LFM2's gated short convolutions (the convolution alone), next to their full-attention
layers on ringwise.

The oracle is transformers' own model in one process (SDPA attention: eager's softmax is float32) in float64, with
its delta-rule kernel (which computes in float32 whatever the model's dtype) replaced by hf_linear's float64 one; that
kernel is held to transformers' on its own first. The ring runs in float64 (to round-off) and in float32
(transformers' kernel: within 2x the float32 one-process error), W = 2, 3 (Qwen3-Next also 4), contiguous and zigzag;
loss, logits and every parameter gradient; packed documents (the convolution and the state reset at each document's
start) against each document run alone; the striped layout and a cache refused alike on every rank."""

import contextlib
import functools
import importlib
import itertools

import pytest
import torch
import torch.distributed as dist

transformers = pytest.importorskip("transformers")

from helpers import (  # noqa: E402
    CEILINGS,
    EPS,
    assemble,
    assert_same_generation,
    assert_within_budget,
    generation_prompt,
    greedy,
    max_err,
)
from hf_versions import EAGER_EXPERTS, config_class  # noqa: E402

import ringwise.integrations.transformers as rw  # noqa: E402
from ringwise.integrations.hf_linear import DELTA_KERNELS, GATED_DELTA_LAYERS, float64_gated_delta_rule  # noqa: E402
from ringwise.integrations.hf_mixers import swapped  # noqa: E402

SEQ = 48


def make_config(name="qwen3_next"):
    """Tiny configs of each family's real classes, delta-rule layers around one full-attention layer."""
    if name == "qwen3_next":  # three gated DeltaNet layers, one full-attention; GQA in both (4:2), MoE, shared expert
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
    if name in MULTIMODAL:  # Qwen3.5: three gated DeltaNet layers, one gated full-attention (interleaved M-RoPE)
        import test_hf_multimodal as mm

        text = dict(
            mm.TEXT,
            num_hidden_layers=4,
            head_dim=16,
            rope_parameters=dict(mm.MROPE, mrope_interleaved=True, partial_rotary_factor=0.5),  # 4 frequencies
            linear_num_value_heads=4,
            linear_num_key_heads=2,
            linear_key_head_dim=8,
            linear_value_head_dim=6,
            linear_conv_kernel_dim=4,
        )
        if name == "qwen3_5_moe":
            text.update(
                num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16
            )
        return config_class("Qwen3_5Config" if name == "qwen3_5" else "Qwen3_5MoeConfig")(
            text_config=text,
            vision_config=dict(
                mm.VISION, depth=2, intermediate_size=32, out_hidden_size=32, num_position_embeddings=16
            ),
            image_token_id=mm.IMAGE,
            video_token_id=mm.VIDEO,
            vision_start_token_id=mm.START,
        )
    if name == "lfm2":  # gated short-convolution layers (kernel 3, with bias) around one full-attention layer; GQA
        return config_class("Lfm2Config")(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            layer_types=["conv", "conv", "full_attention", "conv"],
            conv_L_cache=3,
            conv_bias=True,
            block_auto_adjust_ff_dim=False,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    if name == "lfm2_moe":  # LFM2's short-convolution layers (kernel 3, no bias), one dense MLP then MoE; GQA 6:3
        return config_class("Lfm2MoeConfig")(
            vocab_size=64,
            hidden_size=48,
            intermediate_size=64,
            moe_intermediate_size=16,
            num_hidden_layers=4,
            num_dense_layers=1,
            num_experts=4,
            num_experts_per_tok=2,
            num_attention_heads=6,
            num_key_value_heads=3,
            layer_types=["conv", "full_attention", "conv", "conv"],
            conv_L_cache=3,
            conv_bias=False,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    assert name == "kimi_linear", name
    # KDA layers (a decay per key channel) on both sides of an MLA full-attention layer (NoPE); a dense MLP first,
    # then MoE with a shared expert
    return config_class("KimiLinearConfig")(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=4,
        layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention"],
        num_attention_heads=4,
        num_key_value_heads=4,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_rope_head_dim=4,
        qk_nope_head_dim=8,
        v_head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        linear_num_heads=4,
        linear_head_dim=8,
        linear_conv_kernel_dim=4,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


FAMILIES = ("qwen3_next", "kimi_linear", "qwen3_5", "qwen3_5_moe", "lfm2", "lfm2_moe")
MULTIMODAL = {"qwen3_5": "qwen3_5_text", "qwen3_5_moe": "qwen3_5_moe_text"}  # -> its text model's type


def _float64_forget_gate(self, hidden_states):
    """KimiLinearForgetGate.forward in the model's dtype: transformers' computes the gate in float32 (.float() on
    its input, dt_bias and A_log), so every gradient flowing back through it is rounded to float32 and two float64
    runs differ there by float32 round-off wherever their float64 values round apart. The float64 runs (ring and
    one process alike) use this one."""
    gate = self.f_b_proj(self.f_a_proj(hidden_states)) + self.dt_bias.view(1, 1, -1)
    g = gate.view(*hidden_states.shape[:2], -1, self.head_dim)
    return -self.A_log.exp() * torch.where(g > 20.0, g, torch.log(1.0 + torch.exp(g)))


def _float64_router(self, hidden_states):
    """KimiLinearTopkRouter.forward with its linear layer in the model's dtype: transformers' runs it in float32,
    where a matmul's rounding depends on how many rows it gets (a shard, a document), so routing weights differ by
    float32 round-off between two float64 runs. Selection as transformers' (groups, top-k, normalisation)."""
    x = hidden_states.view(-1, self.hidden_dim)
    logits = torch.nn.functional.linear(x, self.weight.to(x.dtype))
    scores = logits.sigmoid()
    choice = scores + self.e_score_correction_bias.to(x.dtype)
    groups = choice.view(-1, self.num_group, self.num_experts // self.num_group).topk(2, dim=-1)[0].sum(dim=-1)
    keep = torch.zeros_like(groups).scatter_(1, torch.topk(groups, k=self.topk_group, dim=-1)[1], 1)
    keep = keep.unsqueeze(-1).expand(-1, self.num_group, self.num_experts // self.num_group).reshape(x.shape[0], -1)
    index = torch.topk(choice.masked_fill(~keep.bool(), float("-inf")), k=self.top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, index)
    if self.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return logits, weights * self.routed_scaling_factor, index


@contextlib.contextmanager
def float64_gates(name, dtype):
    """Kimi Linear in float64: its forget gate and router in float64 (_float64_forget_gate, _float64_router);
    otherwise nothing."""
    if name != "kimi_linear" or dtype != torch.float64:
        yield
        return
    from transformers.models.kimi_linear import modeling_kimi_linear as modeling

    with contextlib.ExitStack() as stack:
        for cls, forward in (
            (modeling.KimiLinearForgetGate, _float64_forget_gate),
            (modeling.KimiLinearTopkRouter, _float64_router),
        ):
            stack.enter_context(swapped(cls, dict(forward=forward)))
        yield


def global_ids():
    return torch.randint(3, 64, (1, SEQ), generator=torch.Generator().manual_seed(1))


def _modeling(name):
    """The family's modeling module and the name of its chunked delta-rule kernel there."""
    family = MULTIMODAL.get(name, name)
    return importlib.import_module(GATED_DELTA_LAYERS[family].module), DELTA_KERNELS.get(family)


@pytest.mark.parametrize("name", ["qwen3_next", "kimi_linear"])
def test_float64_kernel_is_transformers_kernel(name):
    """hf_linear's float64 delta rule (token by token) is transformers' chunked kernel (float32 inside): outputs and
    final states agree within float32 round-off, key/query normalisation included; GQA (gated DeltaNet), a decay per
    key channel (KDA)."""
    g = torch.Generator().manual_seed(3)
    B, T, hk, hv, dk, dv = 2, 37, 2, 4, 8, 6
    if name == "kimi_linear":  # no grouped heads; the decay has the keys' shape
        hk = hv
    q, k = (torch.randn(B, T, hk, dk, generator=g) for _ in range(2))
    v = torch.randn(B, T, hv, dv, generator=g)
    decay_shape = (B, T, hv, dk) if name == "kimi_linear" else (B, T, hv)
    decay, beta = -torch.rand(*decay_shape, generator=g), torch.rand(B, T, hv, generator=g)
    state = torch.randn(B, hv, dk, dv, generator=g)
    modeling, kernel = _modeling(name)
    want, want_state = getattr(modeling, kernel)(
        q, k, v, g=decay, beta=beta, initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=True
    )
    got, got_state = float64_gated_delta_rule(
        *(x.double() for x in (q, k, v, decay, beta, state)), use_qk_l2norm_in_kernel=True
    )
    assert got.dtype == torch.float64
    assert max_err(got, want) < 1e-5 and max_err(got_state, want_state) < 1e-5


@functools.cache
def single_run(name, dtype, docs=None):
    """transformers' model in one process, SDPA attention; in float64 its delta-rule kernel is the float64 one.
    docs (packed documents' global boundaries): each document run on its own, the logits concatenated."""
    torch.manual_seed(0)
    auto = transformers.AutoModelForImageTextToText if name in MULTIMODAL else transformers.AutoModelForCausalLM
    model = auto.from_config(make_config(name), attn_implementation="sdpa", **EAGER_EXPERTS).to(dtype)
    modeling, name_of_kernel = _modeling(name)
    kernel = getattr(modeling, name_of_kernel) if name_of_kernel else None

    def float64_kernel(query, key, value, g, beta, initial_state=None, use_qk_l2norm_in_kernel=False, **_):
        return float64_gated_delta_rule(query, key, value, g, beta, initial_state, use_qk_l2norm_in_kernel)

    ids, labels, inputs = global_batch(name, dtype)
    bounds = docs or (0, ids.shape[1])
    assert docs is None or not inputs, "documents: text models only"
    with float64_gates(name, dtype):
        try:
            if dtype == torch.float64 and name_of_kernel:  # LFM2: no delta rule
                setattr(modeling, name_of_kernel, float64_kernel)
            if docs is None:
                logits = model(input_ids=ids, use_cache=False, **inputs).logits
            else:  # each document at its global positions, as on the ring (transformers' RoPE angles are float32)
                logits = torch.cat(
                    [
                        model(input_ids=ids[:, a:e], position_ids=torch.arange(a, e)[None], use_cache=False).logits
                        for a, e in zip(docs, docs[1:])
                    ],
                    dim=1,
                )
        finally:
            if name_of_kernel:
                setattr(modeling, name_of_kernel, kernel)
        targets = labels[:, 1:].clone()
        for end in bounds[1:-1]:  # a document's last token predicts nothing
            targets[:, end - 1] = -100
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100)
        loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return dict(logits=logits.detach(), loss=loss.detach(), grads=grads)


def global_batch(name, dtype):
    """input_ids, labels (-100 where nothing is predicted) and the model's other inputs: text for the text models;
    Qwen3.5: test_hf_multimodal's two rows with three images of two sizes across shard boundaries."""
    if name not in MULTIMODAL:
        return global_ids(), global_ids(), {}
    import test_hf_multimodal as mm

    ids, labels, inputs = mm.global_batch()
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return ids, labels, inputs


def ring_run(case):
    rw.use_ring(layout=case["layout"])
    torch.manual_seed(0)
    dtype = getattr(torch, case["dtype"])
    model = rw.from_config(make_config(case["name"]), **EAGER_EXPERTS).to(dtype)
    ids, labels, inputs = global_batch(case["name"], dtype)
    if case["name"] in MULTIMODAL:  # the vision tower on the global images, each rank its own tokens' features
        batch = rw.shard_multimodal_batch(model, ids, labels, **inputs)
    else:
        batch = rw.shard_batch(ids, cu_seqlens=case.get("docs"))
    labels = batch.pop("labels")  # shifted on the global sequence (a document's last token: -100)
    targets = torch.tensor(int((labels != -100).sum()))
    dist.all_reduce(targets)
    with float64_gates(case["name"], dtype):
        logits = model(**batch, use_cache=False).logits
        # this rank's share of the mean next-token loss, in the logits' dtype (rw.causal_lm_loss and the model's own
        # loss compute it in float32, as transformers does; test_hf_loss covers them)
        loss = (
            torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
            )
            / targets
        )
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for g in grads.values():
        dist.all_reduce(g)
    share = loss.detach().clone()
    dist.all_reduce(share)
    return dict(logits=logits.detach(), grads=grads, loss=share)


SHAPES = {  # family -> (W, layout) of its cases
    "qwen3_next": [(2, "zigzag"), (3, "zigzag"), (3, "contiguous"), (4, "contiguous")],
    "kimi_linear": [(2, "zigzag"), (3, "zigzag"), (3, "contiguous")],
    "qwen3_5": [(2, "zigzag"), (3, "zigzag"), (3, "contiguous")],
    "qwen3_5_moe": [(2, "contiguous"), (3, "zigzag")],
    "lfm2": [(2, "zigzag"), (3, "contiguous")],
    "lfm2_moe": [(2, "zigzag"), (3, "contiguous")],
}
DOCS = (0, 7, 20, 21, SEQ)  # packed documents: a one-token one, boundaries inside shards and at none
GRID = [
    dict(name=name, world=W, layout=layout, dtype=dtype)
    for name in FAMILIES
    for (W, layout), dtype in itertools.product(SHAPES[name], ["float64", "float32"])
] + [
    dict(name=name, world=W, layout=layout, dtype=dtype, docs=DOCS)
    for name, W, layout, dtype in [
        ("qwen3_next", 3, "zigzag", "float64"),
        ("qwen3_next", 2, "contiguous", "float32"),
        ("kimi_linear", 2, "zigzag", "float64"),
        ("lfm2", 3, "contiguous", "float64"),
    ]
]


@pytest.mark.parametrize(
    "case",
    GRID,
    ids=lambda c: f"{c['name']}-W{c['world']}-{c['layout']}-{c['dtype']}" + ("-docs" if "docs" in c else ""),
)
def test_hybrid_model_is_exact_on_the_ring(grid_results, case):
    """Logits, loss and every parameter gradient on the ring equal transformers' own model in one process (packed
    documents: each document on its own), float64 to round-off, float32 within 2x the one-process float32 error."""
    results = grid_results(ring_run, GRID, case)
    ref = single_run(case["name"], torch.float64, case.get("docs"))
    logits = assemble([r["logits"] for r in results], case["layout"], 1)
    want_loss = ref["loss"]
    assert results[0]["grads"].keys() == ref["grads"].keys()
    if case["name"] in MULTIMODAL:
        assert any(".visual." in n for n in ref["grads"]), "no gradient reached the vision tower"
    if case["dtype"] == "float64":
        assert max_err(logits, ref["logits"]) < 1e-10
        assert abs(results[0]["loss"].item() - want_loss.item()) < 1e-12
        for n, g in results[0]["grads"].items():
            # the norms and the decay rates A_log run in float32 (the model upcasts those
            # weights), so their gradients are float32 sums over each rank's tokens: float32 round-off relative to
            # the gradient
            upcast = "norm" in n or n.endswith("A_log")
            rel = EPS["float32"] if upcast else 1e-10
            assert max_err(g, ref["grads"][n]) < rel * max(1e-3, ref["grads"][n].abs().max().item()), n
        return
    f32 = single_run(case["name"], torch.float32, case.get("docs"))
    err32 = max_err(f32["logits"], ref["logits"])
    assert_within_budget("logits", max_err(logits, ref["logits"]), err32, 1e-6, ceiling=CEILINGS["float32"])
    for n, g in results[0]["grads"].items():
        own = max_err(f32["grads"][n], ref["grads"][n])
        assert_within_budget(n, max_err(g, ref["grads"][n]), own, 1e-7, ceiling=CEILINGS["float32"])


def refused_run(how, name="qwen3_next"):
    rw.use_ring(layout="striped" if how == "striped" else "zigzag")
    model = rw.from_config(make_config(name), **EAGER_EXPERTS)
    ids, labels, inputs = global_batch(name, torch.float32)
    try:
        if how == "generate":
            rw.generate(model, ids, max_new_tokens=2, **inputs)
            return None
        if name in MULTIMODAL:
            batch = rw.shard_multimodal_batch(model, ids, labels, **inputs)
        else:
            batch = rw.shard_batch(ids)
        batch.pop("labels")
        model(**batch, use_cache=how == "cache")
    except ValueError as e:
        return str(e)
    return None


REFUSALS = dict(striped="striped layout", cache="use_cache=False", generate="vision-language model with convolution")


@pytest.mark.parametrize(
    "how, name",
    [("striped", "qwen3_next"), ("cache", "qwen3_next"), ("generate", "qwen3_5"), ("striped", "kimi_linear")]
    + [("striped", "lfm2"), ("cache", "lfm2")],
)
def test_refused_alike_with_the_reason(cluster, how, name):
    messages = cluster(2).run(refused_run, how, name)
    assert messages[0] is not None and all(m == messages[0] for m in messages), messages
    assert REFUSALS[how] in messages[0], messages[0]


@pytest.mark.parametrize("config", ["Qwen3_5TextConfig", "Qwen3_5MoeTextConfig"])
def test_qwen3_5_text_model_alone_is_refused_with_the_reason(config):
    """Qwen3.5 rotates by multimodal RoPE: its text models alone are refused as every M-RoPE text model is (run the
    vision-language model on rw.shard_multimodal_batch, as the grid does)."""
    with pytest.raises(ValueError, match=r"M-RoPE.*in a text model alone"):
        rw.check_model(config_class(config)())


def test_a_replaced_layer_forward_is_refused():
    """A delta-rule layer whose forward is not transformers' own (a hub kernel's, after kernelize / use_kernels)
    calls no module functions ringwise could swap: refused when the model is checked, never run unsharded."""
    torch.manual_seed(0)
    rw.register()
    model = transformers.AutoModelForCausalLM.from_config(make_config(), attn_implementation="ringwise")
    layer = next(m for m in model.modules() if type(m).__name__ == "Qwen3NextGatedDeltaNet")
    layer.forward = lambda *a, **k: None  # what a kernel hub's forward looks like to ringwise: not the class's
    with pytest.raises(ValueError, match="forward was replaced"):
        rw.check_model(model)


# ---------------------------------------------------------------- generation from the ring's prefill states


def _generate(name, dtype, generate):
    """generate(model-independent ids) with the float64 kernels the float64 runs use (the ring's prefill and
    transformers' multi-token steps alike); greedy: (tokens, scores)."""
    modeling, name_of_kernel = _modeling(name)

    def float64_kernel(query, key, value, g, beta, initial_state=None, use_qk_l2norm_in_kernel=False, **_):
        return float64_gated_delta_rule(query, key, value, g, beta, initial_state, use_qk_l2norm_in_kernel)

    with float64_gates(name, dtype), contextlib.ExitStack() as stack:
        if dtype == torch.float64 and name_of_kernel:  # the prefill's kernel and the decode steps' (one token each)
            stack.enter_context(swapped(modeling, {name_of_kernel: float64_kernel}))
            if hasattr(modeling, "torch_recurrent_gated_delta_rule"):
                stack.enter_context(swapped(modeling, {"torch_recurrent_gated_delta_rule": float64_kernel}))
        return greedy(generate)


def ring_generate(case):
    rw.use_ring(layout=case["layout"])
    torch.manual_seed(0)
    model = rw.from_config(make_config(case["name"]), **EAGER_EXPERTS).double().eval()
    ids = generation_prompt(case["prompt"])
    return _generate(case["name"], torch.float64, lambda **kw: rw.generate(model, ids, **kw))


GENERATE_GRID = [
    dict(name="qwen3_next", world=2, layout="zigzag", prompt=30),  # a 28-token ring prefill, 2 tokens in step one
    dict(name="qwen3_next", world=3, layout="contiguous", prompt=14),
    # (Kimi Linear: its MLA attention is refused by rw.generate, test_hf_generate)
    dict(name="lfm2", world=2, layout="zigzag", prompt=29),
    dict(name="lfm2", world=3, layout="zigzag", prompt=9),  # too short for the ring: the whole prompt in step one
    dict(name="lfm2_moe", world=2, layout="contiguous", prompt=25),
]


@pytest.mark.parametrize("case", GENERATE_GRID, ids=lambda c: f"{c['name']}-W{c['world']}-{c['layout']}-S{c['prompt']}")
def test_generate_continues_from_the_rings_states(grid_results, case):
    """rw.generate on a hybrid model: the ring's prefill leaves each convolution's last inputs and each delta rule's
    state (composed across ranks) in the cache, the decode steps run on them alike on every rank; the tokens equal
    model.generate in one process and every step's logits agree to float64 round-off."""
    results = grid_results(ring_generate, GENERATE_GRID, case)
    torch.manual_seed(0)
    model = (
        transformers.AutoModelForCausalLM.from_config(
            make_config(case["name"]), attn_implementation="sdpa", **EAGER_EXPERTS
        )
        .double()
        .eval()
    )
    ids = generation_prompt(case["prompt"])
    assert_same_generation(results, *_generate(case["name"], torch.float64, lambda **kw: model.generate(ids, **kw)))
