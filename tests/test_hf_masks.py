"""The masks transformers composes beyond causal and sliding windows, through the ring (issue 30): Llama 4's
chunked layers (and its NoPE layers' temperature tuning, from global positions), EmbeddingGemma's bidirectional
and two-sided window layers, Gemma 3's image-token groups and PaliGemma's prefix-LM (group ids from the global
token types, rw.shard_batch). Each runs at W = 2, 3 in every layout (float32, gloo) and matches the one-process
eager model on the same weights, outputs and every parameter gradient, within 2x the float32 model's own error
vs float64; the mask reader agrees with transformers' own mask on small cases; what cannot be mapped is refused
alike on every rank, with the reason."""

import pytest
import torch
import torch.distributed as dist

transformers = pytest.importorskip("transformers")

from helpers import CEILINGS, EPS, assert_within_budget, max_err  # noqa: E402
from hf_versions import EAGER_EXPERTS, VERSION  # noqa: E402

import ringwise.integrations.transformers as rw  # noqa: E402
from ringwise.attention.layout import global_indices  # noqa: E402
from ringwise.integrations.hf_masks import read_mask_function  # noqa: E402

mu = pytest.importorskip("transformers.masking_utils")
if VERSION < (5, 0) or not hasattr(mu, "blockwise_overlay"):
    pytest.skip(
        f"transformers {transformers.__version__} builds these masks its own way (no blockwise_overlay); "
        "not run here: ringwise refuses what it does not recognise",
        allow_module_level=True,
    )

SEQ = 48
LAYOUTS = ("zigzag", "contiguous", "striped")
TEXT = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    attention_dropout=0.0,
)
IMAGE = 5  # the image token id of the multimodal configs
IMAGES_AT = (10, 22)  # Gemma 3: two images of 4 tokens; the second crosses a zigzag shard boundary at W = 2
PREFIX = 22  # PaliGemma: 16 image tokens and 6 prompt tokens see each other; the rest is causal


def vision_config():
    return transformers.SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4
    )


def make_config(name):
    T = transformers
    if name == "llama4":  # layer 0 chunked (chunks of 10, across shard boundaries), layer 1 NoPE and global
        return T.Llama4TextConfig(
            **TEXT,
            head_dim=8,
            num_local_experts=4,
            intermediate_size_mlp=64,
            attention_chunk_size=10,
            no_rope_layers=[1, 0],
            floor_scale=8,  # the NoPE layer's temperature changes every 8 positions, not every 8192
        )
    if name == "embeddinggemma":  # bidirectional: full layer, and a window of |q - k| < 5 (sliding_window=8 -> 5)
        return T.Gemma3TextConfig(
            **TEXT,
            head_dim=8,
            sliding_window=8,
            query_pre_attn_scalar=8,
            layer_types=["sliding_attention", "full_attention"],
            use_bidirectional_attention=True,
        )
    if name in ("gemma3", "gemma3_long_images"):  # image tokens: groups inside causal attention, sliding and global
        text = T.Gemma3TextConfig(
            **TEXT,
            head_dim=8,
            sliding_window=8 if name == "gemma3" else 3,  # 3: shorter than an image
            query_pre_attn_scalar=8,
            layer_types=["sliding_attention", "full_attention"],
        )
        return T.Gemma3Config(
            text_config=text,
            vision_config=vision_config(),
            mm_tokens_per_image=4,
            image_token_id=IMAGE,
            boi_token_id=6,
            eoi_token_id=7,
        )
    if name.startswith("gemma4"):
        # Gemma 4: sliding and full layers (full layers with their own head size), per-layer inputs and shared KV
        # (its last two layers reuse the keys and values of the first two) in the text model
        text = T.Gemma4TextConfig(
            **TEXT | dict(num_hidden_layers=4),
            head_dim=8,
            global_head_dim=16,
            sliding_window=8 if name != "gemma4_long_images" else 3,
            layer_types=["sliding_attention", "full_attention"] * 2,
            hidden_size_per_layer_input=0 if name in MULTIMODAL else 8,
            vocab_size_per_layer_input=64,
            num_kv_shared_layers=2 if name == "gemma4_text" else 0,
            use_bidirectional_attention=dict(gemma4_text=None, gemma4_bidirectional="all").get(name, "vision"),
        )
        if name in ("gemma4_text", "gemma4_bidirectional"):  # "all": sliding_window 8 -> |q - k| <= 5 (8 // 2 + 1)
            return text
        # image tokens: groups on the sliding layers only (AND(window, OR(causal, blocks))), causal full layers
        return T.Gemma4Config(
            text_config=text, image_token_id=IMAGE, boi_token_id=6, eoi_token_id=7, video_token_id=3, audio_token_id=4
        )
    if name == "paligemma":  # prefix-LM: image and prompt tokens see each other, the suffix is causal
        return T.PaliGemmaConfig(
            text_config=T.GemmaConfig(**TEXT, head_dim=8),
            vision_config=vision_config(),
            image_token_id=IMAGE,
            projection_dim=32,
        )
    raise ValueError(name)


