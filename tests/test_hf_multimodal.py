"""Vision-language models with multimodal RoPE through the ring (issue 30): Qwen2-VL, Qwen2.5-VL, Qwen3-VL (with
its DeepStack features) and GLM-4V, tiny random configs of the real transformers classes. The vision tower runs on
every rank on the whole batch's images (eager here, sdpa by default), the language model through the ring on
rw.shard_multimodal_batch's inputs (the model's own M-RoPE positions of the global sequence, in the 4-row form).
At W = 2, 3 in every layout, a batch of two rows with three images of two sizes across shard boundaries: logits,
the model's own loss (model(**batch).loss) and every parameter gradient, the vision tower's included, summed over
the ranks, match the one-process eager model on the same weights within 2x the float32 model's own error vs
float64; packed documents match each document alone; rw.generate returns model.generate's sequences and scores;
what cannot be made exact is refused alike on every rank, with the reason."""

import pytest
import torch
import torch.distributed as dist

transformers = pytest.importorskip("transformers")

from helpers import CEILINGS, assert_within_budget, max_err  # noqa: E402
from hf_versions import EAGER_EXPERTS, VERSION  # noqa: E402

import ringwise.integrations.transformers as rw  # noqa: E402
from ringwise.attention.layout import global_indices  # noqa: E402

