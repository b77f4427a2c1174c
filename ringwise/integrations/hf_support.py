"""Which transformers models ringwise can make exact: the static checks behind check_model.

Ring attention replaces the registry attention only. Anything else through which tokens
meet (ALiBi biases built by the model, convolutions, linear attention, state-space
layers) or that reads the sequence length (dynamic or longrope RoPE scaling from the
largest position ids) would see this rank's shard alone: silently wrong. These checks
read the model class, its config and its modules; nothing runs, so every rank reaches the
same verdict.
"""

from __future__ import annotations

import importlib
import inspect
import sys

import torch

from .hf_multimodal import MROPE_VLMS

ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")
LOCAL_LENGTH_ROPE = ("dynamic", "longrope")  # scaling chosen from each rank's own largest position


def uses_registry(cls) -> bool:
    """Whether a model class's modeling code dispatches attention through ALL_ATTENTION_FUNCTIONS."""
    module = sys.modules.get(cls.__module__)
    return module is not None and "ALL_ATTENTION_FUNCTIONS" in vars(module)


def _configs(config) -> list:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return [config] if text is config else [config, text]


def _rope_types(params) -> set[str]:
    """rope_type values in a rope_parameters / rope_scaling dict (flat, or one dict per layer type)."""
    if not isinstance(params, dict):
        return set()
    if "rope_type" in params or "type" in params:
        return {str(params.get("rope_type", params.get("type")))}
    return set().union(*(_rope_types(v) for v in params.values())) if params else set()


def config_problems(config) -> list[str]:
    """What in the config alone makes the model inexact under ringwise."""
    problems = []
    for c in _configs(config):
        extra = sorted(set(getattr(c, "layer_types", None) or ()) - set(ATTENTION_LAYER_TYPES))
        if extra:
            problems.append(
                f"layers of type {extra} mix tokens outside attention (config.layer_types); "
                "ringwise makes only full, sliding-window and chunked attention layers exact"
            )
        blocks = sorted({str(b) for b in getattr(c, "layers_block_type", None) or ()} - {"attention"})
        if blocks:
            problems.append(
                f"layers of type {blocks} (config.layers_block_type) are not attention; state-space and "
                "other recurrent layers would see one shard of the sequence"
            )
        alibi = (
            getattr(c, "alibi", False)
            or getattr(getattr(c, "attn_config", None), "alibi", False)
            or getattr(c, "position_embedding_type", None) == "alibi"
        )
        if alibi:
            problems.append(
                "ALiBi position biases are built by the model from the local sequence, outside the attention registry"
            )
        rope = {t for key in ("rope_parameters", "rope_scaling") for t in _rope_types(getattr(c, key, None))}
        problems += _local_length_rope(rope, "RoPE scaling")
        if uses_mrope(c, rope) and getattr(config, "model_type", None) not in MROPE_VLMS:
            problems.append(_mrope_problem(config))
    return problems


def _mrope_problem(config) -> str:
    if getattr(config, "vision_config", None) is not None:  # a vision-language model ringwise does not prepare
        return (
            "multimodal RoPE (M-RoPE) rotates by 3-D (time, height, width) positions that ringwise computes on "
            "the global sequence only for the vision-language models rw.shard_multimodal_batch prepares ("
            f"{', '.join(MROPE_VLMS.values())}); this one is not among them yet; run it with another "
            "attn_implementation"
        )
    return (
        "multimodal RoPE (M-RoPE) rotates by 3-D (time, height, width) positions that ringwise cannot verify "
        "in a text model alone; run the whole vision-language model (its ...ForConditionalGeneration, built with "
        "rw.from_config / rw.from_pretrained or checked by rw.check_model) on rw.shard_multimodal_batch's "
        "batch, or use another attn_implementation"
    )


