"""Exact merge of two attention results over disjoint key sets.

    lse = logaddexp(lse_a, lse_b)
    o   = o_a + sigmoid(lse_b - lse_a) * (o_b - o_a)       (a lerp, in place)

kept in float32 (float64 for float64 inputs). A row that has seen no key has lse = -inf
and o = 0; merging two such rows must stay 0, never NaN. A NaN on either side stays NaN
(a NaN input must never come back as a finite output).
"""

from __future__ import annotations

import torch


def merge_into(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """Fold (block_out, block_lse) into the accumulators (out, lse) in place.

    out: (..., rows, d) accumulator, float32/64; lse: (..., rows). Views of larger
    accumulators are fine, so a tile that covers some rows updates just those.
    """
    block_lse = block_lse.to(lse.dtype)
    # A block with lse = -inf adds nothing: weight 0 (sigmoid(b - a) would be NaN when a is
    # -inf too). Any other NaN is real and propagates.
    weight = torch.sigmoid(block_lse - lse).masked_fill_(torch.isneginf(block_lse), 0.0)
    out.lerp_(block_out.to(out.dtype), weight.unsqueeze(-1))
    lse.copy_(torch.logaddexp(lse, block_lse))