if VERSION < (5, 25) or not hasattr(transformers, "Qwen3VLConfig"):
    pytest.skip(
        f"transformers {transformers.__version__}: the vision-language models are tested on 5.25 (mm_encoder_outputs, "
        "the 4-row position ids)",
        allow_module_level=True,
    )

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "glm4v", "qwen3_vl_moe", "glm4v_moe")
LAYOUTS = ("zigzag", "contiguous", "striped")
SEQ = 48
TEXT = dict(
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
MROPE = dict(rope_type="default", mrope_section=[2, 1, 1], rope_theta=10000.0)  # head_dim 8: 4 frequencies
IMAGE, VIDEO, START, END = 5, 6, 7, 8
VISION = dict(depth=1, hidden_size=16, num_heads=2, patch_size=4, spatial_merge_size=2, temporal_patch_size=2)
RING_ATTN = {"text_config": "ringwise", "vision_config": "eager"}  # the tower as the reference runs it
# (row, first image token, (t, h, w) patches): 4, 6 and 4 merged tokens; at W = 2 zigzag (chunks of 12) the first
# two cross the boundaries at 12 and 24, the third sits in row 1 across 36
IMAGES = ((0, 9, (1, 4, 4)), (0, 20, (1, 4, 6)), (1, 34, (1, 4, 4)))


def make_config(name):
    T = transformers
    ids = dict(image_token_id=IMAGE, video_token_id=VIDEO)
    if name == "qwen2_vl":
        return T.Qwen2VLConfig(
            text_config=dict(TEXT, rope_parameters=MROPE),
            vision_config=dict(VISION, embed_dim=16, hidden_size=32, mlp_ratio=2),
            vision_start_token_id=START,
            **ids,
        )
    if name == "qwen2_5_vl":  # two vision blocks: a windowed one and a full one
        return T.Qwen2_5_VLConfig(
            text_config=dict(TEXT, rope_parameters=MROPE),
            vision_config=dict(
                VISION, depth=2, intermediate_size=32, out_hidden_size=32, window_size=16, fullatt_block_indexes=[1]
            ),
            vision_start_token_id=START,
            **ids,
        )
    if name == "qwen3_vl":  # DeepStack: both vision blocks' features added to the first two text layers
        return T.Qwen3VLConfig(
            text_config=dict(TEXT, head_dim=8, rope_parameters=dict(MROPE, mrope_interleaved=True)),
            vision_config=dict(
                VISION, depth=2, intermediate_size=32, out_hidden_size=32, num_position_embeddings=16,
                deepstack_visual_indexes=[0, 1],
            ),
            vision_start_token_id=START,
            **ids,
        )  # fmt: skip
    if name == "qwen3_vl_moe":  # Qwen3-VL's DeepStack with an MoE language model
        return T.Qwen3VLMoeConfig(
            text_config=dict(
                TEXT, head_dim=8, rope_parameters=dict(MROPE, mrope_interleaved=True), moe_intermediate_size=16,
                num_experts=4, num_experts_per_tok=2,
            ),
            vision_config=dict(
                VISION, depth=2, intermediate_size=32, out_hidden_size=32, num_position_embeddings=16,
                deepstack_visual_indexes=[0, 1],
            ),
            vision_start_token_id=START,
            **ids,
        )  # fmt: skip
    if name in ("glm4v", "glm4v_moe"):  # GLM-4.5V (glm4v_moe): MoE after a dense first layer; its decoder layers
        # get the 3-D position rows, and the op checks the text row of rw.shard_multimodal_batch's positions instead
        text = dict(TEXT, rope_parameters=dict(MROPE, partial_rotary_factor=1.0))
        if name == "glm4v_moe":
            text.update(moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1)
        return (T.Glm4vConfig if name == "glm4v" else T.Glm4vMoeConfig)(
            text_config=text,
            vision_config=dict(VISION, intermediate_size=32, out_hidden_size=32, image_size=16),
            image_start_token_id=START,
            image_end_token_id=END,
            **ids,
        )
    raise ValueError(name)


def global_batch(seq=SEQ, images=IMAGES, rows=2, seed=1):
    """input_ids, labels (-100 on image tokens), mm_token_type_ids, pixel_values, image_grid_thw: the processor's
    global batch, the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 64, (rows, seq), generator=g)
    types = torch.zeros_like(ids)
    for row, at, (t, h, w) in images:
        n = t * h * w // 4
        ids[row, at - 1], ids[row, at : at + n], ids[row, at + n] = START, IMAGE, END
        types[row, at : at + n] = 1
    labels = ids.masked_fill(ids == IMAGE, -100)
    pixels = torch.randn(sum(t * h * w for _, _, (t, h, w) in images), 3 * 2 * 4 * 4, generator=g)
    grid = torch.tensor([thw for _, _, thw in images])
    return ids, labels, dict(mm_token_type_ids=types, pixel_values=pixels, image_grid_thw=grid)


def build(name, attn):
    torch.manual_seed(0)
    if attn == "eager":
        return transformers.AutoModelForImageTextToText.from_config(
            make_config(name), attn_implementation="eager", **EAGER_EXPERTS
        )
    return rw.from_config(make_config(name), ffn_tile=5, attn_implementation=RING_ATTN, **EAGER_EXPERTS)


def summed_grads(model):
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for g in grads.values():
        dist.all_reduce(g)
    return grads


def ring_run(case):
    rw.use_ring(layout=case["layout"])
    model = build(case["name"], "ringwise").eval()
    ids, labels, inputs = global_batch()
    batch = rw.shard_multimodal_batch(model, ids, labels, **inputs)
    out = model(**batch)
    out.loss.backward()
    loss = out.loss.detach().clone()
    dist.all_reduce(loss)
    rw.use_ring()
    return dict(logits=out.logits.detach(), loss=loss, grads=summed_grads(model))


def single_run(name, dtype):
    model = build(name, "eager").to(dtype).eval()
    ids, labels, inputs = global_batch()
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    out = model(input_ids=ids, labels=labels, **inputs)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return dict(logits=out.logits.detach(), loss=out.loss.detach(), grads=grads)


_REFERENCES: dict = {}


def references(name):
    if name not in _REFERENCES:
        _REFERENCES[name] = single_run(name, torch.float64), single_run(name, torch.float32)
    return _REFERENCES[name]


def assert_matches(results, ref, f32, positions, tower=".visual.", relative=False):
    """Per-rank logits put together by `positions` (global index of each local token, per rank), the summed loss
    and the summed gradients against the float64 reference, within 2x the float32 model's own error. relative: a
    gradient's slack and ceiling scale with its size where it passes 1 (Gemma 3's projector weight gets gradients
    of ~500, whose float32 round-off alone passes the unit-scale ceiling)."""
    logits = torch.empty_like(f32["logits"])
    for r, res in enumerate(results):
        logits[:, positions[r]] = res["logits"]
    e = max_err
    assert_within_budget(
        "logits", e(logits, ref["logits"]), e(f32["logits"], ref["logits"]), 1e-6, ceiling=CEILINGS["float32"]
    )
    assert_within_budget("loss", e(results[0]["loss"], ref["loss"]), e(f32["loss"], ref["loss"]), 1e-6, ceiling=1e-5)
    grads = results[0]["grads"]
    assert grads.keys() == ref["grads"].keys()
    assert any(tower in n for n in grads), "no gradient reached the vision tower"
    for n, g in grads.items():
        scale = max(1.0, ref["grads"][n].abs().max().item()) if relative else 1.0
        assert_within_budget(
            n,
            e(g, ref["grads"][n]),
            e(f32["grads"][n], ref["grads"][n]),
            1e-7 * scale,
            ceiling=CEILINGS["float32"] * scale,
        )


GRID = [dict(name=n, world=W, layout=lay) for W in (2, 3) for n in FAMILIES for lay in LAYOUTS]


def case_id(c):
    return "-".join(str(v) for v in c.values())


@pytest.mark.parametrize("case", GRID, ids=case_id)
def test_model_matches_one_process(grid_results, case):
    results = grid_results(ring_run, GRID, case)
    W, layout = case["world"], case["layout"]
    ref, f32 = references(case["name"])
    assert_matches(results, ref, f32, [global_indices(layout, r, W, SEQ) for r in range(W)])
    if case["name"].startswith("qwen3_vl"):  # the DeepStack mergers feed the text layers: their gradients came back
        assert any("deepstack_merger_list" in n for n in results[0]["grads"])


# ---------------------------------------------------------------- packed documents

DOCS = (20, 28)  # two documents, an image in each (the second document's crosses the zigzag boundary at 24)
DOC_IMAGES = ((0, 8, (1, 4, 4)), (0, 22, (1, 4, 6)))


def documents_run(name):
    rw.use_ring(layout="zigzag")
    model = build(name, "ringwise").eval()
    ids, labels, inputs = global_batch(images=DOC_IMAGES, rows=1)
    batch = rw.shard_multimodal_batch(model, ids, labels, cu_seqlens=[0, DOCS[0], SEQ], **inputs)
    out = model(**batch)
    out.loss.backward()
    loss = out.loss.detach().clone()
    dist.all_reduce(loss)
    rw.use_ring()
    return dict(logits=out.logits.detach(), loss=loss, grads=summed_grads(model))


def documents_single(name, dtype):
    """Each document alone through the one-process model: logits side by side, the loss over both documents'
    labelled tokens (each document's last token has no target), gradients of that loss."""
    model = build(name, "eager").to(dtype).eval()
    ids, labels, inputs = global_batch(images=DOC_IMAGES, rows=1)
    types, pixels = inputs["mm_token_type_ids"], inputs["pixel_values"].to(dtype)
    split = DOC_IMAGES[0][2][1] * DOC_IMAGES[0][2][2]  # the first image's patches
    parts, total, count = [], 0.0, 0
    for (a, b), px, grid in (
        ((0, DOCS[0]), pixels[:split], inputs["image_grid_thw"][:1]),
        ((DOCS[0], SEQ), pixels[split:], inputs["image_grid_thw"][1:]),
    ):
        out = model(input_ids=ids[:, a:b], pixel_values=px, image_grid_thw=grid, mm_token_type_ids=types[:, a:b])
        target = labels[:, a + 1 : b]
        total = total + torch.nn.functional.cross_entropy(
            out.logits[:, :-1].flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum"
        )
        count += int((target != -100).sum())
        parts.append(out.logits.detach())
    loss = total / count
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return dict(logits=torch.cat(parts, dim=1), loss=loss.detach(), grads=grads)


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen3_vl"])
def test_packed_documents_match_each_document_alone(cluster, name):
    """M-RoPE positions run on across the packed documents; attention within a document does not see it (every
    row moves by the same offset), and ringwise_cu_seqlens keeps the documents apart."""
    results = cluster(2).run(documents_run, name)
    ref, f32 = documents_single(name, torch.float64), documents_single(name, torch.float32)
    assert_matches(results, ref, f32, [global_indices("zigzag", r, 2, SEQ) for r in range(2)])


# ---------------------------------------------------------------- rw.generate

OPTIONS = dict(max_new_tokens=6, eos_token_id=None, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
PROMPT = 29  # the prompt but its last token, 28, is padded to the layout's unit
PROMPT_IMAGES = ((0, 4, (1, 4, 4)), (0, 14, (1, 4, 6)), (1, 9, (1, 4, 4)))


def generate_run(case):
    rw.use_ring(layout=case["layout"])
    model = build(case["name"], "ringwise").double().eval()
    ids, _, inputs = global_batch(PROMPT, PROMPT_IMAGES)
    inputs["pixel_values"] = inputs["pixel_values"].double()
    out = rw.generate(model, ids, **inputs, **OPTIONS)
    rw.use_ring()
    return dict(sequences=out.sequences, scores=torch.stack(out.scores))


def generate_single(name):
    model = build(name, "eager").double().eval()
    ids, _, inputs = global_batch(PROMPT, PROMPT_IMAGES)
    inputs["pixel_values"] = inputs["pixel_values"].double()
    out = model.generate(ids, **inputs, **OPTIONS)
    return dict(sequences=out.sequences, scores=torch.stack(out.scores))


GENERATE = [dict(name=n, world=2, layout="zigzag") for n in FAMILIES]  # every family
GENERATE += [dict(name="qwen3_vl", world=3, layout="striped"), dict(name="glm4v", world=3, layout="contiguous")]


@pytest.mark.parametrize("case", GENERATE, ids=case_id)
def test_generate_matches_model_generate_in_one_process(grid_results, case):
    results = grid_results(generate_run, GENERATE, case)
    ref = generate_single(case["name"])
    for res in results:
        assert torch.equal(res["sequences"], ref["sequences"]), (res["sequences"], ref["sequences"])
        assert max_err(res["scores"], ref["scores"]) < 1e-6  # float64 models; generate() keeps float32 scores


# ---------------------------------------------------------------- refusals


def refused_run(case):
    rw.use_ring(layout="zigzag")
    model = build("qwen2_vl", "ringwise").eval()
    ids, labels, inputs = global_batch()
    seq = rw.shard_of(model)
    try:
        if case == "prompt ending with an image":
            rw.generate(model.double(), ids[:, :12], **dict(inputs, pixel_values=inputs["pixel_values"][:16].double(),
                        image_grid_thw=inputs["image_grid_thw"][:1]), max_new_tokens=2)  # fmt: skip
        elif case == "pixel values to the model":
            model(input_ids=seq.shard(ids), **dict(inputs, mm_token_type_ids=seq.shard(inputs["mm_token_type_ids"])))
        else:
            batch = rw.shard_multimodal_batch(model, ids, labels, **inputs)
            if case == "positions copied":
                batch["position_ids"] = batch["position_ids"].clone()
            elif case == "text positions only":
                batch["position_ids"] = rw.shard_batch(ids)["position_ids"]
            model(**batch)
    except ValueError as e:
        return str(e)
    finally:
        rw.use_ring()
    return None


REFUSALS = {
    "positions copied": "are not the (4, batch, local) tensor rw.shard_multimodal_batch returned",
    "text positions only": "are not the (4, batch, local) tensor rw.shard_multimodal_batch returned",
    "pixel values to the model": "got pixel_values: its vision tower would run inside the ring's forward",
    "prompt ending with an image": "the prompt ends with an image or video token",
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refused_alike_with_the_reason(cluster, case):
    messages = cluster(2).run(refused_run, case)
    assert messages[0] is not None and all(m == messages[0] for m in messages), messages
    assert REFUSALS[case] in messages[0], messages[0]


@pytest.mark.parametrize("name", FAMILIES)
def test_check_model_wants_the_tower_off_the_ring(name):
    """rw.from_config puts the language model on ringwise and the vision tower on sdpa; a tower on ringwise (or a
    language model off it) is refused by check_model, with the reason."""
    rw.use_ring()
    model = rw.from_config(make_config(name), ffn_tile=0)
    config = model.config
    impls = {
        m.config._attn_implementation for m in model.modules() if getattr(m, "config", None) is config.vision_config
    }
    assert impls == {"sdpa"} and config.text_config._attn_implementation == "ringwise"
    rw.check_model(model)
    everywhere = transformers.AutoModelForImageTextToText.from_config(make_config(name), attn_implementation="ringwise")
    with pytest.raises(ValueError, match="runs on every rank on the whole batch's images, outside the ring"):
        rw.check_model(everywhere)
    text_off = transformers.AutoModelForImageTextToText.from_config(
        make_config(name), attn_implementation={"text_config": "sdpa", "vision_config": "sdpa"}
    )
    with pytest.raises(ValueError, match="language model's attention implementations are"):
        rw.check_model(text_off)


def test_other_mrope_models_are_refused():
    """M-RoPE families shard_multimodal_batch does not prepare (here GLM-4.6V, PaddleOCR-VL) and M-RoPE text models
    alone (even a config with no mrope_section: transformers' defaults still rotate by three rows) are refused."""
    for other in ("Glm46VConfig", "PaddleOCRVLConfig"):
        if hasattr(transformers, other):
            with pytest.raises(ValueError, match=r"M-RoPE.*not among them"):
                rw.check_model(getattr(transformers, other)())
    with pytest.raises(ValueError, match=r"M-RoPE.*text model alone"):
        rw.check_model(transformers.Qwen2VLTextConfig(**TEXT))
    with pytest.raises(ValueError, match="is not one of the vision-language models"):
        rw.shard_multimodal_batch(rw.from_config(transformers.LlamaConfig(**TEXT)), torch.zeros(1, 4, dtype=torch.long))


# ---------------------------------------------------------------- image-token groups: Gemma 3, Gemma 4, PaliGemma

BLOCK_FAMILIES = ("gemma3", "gemma4", "paligemma")
BLOCK_TEXT = dict(TEXT, head_dim=8)
SIGLIP = dict(
    hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4
)
BLOCK_IMAGES = (10, 22)  # Gemma: two images of 4 tokens; the second crosses a zigzag boundary at W = 2 (24)
PREFIX = 22  # PaliGemma: one image of 16 tokens and 6 prompt tokens see each other, the rest is causal
TYPES = dict(gemma3="token_type_ids", gemma4="mm_token_type_ids", paligemma="token_type_ids")


def block_config(name):
    """Tiny random configs of the real classes, vision towers included (Gemma 4's: 4x4 patches pooled 2x2 into the
    4 tokens of an image; gemma4_per_layer: with per-layer inputs)."""
    T = transformers
    per_layer = 8 if name == "gemma4_per_layer" else 0
    name = "gemma4" if name == "gemma4_per_layer" else name
    if name == "gemma3":
        text = T.Gemma3TextConfig(
            **BLOCK_TEXT, sliding_window=8, query_pre_attn_scalar=8, layer_types=["sliding_attention", "full_attention"]
        )
        return T.Gemma3Config(
            text_config=text, vision_config=T.SiglipVisionConfig(**SIGLIP), mm_tokens_per_image=4,
            image_token_id=IMAGE, boi_token_id=START, eoi_token_id=END,
        )  # fmt: skip
    if name == "gemma4":
        text = T.Gemma4TextConfig(
            **dict(BLOCK_TEXT, num_hidden_layers=4), global_head_dim=16, sliding_window=8,
            layer_types=["sliding_attention", "full_attention"] * 2, hidden_size_per_layer_input=per_layer,
            vocab_size_per_layer_input=64, num_kv_shared_layers=0, use_bidirectional_attention="vision",
        )  # fmt: skip
        vision = T.Gemma4VisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
            head_dim=8, patch_size=4, pooling_kernel_size=2, position_embedding_size=16,
        )  # fmt: skip
        return T.Gemma4Config(
            text_config=text, vision_config=vision, audio_config=None, image_token_id=IMAGE, boi_token_id=START,
            eoi_token_id=END, video_token_id=VIDEO, audio_token_id=4,
        )  # fmt: skip
    if name == "paligemma":
        return T.PaliGemmaConfig(
            text_config=T.GemmaConfig(**BLOCK_TEXT), vision_config=T.SiglipVisionConfig(**SIGLIP),
            image_token_id=IMAGE, projection_dim=32,
        )  # fmt: skip
    raise ValueError(name)


def block_batch(name, seq=SEQ, images=BLOCK_IMAGES, seed=1):
    """input_ids, labels (-100 on image tokens) and the processor's image inputs of one row."""
    name = "gemma4" if name == "gemma4_per_layer" else name
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 64, (1, seq), generator=g)
    if name == "paligemma":
        ids[0, :16] = IMAGE
        types = torch.ones_like(ids)
        types[0, :PREFIX] = 0
        inputs = dict(pixel_values=torch.randn(1, 3, 16, 16, generator=g))
    else:
        for at in images:
            ids[0, at - 1], ids[0, at : at + 4], ids[0, at + 4] = START, IMAGE, END
        types = (ids == IMAGE).long()
        if name == "gemma3":
            inputs = dict(pixel_values=torch.randn(len(images), 3, 16, 16, generator=g))
        else:  # patches (images, 16, 3 * 4 * 4) at their (x, y) grid positions
            grid = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="xy"), -1).reshape(1, 16, 2)
            inputs = dict(
                pixel_values=torch.randn(len(images), 16, 48, generator=g),
                image_position_ids=grid.expand(len(images), -1, -1).contiguous(),
            )
    inputs[TYPES[name]] = types
    return ids, ids.masked_fill(ids == IMAGE, -100), inputs


