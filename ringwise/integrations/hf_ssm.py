"""Mamba (Mamba1) and RG-LRU layers of transformers' state-space and hybrid models (Mamba, Falcon-Mamba, Jamba,
Zamba, RecurrentGemma) sharded over the ring.

A Mamba1 mixer mixes tokens in two places outside attention, both through functions of its modeling module: a
depthwise causal convolution (`causal_conv1d_forward`) and the selective scan (`mamba_selective_scan`, which
`mamba_scan_forward` calls once on the whole input without a cache, and Zamba's mixer once per Mamba head). The
scan's state is (channels x state_size), h_t = exp(A dt_t) * h_t-1 + dt_t B_t u_t elementwise, read out as
y_t = h_t C_t + D u_t and gated by silu(z_t): a diagonal recurrence, so on the ring `sharded_selective_scan`
discretises as transformers does and runs halo.sharded_scan (states materialised, as transformers' torch path
materialises its decays), and the convolution gets each segment's predecessors (hf_mixers.sharded_conv). The rest
(projections, Falcon-Mamba's and Jamba's norms of dt, B and C) is per token and runs as transformers wrote it.
Mamba's mixer first offers the whole layer to a fused kernel in training (`mamba_inner_fn`: mamba_ssm's on a GPU,
which would read one shard alone); on the ring it answers None, so the unfused path always runs.

RecurrentGemma's recurrent block runs its convolution as a module (`conv_1d`, an nn.Conv1d) and its RG-LRU scan as
a method (`rg_lru._rnn_scan`): for the call, the conv's forward becomes halo.causal_conv1d and the scan
halo.sharded_scan (instance attributes, removed after the call). The RG-LRU resets its state, and skips its input
normalisation, where a position id is 0: packed documents reach it as position ids restarting at each document
(the ring's are global), so each document runs as it would alone.

transformers' torch scans accumulate in float32 whatever the model's dtype (Mamba's rounds B and u to float32);
for a float64 model these run in float64 (`float64_selective_scan` is the one-process reference), so the tests can
hold the ring to a float64 one-process run. Packed documents (ringwise_cu_seqlens) reset the convolution and the
state at each document's start (Jamba's decoder layers, and Mamba's and Falcon-Mamba's models, call the modules
below them without the call's keyword arguments: the documents reach the mixers from the model's call,
hf_mixers.documents). Zamba's model hands its layers no position ids, which ring attention checks, so its
hybrid layers get the layout's (`zamba_positions`: its shared attention has no positional encoding). Mamba and
Falcon-Mamba have no attention layer at all (hf_support.attention_free). A cache (use_cache=True) and a padding mask
are refused alike on every rank.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Optional

import torch
import torch.nn.functional as F

from ..attention.halo import agree, causal_conv1d, linear_scan, sharded_scan
from ..attention.seqshard import SeqShard
from .hf_mixers import ShardedLayer, documents, refuse, refuse_cache, ring_cache_phase, sharded_conv, swap_functions

_MODELS = "transformers.models."
Tensor = torch.Tensor


def _accumulation(x: Tensor) -> torch.dtype:
    """transformers' scans accumulate in float32; a float64 model's in float64 (its tests' one-process runs too)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _discretise(hidden_states, dt, A, B, delta_bias, delta_softplus) -> tuple[Tensor, Tensor]:
    """transformers' discretisation of a Mamba1 scan, u and dt (batch, channels, tokens), A (channels, state), B
    (batch, state, tokens): decays exp(A dt) and inputs dt B u, each (batch, tokens, channels, state), in the
    accumulation dtype."""
    acc = _accumulation(hidden_states)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dt.dtype)[..., None]
    if delta_softplus:
        dt = F.softplus(dt)
    dt = dt.transpose(1, 2).to(acc)[..., None]
    decays = torch.exp(A.to(acc) * dt)
    inputs = dt * B.transpose(1, 2).to(acc)[:, :, None, :] * hidden_states.transpose(1, 2).to(acc)[..., None]
    return decays, inputs


def _read_out(states: Tensor, hidden_states: Tensor, C: Tensor, D, z) -> Tensor:
    """y = h C (in the input's dtype, as transformers reads its states out) + D u, gated by silu(z): (batch,
    channels, tokens)."""
    y = torch.einsum("blin,bnl->bil", states.to(hidden_states.dtype), C.to(hidden_states.dtype))
    if D is not None:
        y = y + hidden_states * D[None, :, None]
    if z is not None:
        y = y * F.silu(z)
    return y


