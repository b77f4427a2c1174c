"""What ringwise cannot make exact in transformers is refused: the same clear error on every rank,
within seconds, never a hang and never a silently wrong result."""

import inspect
import time

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import count_comms  # noqa: E402
from hf_versions import REFUSED_HERE, VERSION, config_class, rope_scaling  # noqa: E402

import ringwise.integrations.transformers as rw  # noqa: E402
from ringwise.integrations.hf_masks import read_mask_function  # noqa: E402

SMALL = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
FAST = 20.0  # seconds: model construction and one collective, far below the 30 s process-group timeout


def refused_config(name):
    T = transformers
    if name == "bloom":  # ALiBi, attention hard-coded
        return T.BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4)
    if name == "falcon_alibi":  # ALiBi biases built by the model (rotary Falcon: test_hf_families.py)
        return T.FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=True)
    if name == "mpt":  # ALiBi, hard-coded attention
        return T.MptConfig(vocab_size=64, d_model=32, n_heads=4, n_layers=2)
    if name == "llama_dynamic_rope":
        return T.LlamaConfig(**SMALL, **rope_scaling("dynamic", factor=2.0))
    if name == "phi3_longrope":
        return T.Phi3Config(
            **SMALL,
            max_position_embeddings=64,
            original_max_position_embeddings=16,
            **rope_scaling("longrope", short_factor=[1.0] * 4, long_factor=[2.0] * 4),
        )
    raise ValueError(name)


REFUSED = {  # family -> what the error must say
    "bloom": "does not use transformers' attention registry",
    "falcon_alibi": "ALiBi",
    "mpt": "ALiBi",
    "llama_dynamic_rope": "RoPE scaling ['dynamic']",
    "phi3_longrope": "RoPE scaling ['longrope']",
}


def build_refused(name):
    rw.use_ring()
    try:
        rw.from_config(refused_config(name))
    except ValueError as e:
        return str(e)
    return None


def run_all(cluster, fn, *args):
    ranks = cluster(2)  # started (or reused) outside the clock
    start = time.monotonic()
    messages = ranks.run(fn, *args)
    assert time.monotonic() - start < FAST
    assert messages[0] is not None and all(m == messages[0] for m in messages), messages
    return messages[0]


@pytest.mark.parametrize("name", REFUSED)
def test_refused_family_raises_the_same_error_on_every_rank(cluster, name):
    refused_config(name)  # skips a family the installed transformers lacks, before any rank starts
    assert REFUSED[name] in run_all(cluster, build_refused, name)


@pytest.mark.parametrize("name", ["llama_dynamic_rope", "phi3_longrope"])
def test_check_model_reads_the_modules(name):
    """Built directly (past the config check), the modules alone still give the model away."""
    from ringwise.integrations.hf_support import module_problems

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(refused_config(name), attn_implementation="eager")
    assert module_problems(model)


def test_accepted_families_pass_check_model():
    for cfg in (
        transformers.LlamaConfig(**SMALL),
        transformers.MistralConfig(**SMALL, sliding_window=8),
        transformers.Gemma2Config(**SMALL, head_dim=8),
        transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4),
    ):
        rw.use_ring()
        rw.from_config(cfg)


def forward_refused(case):
    """One model call that some rank (or all) must refuse; returns that rank's error."""
    layout = "contiguous"
    rw.use_ring(layout=layout)
    rank = torch.distributed.get_rank()
    name = "gpt2" if case == "gpt2-dropout" else "llama"
    cfg = (
        transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, attn_pdrop=0.1)
        if name == "gpt2"
        else transformers.LlamaConfig(**SMALL)
    )
    torch.manual_seed(0)
    model = rw.from_config(cfg)
    ids = torch.randint(3, 64, (1, 16), generator=torch.Generator().manual_seed(0))
    batch = rw.shard_batch(ids)
    batch.pop("labels")
    kwargs = {}
    if case == "local-positions":  # rank 1's positions restart at 0: wrong rotary angles
        batch["position_ids"] = torch.arange(8)[None]
    elif case == "packed-positions" and rank == 1:  # packing by restarting positions, seen on rank 1 only
        batch["position_ids"] = torch.tensor([[8, 9, 10, 0, 1, 2, 3, 4]])
        kwargs["use_cache"] = False
    elif case == "padding-one-rank" and rank == 1:
        kwargs["attention_mask"] = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0]])
    elif case == "padding-second-model":  # a second model, same config object, after a clean forward of the first
        model(**batch)
        model = transformers.AutoModelForCausalLM.from_config(model.config, attn_implementation="ringwise")
        if rank == 1:
            kwargs["attention_mask"] = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0]])
    elif case == "custom-mask-one-rank" and rank == 0:
        kwargs["attention_mask"] = torch.ones(1, 1, 8, 8, dtype=torch.bool).tril()
    elif case == "flash-packing-kwargs":
        kwargs["cu_seq_lens_q"] = torch.tensor([0, 8], dtype=torch.int32)
    elif case == "gpt2-dropout":
        model.train()
    with count_comms() as c:
        try:
            model(**batch, **kwargs)
        except ValueError as e:
            assert not c.hops, f"refused after ring traffic: {dict(c.hops)}"
            return str(e)
    return None


