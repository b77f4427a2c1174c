"""Each transformers model's ring: its sharding and the state its attention layers share.

Kept beside the model's config (by identity, freed with it), so two models with different
rings work in one process; a model given no ring of its own uses `use_ring`'s default.
Torch-free and transformers-free: the integration's modules all read it from here.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..attention.seqshard import SeqShard

if TYPE_CHECKING:
    from .hf_cache import ShardedCache


@dataclass
class ModelRing:
    """One model's ring: its sharding (None: use_ring's default), its check state, and the
    sharded cache of a generate() call in progress (None outside one)."""

    shard: SeqShard | None = None
    first_layer: Callable[[], object] | None = None  # weakref to the first attention module seen (see _check_due)
    pending: list = field(default_factory=list)  # masks built since the last collective check
    # whether a mask of this forward (read at its first layer) has a block overlay: Gemma 4 groups image tokens on
    # its sliding layers only, so its full layers run without the groups rw.shard_batch gave
    grouped: bool = False
    decoding: ShardedCache | None = None  # while rw.generate runs this model
    config_problems: list | None = None  # hf_support.config_problems of the config, read at the first check
    # (position_ids,) the module that computes the rotary embedding was last called with (check_model's hook), for
    # models whose attention layers never see them (Llama 4); None: not recorded
    model_positions: tuple | None = None
    # a vision-language model with multimodal RoPE that check_model prepared (hf_multimodal): its first attention
    # layer requires rw.shard_multimodal_batch's position ids
    mrope: bool = False


DEFAULT = {"shard": SeqShard()}  # use_ring's ring, for models given none of their own
_RINGS: dict[int, tuple[Callable[[], object], ModelRing]] = {}  # id(model config) -> (weakref to it, ModelRing)


def ring_of(config) -> ModelRing:
    """The ring state of the model whose config this is (made on first use; freed with the config)."""
    key = id(config)
    entry = _RINGS.get(key)
    if entry is None or entry[0]() is not config:
        state = ModelRing()

        def forget(_: object, key: int = key) -> None:
            _RINGS.pop(key, None)

        ref: Callable[[], object]
        try:
            ref = weakref.ref(config, forget)
        except TypeError:  # no config (None) or one that cannot be weakly referenced: the shared state
            ref = lambda: config  # noqa: E731
        _RINGS[key] = entry = (ref, state)
    return entry[1]


def all_rings() -> list[ModelRing]:
    return [state for _, state in list(_RINGS.values())]


def shard_of_state(state: ModelRing | None = None) -> SeqShard:
    return state.shard if state is not None and state.shard is not None else DEFAULT["shard"]


def configs_of(model_or_config) -> list:
    """Every config a model's attention layers read (the text configs of multimodal models too)."""
    config = getattr(model_or_config, "config", model_or_config)
    configs = {id(config): config}
    if hasattr(model_or_config, "modules"):
        configs.update({id(m.config): m.config for m in model_or_config.modules() if hasattr(m, "config")})
    return list(configs.values())