MULTIMODAL = ("gemma3", "gemma3_long_images", "paligemma", "gemma4", "gemma4_long_images")
EMBEDDING = ("embeddinggemma", "gemma4_bidirectional")  # bidirectional text models: a loss on the hidden states
GROUPED = ("gemma3", "gemma3_long_images", "gemma4", "gemma4_long_images")  # two images of 4 tokens at IMAGES_AT


def build(name, attn):
    torch.manual_seed(0)
    config = make_config(name)
    if name in MULTIMODAL:
        return transformers.AutoModelForImageTextToText.from_config(config, attn_implementation=attn)
    if name in EMBEDDING:
        return transformers.AutoModel.from_config(config, attn_implementation=attn)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn, **EAGER_EXPERTS)


def global_ids(name):
    ids = torch.randint(8, 64, (1, SEQ), generator=torch.Generator().manual_seed(1))
    if name in GROUPED:
        for at in IMAGES_AT:
            ids[0, at : at + 4] = IMAGE
    if name == "paligemma":
        ids[0, :16] = IMAGE
    return ids


def token_types(name):
    if name in GROUPED:
        return (global_ids(name) == IMAGE).long()
    if name == "paligemma":
        types = torch.ones(1, SEQ, dtype=torch.long)
        types[0, :PREFIX] = 0
        return types
    return None