FORWARD_REFUSALS = {
    "local-positions": "position_ids are not the global positions",
    "packed-positions": "position_ids are not the global positions",
    "padding-one-rank": "padding masks",
    "padding-second-model": "padding masks",
    "custom-mask-one-rank": "tensor attention mask",
    "flash-packing-kwargs": "cu_seq_lens_q",
    "gpt2-dropout": "attn_pdrop=0",
}


if "gpt2" in REFUSED_HERE:  # GPT-2 builds its own 4-D mask here: refused before dropout is looked at
    FORWARD_REFUSALS["gpt2-dropout"] = REFUSED_HERE["gpt2"]


@pytest.mark.parametrize("case", FORWARD_REFUSALS)
def test_forward_refusal_is_collective(cluster, case):
    """A problem that only one rank sees stops every rank with the same message, before ring traffic."""
    assert FORWARD_REFUSALS[case] in run_all(cluster, forward_refused, case)


MROPE = dict(rope_type="default", mrope_section=[2, 1, 1], rope_theta=10000.0)  # head_dim 8: 4 frequencies
MROPE_FAMILIES = {  # multimodal RoPE text models: family -> (config class, its extra arguments)
    "qwen2_vl": ("Qwen2VLTextConfig", dict(rope_parameters=MROPE)),
    "qwen2_5_vl": ("Qwen2_5_VLTextConfig", dict(rope_parameters=MROPE)),
    "qwen3_vl": ("Qwen3VLTextConfig", dict(head_dim=8, rope_parameters=dict(MROPE, mrope_interleaved=True))),
    "glm4v": ("Glm4vTextConfig", dict(rope_parameters=dict(MROPE, partial_rotary_factor=1.0))),
}


def mrope_config(name):
    cls, extra = MROPE_FAMILIES[name][0], dict(MROPE_FAMILIES[name][1])
    if "rope_parameters" not in inspect.signature(transformers.LlamaConfig.__init__).parameters:  # transformers 4
        params = dict(extra.pop("rope_parameters"))
        extra.update(rope_theta=params.pop("rope_theta"), rope_scaling=params)
    return config_class(cls)(**SMALL, **extra)


@pytest.mark.parametrize("name", MROPE_FAMILIES)
def test_mrope_models_are_refused_by_check_model(name):
    with pytest.raises(ValueError, match=r"M-RoPE"):
        rw.check_model(mrope_config(name))


def mrope_forward(name, rows):
    """A multimodal RoPE text model built directly by transformers (no check_model), called with global 3-row
    (time, height, width) or 4-row (text + 3) position ids: refused at its first attention call."""
    rw.use_ring(layout="zigzag")
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(mrope_config(name), attn_implementation="ringwise")
    batch = rw.shard_batch(torch.randint(3, 64, (1, 16), generator=torch.Generator().manual_seed(0)))
    positions = batch["position_ids"][None].expand(rows, -1, -1)
    try:
        model(input_ids=batch["input_ids"], position_ids=positions)
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.parametrize("rows", [3, 4])
@pytest.mark.parametrize("name", MROPE_FAMILIES)
def test_mrope_model_built_directly_is_refused_on_every_rank(cluster, name, rows):
    mrope_config(name)  # skips before any rank starts
    if rows == 4 and VERSION < (5, 0):
        pytest.skip(f"transformers {transformers.__version__} takes 3-row M-RoPE position ids only")
    message = run_all(cluster, mrope_forward, name, rows)
    assert "M-RoPE" in message and type(mrope_config(name)).model_type in message, message