def block_build(name, attn):
    torch.manual_seed(0)
    if attn == "eager":
        model = transformers.AutoModelForImageTextToText.from_config(block_config(name), attn_implementation="eager")
    else:
        model = rw.from_config(block_config(name), ffn_tile=5, attn_implementation=RING_ATTN)
    with torch.no_grad():  # Gemma 3's projector starts at zero: no image would reach the language model
        g = torch.Generator().manual_seed(4)
        for n, p in model.named_parameters():
            if "projector" in n and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def block_ring_run(case):
    rw.use_ring(layout=case["layout"])
    model = block_build(case["name"], "ringwise").eval()
    ids, labels, inputs = block_batch(case["name"])
    batch = rw.shard_multimodal_batch(model, ids, labels, **inputs)
    out = model(**batch)
    out.loss.backward()
    loss = out.loss.detach().clone()
    dist.all_reduce(loss)
    rw.use_ring()
    return dict(logits=out.logits.detach(), loss=loss, grads=summed_grads(model))


def block_single_run(name, dtype):
    model = block_build(name, "eager").to(dtype).eval()
    ids, labels, inputs = block_batch(name)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    out = model(input_ids=ids, **inputs)
    target = labels.new_full(labels.shape, -100)
    target[:, :-1] = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), target.flatten(), ignore_index=-100)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return dict(logits=out.logits.detach(), loss=loss.detach(), grads=grads)


