"""Delta-rule and short-convolution layers of transformers' hybrid models (Qwen3-Next, Qwen3.5, Kimi Linear, LFM2)
sharded over the ring.

Such a layer mixes tokens twice outside attention: a depthwise causal convolution (kernel K) and a
gated delta rule, whose state is a (dk x dv) matrix per head (gated DeltaNet: one decay per head and
token; Kimi Delta Attention: one per key channel). transformers' layer calls both through functions
of its modeling module (`causal_conv1d_forward`, and the chunked kernel GATED_DELTA_LAYERS names:
`torch_chunk_gated_delta_rule`, `chunk_kimi_delta_attention`); while a ringed layer runs, ringwise
puts sharded ones in their place for that call only: the convolution gets each segment's K - 1
predecessors (halo.causal_conv1d) and the delta rule carries its state across ranks
(halo.sharded_state_scan around the model's own kernel). The rest of the layer (the projections,
gates, norms) is per token and runs as transformers wrote it. LFM2's conv layers (Lfm2ShortConv: an input
projection into B, C and x, the depthwise causal convolution of B * x through the same `causal_conv1d_forward`,
then C times it and an output projection) have no delta rule: only the convolution is swapped.

transformers' kernels compute in float32 whatever the model's dtype; for a float64 model the delta
rule runs in float64 (halo.delta_rule after the kernel's own key normalisation and query scaling),
so the tests can hold the ring to a float64 one-process run. A cache (generation), an initial state,
packed documents or Ulysses are refused alike on every rank before any data moves.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, NoReturn

import torch

from ..attention.halo import causal_conv1d, delta_rule, sharded_state_scan
from ..attention.seqshard import SeqShard


class DeltaLayer(NamedTuple):
    """Where a family's sharded layer lives: its modeling module, the layer's class name there, the name of the
    chunked delta-rule kernel its forward calls from that module (swapped, with causal_conv1d_forward, while it runs;
    None: a short convolution alone, LFM2) and its config.layer_types name."""

    module: str
    layer: str
    kernel: str | None
    layer_type: str = "linear_attention"


_MODELS = "transformers.models."
# model_type -> its delta-rule layer (tests/test_hf_linear.py runs each through the ring)
GATED_DELTA_LAYERS = {
    "qwen3_next": DeltaLayer(
        _MODELS + "qwen3_next.modeling_qwen3_next", "Qwen3NextGatedDeltaNet", "torch_chunk_gated_delta_rule"
    ),
    # Qwen3.5's layers (separate q/k/v, z, b, a projections) call the same kernels the same way; its text models
    # run inside the multimodal models (M-RoPE: rw.shard_multimodal_batch)
    "qwen3_5_text": DeltaLayer(
        _MODELS + "qwen3_5.modeling_qwen3_5", "Qwen3_5GatedDeltaNet", "torch_chunk_gated_delta_rule"
    ),
    "qwen3_5_moe_text": DeltaLayer(
        _MODELS + "qwen3_5_moe.modeling_qwen3_5_moe", "Qwen3_5MoeGatedDeltaNet", "torch_chunk_gated_delta_rule"
    ),
    "kimi_linear": DeltaLayer(
        _MODELS + "kimi_linear.modeling_kimi_linear", "KimiLinearDeltaAttention", "chunk_kimi_delta_attention"
    ),
    # LFM2's gated short convolution: no delta rule, only causal_conv1d_forward to swap
    "lfm2": DeltaLayer(_MODELS + "lfm2.modeling_lfm2", "Lfm2ShortConv", None, "conv"),
}
_RINGED = "_ringwise_sharded_mixer"


def sharded_layer_type(config) -> str | None:
    """The config.layer_types name of the layers ringwise shards for this config's family (None: it shards none)."""
    layer = GATED_DELTA_LAYERS.get(getattr(config, "model_type", None) or "")
    return layer.layer_type if layer else None


def _layer_of(module) -> DeltaLayer | None:
    where = (type(module).__module__, type(module).__name__)
    return next((d for d in GATED_DELTA_LAYERS.values() if (d.module, d.layer) == where), None)


def is_gated_delta_layer(module) -> bool:
    """Whether `module` is a delta-rule or short-convolution layer ringwise shards (install wraps it)."""
    return _layer_of(module) is not None


