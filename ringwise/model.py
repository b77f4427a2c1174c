"""A LLaMA-style Blockwise Transformer whose attention runs as a ring.

Each rank holds one shard of every sequence (any layout). Rotary embeddings use the
*global* positions of the local tokens; attention is `ring_attention`; the SwiGLU
feed-forward and the output loss run chunk by chunk along the sequence and are
recomputed in backward, so neither a (seq x ffn_dim) hidden nor (seq x vocab) logits ever
exist whole (Blockwise Parallel Transformer). Activation checkpointing per layer is an
option on top, with its modes (attention's outputs saved, checkpoints offloaded to host memory:
ringwise.checkpointing); with attention's outputs saved, a layer's recompute rebuilds the feed-forward
chunks' inputs without running the chunks, so each chunk runs twice, as without layer checkpointing.

The training job's calls, the same as ringwise.train.pretrained.PretrainedLM's (a transformers
model): `set_ring(shard)` once, then `loss(input_ids, positions, labels, cu_seqlens=None)` ->
(summed loss, labelled-token count), `predict(...)` -> (greedy tokens at the labelled positions,
their mask) and `token_losses(...)` -> every local token's loss, on that ring. `forward` and
`hidden` take the ring per call (layout=, group=, ...: `SeqShard.ring_kwargs()`), for code that
drives the model directly (benchmarks, generation).
"""

from __future__ import annotations

import functools
import math
import zlib
from dataclasses import asdict, dataclass, replace
from typing import Any, cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention.api import ring_attention
from .attention.decode import decode_attention
from .attention.kvcache import KVCache
from .attention.seqshard import IGNORE_INDEX, SeqShard  # IGNORE_INDEX: labels the loss skips (defined with the shift)
from .checkpointing import ActivationOffload, checkpoint_layer, in_layer_recompute
from .presets import SHAPES


@dataclass
class ModelConfig:
    vocab_size: int = 264
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 384
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    ffn_chunk: int = 1024  # tokens per blockwise feed-forward chunk
    loss_chunk: int = 1024  # tokens per blockwise loss chunk
    checkpoint_layers: bool = False
    # with checkpoint_layers (ringwise.checkpointing): keep attention's out and lse, so a layer's
    # recompute never reruns its ring; keep the layer checkpoints in (pinned) host memory
    save_attention: bool = False
    offload_activations: bool = False
    # Baselines for benchmarks only (one process): "sdpa" (fused, memory-efficient) or
    # "vanilla" (materialised scores) attention, and plain (not blockwise) FFN and loss.
    attention: str = "ring"
    blockwise: bool = True

    def __post_init__(self):
        if self.attention not in ("ring", "sdpa", "vanilla"):
            raise ValueError(f"attention={self.attention!r} is unknown; use 'ring', 'sdpa' or 'vanilla'")
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} must be divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads}")
        for name in ("save_attention", "offload_activations"):
            if getattr(self, name) and not self.checkpoint_layers:
                raise ValueError(
                    f"{name}=True needs checkpoint_layers=True (it changes what a checkpointed layer keeps)"
                )
        if (self.dim // self.n_heads) % 2:
            raise ValueError("head_dim (dim / n_heads) must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)


# (the shapes' values are all ints; ModelConfig has str and bool fields too, which mypy cannot rule out)
PRESETS = {name: ModelConfig(**cast("dict[str, Any]", shape)) for name, shape in SHAPES.items()}


def model_config(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"model preset {name!r} is unknown; use one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


def blockwise(fn, x: torch.Tensor, chunk: int, *extra: torch.Tensor) -> list:
    """fn on chunks of x (and of extra) along dim 1, each recomputed in backward.

    Only the chunk inputs are kept for backward, so fn's intermediates exist for one
    chunk at a time, in forward and in backward.
    """
    outs = []
    for start in range(0, x.shape[1], chunk):
        parts = [t[:, start : start + chunk] for t in (x,) + extra]
        if torch.is_grad_enabled() and x.requires_grad:
            outs.append(checkpoint(fn, *parts, use_reentrant=False))
        else:
            outs.append(fn(*parts))
    return outs


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float):
    """cos, sin of shape (seq, head_dim) for the given *global* positions."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.to(torch.float32)[:, None] * freqs[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, seq, heads, head_dim); LLaMA's rotate-half convention."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return (x.float() * cos + rotated.float() * sin).type_as(x)


@dataclass
class CacheStep:
    """How one forward pass uses a sharded KV cache (ringwise.attention.kvcache.KVCache): "prefill"
    stores each rank's prompt shard as the ring attends it; "decode" stores the new token's K/V on
    its owner rank and attends the whole cache with decode_attention (every rank runs the token).
    positions: the global positions of this pass's (local) tokens."""

    cache: KVCache
    mode: str
    positions: torch.Tensor


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int = 0):
        super().__init__()
        self.cfg, self.index = cfg, index
        hd = cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.wo = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=False)

    def forward(self, x, cos, sin, attn_kwargs, step: CacheStep | None = None):
        b, n, _ = x.shape
        hd = self.cfg.head_dim
        q = apply_rotary(self.wq(x).view(b, n, self.cfg.n_heads, hd), cos, sin)
        k = apply_rotary(self.wk(x).view(b, n, self.cfg.n_kv_heads, hd), cos, sin)
        v = self.wv(x).view(b, n, self.cfg.n_kv_heads, hd)
        if step is not None and step.mode == "decode":
            o = self._decode(q, k, v, step, attn_kwargs.get("group"))
        elif self.cfg.attention == "ring":
            if step is not None:
                step.cache.store_prefill(self.index, k, v, step.positions)
            o = ring_attention(q, k, v, causal=True, **attn_kwargs)
        else:
            o = single_process_attention(q, k, v, self.cfg.attention)
        return self.wo(o.reshape(b, n, -1))

    def _decode(self, q, k, v, step, group):
        if q.shape[1] != 1:
            raise ValueError(f"decoding runs one new token at a time, got {q.shape[1]}")
        step.cache.store_token(self.index, k, v, int(step.positions[0]))
        kk, vv, pos = step.cache.view(self.index)
        if kk is None:  # this rank holds nothing of this layer yet
            kk = vv = k.new_zeros(k.shape[0], 0, *k.shape[2:])
            pos = torch.zeros(0, dtype=torch.int64, device=k.device)
        return decode_attention(q, kk, vv, group=group, key_positions=pos, query_positions=step.positions)


