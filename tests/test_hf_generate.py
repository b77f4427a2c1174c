"""rw.generate: transformers' generate() over a sequence-sharded cache returns, on every rank, the
sequences model.generate returns in one process (float64 models, eager attention there): greedy and
seeded sampling, sliding windows shorter than the prompt, hybrid local/global layers, Llama 4's chunks, sinks,
soft-capping, GQA, W = 2 and 3, prompts of 1 token, of fewer tokens than ranks, and not divisible by
the layout. One decode_attention (one all-gather) per layer and token; refusals alike on every rank."""

import pytest
import torch
import torch.distributed as dist

transformers = pytest.importorskip("transformers")

from helpers import ALL_GATHER_SINGLE, count_comms  # noqa: E402
from hf_models import REFERENCE_ATTN, make_config, needs_smollm2, smollm2_folder  # noqa: E402
from hf_versions import EAGER_EXPERTS, REFUSED_HERE, VERSION  # noqa: E402

import ringwise.integrations.transformers as rw  # noqa: E402

if VERSION < (5, 0):
    pytest.skip(
        f"rw.generate needs transformers 5 (cache layers); {transformers.__version__} is refused",
        allow_module_level=True,
    )

NEW = 7
OPTIONS = dict(max_new_tokens=NEW, eos_token_id=None, pad_token_id=0)


