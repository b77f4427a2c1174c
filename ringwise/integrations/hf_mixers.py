"""How ringwise runs transformers' sequence mixers other than attention (short convolutions, linear attention,
state-space and linear-recurrent layers) over the ring: one wrapper for every family.

Each family (hf_linear: gated DeltaNet, KDA and LFM2's convolutions; the others beside it) describes its layer
with a `ShardedLayer`: where the layer class lives and how to run one call of it on this rank's shard
(`run(module, modeling, shard, forward, args, kwargs)`), usually by swapping the module-level functions its
forward calls (`swap_functions`) for sharded ones while the call runs. `install` wraps every such layer's
forward; problems with the ring (Ulysses, the striped layout, a replaced forward) are raised alike on every
rank before any data moves. Packed documents (`ringwise_cu_seqlens`: global boundaries, the same on every rank)
reach a layer from its own call or, where a model's blocks call the layers below them without the call's keyword
arguments (Jamba's, Mamba's), from the model's call (`documents`).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from types import ModuleType
from typing import Any, NamedTuple, NoReturn, Optional

import torch

from ..attention.halo import causal_conv1d, last_tokens
from ..attention.seqshard import SeqShard

# (module, its modeling module, the ring's shard, the layer's own forward, args, kwargs) -> the layer's output
Run = Callable[[torch.nn.Module, ModuleType, SeqShard, Callable[..., Any], tuple, dict], Any]
# (the ring's shard, the function it replaces, the documents' global boundaries or None) -> the sharded function
Factory = Callable[[SeqShard, Callable[..., Any], Optional[list[int]]], Callable[..., Any]]


class ShardedLayer(NamedTuple):
    """A family's sequence-mixing layer ringwise shards: its modeling module, the layer's class name there, how one
    call runs on the ring, the config.layer_types (or layers_block_type) names of the family's layers that are not
    attention (check_model accepts them for it), and whether its run fills rw.generate's prefill cache (the
    states a decode continues from: `ring_cache_phase`)."""

    module: str
    layer: str
    run: Run
    layer_types: tuple[str, ...] = ("linear_attention",)
    generates: bool = False


_RINGED = "_ringwise_sharded_mixer"
# the packed documents of the model call under way (install's hooks on the model set them for the call)
_CALL_DOCUMENTS: ContextVar[Optional[list[int]]] = ContextVar("ringwise_call_documents", default=None)


def documents(kwargs: Mapping[str, Any]) -> Optional[list[int]]:
    """A sharded layer's packed documents: its call's ringwise_cu_seqlens, else the model call's."""
    docs = kwargs.get("ringwise_cu_seqlens")
    return _CALL_DOCUMENTS.get() if docs is None else docs


def refuse(what: str) -> NoReturn:
    raise ValueError(
        "ringwise: a sequence-mixing layer outside attention (a short convolution, linear attention, a state-space "
        f"or recurrent layer) on a ring got {what}"
    )


def refuse_cache() -> NoReturn:
    refuse(
        "a cache: call the model with use_cache=False (rw.generate decodes hybrid models from the states the ring's "
        "prefill leaves)"
    )


def ring_cache_phase(cache: Any) -> str | None:
    """rw.generate's sharded cache (hf_cache.ShardedCache) is in its "prefill" (the ring's forward over the prompt:
    a sharded layer leaves its whole-sequence states there, the same on every rank) or "decode" phase (every rank
    runs the same new tokens: the layer runs as transformers wrote it on those states); None without a cache. Any
    other cache is refused: it would hold one shard's states."""
    if cache is None:
        return None
    phase = getattr(cache, "ringwise_phase", None)
    if phase is None:
        refuse_cache()
    return str(phase)


def _cache_in(args: tuple, kwargs: dict) -> Any:
    """rw.generate's sharded cache among a layer's arguments, or None: told by its type's ringwise_phase property,
    read off the type (the ring's attention mask, which reaches RecurrentGemma's blocks and Zamba's hybrid layers,
    refuses every attribute read on itself)."""
    return next((v for v in (*args, *kwargs.values()) if hasattr(type(v), "ringwise_phase")), None)


@contextlib.contextmanager
def swapped(owner: Any, replacements: Mapping[str, Any]) -> Iterator[None]:
    """Set owner's attributes to `replacements` for the block, then put the old ones back."""
    saved = {name: getattr(owner, name) for name in replacements}
    for name, fn in replacements.items():
        setattr(owner, name, fn)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(owner, name, fn)


