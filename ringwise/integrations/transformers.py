"""Ring attention inside Hugging Face transformers models, through the public registries.

    import ringwise.integrations.transformers as rw
    rw.use_ring(group=None, layout="zigzag")           # register "ringwise"; the process's default ring
    model = rw.from_config(cfg)                       # or rw.from_pretrained(path); both run check_model
    # or a ring of its own per model: rw.from_config(cfg, shard=ringwise.SeqShard(layout, group, ulysses_group))
    batch = rw.shard_batch(input_ids)                 # this rank's tokens, global positions, shifted labels
    labels = batch.pop("labels")
    loss = rw.causal_lm_loss(model(**batch).logits, labels)
    loss.backward()                                   # then sum parameter gradients over the ranks
    # or model(**batch, labels=labels).loss (Trainer's way): the same share, with shard_batch's labels as they are

"ringwise" is registered in `AttentionInterface` (the attention op) and in
`AttentionMaskInterface` (the mask hook). The hook reads the mask function transformers
built (hf_masks.py: causal, sliding window, hybrid local/global per layer, Llama 4's chunks,
bidirectional attention and two-sided windows (EmbeddingGemma), block groups OR-ed into
causal attention (Gemma 3's image tokens, PaliGemma's prefix: their global group ids come
from rw.shard_batch(..., token_type_ids=, model=)), and the "packed" mask that transformers
derives from the jumps in ringwise's own layout positions) and hands each layer a RingMask
with the ring's arguments; anything else (padding, custom masks, a KV cache continuation)
is refused, never dropped. Llama 4's NoPE layers scale their queries by a temperature of
the token's index in the forward's input: rescaled here to its global position. Soft-capping (softcap) and
attention sinks (s_aux) arrive as transformers passes them to flash attention. Every
problem is raised on every rank alike by the op's own verdict gather (one all-gather) in the
model's first attention layer (and in the first layer that uses each other mask), before any
ring traffic: this integration's objections to the call and to the layer's mask ride in it. Each model has its own ring
configuration, kept beside its config (two models with different rings work in one
process); models configured with neither use use_ring's. Works under torch.compile
(fullgraph): the checks that read tensor values run inside the op. No private transformers
function is patched.
Packed documents: pass the global boundaries as `ringwise_cu_seqlens` (`shard_batch` does).
Vision-language models with multimodal RoPE (Qwen2-VL, Qwen2.5-VL, Qwen3-VL(-MoE), GLM-4V, GLM-4.5V:
hf_multimodal.py): `shard_multimodal_batch` runs the vision tower (replicated, never on ringwise) and the
model's M-RoPE positions on the global sequence and hands each rank its share; no other positions are taken.
Gemma 3, Gemma 4 and PaliGemma (image tokens in groups, plain positions): `shard_multimodal_batch` runs their
tower the same way and gives each rank its image features, token types and the global ringwise_group_ids.
Feed-forward tiling (hf_tiling.py): from_config / from_pretrained run every decoder layer's
MLP or MoE block over tiles of tokens, each recomputed in backward, in forwards that build a
graph (training), so no (local tokens x intermediate) tensor exists whole; exact (router
logits and auxiliary losses included); `ffn_tile=0` leaves the model untiled, and
`tile_feed_forward(model, tokens)` tiles (or with 0 untiles) any model.
Tested on transformers 5.24.0 and 5.25.0; check_model (hf_support) lists what is refused and why.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..attention.api import attention
from ..attention.checks import not_global_positions
from ..attention.seqshard import IGNORE_INDEX, SeqShard
from .hf_hybrids import install as install_sharded_mixers
from .hf_masks import MaskSpec, factory_codes, global_group_ids, group_problem, read_mask_function, tag_mask_factories
from .hf_multimodal import (
    TOWER_IMPLEMENTATION,
    implementation_problems,
    is_supported_vlm,
    mrope_text_positions,
    multimodal_inputs,
    positions_problem,
    supported_problem,
)
from .hf_multimodal import prepare as _prepare_multimodal
from .hf_rings import DEFAULT, ModelRing, all_rings, configs_of, ring_of, shard_of_state
from .hf_support import architecture_problems, attention_free, config_problems
from .hf_tiling import ffn_tile_of as ffn_tile_of  # re-exported: the integration's public calls
from .hf_tiling import tile_feed_forward as tile_feed_forward
from .hf_tiling import tile_size as tile_size

NAME = "ringwise"
_PACKED_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "cu_seqlens_q", "cu_seqlens_k")


_ring_of, _shard_of = ring_of, shard_of_state


@dataclass(eq=False)
class RingMask:
    """What the mask hook hands the attention layers instead of a tensor: the ring arguments.

    `problem` is this rank's objection to the mask: the verdict of the first layer that uses
    the mask raises it on every rank alike; a mask the model builds but no layer uses is never
    refused (Qwen2-MoE builds a sliding mask of window 0 for layers it does not have).
    `shape` is the 4-D size transformers asked for: a model that hands the mask on to another
    mask function (PaliGemma's language model) finds it prepared, and the hook returns it as it is.
    """

    spec: MaskSpec  # the ring arguments read from the mask function (no default factory: the hook runs traced)
    problem: str | None = None
    checked: bool = False  # a layer that used this mask ran the collective check
    shape: tuple[int, ...] = (1, 1, 0, 0)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def window(self) -> int | None:
        """transformers' sliding_window (keys within reach on the left, the query included)."""
        return self.spec.window

    @property
    def position_ids(self) -> torch.Tensor | None:
        """What a packed-sequence remap reads, checked by the op."""
        return self.spec.position_ids

    def __getitem__(self, index):
        """Indexing that keeps every query and key (Gemma 4 slices its masks with logits_to_keep=0, i.e. [:, :, 0:, :],
        before its KV-shared layers): the mask itself. Any other slice would drop tokens of this rank's shard only."""
        if all(_whole(i) for i in (index if isinstance(index, tuple) else (index,))):
            return self
        raise TypeError(
            f"the model slices its attention mask ({index!r}); under the ring each rank would cut its own shard, not "
            "the sequence (Gemma 4 keeps only the last logits_to_keep queries for its KV-shared layers: call it with "
            "logits_to_keep=0)"
        )

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        _mask_used_directly(name)


def _mask_used_directly(what, *_):
    """A model that computes with the mask itself (Bloom, MPT add ALiBi to it) bypasses the ring's masking."""
    raise TypeError(
        f"this model operates on the attention mask itself ({what}), so it does not run its "
        "attention through transformers' registry alone; ringwise cannot make it exact "
        "(ringwise.integrations.transformers.check_model refuses it)"
    )


for _op in ("add", "radd", "sub", "rsub", "mul", "rmul", "and", "rand", "or", "ror", "invert", "neg"):
    setattr(RingMask, f"__{_op}__", lambda self, *a, _op=_op: _mask_used_directly(f"__{_op}__"))


def _whole(index) -> bool:
    return (
        index is Ellipsis
        or isinstance(index, slice)
        and index.step in (None, 1)
        and index.stop is None
        and (index.start in (None, 0))
    )


def _packed_problem(packed_ids, seq: SeqShard | None = None) -> str | None:
    """transformers < 5 reads documents from position jumps without remapping them: accept only the jumps of
    this rank's global positions (the layout's own), whose documents ringwise draws from ringwise_cu_seqlens."""
    if packed_ids is None:
        return None
    from transformers.masking_utils import find_packed_sequence_indices

    seq = seq or _shard_of()
    local_len = packed_ids.shape[-1]
    want = seq.positions(local_len * seq.world, packed_ids.device)
    expected = find_packed_sequence_indices(want[None])  # None where this rank's positions never jump
    if expected is not None and expected.shape[-1] == local_len and bool((packed_ids == expected).all()):
        return None
    return not_global_positions(seq.layout)


def _dropout_problem(module, dropout) -> str | None:
    if not dropout:
        return None
    config = getattr(module, "config", None)
    fields = [
        k
        for k, v in (config.to_dict() if config is not None else {}).items()
        if "drop" in k and "att" in k and v == dropout
    ] or ["attention_dropout"]
    return (
        f"ringwise attention does not implement attention dropout (got {dropout}); set "
        f"{' / '.join(fields)}=0 in the model config"
    )


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _layer_mask(attention_mask, sliding_window, kwargs) -> tuple[RingMask | None, str | None]:
    """The layer's mask (None: plain causal) and this rank's problem with the call, if any."""
    packed = [k for k in _PACKED_KWARGS if kwargs.get(k) is not None]
    if packed:
        return None, (
            f"the model call carries flash-attention packing arguments ({', '.join(packed)}, e.g. from "
            "DataCollatorWithFlattening); pass documents as ringwise_cu_seqlens (shard_batch does)"
        )
    if attention_mask is None or isinstance(attention_mask, RingMask):
        mask = attention_mask
    else:
        return None, (
            "ringwise attention got a tensor attention mask (a custom 4-D mask, or a mask built "
            "outside transformers' mask registry); ringwise applies the masks transformers composes (causal, "
            "bidirectional, windows, chunks, block groups) and documents (ringwise_cu_seqlens) only. If you "
            "passed no mask, this transformers "
            f"({_transformers_version()}) builds the model's mask itself; newer releases build it through "
            "the mask registry (GPT-2 from 4.54.1, GraniteMoE from 5.0, OPT by 5.24)"
        )
    if mask is not None and mask.problem is None and sliding_window is not None and sliding_window != mask.window:
        return mask, (
            f"the layer passes sliding_window={sliding_window} but its mask has window {mask.window}; "
            "ringwise cannot tell which one the model means"
        )
    return mask, None


def _check_due(state: ModelRing, module) -> bool:
    """Whether this call runs the collective check: the model's first attention layer (layer_idx 0,
    or the first attention module seen since the model changed).

    Decided from the sequence of layers called alone, which is the same on every rank
    whatever masks the ranks built, so all ranks check at the same call (once per forward,
    once more when gradient checkpointing recomputes that layer).
    """
    first = state.first_layer() if state.first_layer is not None else None
    if first is None:
        state.first_layer, first = weakref.ref(module), module
    return module is first or getattr(module, "layer_idx", None) == 0


def ringwise_attention_forward(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
):
    """transformers' attention signature: q/k/v (batch, heads, local_seq, dim) -> (batch, local_seq, heads, dim).

    The layer's mask comes from the mask hook (RingMask); sliding_window, softcap and s_aux
    (attention sinks) arrive as transformers passes them to flash attention.
    """
    state = _ring_of(getattr(module, "config", None))
    seq = _shard_of(state)
    window = kwargs.get("sliding_window")
    mask, problem = _layer_mask(attention_mask, window, kwargs)
    problem = problem or _dropout_problem(module, dropout)
    if state.decoding is not None and state.decoding.phase == "decode":
        return _decode_step(module, query, key, value, mask, problem, scaling, kwargs, state.decoding), None
    global_len = query.shape[2] * seq.world
    group_ids = kwargs.get("ringwise_group_ids")
    if mask is not None:
        spec = mask.spec
    else:  # no mask built (a model that leaves it to is_causal): the layer's causality and sliding_window
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        spec = MaskSpec(causal=causal, left=None if window is None else window - 1, right=0 if causal else None)
        if window is not None and not causal:
            problem = problem or (
                f"a bidirectional layer passes sliding_window={window} without a mask; ringwise cannot tell "
                "the window's reach after the query"
            )
    check: dict[str, Any] = dict(validate=False)  # the op's verdict keywords (validate, objection, position_ids)
    first = _check_due(state, module)
    if first or (mask is not None and not mask.checked):
        # the op's one verdict gather carries this rank's objection (to the call, to the layer's mask);
        # the first layer's also checks the positions. One per forward, one more per other mask used.
        position_ids = None
        if first:
            pending, state.pending = state.pending, []
            state.grouped = any(getattr(m.spec, "blocks", None) is not None for m in pending)
            position_ids = kwargs.get("position_ids")
            if state.mrope:  # rw.shard_multimodal_batch's text row (GLM-4.5V's layers get the 3-D rows)
                position_ids = mrope_text_positions(state)
            if position_ids is None:  # the mask's remap read them (packed sequences)
                position_ids = next((m.position_ids for m in pending if m.position_ids is not None), None)
            if position_ids is None and state.model_positions is not None:  # what the rotary embedding was given
                position_ids = state.model_positions[0]
            if state.config_problems is None:  # a model built without check_model (directly by transformers)
                config = getattr(module, "config", None)
                state.config_problems = (
                    [f"model_type={config.model_type!r}: {p}" for p in config_problems(config)]
                    if config is not None
                    else []
                )
            problem = problem or next(iter(state.config_problems), None)
            problem = problem or positions_problem(state)  # M-RoPE: rw.shard_multimodal_batch's positions only
            if position_ids is None:
                problem = problem or _unverifiable_positions(module, state.model_positions == (None,))
        problem = problem or (mask.problem if mask is not None else None)
        if mask is not None:
            mask.checked = True
        if problem is None:  # the groups the model built on this rank's tokens against rw.shard_batch's global ones
            problem = group_problem(spec, group_ids, seq.positions(global_len, query.device), state.grouped)
        check = dict(validate=True, objection=problem, position_ids=position_ids)
    elif problem:  # the same module config on every rank: the same error everywhere
        raise ValueError(f"ringwise attention: {problem}")
    extra = _mask_arguments(spec, global_len)
    if spec.blocks is not None:
        extra["group_ids"] = group_ids
    query = _nope_temperature(module, query, seq, global_len)
    if kwargs.get("s_aux") is not None:
        extra["sinks"] = kwargs["s_aux"]
    if kwargs.get("softcap") is not None:
        extra["softcap"] = kwargs["softcap"]
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    dv = v.shape[-1]
    if dv != q.shape[-1]:  # MLA (DeepSeek): value heads narrower or wider than query/key heads
        d = max(dv, q.shape[-1])  # zero columns change neither the scores nor the real output columns
        q, k, v = (F.pad(t, (0, d - t.shape[-1])) for t in (q, k, v))
    out = attention(
        q,
        k,
        v,
        causal=spec.causal,
        softmax_scale=scaling,
        cu_seqlens=kwargs.get("ringwise_cu_seqlens"),
        **seq.ring_kwargs(),
        **extra,
        **check,
    )
    return out[..., :dv], None


def _mask_arguments(spec: MaskSpec, global_len: int) -> dict[str, Any]:
    """The op's window= and chunk= for the layer's mask (none where they hide nothing in `global_len` tokens)."""
    extra: dict[str, Any] = {}
    reach = global_len - 1  # no offset in the sequence is farther
    if spec.causal:
        if spec.left is not None and spec.left < reach:
            extra["window"] = spec.left  # keys at most `left` positions before the query
    else:
        left = reach if spec.left is None else min(spec.left, reach)
        right = reach if spec.right is None else min(spec.right, reach)
        if left < reach or right < reach:
            extra["window"] = (left, right)
    if spec.chunk is not None and spec.chunk < global_len:
        extra["chunk"] = spec.chunk
    return extra


_LLAMA4_ATTENTION: list = []


def _llama4_attention():
    """transformers' Llama4TextAttention class, or None (a transformers without Llama 4)."""
    if not _LLAMA4_ATTENTION:
        try:
            from transformers.models.llama4 import modeling_llama4

            _LLAMA4_ATTENTION.append(modeling_llama4.Llama4TextAttention)
        except (ImportError, AttributeError):
            _LLAMA4_ATTENTION.append(None)
    return _LLAMA4_ATTENTION[0]


def _nope_temperature(module, query, seq: SeqShard, global_len: int):
    """Llama 4's NoPE layers with attn_temperature_tuning scale each query by
    1 + attn_scale * log1p(floor((p + 1) / floor_scale)) of its position p, which transformers (4.53-5.25) takes
    from the token's index in the forward's input (cache_position, or arange over the input plus the cache's
    length), not from position_ids: in a ring forward, the index in this rank's shard. Rescaled here to the
    global position of each token (the same positions the op checks position_ids against): exact up to the
    rounding of one multiplication. Other layers and models: unchanged. A decode step (rw.generate) counts
    its positions from the sharded cache's global length: right as it is, never rescaled."""
    cls = _llama4_attention()
    if cls is None or not isinstance(module, cls) or module.use_rope or not module.attn_temperature_tuning:
        return query
    local = torch.arange(query.shape[2], device=query.device, dtype=torch.float32)
    positions = seq.positions(global_len, query.device).to(torch.float32)

    def scale(p):
        return torch.log1p(torch.floor((p + 1.0) / module.floor_scale)) * module.attn_scale + 1.0

    had, wanted = (scale(p).view(1, 1, -1, 1) for p in (local, positions))  # float32, as transformers computes them
    work = query.to(torch.promote_types(query.dtype, torch.float32))
    rescaled = (work / had.to(work.dtype) * wanted.to(work.dtype)).to(query.dtype)
    return torch.where(had == wanted, query, rescaled)  # the same bits wherever the two positions scale alike


def _unverifiable_positions(module, called_without: bool = False) -> str:
    """Why a first attention layer that receives no position ids is refused: the op checks that the positions the
    model rotates by are the layout's global ones, and here it cannot (multimodal RoPE keeps its 3-D positions from
    the attention layers, e.g. Qwen2-VL given 3-row position_ids)."""
    model_type = getattr(getattr(module, "config", None), "model_type", None)
    if called_without:  # check_model's hook saw the model's rotary embedding computed without position_ids
        return (
            f"{type(module).__name__} layers (model_type={model_type!r}) receive no position_ids and the model "
            "was called without them, so it numbers this rank's shard from 0; pass the global position_ids "
            "(rw.shard_batch gives them)"
        )
    return (
        f"{type(module).__name__} layers (model_type={model_type!r}) receive no position_ids, so "
        "ringwise cannot verify that the model's positions are the layout's global positions (multimodal "
        "3-D RoPE, M-RoPE, keeps them outside the attention); run a vision-language model on "
        "rw.shard_multimodal_batch's batch (its 4-row position ids give the layers the global text positions), "
        "a text model with the global position_ids (rw.shard_batch gives them), or use another attn_implementation"
    )


def _decode_step(module, query, key, value, mask, problem, scaling, kwargs, cache):
    """A generate() step over rw.generate's sharded cache (key/value: this rank's shard, update's result).
    Every rank runs the same tokens through the same model, so a problem here is the same on every rank."""
    problem = problem or (mask.problem if mask is not None else None)
    causal = mask.spec.causal if mask is not None else getattr(module, "is_causal", True)
    if not causal:
        problem = problem or "a bidirectional attention layer cannot decode token by token"
    if mask is not None and mask.spec.blocks is not None:
        problem = problem or "rw.generate does not decode with block groups (image tokens, a prefix) yet"
    if problem:
        raise ValueError(f"ringwise attention: {problem}")
    window = mask.window if mask is not None else kwargs.get("sliding_window")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    return cache.attend(
        module,
        query,
        key,
        value,
        None if window is None else window - 1,
        mask.spec.chunk if mask is not None else None,
        scaling,
        kwargs.get("s_aux"),
        kwargs.get("softcap"),
    )


def ringwise_mask(
    batch_size=None,
    q_length=None,
    kv_length=None,
    q_offset=0,
    kv_offset=0,
    mask_function=None,
    attention_mask=None,
    local_size=None,
    config=None,
    **kwargs,
):
    """Mask hook: read the mask transformers asks for and hand the layers a RingMask.

    It never raises: an objection is recorded and raised by the first attention call's
    collective check on every rank alike (transformers derives different masks on
    different ranks, e.g. a "packed" mask from the jump in zigzag positions on rank 0 only).
    Checks that read tensor values (positions) run inside the op, so this traces under
    torch.compile; a padding mask there is refused (its values cannot be read in a graph).
    """
    if isinstance(attention_mask, RingMask):  # prepared by this hook for an outer model: kept as it is (as a 4-D mask)
        return attention_mask
    mask = RingMask(spec=MaskSpec(), shape=(batch_size or 1, 1, int(q_length or 0), int(kv_length or 0)))
    state = _ring_of(config)
    cache = state.decoding if state.decoding is not None and state.decoding.phase == "decode" else None
    decoding = cache is not None
    cache_position = kwargs.get("cache_position")  # older transformers pass this, not q_length/q_offset
    if q_length is None and cache_position is not None:
        q_length, q_offset = cache_position.shape[0], cache_position[0]
    try:
        spec = mask.spec = read_mask_function(mask_function)
        mask.problem = (
            (
                cache.mask_problem(q_length, kv_length, q_offset, kv_offset)
                if cache is not None
                else _cache_problem(q_length, kv_length, q_offset, kv_offset)
            )
            or _padding_problem(attention_mask)
            or _packed_problem(spec.packed_ids, _shard_of(state))
        )
        if local_size is not None and local_size not in spec.sizes:
            mask.problem = mask.problem or (
                f"transformers sized this mask for a local window of {local_size} "
                f"but its mask function has windows or chunks of {list(spec.sizes)}"
            )
        mask.problem = mask.problem or _left_padding_problem(spec.left_padding)
    except Exception as e:  # whatever a check trips on is an objection for the collective check, never a raise here
        mask.problem = str(e) if isinstance(e, ValueError) else f"{type(e).__name__} while reading the mask: {e}"
    if not decoding:  # a decode step's masks are checked where they are used (every rank alike)
        state.pending.append(mask)
    return mask


def _left_padding_problem(left_padding) -> str | None:
    """Chunks shifted by left padding (chunked_overlay reads it from a padding mask, which is refused anyway)."""
    if left_padding is None or torch.compiler.is_compiling():  # compiled: no padding mask, so zeros (or refused)
        return None
    if bool((torch.as_tensor(left_padding) != 0).any()):
        return (
            "the chunked mask starts its chunks after left padding; ringwise's chunks start at global position 0 "
            "(ringwise does not support padding masks)"
        )
    return None


def _cache_problem(q_length, kv_length, q_offset, kv_offset) -> str | None:
    if q_length is None or kv_length is None:
        return None
    if kv_length != q_length or int(q_offset) != 0 or int(kv_offset) != 0:
        return (
            "ringwise attention runs whole sequences (training, prefill): this call continues a KV cache "
            f"(query {q_length} tokens, keys {kv_length}, offset {int(kv_offset)}); generate with rw.generate "
            "(a sequence-sharded cache) or decode with another attention implementation"
        )
    return None


def _padding_problem(attention_mask) -> str | None:
    if attention_mask is not None and torch.compiler.is_compiling():
        return (
            "under torch.compile ringwise cannot read a padding mask's values inside the graph; call the "
            "compiled model without attention_mask (ringwise does not support padding masks)"
        )
    if attention_mask is not None and not bool(attention_mask.all()):
        return (
            "ringwise attention does not support padding masks; pack sequences without padding "
            "(documents via ringwise_cu_seqlens) or pad with tokens whose labels are -100"
        )
    return None


def use_ring(group=None, layout: str = "zigzag", ulysses_group=None) -> None:
    """Register "ringwise" with transformers and set the process's default ring (process group,
    layout), used by every model that was not given a ring of its own (`configure`, `shard=`).

    ulysses_group: run Ulysses x ring (USP): the sequence is cut over both groups
    (ringwise.shard(..., ulysses_group=)), and an all-to-all inside ulysses_group trades
    sequence for heads around the ring over `group` (see ringwise/attention/ulysses.py).
    """
    register()
    DEFAULT["shard"] = SeqShard(layout, group, ulysses_group)
    for state in all_rings():  # a new ring: every model's next call checks again
        state.first_layer, state.pending = None, []


def register() -> None:
    """Register "ringwise" in transformers' attention and mask registries (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, ringwise_attention_forward)
    AttentionMaskInterface.register(NAME, ringwise_mask)
    factory_codes()  # the mask reader's table, made here rather than inside a torch.compile trace of the hook
    tag_mask_factories()  # closures readable inside a torch.compile trace


def configure(model_or_config, shard: SeqShard) -> None:
    """Give one model its own ring (a ringwise.SeqShard: layout, ring group, ulysses group),
    instead of use_ring's default; another model in the same process may use another ring.
    Given a model, it installs the ring-aware loss (RingLoss) too, as check_model does."""
    register()
    for c in configs_of(model_or_config):
        state = _ring_of(c)
        state.shard, state.first_layer, state.pending = shard, None, []
    _install_loss(model_or_config)  # a model: its own loss_function sums over this ring (RingLoss)


def shard_of(model_or_config) -> SeqShard:
    """The SeqShard a model's attention uses (its own, else use_ring's)."""
    return _shard_of(_ring_of(getattr(model_or_config, "config", model_or_config)))


def check_model(model) -> None:
    """Raise unless ringwise can run `model` (or the causal LM `config` builds) exactly.

    Refused: attention outside the registry (a model loaded with another implementation,
    or an architecture whose attention is hard-coded: Bloom, Falcon, GPT-Neo, MPT), other
    sequence mixers (convolutions, linear attention, state-space layers), ALiBi, and RoPE
    scalings that depend on the local sequence length. Each would run on one shard of the
    sequence: wrong results, no error. Deterministic, so every rank gets the same verdict.
    Call it with the config before building (a hard-coded model fails at construction)
    and with the model after loading; from_config / from_pretrained here do both. Given a
    model, it installs the ring-aware loss (RingLoss): model(**batch).loss is exact or refused.
    """
    problems = architecture_problems(model)
    towers = implementation_problems(model)  # a vision-language model: its towers on another implementation
    if towers is not None:
        problems[:0] = towers
    elif hasattr(model, "named_modules"):
        impls = {getattr(m.config, "_attn_implementation", None) for m in model.modules() if hasattr(m, "config")}
        if impls != {NAME} and not attention_free(model):  # pure Mamba2: no attention to route
            problems.insert(
                0,
                f"its attention implementations are {sorted(map(str, impls))}, not only '{NAME}'; "
                f"load it with attn_implementation='{NAME}' after use_ring()",
            )
    if problems:
        what = type(model).__name__ if hasattr(model, "named_modules") else f"model_type={model.model_type!r}"
        raise ValueError(f"{what} does not route its attention through ringwise exactly: " + "; ".join(problems))
    tag_mask_factories()  # the model's module is imported now: its own imports of the factories too
    if hasattr(model, "named_modules"):  # convolutions, linear attention, state-space layers: hf_hybrids
        install_sharded_mixers(model, lambda: _shard_of(_ring_of(model.config)))
    _mark_towers(model)
    _prepare_multimodal(model)  # M-RoPE vision-language models: shard_multimodal_batch's positions, no pixels
    _install_position_hook(model)
    _install_loss(model)  # a model: model(labels=).loss is the exact share over its ring, or refused (RingLoss)


def _install_position_hook(model) -> None:
    """Record the position_ids given to each module that computes a rotary embedding (a text model's `rotary_emb`
    parent), for its first attention layer's check: some models never hand them to the attention layers (Llama 4),
    which then verify the positions the rotary embedding used. A call without them records None (refused there:
    the model would number its shard from 0). Idempotent; configs and other modules: nothing."""
    if not hasattr(model, "modules"):
        return
    for module in model.modules():
        if getattr(module, "_ringwise_position_hook", False) or not hasattr(module, "rotary_emb"):
            continue
        try:
            signature = inspect.signature(module.forward)
        except (TypeError, ValueError):
            continue
        if "position_ids" not in signature.parameters or not hasattr(module, "config"):
            continue
        module.register_forward_pre_hook(_record_positions, with_kwargs=True)
        module._ringwise_position_hook = True


def _record_positions(module, args, kwargs):
    try:
        bound = inspect.signature(module.forward).bind_partial(*args, **kwargs)
        positions = bound.arguments.get("position_ids")
    except TypeError:
        positions = None
    _ring_of(module.config).model_positions = (positions,)
    return None


def _mark_towers(model) -> None:
    """A multimodal model's towers (vision, audio: every module config other than the model's and its text
    model's) run on inputs every rank holds whole, not on sequence shards: their attention layers object at
    their first call, on every rank alike. The language model runs through the ring on inputs_embeds."""
    if not hasattr(model, "modules"):
        return
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for c in configs_of(model):
        if c is config or c is text:  # check_model found no problem in them: none to read again in a forward
            _ring_of(c).config_problems = []  # (where it might be traced by torch.compile)
            continue
        _ring_of(c).config_problems = [
            f"model_type={getattr(c, 'model_type', None)!r}: this tower of {type(model).__name__} runs on inputs "
            "every rank holds whole (images), not on this rank's sequence shard, so ring attention cannot run it; "
            "compute its features outside the ring (a copy with another attn_implementation, on every rank), merge "
            "them into the global inputs_embeds and pass this rank's shard (rw.shard_batch(..., inputs_embeds=))"
        ]


def from_config(config, shard: SeqShard | None = None, ffn_tile: int | None = None, **kwargs):
    """AutoModelForCausalLM.from_config with ringwise attention, checked before and after building;
    shard: the model's own ring (default: use_ring's); ffn_tile: the feed-forward's tile in gradient
    forwards (tile_feed_forward: None = tile_size(config), 0 = untiled). A vision-language model with
    M-RoPE (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, GLM-4V): AutoModelForImageTextToText, its language model on
    ringwise and its vision tower on sdpa (attn_implementation= a dict of your own instead); feed it
    rw.shard_multimodal_batch's batches."""
    register()
    check_model(config)
    auto, attn = _auto_class(config)
    model = auto.from_config(config, attn_implementation=kwargs.pop("attn_implementation", attn), **kwargs)
    check_model(model)
    tile_feed_forward(model, ffn_tile)
    if shard is not None:
        configure(model, shard)
    return model


