"""MiniMax's lightning attention through the ring (ringwise.integrations.hf_lightning): linear attention with a
constant decay per head, its (head_dim x head_dim) state carried across ranks by halo.sharded_decay_scan around
transformers' block algorithm, next to MiniMax's full-attention layers on ringwise and its MoE feed-forward.

The oracle is transformers' own model in one process (SDPA attention), its lightning layers computed inline by
transformers. transformers computes the decay buffers in float32 at init; the float64 runs (ring and one process)
recompute them in float64 from the same slopes (hf_lightning.float64_decays), since blocks that start at other tokens
(one process's against a ring's) compose float32-rounded decays differently. The kernel is first held to transformers'
layer alone: from a zero state across stretches, and from a cache's state through its decode branch. The ring runs
in float64 (to round-off) and float32 (within 2x the one-process float32 error), W = 2 zigzag, 3 contiguous and
zigzag: loss, logits and every parameter gradient; packed documents (the state reset at each document's start) against
each document run alone; the striped layout, a cache and rw.generate refused alike on every rank."""

import functools

import pytest
import torch
import torch.distributed as dist

transformers = pytest.importorskip("transformers")

from helpers import CEILINGS, assemble, assert_within_budget, max_err  # noqa: E402
from hf_versions import EAGER_EXPERTS, config_class  # noqa: E402

import ringwise.integrations.transformers as rw  # noqa: E402
from ringwise.integrations.hf_lightning import float64_decays, lightning_kernel  # noqa: E402

SEQ = 48
FAMILIES = ("minimax",)