BLOCK_GRID = [
    dict(name="gemma3", world=2, layout="zigzag"),
    dict(name="gemma3", world=3, layout="striped"),
    dict(name="gemma4", world=2, layout="contiguous"),
    dict(name="gemma4", world=3, layout="zigzag"),
    dict(name="paligemma", world=2, layout="zigzag"),
    dict(name="paligemma", world=3, layout="contiguous"),
]


@pytest.mark.parametrize("case", BLOCK_GRID, ids=case_id)
def test_image_groups_through_the_tower_match_one_process(grid_results, case):
    """The tower on every rank outside the ring (rw.shard_multimodal_batch), each rank's image features merged by the
    model into its own shard, the image tokens' groups from the global token types: logits, loss and every gradient,
    the tower's included, against one process (the model's forward on the same pixels)."""
    name = f"block_{case['name']}"
    if name not in _REFERENCES:
        _REFERENCES[name] = block_single_run(case["name"], torch.float64), block_single_run(case["name"], torch.float32)
    ref, f32 = _REFERENCES[name]
    results = grid_results(block_ring_run, BLOCK_GRID, case)
    W, layout = case["world"], case["layout"]
    positions = [global_indices(layout, r, W, SEQ) for r in range(W)]
    assert_matches(results, ref, f32, positions, tower="vision_tower", relative=True)


