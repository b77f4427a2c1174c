"""A sequence-sharded KV cache: each rank keeps its share of every layer's keys and values.

The prompt's K/V stay where the ring prefill left them (each rank's layout shard, pads
dropped); each new token goes to the least-loaded rank (the lowest such rank on a tie, so
round-robin once the loads are even). Every rank holds every rank's load, so every rank
computes the same owner without communicating. Storage is preallocated per layer and grows
by doubling: appending a token copies one token, not the cache. Global positions are kept
beside K/V: decode_attention masks by them (causal, windows).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.types import Device

from .layout import global_indices

Tensor = torch.Tensor


def prompt_loads(layout: str, world_size: int, padded_len: int, real_len: int) -> list[int]:
    """Real (not pad) prompt tokens each rank's layout shard holds."""
    return [int((global_indices(layout, r, world_size, padded_len) < real_len).sum()) for r in range(world_size)]


class _Layer:
    def __init__(self) -> None:
        # the storage, made at the first token, all three at once: keys and values (batch, capacity, kv_heads,
        # head_dim) and global positions (capacity,); the first `len` tokens are this rank's
        self.k: Optional[Tensor] = None
        self.v: Optional[Tensor] = None
        self.pos: Optional[Tensor] = None
        self.len = 0

    def storage(self) -> Optional[tuple[Tensor, Tensor, Tensor]]:
        """(k, v, pos), or None before the first token."""
        if self.k is None or self.v is None or self.pos is None:
            return None
        return self.k, self.v, self.pos

    def _reserve(self, like: Tensor, need: int) -> tuple[Tensor, Tensor, Tensor]:
        """The storage, with room for `need` tokens (grown by doubling: the held tokens are copied once)."""
        held = self.storage()
        if held is not None and held[0].shape[1] >= need:
            return held
        cap = max(need, 16, 2 * (0 if held is None else held[0].shape[1]))
        b, _, h, d = like.shape
        k = like.new_empty(b, cap, h, d)
        v = like.new_empty(b, cap, h, d)
        pos = torch.empty(cap, dtype=torch.int64, device=like.device)
        if held is not None:
            n = self.len
            k[:, :n], v[:, :n], pos[:n] = held[0][:, :n], held[1][:, :n], held[2][:n]
        self.k, self.v, self.pos = k, v, pos
        return k, v, pos

    def add(self, k: Tensor, v: Tensor, positions: Tensor) -> None:
        n = k.shape[1]
        if n == 0:
            return
        held = self.k
        if held is not None and (k.shape[0], k.shape[2:], k.dtype) != (held.shape[0], held.shape[2:], held.dtype):
            raise ValueError(
                f"KVCache: a layer's keys are (batch, n, kv_heads, head_dim) of one dtype: got "
                f"{tuple(k.shape)} {k.dtype} after {tuple(held.shape)} {held.dtype}"
            )
        keys, values, pos = self._reserve(k, self.len + n)
        keys[:, self.len : self.len + n] = k
        values[:, self.len : self.len + n] = v
        pos[self.len : self.len + n] = positions
        self.len += n


class KVCache:
    """This rank's part of the cache of `layers` layers over `world_size` ranks."""

    def __init__(self, layers: int, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"KVCache: rank {rank} is not in 0..{world_size - 1}")
        self.rank, self.world_size = rank, world_size
        self.layers = [_Layer() for _ in range(layers)]
        self.loads = [0] * world_size  # tokens each rank holds (the same on every rank)
        self.next_position = 0

    def set_prompt(self, loads: list[int], length: int) -> None:
        """The prompt's share of every rank (prompt_loads) and its length: before the prefill's stores."""
        if len(loads) != self.world_size or sum(loads) != length:
            raise ValueError(f"KVCache: prompt loads {loads} do not add up to {length} over {self.world_size} ranks")
        self.loads, self.next_position = list(loads), length

    def store_prefill(self, layer: int, k: Tensor, v: Tensor, positions: Tensor) -> None:
        """This rank's prompt shard of one layer as the ring left it; pad positions (>= the prompt) dropped."""
        real = positions < self.next_position
        self.layers[layer].add(k[:, real], v[:, real], positions[real])

    def owner(self) -> int:
        """The rank that stores the next token (least loaded, lowest on a tie)."""
        return min(range(self.world_size), key=lambda r: (self.loads[r], r))

    def store_token(self, layer: int, k: Tensor, v: Tensor, position: int) -> bool:
        """One new token's K/V (batch, 1, kv_heads, d) for one layer: kept only by its owner. Call
        advance() once the token's every layer is stored. True where this rank keeps it."""
        if self.owner() != self.rank:
            return False
        self.layers[layer].add(k, v, torch.full((k.shape[1],), position, dtype=torch.int64, device=k.device))
        return True

    def advance(self, tokens: int = 1) -> None:
        """Every rank, after a new token: its owner's load and the next position move on."""
        for _ in range(tokens):
            self.loads[self.owner()] += 1
            self.next_position += 1

    def claim(self, tokens: int, device: Device = None) -> tuple[Tensor, list[int]]:
        """Every rank, before a step's first layer: the global positions and owners of its `tokens`
        new tokens (each to the least-loaded rank in turn); the loads move on at once."""
        start = self.next_position
        owners: list[int] = []
        for _ in range(tokens):
            owners.append(self.owner())
            self.advance()
        return torch.arange(start, start + tokens, dtype=torch.int64, device=device), owners

    def store_owned(self, layer: int, k: Tensor, v: Tensor, positions: Tensor, owners: list[int]) -> None:
        """A step's new K/V (batch, n, kv_heads, d) for one layer: this rank keeps the tokens it owns."""
        keep = [j for j, o in enumerate(owners) if o == self.rank]
        if keep:
            idx = torch.tensor(keep, device=k.device)
            self.layers[layer].add(k.index_select(1, idx), v.index_select(1, idx), positions.index_select(0, idx))

    def view(self, layer: int) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """(k, v, positions) this rank holds for a layer (views, no copy)."""
        L = self.layers[layer]
        held = L.storage()
        if held is None:
            return None, None, None
        k, v, pos = held
        return k[:, : L.len], v[:, : L.len], pos[: L.len]

    def nbytes(self) -> int:
        """Bytes this rank's K/V hold (its share; the capacity beyond it is `reserved_bytes`)."""
        return sum(2 * L.k[:, : L.len].numel() * L.k.element_size() for L in self.layers if L.k is not None)

    def reserved_bytes(self) -> int:
        return sum(
            2 * L.k.numel() * L.k.element_size() + L.pos.numel() * 8
            for L in self.layers
            if L.k is not None and L.pos is not None
        )
