"""Mamba2 (SSD) layers through the ring (ringwise.integrations.hf_ssd): pure Mamba2 and the hybrids built on its mixer,
Bamba, Falcon-H1 (attention and a mixer side by side in every layer, muP multipliers), Granite 4 hybrid
(GraniteMoeHybrid: MoE with a shared expert), Nemotron-H (mixer, attention, MLP and MoE blocks) and Zamba2 (a
shared attention block with per-layer adapters before its hybrid layers' mixers): the causal convolution and the
SSD state carried across ranks, next to their attention layers on ringwise.

The oracle is transformers' own model in one process (SDPA attention) in float64, with its chunk scan (which
computes in float32 whatever the model's dtype) replaced by hf_ssd's float64 one; that kernel is held to
transformers' on its own first. The ring runs in float64 (to round-off) and in float32 (transformers' kernel: within
2x the float32 one-process error), W = 2 zigzag and W = 3 contiguous (Bamba also W = 3 zigzag), in training mode
(the fused-kernel entry point answered None) with odd head counts; loss, logits and every parameter gradient.
Packed documents are exact too (against one process run document by document). A cache, the striped layout, a
padding mask, flash-attention packing arguments and rw.generate are refused alike on every rank."""

import contextlib
import functools
import importlib
import itertools

import pytest
import torch
import torch.distributed as dist

transformers = pytest.importorskip("transformers")

from helpers import CEILINGS, assemble, assert_same_generation, assert_within_budget, generation_prompt, greedy, max_err  # noqa: E402
from hf_versions import EAGER_EXPERTS, config_class  # noqa: E402

import ringwise.integrations.transformers as rw  # noqa: E402
from ringwise.integrations.hf_mixers import swapped  # noqa: E402
from ringwise.integrations.hf_ssd import SSD_LAYERS, float64_ssd  # noqa: E402