def make_config(name="minimax", window=None):
    """Lightning layers first and last around one full-attention layer (GQA 3:1, odd head counts; `window`: its
    sliding_window), blocks of 5 tokens (so blocks straddle every shard boundary), 4 experts with 2 per token."""
    assert name == "minimax", name
    return config_class("MiniMaxConfig")(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=8,
        layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention"],
        block_size=5,
        sliding_window=window,
        num_local_experts=4,
        num_experts_per_tok=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def _layer(layer_idx=1):
    """One float64 lightning layer of the tiny config, weights large enough that its state matters."""
    from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention

    torch.manual_seed(0)
    layer = MiniMaxLightningAttention(make_config(), layer_idx).double()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    float64_decays(layer)
    return layer


def _inside(layer, x, **kwargs):
    """transformers' layer on x: the attention before its norm (what the kernel computes) and its final state."""
    seen = []
    hook = layer.norm.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    try:
        _, state = layer(x, None, None, **kwargs)
    finally:
        hook.remove()
    return seen[0], state


def _qkv(layer, x):
    B, L, _ = x.shape
    qkv = layer.act_fn(layer.qkv_proj(x)).reshape(B, L, layer.num_attention_heads, -1)
    return qkv.split(layer.head_dim, dim=3)


def test_kernel_is_transformers_layer():
    """lightning_kernel from a zero state over two stretches (the state handed from one to the next, blocks cut at
    the stretch boundary) equals transformers' block algorithm on the whole; from a cache's non-zero state it equals
    transformers' decode branch token by token. float64, to round-off; outputs and final states."""
    from transformers.models.minimax.modeling_minimax import MiniMaxCache

    layer = _layer()
    x = torch.randn(2, 23, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    q, k, v = _qkv(layer, x)
    kernel = lightning_kernel(layer)
    want, want_state = _inside(layer, x)
    first, mid = kernel(v[:, :9], None, q=q[:, :9], k=k[:, :9])
    second, state = kernel(v[:, 9:], mid, q=q[:, 9:], k=k[:, 9:])
    got = torch.cat([first, second], dim=1).flatten(2)
    assert max_err(got, want) < 1e-12 * want.abs().max() and max_err(state, want_state) < 1e-12 * state.abs().max()

    entry = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    cache = MiniMaxCache()
    cache.set_linear_cache(layer.layer_idx, entry.clone())
    want, want_state = _inside(layer, x, cache=cache)  # transformers' decode branch: the cache holds a state
    got, state = kernel(v, entry, q=q, k=k)
    assert max_err(got.flatten(2), want) < 1e-12 * want.abs().max()
    assert max_err(state, want_state) < 1e-12 * state.abs().max()


def global_ids():
    return torch.randint(3, 64, (1, SEQ), generator=torch.Generator().manual_seed(1))


def build(dtype, window=None, ring=False):
    """The tiny model in `dtype` (float64: decays recomputed in float64), by ringwise or by transformers."""
    torch.manual_seed(0)
    config = make_config(window=window)
    if ring:
        model = rw.from_config(config, **EAGER_EXPERTS)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", **EAGER_EXPERTS)
    model = model.to(dtype)
    if dtype == torch.float64:
        float64_decays(model)
    return model


@functools.cache
def single_run(dtype, docs=None, window=None):
    """transformers' model in one process; docs (packed documents' global boundaries): each document on its own at its
    global positions (rw.shard_batch's: RoPE is relative, but transformers computes its angles in float32, so restarted
    positions would differ by float32 round-off), the logits concatenated, a document's last token predicting
    nothing."""
    model = build(dtype, window)
    ids = global_ids()
    bounds = docs or (0, SEQ)
    logits = torch.cat(
        [
            model(input_ids=ids[:, a:e], position_ids=torch.arange(a, e)[None], use_cache=False).logits
            for a, e in zip(bounds, bounds[1:])
        ],
        dim=1,
    )
    targets = ids[:, 1:].clone()
    for end in bounds[1:-1]:
        targets[:, end - 1] = -100
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return dict(logits=logits.detach(), loss=loss.detach(), grads=grads)


def ring_run(case):
    rw.use_ring(layout=case["layout"])
    model = build(getattr(torch, case["dtype"]), case.get("window"), ring=True)
    batch = rw.shard_batch(global_ids(), cu_seqlens=case.get("docs"))
    labels = batch.pop("labels")  # shifted on the global sequence (a document's last token: -100)
    targets = torch.tensor(int((labels != -100).sum()))
    dist.all_reduce(targets)
    logits = model(**batch, use_cache=False).logits
    # this rank's share of the mean next-token loss, in the logits' dtype
    loss = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
    ) / targets.to(logits.dtype)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for g in grads.values():
        dist.all_reduce(g)
    share = loss.detach().clone()
    dist.all_reduce(share)
    return dict(logits=logits.detach(), grads=grads, loss=share)


DOCS = (0, 7, 20, 21, SEQ)  # packed documents: a one-token one, boundaries inside shards and at none
GRID = [
    dict(name="minimax", world=W, layout=layout, dtype=dtype)
    for W, layout in [(2, "zigzag"), (3, "contiguous"), (3, "zigzag")]
    for dtype in ("float64", "float32")
] + [
    dict(name="minimax", world=3, layout="zigzag", dtype="float64", docs=DOCS),
    dict(name="minimax", world=2, layout="contiguous", dtype="float32", docs=DOCS),
    # the full-attention layer with a sliding window shorter than the sequence (MiniMax's config allows one)
    dict(name="minimax", world=3, layout="zigzag", dtype="float64", window=12),
    dict(name="minimax", world=2, layout="zigzag", dtype="float32", window=12),
]


@pytest.mark.parametrize(
    "case",
    GRID,
    ids=lambda c: (
        f"W{c['world']}-{c['layout']}-{c['dtype']}"
        + ("-docs" if "docs" in c else "")
        + (f"-window{c['window']}" if "window" in c else "")
    ),
)
def test_minimax_is_exact_on_the_ring(grid_results, case):
    """Logits, loss and every parameter gradient on the ring equal transformers' own model in one process (packed
    documents: each document on its own), float64 to round-off, float32 within 2x the one-process float32 error."""
    results = grid_results(ring_run, GRID, case)
    ref = single_run(torch.float64, case.get("docs"), case.get("window"))
    logits = assemble([r["logits"] for r in results], case["layout"], 1)
    assert results[0]["grads"].keys() == ref["grads"].keys()
    assert any("qkv_proj" in n for n in ref["grads"])
    if case["dtype"] == "float64":
        assert max_err(logits, ref["logits"]) < 1e-10
        assert abs(results[0]["loss"].item() - ref["loss"].item()) < 1e-12
        for n, g in results[0]["grads"].items():
            # the norms and the router's softmax compute in float32 per token, but every weight's gradient is a
            # float64 sum over tokens of per-token terms the two runs round alike: float64 round-off for all
            assert max_err(g, ref["grads"][n]) < 1e-10 * max(1e-3, ref["grads"][n].abs().max().item()), n
        return
    f32 = single_run(torch.float32, case.get("docs"), case.get("window"))
    err32 = max_err(f32["logits"], ref["logits"])
    assert_within_budget("logits", max_err(logits, ref["logits"]), err32, 1e-6, ceiling=CEILINGS["float32"])
    for n, g in results[0]["grads"].items():
        own = max_err(f32["grads"][n], ref["grads"][n])
        assert_within_budget(n, max_err(g, ref["grads"][n]), own, 1e-7, ceiling=CEILINGS["float32"])


def refused_run(how):
    rw.use_ring(layout="striped" if how == "striped" else "zigzag")
    model = rw.from_config(make_config(), **EAGER_EXPERTS)
    ids = global_ids()
    try:
        if how == "generate":
            rw.generate(model, ids, max_new_tokens=2)
            return None
        batch = rw.shard_batch(ids)
        batch.pop("labels")
        model(**batch, use_cache=how == "cache")
    except ValueError as e:
        return str(e)
    return None


REFUSALS = dict(striped="striped layout", cache="use_cache=False", generate="MiniMaxLightningAttention")


@pytest.mark.parametrize("how", REFUSALS)
def test_refused_alike_with_the_reason(cluster, how):
    messages = cluster(2).run(refused_run, how)
    assert messages[0] is not None and all(m == messages[0] for m in messages), messages
    assert REFUSALS[how] in messages[0], messages[0]