def from_pretrained(path, shard: SeqShard | None = None, ffn_tile: int | None = None, **kwargs):
    """AutoModelForCausalLM.from_pretrained with ringwise attention, checked before and after loading;
    shard: the model's own ring (default: use_ring's); ffn_tile: the feed-forward's tile in gradient
    forwards (tile_feed_forward: None = tile_size(config), 0 = untiled). A vision-language model with
    M-RoPE (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, GLM-4V): AutoModelForImageTextToText, its language model on
    ringwise and its vision tower on sdpa (attn_implementation= a dict of your own instead); feed it
    rw.shard_multimodal_batch's batches."""
    from transformers import AutoConfig

    register()
    config = AutoConfig.from_pretrained(path)
    check_model(config)
    auto, attn = _auto_class(config)
    model = auto.from_pretrained(path, attn_implementation=kwargs.pop("attn_implementation", attn), **kwargs)
    check_model(model)
    tile_feed_forward(model, ffn_tile)
    if shard is not None:
        configure(model, shard)
    return model


def _auto_class(config):
    """The Auto class that builds the model of `config` and its attn_implementation: a causal LM on ringwise, or a
    vision-language model (hf_multimodal) with its language model on ringwise and its vision tower on sdpa."""
    from transformers import AutoModelForCausalLM

    if is_supported_vlm(config):
        from transformers import AutoModelForImageTextToText

        towers = {k: TOWER_IMPLEMENTATION for k in ("vision_config", "audio_config") if getattr(config, k, None)}
        return AutoModelForImageTextToText, {"": NAME, "text_config": NAME, **towers}
    return AutoModelForCausalLM, None if attention_free(config) else NAME  # pure Mamba2 takes no implementation


