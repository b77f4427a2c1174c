"""MiniMax's lightning attention (transformers' MiniMaxLightningAttention) sharded over the ring.

The layer is linear attention with one constant decay per head (its `slope_rate` s): per head a (head_dim x
head_dim) state S_t = exp(-s) S_{t-1} + k_t v_t^T and out_t = q_t S_t, on q, k, v = act(qkv_proj(x)). transformers
computes it inline in the layer's forward, block by block (`block_size` tokens: within a block through the
`diagonal_decay` mask, across blocks through the state, scaled by `query_decay`, `key_decay` and the block's decay
exp(-s * block)), so there is no module function to swap: `run_lightning` computes the layer on the shard itself,
through the module's own projections, activation, norm, output gate and decay buffers, and carries the state across
ranks with halo.sharded_decay_scan around `lightning_kernel`, transformers' block algorithm started from an entry
state (the values enter the state linearly; its decay is per head, known from the buffers). The blocks start where
each rank's stretch starts, so their boundaries differ from one process's; the algebra is the same, and in the
model's dtype throughout (float64 is exact to round-off when the decay buffers are float64 too: transformers
computes them in float32 at init).

Packed documents (ringwise_cu_seqlens) reset the state at each document's start (the scan cuts the chain there).
A cache is refused alike on every rank (hf_mixers.refuse_cache), before any data moves.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..attention.halo import Kernel, sharded_decay_scan
from .hf_mixers import ShardedLayer, documents, refuse_cache

_ARGUMENTS = ("hidden_states", "position_embeddings", "attention_mask", "cache")


def lightning_kernel(module: Any) -> Kernel:
    """`kernel(v, initial_state=S, q=..., k=...) -> (out, final state)`: transformers' block algorithm for `module`
    on one stretch of tokens (q, k, v: (batch, tokens, heads, head_dim)), from the entry state S (batch, heads,
    head_dim, head_dim; None: zero), in the inputs' dtype with the module's decay buffers."""

    def kernel(v: torch.Tensor, initial_state: Optional[torch.Tensor] = None, *, q: torch.Tensor, k: torch.Tensor):
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (batch, heads, tokens, head_dim)
        B, H, n, d = v.shape
        state = v.new_zeros(B, H, d, d) if initial_state is None else initial_state
        outs = []
        for start in range(0, n, module.block_size):
            qb, kb, vb = (x[:, :, start : start + module.block_size] for x in (q, k, v))
            b = vb.shape[2]
            within = (qb @ kb.transpose(-1, -2) * module.diagonal_decay[:, :, :b, :b]) @ vb
            outs.append((qb * module.query_decay[:, :b]) @ state + within)
            state = state * torch.exp(-module.slope_rate * b) + (kb * module.key_decay[:, -b:]).transpose(-1, -2) @ vb
        return torch.cat(outs, dim=2).transpose(1, 2), state

    return kernel


def run_lightning(module, modeling, shard, forward, args, kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """MiniMaxLightningAttention.forward on this rank's shard (hf_mixers.Run): the per-token parts through the
    module's own submodules, the recurrence over the global sequence (sharded_decay_scan). Returns what the layer
    returns: its output and the state after the sequence's last token."""
    given = dict(zip(_ARGUMENTS, args), **kwargs)
    if given.get("cache") is not None or given.get("past_key_values") is not None or given.get("use_cache"):
        refuse_cache()
    hidden_states = given["hidden_states"]
    B, L, _ = hidden_states.shape
    H, d = module.num_attention_heads, module.head_dim
    qkv = module.act_fn(module.qkv_proj(hidden_states))
    qkv = modeling.apply_mask_to_padding_states(qkv, given.get("attention_mask"))  # per token, as transformers
    q, k, v = qkv.reshape(B, L, H, 3 * d).split(d, dim=3)
    out, final = sharded_decay_scan(
        lightning_kernel(module), v, dict(q=q, k=k), shard.layout, shard.group, documents(given)
    )
    out = module.norm(out.reshape(B, L, H * d))
    out = torch.sigmoid(module.output_gate(hidden_states)) * out
    return module.out_proj(out), final


def float64_decays(model: Any) -> None:
    """Recompute each lightning layer's decay buffers in their dtype from its slope (transformers' decay_factors):
    transformers computes them in float32 at init, so a float64 model's blocks carry float32-rounded decays, and
    runs whose blocks start at other tokens (one process, a ring) differ by float32 round-off. The float64 tests
    call this on both."""
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__ == "MiniMaxLightningAttention":
                for name, value in zip(("query_decay", "key_decay", "diagonal_decay"), m.decay_factors(m.slope_rate)):
                    getattr(m, name).copy_(value)


# model_type -> its lightning-attention layer (tests/test_hf_lightning.py runs it)
LIGHTNING_LAYERS = {
    "minimax": ShardedLayer("transformers.models.minimax.modeling_minimax", "MiniMaxLightningAttention", run_lightning),
}
