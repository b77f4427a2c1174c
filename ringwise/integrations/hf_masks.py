"""Reading a transformers mask function as ring arguments.

transformers (masking_utils) builds every mask function from a few factories: causal_mask_function,
bidirectional_mask_function, sliding_window_overlay(w), sliding_window_bidirectional_overlay(w),
chunked_overlay(chunk_size, left_padding), blockwise_overlay(block_sequence_ids), and_masks(...),
or_masks(...) and, when it reads the position ids as packed sequences,
remap_positions_for_packed_sequence(f, position_ids) and packed_sequence_mask_function(ids)
(transformers 4.54-4.57 pack without the remap: the packed ids are then returned for the caller to
check). A few models add closures of their own (Gemma 3: a bidirectional window overlay and the
always-true function of EmbeddingGemma's full layers). Every closure a factory returns shares that
factory's code object, so each part is recognised by code identity and its captured values are read
from its closure cells: nothing is guessed from names or by probing the mask. Anything else (custom
functions, compositions the op cannot express) is reported as not understood, never dropped.

Under torch.compile the closures are built inside the graph, where Dynamo cannot read a closure's cells.
tag_mask_factories() therefore wraps each factory (in masking_utils and wherever a model module imported it)
so that the closure it returns also carries its kind and arguments as an attribute, which Dynamo reads; the
closure itself is the factory's, unchanged. The reader prefers that tag and falls back to the cells.

The parts are folded into one normal form, in offsets d = key - query (global positions):

    visible = (d in band  or  (same block  and  d in group_band))  and  same chunk  and  same packed sequence

which is the op's mask when the band is causal (d <= 0, a left bound for a sliding window) or holds
the diagonal on both sides (causal=False, window=(left, right)), the blocks become the op's
group_ids (built by rw.shard_batch from the global token types; the block ids the model built
from this rank's shard are only checked against them) and the chunk its chunk=.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass, field
from types import CodeType
from typing import NamedTuple

import torch

# A band of key offsets d = key - query: (lo, hi), d in [lo, hi], None unbounded on that side. Plain tuples, and a
# NamedTuple for the folded form: the mask hook runs inside torch.compile's graph (fullgraph), where Dynamo cannot
# wrap instances of small classes of their own (dataclasses whose defaults are such instances).
Band = tuple[int | None, int | None]
FULL: Band = (None, None)
NOTHING: Band = (0, -1)


def _empty(b: Band) -> bool:
    return b[0] is not None and b[1] is not None and b[0] > b[1]


def _band_and(a: Band, b: Band) -> Band:
    lo = a[0] if b[0] is None else b[0] if a[0] is None else max(a[0], b[0])
    hi = a[1] if b[1] is None else b[1] if a[1] is None else min(a[1], b[1])
    return (lo, hi)


def _band_union(a: Band, b: Band) -> Band | None:
    """The union if it is one interval, else None."""
    if _empty(a):
        return b
    if _empty(b):
        return a
    if not _covers(a, b):
        return None  # a gap between the two
    return (
        None if a[0] is None or b[0] is None else min(a[0], b[0]),
        None if a[1] is None or b[1] is None else max(a[1], b[1]),
    )


def _covers(a: Band, b: Band) -> bool:
    """Whether the intervals a and b overlap or touch (integers)."""
    lo = max(-(10**18) if a[0] is None else a[0], -(10**18) if b[0] is None else b[0])
    hi = min(10**18 if a[1] is None else a[1], 10**18 if b[1] is None else b[1])
    return lo <= hi + 1


def _band_text(b: Band) -> str:
    return f"{b[0]}..{b[1]}"


class _Form(NamedTuple):
    """A mask function folded: (d in band or (same block and d in group_band)) and same chunk and same sequence."""

    band: Band = FULL
    blocks: torch.Tensor | None = None  # the block ids a blockwise overlay captured (this rank's tokens)
    group_band: Band = FULL
    chunk: int | None = None
    left_padding: torch.Tensor | None = None
    packed_ids: torch.Tensor | None = None
    sizes: tuple[int, ...] = ()  # the window and chunk sizes the overlays carry (sdpa's local_size is one of them)


def _pure_blocks(f: _Form) -> bool:
    return _empty(f.band) and f.blocks is not None and f.chunk is None and f.packed_ids is None


def _and(a: _Form, b: _Form) -> _Form:
    if a.blocks is not None and b.blocks is not None:
        raise ValueError("the mask intersects two block overlays")
    if b.blocks is not None:
        a, b = b, a
    if a.chunk is not None and b.chunk is not None and a.chunk != b.chunk:
        raise ValueError(f"the mask intersects chunks of {a.chunk} and of {b.chunk} tokens")
    if a.packed_ids is not None and b.packed_ids is not None:
        raise ValueError("the mask intersects two packed-sequence masks")
    return _Form(
        band=_band_and(a.band, b.band),
        blocks=a.blocks,
        group_band=_band_and(a.group_band, b.band) if a.blocks is not None else FULL,
        chunk=a.chunk if a.chunk is not None else b.chunk,
        left_padding=a.left_padding if a.left_padding is not None else b.left_padding,
        packed_ids=a.packed_ids if a.packed_ids is not None else b.packed_ids,
        sizes=a.sizes + b.sizes,
    )


def _or(a: _Form, b: _Form) -> _Form:
    if a.blocks is not None and b.blocks is not None:
        raise ValueError("the mask joins two block overlays")
    if _pure_blocks(a) or _pure_blocks(b):
        # (rest) or (same block and d in group_band): the op keeps a group inside its document and chunk, and
        # refuses a group that crosses either, so the rest's chunk and sequences may stand outside the OR
        groups, rest = (a, b) if _pure_blocks(a) else (b, a)
        return _Form(
            band=rest.band,
            blocks=groups.blocks,
            group_band=groups.group_band,
            chunk=rest.chunk,
            left_padding=rest.left_padding,
            packed_ids=rest.packed_ids,
            sizes=rest.sizes + groups.sizes,
        )
    if a.chunk is not None or a.packed_ids is not None or b.chunk is not None or b.packed_ids is not None:
        raise ValueError("the mask joins a chunked or packed-sequence mask with another mask")
    band = _band_union(a.band, b.band)
    if band is None:
        raise ValueError(
            f"the mask joins two windows with a gap between them (key offsets {_band_text(a.band)} or "
            f"{_band_text(b.band)})"
        )
    blocks = a if a.blocks is not None else b
    return _Form(band=band, blocks=blocks.blocks, group_band=blocks.group_band, sizes=a.sizes + b.sizes)


@dataclass(frozen=True)
class MaskSpec:
    """What a mask function asks for, as the op's arguments (offsets in global positions)."""

    causal: bool = True
    left: int | None = None  # keys at most `left` positions before the query (None: any)
    right: int | None = 0  # keys at most `right` positions after it (None: any; 0 when causal)
    chunk: int | None = None  # attention within chunks of `chunk` positions (Llama 4)
    left_padding: torch.Tensor | None = None  # what chunked_overlay shifts its chunks by (must be 0)
    blocks: torch.Tensor | None = None  # the block ids the model built on this rank's tokens (None: no groups)
    group_reach: int | None = None  # tokens of one group farther apart than this do not see each other (None: any)
    sizes: tuple[int, ...] = ()
    position_ids: torch.Tensor | None = None  # the ids a packed-sequence remap evaluates the mask on, if any
    packed_ids: torch.Tensor | None = field(default=None)  # transformers < 5 (no remap): the document ids it read

    @property
    def window(self) -> int | None:
        """transformers' sliding_window for this mask: keys within reach on the left, the query included."""
        return None if self.left is None else self.left + 1


