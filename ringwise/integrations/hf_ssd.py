"""Mamba2 (SSD) layers of transformers' state-space and hybrid models (Mamba2, Bamba, Falcon-H1, Granite 4 hybrid,
Nemotron-H, Zamba2) sharded over the ring.

Every one of these mixers (transformers generates them from Mamba2's) mixes tokens in two places outside
attention, both through functions of its modeling module: a depthwise causal convolution over x, B and C
(`causal_conv1d_forward`) and the SSD scan (`mamba2_scan_forward`, which without a cache calls the chunked
`mamba2_chunk_scan` once on the whole input). The state is (head_dim x state_size) per head, decaying by
exp(dt * A) per head and token, with x dt B^T entering it linearly: halo.sharded_decay_scan carries it across
ranks around the model's own chunk scan, and the convolution gets each segment's predecessors
(hf_mixers.sharded_conv). The rest (projections, gates, the gated norm, the D skip, Falcon-H1's muP multipliers)
is per token and runs as transformers wrote it. In training the mixer first offers the whole layer to a fused
kernel (`mamba2_split_conv1d_scan_combined`: mamba_ssm's on a GPU, which would read one shard alone); on the ring
it answers None, so the unfused path above always runs.

transformers' chunk scan computes in float32 whatever the model's dtype; for a float64 model the scan runs in
float64 (`float64_ssd`, the recurrence token by token), so the tests can hold the ring to a float64 one-process
run. Packed documents (ringwise_cu_seqlens) reset the convolution and the state at each document's start.
rw.generate's prefill leaves the convolution's last inputs and the scan's final state (composed across ranks)
in its cache, from which transformers' own decode steps continue. Any other cache and a padding mask (which
the attention layers refuse too, and pure Mamba2 has none to) are refused alike on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Optional

import torch
import torch.nn.functional as F

from ..attention.halo import agree, sharded_decay_scan
from ..attention.seqshard import SeqShard
from .hf_mixers import ShardedLayer, refuse_cache, ring_cache_phase, sharded_conv, swap_functions

_MODELS = "transformers.models."


def _dt(dt, dt_bias, dt_softplus, dt_limit):
    """The step per token and head, as transformers' kernels derive it from the projection."""
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    return torch.clamp(dt, min=dt_limit[0], max=dt_limit[1])