SEQ = 48
CHUNK = 8  # the scan's chunk: shards of 8..16 tokens hold whole and partial chunks
TOKENS = dict(vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def make_config(name):
    """Tiny configs of each family's real classes: 5 or 3 mixer heads (odd), state size 8, conv kernel 4."""
    if name == "mamba2":  # mixers only: 5 heads of 8 in one group
        return config_class("Mamba2Config")(
            **TOKENS,
            hidden_size=40,
            expand=1,
            num_heads=5,
            head_dim=8,
            n_groups=1,
            state_size=8,
            conv_kernel=4,
            chunk_size=CHUNK,
            num_hidden_layers=3,
        )
    mixer = dict(mamba_n_heads=5, mamba_d_head=8, mamba_n_groups=1, mamba_d_state=8, mamba_d_conv=4)
    if name == "bamba":  # mixer, attention (5 heads, GQA 5:1), mixer
        return config_class("BambaConfig")(
            **TOKENS,
            **mixer,
            hidden_size=40,
            intermediate_size=64,
            num_hidden_layers=3,
            attn_layer_indices=[1],
            num_attention_heads=5,
            num_key_value_heads=1,
            mamba_expand=1,
            mamba_chunk_size=CHUNK,
        )
    if name == "falcon_h1":  # attention (3 heads) and a mixer in every layer; muP multipliers, the gated norm
        return config_class("FalconH1Config")(
            **TOKENS,
            **mixer,
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=3,
            num_key_value_heads=1,
            mamba_d_ssm=40,
            mamba_chunk_size=CHUNK,
            mamba_rms_norm=True,
            embedding_multiplier=1.5,
            lm_head_multiplier=0.5,
            attention_in_multiplier=0.7,
            attention_out_multiplier=1.3,
            ssm_in_multiplier=0.8,
            ssm_out_multiplier=1.2,
            key_multiplier=0.9,
            ssm_multipliers=[1.1, 0.9, 1.2, 0.8, 1.05],
            mlp_multipliers=[1.1, 0.9],
        )
    if name == "granitemoehybrid":  # mixer, attention (RoPE, 5 heads), mixer; MoE with a shared expert
        return config_class("GraniteMoeHybridConfig")(
            **TOKENS,
            **mixer,
            hidden_size=40,
            intermediate_size=32,
            shared_intermediate_size=16,
            num_hidden_layers=3,
            layer_types=["linear_attention", "full_attention", "linear_attention"],
            num_attention_heads=5,
            num_key_value_heads=1,
            num_local_experts=4,
            num_experts_per_tok=2,
            position_embedding_type="rope",
            mamba_expand=1,
            mamba_chunk_size=CHUNK,
            embedding_multiplier=2.0,
            residual_multiplier=0.5,
            attention_multiplier=0.3,
            logits_scaling=2.0,
        )
    if name == "nemotron_h":  # mixer, attention (3 heads, no RoPE), MLP, mixer, MoE
        return config_class("NemotronHConfig")(
            **TOKENS,
            hidden_size=48,
            layers_block_type=["linear_attention", "full_attention", "mlp", "linear_attention", "moe"],
            num_attention_heads=3,
            num_key_value_heads=1,
            head_dim=16,
            intermediate_size=64,
            mamba_num_heads=5,
            mamba_head_dim=8,
            n_groups=5,
            ssm_state_size=8,
            conv_kernel=4,
            chunk_size=CHUNK,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
            moe_intermediate_size=16,
            moe_shared_expert_intermediate_size=16,
        )
    assert name == "zamba2", name
    # mixer, hybrid, mixer, hybrid: one shared attention block (3 heads, RoPE) with adapters, before the mixers
    return config_class("Zamba2Config")(
        **TOKENS,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=4,
        layers_block_type=["linear_attention", "hybrid", "linear_attention", "hybrid"],
        num_attention_heads=3,
        mamba_expand=1,
        n_mamba_heads=3,
        mamba_d_state=8,
        mamba_d_conv=4,
        chunk_size=CHUNK,
        num_mem_blocks=1,
        use_shared_attention_adapter=True,
        adapter_rank=4,
        use_mem_rope=True,
    )


FAMILIES = tuple(SSD_LAYERS)


def _modeling(name):
    return importlib.import_module(SSD_LAYERS[name].module)


def test_float64_kernel_is_transformers_kernel():
    """hf_ssd's float64 scan (token by token) is transformers' mamba2_chunk_scan (float32 inside, chunked): outputs
    and final states agree within float32 round-off, from an initial state, with grouped B and C, dt_bias, softplus,
    a clamp and the D skip; a length that is no multiple of the chunk."""
    g = torch.Generator().manual_seed(3)
    b, T, H, P, G, N = 2, 37, 6, 5, 3, 4
    x = torch.randn(b, T, H, P, generator=g)
    dt = torch.randn(b, T, H, generator=g)
    A = -torch.rand(H, generator=g) - 0.5
    B, C = (torch.randn(b, T, G, N, generator=g) for _ in range(2))
    D, bias = torch.randn(H, generator=g), torch.randn(H, generator=g)
    state = torch.randn(b, H, P, N, generator=g)
    options = dict(chunk_size=8, dt_softplus=True, dt_limit=(0.01, 2.0), return_final_states=True)
    want, want_state = _modeling("mamba2").mamba2_chunk_scan(
        x, dt, A, B, C, D=D, dt_bias=bias, initial_states=state, **options
    )
    got, got_state = float64_ssd(
        *(t.double() for t in (x, dt, A, B, C)), D=D.double(), dt_bias=bias.double(), initial_states=state.double(),
        **options,
    )  # fmt: skip
    assert got.dtype == got_state.dtype == torch.float64
    assert max_err(got, want) < 1e-5 and max_err(got_state, want_state) < 1e-5
    assert max_err(got_state, state.double()) > 0.1  # the state moved: the comparison means something


def global_ids():
    return torch.randint(3, 64, (1, SEQ), generator=torch.Generator().manual_seed(1))


DOCS = [0, 13, 30, SEQ]  # packed documents: starts inside shards for every W tested


def build(name, dtype):
    torch.manual_seed(0)
    attention = {} if name == "mamba2" else dict(attn_implementation="sdpa")  # Mamba2 has no attention to choose
    model = transformers.AutoModelForCausalLM.from_config(make_config(name), **attention, **EAGER_EXPERTS).to(dtype)
    return model.train()  # the training path: the fused entry point is offered first


class KeepFloat64(torch.overrides.TorchFunctionMode):
    """Casts of float64 tensors to float32 left out (both sides of a float64 comparison run under it): these models
    compute their RMS norms, gated norms, A = -exp(A_log.float()) and Nemotron-H's router in float32 whatever their
    dtype, and float32 rounds a norm's row differently in tensors of different lengths (seen: the last token of a
    13-token document, one float32 ulp apart from the same row of a ring's shard, the scan's outputs equal to 1e-18).
    Without the casts both runs are float64 throughout, so they agree to float64 round-off, gradients included."""

    CASTS = (torch.Tensor.to, torch.Tensor.float, torch.Tensor.type)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        x = args[0] if args else None
        if func in self.CASTS and isinstance(x, torch.Tensor) and x.dtype == torch.float64:
            wanted = [a for a in (*args[1:], *kwargs.values()) if isinstance(a, torch.dtype)]
            if func is torch.Tensor.float or wanted == [torch.float32]:
                return x
        return func(*args, **kwargs)


def keep(dtype):
    return KeepFloat64() if dtype == torch.float64 else contextlib.nullcontext()


def logits_of(model, **inputs):
    return model(**inputs, use_cache=False).logits


def _piece(name, ids, a, b):
    """The inputs of tokens a..b of the sequence, at their global positions (Mamba2 takes none)."""
    if name == "mamba2":
        return dict(input_ids=ids[:, a:b])
    return dict(input_ids=ids[:, a:b], position_ids=torch.arange(a, b)[None])


@functools.cache
def single_run(name, dtype, docs=False):
    """transformers' model in one process, SDPA attention, training mode; in float64 its chunk scan is the float64
    one. docs: each packed document through the model on its own, the logits concatenated."""
    model = build(name, dtype)
    modeling = _modeling(name)
    kernel = modeling.mamba2_chunk_scan
    ids = global_ids()
    labels = ids.clone()
    if docs:  # no target across a document boundary
        labels[:, DOCS[1:-1]] = -100
    try:
        if dtype == torch.float64:
            modeling.mamba2_chunk_scan = float64_ssd
        cuts = DOCS if docs else [0, SEQ]
        with keep(dtype):
            # each document at its global positions, as on the ring (RoPE's float32 tables differ between positions)
            pieces = [logits_of(model, **_piece(name, ids, a, b)) for a, b in zip(cuts, cuts[1:])]
            logits = torch.cat(pieces, dim=1)
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
            )
            loss.backward()
    finally:
        modeling.mamba2_chunk_scan = kernel
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return dict(logits=logits.detach(), loss=loss.detach(), grads=grads)