def single_process_attention(q, k, v, kind):
    """Whole-sequence causal attention for the baselines: fused SDPA or materialised scores."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if kind == "sdpa":
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:
        repeats = q.shape[1] // k.shape[1]  # query heads per kv head
        k, v = k.repeat_interleave(repeats, 1), v.repeat_interleave(repeats, 1)
        s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        causal = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
        o = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1) @ v
    return o.transpose(1, 2)


class FeedForward(nn.Module):
    """SwiGLU, run blockwise along the sequence."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.chunk = cfg.ffn_chunk if cfg.blockwise else None
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def swiglu(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def forward(self, x, inputs_only: bool = False):
        """SwiGLU of x; inputs_only: run the chunk checkpoints (each saves its chunk of x) but not the
        chunks, a placeholder of the output's shape in their place (a layer's recompute, see Block)."""
        if self.chunk is None:  # one call: what it saves is the layer's own, so it always runs
            return self.swiglu(x)
        return torch.cat(blockwise(_placeholder if inputs_only else self.swiglu, x, self.chunk), dim=1)


def _placeholder(x: torch.Tensor) -> torch.Tensor:
    """Stands for a SwiGLU chunk (dim -> dim, the same shape) whose output nothing reads."""
    return x


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int = 0):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, index)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = FeedForward(cfg)

    def forward(self, x, cos, sin, attn_kwargs, step=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, attn_kwargs, step)
        # In the recompute of a layer checkpointed with save_attention (ringwise.checkpointing), only the
        # tensors the layer saved are needed: of the feed-forward, its chunk checkpoints' inputs. Its
        # output feeds only the residual add, which saves nothing, so the chunks need not run there: they
        # rerun once, each in its own backward (twice in all, not three times). Same tensors saved, same
        # bits. Compiled (torch.compile traces the block once), the block runs whole.
        inputs_only = not torch.compiler.is_compiling() and in_layer_recompute()
        return x + self.ffn(self.ffn_norm(x), inputs_only=inputs_only)