def generate(model, input_ids: torch.Tensor, **generate_kwargs):
    """`model.generate(input_ids, **generate_kwargs)` with the prompt sharded over the model's ring:
    prefill through ring attention, K/V kept sharded where the ring left them, each step decoded
    over the whole sharded cache with ringwise.decode_attention. Every rank calls it with the same
    prompt and options (and, to sample, the same random state: torch.manual_seed) and gets the
    sequences model.generate returns in one process. Greedy search and sampling; refused alike
    on every rank: padding masks, beam search, assisted decoding, caches of the caller's,
    Ulysses meshes. See hf_generate.py."""
    from .hf_generate import generate as sharded_generate

    try:
        check_model(model)
        objection = None
    except ValueError as e:  # raised on every rank by generate's one verdict
        objection = str(e)
    return sharded_generate(model, input_ids, objection=objection, **generate_kwargs)


def shard_batch(
    input_ids: torch.Tensor,
    labels: torch.Tensor | None = None,
    cu_seqlens=None,
    shard: SeqShard | None = None,
    *,
    token_type_ids: torch.Tensor | None = None,
    mm_token_type_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    model=None,
) -> dict:
    """A global (batch, seq) batch -> this rank's model inputs (shard: the model's ring; default
    use_ring's, or model's own ring when model= is given; `shard_of(model)` gives it).

    Labels are shifted on the *global* sequence before sharding (each token's target is
    the next global token; the last token of every document gets -100), position_ids are
    the global positions of the local tokens; documents go to the model as ringwise_cu_seqlens.
    `model(**out).loss` (labels included) is rw.causal_lm_loss's share: these labels, passed as they are,
    are known to be shifted; a copy of them is refused.

    token_type_ids / mm_token_type_ids (global, like input_ids; needs model=): the per-token types from which
    the model builds a blockwise mask (Gemma 3's image tokens, PaliGemma's prefix). This rank's shard goes to
    the model under the same name, and the groups the model's own rule makes of the *global* types go to every
    rank alike as ringwise_group_ids (one id per global position: the rows of the batch must agree), which the
    attention layers check against the groups the model built from its shard and hand the ring.
    inputs_embeds (global, (batch, seq, hidden)): the model's input instead of input_ids (image features merged
    on the global sequence, outside the ring); labels still come from input_ids (or labels).
    """
    if shard is None and model is not None:
        shard = shard_of(model)
    seq = shard or _shard_of()
    batch = seq.shard_batch(input_ids, labels, cu_seqlens)
    _SHIFTED[id(batch["labels"])] = batch["labels"]  # model(**out) takes these as they are (RingLoss)
    out: dict[str, object] = dict(batch)  # the model's keywords: cu_seqlens renamed below
    if "cu_seqlens" in out:
        out["ringwise_cu_seqlens"] = out.pop("cu_seqlens")
    given = {
        k: v
        for k, v in dict(token_type_ids=token_type_ids, mm_token_type_ids=mm_token_type_ids).items()
        if v is not None
    }
    if len(given) > 1:
        raise ValueError("shard_batch: give token_type_ids or mm_token_type_ids (the model's own), not both")
    for name, types in given.items():
        if tuple(types.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"shard_batch: {name} shape {tuple(types.shape)} must equal input_ids shape {tuple(input_ids.shape)}"
            )
        if model is None:
            raise ValueError(f"shard_batch: {name} needs model= (the model's own rule groups the tokens)")
        try:
            out["ringwise_group_ids"] = global_group_ids(model, types)
        except ValueError as e:
            raise ValueError(f"shard_batch: {e}") from None
        out[name] = seq.shard(types)
    if inputs_embeds is not None:
        if tuple(inputs_embeds.shape[:2]) != tuple(input_ids.shape):
            raise ValueError(
                f"shard_batch: inputs_embeds shape {tuple(inputs_embeds.shape)} must be input_ids' "
                f"{tuple(input_ids.shape)} and a hidden size"
            )
        del out["input_ids"]
        out["inputs_embeds"] = seq.shard(inputs_embeds)
    return out