# from_config tiles each layer's feed-forward by default (a hybrid's mixer-only blocks have none to tile; Nemotron-H's
# MLP and MoE blocks are its `mixer`); a case's ffn_tile: several tiles a shard (float32: the float64 harness's
# KeepFloat64 mode is not active when backward recomputes a tile)


def ring_run(case):
    rw.use_ring(layout=case["layout"])
    torch.manual_seed(0)
    dtype = getattr(torch, case["dtype"])
    model = rw.from_config(make_config(case["name"]), ffn_tile=case.get("ffn_tile"), **EAGER_EXPERTS)
    model = model.to(dtype).train()
    ids = global_ids()
    docs = DOCS if case.get("docs") else None
    batch = rw.shard_batch(ids, cu_seqlens=docs)
    labels = batch.pop("labels")  # shifted on the global sequence (no target across a document boundary)
    targets = SEQ - 1 - (len(DOCS) - 2 if docs else 0)
    with keep(dtype):
        logits = logits_of(model, **batch)
        # this rank's share of the mean next-token loss, in the logits' dtype
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


SHAPES = {name: [(2, "zigzag"), (3, "contiguous")] for name in FAMILIES}
SHAPES["bamba"] = [(2, "zigzag"), (3, "zigzag"), (3, "contiguous")]
GRID = (
    [
        dict(name=name, world=W, layout=layout, dtype=dtype)
        for name in FAMILIES
        for (W, layout), dtype in itertools.product(SHAPES[name], ["float64", "float32"])
    ]
    + [
        dict(name=name, world=W, layout=layout, dtype="float64", docs=True)
        for name, (W, layout) in [
            ("mamba2", (3, "zigzag")),
            ("bamba", (3, "zigzag")),
            ("zamba2", (2, "zigzag")),
            ("nemotron_h", (3, "contiguous")),
            ("granitemoehybrid", (2, "zigzag")),
            ("falcon_h1", (3, "contiguous")),
        ]
    ]
    + [dict(name="nemotron_h", world=2, layout="zigzag", dtype="float32", ffn_tile=8)]
)