def _model_parts() -> dict:
    """Code objects of the mask closures some models build themselves -> what each is."""
    parts: dict = {}
    try:
        from transformers.models.gemma3 import modeling_gemma3 as g3
    except ImportError:  # an older transformers
        return parts
    overlay = getattr(g3, "_bidirectional_window_overlay", None)
    if overlay is not None:  # |q - k| < sliding_window (EmbeddingGemma's sliding layers)
        parts[overlay(1).__code__] = "bidirectional_window_exclusive"
    text_model = getattr(g3, "Gemma3TextModel", None)
    if text_model is not None:  # `lambda *args: torch.tensor(True)`: EmbeddingGemma's full layers, or-ed with causal
        forward = inspect.unwrap(text_model.forward)
        for const in forward.__code__.co_consts:
            if inspect.iscode(const) and const.co_name == "<lambda>":
                parts[const] = "everything"
    return parts


_codes: tuple[tuple[CodeType, str], ...] | None = None  # factory_codes()'s table, made once


def factory_codes() -> tuple[tuple[CodeType, str], ...]:
    """(code object, what it is) of each masking_utils factory's closure (missing factories skipped) and of the
    models' own mask closures, made on the first call.

    transformers.register() makes it, so that the mask hook finds it made when torch.compile traces it: building
    it (closures, imports, inspect) stays out of the graph (Dynamo traces through functools.lru_cache). Pairs,
    not a dict: Dynamo cannot guard a global dict keyed by code objects."""
    global _codes
    if _codes is None:
        _codes = tuple(_make_factory_codes().items())
    return _codes


