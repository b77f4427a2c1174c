"""Vision-language models through the ring: with multimodal RoPE (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, GLM-4V), and
with image-token groups (Gemma 3, Gemma 4, PaliGemma: BLOCK_VLMS, at the end).

    import ringwise.integrations.transformers as rw
    model = rw.from_config(vlm_config)   # text model: "ringwise"; vision tower: "sdpa" (replicated, outside the ring)
    batch = rw.shard_multimodal_batch(model, input_ids, labels, pixel_values=pixels, image_grid_thw=grid,
                                      mm_token_type_ids=types)   # global inputs, the same on every rank
    loss = model(**batch).loss           # this rank's share; backward reaches the vision tower through it

The vision tower runs on every rank on the whole batch's images (its own attention implementation, never
ringwise: check_model refuses that), the language model through the ring. `rw.shard_multimodal_batch`
(transformers.py, over multimodal_inputs here) runs the model's own code on the *global* sequence: the tower
(`get_image_features` / `get_video_features`) and the multimodal position ids (the model's forward, with its
language model stopped at its first call: whatever the installed transformers names the computation,
get_rope_index or compute_3d_position_ids). It hands each rank:

- `input_ids`: its tokens (the layout's shard); the model embeds them and merges its own features in;
- `mm_encoder_outputs`: the tower's outputs for this rank's visual tokens only, in their local order (the
  merged features and Qwen3-VL's DeepStack features alike), slices of the tower's global outputs, so each
  rank's loss share sends its gradient back through the tower; summed over the ranks, one process's;
- `position_ids`: (4, batch, local), the model's 4-row form: row 0 the global text positions (what the
  attention layers get, checked by the op like any model's), rows 1-3 the global (time, height, width)
  M-RoPE positions of the local tokens;
- `labels` shifted on the global sequence (rw.shard_batch's), `ringwise_cu_seqlens` for packed documents.

The rows 1-3 cannot be checked against anything the attention layers see, so a model configured for ringwise
takes M-RoPE positions from this helper only (recognised by identity, as rw.shard_batch's labels are): any
other position ids (3-row ones, the model's own from a shard, a copy) are refused at the first attention
layer on every rank alike, and `pixel_values` given to the model itself (the tower would run inside the
ring's forward and the features would not match the shard's tokens) are refused before the tower runs.

Gemma 3, Gemma 4 and PaliGemma rotate by plain positions; their image tokens see each other whole (a block overlay
from the token types). For them the tower runs the same way (images only: videos and audio are refused), each rank
gets its own image tokens' rows of its output, its token types and the global ringwise_group_ids (the model's own
rule on the global types, checked by the attention layers against the groups the model builds from its shard), at
rw.shard_batch's global positions. rw.generate prefills the prompt with its groups through the ring; the decode steps
are causal (transformers builds them without the types too). PaliGemma's generate() numbers positions from 1 (ringwise's
prefill from 0) and is refused there.
"""

from __future__ import annotations

import inspect
import weakref
from typing import Any

import torch

from .hf_rings import ModelRing, ring_of

NAME = "ringwise"
# top-level model_type -> the family's name; tested in tests/test_hf_multimodal.py
MROPE_VLMS = {
    "qwen2_vl": "Qwen2-VL",
    "qwen2_5_vl": "Qwen2.5-VL",
    "qwen3_vl": "Qwen3-VL",
    "glm4v": "GLM-4V",
    "qwen3_vl_moe": "Qwen3-VL-MoE",
    "glm4v_moe": "GLM-4.5V",
    "qwen3_5": "Qwen3.5",  # gated DeltaNet layers (hf_linear); tested in tests/test_hf_linear.py
    "qwen3_5_moe": "Qwen3.5-MoE",
}
# top-level model_type -> the family's name: vision-language models whose image tokens see each other (a block
# overlay built from the token types) at plain text positions; their token types' keyword. Tested in
# tests/test_hf_multimodal.py (the tower through rw.shard_multimodal_batch) and tests/test_hf_masks.py (inputs_embeds)
BLOCK_VLMS = {"gemma3": "Gemma 3", "gemma4": "Gemma 4", "paligemma": "PaliGemma"}
TYPES_KEYWORD = {"gemma3": "token_type_ids", "gemma4": "mm_token_type_ids", "paligemma": "token_type_ids"}
_TOWER_KEYWORDS = {"gemma4": ("image_position_ids",)}  # what get_image_features takes beside pixel_values
_PIXELS = ("pixel_values", "pixel_values_videos", "input_features")
TOWER_IMPLEMENTATION = "sdpa"  # what from_config / from_pretrained give the vision tower