def shard_multimodal_batch(
    model,
    input_ids: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    pixel_values: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    pixel_values_videos: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    mm_token_type_ids: torch.Tensor | None = None,
    cu_seqlens=None,
    **model_kwargs,
) -> dict:
    """This rank's batch of a vision-language model with M-RoPE (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, GLM-4V) from the
    global one (every argument the same on every rank, as the processor returns it; no padding mask):
    `model(**batch)` runs the language model through the model's ring, exactly (hf_multimodal.py).

    The vision tower runs here, on every rank, on all of the batch's images, with gradients when they are on:
    each rank's loss share reaches the tower's parameters through its own tokens' features (sum the parameter
    gradients over the ranks, as for any parameter). The batch: this rank's `input_ids`; `mm_encoder_outputs`,
    the tower's outputs for this rank's visual tokens in their local order (Qwen3-VL's DeepStack features too);
    `position_ids` (4, batch, local): row 0 the global text positions, rows 1-3 the model's own M-RoPE positions
    of the global sequence; `labels` shifted on the global sequence (rw.shard_batch's). cu_seqlens: packed
    documents' global boundaries (M-RoPE positions run on across documents, which attention within each
    document does not see: every row moves by the same offset). model_kwargs: further keywords of the model's
    forward that its position ids read (e.g. Qwen2.5-VL's second_per_grid_ts).

    Gemma 3, Gemma 4 and PaliGemma (image tokens that see each other whole, plain positions): the same call with
    their token types (token_type_ids=; Gemma 4: mm_token_type_ids= and image_position_ids=) gives this rank's
    input_ids, global position_ids, token types, the global ringwise_group_ids (the model's own rule on the global
    types), its image tokens' features (mm_encoder_outputs) and the shifted labels. Images only."""
    problem = supported_problem(model)
    if problem:
        raise ValueError(f"shard_multimodal_batch: {problem}")
    check_model(model)
    inputs = dict(
        model_kwargs,
        pixel_values=pixel_values,
        image_grid_thw=image_grid_thw,
        pixel_values_videos=pixel_values_videos,
        video_grid_thw=video_grid_thw,
        mm_token_type_ids=mm_token_type_ids,
    )
    seq = shard_of(model)
    try:
        local = multimodal_inputs(model, input_ids, inputs, seq)
    except ValueError as e:
        raise ValueError(f"shard_multimodal_batch: {e}") from None
    out = shard_batch(input_ids, labels, cu_seqlens, shard=seq)  # shifted labels, documents
    out.update(local)
    return out


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, shard: SeqShard | None = None) -> torch.Tensor:
    """This rank's share of the mean next-token loss over the *global* labelled-token count.

    Summing these over the ranks gives the whole batch's mean loss, so summing the
    parameter gradients over the ranks gives its exact gradient. A model configured for
    ringwise returns the same share as `model(**batch).loss` (RingLoss).
    """
    count = _label_sums(labels, shard or _shard_of())[0]
    return _ce_share(logits, labels, count.clamp_min(1))