BLOCK_PROMPT = 29  # the prompt but its last token, 28, is padded to the layout's unit
BLOCK_PROMPT_IMAGES = (4, 16)  # the second image crosses the window of 8 from the prompt's end


def block_generate_run(case):
    rw.use_ring(layout=case["layout"])
    model = block_build(case["name"], "ringwise").double().eval()
    ids, _, inputs = block_batch(case["name"], BLOCK_PROMPT, BLOCK_PROMPT_IMAGES)
    inputs["pixel_values"] = inputs["pixel_values"].double()
    out = rw.generate(model, ids, **inputs, **OPTIONS)
    rw.use_ring()
    return dict(sequences=out.sequences, scores=torch.stack(out.scores))


def block_generate_single(name):
    model = block_build(name, "eager").double().eval()
    ids, _, inputs = block_batch(name, BLOCK_PROMPT, BLOCK_PROMPT_IMAGES)
    inputs["pixel_values"] = inputs["pixel_values"].double()
    out = model.generate(ids, **inputs, **OPTIONS)
    return dict(sequences=out.sequences, scores=torch.stack(out.scores))


BLOCK_GENERATE = [
    dict(name="gemma3", world=2, layout="zigzag"),
    dict(name="gemma3", world=3, layout="striped"),
    dict(name="gemma4", world=2, layout="zigzag"),
    dict(name="gemma4_per_layer", world=3, layout="contiguous"),  # per-layer inputs
]