# The 4-row position ids shard_multimodal_batch returned (by id, held weakly): the only M-RoPE positions a
# ringwise model takes. Rows 1-3 cannot be verified from what the attention layers see.
_POSITIONS: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()


def is_supported_vlm(model_or_config) -> bool:
    """Whether this is (the config of) a vision-language model that ringwise runs with shard_multimodal_batch."""
    return is_mrope_vlm(model_or_config) or is_block_vlm(model_or_config)


def is_mrope_vlm(model_or_config) -> bool:
    """Whether this is (the config of) one of the M-RoPE vision-language models (MROPE_VLMS)."""
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "model_type", None) in MROPE_VLMS


def is_block_vlm(model_or_config) -> bool:
    """Whether this is (the config of) one of the vision-language models with image-token groups (BLOCK_VLMS)."""
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "model_type", None) in BLOCK_VLMS


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def implementation_problems(model) -> list[str] | None:
    """check_model's rule on attention implementations for a supported vision-language model (None: not one):
    the language model on ringwise, every tower on another implementation (the wrapper's own config runs no
    attention layer: transformers gives it the default implementation unless the dict names one for "")."""
    if not is_supported_vlm(model) or not hasattr(model, "modules"):
        return None
    config = model.config
    text = _text_config(config)
    ring: set[str] = set()
    towers: dict[str, str] = {}
    for m in model.modules():
        c = getattr(m, "config", None)
        if c is None:
            continue
        impl = str(getattr(c, "_attn_implementation", None))
        if c is text:
            ring.add(impl)
        elif c is not config:
            towers.setdefault(str(getattr(c, "model_type", type(c).__name__)), impl)
    problems = []
    if ring != {NAME}:
        problems.append(
            f"its language model's attention implementations are {sorted(ring)}, not only '{NAME}'; load it with "
            f"attn_implementation={{'text_config': '{NAME}', 'vision_config': '{TOWER_IMPLEMENTATION}'}} after "
            "use_ring() (rw.from_config / rw.from_pretrained do)"
        )
    try:
        takes_outputs = "mm_encoder_outputs" in inspect.signature(inner_model(model).forward).parameters
    except (ValueError, TypeError) as e:
        problems.append(str(e))
        takes_outputs = True  # said above
    if not takes_outputs:
        problems.append(
            f"this transformers' {type(model).__name__} takes no precomputed vision features (mm_encoder_outputs, "
            "transformers 5.25), through which rw.shard_multimodal_batch hands each rank its own tokens' features"
        )
    on_ring = sorted(t for t, impl in towers.items() if impl == NAME)
    if on_ring and is_mrope_vlm(model):  # a block-group model's tower on ringwise is refused at its first call
        # instead (rw.shard_multimodal_batch checks it first): its language model also runs on inputs_embeds of
        # features computed outside the ring (rw.shard_batch(..., inputs_embeds=))
        problems.append(
            f"its vision tower ({', '.join(f'model_type={t!r}' for t in on_ring)}) has attn_implementation="
            f"'{NAME}', but it runs on every rank on the whole batch's images, outside the ring (its patches are "
            "not a sequence shard); give it another implementation: attn_implementation={'text_config': "
            f"'{NAME}', 'vision_config': '{TOWER_IMPLEMENTATION}'}} (rw.from_config / rw.from_pretrained do)"
        )
    return problems