class Transformer(nn.Module):
    """Decoder over one shard of each sequence; see module docstring."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.set_ring(SeqShard())  # one process (world 1) until the job gives its own
        # the layer checkpoints' offload hooks and their counts (ringwise.checkpointing)
        self.offload = ActivationOffload() if cfg.offload_activations else None
        if self.embed.weight.device.type != "meta":  # on meta, the owner fills each shard (ringwise.train)
            self.reset_parameters(torch.initial_seed())

    def initial_value(self, name: str, seed: int) -> torch.Tensor:
        """Parameter `name`'s initial value, a pure function of (seed, name), so a model built
        whole and one whose shards are filled one parameter at a time start identical.
        Norm weights 1; weights N(0, 0.02), residual projections scaled by 1/sqrt(2 layers) (GPT-2)."""
        shape = self.get_parameter(name).shape
        if name.endswith("norm.weight"):
            return torch.ones(shape, device="cpu")
        std = 0.02 / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02
        g = torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
        # drawn on the CPU whatever the default device (a CUDA default device refuses a CPU
        # generator), so the values are the same wherever the model is built
        return torch.randn(shape, generator=g, device="cpu") * std

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        for name, p in self.named_parameters():
            p.copy_(self.initial_value(name, seed))

    def hidden(
        self,
        input_ids,
        positions,
        *,
        layout="zigzag",
        group=None,
        validate=True,
        ulysses_group=None,
        mesh_group=None,
        cu_seqlens=None,
        step: CacheStep | None = None,
    ):
        """Final normalised hidden states of the local tokens: (batch, local_seq, dim).

        layout, group, ulysses_group, mesh_group: how the sequence is sharded (`SeqShard.ring_kwargs()`).
        cu_seqlens: packed documents' global boundaries (ring attention stays inside each document).
        step: fill (prefill) or read (decode) a sharded KV cache; see ringwise.generate."""
        cos, sin = rotary_tables(positions, self.cfg.head_dim, self.cfg.rope_theta)
        attn_kwargs = dict(
            layout=layout, group=group, validate=validate, ulysses_group=ulysses_group, mesh_group=mesh_group
        )
        if cu_seqlens is not None:
            if step is not None or self.cfg.attention != "ring":
                raise ValueError("cu_seqlens (packed documents) needs ring attention and no KV cache")
            attn_kwargs["cu_seqlens"] = cu_seqlens
        x = self.embed(input_ids)
        for layer in self.layers:
            if self.cfg.checkpoint_layers and torch.is_grad_enabled():
                # x alone is the checkpoint (cos, sin and the ring's arguments are shared by every layer)
                run = functools.partial(layer, cos=cos, sin=sin, attn_kwargs=attn_kwargs)
                x = checkpoint_layer(run, x, save_attention=self.cfg.save_attention, offload=self.offload)
            else:
                x = layer(x, cos, sin, attn_kwargs, step)
        return self.norm(x)

    def _chunk_loss(self, h, labels):
        logits = self.output(h)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # never below float32
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")

    def loss_sum(self, h, labels):
        """Sum of next-token cross-entropies over the local labelled tokens, blockwise."""
        if not self.cfg.blockwise:
            return self._chunk_loss(h, labels)
        parts = blockwise(self._chunk_loss, h, self.cfg.loss_chunk, labels)
        return torch.stack(parts).sum()

    def forward(self, input_ids, positions, labels, **attn_kwargs):
        """(sum of local token losses, number of local labelled tokens); attn_kwargs go to `hidden`."""
        h = self.hidden(input_ids, positions, **attn_kwargs)
        return self.loss_sum(h, labels), (labels != IGNORE_INDEX).sum()

    # -- the training job's calls, on the ring set by set_ring (see the module docstring) ----------
    def set_ring(self, shard: SeqShard) -> None:
        """The ring `loss`, `predict` and `token_losses` run on. The first `loss` after it validates its
        arguments across the ring's ranks (ring_attention's verdict); later ones trust them, as a
        training job's steps repeat the first one's shapes. `predict` and `token_losses` (evaluation:
        new lengths) validate every call."""
        self.ring, self._loss_validated = shard, False

    def _on_ring(self, validate: bool, cu_seqlens) -> dict:
        return dict(self.ring.ring_kwargs(), validate=validate, cu_seqlens=cu_seqlens)

    def loss(self, input_ids, positions, labels, cu_seqlens=None):
        """(sum of the local token losses, local labelled tokens), on the ring."""
        validate, self._loss_validated = not self._loss_validated, True
        return self(input_ids, positions, labels, **self._on_ring(validate, cu_seqlens))

    @torch.no_grad()
    def predict(self, input_ids, positions, labels, cu_seqlens=None):
        """(greedy next tokens at the labelled positions, batch-major; the (batch, local) mask of those
        positions), on the ring."""
        h = self.hidden(input_ids, positions, **self._on_ring(True, cu_seqlens))
        mask = labels != IGNORE_INDEX
        return self.output(h[mask]).argmax(-1), mask

    def token_losses(self, input_ids, positions, labels, cu_seqlens=None):
        """Every local token's next-token loss, (batch, local) in float32 at least, 0 where unlabelled,
        on the ring (blockwise, as `loss_sum`)."""
        h = self.hidden(input_ids, positions, **self._on_ring(True, cu_seqlens))
        if not self.cfg.blockwise:
            return self._chunk_token_losses(h, labels)
        return torch.cat(blockwise(self._chunk_token_losses, h, self.cfg.loss_chunk, labels), 1)

    def _chunk_token_losses(self, h, labels):
        logits = self.output(h)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
