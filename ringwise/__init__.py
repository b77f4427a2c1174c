"""ringwise: exact ring attention and blockwise transformers for near-infinite context."""
from .attention.layout import LAYOUTS, pad_to_multiple, positions, shard, unshard
from .attention.ring import ring_attention

__all__ = ["ring_attention", "shard", "unshard", "positions", "pad_to_multiple", "LAYOUTS"]
__version__ = "0.1.0"