def inner_model(model):
    """The module that holds the vision tower and the language model (Qwen2VLModel, ...): the model itself or
    its `.model`."""
    for m in (model, getattr(model, "model", None)):
        if m is not None and hasattr(m, "language_model") and hasattr(m, "get_image_features"):
            return m
    raise ValueError(
        f"{type(model).__name__} holds no vision-language model (a module with language_model and "
        "get_image_features); pass the ...ForConditionalGeneration model or its .model"
    )


def prepare(model) -> None:
    """check_model's part for a supported vision-language model that passed its checks: its language model's
    first attention layer then requires shard_multimodal_batch's position ids, and the model refuses images
    given to it directly. Idempotent."""
    if not is_supported_vlm(model) or not hasattr(model, "modules"):
        return
    state = ring_of(_text_config(model.config))
    state.config_problems, state.mrope = [], is_mrope_vlm(model)
    inner = inner_model(model)
    if not getattr(inner, "_ringwise_pixel_hook", False):
        inner.register_forward_pre_hook(_refuse_pixels, with_kwargs=True)
        inner._ringwise_pixel_hook = True


def _refuse_pixels(module, args, kwargs):
    given = [k for k in _PIXELS if kwargs.get(k) is not None]
    if given:
        raise ValueError(
            f"ringwise: {type(module).__name__} got {given[0]}: its vision tower would run inside the ring's forward "
            "and its features would not match this rank's share of the image tokens. Prepare each rank's batch "
            "with rw.shard_multimodal_batch(model, input_ids, labels, pixel_values=..., ...) (the tower runs there, "
            "on the whole batch) and call the model with it, or generate with rw.generate"
        )
    return None


def positions_problem(state: ModelRing) -> str | None:
    """The first attention layer's objection to the M-RoPE positions of a model prepared here, or None."""
    if not state.mrope:
        return None
    if torch.compiler.is_compiling():
        return (
            "ringwise cannot verify multimodal RoPE (M-RoPE) position ids inside a compiled graph (they are "
            "recognised as rw.shard_multimodal_batch's by identity); run the vision-language model uncompiled"
        )
    positions = state.model_positions[0] if state.model_positions is not None else None
    if positions is not None and _POSITIONS.get(id(positions)) is positions:
        return None
    return (
        "the language model's multimodal RoPE (M-RoPE) position ids are not the (4, batch, local) tensor "
        "rw.shard_multimodal_batch returned, so ringwise cannot tell that their (time, height, width) rows are "
        "the global positions of this rank's tokens (a model that computes them itself numbers its shard alone). "
        "Call the model with rw.shard_multimodal_batch's batch as it is (a copy, e.g. .to(device), is not "
        "recognised: prepare the batch on the model's device)"
    )


def mrope_text_positions(state: ModelRing) -> torch.Tensor | None:
    """Row 0 (the global text positions) of the rw.shard_multimodal_batch positions the language model was
    called with, for the op's check; None where it was called with others (refused by positions_problem)."""
    positions = state.model_positions[0] if state.model_positions is not None else None
    if not isinstance(positions, torch.Tensor) or torch.compiler.is_compiling():
        return None
    return positions[0] if _POSITIONS.get(id(positions)) is positions else None


class _Stop(Exception):
    """Raised by the captured language model: the positions are known, nothing more is run."""


def _global_position_ids(inner, input_ids, outputs: dict, extra: dict) -> torch.Tensor | None:
    """The model's own (3, batch, seq) M-RoPE position ids of the global sequence, or None where it computes
    none (no images): its forward run on the global tokens and features until its language model's call."""
    lm = inner.language_model
    seen: dict[str, Any] = {}

    def capture(*args, **kwargs):
        seen.update(kwargs)
        raise _Stop

    lm.forward = capture  # an instance attribute over the class's forward, removed below
    try:
        with torch.no_grad():
            inner(input_ids=input_ids, mm_encoder_outputs=dict(outputs), **extra)
    except _Stop:
        pass
    finally:
        del lm.forward
    if "inputs_embeds" not in seen:  # pragma: no cover - a transformers that no longer calls its language model
        raise ValueError(f"{type(inner).__name__}'s forward did not reach its language model")
    return seen.get("position_ids")


