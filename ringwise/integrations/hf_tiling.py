"""Sequence-tiled feed-forward and norms for transformers models: no (local tokens x intermediate) tensor, and
no norm's internal (local tokens x hidden) tensors (transformers' RMSNorm's float32 upcast), exist whole.

    import ringwise.integrations.transformers as rw
    model = rw.from_pretrained(path)             # tiled already (auto tile); ffn_tile=0: left untiled
    rw.tile_feed_forward(model, tokens=None)     # any causal LM: None = auto (tile_size), 0 = untiled, N tokens

Every decoder layer's per-token feed-forward module (a dense MLP, or an MoE block with its router and
shared experts: `mlp`, `block_sparse_moe` or `feed_forward`) runs over tiles of T local tokens, one after
the other; in forwards that build a graph for backward each tile runs under non-reentrant
torch.utils.checkpoint (only its input is kept; backward runs it again), so its intermediates (gate/up
projections, activations, expert buffers) and their gradients exist for one tile at a time, in forward
and in backward. Forwards without gradients (inference's prefill, reentrant checkpointing's first pass)
run the tiles plainly; calls of T tokens or fewer (a decoding step) are one call, as before.
The per-token norms run the same way, in the same tiles: each decoder layer's norm modules (its leaf
children whose class is a LayerNorm or RMSNorm: input_layernorm, post_attention_layernorm, Gemma's and
OLMo2's pre/post_feedforward_layernorm, GPT-2's ln_1 / ln_2, ...) and the decoder's own beside the layer
list (the final norm). A norm's internals (transformers' RMSNorm keeps a float32 copy of its input and its
normalised output besides the output it returns) then exist for one tile; what stays whole is the norm's
output (the next module keeps it) and, under recomputation, its input (the tiles' checkpoints keep it).
Norms inside attention (q_norm, k_norm: per head) are left as they are. The result is the untiled
call's: each token's feed-forward (and norm) depends on that token alone, the tiles' outputs are put
back in token order (tensors shaped (batch, tokens, ...) concatenated on the tokens; tensors flattened
to (batch * tokens, ...), such as router logits, reassembled batch-major), and the forward hooks of the
module's submodules (transformers records MoE router logits with one on the router) fire once with the
whole call's inputs and outputs, not once per tile: `output_router_logits`
gives the untiled tuple, and the auxiliary loss transformers computes from it is the untiled one.

The module keeps its class (a subclass of it, with the same name: isinstance checks, parameter names and
state dicts are unchanged). A layer whose feed-forward cannot be found (OPT computes fc1/fc2 inline in the
decoder layer) is refused with a ValueError, never skipped; `tokens=0` leaves the model untiled.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

FFN_NAMES = (
    "mlp",
    "block_sparse_moe",
    "feed_forward",
    "mlp_block",
)  # a decoder layer's feed-forward, by transformers' names
NORM_KINDS = ("layernorm", "rmsnorm")  # a per-token norm, by its class name (lower case): LlamaRMSNorm, LayerNorm, ...
MIN_TILE = 256  # the automatic tile's floor (tokens)
_ATTR = "_ringwise_ffn_tile"


def tile_size(config) -> int:
    """The automatic tile: the model's hidden size in tokens (a tile's (tokens x intermediate) tensor is then
    the size of one (hidden x intermediate) weight matrix), at least MIN_TILE."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return max(int(text.hidden_size), MIN_TILE)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers: its outermost ModuleList of num_hidden_layers modules."""
    return _decoder_layers(model)[1]


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, module) of the model's decoder layers."""
    config: Any = model.config
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    n = text.num_hidden_layers
    found = [
        (name.count("."), name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n
    ]
    if not found:
        raise ValueError(
            f"{type(model).__name__}: no list of its {n} decoder layers found, so ringwise cannot tile its "
            "feed-forward; leave it untiled (ffn_tile=0, --ffn-tile 0)"
        )
    _, name, layers = min(found, key=lambda f: (f[0], f[1]))
    return name, layers


def feed_forward_modules(model: nn.Module) -> list[nn.Module]:
    """Each decoder layer's feed-forward module, in layer order (Nemotron-H's blocks: a `mixer` that is an MLP or
    MoE); a ValueError names a layer that has none, unless the model is a hybrid (hf_hybrids shards some of its
    layers), whose mixer-only and attention-only blocks have nothing to tile."""
    from .hf_hybrids import is_sharded_layer

    hybrid = any(is_sharded_layer(m) for m in model.modules())
    out = []
    for i, layer in enumerate(decoder_layers(model)):
        ffn = next((getattr(layer, n) for n in FFN_NAMES if isinstance(getattr(layer, n, None), nn.Module)), None)
        mixer = getattr(layer, "mixer", None)
        if ffn is None and isinstance(mixer, nn.Module) and type(mixer).__name__.endswith(("MLP", "MoE")):
            ffn = mixer
        if ffn is None and hybrid:
            continue
        if ffn is None:
            children = ", ".join(n for n, _ in layer.named_children())
            raise ValueError(
                f"{type(layer).__name__} (layer {i}) has no feed-forward module ({' / '.join(FFN_NAMES)}; its "
                f"children: {children}), so ringwise cannot tile its feed-forward; leave it untiled "
                "(ffn_tile=0, --ffn-tile 0)"
            )
        out.append(ffn)
    return out


def _is_norm(m: nn.Module) -> bool:
    return next(m.children(), None) is None and any(k in type(m).__name__.lower() for k in NORM_KINDS)


def norm_modules(model: nn.Module) -> list[nn.Module]:
    """The per-token norms tiled with the feed-forward: each decoder layer's leaf children that are norms
    (input_layernorm, post_attention_layernorm, pre/post_feedforward_layernorm, ...), in layer order, then
    those beside the layer list in its parent (the final norm). Norms inside attention are not included."""
    name, layers = _decoder_layers(model)
    parent = model.get_submodule(name.rpartition(".")[0])
    out = [m for layer in layers for m in layer.children() if _is_norm(m)]
    return out + [m for m in parent.children() if _is_norm(m)]


def tile_feed_forward(model: nn.Module, tokens: int | None = None) -> int:
    """Run every decoder layer's feed-forward and the per-token norms (norm_modules) over tiles of `tokens`
    local tokens in gradient forwards (see the module docstring). None: tile_size(model.config); 0: untiled
    again. Returns the tile (0: untiled). Idempotent; a second call sets the new tile."""
    if tokens is not None and tokens < 0:
        raise ValueError(f"ffn tile {tokens}: must be a positive number of tokens, or 0 (untiled)")
    if tokens == 0:
        for m in model.modules():
            if isinstance(m, _Tiled):
                m.__class__ = type(m).__bases__[1]  # the class it had: _tiled_class's bases are (_Tiled, cls)
                delattr(m, _ATTR)
        return 0
    tile = tile_size(model.config) if tokens is None else int(tokens)  # type: ignore[union-attr]
    for m in feed_forward_modules(model) + norm_modules(model):  # every layer's, or a ValueError before any change
        if not isinstance(m, _Tiled):
            m.__class__ = _tiled_class(type(m))
        setattr(m, _ATTR, tile)
    return tile


def ffn_tile_of(model: nn.Module) -> int:
    """The model's feed-forward tile (0: untiled)."""
    return next((getattr(m, _ATTR) for m in model.modules() if isinstance(m, _Tiled)), 0)


_CLASSES: dict[type, type] = {}


def _tiled_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(cls.__name__, (_Tiled, cls), {"__module__": cls.__module__})
    return _CLASSES[cls]


class _Tiled(nn.Module):
    """The tiled forward, mixed in front of a feed-forward module's (or a norm's) own class."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        inner = super().forward
        tile = getattr(self, _ATTR)
        x = next((a for a in (*args, *kwargs.values()) if torch.is_tensor(a)), None)
        if x is None or x.dim() < 3:  # (batch, tokens, hidden), or more per token (Gemma 4's per-layer inputs)
            raise ValueError(
                f"ringwise's tiled {type(self).__name__} was called without a (batch, tokens, ...) tensor "
                f"(got {None if x is None else tuple(x.shape)}); untile it (tile_feed_forward(model, 0))"
            )
        if x.shape[1] <= tile:
            return inner(*args, **kwargs)
        return _run_tiles(self, inner, tile, x, args, kwargs, recompute=_grad_needed(self, x))

    def extra_repr(self) -> str:
        base = super().extra_repr()
        return (
            f"{base}, ringwise_ffn_tile={getattr(self, _ATTR)}" if base else f"ringwise_ffn_tile={getattr(self, _ATTR)}"
        )


def _grad_needed(module: nn.Module, x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))


def _split(value: Any, batch: int, length: int, start: int, stop: int) -> Any:
    """A call argument's share of tokens [start, stop): tensors shaped (batch, length, ...) are sliced (copied
    where batch > 1 makes the slice non-contiguous: modules view their input flat)."""
    if torch.is_tensor(value) and value.dim() >= 2 and value.shape[0] == batch and value.shape[1] == length:
        return value[:, start:stop].contiguous()
    return value


class _Tile:
    """One tile's call of the module: with its submodules' forward hooks set aside (each records what it saw,
    on the first run only: checkpoint's recompute in backward records nothing), so they fire once, after
    the last tile, with the whole call's inputs and outputs."""

    def __init__(self, fn, hooked: list[nn.Module], seen: dict[nn.Module, list]):
        self.fn, self.hooked, self.seen, self.recording = fn, hooked, seen, True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        saved = [_take_hooks(m) for m in self.hooked]
        handles = []
        if self.recording:
            for m in self.hooked:
                handles.append(m.register_forward_hook(self._record, with_kwargs=True))
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.recording = False
            for h in handles:
                h.remove()
            for m, hooks in zip(self.hooked, saved):
                _put_hooks(m, hooks)

    def _record(self, module, args, kwargs, output):
        self.seen[module].append((args, kwargs, output))


_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


def _take_hooks(m: nn.Module) -> tuple:
    saved = tuple(getattr(m, d) for d in _HOOK_DICTS)
    for d in _HOOK_DICTS:
        setattr(m, d, OrderedDict())
    return saved


def _put_hooks(m: nn.Module, saved: tuple) -> None:
    for d, v in zip(_HOOK_DICTS, saved):
        setattr(m, d, v)


def _run_tiles(module: nn.Module, fn, tile: int, x: torch.Tensor, args: tuple, kwargs: dict, recompute: bool) -> Any:
    batch, length = x.shape[:2]
    inner_pre = [n for n, m in module.named_modules() if m is not module and m._forward_pre_hooks]
    if inner_pre:
        raise ValueError(
            f"ringwise cannot tile {type(module).__name__}: its submodules {inner_pre} have forward pre-hooks, "
            "which would run once per tile; untile it (tile_feed_forward(model, 0))"
        )
    hooked = [m for m in module.modules() if m is not module and m._forward_hooks]
    seen: dict[nn.Module, list] = {m: [] for m in hooked}
    outs, lengths = [], []
    for start in range(0, length, tile):
        stop = min(start + tile, length)
        part_args = tuple(_split(a, batch, length, start, stop) for a in args)
        part_kwargs = {k: _split(v, batch, length, start, stop) for k, v in kwargs.items()}
        call = _Tile(fn, hooked, seen)
        if recompute:  # only the tile's inputs are kept for backward, which runs it again
            outs.append(checkpoint(call, *part_args, use_reentrant=False, **part_kwargs))
        else:
            outs.append(call(*part_args, **part_kwargs))
        lengths.append(stop - start)
    where = type(module).__name__
    out = _merge(outs, batch, lengths, f"{where}'s output")
    for m in hooked:
        calls = seen[m]
        if len(calls) != len(lengths):
            raise ValueError(
                f"ringwise cannot tile {where}: its submodule {type(m).__name__} ran {len(calls)} times over "
                f"{len(lengths)} tiles, so its forward hooks cannot be given the untiled call"
            )
        what = f"{where}.{type(m).__name__}'s"
        m_args = _merge([c[0] for c in calls], batch, lengths, f"{what} inputs", strict=False)
        m_kwargs = _merge([c[1] for c in calls], batch, lengths, f"{what} keyword inputs", strict=False)
        m_out = _merge([c[2] for c in calls], batch, lengths, f"{what} output", strict=False)
        for hook_id, hook in list(m._forward_hooks.items()):
            if hook_id in m._forward_hooks_with_kwargs:
                result = hook(m, m_args, m_kwargs, m_out)
            else:
                result = hook(m, m_args, m_out)
            if result is not None:
                raise ValueError(
                    f"ringwise cannot tile {where}: a forward hook of {type(m).__name__} changes its output, "
                    "which the tiles have already used; untile it (tile_feed_forward(model, 0))"
                )
    return out


class NotMerged:
    """What a submodule's forward hook gets, in the untiled call's inputs or outputs, for a value the tiles
    cannot be put back together from (an expert count per tile, token indices sorted within a tile): any
    use of it raises. transformers' router-logit recorders read only the logits, which merge exactly."""

    def __init__(self, what: str):
        self._what = what

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        self._refuse()

    def _refuse(self):
        raise ValueError(
            f"ringwise's tiled feed-forward cannot give a forward hook {self._what} of the untiled call (it "
            "depends on how the tokens were tiled); untile the model (tile_feed_forward(model, 0), --ffn-tile 0)"
        )

    def __repr__(self) -> str:
        return f"NotMerged({self._what})"


for _op in ("getitem", "iter", "len", "bool", "add", "mul", "sub", "truediv", "eq", "float", "int", "index"):
    setattr(NotMerged, f"__{_op}__", lambda self, *a, **k: self._refuse())


def _merge(parts: list, batch: int, lengths: list[int], what: str, strict: bool = True) -> Any:
    """The tiles' values of one output (or input) put back as the untiled call's: floating-point tensors with
    the tokens on dim 1 concatenated there, those flattened to (batch * tokens, features) reassembled
    batch-major, other values only when identical in every tile. Anything else raises (strict: the module's
    own output) or becomes a NotMerged (a submodule's, for its hooks: integer tensors and 1-D ones may hold
    positions inside the tile, or be sorted within it)."""
    first = parts[0]
    if all(p is first for p in parts):
        return first
    if torch.is_tensor(first) and all(torch.is_tensor(p) for p in parts):
        floats = all(p.is_floating_point() for p in parts)
        if floats and all(p.dim() >= 2 and p.shape[:2] == (batch, t) for p, t in zip(parts, lengths)):
            return torch.cat(parts, 1)
        if floats and all(p.dim() >= 2 and p.shape[0] == batch * t for p, t in zip(parts, lengths)):
            return torch.cat([p.reshape(batch, t, *p.shape[1:]) for p, t in zip(parts, lengths)], 1).flatten(0, 1)
        why = f"has shapes {[tuple(p.shape) for p in parts]} ({first.dtype}) over tiles of {lengths} tokens"
    elif isinstance(first, (tuple, list)) and all(type(p) is type(first) and len(p) == len(first) for p in parts):
        merged = [_merge([p[i] for p in parts], batch, lengths, f"{what}[{i}]", strict) for i in range(len(first))]
        return type(first)(merged) if isinstance(first, list) or type(first) is tuple else type(first)(*merged)
    elif isinstance(first, dict) and all(isinstance(p, dict) and p.keys() == first.keys() for p in parts):
        return {k: _merge([p[k] for p in parts], batch, lengths, f"{what}[{k!r}]", strict) for k in first}
    elif all(not torch.is_tensor(p) and type(p) is type(first) and p == first for p in parts):
        return first
    else:
        why = f"differs between the tiles ({type(first).__name__})"
    if not strict:
        return NotMerged(what)
    raise ValueError(
        f"ringwise cannot tile the feed-forward exactly: {what} {why} (batch {batch}), with no token "
        "dimension to put the tiles back on; untile it (tile_feed_forward(model, 0), --ffn-tile 0)"
    )
