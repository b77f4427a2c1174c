"""Reading a transformers mask function as ring arguments (causal, sliding window).

transformers (masking_utils) builds every mask function from a few factories:
causal_mask_function, sliding_window_overlay(w), and_masks(...), and, when it reads the
position ids as packed sequences, remap_positions_for_packed_sequence(f, position_ids) and
packed_sequence_mask_function(ids) (transformers 4.54-4.57 pack without the remap: the packed
ids are then returned for the caller to check). Every closure a factory returns shares that factory's
code object, so each part is recognised by code identity and its captured values are read
from its closure cells: nothing is guessed from names or by probing the mask. Anything
else (chunked, OR overlays for bidirectional blocks or image tokens, custom functions) is
reported as not understood, never dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch


@dataclass(frozen=True)
class MaskSpec:
    """What a causal mask function asks for, in transformers' terms."""

    window: int | None  # transformers' sliding_window: keys seen per query, the query itself included
    position_ids: torch.Tensor | None  # the ids a packed-sequence remap evaluates the mask on, if any
    packed_ids: torch.Tensor | None = None  # transformers < 5 (no remap): the document index it read per token


@lru_cache(maxsize=None)
def _factory_codes() -> dict:
    """The code object of each masking_utils factory's closure (missing factories skipped)."""
    from transformers import masking_utils as mu

    f = mu.causal_mask_function
    makers = dict(
        and_masks=lambda: mu.and_masks(f),
        sliding_window=lambda: mu.sliding_window_overlay(1),
        # made for their closures' code only, never called: no tensor needed
        remap=lambda: mu.remap_positions_for_packed_sequence(f, None),  # type: ignore[arg-type]
        packed=lambda: mu.packed_sequence_mask_function(None),  # type: ignore[arg-type]
    )
    codes = {}
    for name, make in makers.items():
        try:
            codes[make().__code__] = name
        except AttributeError:  # an older transformers without this factory
            pass
    return codes


def _cells(fn) -> dict:
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ())))


def _name(fn) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def read_mask_function(mask_function) -> MaskSpec:
    """The causal / sliding-window mask that `mask_function` describes; ValueError if it is anything else."""
    from transformers.masking_utils import causal_mask_function

    codes = _factory_codes()
    causal, packed, windows, position_ids, packed_ids = False, False, [], None, None
    todo = [mask_function]
    while todo:  # the function is an AND of its parts: collect them all
        fn = todo.pop()
        kind = codes.get(getattr(fn, "__code__", None))
        if fn is causal_mask_function:
            causal = True
        elif kind == "and_masks":
            todo.extend(_cells(fn)["mask_functions"])
        elif kind == "sliding_window":
            windows.append(int(_cells(fn)["sliding_window"]))
        elif kind == "remap":
            cells = _cells(fn)
            if position_ids is not None:
                raise ValueError("the mask remaps positions twice")
            position_ids = cells["position_ids"]
            todo.append(cells["mask_function"])
        elif kind == "packed":
            packed = True
            packed_ids = _cells(fn)["packed_sequence_mask"]
        else:
            raise ValueError(
                f"the model asked for a mask ringwise cannot reproduce exactly ({_name(fn)}: e.g. chunked attention, "
                "bidirectional or image-token blocks, or a custom mask function); ringwise applies causal, "
                "sliding-window and document (ringwise_cu_seqlens) masks only"
            )
    if not causal:
        raise ValueError(
            "the model asked for a non-causal mask; ringwise's transformers integration runs causal decoders only"
        )
    if "remap" not in codes.values():  # a transformers that packs without remapping positions
        return MaskSpec(window=min(windows) if windows else None, position_ids=None, packed_ids=packed_ids)
    if packed != (position_ids is not None):
        raise ValueError(
            "the model built a packed-sequence mask without its position remap (or the reverse); "
            "ringwise cannot tell which tokens it separates"
        )
    return MaskSpec(window=min(windows) if windows else None, position_ids=position_ids)
