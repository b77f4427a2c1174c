"""A transformers `Cache` whose layers hold only this rank's share of the sequence.

The attention layer calls `update` and hands the attention function exactly what it
returns: here, this rank's shard of the layer's keys and values (possibly none), while
`get_seq_length` / `get_mask_sizes` report the *global* sizes, so transformers builds the
masks and positions of the whole sequence. The attention function of a decode step
(`attend`) then reads the shard's global positions from this cache and runs
`decode_attention` over the ring group: each rank attends its shard, one all-gather, a
merge in rank order, the same bits on every rank.

Two phases: "prefill" (rw.generate's forward over this rank's layout shard of the prompt:
update stores the real tokens and returns its input unchanged for the ring) and "decode"
(transformers' generate() steps: every rank runs the same new tokens; the least-loaded rank
keeps each, ringwise.attention.kvcache decides which, the same on every rank).

Hybrid models' convolution, linear-attention and state-space layers keep transformers' own
per-layer states (`_StateLayer`): the ring's prefill leaves the whole sequence's states there, the
same on every rank (hf_mixers), and each decode step updates them alike on every rank.

Nothing that would need the whole cache on one rank is offered: crop, reorder (beam search),
batch repeats and offloading raise.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin, LinearAttentionLayer

from ..attention.decode import decode_attention
from ..attention.kvcache import KVCache
from ..attention.seqshard import SeqShard

_NO = (
    "ringwise's sharded cache holds one shard of the sequence per rank; it cannot {what} "
    "(beam search, assisted decoding, cache cropping and offloading are not supported by rw.generate)"
)


class _Fixed:
    """What no layer of the sharded cache offers (crop, reorder, ...): refused with the reason."""

    def _refuse(self, *_, what="change its layout", **__):
        raise ValueError(_NO.format(what=what))

    def crop(self, *_):
        self._refuse(what="crop")

    def reorder_cache(self, *_):
        self._refuse(what="reorder its rows")


class _ShardLayer(_Fixed, CacheLayerMixin):
    """transformers' view of one layer: sizes from the sharded cache, storage in it."""

    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, cache: "ShardedCache", index: int, sliding: bool):
        super().__init__()
        self._cache, self._index, self.is_sliding = cache, index, sliding

    def lazy_initialization(self, key_states, value_states) -> None:
        self.device, self.is_initialized = key_states.device, True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self._cache._update(self._index, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._cache.seen() + query_length, 0

    def get_seq_length(self) -> int:
        return self._cache.seen()

    def get_max_length(self) -> int:
        return -1

    batch_repeat_interleave = batch_select_indices = offload = prefetch = reset = _Fixed._refuse


class _StateLayer(_Fixed, LinearAttentionLayer):
    """A convolution / recurrent layer's states (transformers' own), replicated: only the token count is the
    cache's."""

    def __init__(self, cache: "ShardedCache", number_of_states: int = 1):
        LinearAttentionLayer.__init__(self, number_of_states=number_of_states)  # (_StateAndShardLayer's MRO)
        self._cache = cache

    def get_seq_length(self) -> int:
        return self._cache.seen()

    activate_past_recording = offload = prefetch = reset = _Fixed._refuse


class _StateAndShardLayer(_StateLayer, _ShardLayer):  # type: ignore[override,misc]  # the mixer's lazy init wins
    """A layer with attention and a mixer side by side (Falcon-H1, Zamba2's hybrid layers): the mixer's states
    replicated (_StateLayer), the attention's K/V sharded (_ShardLayer), as transformers' own
    LinearAttentionAndFullAttentionLayer is both kinds."""

    def __init__(self, cache: "ShardedCache", index: int, sliding: bool, number_of_states: int):
        _ShardLayer.__init__(self, cache, index, sliding)
        _StateLayer.__init__(self, cache, number_of_states)

    lazy_initialization = LinearAttentionLayer.lazy_initialization  # type: ignore[assignment]  # the mixer's

    def update(self, key_states, value_states, *args, **kwargs):
        self.is_initialized = True
        return self._cache._update(self._index, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return _ShardLayer.get_mask_sizes(self, query_length)


def _layer(cache: "ShardedCache", index: int, sliding: bool, kv: bool, states: int | None) -> Any:
    if states is None:
        return _ShardLayer(cache, index, sliding)
    return _StateAndShardLayer(cache, index, sliding, states) if kv else _StateLayer(cache, states)


class ShardedCache(Cache):
    """This rank's share of every layer's K/V for one generate() call; see the module docstring. kinds: for each
    layer, (whether it holds attention K/V, None or the number of conv/recurrent states it keeps); default:
    attention alone."""

    def __init__(
        self,
        n_layers: int,
        shard: SeqShard,
        sliding: list[bool] | None = None,
        kinds: list[tuple[bool, int | None]] | None = None,
    ):
        sliding = sliding or [False] * n_layers
        kinds = kinds or [(True, None)] * n_layers
        super().__init__(layers=[_layer(self, i, sliding[i], kv, n) for i, (kv, n) in enumerate(kinds)])
        self.holds_kv = any(kv for kv, _ in kinds)  # False: an attention-free model (Mamba): nothing claims tokens
        self.shard = shard
        self.rank = _rank_in(shard.group)
        self.store = KVCache(n_layers, self.rank, shard.world)
        self.phase = "prefill"
        self.prefill_positions: torch.Tensor | None = None  # (local,) global positions of this rank's prompt shard
        self.step_positions: torch.Tensor | None = None
        self.step_owners: list[int] = []
        self._last_layer: int | None = None
        self.decode_calls = 0  # decode_attention calls (one collective each)

    @property
    def ringwise_phase(self) -> str:
        """What the sharded convolution / recurrent layers read (hf_mixers.ring_cache_phase)."""
        return self.phase

    # -- what transformers asks ------------------------------------------------------------
    def seen(self) -> int:
        """Global tokens before the running forward (0 during the prefill: it runs as a whole sequence)."""
        return 0 if self.phase == "prefill" else self.store.next_position

    def _update(self, layer: int, key: torch.Tensor, value: torch.Tensor):
        if self.phase == "prefill":
            assert self.prefill_positions is not None  # rw.generate sets them before the prefill
            self.store.store_prefill(layer, key.transpose(1, 2), value.transpose(1, 2), self.prefill_positions)
            return key, value
        if self._last_layer is None or layer <= self._last_layer:  # a new step: its tokens' positions and owners
            self.step_positions, self.step_owners = self.store.claim(key.shape[2], key.device)
        self._last_layer = layer
        assert self.step_positions is not None  # claimed at the step's first layer, just above
        self.store.store_owned(layer, key.transpose(1, 2), value.transpose(1, 2), self.step_positions, self.step_owners)
        k, v, _ = self.store.view(layer)
        if k is None or v is None:  # this rank holds none of the layer's tokens yet (view: both or neither)
            b, h, _, d = key.shape
            return key.new_empty(b, h, 0, d), value.new_empty(b, h, 0, value.shape[-1])
        return k.transpose(1, 2), v.transpose(1, 2)

    # -- what the attention function asks ---------------------------------------------------
    def mask_problem(self, q_length, kv_length, q_offset, kv_offset) -> str | None:
        """A decode step's mask must cover exactly the cache plus the new tokens."""
        seen = self.store.next_position
        if q_length is None or kv_length is None:
            return None
        if int(kv_offset) != 0 or kv_length != seen + q_length or (q_offset is not None and int(q_offset) != seen):
            return (
                f"the decode step's mask (query {q_length} tokens at offset {q_offset}, keys {kv_length} at "
                f"offset {kv_offset}) does not continue the sharded cache of {seen} tokens"
            )
        return None

    def attend(self, module, query, key, value, window, chunk, scaling, sinks, softcap) -> torch.Tensor:
        """The decode step's attention: query (batch, heads, new, d) against the whole cache, of which
        key/value (batch, kv_heads, local, d) are this rank's (update's result) -> (batch, new, heads, d).
        window: keys at most this many positions before the query; chunk: Llama 4's chunked layers."""
        layer = module.layer_idx
        _, _, positions = self.store.view(layer)
        if positions is None:
            positions = torch.empty(0, dtype=torch.int64, device=query.device)
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        dv = v.shape[-1]
        if dv != q.shape[-1]:  # MLA: zero columns change neither the scores nor the real output columns
            d = max(dv, q.shape[-1])
            q, k, v = (F.pad(t, (0, d - t.shape[-1])) for t in (q, k, v))
        self.decode_calls += 1
        out = decode_attention(
            q,
            k,
            v,
            group=self.shard.group,
            softmax_scale=scaling,
            key_positions=positions,
            query_positions=self.step_positions,
            window=window,
            chunk=chunk,
            sinks=sinks,
            softcap=softcap,
        )
        return out[..., :dv]


def _rank_in(group) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0