def _rows(features) -> torch.Tensor:
    """A tower's features as one (tokens, hidden) tensor, in token order."""
    whole = torch.cat(list(features), dim=0) if isinstance(features, (list, tuple)) else features
    return whole.reshape(-1, whole.shape[-1])


def _local_output(output, local_rows: torch.Tensor):
    """A copy of a tower output (get_image_features') with only the rows of this rank's tokens, in local order:
    its merged features and (Qwen3-VL) each DeepStack layer's features."""

    def take(value):  # Qwen: (tokens, hidden); Gemma 4: one per image; Gemma 3: (images, tokens, hidden)
        whole = _rows(value)
        part = whole.index_select(0, local_rows)
        return (part,) if isinstance(value, (list, tuple)) else part

    fields = {"pooler_output": take(output.pooler_output)}
    deepstack = getattr(output, "deepstack_features", None)
    if deepstack is not None:
        fields["deepstack_features"] = [take(f) for f in deepstack]
    return type(output)(**fields)


MULTIMODAL_INPUTS = (  # what rw.generate hands a vision-language model's prefill rather than generate()
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
    "mm_token_type_ids",
    "token_type_ids",
    "image_position_ids",
    "video_position_ids",
    "num_frames_per_video",
    "input_features",
    "input_features_mask",
)