def _kind(codes: tuple[tuple[CodeType, str], ...], fn) -> str | None:
    """What `fn` is: its tag's kind, else by its code object's identity (None: not a closure the reader knows)."""
    tag = getattr(fn, _TAG, None)
    if tag is not None:
        return tag[0]
    code = getattr(fn, "__code__", None)
    for c, kind in codes:
        if c is code:
            return kind
    return None


def _make_factory_codes() -> dict:
    """{code object: what it is} for factory_codes()."""
    from transformers import masking_utils as mu

    f = mu.causal_mask_function
    makers = dict(
        and_masks=lambda: mu.and_masks(f),
        or_masks=lambda: mu.or_masks(f),
        sliding_window=lambda: mu.sliding_window_overlay(1),
        bidirectional_window=lambda: mu.sliding_window_bidirectional_overlay(1),
        # made for their closures' code only, never called: no tensor needed
        chunked=lambda: _chunked_overlay(mu),
        blockwise=lambda: mu.blockwise_overlay(None),  # type: ignore[arg-type]
        remap=lambda: mu.remap_positions_for_packed_sequence(f, None),  # type: ignore[arg-type]
        packed=lambda: mu.packed_sequence_mask_function(None),  # type: ignore[arg-type]
    )
    codes = {}
    for name, make in makers.items():
        try:
            codes[make().__code__] = name
        except (AttributeError, TypeError):  # an older transformers without this factory (or another signature)
            pass
    codes.update(_model_parts())
    return codes


def _chunked_overlay(mu):
    """A chunked_overlay closure: (chunk_size, left_padding) from 4.54, (chunk_size) before."""
    try:
        return mu.chunked_overlay(1, None)
    except TypeError:
        return mu.chunked_overlay(1)


_TAG = "__ringwise_mask_part__"  # (kind, the factory's arguments by name) on a closure a tagged factory made
_ORIGINAL = "__ringwise_untagged__"  # on a tagged factory: the factory it wraps


def _tagged(kind: str, factory, names: tuple[str, ...], varargs: str | None):
    """`factory`, returning closures that carry (kind, {argument name: value}) as _TAG."""

    def tagged(*args, **kwargs):
        fn = factory(*args, **kwargs)
        cells = {varargs: args} if varargs is not None else dict(zip(names, args))
        cells.update(kwargs)
        setattr(fn, _TAG, (kind, cells))
        return fn

    setattr(tagged, _ORIGINAL, factory)
    tagged.__name__, tagged.__qualname__, tagged.__doc__ = factory.__name__, factory.__qualname__, factory.__doc__
    return tagged


def _factories() -> dict[str, tuple[object, str]]:
    """{factory attribute name: (module, kind)} of the factories whose closures the reader knows."""
    from transformers import masking_utils as mu

    found: dict[str, tuple[object, str]] = {}
    for name, kind in (
        ("and_masks", "and_masks"),
        ("or_masks", "or_masks"),
        ("sliding_window_overlay", "sliding_window"),
        ("sliding_window_bidirectional_overlay", "bidirectional_window"),
        ("chunked_overlay", "chunked"),
        ("blockwise_overlay", "blockwise"),
        ("remap_positions_for_packed_sequence", "remap"),
        ("packed_sequence_mask_function", "packed"),
    ):
        if hasattr(mu, name):
            found[name] = (mu, kind)
    g3 = sys.modules.get("transformers.models.gemma3.modeling_gemma3")
    if g3 is not None and hasattr(g3, "_bidirectional_window_overlay"):
        found["_bidirectional_window_overlay"] = (g3, "bidirectional_window_exclusive")
    return found


def tag_mask_factories() -> None:
    """Wrap the mask factories (tagged closures, module docstring) in masking_utils and in every loaded
    transformers module that imported them by name. Idempotent; call it outside any compiled graph, after the
    model's module is imported (register() and check_model() do)."""
    factories = _factories()
    for name, (module, kind) in factories.items():
        current = getattr(module, name)
        original = getattr(current, _ORIGINAL, current)
        params = inspect.signature(original).parameters.values()
        varargs = next((p.name for p in params if p.kind is inspect.Parameter.VAR_POSITIONAL), None)
        names = tuple(p.name for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL)
        tagged = current if current is not original else _tagged(kind, original, names, varargs)
        for mod_name, mod in list(sys.modules.items()):
            if mod_name.startswith("transformers") and getattr(mod, name, None) is original:
                setattr(mod, name, tagged)