# ---------------------------------------------------------------- the model's own loss (model(labels=).loss)

# The label tensors shard_batch returned (by id, held weakly): shifted on the global sequence, so the model's
# loss takes them as they are. Other `labels` cannot be told apart from unshifted ones, and are refused.
_SHIFTED: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()


def _label_sums(labels: torch.Tensor, shard: SeqShard, extra=(), ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """[labelled tokens, *extra] summed over the shard's ranks (float64): the loss's one collective."""
    sums = torch.tensor([0.0, *extra], dtype=torch.float64, device=labels.device)
    sums[0] = (labels != ignore_index).sum()
    return shard.all_reduce(sums)


def _ce_share(logits: torch.Tensor, labels: torch.Tensor, denominator, ignore_index: int = IGNORE_INDEX):
    """The loss math, said once: this rank's summed next-token cross-entropy (float32) / denominator."""
    local = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=ignore_index, reduction="sum")
    return local / (denominator.to(local.device, local.dtype) if torch.is_tensor(denominator) else denominator)


class RingLoss:
    """A ringwise model's `loss_function` (check_model, configure, from_config and from_pretrained install it):
    `model(**batch, labels=...).loss` is rw.causal_lm_loss's share on this rank, or an error raised alike on
    every rank. Targets: the `labels` rw.shard_batch returned (already shifted on the global sequence, not
    shifted again) or transformers' `shift_labels` (pre-shifted, used as they are); any other `labels` are
    refused (a collator's copy of input_ids would be shifted inside each rank's shard: wrong, silently).
    Denominator: the ring's labelled-token count, or transformers' `num_items_in_batch` when it passes one.
    Each rank's objections ride in the loss's one all-reduce, so every rank raises the same error before
    any backward ring starts."""

    def __init__(self, config):
        self.config = config  # the model's: its ring (configure, use_ring) is read at each call
        self.returned = None  # (weakref to the loss last returned, its version), for _check_loss_hook

    def __call__(
        self,
        logits,
        labels=None,
        vocab_size=None,
        num_items_in_batch=None,
        ignore_index=IGNORE_INDEX,
        shift_labels=None,
        **kwargs,
    ):
        shard = _shard_of(_ring_of(self.config))
        targets = (shift_labels if shift_labels is not None else labels).to(logits.device)
        n = None if num_items_in_batch is None else float(num_items_in_batch)
        flags = (
            shift_labels is None and _SHIFTED.get(id(labels)) is not labels,  # not known to be shifted
            tuple(targets.shape) != tuple(logits.shape[:-1]),
            n is not None,
            n or 0.0,
            (n or 0.0) ** 2,
        )  # num_items_in_batch: given, its sum, its sum of squares
        sums = _label_sums(targets, shard, [float(f) for f in flags], ignore_index)
        unshifted, bad_shape, given, n_sum, n_sq = sums[1:].tolist()
        problems = _loss_problems(unshifted, bad_shape, given, n_sum, n_sq, world=shard.world)
        if problems:
            raise ValueError("ringwise: model(labels=...).loss refused on every rank: " + "; ".join(problems))
        loss = _ce_share(logits, targets, sums[0].clamp_min(1) if n is None else num_items_in_batch, ignore_index)
        self.returned = (weakref.ref(loss), loss._version)
        return loss


