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
from dataclasses import dataclass, field, replace
from functools import lru_cache

import torch


@dataclass(frozen=True)
class Band:
    """Key offsets d = key - query in [lo, hi] (None: unbounded on that side)."""

    lo: int | None = None
    hi: int | None = None

    @property
    def empty(self) -> bool:
        return self.lo is not None and self.hi is not None and self.lo > self.hi

    def __and__(self, other: Band) -> Band:
        los = [x for x in (self.lo, other.lo) if x is not None]
        his = [x for x in (self.hi, other.hi) if x is not None]
        return Band(max(los) if los else None, min(his) if his else None)

    def union(self, other: Band) -> Band | None:
        """The union if it is one interval, else None."""
        if self.empty:
            return other
        if other.empty:
            return self
        if not _covers(self, other):
            return None  # a gap between the two
        return Band(
            None if self.lo is None or other.lo is None else min(self.lo, other.lo),
            None if self.hi is None or other.hi is None else max(self.hi, other.hi),
        )


def _covers(a: Band, b: Band) -> bool:
    """Whether the intervals a and b overlap or touch (integers)."""
    lo = max(x if x is not None else -(10**18) for x in (a.lo, b.lo))
    hi = min(x if x is not None else 10**18 for x in (a.hi, b.hi))
    return lo <= hi + 1


FULL, NOTHING = Band(), Band(0, -1)


@dataclass(frozen=True)
class _Form:
    """A mask function folded: (d in band or (same block and d in group_band)) and same chunk and same sequence."""

    band: Band = FULL
    blocks: torch.Tensor | None = None  # the block ids a blockwise overlay captured (this rank's tokens)
    group_band: Band = FULL
    chunk: int | None = None
    left_padding: torch.Tensor | None = None
    packed_ids: torch.Tensor | None = None
    sizes: tuple[int, ...] = ()  # the window and chunk sizes the overlays carry (sdpa's local_size is one of them)

    @property
    def pure_blocks(self) -> bool:
        return self.band.empty and self.blocks is not None and self.chunk is None and self.packed_ids is None


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
        band=a.band & b.band,
        blocks=a.blocks,
        group_band=a.group_band & b.band if a.blocks is not None else FULL,
        chunk=a.chunk if a.chunk is not None else b.chunk,
        left_padding=a.left_padding if a.left_padding is not None else b.left_padding,
        packed_ids=a.packed_ids if a.packed_ids is not None else b.packed_ids,
        sizes=a.sizes + b.sizes,
    )


def _or(a: _Form, b: _Form) -> _Form:
    if a.blocks is not None and b.blocks is not None:
        raise ValueError("the mask joins two block overlays")
    if a.pure_blocks or b.pure_blocks:
        # (rest) or (same block and d in group_band): the op keeps a group inside its document and chunk, and
        # refuses a group that crosses either, so the rest's chunk and sequences may stand outside the OR
        groups, rest = (a, b) if a.pure_blocks else (b, a)
        return replace(rest, blocks=groups.blocks, group_band=groups.group_band, sizes=rest.sizes + groups.sizes)
    if any(f.chunk is not None or f.packed_ids is not None for f in (a, b)):
        raise ValueError("the mask joins a chunked or packed-sequence mask with another mask")
    band = a.band.union(b.band)
    if band is None:
        raise ValueError(f"the mask joins two windows with a gap between them ({a.band} or {b.band})")
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


@lru_cache(maxsize=None)
def _factory_codes() -> dict:
    """The code object of each masking_utils factory's closure (missing factories skipped)."""
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


def _cells(fn) -> dict:
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ())))


def _name(fn) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


class _Reader:
    def __init__(self):
        from transformers import masking_utils as mu

        self.codes = _factory_codes()
        self.causal = mu.causal_mask_function
        self.everything = getattr(mu, "bidirectional_mask_function", None)
        self.position_ids: torch.Tensor | None = None
        self.remapped = False
        self.packed = False

    def read(self, fn) -> _Form:
        kind = self.codes.get(getattr(fn, "__code__", None))
        if fn is self.causal:
            return _Form(band=Band(None, 0))
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
            return _Form(band=Band(1 - w, None), sizes=(w,))
        if kind == "bidirectional_window":  # |q - kv| <= w
            w = int(_cells(fn)["sliding_window"])
            return _Form(band=Band(-w, w), sizes=(w,))
        if kind == "bidirectional_window_exclusive":  # |q - kv| < w
            w = int(_cells(fn)["sliding_window"])
            return _Form(band=Band(1 - w, w - 1), sizes=(w,))
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
    band = form.band
    if band.empty:
        raise ValueError(
            f"the mask leaves no key visible (key offsets {band.lo}..{band.hi}, e.g. a window of 0 tokens)"
        )
    if band.hi is not None and band.hi < 0 or band.lo is not None and band.lo > 0:
        raise ValueError(
            f"the mask hides the query's own position (key offsets {band.lo}..{band.hi}); the ring's windows hold it"
        )
    causal = band.hi == 0
    left = None if band.lo is None else -band.lo
    reach = None
    if form.blocks is not None:
        if not causal:
            raise ValueError(
                "the mask joins block groups to attention that is not causal; ringwise's groups add keys to causal "
                "attention only"
            )
        g = form.group_band
        reaches = [x for x in (None if g.lo is None else -g.lo, g.hi) if x is not None]
        reach = min(reaches) if reaches else None
    spec = MaskSpec(
        causal=causal,
        left=left,
        right=0 if causal else band.hi,
        chunk=form.chunk,
        left_padding=form.left_padding,
        blocks=form.blocks,
        group_reach=reach,
        sizes=form.sizes,
    )
    if "remap" not in reader.codes.values():  # a transformers that packs without remapping positions
        return replace(spec, packed_ids=form.packed_ids)
    if reader.packed != reader.remapped:
        raise ValueError(
            "the model built a packed-sequence mask without its position remap (or the reverse); "
            "ringwise cannot tell which tokens it separates"
        )
    return replace(spec, position_ids=reader.position_ids)


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


def group_problem(spec: MaskSpec, group_ids: torch.Tensor | None, positions: torch.Tensor) -> str | None:
    """What is wrong with running the layer's mask `spec` with the global `group_ids` on this rank's tokens at
    global `positions`, if anything (reads tensor values: not under torch.compile)."""
    if spec.blocks is None:
        if group_ids is not None and bool((group_ids >= 0).any()):
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