def float64_selective_scan(
    hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False, **_
):
    """transformers' mamba_selective_scan in the inputs' dtype (its torch path rounds B and u to float32 whatever
    the model's dtype): the same discretisation, the recurrence token by token (halo.linear_scan), the same read-out.
    The one-process reference of the float64 tests."""
    states = linear_scan(*_discretise(hidden_states, dt, A, B, delta_bias, delta_softplus))
    y = _read_out(states, hidden_states, C, D, z)
    return (y, states[:, -1]) if return_last_state else y


def sharded_selective_scan(shard: SeqShard, _scan: Callable[..., Any], docs: Optional[list[int]]) -> Callable[..., Any]:
    """The model's mamba_selective_scan over the global sequence, for this rank's shard: its decays and inputs
    through halo.sharded_scan (state reset at each document's start)."""

    def scan(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, **kwargs):
        decays, inputs = _discretise(hidden_states, dt, A, B, delta_bias, delta_softplus)
        states, final = sharded_scan(decays, inputs, shard.layout, shard.group, docs)
        y = _read_out(states, hidden_states, C, D, z)
        return (y, final) if kwargs.get("return_last_state") else y  # rw.generate's prefill: decode starts there

    return scan


def unfused(shard: SeqShard, _fused: Callable[..., Any], docs: Optional[list[int]]) -> Callable[..., Any]:
    """mamba_inner_fn answering None (the mixer then runs its unfused path, whose convolution and scan the ring
    shards): a fused kernel would run the whole layer on this rank's shard alone."""
    return lambda *args, **kwargs: None


def _refuse_padding(mask: Optional[Tensor], shard: SeqShard, what: str) -> None:
    """A padding mask (zeros in attention_mask) refused alike on every rank: its padded tokens would enter the
    state, and the ring does not pad; a None or all-ones mask is none."""
    problem = None
    if mask is not None and not bool(mask.all()):
        problem = (
            "a padding mask (zeros in attention_mask); ringwise does not support padding: pack sequences "
            "without it (documents via ringwise_cu_seqlens) or pad with tokens whose labels are -100"
        )
    agree(f"ringwise: {what} on a ring got", problem, (), shard.group)


def _mamba_mixer(*swaps: str) -> Callable[..., Any]:
    """A Mamba1 mixer's run: a cache or a padding mask refused, else the convolution, the scan (and the fused
    kernel, where the mixer has one) swapped for the call; documents from the call or its decoder layer."""
    factories = dict(causal_conv1d_forward=sharded_conv, mamba_selective_scan=sharded_selective_scan)
    factories.update({name: unfused for name in swaps})
    run_swapped = swap_functions(**factories)

    def run(module, modeling, shard, forward, args, kwargs):
        # rw.generate's prefill fills its cache; any other cache is refused alike on every rank
        ring_cache_phase(kwargs.get("cache", args[1] if len(args) > 1 else None))
        _refuse_padding(kwargs.get("attention_mask", args[2] if len(args) > 2 else None), shard, "a Mamba layer")
        return run_swapped(module, modeling, shard, forward, args, kwargs)

    return run


def zamba_positions(module, modeling, shard, forward, args, kwargs):
    """Zamba's hybrid layer: its shared attention block has no positional encoding, and ZambaModel hands its layers
    no position ids, which ring attention checks against the layout's global positions before it runs: the layer's
    call gets those (the model's own, were it to compute any on the whole sequence; its causal mask is the ring's)."""
    if "position_ids" in kwargs:
        return forward(*args, **kwargs)
    hidden = args[0] if args else kwargs["hidden_states"]
    positions = shard.positions(hidden.shape[1] * shard.world, hidden.device)
    return forward(*args, **kwargs, position_ids=positions[None].expand(hidden.shape[0], -1))


def _restarted(position_ids: Tensor, docs: Optional[list[int]]) -> Tensor:
    """The ring's global position ids with each document's first token at 0: where the RG-LRU resets (and skips
    its input normalisation), as on each document alone."""
    if docs is None:
        return position_ids
    starts = torch.isin(position_ids, torch.tensor([int(d) for d in docs], device=position_ids.device))
    return torch.where(starts, torch.zeros_like(position_ids), position_ids)


