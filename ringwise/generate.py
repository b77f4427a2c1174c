"""Generation with ringwise's model from a prompt no single device holds.

Prefill: the prompt (padded at its end as the layout needs: trailing pads are never seen by
a real token under the causal mask, and the cache drops them) runs through the unchanged ring
forward, every layer's K/V stored where the ring left them (KVCache). The last prompt token's
logits come from the rank that holds it (one broadcast). Decode: every rank runs the model on
the new token; its K/V go to the least-loaded rank and attention covers the whole sharded
cache with decode_attention (one all-gather per layer), so every rank computes the same
logits, bit for bit, and draws the same next token from the same seeded generator.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .attention.kvcache import KVCache, prompt_loads
from .attention.layout import global_indices, split_unit
from .model import CacheStep, Transformer


def _world(group):
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def pick(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """The next token per row: argmax at temperature 0, else a draw from the tempered
    distribution cut to its top-p mass (at least the most likely token)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1:
        sorted_p, order = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # every token until the mass reaches top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


@torch.no_grad()
def generate(
    model: Transformer,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    group=None,
    layout: str = "zigzag",
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    cache: KVCache | None = None,
    on_token=None,
) -> torch.Tensor:
    """prompt (batch, S) token ids, the same on every rank -> (batch, S + max_new_tokens), the same
    on every rank. on_token(step, tokens) is called after each new token (a progress bar)."""
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise ValueError(f"generate: prompt must be (batch, length >= 1) token ids, got {tuple(prompt.shape)}")
    if max_new_tokens < 0 or temperature < 0 or not 0 < top_p <= 1:
        raise ValueError("generate: max_new_tokens >= 0, temperature >= 0 and 0 < top_p <= 1")
    rank, world = _world(group)
    S, device = prompt.shape[1], prompt.device
    unit = split_unit(layout, world)
    padded = -(-S // unit) * unit
    ids = torch.nn.functional.pad(prompt, (0, padded - S))
    mine = global_indices(layout, rank, world, padded).to(device)
    cache = cache or KVCache(model.cfg.n_layers, rank, world)
    cache.set_prompt(prompt_loads(layout, world, padded, S), S)
    h = model.hidden(ids[:, mine], mine, layout=layout, group=group, step=CacheStep(cache, "prefill", mine))
    holder = next(r for r in range(world) if bool((global_indices(layout, r, world, padded) == S - 1).any()))
    last = (
        h[:, (mine == S - 1).nonzero().item()].contiguous() if rank == holder else h.new_zeros(h.shape[0], h.shape[2])
    )
    if world > 1:
        src = dist.get_global_rank(group, holder) if group is not None else holder
        dist.broadcast(last, src=src, group=group)
    generator = torch.Generator().manual_seed(seed)
    out = [prompt]
    for t in range(max_new_tokens):
        token = pick(model.output(last), temperature, top_p, generator)
        out.append(token[:, None])
        if on_token is not None:
            on_token(t, token)
        if t + 1 == max_new_tokens:
            break
        pos = torch.tensor([S + t], device=device)
        h = model.hidden(token[:, None], pos, group=group, step=CacheStep(cache, "decode", pos))
        cache.advance()
        last = h[:, -1]
    return torch.cat(out, 1)


@torch.no_grad()
def generate_single_process(model: Transformer, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """The reference: greedy, the whole sequence through one process's SDPA model each step, no cache."""
    from dataclasses import replace

    ref = Transformer(replace(model.cfg, attention="sdpa")).to(prompt.device)
    ref.load_state_dict(model.state_dict())
    ids = prompt
    for _ in range(max_new_tokens):
        pos = torch.arange(ids.shape[1], device=ids.device)
        h = ref.hidden(ids, pos)
        ids = torch.cat([ids, ref.output(h[:, -1]).argmax(-1)[:, None]], 1)
    return ids
