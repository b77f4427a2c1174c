"""Delta-rule and short-convolution layers of transformers' hybrid models (Qwen3-Next, Qwen3.5, Kimi Linear, LFM2,
LFM2-MoE) sharded over the ring.

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
so the tests can hold the ring to a float64 one-process run. Packed documents reset the convolution and the
state at each document's start. A cache or an initial state are refused alike on every rank before any data
moves (hf_mixers: the wrapper every family shares).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch

from ..attention.halo import delta_rule, sharded_state_scan
from ..attention.seqshard import SeqShard
from .hf_mixers import ShardedLayer, refuse, sharded_conv, swap_functions

_MODELS = "transformers.models."


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


def sharded_delta_rule(shard: SeqShard, kernel: Callable[..., Any], docs: Optional[list[int]]) -> Callable[..., Any]:
    """The model's chunked delta-rule kernel over the global sequence, for this rank's shard (halo.sharded_state_scan
    around it; float64 inputs: the float64 kernel)."""

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
        if initial_state is not None:  # a decode step runs unsharded (hf_mixers); a ring starts from zero
            refuse("an initial recurrent state: call the model with use_cache=False")
        if cu_seqlens is not None:
            refuse("the kernel's own cu_seqlens: pass packed documents as ringwise_cu_seqlens")

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

        out, final = sharded_state_scan(local, query, key, value, dict(g=g, beta=beta), shard.layout, shard.group, docs)
        return out, final if output_final_state else None  # rw.generate's prefill: the state decode starts from

    return scan


def _delta_layer(model: str, layer: str, kernel: str) -> ShardedLayer:
    """A layer calling causal_conv1d_forward and the chunked delta-rule kernel `kernel` of its modeling module."""
    return ShardedLayer(
        _MODELS + model,
        layer,
        swap_functions(causal_conv1d_forward=sharded_conv, **{kernel: sharded_delta_rule}),
        generates=True,
    )


def _conv_layer(model: str, layer: str) -> ShardedLayer:
    """A short-convolution layer calling causal_conv1d_forward of its modeling module, with no delta rule."""
    return ShardedLayer(
        _MODELS + model, layer, swap_functions(causal_conv1d_forward=sharded_conv), ("conv",), generates=True
    )


# model_type -> the name of the chunked delta-rule kernel its layers call (tests/test_hf_linear.py runs each family)
DELTA_KERNELS = {
    "qwen3_next": "torch_chunk_gated_delta_rule",
    "qwen3_5_text": "torch_chunk_gated_delta_rule",
    "qwen3_5_moe_text": "torch_chunk_gated_delta_rule",
    "kimi_linear": "chunk_kimi_delta_attention",
}
GATED_DELTA_LAYERS = {
    "qwen3_next": _delta_layer("qwen3_next.modeling_qwen3_next", "Qwen3NextGatedDeltaNet", DELTA_KERNELS["qwen3_next"]),
    # Qwen3.5's layers (separate q/k/v, z, b, a projections) call the same kernels the same way; its text models
    # run inside the multimodal models (M-RoPE: rw.shard_multimodal_batch)
    "qwen3_5_text": _delta_layer("qwen3_5.modeling_qwen3_5", "Qwen3_5GatedDeltaNet", DELTA_KERNELS["qwen3_5_text"]),
    "qwen3_5_moe_text": _delta_layer(
        "qwen3_5_moe.modeling_qwen3_5_moe", "Qwen3_5MoeGatedDeltaNet", DELTA_KERNELS["qwen3_5_moe_text"]
    ),
    "kimi_linear": _delta_layer(
        "kimi_linear.modeling_kimi_linear", "KimiLinearDeltaAttention", DELTA_KERNELS["kimi_linear"]
    ),
    # LFM2's gated short convolution: no delta rule, only causal_conv1d_forward to swap
    "lfm2": _conv_layer("lfm2.modeling_lfm2", "Lfm2ShortConv"),
    # LFM2-MoE: the same short-convolution layers (its MoE feed-forward is per token)
    "lfm2_moe": _conv_layer("lfm2_moe.modeling_lfm2_moe", "Lfm2MoeShortConv"),
}
