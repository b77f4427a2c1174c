"""Sequence-tiled feed-forward for transformers models (ringwise/integrations/hf_tiling.py).

No (tokens x intermediate) tensor exists whole in a tiled forward and backward (an op-level dispatch
mode records every tensor, gradients included; the untiled run shows the whole one, so the check can
fail), also inside transformers' own gradient checkpointing; nor, in bfloat16, the norms' float32
(tokens x hidden) upcast. MoE families through the ring at W = 1, 2, 3
with tiles shorter than the local shard: logits, router logits (output_router_logits, reassembled in
global order), the auxiliary loss transformers computes from them, and every parameter gradient of the
loss plus a term linear in the router logits (so gradients flow through the router logits the tiles
recorded) equal the untiled one-process model (float64 oracle, budget 2x the float32 model's own error).
Refusals: a layer without a feed-forward module (OPT), a value the tiles cannot be put back together from.
The dense and MoE families tiled at W = 2 and 3: test_hf_families.py, test_hf_architectures.py."""

import importlib

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

transformers = pytest.importorskip("transformers")

from helpers import CEILINGS, assert_within_budget, max_err  # noqa: E402
from hf_models import REFERENCE_ATTN  # noqa: E402
from hf_models import make_config as model_config  # noqa: E402
from hf_versions import EAGER_EXPERTS, REFUSED_HERE, config_class  # noqa: E402
from test_hf_families import FAMILIES  # noqa: E402
from test_hf_families import make_config as family_config  # noqa: E402

import ringwise.integrations.transformers as rw  # noqa: E402
from ringwise.attention.layout import global_indices  # noqa: E402
from ringwise.integrations.hf_tiling import NotMerged, feed_forward_modules, norm_modules  # noqa: E402

SEQ, BATCH, TILE = 48, 2, 5  # 24 / 16 local tokens at W = 2 / 3: tiles of 5, 5, 5, (5,) and the rest


def make_config(name):
    return family_config(name) if name in FAMILIES else model_config(name)