def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """transformers' (and flash-linear-attention's) key/query normalisation."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def float64_gated_delta_rule(
    query, key, value, g, beta, initial_state=None, use_qk_l2norm_in_kernel=False
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' torch_chunk_gated_delta_rule (g: (batch, tokens, heads)) or chunk_kimi_delta_attention (g:
    (..., heads, dk), a decay per key channel) in the inputs' dtype: the same normalisation, query scaling and
    grouped heads, the recurrence token by token (halo.delta_rule)."""
    hv, hk = value.shape[2], key.shape[2]
    if hv != hk:
        query, key = (x.repeat_interleave(hv // hk, dim=2) for x in (query, key))
    if use_qk_l2norm_in_kernel:
        query, key = _l2norm(query), _l2norm(key)
    return delta_rule(query * query.shape[-1] ** -0.5, key, value, g, beta, initial_state)


def _refuse(what: str) -> NoReturn:
    raise ValueError(
        f"ringwise: a delta-rule or short-convolution layer (gated DeltaNet, KDA, LFM2's conv) on a ring got {what}"
    )


def _sharded_conv(shard: SeqShard) -> Callable[..., torch.Tensor]:
    def conv(conv1d, hidden_states, cache, layer_idx, activation=None, state_idx=0, **kwargs):
        """transformers' causal_conv1d_forward on this rank's shard (batch, channels, local tokens)."""
        if cache is not None:
            _refuse(
                "a cache: call the model with use_cache=False (generation with a hybrid model is not supported on "
                "the ring yet)"
            )
        from transformers.activations import ACT2FN

        x = hidden_states.transpose(1, 2)
        out = causal_conv1d(x.to(conv1d.weight.dtype), conv1d.weight, conv1d.bias, shard.layout, shard.group)
        if activation is not None:
            out = ACT2FN[activation](out)
        return out.transpose(1, 2).to(hidden_states.dtype)

    return conv


def _sharded_delta_rule(shard: SeqShard, kernel: Callable[..., Any]) -> Callable[..., Any]:
    def scan(
        query,
        key,
        value,
        g,
        beta,
        chunk_size=64,
        initial_state=None,
        output_final_state=False,
        use_qk_l2norm_in_kernel=False,
        cu_seqlens=None,
        **kwargs,
    ):
        """The model's chunked delta-rule kernel over the global sequence, for this rank's shard."""
        if initial_state is not None or output_final_state:
            _refuse("a recurrent state from a cache: generation with a hybrid model is not supported on the ring yet")
        if cu_seqlens is not None:
            _refuse("packed sequences (cu_seq_lens): not supported by the sharded state scan yet")

        def local(q, k, v, initial_state, g, beta):
            if q.dtype == torch.float64:
                return float64_gated_delta_rule(q, k, v, g, beta, initial_state, use_qk_l2norm_in_kernel)
            return kernel(
                q,
                k,
                v,
                g=g,
                beta=beta,
                chunk_size=chunk_size,
                initial_state=initial_state,
                output_final_state=True,
                use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
            )

        out, _ = sharded_state_scan(local, query, key, value, dict(g=g, beta=beta), shard.layout, shard.group)
        return out, None

    return scan


@contextlib.contextmanager
def _swapped(module, replacements: dict[str, Any]) -> Iterator[None]:
    saved = {name: getattr(module, name) for name in replacements}
    for name, fn in replacements.items():
        setattr(module, name, fn)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(module, name, fn)


def shard_problem(shard: SeqShard) -> str | None:
    """Why these layers cannot run on this ring (None: they can)."""
    if shard.ulysses_group is not None:
        return "Ulysses splits heads across ranks, which the sharded state scan does not (use a plain ring)"
    if shard.layout == "striped" and shard.world > 1:
        return "the striped layout spreads each token's predecessors over every rank (use zigzag or contiguous)"
    return None


def install(model, shard_of: Callable[[], SeqShard]) -> int:
    """Wrap each delta-rule or short-convolution layer's forward so that it runs sharded on the ring `shard_of()`
    gives at call time. Idempotent; returns the number of layers handled."""
    count = 0
    for module in model.modules():
        layer = _layer_of(module)
        if layer is None:
            continue
        count += 1
        if getattr(module, _RINGED, False):
            continue
        modeling = sys.modules[layer.module]
        forward = module.forward
        own = getattr(type(module).forward, "__module__", None)
        if own != layer.module or getattr(forward, "__func__", None) is not type(module).forward:
            # a kernel hub's forward (transformers' kernelize / use_kernels) calls no module functions to swap
            raise ValueError(
                f"ringwise: {type(module).__name__}'s forward was replaced (by {own}: a hub kernel, kernelize or "
                "use_kernels); ringwise shards the layer through transformers' own forward only: load the model "
                "without use_kernels"
            )

        # Under torch.compile the layer runs eager (a graph break around it): its cross-rank agreement reads
        # Python objects off a gather, which Dynamo cannot trace; the attention layers stay compiled.
        @torch.compiler.disable
        def ringed(*args, _forward=forward, _modeling=modeling, _kernel=layer.kernel, **kwargs):
            shard = shard_of()
            problem = shard_problem(shard)
            if problem:
                raise ValueError(f"ringwise: {problem}")
            if kwargs.get("ringwise_cu_seqlens") is not None:  # the same global boundaries on every rank
                _refuse(
                    "packed documents (ringwise_cu_seqlens): the sharded convolution and state scan do not reset "
                    "at a document's start yet; run one document per row"
                )
            swaps: dict[str, Any] = {"causal_conv1d_forward": _sharded_conv(shard)}
            if _kernel is not None:
                swaps[_kernel] = _sharded_delta_rule(shard, getattr(_modeling, _kernel))
            with _swapped(_modeling, swaps):
                return _forward(*args, **kwargs)

        module.forward = ringed
        setattr(module, _RINGED, True)
    return count
