"""Ring attention inside Hugging Face transformers models, through the public registries.

    import ringwise.integrations.transformers as rw
    rw.use_ring(group=None, layout="zigzag")           # register "ringwise" once per process
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="ringwise")
    rw.check_model(model)                             # refuses a model that bypasses the registry
    batch = rw.shard_batch(input_ids)                 # this rank's tokens, global positions, shifted labels
    labels = batch.pop("labels")
    loss = rw.causal_lm_loss(model(**batch).logits, labels)
    loss.backward()                                   # then sum parameter gradients over the ranks

"ringwise" is registered in `AttentionInterface` (the attention op) and in
`AttentionMaskInterface` (where it refuses any mask that is not plain causal attention,
so a padding, sliding-window or chunked mask is never silently dropped). No private
transformers or flash-attn function is patched. Packed documents: pass the global
boundaries as `ringwise_cu_seqlens` to the model call (`shard_batch` does).
Supported: transformers >= 4.53 (the first release with masking_utils.AttentionMaskInterface);
tested on 4.53.0 (the lowest supported) and 5.24.0 (the newest).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..attention.layout import positions, shard
from ..attention.ring import ring_attention
from ..model import IGNORE_INDEX

NAME = "ringwise"


@dataclass
class _RingConfig:
    group: object = None
    layout: str = "zigzag"
    validated: bool = False  # the cross-rank argument check runs on the first attention call only


_CONFIG = _RingConfig()


def _world_size(group) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def ringwise_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                               scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers' attention signature: q/k/v (batch, heads, local_seq, dim) -> (batch, local_seq, heads, dim)."""
    if attention_mask is not None:
        raise ValueError("ringwise attention got an attention mask; only causal attention (and packed documents "
                         "through ringwise_cu_seqlens) is supported")
    if dropout:
        raise ValueError(f"ringwise attention does not implement attention dropout (got {dropout}); set "
                         "attention_dropout=0 in the model config")
    if kwargs.get("softcap") is not None:
        raise ValueError("ringwise attention does not support logit soft-capping")
    window = kwargs.get("sliding_window")
    global_len = query.shape[2] * _world_size(_CONFIG.group)
    if window is not None and window < global_len:
        raise ValueError(f"this layer uses sliding-window attention (window {window} < sequence {global_len}), "
                         "which ringwise does not implement; set sliding_window=None or use a longer window")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    # The check is a collective; every rank makes the same calls, so checking the first
    # one on every rank keeps them in step without an all-gather in every layer.
    validate, _CONFIG.validated = not _CONFIG.validated, True
    out = ring_attention(q, k, v, causal=causal, softmax_scale=scaling, layout=_CONFIG.layout, group=_CONFIG.group,
                         cu_seqlens=kwargs.get("ringwise_cu_seqlens"), validate=validate)
    return out, None


def ringwise_mask(batch_size, *args, mask_function=None, attention_mask=None, **kwargs):
    """Mask hook: accept only plain causal attention; the ring applies it itself (returns None)."""
    from transformers.masking_utils import causal_mask_function

    if mask_function is not None and mask_function is not causal_mask_function:
        raise ValueError("ringwise attention supports plain causal masks only; this model asked for another mask "
                         f"({getattr(mask_function, '__name__', mask_function)}: sliding-window, chunked, packed "
                         "or custom). Pack documents with ringwise_cu_seqlens instead")
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("ringwise attention does not support padding masks; pack sequences without padding "
                         "(documents via ringwise_cu_seqlens) or pad with tokens whose labels are -100")
    return None


def use_ring(group=None, layout: str = "zigzag") -> None:
    """Register "ringwise" with transformers and set the ring (process group, layout) it uses."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    _CONFIG.group, _CONFIG.layout, _CONFIG.validated = group, layout, False
    AttentionInterface.register(NAME, ringwise_attention_forward)
    AttentionMaskInterface.register(NAME, ringwise_mask)


def check_model(model) -> None:
    """Raise unless every attention of `model` dispatches to ringwise through the registry.

    A model that ignores attn_implementation (or was loaded with another one) would run
    ordinary attention on each rank's shard alone: wrong results, no error. Call this once
    after loading.
    """
    impls = {getattr(m.config, "_attn_implementation", None) for m in model.modules() if hasattr(m, "config")}
    if impls != {NAME}:
        raise ValueError(f"{type(model).__name__} does not route its attention through ringwise (attention "
                         f"implementations found: {sorted(map(str, impls))}); load it with "
                         f"attn_implementation='{NAME}' after ringwise.integrations.transformers.use_ring(), "
                         "or this architecture does not support transformers' attention registry")


def shard_batch(input_ids: torch.Tensor, labels: torch.Tensor | None = None, cu_seqlens=None) -> dict:
    """A global (batch, seq) batch -> this rank's model inputs.

    Labels are shifted on the *global* sequence before sharding (each token's target is
    the next global token; the last token of every document gets -100), position_ids are
    the global positions of the local tokens.
    """
    layout, group = _CONFIG.layout, _CONFIG.group
    labels = input_ids if labels is None else labels
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    if cu_seqlens is not None:
        ends = torch.as_tensor(list(cu_seqlens)[1:], dtype=torch.long) - 1
        shifted[:, ends] = IGNORE_INDEX
    b, s = input_ids.shape
    out = dict(input_ids=shard(input_ids, 1, layout, group),
               position_ids=positions(s, layout, group, device=input_ids.device)[None].expand(b, -1),
               labels=shard(shifted, 1, layout, group))
    if cu_seqlens is not None:
        out["ringwise_cu_seqlens"] = [int(x) for x in cu_seqlens]
    return out


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """This rank's share of the mean next-token loss over the *global* labelled-token count.

    Summing these over the ranks gives the whole batch's mean loss, so summing the
    parameter gradients over the ranks gives its exact gradient.
    """
    local = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    count = (labels != IGNORE_INDEX).sum().to(torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count, group=_CONFIG.group)
    return local / count.clamp_min(1).to(local.dtype)