def _global_inputs(model, input_ids: torch.Tensor, inputs: dict[str, Any]):
    """The model's own computations on the global sequence: (tower outputs by modality, (4, batch, seq) position
    ids with row 0 the text positions, each modality's (batch, seq) placeholder mask). The model passed
    check_model (the callers see to it)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq), got {getattr(input_ids, 'shape', input_ids)!r}")
    inputs = {k: v for k, v in inputs.items() if v is not None}
    if inputs.get("attention_mask") is not None:
        raise ValueError("ringwise does not support padding masks; pack sequences without padding")
    grids = [k for k in ("image_grid_thw", "video_grid_thw") if k in inputs]
    if grids and "mm_token_type_ids" not in inputs:
        raise ValueError(
            f"{grids[0]} was given without mm_token_type_ids (the processor returns it with input_ids): the model "
            "computes its multimodal positions from it"
        )
    inner = inner_model(model)
    outputs: dict[str, Any] = {}
    if inputs.get("pixel_values") is not None:
        outputs["image"] = inner.get_image_features(
            inputs["pixel_values"], inputs.get("image_grid_thw"), return_dict=True
        )
    if inputs.get("pixel_values_videos") is not None:
        outputs["video"] = inner.get_video_features(
            inputs["pixel_values_videos"], inputs.get("video_grid_thw"), return_dict=True
        )
    extra = {k: v for k, v in inputs.items() if k not in _PIXELS}
    positions = _global_position_ids(inner, input_ids, outputs, extra)  # checks the tokens against the features
    batch, length = input_ids.shape
    text = torch.arange(length, device=input_ids.device).expand(1, batch, length)
    if positions is None:  # no images: every row the text positions, as the model does
        positions = text.expand(3, batch, length)
    if positions.shape[0] == 4:  # a transformers that already gives the text row
        positions = positions[1:]
    positions = torch.cat([text, positions.to(text.device, text.dtype)], dim=0)
    dummy = torch.zeros(batch, length, 1, device=input_ids.device)
    placeholders = inner.get_placeholder_mask(input_ids, inputs_embeds=dummy)
    masks = {m: placeholders[i][..., 0].to(input_ids.device) for i, m in enumerate(("image", "video"))}
    return outputs, positions, masks


def _local_inputs(seq, input_ids, positions, outputs: dict, masks: dict) -> dict:
    """This rank's input_ids, position_ids (registered: the only M-RoPE positions the model takes) and
    mm_encoder_outputs (the rows of its own visual tokens, in local order), from global ones of one length."""
    batch, length = input_ids.shape
    local_positions = seq.shard(positions, dim=2)
    _POSITIONS[id(local_positions)] = local_positions
    out: dict[str, Any] = {"input_ids": seq.shard(input_ids), "position_ids": local_positions}
    if outputs:
        local: dict[str, Any] = {}
        for modality, output in outputs.items():
            mask = masks[modality]
            rows = (mask.flatten().cumsum(0) - 1).view(batch, length)  # each token's row in the tower's output
            local[modality] = _local_output(output, seq.shard(rows)[seq.shard(mask)])
        out["mm_encoder_outputs"] = local
    return out


def supported_problem(model) -> str | None:
    """Why shard_multimodal_batch cannot prepare a batch for this model, or None."""
    if is_supported_vlm(model) and hasattr(model, "modules"):
        config, text = model.config, _text_config(model.config)
        on_ring = sorted(
            {
                str(getattr(m.config, "model_type", type(m.config).__name__))
                for m in model.modules()
                if getattr(m, "config", None) is not None
                and m.config is not config
                and m.config is not text
                and getattr(m.config, "_attn_implementation", None) == NAME
            }
        )
        if on_ring:  # (an M-RoPE model's check_model said so already)
            return (
                f"its vision tower ({', '.join(on_ring)}) has attn_implementation='{NAME}', but it runs here on every "
                "rank on the whole batch's images, outside the ring; give it another implementation: "
                f"attn_implementation={{'text_config': '{NAME}', 'vision_config': '{TOWER_IMPLEMENTATION}'}} "
                "(rw.from_config / rw.from_pretrained do)"
            )
        return None
    names = [*MROPE_VLMS.values(), *BLOCK_VLMS.values()]
    return (
        f"{type(model).__name__} (model_type={getattr(getattr(model, 'config', None), 'model_type', None)!r}) is "
        f"not one of the vision-language models ringwise prepares ({', '.join(names)})"
    )


def multimodal_inputs(model, input_ids: torch.Tensor, inputs: dict[str, Any], seq) -> dict:
    """rw.shard_multimodal_batch's model inputs for this rank of `seq`, from the global ones; the model passed
    check_model. M-RoPE models: input_ids, position_ids, mm_encoder_outputs. Block-group models: mm_encoder_outputs,
    this rank's token types and the global ringwise_group_ids (rw.shard_batch gives input_ids and position_ids)."""
    if is_block_vlm(model):
        per_layer = getattr(_text_config(model.config), "hidden_size_per_layer_input", 0)
        if per_layer:
            raise ValueError(
                f"Gemma 4 with per-layer inputs (hidden_size_per_layer_input={per_layer}) is not verified through "
                "rw.shard_multimodal_batch: in its test the vision tower's gradients exceed the float32 budget against "
                "one process (logits and loss within it); rw.generate of such a model is tested and runs"
            )
        outputs, types, masks = _block_global_inputs(model, input_ids, inputs)
        return _block_local_inputs(model, seq, input_ids, types, outputs, masks)
    outputs, positions, masks = _global_inputs(model, input_ids, inputs)
    return _local_inputs(seq, input_ids, positions, outputs, masks)