def sharded_conv(shard: SeqShard, _original: Callable[..., Any], docs: Optional[list[int]]) -> Callable[..., Any]:
    """transformers' `causal_conv1d_forward(conv1d, hidden_states (batch, channels, local tokens), cache,
    layer_idx, activation)` on this rank's shard: each segment gets its predecessors (halo.causal_conv1d)."""

    def conv(conv1d, hidden_states, cache, layer_idx, activation=None, state_idx=0, **kwargs):
        from transformers.activations import ACT2FN

        x = hidden_states.transpose(1, 2)
        if ring_cache_phase(cache) == "prefill":  # the decode continues from the sequence's last K inputs
            K = conv1d.weight.shape[-1]
            tail = last_tokens(hidden_states.transpose(1, 2), K, shard.layout, shard.group).transpose(1, 2)
            cache.update_conv_state(tail, layer_idx, state_idx=state_idx, conv_kernel_size=K)
        out = causal_conv1d(x.to(conv1d.weight.dtype), conv1d.weight, conv1d.bias, shard.layout, shard.group, docs)
        if activation is not None:
            out = ACT2FN[activation](out)
        return out.transpose(1, 2).to(hidden_states.dtype)

    return conv


def swap_functions(**factories: Factory) -> Run:
    """A `run` that replaces the named functions of the layer's modeling module with sharded ones (each from its
    factory) for the call."""

    def run(module, modeling, shard, forward, args, kwargs):
        docs = documents(kwargs)
        swaps = {name: make(shard, getattr(modeling, name), docs) for name, make in factories.items()}
        with swapped(modeling, swaps):
            return forward(*args, **kwargs)

    return run


def shard_problem(shard: SeqShard) -> str | None:
    """Why these layers cannot run on this ring (None: they can)."""
    if shard.ulysses_group is not None:
        return "Ulysses splits heads across ranks, which the sharded scans and convolutions do not (use a plain ring)"
    if shard.layout == "striped" and shard.world > 1:
        return "the striped layout spreads each token's predecessors over every rank (use zigzag or contiguous)"
    return None


def layer_of(module: Any, table: Mapping[str, ShardedLayer]) -> ShardedLayer | None:
    where = (type(module).__module__, type(module).__name__)
    return next((d for d in table.values() if (d.module, d.layer) == where), None)


def install(model: torch.nn.Module, shard_of: Callable[[], SeqShard], table: Mapping[str, ShardedLayer]) -> int:
    """Wrap each of the model's layers `table` describes so that it runs sharded on the ring `shard_of()` gives at
    call time. Idempotent; returns the number of layers handled."""
    count = 0
    for module in model.modules():
        layer = layer_of(module, table)
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
        def ringed(*args, _module=module, _forward=forward, _modeling=modeling, _run=layer.run, **kwargs):
            cache = _cache_in(args, kwargs)
            if cache is not None and cache.ringwise_phase == "decode":  # the same tokens and states on every rank
                return _forward(*args, **kwargs)
            shard = shard_of()
            problem = shard_problem(shard)
            if problem:
                raise ValueError(f"ringwise: {problem}")
            return _run(_module, _modeling, shard, _forward, args, kwargs)

        module.forward = ringed
        setattr(module, _RINGED, True)
    if count:
        _carry_documents(model)
    return count


def _carry_documents(model: torch.nn.Module) -> None:
    """The model's (and its base model's: rw.generate's prefill calls that) packed documents held for its call, so
    they reach the sharded layers whatever the blocks between pass on (`documents`). Idempotent."""
    for m in {id(x): x for x in (model, getattr(model, "base_model", model))}.values():
        if getattr(m, "_ringwise_carries_documents", False):
            continue
        tokens: list = []

        def enter(_module, _args, kwargs, _tokens=tokens):
            _tokens.append(_CALL_DOCUMENTS.set(kwargs.get("ringwise_cu_seqlens", _CALL_DOCUMENTS.get())))

        def leave(_module, _args, _kwargs, _output, _tokens=tokens):
            _CALL_DOCUMENTS.reset(_tokens.pop())

        m.register_forward_pre_hook(enter, with_kwargs=True)
        m.register_forward_hook(leave, with_kwargs=True, always_call=True)
        m._ringwise_carries_documents = True
