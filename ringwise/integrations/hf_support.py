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
from typing import Any

import torch

from .hf_hybrids import is_sharded_layer, sharded_layer_types
from .hf_multimodal import MROPE_VLMS

# The families ringwise accepts: each model_type that a test builds and runs through the ring against one process
# (tests/test_hf_*.py; tests/test_hf_support.py asserts that this is exactly the set of model types those tests
# build, and docs/transformers.md's table names each). model_type -> the model types its text config may have, for
# a model whose text config is a sub-config of its own (the multimodal wrappers): only the combinations tested.
# Every other model_type is refused (check_model, and a model's first attention call), alike on every rank: the
# generic checks below accept hundreds of transformers' families that no test has run, and a family no test has
# shown exact never runs.
TESTED_FAMILIES: dict[str, tuple[str, ...]] = {
    # causal text models (test_hf_architectures, test_hf_families, test_hf_generate, test_transformers)
    **dict.fromkeys(
        (
            "llama",
            "mistral",
            "qwen2",
            "gemma2",
            "gemma3_text",
            "gpt_oss",
            "qwen2_moe",
            "llama4_text",
            "qwen3_next",  # gated DeltaNet layers sharded by hf_linear (test_hf_linear)
            "kimi_linear",  # KDA layers sharded by hf_linear (test_hf_linear)
            "lfm2",  # short-convolution layers sharded by hf_linear (test_hf_linear)
            "mamba2",  # Mamba2 (SSD) mixers sharded by hf_ssd, and the hybrids on them (test_hf_ssd)
            "bamba",
            "falcon_h1",
            "granitemoehybrid",
            "nemotron_h",
            "zamba2",
            "lfm2_moe",  # LFM2's short-convolution layers sharded by hf_linear (test_hf_linear)
            "minimax",  # lightning-attention layers sharded by hf_lightning (test_hf_lightning)
            "jamba",  # Mamba1 mixers sharded by hf_ssm, and the hybrids and RG-LRU models beside it (test_hf_ssm)
            "zamba",
            "recurrent_gemma",
            "mamba",
            "falcon_mamba",
            "qwen3",
            "qwen3_moe",
            "mixtral",
            "phimoe",
            "granitemoe",
            "jetmoe",
            "deepseek_v3",
            "gemma",
            "phi",
            "phi3",
            "olmo",
            "olmo2",
            "olmo3",
            "cohere",
            "cohere2",
            "starcoder2",
            "ministral",
            "exaone4",
            "gpt_neox",
            "stablelm",
            "granite",
            "smollm3",
            "glm",
            "glm4",
            "helium",
            "nemotron",
            "seed_oss",
            "arcee",
            "ernie4_5",
            "opt",
            "gpt2",
            "gptj",
            "codegen",
            "falcon",
            "gemma4_text",  # test_hf_masks (with EmbeddingGemma, gemma3_text bidirectional)
        ),
        (),
    ),  # fmt: skip
    # multimodal language models on inputs_embeds / token types (test_hf_masks)
    "gemma3": ("gemma3_text",),
    "gemma4": ("gemma4_text",),
    "paligemma": ("gemma",),
    # M-RoPE vision-language models on rw.shard_multimodal_batch (test_hf_multimodal)
    "qwen2_vl": ("qwen2_vl_text",),
    "qwen2_5_vl": ("qwen2_5_vl_text",),
    "qwen3_vl": ("qwen3_vl_text",),
    "qwen3_vl_moe": ("qwen3_vl_moe_text",),
    "glm4v": ("glm4v_text",),
    "glm4v_moe": ("glm4v_moe_text",),
    "qwen3_5": ("qwen3_5_text",),  # gated DeltaNet layers sharded by hf_linear (test_hf_linear)
    "qwen3_5_moe": ("qwen3_5_moe_text",),
}

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
        sharded = sharded_layer_types(c)  # sharded by their family's adapters (hf_hybrids)
        extra = sorted(set(getattr(c, "layer_types", None) or ()) - set(ATTENTION_LAYER_TYPES) - sharded)
        if extra:
            problems.append(
                f"layers of type {extra} mix tokens outside attention (config.layer_types); "
                "ringwise makes only full, sliding-window and chunked attention layers exact"
            )
        blocks = sorted(
            {str(b) for b in getattr(c, "layers_block_type", None) or ()}
            - {"attention", *ATTENTION_LAYER_TYPES}
            - sharded
        )
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
    if not problems:  # what no test has run is refused too (a reason above says more, so it alone is given)
        problems += family_problems(config)
    return problems