def global_ids():
    return torch.randint(3, 64, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------- no whole (tokens x intermediate) tensor


class Widest(TorchDispatchMode):
    """The most rows (elements / width) of any tensor an op returns whose last dim is `width` (and whose dtype is
    `dtype`, when given), parameter-shaped ones (weights, their gradients) aside; and the ops seen (backward's
    included)."""

    def __init__(self, width, param_shapes, dtype=None):
        super().__init__()
        self.width, self.param_shapes, self.dtype, self.rows, self.ops = width, param_shapes, dtype, 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(func.overloadpacket.__name__)
        for t in tree_flatten(out)[0]:
            if not torch.is_tensor(t) or (self.dtype is not None and t.dtype != self.dtype):
                continue
            if t.dim() >= 2 and t.shape[-1] == self.width and t.shape not in self.param_shapes:
                self.rows = max(self.rows, t.numel() // self.width)
        return out


@pytest.mark.parametrize("checkpointing", [None, "reentrant", "non-reentrant"])
def test_no_tokens_by_intermediate_tensor_exists_whole(checkpointing):
    config = config_class("LlamaConfig")(
        vocab_size=64, hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4
    )
    rows = {}
    for tile in (0, TILE):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        rw.tile_feed_forward(model, tile)
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": checkpointing == "reentrant"})
            model.train()
        shapes = {p.shape for p in model.parameters()}
        with Widest(config.intermediate_size, shapes) as seen:
            model(input_ids=global_ids()).logits.square().mean().backward()
        assert "silu_backward" in seen.ops  # the mode saw the backward
        rows[tile] = seen.rows
    assert rows[0] == BATCH * SEQ, rows  # untiled: the whole (batch x tokens, intermediate) tensor exists
    assert rows[TILE] == BATCH * TILE, rows  # tiled: one tile's, at most

    # The norms (each layer's two and the final one): in bfloat16, transformers' RMSNorm upcasts its input to
    # float32 and normalises it there; the only float32 (tokens x hidden) tensors of the step are theirs.
    upcast = {}
    for tile in (0, TILE):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").bfloat16()
        rw.tile_feed_forward(model, tile)
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": checkpointing == "reentrant"})
            model.train()
        shapes = {p.shape for p in model.parameters()}
        with Widest(config.hidden_size, shapes, dtype=torch.float32) as seen:
            model(input_ids=global_ids()).logits.square().mean().backward()
        assert "rsqrt" in seen.ops and "silu_backward" in seen.ops
        upcast[tile] = seen.rows
    assert upcast[0] == BATCH * SEQ, upcast  # untiled: the norms' whole float32 (batch x tokens, hidden) tensors
    assert upcast[TILE] == BATCH * TILE, upcast  # tiled: one tile's, at most


def test_tiling_keeps_names_and_classes_and_can_be_undone():
    """The feed-forward modules and the norms keep their classes (a subclass of the same name), parameter names
    and state dict; tile 0 gives back the original classes."""
    config = config_class("LlamaConfig")(
        vocab_size=64, hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4
    )
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    classes = [type(m) for m in feed_forward_modules(model)]
    norms = norm_modules(model)
    norm_classes = [type(m) for m in norms]
    assert len(norms) == 2 * config.num_hidden_layers + 1  # input_layernorm, post_attention_layernorm; final norm
    assert norms[-1] is model.model.norm and all(n.__class__.__name__ == "LlamaRMSNorm" for n in norms)
    names = [n for n, _ in model.named_parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert rw.tile_feed_forward(model, TILE) == TILE and rw.ffn_tile_of(model) == TILE
    assert [n for n, _ in model.named_parameters()] == names  # parameter names (state dicts) unchanged
    for modules, kinds in ((feed_forward_modules(model), classes), (norm_modules(model), norm_classes)):
        assert all(
            isinstance(m, c) and type(m) is not c and type(m).__name__ == c.__name__ for m, c in zip(modules, kinds)
        )
    tiled_state = model.state_dict()
    assert tiled_state.keys() == state.keys() and all(torch.equal(tiled_state[k], state[k]) for k in state)
    assert f"ringwise_ffn_tile={TILE}" in repr(model)
    shapes = {p.shape for p in model.parameters()}
    with torch.no_grad(), Widest(config.intermediate_size, shapes) as seen:
        tiled_logits = model(input_ids=global_ids()).logits
    assert seen.rows == BATCH * TILE  # inference (prefill) runs the tiles too, without recomputation
    assert rw.tile_feed_forward(model, 0) == 0 and rw.ffn_tile_of(model) == 0
    assert [type(m) for m in feed_forward_modules(model)] == classes
    assert [type(m) for m in norm_modules(model)] == norm_classes
    with torch.no_grad(), Widest(config.intermediate_size, shapes) as seen:
        untiled = model(input_ids=global_ids()).logits
    assert seen.rows == BATCH * SEQ and (tiled_logits - untiled).abs().max() < 1e-5
    assert rw.tile_size(config) == 256 and rw.tile_size(config_class("LlamaConfig")(hidden_size=4096)) == 4096


def test_a_layer_without_a_feed_forward_module_is_refused():
    """OPT computes fc1 / fc2 inline in its decoder layer: refused, never skipped; ffn_tile=0 builds it."""
    config = family_config("opt")
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match=r"OPTDecoderLayer \(layer 0\) has no feed-forward module .*ffn_tile=0"):
        rw.tile_feed_forward(model)
    with pytest.raises(ValueError, match="OPTDecoderLayer"):
        rw.from_config(config)
    assert rw.ffn_tile_of(rw.from_config(config, ffn_tile=0)) == 0
    with pytest.raises(ValueError, match="positive number of tokens"):
        rw.tile_feed_forward(model, -1)


def test_values_the_tiles_cannot_be_put_back_together_from_are_refused():
    """A module output with no token dimension (a per-call count) raises; a submodule hook reading such a value
    (JetMoE's router returns expert counts per tile beside its logits) raises when it uses it."""

    class Counting(torch.nn.Module):
        def forward(self, x):
            return x * 2, x.shape[1]  # tokens in this call: differs between tiles

    layer = torch.nn.Module()
    layer.mlp = Counting()
    model = torch.nn.Module()
    model.config = config_class("LlamaConfig")(hidden_size=8, num_hidden_layers=1, num_attention_heads=2)
    model.layers = torch.nn.ModuleList([layer])
    rw.tile_feed_forward(model, 3)
    x = torch.randn(1, 7, 8, requires_grad=True)
    with pytest.raises(ValueError, match=r"output\[1\] differs between the tiles"):
        layer.mlp(x)
    with pytest.raises(ValueError, match="depends on how the tokens were tiled"):
        NotMerged("output[3]")[0]


# ---------------------------------------------------------------- MoE through the ring, router logits included


def router_term(router_logits, weights):
    """A term linear in the router logits: sum over layers and tokens of <logits, weights[token]>."""
    return sum((r.to(weights.dtype) * weights).sum() for r in router_logits)


def experts_of(config):
    for k in ("num_local_experts", "num_experts", "n_routed_experts"):
        if getattr(config, k, None):
            return getattr(config, k)
    raise AssertionError("no expert count")


def ring_moe(name, layout):
    rw.use_ring(layout=layout)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = rw.from_config(make_config(name), ffn_tile=TILE, **EAGER_EXPERTS).eval()
    assert rw.ffn_tile_of(model) == TILE
    batch = rw.shard_batch(global_ids())
    labels = batch.pop("labels")
    out = model(**batch, output_router_logits=True)
    idx = global_indices(layout, rank, world, SEQ)
    weights = torch.randn(BATCH, SEQ, experts_of(model.config), generator=torch.Generator().manual_seed(2))
    loss = rw.causal_lm_loss(out.logits, labels) + router_term(out.router_logits, weights[:, idx].flatten(0, 1))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for g in grads.values():
        dist.all_reduce(g)
    aux = getattr(out, "aux_loss", None)
    return dict(
        logits=out.logits.detach(),
        router=[r.detach() for r in out.router_logits],
        aux=None if aux is None else aux.detach(),
        grads=grads,
    )


def single_moe(name, dtype):
    torch.manual_seed(0)
    attn = REFERENCE_ATTN.get(name, "eager")
    model = transformers.AutoModelForCausalLM.from_config(make_config(name), attn_implementation=attn, **EAGER_EXPERTS)
    model = model.to(dtype).eval()
    ids = global_ids()
    out = model(input_ids=ids, output_router_logits=True)
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    weights = torch.randn(BATCH, SEQ, experts_of(model.config), generator=torch.Generator().manual_seed(2))
    ce = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    (ce + router_term(out.router_logits, weights.flatten(0, 1).to(dtype))).backward()
    aux = getattr(out, "aux_loss", None)
    return dict(
        model=model,
        logits=out.logits.detach(),
        router=[r.detach() for r in out.router_logits],
        aux=None if aux is None else aux.detach(),
        grads={n: p.grad for n, p in model.named_parameters() if p.grad is not None},
    )


MOE_CASES = [("mixtral", 1), ("qwen2_moe", 2), ("jetmoe", 3), ("gpt_oss", 3)]


@pytest.mark.parametrize("name,world", MOE_CASES, ids=[f"{n}-W{w}" for n, w in MOE_CASES])
def test_tiled_moe_matches_the_untiled_model_router_logits_included(cluster, name, world):
    make_config(name)  # skips a family the installed transformers lacks, before any rank starts
    if name in REFUSED_HERE:
        pytest.skip(f"transformers {transformers.__version__}: {name} is refused ({REFUSED_HERE[name]})")
    layout = "zigzag"
    results = cluster(world).run(ring_moe, name, layout)
    ref, f32 = single_moe(name, torch.float64), single_moe(name, torch.float32)

    def check(what, got, ref_value, f32_value, eps):
        assert_within_budget(
            what, max_err(got, ref_value), max_err(f32_value, ref_value), eps, ceiling=CEILINGS["float32"]
        )

    logits = whole([r["logits"] for r in results], layout, world).reshape(f32["logits"].shape)
    check("logits", logits, ref["logits"], f32["logits"], 1e-6)
    assert len(results[0]["router"]) == len(ref["router"]) > 0
    routers = [whole([r["router"][i] for r in results], layout, world) for i in range(len(ref["router"]))]
    for i, router in enumerate(routers):
        check(f"router logits {i}", router, ref["router"][i], f32["router"][i], 1e-6)
    if ref["aux"] is not None:  # the auxiliary loss transformers computes from them, over all tokens
        loss_fn = importlib.import_module(type(ref["model"]).__module__).load_balancing_loss_func
        cfg = ref["model"].config
        aux = loss_fn(tuple(routers), experts_of(cfg), cfg.num_experts_per_tok)
        check("aux loss", aux, ref["aux"], f32["aux"], 1e-6)  # an O(1) value, as the logits: their eps
        if world == 1:
            check("aux loss (the model's)", results[0]["aux"], ref["aux"], f32["aux"], 1e-6)
    assert results[0]["grads"].keys() == ref["grads"].keys()
    for n, g in results[0]["grads"].items():
        check(n, g, ref["grads"][n], f32["grads"][n], 1e-7)


def whole(parts, layout, world):
    """Per-rank (batch, local, n) logits or (batch x local, n) router logits -> (batch x SEQ, n), global order."""
    local = SEQ // world
    out = torch.empty(BATCH, SEQ, parts[0].shape[-1], dtype=parts[0].dtype)
    for rank, part in enumerate(parts):
        out[:, global_indices(layout, rank, world, SEQ)] = part.reshape(BATCH, local, -1)
    return out.flatten(0, 1)