def _cells(fn) -> dict:
    """A known closure's captured values by name: its tag's (readable under torch.compile), else its cells."""
    tag = getattr(fn, _TAG, None)
    if tag is not None:
        return tag[1]
    if torch.compiler.is_compiling():
        raise ValueError(
            f"under torch.compile ringwise cannot read the mask closure {_name(fn)} (a factory it did not tag: "
            "build the model through ringwise.integrations.transformers, or run it uncompiled)"
        )
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ())))


def _name(fn) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


class _Reader:
    def __init__(self):
        from transformers import masking_utils as mu

        self.codes = factory_codes()
        self.causal = mu.causal_mask_function
        self.everything = getattr(mu, "bidirectional_mask_function", None)
        self.position_ids: torch.Tensor | None = None
        self.remapped = False
        self.packed = False

    def read(self, fn) -> _Form:
        kind = _kind(self.codes, fn)
        if fn is self.causal:
            return _Form(band=(None, 0))
        if (self.everything is not None and fn is self.everything) or kind == "everything":
            return _Form()
        if kind == "and_masks" or kind == "or_masks":
            parts = [self.read(g) for g in _cells(fn)["mask_functions"]]
            if not parts:
                raise ValueError(f"the model composed an empty {kind} mask")
            form = parts[0]
            for p in parts[1:]:
                form = _and(form, p) if kind == "and_masks" else _or(form, p)
            return form
        if kind == "sliding_window":  # kv > q - w
            w = int(_cells(fn)["sliding_window"])
            return _Form(band=(1 - w, None), sizes=(w,))
        if kind == "bidirectional_window":  # |q - kv| <= w
            w = int(_cells(fn)["sliding_window"])
            return _Form(band=(-w, w), sizes=(w,))
        if kind == "bidirectional_window_exclusive":  # |q - kv| < w
            w = int(_cells(fn)["sliding_window"])
            return _Form(band=(1 - w, w - 1), sizes=(w,))
        if kind == "chunked":
            cells = _cells(fn)
            c = int(cells["chunk_size"])
            return _Form(chunk=c, left_padding=cells.get("left_padding"), sizes=(c,))
        if kind == "blockwise":
            return _Form(band=NOTHING, blocks=_cells(fn)["block_sequence_ids"])
        if kind == "remap":
            cells = _cells(fn)
            if self.remapped:
                raise ValueError("the mask remaps positions twice")
            self.remapped, self.position_ids = True, cells["position_ids"]
            return self.read(cells["mask_function"])
        if kind == "packed":
            self.packed = True
            return _Form(packed_ids=_cells(fn)["packed_sequence_mask"])
        raise ValueError(
            f"the model asked for a mask ringwise cannot reproduce exactly ({_name(fn)}: a custom mask function, "
            "or one this transformers builds in its own way); ringwise applies causal, bidirectional, sliding-window "
            "(one- or two-sided), chunked, block-group (rw.shard_batch's group ids) and document (ringwise_cu_seqlens) "
            "masks"
        )


def read_mask_function(mask_function) -> MaskSpec:
    """The ring arguments that `mask_function` describes; ValueError (with the reason) if the op cannot express it."""
    reader = _Reader()
    form = reader.read(mask_function)
    lo, hi = form.band
    if _empty(form.band):
        raise ValueError(f"the mask leaves no key visible (key offsets {lo}..{hi}, e.g. a window of 0 tokens)")
    if hi is not None and hi < 0 or lo is not None and lo > 0:
        raise ValueError(
            f"the mask hides the query's own position (key offsets {lo}..{hi}); the ring's windows hold it"
        )
    causal = hi == 0
    left = None if lo is None else -lo
    reach = None
    if form.blocks is not None:
        if not causal:
            raise ValueError(
                "the mask joins block groups to attention that is not causal; ringwise's groups add keys to causal "
                "attention only"
            )
        g_lo, g_hi = form.group_band
        reach = g_hi if g_lo is None else -g_lo if g_hi is None else min(-g_lo, g_hi)
    packed_ids = position_ids = None
    if not any(kind == "remap" for _, kind in reader.codes):  # a transformers that packs without remapping positions
        packed_ids = form.packed_ids
    elif reader.packed != reader.remapped:
        raise ValueError(
            "the model built a packed-sequence mask without its position remap (or the reverse); "
            "ringwise cannot tell which tokens it separates"
        )
    else:
        position_ids = reader.position_ids
    return MaskSpec(
        causal=causal,
        left=left,
        right=0 if causal else hi,
        chunk=form.chunk,
        left_padding=form.left_padding,
        blocks=form.blocks,
        group_reach=reach,
        sizes=form.sizes,
        position_ids=position_ids,
        packed_ids=packed_ids,
    )


