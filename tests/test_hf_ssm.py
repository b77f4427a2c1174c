"""Mamba (Mamba1) and RG-LRU layers through the ring (ringwise.integrations.hf_ssm): Jamba (Mamba mixers, attention
and MoE layers), Zamba (Mamba mixers with two Mamba heads, a shared attention block in its hybrid layers),
RecurrentGemma (RG-LRU recurrent blocks around local sliding-window attention), Mamba and Falcon-Mamba (mixers only,
no attention): the short convolution gets each shard's predecessors, the scan's state is carried across ranks.

The oracle is transformers' own model in one process (SDPA attention where it has some) in float64, with its scans
(which accumulate in float32 whatever the model's dtype) in float64: hf_ssm.float64_selective_scan for Mamba's,
RG-LRU's own with acc_dtype=float64; the float64 scan is held to transformers' on its own first. The ring runs in
float64 (to round-off) and in float32 (within 2x the float32 one-process error), W = 2 zigzag and W = 3 contiguous;
loss, logits and every parameter gradient. Packed documents (the convolution and the state reset at each document's
start) against each document run alone; Mamba's and Falcon-Mamba's mixers alone in training mode with a fused kernel
present; Jamba and RecurrentGemma also with their feed-forward in 8-token tiles (from_config tiles by default); the
striped layout, a cache, a padding mask and rw.generate refused alike on every rank."""

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
from ringwise.integrations.hf_ssm import SSM_LAYERS, float64_selective_scan  # noqa: E402

SEQ = 48
DOCS = (0, 13, 31, SEQ)  # packed documents' global boundaries: starts inside shards on either layout