def uses_mrope(config, rope_types=None) -> bool:
    """Whether a config's model rotates by multimodal RoPE: a rope type or mrope_section in its RoPE parameters,
    or a modeling module that reads mrope_section (transformers' defaults need no key: Qwen2-VL's text config
    without rope parameters still rotates by three rows)."""
    rope = (
        rope_types
        if rope_types is not None
        else {t for key in ("rope_parameters", "rope_scaling") for t in _rope_types(getattr(config, key, None))}
    )
    if "mrope" in rope or any(
        _has_key(getattr(config, key, None), "mrope_section") for key in ("rope_parameters", "rope_scaling")
    ):
        return True
    return _modeling_reads_mrope(type(config).__module__)


_READS_MROPE: dict[str, bool] = {}  # configuration module -> whether its modeling module reads mrope_section


def _modeling_reads_mrope(config_module: str) -> bool:
    """Whether the modeling module beside a configuration module reads mrope_section (from its source; cached).
    Not inside a torch.compile trace (importing and reading source cannot be traced): there only what check_model
    already read, outside the graph, is known; a model that never passed check_model is then judged by its rope
    keys, and its layers' position ids (3-row M-RoPE positions reach them as None and are refused)."""
    known = _READS_MROPE.get(config_module)
    if known is not None or torch.compiler.is_compiling():
        return bool(known)
    found = False
    if ".configuration_" in config_module:
        try:
            module = importlib.import_module(config_module.replace(".configuration_", ".modeling_"))
            found = "mrope_section" in inspect.getsource(module)
        except (ImportError, OSError, TypeError):
            pass
    _READS_MROPE[config_module] = found
    return found


def _has_key(params, key: str) -> bool:
    """Whether a rope_parameters / rope_scaling dict (flat, or one per layer type) holds `key`."""
    return isinstance(params, dict) and (key in params or any(_has_key(v, key) for v in params.values()))


def _local_length_rope(rope_types, what: str) -> list[str]:
    """The problem with RoPE scalings that depend on the local sequence length, if any is used."""
    local = sorted(t for t in rope_types if any(x in t for x in LOCAL_LENGTH_ROPE))
    if not local:
        return []
    return [
        f"{what} {local} picks its frequencies from each rank's largest position id, so the ranks would "
        "rotate differently; use a static scaling (default, linear, llama3, yarn)"
    ]


def module_problems(model) -> list[str]:
    """What in the built modules makes the model inexact under ringwise."""
    problems = []
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv1d)]
    if convs:
        problems.append(
            f"{len(convs)} sequence convolution(s) ({convs[0]}{', ...' if len(convs) > 1 else ''}: short "
            "convolutions, linear-attention or state-space mixers) would see one shard of the sequence"
        )
    rope = set()
    for m in model.modules():
        t = getattr(m, "rope_type", None)
        rope |= set(t.values()) if isinstance(t, dict) else {t} if isinstance(t, str) else set()
    return problems + _local_length_rope(rope, "rotary embedding modules use RoPE scaling")


def _text_model_uses_registry(model, config) -> bool:
    """Whether a model whose own class holds no attention (a multimodal wrapper: PaliGemma) runs its language model,
    the modules configured by its text config, through the registry."""
    if model is None:
        return False
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text is config:
        return False
    return any(uses_registry(type(m)) for m in model.modules() if getattr(m, "config", None) is text)


def architecture_problems(model_or_config) -> list[str]:
    """Every reason a model (or the causal LM a config builds) cannot run exactly under ringwise."""
    cls: type | None
    if hasattr(model_or_config, "named_modules"):
        model, config, cls = model_or_config, model_or_config.config, type(model_or_config)
    else:
        from transformers import AutoModelForCausalLM

        model, config = None, model_or_config
        try:
            # transformers types the mapping's values as (slow, fast) tokenizer pairs; a model mapping holds classes
            cls = AutoModelForCausalLM._model_mapping[type(config)]  # type: ignore[assignment]
        except KeyError:
            cls = None
    problems = []
    if cls is not None and not uses_registry(cls) and not _text_model_uses_registry(model, config):
        problems.append(
            f"{cls.__name__} does not use transformers' attention registry (its attention, if any, is "
            "hard-coded), so attn_implementation='ringwise' cannot reach it"
        )
    problems += config_problems(config)
    if model is not None:
        problems += module_problems(model)
    return list(dict.fromkeys(problems))