def test_mask_functions_are_read_by_identity_not_guessed():
    """Each part of a mask function is recognised by its factory's code (chunked, bidirectional, OR-ed windows and
    block groups: test_hf_masks.py); a custom function equal to causal is still not read as causal."""
    mu = pytest.importorskip("transformers.masking_utils")
    assert read_mask_function(mu.causal_mask_function).window is None
    assert read_mask_function(mu.sliding_window_causal_mask_function(5)).window == 5
    chunked = inspect.signature(mu.chunked_causal_mask_function).parameters  # left_padding from 4.54
    spec = read_mask_function(
        mu.chunked_causal_mask_function(4, *([torch.zeros(1, dtype=torch.long)] if len(chunked) > 1 else []))
    )
    assert spec.causal and spec.chunk == 4
    everything = read_mask_function(mu.or_masks(mu.causal_mask_function, mu.sliding_window_overlay(3)))
    assert not everything.causal and everything.left is None and everything.right is None  # k <= q or k > q - 3
    for fn in (lambda b, h, q, k: k <= q, mu.and_masks(mu.causal_mask_function, lambda b, h, q, k: k >= 0)):
        with pytest.raises(ValueError, match="cannot reproduce exactly"):
            read_mask_function(fn)


def test_packed_sequence_masks_are_read():
    mu = pytest.importorskip("transformers.masking_utils")
    if not hasattr(mu, "remap_positions_for_packed_sequence"):
        pytest.skip(
            f"transformers {transformers.__version__} has no position remap for packed sequences (4.54-4.57 "
            "pack without one: the use_cache=False cases of test_hf_architectures.py cover that)"
        )
    pos = torch.arange(4)[None]
    spec = read_mask_function(
        mu.and_masks(
            mu.remap_positions_for_packed_sequence(mu.causal_mask_function, pos),
            mu.packed_sequence_mask_function(torch.zeros(1, 4)),
        )
    )
    assert spec.position_ids is pos and spec.window is None


def test_kv_cache_continuation_is_refused_at_the_hook():
    from transformers.masking_utils import causal_mask_function

    rw.use_ring()
    mask = rw.ringwise_mask(1, q_length=1, kv_length=9, q_offset=8, kv_offset=0, mask_function=causal_mask_function)
    assert "KV cache" in mask.problem
    older = rw.ringwise_mask(1, cache_position=torch.tensor([8]), kv_length=9, mask_function=causal_mask_function)
    assert "KV cache" in older.problem  # the keywords older transformers pass
    assert rw.ringwise_mask(1, q_length=4, kv_length=4, mask_function=causal_mask_function).problem is None


def test_packed_ids_on_a_rank_whose_positions_never_jump_are_an_objection():
    """transformers derives document ids from position jumps; where this rank's own positions have none (one
    process; contiguous shards; seen on 5.17 at W = 2) any such ids are not the layout's: an objection, not a crash."""
    mu = pytest.importorskip("transformers.masking_utils")
    if not hasattr(mu, "find_packed_sequence_indices"):
        pytest.skip(f"transformers {transformers.__version__} does not read documents from position jumps")
    rw.use_ring()
    assert "not the global positions" in rw._packed_problem(torch.tensor([[0, 0, 1, 1]]))
    assert rw._packed_problem(None) is None


def test_mask_hook_turns_any_error_into_an_objection(monkeypatch):
    """The hook never raises (a rank that raised there alone would leave the others waiting in the ring):
    whatever a check trips on is recorded and raised later by the collective check, on every rank alike."""
    from transformers.masking_utils import causal_mask_function

    def broken(_mask):
        raise AttributeError("'bool' object has no attribute 'all'")

    rw.use_ring()
    monkeypatch.setattr(rw, "_padding_problem", broken)
    mask = rw.ringwise_mask(1, q_length=4, kv_length=4, mask_function=causal_mask_function)
    assert mask.problem == "AttributeError while reading the mask: 'bool' object has no attribute 'all'"


@pytest.mark.parametrize("name", ["bloom", "mpt"])
def test_model_built_past_check_model_fails_clearly(name):
    """Built directly with attn_implementation='ringwise' (no check), ALiBi models still stop, with a clear error."""
    if VERSION < (5, 0):
        pytest.skip(
            f"transformers {transformers.__version__} builds {name}'s mask and attention outside the "
            "registries, so nothing of ringwise runs; check_model alone refuses it there"
        )
    rw.use_ring()
    model = transformers.AutoModelForCausalLM.from_config(refused_config(name), attn_implementation="ringwise")
    with pytest.raises(TypeError, match="operates on the attention mask itself"):
        model(input_ids=torch.randint(3, 64, (1, 8)))