@pytest.mark.parametrize("case", BLOCK_GENERATE, ids=case_id)
def test_image_groups_generate_like_model_generate(grid_results, case):
    results = grid_results(block_generate_run, BLOCK_GENERATE, case)
    ref = block_generate_single(case["name"])
    for res in results:
        assert torch.equal(res["sequences"], ref["sequences"]), (res["sequences"], ref["sequences"])
        assert max_err(res["scores"], ref["scores"]) < 1e-6  # float64 models; generate() keeps float32 scores


def block_refused_run(case):
    rw.use_ring(layout="zigzag")
    name = {"PaliGemma generate": "paligemma"}.get(case, "gemma3" if case.startswith("Gemma 3") else "gemma4")
    ids, labels, inputs = block_batch(name, BLOCK_PROMPT, BLOCK_PROMPT_IMAGES)
    try:
        if case == "Gemma 4 KV-shared layers generate":
            torch.manual_seed(0)
            text = block_config("gemma4").text_config
            text.num_kv_shared_layers, text.use_bidirectional_attention = 2, None
            model = rw.from_config(text, ffn_tile=0).eval()
            rw.generate(model, ids, max_new_tokens=2)
        elif case.startswith("Gemma 3 tower on ringwise"):
            model = transformers.AutoModelForImageTextToText.from_config(
                block_config(name), attn_implementation="ringwise"
            )
            if case.endswith("generate"):
                rw.generate(model, ids, **inputs, max_new_tokens=2)
            else:
                rw.shard_multimodal_batch(model, ids, labels, **inputs)
        else:
            model = block_build(name, "ringwise").eval()
            if case == "PaliGemma generate":
                rw.generate(model, ids, **inputs, max_new_tokens=2)
            elif case == "Gemma 3 prompt ending with an image":
                rw.generate(model, ids[:, :8], **dict(inputs, token_type_ids=inputs["token_type_ids"][:, :8],
                            pixel_values=inputs["pixel_values"][:1]), max_new_tokens=2)  # fmt: skip
            elif case == "Gemma 4 audio":
                rw.shard_multimodal_batch(model, ids, labels, **inputs, input_features=torch.zeros(1, 8, 16))
            elif case == "Gemma 4 without patch positions":
                inputs.pop("image_position_ids")
                rw.shard_multimodal_batch(model, ids, labels, **inputs)
            elif case == "Gemma 4 per-layer inputs in training":
                rw.shard_multimodal_batch(block_build("gemma4_per_layer", "ringwise"), ids, labels, **inputs)
            elif case == "Gemma 4 pixel values to the model":
                seq = rw.shard_of(model)
                model(input_ids=seq.shard(ids[:, :28]), pixel_values=inputs["pixel_values"])
    except ValueError as e:
        return str(e)
    finally:
        rw.use_ring()
    return None


BLOCK_REFUSALS = {
    "PaliGemma generate": "PaliGemma numbers its positions from 1 when it generates",
    "Gemma 4 KV-shared layers generate": "num_kv_shared_layers=2",
    "Gemma 3 tower on ringwise": "its vision tower (siglip_vision_model) has attn_implementation='ringwise'",
    "Gemma 3 tower on ringwise generate": "its vision tower (siglip_vision_model) has attn_implementation='ringwise'",
    "Gemma 3 prompt ending with an image": "the prompt ends with an image or video token",
    "Gemma 4 audio": "input_features: not supported",
    "Gemma 4 without patch positions": "without image_position_ids",
    "Gemma 4 pixel values to the model": "got pixel_values: its vision tower would run inside the ring's forward",
    "Gemma 4 per-layer inputs in training": "hidden_size_per_layer_input=8) is not verified",
}


@pytest.mark.parametrize("case", BLOCK_REFUSALS)
def test_image_groups_refused_alike_with_the_reason(cluster, case):
    messages = cluster(2).run(block_refused_run, case)
    assert messages[0] is not None and all(m == messages[0] for m in messages), messages
    assert BLOCK_REFUSALS[case] in messages[0], messages[0]