# -------------------------------------------------------------- block groups from the global token types


def block_ids(model, types: torch.Tensor) -> torch.Tensor:
    """The block ids (batch, seq) `model` builds for its blockwise mask from per-token types (token_type_ids or
    mm_token_type_ids), computed on the types given: rw.shard_batch passes the global ones. The model's own
    rule: its modeling module's get_block_sequence_ids_for_mask (Gemma 3: each run of image tokens, type 1,
    is a group), or PaliGemma's prefix (every token of type 0 in group 0, as PaliGemmaModel.forward writes it)."""
    module = sys.modules.get(type(model).__module__)
    rule = getattr(module, "get_block_sequence_ids_for_mask", None)
    if rule is not None:
        return rule(types, device=types.device)
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) == "paligemma":
        return torch.where(types == 0, 0, -1)
    raise ValueError(
        f"ringwise does not know how {type(model).__name__} groups its tokens for its blockwise mask "
        "(no get_block_sequence_ids_for_mask in its modeling module); pass no token types for it"
    )


def global_group_ids(model, types: torch.Tensor) -> torch.Tensor:
    """The op's group_ids (global seq,) from the global (batch, seq) token types: every row must give the same."""
    if types.dim() != 2:
        raise ValueError(f"token types must be (batch, seq), got shape {tuple(types.shape)}")
    ids = block_ids(model, types).to(torch.int64)
    if not bool((ids == ids[:1]).all()):
        raise ValueError(
            "the rows of the batch group their tokens differently (images or prefixes at other places); ringwise's "
            "group ids are one per global position: shard a batch whose rows share them, or one row at a time"
        )
    return ids[0].clone()


def group_problem(
    spec: MaskSpec, group_ids: torch.Tensor | None, positions: torch.Tensor, grouped_elsewhere: bool = False
) -> str | None:
    """What is wrong with running the layer's mask `spec` with the global `group_ids` on this rank's tokens at
    global `positions`, if anything (reads tensor values: not under torch.compile). grouped_elsewhere: another mask
    the model built in this forward has a block overlay (Gemma 4 groups image tokens on its sliding layers only: its
    full layers' causal mask is theirs as built, and runs without the groups)."""
    if spec.blocks is None:
        if group_ids is not None and not grouped_elsewhere and bool((group_ids >= 0).any()):
            return (
                "ringwise_group_ids name groups of tokens, but this layer's mask has no block overlay (a model that "
                "was not given the token types, or one that does not group its tokens)"
            )
        return None
    if group_ids is None:
        return (
            "the model's mask lets groups of tokens see each other (image tokens, a prefix: a blockwise overlay "
            "built from its token types); give every rank the global groups: rw.shard_batch(..., token_type_ids=..., "
            "model=model) returns them as ringwise_group_ids beside this rank's token types"
        )
    if torch.compiler.is_compiling():
        return (
            "under torch.compile ringwise cannot compare the block groups the model built with rw.shard_batch's "
            "(their values cannot be read in a graph); run block-group models without torch.compile"
        )
    n = positions.shape[0]
    local = spec.blocks[..., :n].to(group_ids.device)
    if local.shape[-1] != n or group_ids.dim() != 1:
        return "ringwise_group_ids must be rw.shard_batch's: one id per global position"
    wanted = (group_ids.to(torch.int64)[positions.to(group_ids.device)] >= 0)[None]
    if not bool(((local >= 0) == wanted).all()):
        return (
            "the tokens this rank's model groups (its token types) are not those of rw.shard_batch's "
            "ringwise_group_ids at this rank's positions: pass the token types rw.shard_batch returned"
        )
    if spec.group_reach is not None:
        ids = group_ids.to(torch.int64).cpu()
        cuts = (torch.nonzero(ids[1:] != ids[:-1]).flatten() + 1).tolist()
        starts, stops = [0] + cuts, cuts + [ids.numel()]
        longest = max((b - a for a, b in zip(starts, stops) if int(ids[a]) >= 0), default=0)
        if longest - 1 > spec.group_reach:
            return (
                f"a group of {longest} tokens is longer than the layer's window ({spec.group_reach + 1} tokens): "
                "the model hides the group's far tokens from each other there, ringwise's groups see their whole "
                "group; use groups no longer than the sliding window"
            )
    return None