def block_input_problem(model, input_ids, inputs: dict[str, Any]) -> str | None:
    """What a block-group model (BLOCK_VLMS) cannot take through the ring of these global inputs, or None. Images
    only: the model's other inputs (videos, audio) are untested through the ring and refused."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        return f"input_ids must be (batch, seq), got {getattr(input_ids, 'shape', input_ids)!r}"
    config = model.config
    family, key = BLOCK_VLMS[config.model_type], TYPES_KEYWORD[config.model_type]
    inputs = {k: v for k, v in inputs.items() if v is not None}
    if inputs.get("attention_mask") is not None:
        return "ringwise does not support padding masks; pack sequences without padding"
    tower = _TOWER_KEYWORDS.get(config.model_type, ())
    takes = ("pixel_values", key, *tower)
    other = sorted(k for k in inputs if k not in takes)
    if other:
        return (
            f"{family} through the ring takes images ({', '.join(takes)}); {', '.join(other)}: not supported "
            "(videos and audio are untested through the ring)"
        )
    types = inputs.get(key)
    if types is not None and tuple(types.shape) != tuple(input_ids.shape):
        return f"{key} shape {tuple(types.shape)} must equal input_ids shape {tuple(input_ids.shape)}"
    if inputs.get("pixel_values") is not None:
        if types is None:
            return f"pixel_values were given without {key}: {family} groups each image's tokens by them"
        missing = [k for k in tower if k not in inputs]
        if missing:
            return f"pixel_values were given without {missing[0]}, which {family}'s vision tower needs"
    return None


def _block_global_inputs(model, input_ids: torch.Tensor, inputs: dict[str, Any]):
    """A block-group model's computations on the global sequence: (tower outputs by modality, the global token
    types or None, each modality's (batch, seq) placeholder mask)."""
    problem = block_input_problem(model, input_ids, inputs)
    if problem:
        raise ValueError(problem)
    config = model.config
    inputs = {k: v for k, v in inputs.items() if v is not None}
    types = inputs.get(TYPES_KEYWORD[config.model_type])
    outputs: dict[str, Any] = {}
    image = input_ids == config.image_token_id
    if inputs.get("pixel_values") is not None:
        extra = {k: inputs[k] for k in _TOWER_KEYWORDS.get(config.model_type, ())}
        output = inner_model(model).get_image_features(inputs["pixel_values"], **extra)
        rows = _rows(output.pooler_output).shape[0]
        if rows != int(image.sum()):
            raise ValueError(
                f"the vision tower gave {rows} image features for {int(image.sum())} image tokens "
                f"(image_token_id={config.image_token_id}) in input_ids"
            )
        outputs["image"] = output
    return outputs, types, {"image": image}


def _block_local_inputs(model, seq, input_ids, types, outputs: dict, masks: dict) -> dict:
    """This rank's mm_encoder_outputs (the rows of its own image tokens, in local order), token types and the global
    ringwise_group_ids (the model's own rule on the global types), from global ones of one length."""
    from .hf_masks import global_group_ids

    batch, length = input_ids.shape
    out: dict[str, Any] = {}
    if types is not None:
        out[TYPES_KEYWORD[model.config.model_type]] = seq.shard(types)
        out["ringwise_group_ids"] = global_group_ids(model, types)
    if outputs:
        local: dict[str, Any] = {}
        for modality, output in outputs.items():
            mask = masks[modality]
            rows = (mask.flatten().cumsum(0) - 1).view(batch, length)
            local[modality] = _local_output(output, seq.shard(rows)[seq.shard(mask)])
        out["mm_encoder_outputs"] = local
    return out


def generation_problem(model, input_ids, inputs: dict, copies: int) -> str | None:
    """rw.generate's objection to a vision-language model's call (checked before its verdict), or None."""
    if copies > 1:
        return "num_return_sequences > 1 is not supported for vision-language models yet"
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 1:
        return None  # generate's own check words it
    if is_block_vlm(model):
        return (
            supported_problem(model)  # a tower on ringwise
            or block_input_problem(model, input_ids, inputs)
            or _block_generation_problem(model, input_ids)
        )
    try:
        dummy = torch.zeros(*input_ids.shape, 1, device=input_ids.device)
        masks = inner_model(model).get_placeholder_mask(input_ids, inputs_embeds=dummy)
    except Exception as e:  # whatever the model objects to, said alike on every rank
        return f"{type(e).__name__}: {e}"
    if any(bool(m[:, -1].any()) for m in masks):
        return (
            "the prompt ends with an image or video token; rw.generate decodes from the prompt's last token with "
            "the text positions after the images (end the prompt with text, as chat templates do)"
        )
    return None


