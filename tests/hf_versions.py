"""What the installed transformers offers, read once, so the HF tests run on every version pyproject allows
(4.53 up): families newer than the installed version are skipped by name, never faked."""

import pytest
from packaging.version import Version

transformers = pytest.importorskip("transformers")

VERSION = Version(transformers.__version__).release  # (major, minor, patch)

_REGISTRY = "does not use transformers' attention registry"
_TENSOR_MASK = "tensor attention mask"
# What ringwise says, collectively, to families that transformers < 5 does not yet route through the attention
# registry (hard-coded attention) or the mask registry (a 4-D mask built by the model): refused, never wrong.
# Run on 4.53 and 4.57.1; read from the 4.54-4.57 wheels: GPT-2 uses the mask registry from 4.54.1 on,
# the others only in 5.x.
REFUSED_BEFORE_5 = dict(
    qwen2_moe=_REGISTRY,
    phimoe=_REGISTRY,
    jetmoe=_REGISTRY,
    stablelm=_REGISTRY,
    nemotron=_REGISTRY,
    gptj=_REGISTRY,
    codegen=_REGISTRY,
    granitemoe=_TENSOR_MASK,
    opt=_TENSOR_MASK,
    **(dict(gpt2=_TENSOR_MASK) if VERSION < (4, 54, 1) else {}),
)


def uses_attention_registry(family: str) -> bool:
    """Read from transformers' own source, not from ringwise: does modeling_<family> look its attention up in
    ALL_ATTENTION_FUNCTIONS? (On 4.53 this agrees with every registry refusal above.)"""
    import importlib
    import inspect

    try:
        module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    except ImportError:  # a family this version lacks is skipped by its test
        return True
    return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(module)


class _Refusals(dict):
    """family -> what ringwise's refusal must say on the installed transformers, decided by behavior: a family
    whose modeling code does not look its attention up in the registry (read from transformers' source here,
    not from ringwise) is refused as such; on transformers < 5 also the families above. A family absent here is
    expected exact. 5.x moved the hard-coded families into the registry one by one (GPT-J and CodeGen by 5.24,
    rotary Falcon by 5.25), so nothing here names a version for them."""

    def __missing__(self, family):
        if VERSION < (5, 0) and family in REFUSED_BEFORE_5:
            return REFUSED_BEFORE_5[family]
        if not uses_attention_registry(MODELING_OF.get(family, family)):
            return _REGISTRY
        raise KeyError(family)

    def __contains__(self, family):
        try:
            self[family]
        except KeyError:
            return False
        return True


POSITIONS_UNSEEN = "receive no position_ids"  # ringwise's refusal of a model whose layers never see positions


def attention_sees_position_ids(config, **kwargs) -> bool:
    """Behavior, not ringwise: does the installed transformers hand this model's attention function position_ids?
    One forward in one process through a spy registered beside SDPA (some 4.x families, e.g. Cohere 2, keep them
    in the model: ringwise then cannot verify the positions and refuses)."""
    import torch
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    seen = []

    def spy(module, *args, **kw):
        seen.append(kw.get("position_ids") is not None)
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, *args, **kw)

    AttentionInterface.register("position_spy", spy)
    AttentionMaskInterface.register("position_spy", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="position_spy", **kwargs)
    with torch.no_grad():
        model(input_ids=torch.randint(3, 60, (1, 8)), position_ids=torch.arange(8)[None])
    return bool(seen) and all(seen)


MODELING_OF = dict(falcon_new_decoder="falcon")  # test variants of a family -> its modeling module
REFUSED_HERE = _Refusals()

# transformers 5 chooses an experts kernel per model; grouped_mm has no float64 kernel for the oracle, so the
# tests ask for eager experts. Older versions have one (eager) implementation and no such keyword.
EAGER_EXPERTS = (
    dict(experts_implementation="eager") if hasattr(transformers.PretrainedConfig, "_experts_implementation") else {}
)


def config_class(name):
    """transformers.<name>, or a skip that names the installed version when it has no such config."""
    try:
        return getattr(transformers, name)
    except AttributeError:
        pytest.skip(f"transformers {transformers.__version__} has no {name}")


def rope_scaling(rope_type, **params):
    """Config keywords for RoPE scaling: rope_parameters in transformers 5; before, rope_scaling with the legacy
    `type` key (Phi3Config 4.x accepts exactly type, short_factor, long_factor) and rope_theta beside it."""
    import inspect

    if "rope_parameters" in inspect.signature(transformers.LlamaConfig.__init__).parameters:
        return dict(rope_parameters=dict(rope_type=rope_type, rope_theta=10000.0, **params))
    return dict(rope_scaling=dict(type=rope_type, **params), rope_theta=10000.0)