def _loss_problems(unshifted, bad_shape, given, n_sum, n_sq, world) -> list[str]:
    """The objections of the ring's ranks, from their summed flags: the same list on every rank."""
    problems = []
    if unshifted:
        problems.append(
            f"the labels on {int(unshifted)} of the ring's {world} ranks are not the tensor rw.shard_batch returned, "
            "so ringwise cannot tell whether they are already shifted (transformers would shift them again, inside "
            "each rank's shard). Pass the labels rw.shard_batch returned, straight to the model (a copy is not "
            "recognised, e.g. .to(device): shard the batch on the model's device), or pass shift_labels= (targets "
            "already shifted on the global sequence, then sharded), or compute the loss with "
            "rw.causal_lm_loss(model(**batch).logits, labels)"
        )
    if bad_shape:
        problems.append(
            f"on {int(bad_shape)} of the ring's {world} ranks the labels' shape is not the logits' "
            "(batch, local sequence): pass this rank's shard of them (rw.shard_batch), no logits_to_keep"
        )
    if 0 < given < world:
        problems.append(f"num_items_in_batch was passed on {int(given)} of the ring's {world} ranks only")
    elif given and abs(world * n_sq - n_sum * n_sum) > 1e-9 * n_sum * n_sum:
        problems.append(
            "num_items_in_batch differs between the ring's ranks: each rank would divide its share by "
            "another count; pass the whole batch's labelled-token count, the same on every rank"
        )
    return problems


