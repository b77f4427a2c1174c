"""Support is explicit (issue 30): ringwise accepts the transformers families a test runs through the ring against
one process (TESTED_FAMILIES, one list), and refuses every other model_type alike on every rank, with the reason,
however harmless its config looks to the generic checks (on transformers 5.25 they pass ~680 config classes, of which
a few dozen are tested). The list cannot drift: it is exactly the set of model types (and text model types) that the
exactness tests build, and docs/transformers.md's table names each family as exact."""

import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_models import SMALL  # noqa: E402
from hf_versions import EAGER_EXPERTS, REFUSED_HERE, VERSION  # noqa: E402

import ringwise.integrations.transformers as rw  # noqa: E402
from ringwise.integrations.hf_multimodal import MROPE_VLMS  # noqa: E402
from ringwise.integrations.hf_support import TESTED_FAMILIES  # noqa: E402

if VERSION < (5, 25):
    pytest.skip(
        f"transformers {transformers.__version__}: the list is the lock's (5.25) tested families; older releases "
        "lack some of them (their tests skip by name)",
        allow_module_level=True,
    )

UNTESTED = "is not one of the families ringwise is tested with"


def _types(config) -> tuple[str, str]:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return config.model_type, text.model_type


def built_by_the_exactness_tests() -> dict[str, set[str]]:
    """model_type -> its text model types, of every config the exactness tests run through the ring (refusal
    tests aside): the architecture, family, generation, mask and multimodal grids."""
    import hf_models
    import test_hf_architectures
    import test_hf_families
    import test_hf_generate
    import test_hf_lightning
    import test_hf_linear
    import test_hf_masks
    import test_hf_multimodal
    import test_hf_ssd
    import test_hf_ssm
    import test_transformers

    configs = [hf_models.make_config(c[0]) for c in test_hf_architectures.CASES]
    configs += [hf_models.make_config(c["name"]) for c in test_hf_generate.GRID]
    configs += [test_hf_families.make_config(n) for n in test_hf_families.FAMILIES if n not in REFUSED_HERE]
    configs += [test_hf_masks.make_config(n) for n in test_hf_masks.EXACT]
    configs += [test_hf_multimodal.make_config(n) for n in test_hf_multimodal.FAMILIES]
    configs += [test_hf_multimodal.block_config(n) for n in test_hf_multimodal.BLOCK_FAMILIES]
    configs += [test_transformers.make_config(n) for n in ("llama", "qwen2", "mistral")]
    configs += [test_hf_linear.make_config(n) for n in test_hf_linear.FAMILIES]
    configs += [test_hf_ssm.make_config(n) for n in test_hf_ssm.FAMILIES]
    configs += [test_hf_ssd.make_config(n) for n in test_hf_ssd.FAMILIES]
    configs += [test_hf_lightning.make_config(n) for n in test_hf_lightning.FAMILIES]
    built: dict[str, set[str]] = {}
    for config in configs:
        model_type, text_type = _types(config)
        built.setdefault(model_type, set())
        if text_type != model_type:
            built[model_type].add(text_type)
    return built


def test_the_list_is_what_the_tests_build():
    built = built_by_the_exactness_tests()
    listed = {k: set(v) for k, v in TESTED_FAMILIES.items()}
    assert listed.keys() - built.keys() == set(), "listed as tested, but no exactness test builds it"
    assert built.keys() - listed.keys() == set(), "built by an exactness test: add it to TESTED_FAMILIES"
    assert listed == built, "the text model types a multimodal family is listed with are the ones its tests build"
    assert set(MROPE_VLMS) <= listed.keys()


def test_the_docs_table_names_each_tested_family_as_exact():
    """Every family the table marks exact names its model_type in backticks, and they are the list's."""
    text = (Path(__file__).parents[1] / "docs" / "transformers.md").read_text()
    rows = [line.split("|") for line in text.splitlines() if line.startswith("| ") and line.count("|") >= 5]
    exact = set()
    for row in rows:
        if row[2].strip().startswith("exact"):
            exact |= {t for t in re.findall(r"`([a-z0-9_]+)`", row[1]) if t in transformers.CONFIG_MAPPING}
    assert exact == set(TESTED_FAMILIES)


@pytest.mark.parametrize(
    "config",
    ["Gemma3nConfig", "Gemma4UnifiedConfig", "EmbeddingGemma2Config", "LlavaConfig", "BertConfig", "OlmoeConfig"],
)
def test_untested_families_are_refused_by_check_model(config):
    """Families the generic checks have nothing against (their default configs pass them) are refused as untested,
    naming the model type."""
    if not hasattr(transformers, config):
        pytest.skip(f"transformers {transformers.__version__} has no {config}")
    cfg = getattr(transformers, config)()
    with pytest.raises(ValueError, match=rf"model_type='{cfg.model_type}' {UNTESTED} \(no test runs it\)"):
        rw.check_model(cfg)


def test_a_tested_wrapper_with_an_untested_language_model_is_refused():
    """PaliGemma is tested with a Gemma language model; PaliGemma 2's Gemma 2 is another combination."""
    cfg = transformers.PaliGemmaConfig(text_config=transformers.Gemma2Config(**SMALL, head_dim=8))
    with pytest.raises(ValueError, match=rf"'paligemma' with a 'gemma2' language model {UNTESTED}"):
        rw.check_model(cfg)
    rw.check_model(transformers.PaliGemmaConfig(text_config=transformers.GemmaConfig(**SMALL, head_dim=8)))


def olmoe():
    return transformers.OlmoeConfig(**SMALL, num_experts=4, num_experts_per_tok=2)


def untested_run(how):
    """This rank's refusal of an untested family (OLMoE: registry attention, nothing the generic checks object to):
    by rw.from_config, or at the first attention call of a model transformers built directly."""
    rw.use_ring(layout="zigzag")
    torch.manual_seed(0)
    try:
        if how == "from_config":
            rw.from_config(olmoe(), **EAGER_EXPERTS)
        else:
            model = transformers.AutoModelForCausalLM.from_config(
                olmoe(), attn_implementation="ringwise", **EAGER_EXPERTS
            )
            batch = rw.shard_batch(torch.randint(3, 64, (1, 16), generator=torch.Generator().manual_seed(0)))
            batch.pop("labels")
            model(**batch)
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.parametrize("how", ["from_config", "built directly"])
def test_untested_family_is_refused_alike_on_every_rank(cluster, how):
    messages = cluster(2).run(untested_run, how)
    assert messages[0] is not None and all(m == messages[0] for m in messages), messages
    assert f"model_type='olmoe' {UNTESTED}" in messages[0], messages[0]
    assert "open an issue" in messages[0]