def _case_id(c):
    return (
        f"{c['name']}-W{c['world']}-{c['layout']}-{c['dtype']}"
        + ("-docs" if c.get("docs") else "")
        + (f"-tile{c['ffn_tile']}" if c.get("ffn_tile") else "")
    )


@pytest.mark.parametrize("case", GRID, ids=_case_id)
def test_ssd_model_is_exact_on_the_ring(grid_results, case):
    results = grid_results(ring_run, GRID, case)
    ref = single_run(case["name"], torch.float64, bool(case.get("docs")))
    logits = assemble([r["logits"] for r in results], case["layout"], 1)
    assert results[0]["grads"].keys() == ref["grads"].keys()
    assert any(n.endswith("A_log") for n in ref["grads"]) and any("conv1d" in n for n in ref["grads"])
    if case["dtype"] == "float64":
        assert max_err(logits, ref["logits"]) < 1e-10
        assert abs(results[0]["loss"].item() - ref["loss"].item()) < 1e-12
        for n, g in results[0]["grads"].items():
            assert max_err(g, ref["grads"][n]) < 1e-10 * max(1e-3, ref["grads"][n].abs().max().item()), n
        return
    f32 = single_run(case["name"], torch.float32)
    err32 = max_err(f32["logits"], ref["logits"])
    assert_within_budget("logits", max_err(logits, ref["logits"]), err32, 1e-6, ceiling=CEILINGS["float32"])
    for n, g in results[0]["grads"].items():
        own = max_err(f32["grads"][n], ref["grads"][n])
        assert_within_budget(n, max_err(g, ref["grads"][n]), own, 1e-7, ceiling=CEILINGS["float32"])