def _block_generation_problem(model, input_ids) -> str | None:
    config = model.config
    if config.model_type == "paligemma":
        return (
            "PaliGemma numbers its positions from 1 when it generates (its prepare_inputs_for_generation adds 1), "
            "while ringwise's prefill rotates the prompt by the layout's global positions from 0: the decoded tokens "
            "would sit one position further from the prompt than in one process (not exact); generate PaliGemma "
            "with another attn_implementation"
        )
    placeholders = [getattr(config, f"{m}_token_id", None) for m in ("image", "video", "audio")]
    last = input_ids[:, -1]
    if any(bool((last == t).any()) for t in placeholders if t is not None):
        return (
            "the prompt ends with an image or video token; rw.generate decodes from the prompt's last token, which "
            "must be text (end the prompt with text, as chat templates do)"
        )
    return None


def prefill(model, input_ids: torch.Tensor, inputs: dict, cache, keyword: str) -> None:
    """rw.generate's prefill of a vision-language model: the prompt but its last token through the ring on this
    rank's layout shard (padded at its end as the layout needs), the tower run on the whole prompt's images, the
    M-RoPE positions of the whole prompt (the model keeps its rope_deltas, from which generate() numbers the
    tokens it decodes)."""
    import torch.nn.functional as F

    from ..attention.kvcache import prompt_loads

    if is_block_vlm(model):
        return _block_prefill(model, input_ids, inputs, cache, keyword)
    shard = cache.shard
    outputs, positions, masks = _global_inputs(model, input_ids, inputs)
    length = input_ids.shape[1] - 1
    if length == 0:
        cache.store.set_prompt([0] * shard.ring_size, 0)
        return
    padded = length + shard.pad_len(length)
    pad = (0, padded - length)
    ids = F.pad(input_ids[:, :length], pad)  # trailing pads: after every real token, dropped from the cache
    positions = F.pad(positions[..., :length], pad)
    positions[0] = torch.arange(padded, device=positions.device)  # the pads' text positions: the layout's own
    masks = {m: F.pad(mask[:, :length], pad) for m, mask in masks.items()}
    cache.prefill_positions = shard.positions(padded, input_ids.device)
    cache.store.set_prompt(prompt_loads(shard.layout, shard.ring_size, padded, length), length)
    model.base_model(**_local_inputs(shard, ids, positions, outputs, masks), **{keyword: cache}, use_cache=True)


def _block_prefill(model, input_ids: torch.Tensor, inputs: dict, cache, keyword: str) -> None:
    """rw.generate's prefill of a block-group model (Gemma 3, Gemma 4): the tower on the whole prompt's images, the
    prompt but its last token through the ring (padded at its end with text tokens, which no real token sees), its
    image tokens' groups from the global token types, at the layout's global positions. The decode steps that follow
    are causal (the model builds their masks without the types: its last prompt token and the new ones are text)."""
    import torch.nn.functional as F

    from ..attention.kvcache import prompt_loads

    shard = cache.shard
    outputs, types, masks = _block_global_inputs(model, input_ids, inputs)
    batch, length = input_ids.shape[0], input_ids.shape[1] - 1
    if length == 0:
        cache.store.set_prompt([0] * shard.ring_size, 0)
        return
    padded = length + shard.pad_len(length)
    pad = (0, padded - length)
    ids = F.pad(input_ids[:, :length], pad)  # trailing pads: after every real token, dropped from the cache
    types = None if types is None else F.pad(types[:, :length], pad)  # 0: text (Gemma 3's and Gemma 4's rule)
    masks = {m: F.pad(mask[:, :length], pad) for m, mask in masks.items()}
    positions = shard.positions(padded, input_ids.device)
    cache.prefill_positions = positions
    cache.store.set_prompt(prompt_loads(shard.layout, shard.ring_size, padded, length), length)
    local = _block_local_inputs(model, shard, ids, types, outputs, masks)
    model.base_model(
        input_ids=shard.shard(ids),
        position_ids=positions[None].expand(batch, -1),
        **local,
        **{keyword: cache},
        use_cache=True,
    )