def prompt(length, batch=2, seed=1):
    return torch.randint(3, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def model_for(name, attn):
    torch.manual_seed(0)
    if attn == "ringwise":
        return rw.from_config(make_config(name), **EAGER_EXPERTS).double().eval()
    return (
        transformers.AutoModelForCausalLM.from_config(make_config(name), attn_implementation=attn, **EAGER_EXPERTS)
        .double()
        .eval()
    )


def sampling(case):
    return dict(do_sample=True, top_k=0, top_p=0.9, temperature=0.8) if case.get("sample") else dict(do_sample=False)


def ring_generate(case):
    from ringwise.attention.decode import AGREEMENTS

    AGREEMENTS.forget(every=True)  # counted below for a group's first decode calls (a group used before at another size
    rw.use_ring(layout=case["layout"])  # pays one more gather and a worded check at its first call)
    model = model_for(case["name"], "ringwise")
    torch.manual_seed(5)
    with count_comms() as comms:
        out = rw.generate(model, prompt(case["prompt"]), **OPTIONS, **sampling(case))
    return dict(tokens=out, comms=dict(comms.counts), layers=model.config.num_hidden_layers)


def single_generate(case):
    model = model_for(case["name"], REFERENCE_ATTN.get(case["name"], "eager"))
    torch.manual_seed(5)
    return model.generate(prompt(case["prompt"]), **OPTIONS, **sampling(case))


GRID = [
    dict(name=n, world=W, layout="zigzag", prompt=21)
    for n in ("llama", "mistral", "gemma2", "gpt_oss", "qwen2", "qwen2_moe")
    for W in (2, 3)
]
GRID += [
    dict(name="gemma3", world=3, layout="zigzag", prompt=21),
    dict(name="llama4", world=2, layout="zigzag", prompt=21),  # chunked layers decode with chunk=
    dict(name="llama4", world=3, layout="striped", prompt=17, sample=True),
    dict(name="llama", world=3, layout="contiguous", prompt=2),  # one prompt token to prefill: 2 ranks hold none
    dict(name="llama", world=2, layout="striped", prompt=1),  # nothing to prefill
    dict(name="mistral", world=3, layout="zigzag", prompt=17, sample=True),
    dict(name="gpt_oss", world=2, layout="zigzag", prompt=13, sample=True),
    dict(name="llama_9_3_64", world=2, layout="zigzag", prompt=21),  # real models' heads and head dims
    dict(name="llama_5_1_80", world=3, layout="striped", prompt=21),
    dict(name="llama_7_7_128", world=3, layout="zigzag", prompt=17),
]


@pytest.mark.parametrize(
    "case",
    GRID,
    ids=lambda c: f"{c['name']}-W{c['world']}-{c['layout']}-S{c['prompt']}" + ("-sampled" if c.get("sample") else ""),
)
def test_generate_matches_model_generate_in_one_process(grid_results, case):
    make_config(case["name"])  # skips an architecture the installed transformers lacks
    if case["name"] in REFUSED_HERE:
        pytest.skip(f"transformers {transformers.__version__} refuses {case['name']}")
    results = grid_results(ring_generate, GRID, case)
    for r in results:
        assert torch.equal(r["tokens"], results[0]["tokens"]), "ranks generated different sequences"
    assert torch.equal(results[0]["tokens"], single_generate(case))
    # NEW forwards (the last prompt token's, then one per new token but the last), one all-gather per layer
    # each, and the final cross-rank comparison
    gathers = results[0]["comms"].get(ALL_GATHER_SINGLE, 0)
    assert gathers == NEW * results[0]["layers"] + 1, results[0]["comms"]


# ---------------------------------------------------------------- a real model: SmolLM2-135M (9 / 3 heads, head_dim 64)

SMOLLM2_PROMPT = (
    "Ring attention splits a long sequence across devices. Each device keeps one block of queries, and "
    "the key and value blocks travel around the ring, so that"
)


def smollm2_generate(path, layout):
    """Greedy continuation of a real prompt in float32 (the model's own dtype; an odd payload per rank in the
    decode gather): through the ring (layout) on every rank, or in one process."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    ids = tokenizer(SMOLLM2_PROMPT, return_tensors="pt").input_ids
    options = dict(max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    if layout is None:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
        return model.eval().generate(ids, **options)
    rw.use_ring(layout=layout)
    return rw.generate(rw.from_pretrained(path).eval(), ids, **options)


@needs_smollm2
@pytest.mark.parametrize("world, layout", [(2, "zigzag"), (3, "striped")])
def test_smollm2_generate_matches_model_generate(cluster, world, layout):
    path = smollm2_folder()
    results = cluster(world).run(smollm2_generate, path, layout, timeout=600)
    want = smollm2_generate(path, None)
    for tokens in results:
        assert torch.equal(tokens, want), (tokens, want)


# ---------------------------------------------------------------- refusals, alike on every rank


def refusal(kind):
    rw.use_ring()
    if kind == "mla":  # DeepSeek-V3's value heads narrower than its query/key heads (exact in training)
        from test_hf_families import make_config as family_config

        torch.manual_seed(0)
        model = rw.from_config(family_config("deepseek_v3"), **EAGER_EXPERTS).double().eval()
    else:
        model = model_for("llama", "ringwise")
    ids = prompt(9)
    kw = dict(OPTIONS)
    if kind == "padding":
        kw["attention_mask"] = torch.ones_like(ids).index_fill_(1, torch.tensor([0]), 0)
    elif kind == "beams":
        kw["num_beams"] = 2
    elif kind == "own-cache":
        kw["past_key_values"] = transformers.DynamicCache()
    elif kind == "static":
        kw["cache_implementation"] = "static"
    elif kind == "prompt-differs" and dist.get_rank() == 1:
        ids = prompt(9, seed=2)
    elif kind == "ulysses":  # a 2-rank ring cut again over a 2-rank ulysses group
        from ringwise import SeqShard

        rw.configure(model, SeqShard("zigzag", None, dist.group.WORLD))
    elif kind == "random-state":
        torch.manual_seed(dist.get_rank())
        kw.update(do_sample=True)
    try:
        rw.generate(model, ids, **kw)
    except ValueError as e:
        return str(e)
    return None


REFUSALS = {
    "padding": "padding masks",
    "beams": "beam_search",
    "own-cache": "its own sequence-sharded cache",
    "static": "cache_implementation='static'",
    "prompt-differs": "different prompt",
    "random-state": "different random state",
    "ulysses": "Ulysses mesh",
    "mla": "multi-head latent attention (MLA: v_head_dim=8, query/key heads of 16)",
}


@pytest.mark.parametrize("kind", REFUSALS)
def test_refused_alike_on_every_rank(cluster, kind):
    messages = cluster(2).run(refusal, kind)
    assert messages[0] is not None and messages[0] == messages[1], messages
    assert REFUSALS[kind] in messages[0], messages[0]