def float64_ssd(
    hidden_states: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int = 0,
    D: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    initial_states: Optional[torch.Tensor] = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    return_final_states: bool = False,
    **kwargs: Any,
):
    """transformers' mamba2_chunk_scan (x (batch, tokens, heads, head_dim), dt (..., heads), B, C (..., groups,
    state)) in the inputs' dtype, token by token: h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t + D x_t,
    with the same dt_bias / softplus / clamp and grouped B, C. Returns y, and the final state (batch, heads, head_dim,
    state) if asked."""
    heads = hidden_states.shape[2]
    dt = _dt(dt, dt_bias, dt_softplus, dt_limit)
    B, C = (y.repeat_interleave(heads // y.shape[2], dim=2) for y in (B, C))
    decay = torch.exp(dt * A.to(dt.dtype))
    batch, _, _, head_dim = hidden_states.shape
    h = (
        hidden_states.new_zeros(batch, heads, head_dim, B.shape[-1])
        if initial_states is None
        else initial_states.to(hidden_states.dtype)
    )
    outs = []
    for t in range(hidden_states.shape[1]):
        x = hidden_states[:, t] * dt[:, t, :, None]
        h = decay[:, t, :, None, None] * h + x[..., None] * B[:, t, :, None, :]
        outs.append(torch.einsum("bhpn,bhn->bhp", h, C[:, t]))
    y = torch.stack(outs, dim=1)
    if D is not None:
        y = y + D[..., None] * hidden_states
    return (y, h) if return_final_states else y


def sharded_chunk_scan(shard: SeqShard, kernel: Callable[..., Any], docs: Optional[list[int]]) -> Callable[..., Any]:
    """The model's mamba2_chunk_scan over the global sequence, for this rank's shard (halo.sharded_decay_scan
    around it; float64 inputs: float64_ssd)."""

    def scan(
        hidden_states,
        dt,
        A,
        B,
        C,
        chunk_size,
        D=None,
        dt_bias=None,
        initial_states=None,
        dt_softplus=False,
        dt_limit=(0.0, math.inf),
        return_final_states=False,
        **kwargs,
    ):
        if initial_states is not None:  # a decode step runs unsharded (hf_mixers); a ring starts from zero
            refuse_cache()
        kwargs.pop("ringwise_cu_seqlens", None)  # the documents reach the scan through `docs`
        options = dict(chunk_size=chunk_size, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit)

        def local(x, initial_state, dt, B, C):
            run = float64_ssd if x.dtype == torch.float64 else kernel
            return run(x, dt, A, B, C, initial_states=initial_state, return_final_states=True, **options, **kwargs)

        out, final = sharded_decay_scan(local, hidden_states, dict(dt=dt, B=B, C=C), shard.layout, shard.group, docs)
        return (out, final) if return_final_states else out  # rw.generate's prefill: the state decode starts from

    return scan


def unfused(shard: SeqShard, _fused: Callable[..., Any], docs: Optional[list[int]]) -> Callable[..., Any]:
    """mamba2_split_conv1d_scan_combined answering None (the mixer then runs its unfused path, whose convolution
    and scan the ring shards): a fused kernel would run the whole layer on this rank's shard alone."""
    return lambda *args, **kwargs: None


_SWAPS = swap_functions(
    causal_conv1d_forward=sharded_conv,
    mamba2_chunk_scan=sharded_chunk_scan,
    mamba2_split_conv1d_scan_combined=unfused,
)


_FLASH_PACKING = ("cu_seq_lens_q", "cu_seq_lens_k", "cu_seqlens_q", "cu_seqlens_k")


def _problem(args: tuple, kwargs: dict) -> Optional[str]:
    """What in one mixer call the ring cannot run exactly (None: nothing). A padding mask: its padded tokens are
    zeroed before the convolution and the scan, by a mask the model cut to this rank's length from the end of
    whatever it was given (the attention layers refuse padding too; pure Mamba2 has none to). Flash-attention
    packing arguments: transformers' mixers ignore them (documents would leak into each other); documents go as
    ringwise_cu_seqlens."""
    mask = kwargs.get("attention_mask", args[2] if len(args) > 2 else None)
    if mask is not None and not bool(mask.all()):
        return (
            "a padding mask (zeros in attention_mask); ringwise does not support padding: pack sequences "
            "without it (documents via ringwise_cu_seqlens) or pad with tokens whose labels are -100"
        )
    packed = [k for k in _FLASH_PACKING if kwargs.get(k) is not None]
    if packed:
        return f"flash-attention packing arguments ({', '.join(packed)}); pass documents as ringwise_cu_seqlens"
    return None


def _run_mixer(module, modeling, shard, forward, args, kwargs):
    """One call of a Mamba2 mixer on the ring: refused alike on every rank with a cache or a problem of the call
    (_problem: one small agreement across ranks, as a padding mask may be one rank's), else the swaps."""
    cache = kwargs.get("cache", kwargs.get("cache_params", args[1] if len(args) > 1 else None))
    ring_cache_phase(cache)  # rw.generate's prefill fills its cache; any other cache is refused alike on every rank
    agree("ringwise: a Mamba2 (SSD) layer on a ring got", _problem(args, kwargs), (), shard.group)
    return _SWAPS(module, modeling, shard, forward, args, kwargs)


def _ssd_layer(model: str, layer: str, *layer_types: str) -> ShardedLayer:
    return ShardedLayer(_MODELS + model, layer, _run_mixer, layer_types or ("linear_attention",), generates=True)


# model_type -> its Mamba2 mixer (tests/test_hf_ssd.py runs each family)
SSD_LAYERS = {
    "mamba2": _ssd_layer("mamba2.modeling_mamba2", "Mamba2Mixer"),
    "bamba": _ssd_layer("bamba.modeling_bamba", "BambaMixer"),
    # every layer runs attention and a mixer side by side ("hybrid")
    "falcon_h1": _ssd_layer("falcon_h1.modeling_falcon_h1", "FalconH1Mixer", "hybrid"),
    "granitemoehybrid": _ssd_layer("granitemoehybrid.modeling_granitemoehybrid", "GraniteMoeHybridMambaLayer"),
    # Nemotron-H's blocks: a mixer, attention, or a per-token MLP / MoE
    "nemotron_h": _ssd_layer(
        "nemotron_h.modeling_nemotron_h", "NemotronHMamba2Mixer", "linear_attention", "moe", "mlp"
    ),
    # Zamba2's hybrid layers run a shared attention block (through the registry) before their mixer
    "zamba2": _ssd_layer("zamba2.modeling_zamba2", "Zamba2MambaMixer", "linear_attention", "hybrid"),
}