def make_config(name="jamba"):
    """Tiny configs of each family's real classes."""
    if name == "jamba":  # mamba, attention, mamba, attention; MoE in layers 1 and 3; GQA 3:1
        return config_class("JambaConfig")(
            vocab_size=64,
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=3,
            num_key_value_heads=1,
            attn_layer_period=2,
            attn_layer_offset=1,
            expert_layer_period=2,
            expert_layer_offset=1,
            num_experts=4,
            num_experts_per_tok=2,
            mamba_d_state=8,
            mamba_d_conv=4,
            mamba_expand=2,
            mamba_dt_rank=4,
            use_mamba_kernels=True,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    if (
        name == "zamba"
    ):  # mamba, mamba, hybrid, hybrid (the shared attention block, then a mixer); 2 Mamba heads, 3 heads
        return config_class("ZambaConfig")(
            vocab_size=64,
            hidden_size=24,
            intermediate_size=48,
            num_hidden_layers=4,
            num_attention_heads=3,
            num_key_value_heads=3,
            attention_head_dim=16,
            n_mamba_heads=2,
            attn_layer_period=2,
            attn_layer_offset=0,
            mamba_d_state=8,
            mamba_d_conv=4,
            mamba_expand=2,
            mamba_dt_rank=4,
            use_associative_scan=False,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    if name in ("mamba", "falcon_mamba"):  # every layer a mixer (Falcon-Mamba: RMS norms on dt, B and C); no attention
        return config_class("MambaConfig" if name == "mamba" else "FalconMambaConfig")(
            vocab_size=64, hidden_size=32, state_size=8, num_hidden_layers=3, conv_kernel=4, time_step_rank=4
        )
    assert name == "recurrent_gemma", name
    # recurrent, recurrent, local attention (window 8: across shard boundaries); 3 heads, one KV head
    return config_class("RecurrentGemmaConfig")(
        vocab_size=64,
        hidden_size=48,
        lru_width=48,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=3,
        num_key_value_heads=1,
        attention_window_size=8,
        conv1d_width=4,
        logits_soft_cap=30.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


FAMILIES = ("jamba", "zamba", "recurrent_gemma", "mamba", "falcon_mamba")
ATTENTION_FREE = ("mamba", "falcon_mamba")  # no attention layer: no attn_implementation to choose


def _modeling(name):
    return importlib.import_module(SSM_LAYERS[name].module)


@contextlib.contextmanager
def float64_scans(name, dtype):
    """A float64 model's one-process scans in float64: Mamba's mamba_selective_scan -> float64_selective_scan, the
    RG-LRU's _rnn_scan with acc_dtype=float64 (transformers' own, float32 by default)."""
    if dtype != torch.float64:
        yield
        return
    modeling = _modeling(name)
    if name == "recurrent_gemma":
        owner, attr = modeling.RecurrentGemmaRglru, "_rnn_scan"
        scan = owner._rnn_scan

        def replacement(self, *args, **kwargs):
            return scan(self, *args, **kwargs, acc_dtype=torch.float64)
    else:
        owner, attr, replacement = modeling, "mamba_selective_scan", float64_selective_scan
    saved = getattr(owner, attr)
    setattr(owner, attr, replacement)
    try:
        yield
    finally:
        setattr(owner, attr, saved)


def global_ids():
    return torch.randint(3, 64, (1, SEQ), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", ["jamba", "mamba"])
def test_float64_scan_is_transformers_scan(name):
    """hf_ssm's float64 selective scan is transformers' mamba_selective_scan (float32 inside): outputs and final
    states agree within float32 round-off, delta bias, softplus, D and the gate included."""
    g = torch.Generator().manual_seed(3)
    B, channels, N, L = 2, 6, 4, 37
    u, dt, z = (torch.randn(B, channels, L, generator=g) for _ in range(3))
    A = -torch.rand(channels, N, generator=g) - 0.5
    Bm, C = (torch.randn(B, N, L, generator=g) for _ in range(2))
    D, bias = torch.randn(channels, generator=g), torch.randn(channels, generator=g)
    modeling = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
    options = dict(D=D, z=z, delta_bias=bias, delta_softplus=True, return_last_state=True)
    want, want_state = modeling.mamba_selective_scan(u, dt, A, Bm, C, use_associative_scan=False, **options)
    double = {k: v.double() if torch.is_tensor(v) else v for k, v in options.items()}
    got, got_state = float64_selective_scan(u.double(), dt.double(), A, Bm.double(), C.double(), **double)
    assert got.dtype == torch.float64
    assert max_err(got, want) < 1e-5 and max_err(got_state, want_state) < 1e-5


def causal_lm_loss(logits, labels, targets, dtype):
    """The mean next-token loss's share of these logits (labels already shifted), in the model's dtype (Mamba's and
    Falcon-Mamba's causal LMs return float32 logits whatever it is)."""
    logits = logits.to(dtype)
    return (
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        / targets
    )


def document_logits(model, name, ids, start, end):
    """The logits of one document alone, at its global positions (as on the ring: transformers' RoPE angles are
    float32, so positions shifted by the start would round differently); RecurrentGemma's RG-LRU counting them from
    the document's start (it resets, and skips its input normalisation, at position 0: a document alone)."""
    positions = torch.arange(start, end)[None]
    if name != "recurrent_gemma":
        return model(input_ids=ids[:, start:end], position_ids=positions, use_cache=False).logits
    lru = _modeling(name).RecurrentGemmaRglru
    forward = lru.forward
    lru.forward = lambda self, x, position_ids: forward(self, x, position_ids - start)
    try:
        return model(input_ids=ids[:, start:end], position_ids=positions, use_cache=False).logits
    finally:
        lru.forward = forward


@functools.cache
def single_run(name, dtype, docs=None):
    """transformers' model in one process, SDPA attention; in float64 its scans in float64. docs: each document run
    on its own, the logits concatenated."""
    torch.manual_seed(0)
    attention = {} if name in ATTENTION_FREE else dict(attn_implementation="sdpa")
    model = transformers.AutoModelForCausalLM.from_config(make_config(name), **attention, **EAGER_EXPERTS).to(dtype)
    ids = global_ids()
    bounds = docs or (0, SEQ)
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    labels[:, [b - 1 for b in bounds[1:]]] = -100
    targets = int((labels != -100).sum())
    with float64_scans(name, dtype):
        logits = torch.cat([document_logits(model, name, ids, a, b) for a, b in zip(bounds, bounds[1:])], dim=1)
        loss = causal_lm_loss(logits, labels, targets, dtype)
        loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return dict(logits=logits.detach(), loss=loss.detach(), grads=grads)


def ring_run(case):
    rw.use_ring(layout=case["layout"])
    torch.manual_seed(0)
    dtype = getattr(torch, case["dtype"])
    model = rw.from_config(make_config(case["name"]), ffn_tile=case.get("ffn_tile"), **EAGER_EXPERTS).to(dtype)
    docs = list(DOCS) if case.get("docs") else None
    batch = rw.shard_batch(global_ids(), cu_seqlens=docs)
    labels = batch.pop("labels")  # shifted on the global sequence, -100 at each document's end
    targets = SEQ - (len(docs) - 1 if docs else 1)
    with float64_scans(case["name"], dtype):
        logits = model(**batch, use_cache=False).logits
        loss = causal_lm_loss(logits, labels, targets, dtype)
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for g in grads.values():
        dist.all_reduce(g)
    share = loss.detach().clone()
    dist.all_reduce(share)
    return dict(logits=logits.detach(), grads=grads, loss=share)


SHAPES = [(2, "zigzag"), (3, "contiguous")]
GRID = [
    dict(name=name, world=W, layout=layout, dtype=dtype)
    for name in FAMILIES
    for (W, layout), dtype in itertools.product(SHAPES, ["float64", "float32"])
] + [dict(name=name, world=W, layout=layout, dtype="float64", docs=True) for name in FAMILIES for W, layout in SHAPES]
# rw.from_config tiles the feed-forward (and the per-token norms) by default; in 8-token tiles, several a shard (Jamba's
# MoE, RecurrentGemma's mlp_block)
GRID += [
    dict(name=name, world=2, layout="zigzag", dtype="float64", ffn_tile=8) for name in ("jamba", "recurrent_gemma")
]


def upcast(name):
    """Parameters transformers upcasts to float32 inside the layer, whose gradients are float32 sums over each rank's
    tokens: the scans' A_log, D and dt bias (A = -exp(A_log.float()), D.float(), dt_proj.bias.float()) and
    RecurrentGemma's norm weights (*_norm: its RMS norm scales by 1 + weight.float()); every other gradient to 1e-10."""
    last = name.rsplit(".", 1)[-1]
    return last in ("A_log", "D", "dt_proj_bias") or name.endswith("dt_proj.bias") or name.endswith("_norm.weight")


def _case_id(c):
    extra = ("-documents" if c.get("docs") else "") + (f"-tile{c['ffn_tile']}" if c.get("ffn_tile") else "")
    return f"{c['name']}-W{c['world']}-{c['layout']}-{c['dtype']}" + extra


@pytest.mark.parametrize("case", GRID, ids=_case_id)
def test_model_is_exact_on_the_ring(grid_results, case):
    results = grid_results(ring_run, GRID, case)
    docs = DOCS if case.get("docs") else None
    ref = single_run(case["name"], torch.float64, docs)
    logits = assemble([r["logits"] for r in results], case["layout"], 1)
    assert results[0]["grads"].keys() == ref["grads"].keys()
    if case["dtype"] == "float64":
        assert max_err(logits, ref["logits"]) < 1e-10
        assert abs(results[0]["loss"].item() - ref["loss"].item()) < 1e-12
        for n, g in results[0]["grads"].items():
            rel = EPS["float32"] if upcast(n) else 1e-10
            assert max_err(g, ref["grads"][n]) < rel * max(1e-3, ref["grads"][n].abs().max().item()), n
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
    ids = global_ids()
    try:
        if how == "generate":
            rw.generate(model, ids, max_new_tokens=2)
            return None
        batch = rw.shard_batch(ids)
        batch.pop("labels")
        if how == "padding":
            batch["attention_mask"] = torch.ones_like(batch["input_ids"])
            batch["attention_mask"][:, :2] = 0
        model(**batch, use_cache=how == "cache")
    except ValueError as e:
        return str(e)
    return None


REFUSALS = dict(striped="striped layout", cache="use_cache=False", generate="rw.generate's cache", padding="padding")


@pytest.mark.parametrize(
    "how, name",
    [(how, "jamba") for how in REFUSALS if how != "generate"]
    + [(how, "recurrent_gemma") for how in ("striped", "cache", "generate")]
    + [("generate", "zamba")],
)
def test_refused_alike_with_the_reason(cluster, how, name):
    messages = cluster(2).run(refused_run, how, name)
    assert messages[0] is not None and all(m == messages[0] for m in messages), messages
    assert REFUSALS[how] in messages[0], messages[0]


def mixer_run(case):
    """A Mamba / Falcon-Mamba mixer alone, installed by hf_mixers as check_model would, in training mode (Mamba's
    fused-kernel branch, with a fused kernel present): this rank's outputs and the summed parameter gradients of
    sum(out * weights)."""
    from ringwise.integrations import hf_mixers
    from ringwise.integrations.hf_hybrids import SHARDED_LAYERS

    rw.use_ring(layout=case["layout"])
    mixer, x, weights = mixer_inputs(case["name"])
    if case["name"] == "mamba":  # a fused kernel as mamba_ssm's on a GPU (training, no cache): never run on a ring
        _modeling("mamba").mamba_inner_fn = fused_stand_in
    hf_mixers.install(mixer, lambda: rw.shard_of(mixer.config), SHARDED_LAYERS)
    seq = rw.shard_of(mixer.config)
    out = mixer(seq.shard(x))
    (out * seq.shard(weights)).sum().backward()
    grads = {n: p.grad.clone() for n, p in mixer.named_parameters()}
    for g in grads.values():
        dist.all_reduce(g)
    return dict(out=out.detach(), grads=grads)


def fused_stand_in(xz, *args, **kwargs):
    """What Mamba's mixer would return from mamba_ssm's fused mamba_inner_fn, had it run on the shard: NaNs here."""
    return torch.full_like(xz[:, :32].transpose(1, 2), float("nan"))


def mixer_inputs(name):
    torch.manual_seed(0)
    mixer = transformers.AutoModelForCausalLM.from_config(make_config(name)).backbone.layers[0].mixer
    mixer = mixer.double().train()
    g = torch.Generator().manual_seed(5)
    x, weights = (torch.randn(1, SEQ, 32, generator=g, dtype=torch.float64) for _ in range(2))
    return mixer, x, weights


MIXER_GRID = [dict(name=n, world=W, layout=layout) for n in ("mamba", "falcon_mamba") for W, layout in SHAPES]


@pytest.mark.parametrize("case", MIXER_GRID, ids=lambda c: f"{c['name']}-W{c['world']}-{c['layout']}")
def test_mixer_alone_is_exact_on_the_ring(grid_results, case):
    """Mamba's and Falcon-Mamba's mixers (Falcon-Mamba: RMS norms on dt, B and C) on the ring against transformers'
    mixer in one process (float64 scan), outputs and every parameter gradient."""
    results = grid_results(mixer_run, MIXER_GRID, case)
    mixer, x, weights = mixer_inputs(case["name"])
    with float64_scans(case["name"], torch.float64):
        want = mixer(x)
    (want * weights).sum().backward()
    assert max_err(assemble([r["out"] for r in results], case["layout"], 1), want) < 1e-10
    for n, p in mixer.named_parameters():
        rel = EPS["float32"] if upcast(n) else 1e-10
        assert max_err(results[0]["grads"][n], p.grad) < rel * max(1e-3, p.grad.abs().max().item()), n


# ---------------------------------------------------------------- generation from the ring's prefill states


def _generate(name, generate):
    """generate(...) greedy in float64 (the one-process scan float64 too): (tokens, scores)."""
    with float64_scans(name, torch.float64):
        return greedy(generate)


def ring_generate(case):
    rw.use_ring(layout=case["layout"])
    torch.manual_seed(0)
    model = rw.from_config(make_config(case["name"]), **EAGER_EXPERTS).double().eval()
    ids = generation_prompt(case["prompt"])
    return _generate(case["name"], lambda **kw: rw.generate(model, ids, **kw))


GENERATE_GRID = [
    dict(name="jamba", world=2, layout="zigzag", prompt=30),  # 28 tokens through the ring, 2 in step one
    dict(name="mamba", world=3, layout="contiguous", prompt=20),
    dict(name="falcon_mamba", world=2, layout="zigzag", prompt=26),
]


@pytest.mark.parametrize("case", GENERATE_GRID, ids=lambda c: f"{c['name']}-W{c['world']}-{c['layout']}-S{c['prompt']}")
def test_generate_continues_from_the_rings_states(grid_results, case):
    """rw.generate on a Mamba (Mamba1) model: the ring's prefill leaves each convolution's last inputs and each
    selective scan's final state (composed across ranks) in the cache, the decode steps run transformers' own on
    them alike on every rank: the tokens equal model.generate in one process, every step's logits within float64
    round-off (Mamba's and Falcon-Mamba's float32 logits: float32 round-off)."""
    results = grid_results(ring_generate, GENERATE_GRID, case)
    torch.manual_seed(0)
    attention = {} if case["name"] in ATTENTION_FREE else dict(attn_implementation="sdpa")
    model = transformers.AutoModelForCausalLM.from_config(make_config(case["name"]), **attention, **EAGER_EXPERTS)
    model = model.double().eval()
    ids = generation_prompt(case["prompt"])
    assert_same_generation(results, *_generate(case["name"], lambda **kw: model.generate(ids, **kw)))