def refused_run(how, name):
    rw.use_ring(layout="striped" if how == "striped" else "zigzag")
    model = rw.from_config(make_config(name), **EAGER_EXPERTS)
    batch = rw.shard_batch(global_ids())
    batch.pop("labels")
    if how == "padding":  # rank 1 alone pads (its first local token): every rank refuses
        mask = torch.ones_like(batch["input_ids"])
        mask[:, 0] = int(dist.get_rank() != 1)
        batch["attention_mask"] = mask
    if how == "generate":
        try:
            rw.generate(model, global_ids(), max_new_tokens=2)
        except ValueError as e:
            return str(e)
        return None
    if how == "flash":  # DataCollatorWithFlattening's arguments: the mixers would ignore them
        batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = torch.tensor([0, 10, SEQ // 2], dtype=torch.int32)
    try:
        model(**batch, use_cache=how == "cache")
    except ValueError as e:
        return str(e)
    return None


REFUSALS = dict(
    striped="striped layout",
    cache="use_cache=False",
    padding="padding mask",
    flash="flash-attention packing",
    generate="shared by several layers",
)


@pytest.mark.parametrize(
    "how, name",
    [(how, "mamba2") for how in REFUSALS if how != "generate"]
    + [("cache", "zamba2"), ("padding", "granitemoehybrid"), ("generate", "zamba2")],
)
def test_refused_alike_with_the_reason(cluster, how, name):
    messages = cluster(2).run(refused_run, how, name)
    assert messages[0] is not None and all(m == messages[0] for m in messages), messages
    assert REFUSALS[how] in messages[0], messages[0]


# ---------------------------------------------------------------- generation from the ring's prefill states


def _generate(name, generate):
    """generate(...) greedy in float64 (the float64 scan in the prefill, casts kept float64): (tokens, scores)."""
    modeling = _modeling(name)
    with swapped(modeling, dict(mamba2_chunk_scan=float64_ssd)), KeepFloat64():
        return greedy(generate)


def ring_generate(case):
    rw.use_ring(layout=case["layout"])
    torch.manual_seed(0)
    model = rw.from_config(make_config(case["name"]), **EAGER_EXPERTS).double().eval()
    ids = generation_prompt(case["prompt"])
    return _generate(case["name"], lambda **kw: rw.generate(model, ids, **kw))


GENERATE_GRID = [
    dict(name="mamba2", world=2, layout="zigzag", prompt=30),  # 28 tokens through the ring, 2 in step one
    dict(name="bamba", world=3, layout="contiguous", prompt=20),
    dict(name="nemotron_h", world=2, layout="zigzag", prompt=26),
    dict(name="granitemoehybrid", world=2, layout="contiguous", prompt=21),
    dict(name="falcon_h1", world=3, layout="zigzag", prompt=25),  # attention and a mixer in every layer
]


@pytest.mark.parametrize("case", GENERATE_GRID, ids=lambda c: f"{c['name']}-W{c['world']}-{c['layout']}-S{c['prompt']}")
def test_generate_continues_from_the_rings_states(grid_results, case):
    """rw.generate on a Mamba2 (SSD) model: the ring's prefill leaves each convolution's last inputs and each scan's
    final state (composed across ranks) in the cache, the decode steps run transformers' own on them alike on
    every rank: the tokens equal model.generate in one process, every step's logits within float64 round-off."""
    results = grid_results(ring_generate, GENERATE_GRID, case)
    model = build(case["name"], torch.float64).eval()
    ids = generation_prompt(case["prompt"])
    assert_same_generation(results, *_generate(case["name"], lambda **kw: model.generate(ids, **kw)))


# ---------------------------------------------------------------- the scan alone at a real model's shapes


def _real_shape_inputs(dtype):
    """Mamba2-2.7B's head shapes (head_dim 64, state 128, one group) with an odd head count (5): x, dt, B, C, the
    output gradient, and A, D, dt_bias."""
    g = torch.Generator().manual_seed(11)
    L, H, P, N = 48, 5, 64, 128
    x, dout = (torch.randn(1, L, H, P, generator=g, dtype=torch.float64) for _ in range(2))
    dt = torch.randn(1, L, H, generator=g, dtype=torch.float64)
    B, C = (torch.randn(1, L, 1, N, generator=g, dtype=torch.float64) / N**0.5 for _ in range(2))
    A = -torch.rand(H, generator=g, dtype=torch.float64) - 0.5
    D, bias = torch.randn(H, generator=g, dtype=torch.float64), torch.randn(H, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (x, dt, B, C, dout)], (A.to(dtype), D.to(dtype), bias.to(dtype))


def _scan(kernel, x, dt, B, C, A, D, bias, initial_state=None):
    return kernel(
        x,
        dt,
        A,
        B,
        C,
        chunk_size=8,
        D=D,
        dt_bias=bias,
        dt_softplus=True,
        initial_states=initial_state,
        return_final_states=True,
    )


def _real_shape_ring():
    """On each rank: transformers' float32 chunk scan sharded (W=3 zigzag): its outputs and input gradient."""
    from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

    from ringwise import shard
    from ringwise.attention.halo import sharded_decay_scan

    (x, dt, B, C, dout), (A, D, bias) = _real_shape_inputs(torch.float32)
    x, dt, B, C, dout = (shard(t, 1, "zigzag") for t in (x, dt, B, C, dout))
    x.requires_grad_()

    def local(x, initial_state, dt, B, C):
        return _scan(mamba2_chunk_scan, x, dt, B, C, A, D, bias, initial_state)

    out, _ = sharded_decay_scan(local, x, dict(dt=dt, B=B, C=C), "zigzag")
    out.backward(dout)
    return out.detach(), x.grad


def test_sharded_chunk_scan_at_real_shapes(cluster):
    """transformers' Mamba2 chunk scan carried across 3 ranks (zigzag) at head_dim 64, state 128, 5 heads: outputs
    and the input's gradient within 2x the one-process float32 scan's error against hf_ssd's float64 scan."""
    from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

    results = cluster(3).run(_real_shape_ring)
    got, got_dx = (assemble([r[j] for r in results], "zigzag", 1) for j in range(2))

    def one_process(kernel, dtype):
        (x, dt, B, C, dout), (A, D, bias) = _real_shape_inputs(dtype)
        x.requires_grad_()
        out, _ = _scan(kernel, x, dt, B, C, A, D, bias)
        return out.detach().double(), torch.autograd.grad(out, x, dout)[0].double()

    want, want_dx = one_process(float64_ssd, torch.float64)
    own, own_dx = one_process(mamba2_chunk_scan, torch.float32)
    assert_within_budget("out", max_err(got, want), max_err(own, want), 1e-6, ceiling=CEILINGS["float32"])
    assert_within_budget("dx", max_err(got_dx, want_dx), max_err(own_dx, want_dx), 1e-6, ceiling=CEILINGS["float32"])