def _rg_lru_scan(shard: SeqShard, docs: Optional[list[int]]) -> Callable[..., Any]:
    """RecurrentGemmaRglru._rnn_scan (h_t = a_t * h_t-1 + x_t, a zeroed where reset, accumulated in float32, or
    float64 for a float64 model) over the global sequence: halo.sharded_scan."""

    def scan(hidden_states, recurrent_gate, reset, recurrent_states, acc_dtype=torch.float32):
        if recurrent_states is not None:
            refuse_cache()
        acc = torch.float64 if hidden_states.dtype == torch.float64 else acc_dtype
        decays = (recurrent_gate * ~reset).to(acc)
        states, _ = sharded_scan(decays, hidden_states.to(acc), shard.layout, shard.group, docs)
        return states.to(hidden_states.dtype), None

    return scan


def _sharded_conv_module(conv: torch.nn.Conv1d, shard: SeqShard, docs: Optional[list[int]]) -> Callable[..., Any]:
    """An nn.Conv1d's forward (x (batch, channels, local tokens), depthwise, padded K - 1 on the left: the caller keeps
    the first tokens) on the global sequence: halo.causal_conv1d."""

    def forward(x):
        out = causal_conv1d(x.transpose(1, 2), conv.weight, conv.bias, shard.layout, shard.group, docs)
        return out.transpose(1, 2)

    return forward


@contextlib.contextmanager
def for_the_call(module: torch.nn.Module, name: str, fn: Callable[..., Any]) -> Iterator[None]:
    """A module's method replaced by an instance attribute for the block, then the class's own again (no bound
    method left behind in the instance: hf_mixers.swapped would put one back)."""
    if name in vars(module):
        refuse(f"{type(module).__name__}.{name} replaced on the instance (ringwise runs its own for the call)")
    setattr(module, name, fn)
    try:
        yield
    finally:
        delattr(module, name)


def run_recurrent_block(module, modeling, shard, forward, args, kwargs):
    """One call of RecurrentGemma's recurrent block on the ring: use_cache refused (the block keeps its states in
    attributes), else its conv_1d and its RG-LRU scan swapped for the call, and documents as restarting position
    ids."""
    use_cache = kwargs.get("use_cache", args[3] if len(args) > 3 else True)
    if use_cache:
        refuse_cache()
    if len(args) > 1 or "position_ids" not in kwargs:
        refuse("a recurrent block called without position_ids by name (not RecurrentGemma's decoder layer)")
    docs = documents(kwargs)
    kwargs = dict(kwargs, position_ids=_restarted(kwargs["position_ids"], docs))
    conv, lru = module.conv_1d, module.rg_lru
    with for_the_call(conv, "forward", _sharded_conv_module(conv, shard, docs)):
        with for_the_call(lru, "_rnn_scan", _rg_lru_scan(shard, docs)):
            return forward(*args, **kwargs)


def _mamba_layer(model: str, layer: str, *layer_types: str, fused: tuple[str, ...] = ()) -> ShardedLayer:
    return ShardedLayer(
        _MODELS + model, layer, _mamba_mixer(*fused), layer_types or ("linear_attention",), generates=True
    )


# model_type -> its Mamba1 or RG-LRU layer (tests/test_hf_ssm.py runs each family)
SSM_LAYERS = {
    "jamba": _mamba_layer("jamba.modeling_jamba", "JambaMambaMixer", "mamba", "linear_attention"),
    # Zamba's hybrid layers run a shared attention block (through the registry, without positions) before their mixer
    "zamba": _mamba_layer("zamba.modeling_zamba", "ZambaMambaMixer", "linear_attention", "hybrid"),
    # (rw.generate: not built for Zamba's hybrid layers yet)
    "zamba_hybrid_layer": ShardedLayer(_MODELS + "zamba.modeling_zamba", "ZambaHybridLayer", zamba_positions, ()),
    "recurrent_gemma": ShardedLayer(
        _MODELS + "recurrent_gemma.modeling_recurrent_gemma", "RecurrentGemmaRecurrentBlock", run_recurrent_block
    ),
    # models without attention: every layer a mixer
    "mamba": _mamba_layer("mamba.modeling_mamba", "MambaMixer", fused=("mamba_inner_fn",)),
    "falcon_mamba": _mamba_layer("falcon_mamba.modeling_falcon_mamba", "FalconMambaMixer"),
}
