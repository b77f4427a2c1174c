"""Every sequence-mixing layer outside attention that ringwise shards over the ring, by family: one table
(model_type -> ShardedLayer) that check_model, install and generation read. Each family's adapters live in their
own module (hf_linear: gated DeltaNet, KDA, LFM2's short convolutions)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..attention.seqshard import SeqShard
from . import hf_mixers
from .hf_lightning import LIGHTNING_LAYERS
from .hf_linear import GATED_DELTA_LAYERS
from .hf_mixers import ShardedLayer
from .hf_ssd import SSD_LAYERS
from .hf_ssm import SSM_LAYERS

SHARDED_LAYERS: dict[str, ShardedLayer] = {**GATED_DELTA_LAYERS, **SSD_LAYERS, **LIGHTNING_LAYERS, **SSM_LAYERS}


def sharded_layer_types(config: Any) -> frozenset[str]:
    """The config.layer_types (or layers_block_type) names of the layers ringwise shards for this config's family."""
    layer = SHARDED_LAYERS.get(getattr(config, "model_type", None) or "")
    return frozenset(layer.layer_types) if layer else frozenset()


def is_sharded_layer(module: Any) -> bool:
    """Whether `module` is a layer ringwise shards (install wraps it)."""
    return hf_mixers.layer_of(module, SHARDED_LAYERS) is not None


def install(model: Any, shard_of: Callable[[], SeqShard]) -> int:
    """Wrap each sharded layer of the model (hf_mixers.install); returns how many."""
    return hf_mixers.install(model, shard_of, SHARDED_LAYERS)
