"""ringwise: exact ring attention and blockwise transformers for near-infinite context.

The public names load on first use (PEP 562), so torch-free parts such as
`ringwise.presets` and `ringwise.plan` import without torch.
"""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what __getattr__ loads, for type checkers
    from .attention.api import ring_attention as ring_attention
    from .attention.decode import decode_attention as decode_attention
    from .attention.layout import LAYOUTS as LAYOUTS
    from .attention.layout import pad_to_multiple as pad_to_multiple
    from .attention.layout import positions as positions
    from .attention.layout import shard as shard
    from .attention.layout import unshard as unshard
    from .attention.seqshard import SeqShard as SeqShard

_PUBLIC = {
    "ring_attention": ".attention.api",
    "shard": ".attention.layout",
    "unshard": ".attention.layout",
    "positions": ".attention.layout",
    "pad_to_multiple": ".attention.layout",
    "LAYOUTS": ".attention.layout",
    "SeqShard": ".attention.seqshard",
    "decode_attention": ".attention.decode",
}

__all__ = list(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'ringwise' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