def global_embeds(name):
    """The vision tower outside the ring: an eager copy of the model (same weights) on every rank embeds the
    text and the images of the whole sequence; rank and reference get the same global inputs_embeds."""
    model = build(name, "eager").eval()
    ids = global_ids(name)
    if name.startswith("gemma4"):  # Gemma 4's tower takes patch positions too: fixed features stand for its output
        features = torch.randn(8, TEXT["hidden_size"], generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            embeds = model.get_input_embeddings()(torch.where(ids == IMAGE, 0, ids))
            return embeds.masked_scatter((ids == IMAGE)[..., None], features).detach()
    pixels = torch.randn(2 if name.startswith("gemma3") else 1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        features = model.model.get_image_features(pixel_values=pixels).pooler_output
        return embeds.masked_scatter((ids == IMAGE)[..., None], features.to(embeds.dtype)).detach()


def probe():
    """Fixed weights of an embedding model's loss: mean(hidden * probe)."""
    return torch.randn(1, SEQ, TEXT["hidden_size"], generator=torch.Generator().manual_seed(3))


def ring_run(name, layout):
    rw.use_ring(layout=layout)
    model = build(name, "ringwise").eval()
    rw.check_model(model)
    rw.tile_feed_forward(model, 5)
    seq = rw.shard_of(model)
    types = token_types(name)
    embeds = global_embeds(name) if name in MULTIMODAL else None
    key = "mm_token_type_ids" if name.startswith("gemma4") else "token_type_ids"
    extra = {} if types is None else {key: types, "model": model}
    batch = rw.shard_batch(global_ids(name), inputs_embeds=embeds, **extra)
    labels = batch.pop("labels")
    if name in EMBEDDING:
        out = model(**batch).last_hidden_state
        loss = (out * seq.shard(probe())).sum() / out.new_tensor(SEQ * TEXT["hidden_size"])
    else:
        out = model(**batch).logits
        loss = rw.causal_lm_loss(out, labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for g in grads.values():
        dist.all_reduce(g)
    rw.use_ring()
    return dict(out=out.detach(), grads=grads)


def single_run(name, dtype):
    model = build(name, "eager").to(dtype).eval()
    ids = global_ids(name)
    if name in EMBEDDING:
        out = model(input_ids=ids).last_hidden_state
        loss = (out * probe().to(dtype)).sum() / (SEQ * TEXT["hidden_size"])
    else:
        kwargs = {}
        if name in MULTIMODAL:
            key = "mm_token_type_ids" if name.startswith("gemma4") else "token_type_ids"
            kwargs = {"inputs_embeds": global_embeds(name).to(dtype), key: token_types(name)}
        else:
            kwargs = dict(input_ids=ids)
        out = model(**kwargs).logits
        labels = torch.full_like(ids, -100)
        labels[:, :-1] = ids[:, 1:]
        loss = torch.nn.functional.cross_entropy(out.flatten(0, 1), labels.flatten(), ignore_index=-100)
    loss.backward()
    return dict(out=out.detach(), grads={n: p.grad for n, p in model.named_parameters() if p.grad is not None})


_REFERENCES: dict = {}


def references(name):
    if name not in _REFERENCES:
        _REFERENCES[name] = single_run(name, torch.float64), single_run(name, torch.float32)
    return _REFERENCES[name]


EXACT = ("llama4", "embeddinggemma", "gemma3", "paligemma", "gemma4_text", "gemma4")  # test_hf_support reads it


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", EXACT)
def test_model_matches_one_process(cluster, name, world, layout):
    results = cluster(world).run(ring_run, name, layout)
    ref, f32 = references(name)
    out = torch.empty_like(f32["out"])
    for r, res in enumerate(results):
        out[:, global_indices(layout, r, world, SEQ)] = res["out"]
    assert_within_budget(
        "outputs", max_err(out, ref["out"]), max_err(f32["out"], ref["out"]), 1e-6, ceiling=CEILINGS["float32"]
    )
    assert results[0]["grads"].keys() <= ref["grads"].keys()
    assert len(results[0]["grads"]) >= 10
    for n, g in results[0]["grads"].items():
        # Gemma 4's gradients reach ~1 (tied embeddings, per-layer inputs, shared KV): there float32 round-off alone
        # can pass 2x the one-process error by a few ulps, so its slack is the suite's float32 EPS (for unit-scale
        # values) scaled to the gradient's size
        scale = max(1.0, ref["grads"][n].abs().max().item())
        eps = EPS["float32"] * scale if name.startswith("gemma4") else 1e-7
        assert_within_budget(
            n, max_err(g, ref["grads"][n]), max_err(f32["grads"][n], ref["grads"][n]), eps, ceiling=CEILINGS["float32"]
        )


# ---------------------------------------------------------------- the reader against transformers' own masks

N = 13


def dense(fn):
    """transformers' mask function evaluated on every (query, key) pair of N tokens."""
    return torch.tensor([[bool(fn(0, 0, torch.tensor(i), torch.tensor(j))) for j in range(N)] for i in range(N)])


def as_read(spec, groups=None):
    """What ringwise computes from the spec it read: ((causal and window) or same group) and same chunk."""
    q, k = torch.arange(N)[:, None], torch.arange(N)[None, :]
    d = k - q
    keep = torch.ones(N, N, dtype=torch.bool)
    if spec.right is not None:
        keep &= d <= spec.right
    if spec.left is not None:
        keep &= d >= -spec.left
    if groups is not None:
        keep |= (groups[:, None] == groups[None, :]) & (groups[:, None] >= 0)
    if spec.chunk is not None:
        keep &= q // spec.chunk == k // spec.chunk
    return keep


def test_reader_agrees_with_transformers_masks():
    from transformers.models.gemma3.modeling_gemma3 import _bidirectional_window_overlay

    zeros = torch.zeros(1, dtype=torch.long)
    cases = {
        "causal": mu.causal_mask_function,
        "sliding 4": mu.sliding_window_causal_mask_function(4),
        "chunked 5": mu.chunked_causal_mask_function(5, zeros),
        "bidirectional": mu.bidirectional_mask_function,
        "bidirectional window 3 (|d| <= 3)": mu.sliding_window_bidirectional_mask_function(3),
        "causal or |d| <= 2": mu.or_masks(mu.causal_mask_function, mu.sliding_window_bidirectional_overlay(2)),
        "causal or d > -3: everything": mu.or_masks(mu.causal_mask_function, mu.sliding_window_overlay(3)),
        "EmbeddingGemma sliding (|d| < 5)": mu.or_masks(
            mu.sliding_window_causal_mask_function(5), _bidirectional_window_overlay(5)
        ),
    }
    expected = {  # (causal, left, right, chunk): the op's arguments, with transformers' off-by-ones
        "causal": (True, None, 0, None),
        "sliding 4": (True, 3, 0, None),
        "chunked 5": (True, None, 0, 5),
        "bidirectional": (False, None, None, None),
        "bidirectional window 3 (|d| <= 3)": (False, 3, 3, None),
        "causal or |d| <= 2": (False, None, 2, None),
        "causal or d > -3: everything": (False, None, None, None),
        "EmbeddingGemma sliding (|d| < 5)": (False, 4, 4, None),
    }
    for what, fn in cases.items():
        spec = read_mask_function(fn)
        assert (spec.causal, spec.left, spec.right, spec.chunk) == expected[what], what
        assert torch.equal(dense(fn), as_read(spec)), what
    blocks = torch.tensor([[-1, -1, 0, 0, 0, -1, 1, 1, -1, -1, -1, 2, 2]])
    grouped = {
        "Gemma 3 global": (mu.or_masks(mu.causal_mask_function, mu.blockwise_overlay(blocks)), None),
        "Gemma 3 sliding 4": (
            mu.and_masks(
                mu.or_masks(mu.causal_mask_function, mu.blockwise_overlay(blocks)), mu.sliding_window_overlay(4)
            ),
            3,
        ),
    }
    for what, (fn, reach) in grouped.items():
        spec = read_mask_function(fn)
        assert spec.blocks is blocks and spec.group_reach == reach, what
        assert torch.equal(dense(fn), as_read(spec, blocks[0])), what  # groups of 3 tokens: within the window


def test_reader_refuses_what_the_op_cannot_express():
    zeros = torch.zeros(1, dtype=torch.long)
    blocks = torch.zeros(1, 4, dtype=torch.long)
    refused = {
        "custom": (lambda b, h, q, k: k <= q, "cannot reproduce exactly"),
        "chunked or window": (
            mu.or_masks(mu.chunked_causal_mask_function(4, zeros), mu.sliding_window_overlay(2)),
            "chunked or packed-sequence mask with another mask",
        ),
        "two block overlays": (
            mu.and_masks(mu.blockwise_overlay(blocks), mu.blockwise_overlay(blocks)),
            "two block overlays",
        ),
        "groups on full attention": (
            mu.or_masks(mu.bidirectional_mask_function, mu.blockwise_overlay(blocks)),
            "not causal",
        ),
        "window of 0": (mu.sliding_window_causal_mask_function(0), "no key visible"),
        "two chunk sizes": (
            mu.and_masks(mu.chunked_causal_mask_function(4, zeros), mu.chunked_overlay(6, zeros)),
            "chunks of 4 and of 6",
        ),
    }
    for fn, words in refused.values():
        with pytest.raises(ValueError, match=words):
            read_mask_function(fn)


# ---------------------------------------------------------------- refusals, alike on every rank


def refused_run(case):
    rw.use_ring(layout="zigzag")
    name = "gemma3_long_images" if case == "image longer than the window" else "gemma3"
    if case == "left padding":
        name = "llama4"
    name = GEMMA4_REFUSALS.get(case, name)
    model = build(name, "ringwise").eval()
    rw.check_model(model)
    ids = global_ids(name)
    try:
        if case in ("Gemma 4 image longer than the window", "Gemma 4 groups without the token types"):
            batch = rw.shard_batch(
                ids, mm_token_type_ids=token_types(name), inputs_embeds=global_embeds(name), model=model
            )
            batch.pop("labels")
            if case == "Gemma 4 groups without the token types":  # no layer builds groups: none may run without them
                batch.pop("mm_token_type_ids")
            model(**batch)
        elif case == "Gemma 4 bidirectional sliding layers":
            model(**{k: v for k, v in rw.shard_batch(ids).items() if k != "labels"})
        elif case == "Gemma 4 last logits only":
            model(**{k: v for k, v in rw.shard_batch(ids).items() if k != "labels"}, logits_to_keep=1)
        elif case == "pixel values":  # the vision tower through the ring
            batch = rw.shard_batch(ids, token_type_ids=token_types(name), model=model)
            batch.pop("labels")
            model(**batch, pixel_values=torch.zeros(2, 3, 16, 16))
        elif case == "types without shard_batch's groups":
            batch = rw.shard_batch(ids, inputs_embeds=global_embeds(name))
            batch.pop("labels")
            model(**batch, token_type_ids=rw.shard_of(model).shard(token_types(name)))
        elif case == "left padding":
            batch = rw.shard_batch(ids)
            batch.pop("labels")
            mask = torch.ones_like(batch["input_ids"])
            mask[:, 0] = 0 if dist.get_rank() == 0 else 1
            model(**batch, attention_mask=mask)
        else:
            batch = rw.shard_batch(
                ids, token_type_ids=token_types(name), inputs_embeds=global_embeds(name), model=model
            )
            batch.pop("labels")
            if case == "types of another batch":
                batch["token_type_ids"] = torch.zeros_like(batch["token_type_ids"])
            model(**batch)
    except (ValueError, TypeError) as e:
        return str(e)
    finally:
        rw.use_ring()
    return None


GEMMA4_REFUSALS = {
    "Gemma 4 image longer than the window": "gemma4_long_images",
    "Gemma 4 groups without the token types": "gemma4",
    # use_bidirectional_attention="all": the mask keeps |q - k| <= 5 (eager, sdpa) where the layer passes
    # sliding_window=5 (flash attention keeps |q - k| <= 4): transformers' implementations disagree
    "Gemma 4 bidirectional sliding layers": "gemma4_bidirectional",
    "Gemma 4 last logits only": "gemma4_text",  # logits_to_keep=1 slices the mask before the KV-shared layers
}
REFUSALS = {
    "Gemma 4 image longer than the window": "longer than the layer's window",
    "Gemma 4 groups without the token types": "this layer's mask has no block overlay",
    "Gemma 4 bidirectional sliding layers": "passes sliding_window=5 but its mask has window 6",
    "Gemma 4 last logits only": "slices its attention mask",
    "image longer than the window": "longer than the layer's window",
    "types without shard_batch's groups": "give every rank the global groups",
    "types of another batch": "are not those of rw.shard_batch's",
    "pixel values": "got pixel_values: its vision tower would run inside the ring's forward",
    "left padding": "padding",
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refused_alike_with_the_reason(cluster, case):
    messages = cluster(2).run(refused_run, case)
    assert messages[0] is not None and all(m == messages[0] for m in messages), messages
    assert REFUSALS[case] in messages[0], messages[0]


def test_shard_batch_gives_the_global_groups():
    """The groups come from the global token types by the model's own rule, never from a shard."""
    rw.use_ring()
    gemma3 = build("gemma3", "ringwise")
    batch = rw.shard_batch(global_ids("gemma3"), token_type_ids=token_types("gemma3"), model=gemma3)
    want = torch.full((SEQ,), -1)
    for g, at in enumerate(IMAGES_AT):
        want[at : at + 4] = g
    assert torch.equal(batch["ringwise_group_ids"], want)
    pali = build("paligemma", "ringwise")
    batch = rw.shard_batch(global_ids("paligemma"), token_type_ids=token_types("paligemma"), model=pali)
    assert torch.equal(batch["ringwise_group_ids"], torch.where(torch.arange(SEQ) < PREFIX, 0, -1))
    two_rows = torch.cat([token_types("gemma3"), token_types("paligemma")])
    with pytest.raises(ValueError, match="rows of the batch group their tokens differently"):
        rw.shard_batch(global_ids("gemma3").expand(2, -1), token_type_ids=two_rows, model=gemma3)
    with pytest.raises(ValueError, match="needs model="):
        rw.shard_batch(global_ids("gemma3"), token_type_ids=token_types("gemma3"))


def no_positions_run():
    rw.use_ring(layout="zigzag")
    model = build("llama4", "ringwise").eval()
    rw.check_model(model)
    batch = rw.shard_batch(global_ids("llama4"))
    try:
        model(input_ids=batch["input_ids"])
    except ValueError as e:
        return str(e)
    return None


def test_llama4_called_without_position_ids_is_refused(cluster):
    """Llama 4's attention layers never see position_ids: the positions the rotary embedding was given are checked
    (check_model's hook); without them the model would number each shard from 0."""
    messages = cluster(2).run(no_positions_run)
    assert messages[0] is not None and all(m == messages[0] for m in messages), messages
    assert "called without them" in messages[0], messages[0]