def _install_loss(model) -> None:
    """Give a transformers model the ring-aware loss through the public `model.loss_function` setter, and a
    forward hook that refuses a loss computed any other way (idempotent; configs and other modules: nothing)."""
    if not isinstance(getattr(type(model), "loss_function", None), property):
        return
    current = model.loss_function
    if not isinstance(current, RingLoss) and current is _transformers_causal_lm_loss():
        try:
            model.loss_function = RingLoss(model.config)
        except AttributeError:  # a transformers without the setter: the hook refuses model(labels=)
            pass
    if not getattr(model, "_ringwise_loss_hook", False):
        model.register_forward_hook(_check_loss_hook, with_kwargs=True)
        model._ringwise_loss_hook = True


def _transformers_causal_lm_loss():
    from transformers.loss.loss_utils import ForCausalLMLoss

    return ForCausalLMLoss


def _check_loss_hook(module, args, kwargs, output):
    """After a forward that returned a loss: it must be the tensor RingLoss returned, unchanged. Whether it is
    depends on the model class and config alone, so every rank raises alike (after the loss's collective)."""
    if isinstance(output, tuple):  # return_dict=False: the loss comes first when labels were given
        loss = output[0] if kwargs.get("labels") is not None else None
    else:
        loss = getattr(output, "loss", None)
    if loss is None:
        return
    fn = module.loss_function
    returned = fn.returned if isinstance(fn, RingLoss) else None
    if returned is not None:
        fn.returned = None
        if returned[0]() is loss and loss._version == returned[1]:
            return
    prop = getattr(type(module), "loss_function", None)
    if isinstance(fn, RingLoss):
        why = (
            f"{type(module).__name__}'s forward computed its loss without model.loss_function"
            if returned is None
            else "the model changed the loss after its loss_function returned it (e.g. added a router "
            "load-balancing loss, output_router_logits=True, computed on this rank's tokens only)"
        )
    elif isinstance(prop, property) and prop.fset is None:
        why = (
            f"{type(module).__name__}.loss_function has no setter (transformers {_transformers_version()}), "
            "so ringwise cannot give the model its ring-aware loss"
        )
    else:
        why = (
            f"the model's loss_function is {getattr(fn, '__name__', type(fn).__name__)}, not ringwise's "
            "ring-aware causal LM loss (check_model / configure install it over transformers' ForCausalLMLoss)"
        )
    raise ValueError(
        f"ringwise: model(labels=...).loss would not be the exact loss over the ring: {why}. Compute "
        "it with rw.causal_lm_loss(model(**batch).logits, labels)"
    )