def family_problems(config) -> list[str]:
    """Why the config's family is refused as untested (TESTED_FAMILIES), if it is: its model_type, or the model type
    of its text config, is not one a test has run through the ring."""
    configs = _configs(config)
    model_type = str(getattr(config, "model_type", None) or type(config).__name__)
    if model_type not in TESTED_FAMILIES:
        return [_untested(f"model_type={model_type!r}")]
    if len(configs) > 1:
        text_type = str(getattr(configs[1], "model_type", None) or type(configs[1]).__name__)
        if text_type not in TESTED_FAMILIES[model_type]:
            return [
                _untested(
                    f"model_type={model_type!r} with a {text_type!r} language model",
                    f"{model_type} is tested with {' / '.join(TESTED_FAMILIES[model_type])} only",
                )
            ]
    return []


def _untested(what: str, why: str = "") -> str:
    return (
        f"{what} is not one of the families ringwise is tested with ({why or 'no test runs it'}): "
        "ringwise runs only what a test has shown exact against one process (docs/transformers.md, Architectures), "
        "and refuses the rest rather than run it unverified. To ask for it, open an issue naming the model type and "
        "a checkpoint; supporting it means a test that runs a tiny random config of its real classes through the ring "
        "against one process (tests/test_hf_families.py) and its name in TESTED_FAMILIES (ringwise.integrations."
        "hf_support)"
    )


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
    handled = {n for n, m in model.named_modules() if is_sharded_layer(m)}  # sharded (hf_hybrids)
    convs = [
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv1d) and n.rpartition(".")[0] not in handled
    ]
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


def _model_class(model_or_config) -> tuple[Any, Any, type | None]:
    """(the model or None, its config, the model's class or the causal LM class the config builds, if known)."""
    if hasattr(model_or_config, "named_modules"):
        return model_or_config, model_or_config.config, type(model_or_config)
    from transformers import AutoModelForCausalLM

    try:
        # transformers types the mapping's values as (slow, fast) tokenizer pairs; a model mapping holds classes
        return None, model_or_config, AutoModelForCausalLM._model_mapping[type(model_or_config)]  # type: ignore
    except KeyError:
        return None, model_or_config, None


def attention_free(model_or_config) -> bool:
    """Whether the model runs no attention at all (pure Mamba2): a tested family (TESTED_FAMILIES) whose modeling
    code has no attention registry and whose config lists only layers ringwise shards (hf_hybrids). It takes no
    attn_implementation; any other model without the registry is refused."""
    _, config, cls = _model_class(model_or_config)
    types = getattr(config, "layer_types", None) or getattr(config, "layers_block_type", None) or ()
    return (
        getattr(config, "model_type", None) in TESTED_FAMILIES
        and cls is not None
        and not uses_registry(cls)
        and bool(types)
        and {str(t) for t in types} <= sharded_layer_types(config)
    )


def architecture_problems(model_or_config) -> list[str]:
    """Every reason a model (or the causal LM a config builds) cannot run exactly under ringwise."""
    model, config, cls = _model_class(model_or_config)
    problems = []
    if (
        cls is not None
        and not uses_registry(cls)
        and not _text_model_uses_registry(model, config)
        and not attention_free(model_or_config)
    ):
        problems.append(
            f"{cls.__name__} does not use transformers' attention registry (its attention, if any, is "
            "hard-coded), so attn_implementation='ringwise' cannot reach it"
        )
    problems += config_problems(config)
    if model is not None:
        problems += module_problems(model)
    return list(dict.fromkeys(problems))
