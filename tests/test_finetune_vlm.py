"""ringwise finetune on image-text JSONL (issue 30): a vision-language checkpoint read with its own processor.

A tiny random Gemma 3 (SigLIP tower, 4 tokens an image) saved as a transformers folder with its processor (a
word-level tokenizer built here, no download; a Gemma3 image processor at 16x16 pixels; a chat template with
{"type": "image"} parts), three PNG images and a JSONL of chats with "images". Three steps at W = 2 (zigzag: the
image tokens cross the shard boundary) match one process running the same steps with transformers' model
(float64, the same examples, AdamW and learning rate): each step's loss within 1e-5 relative, as
tests/test_finetune.py holds the text runs, and every weight's change (the vision tower's included) within 2x the
one-process float32 run's error; the export loads in transformers with the trained weights. The examples: the
processor's tokens, trained on the assistant's turns only, padded to --seq-len. Refused before any rank starts,
with the reason: a folder without its processor, an image that cannot be read, an image line for a text-only
model, an example longer than --seq-len, a vision-language family not tested here, and the flags not tested with
images.

Qwen2-VL's processor needs torchvision in transformers 5.25 (its video processor), which this environment lacks:
Gemma 3 is the family tested here."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
PIL = pytest.importorskip("PIL")

from helpers import CEILINGS, assert_within_budget  # noqa: E402
from hf_models import WORDS  # noqa: E402

from ringwise.model import IGNORE_INDEX  # noqa: E402
from ringwise.train.config import TrainConfig  # noqa: E402

SEQ = 40  # zigzag at W = 2: chunks of 10
FLOAT32_EPS = 2.0**-23  # the budget's floor: float32's relative round-off
SPECIAL = ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
TEMPLATE = (
    "{% for m in messages %}{{ '<start_of_turn> ' + m['role'] + ' ' }}{% if m['content'] is string %}"
    "{{ m['content'] }}{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ ' <start_of_image> ' }}"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}{{ ' <end_of_turn> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn> assistant ' }}{% endif %}"
)


def vocabulary():
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{str(d): 3 + d for d in range(10)}}
    for w in [*SPECIAL, "user", "assistant", *WORDS]:
        vocab[w] = len(vocab)
    return vocab


def processor():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocabulary(), unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>", pad_token="</s>",
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"},
    )  # fmt: skip
    images = transformers.Gemma3ImageProcessorPil(size={"height": 16, "width": 16})
    return transformers.Gemma3Processor(
        image_processor=images, tokenizer=tokenizer, chat_template=TEMPLATE, image_seq_length=4
    )


def gemma3_config():
    v = vocabulary()
    text = transformers.Gemma3TextConfig(
        vocab_size=len(v), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, attention_dropout=0.0, pad_token_id=2, bos_token_id=1, eos_token_id=2,
        sliding_window=8, query_pre_attn_scalar=8, layer_types=["sliding_attention", "full_attention"],
    )  # fmt: skip
    vision = transformers.SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4
    )
    return transformers.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_id=v["<image_soft_token>"],
        boi_token_id=v["<start_of_image>"], eoi_token_id=v["<end_of_image>"],
    )  # fmt: skip


def save_vlm(folder: Path, config=None) -> Path:
    torch.manual_seed(0)
    model = transformers.AutoModelForImageTextToText.from_config(config or gemma3_config())
    with torch.no_grad():  # Gemma 3's projector starts at zero: no image would reach the language model
        g = torch.Generator().manual_seed(4)
        for n, p in model.named_parameters():
            if "projector" in n and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.save_pretrained(folder)
    processor().save_pretrained(folder)
    return folder


def user(*parts):
    return {"role": "user", "content": [{"type": "image"} if p is None else {"type": "text", "text": p} for p in parts]}


def answer(text):
    return {"role": "assistant", "content": text}


ROWS = [  # (messages, images): one and two images, an image in a second user turn, two answers
    ([user(None, "waa wab wac"), answer("wad 1 2 3")], ["img/red.png"]),
    ([user("wae", None, "waf"), answer("wag wah")], ["img/green.png"]),
    ([user(None, None, "wai"), answer("waj 4 5")], ["img/blue.png", "img/red.png"]),  # 2nd image: tokens 9-12
    ([user("wak wal"), answer("wam"), user(None, "wan"), answer("wao 6 7")], ["img/green.png"]),
    ([user(None, "wap waq war"), answer("was wat")], ["img/blue.png"]),
    ([user(None, "wau"), answer("wav waw 8 9")], ["img/red.png"]),
]


def write_data(root: Path, rows=ROWS) -> Path:
    from PIL import Image

    (root / "img").mkdir(parents=True, exist_ok=True)
    for name, size, color in (("red", (20, 28), (220, 20, 30)), ("green", (16, 16), (10, 200, 40)),
                              ("blue", (40, 24), (30, 60, 210))):  # fmt: skip
        g = torch.Generator().manual_seed(len(name))
        noise = (torch.rand(size[1], size[0], 3, generator=g) * 60).to(torch.uint8)
        pixels = (torch.tensor(color, dtype=torch.uint8) // 2 + noise).numpy()
        Image.fromarray(pixels, "RGB").save(root / "img" / f"{name}.png")
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": m, "images": i}) + "\n" for m, i in rows))
    return data


@pytest.fixture(scope="module")
def vlm_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune_vlm")
    return save_vlm(root / "model"), write_data(root / "data")


def config(model, data, out, **kw):
    base = dict(
        pretrained=str(model), text=[str(data)], data="documents", seq_len=SEQ, batch=2, steps=3, lr=1e-3,
        warmup=1, weight_decay=0.1, ckpt_every=100, eval_fraction=0.34, eval_sequences=2, out=str(out),
        no_plots=True, timeout=60.0, world=2,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


# ---------------------------------------------------------------- the examples


def test_examples_are_the_processors_tokens_trained_on_the_answers(vlm_and_data, tmp_path):
    """Each line: the processor's ids (its image tokens expanded), labels on the assistant's turns (and the EOS
    after a final answer), pad to --seq-len unlabelled, pixel values and token types for every image."""
    from ringwise.train.pretrained import documents

    model, data = vlm_and_data
    docs = documents(config(model, data, tmp_path / "out"))
    proc = docs.tokenizer
    assert len(docs.train) == 4 and len(docs.held_out) == 2
    v, eos = vocabulary(), proc.tokenizer.eos_token_id
    for k, row in enumerate(list(docs.train) + list(docs.held_out)):
        messages, images = ROWS[k]
        text = proc.apply_chat_template(messages, tokenize=False)
        pil = [PIL.Image.open(data.parent / p).convert("RGB") for p in images]
        want = proc(text=[text], images=pil, return_tensors="pt")
        n = want["input_ids"].shape[1]
        assert row["input_ids"][:n].tolist() == want["input_ids"][0].tolist()
        assert (row["input_ids"][n:] == proc.tokenizer.pad_token_id).all() and (
            row["labels"][n - 1 :] != IGNORE_INDEX
        ).sum() == 1
        torch.testing.assert_close(row["images"]["pixel_values"], want["pixel_values"], rtol=0, atol=0)
        assert row["images"]["token_type_ids"][0, :n].tolist() == want["token_type_ids"][0].tolist()
        assert row["images"]["pixel_values"].shape[0] == len(images)
        # labels: the tokens after "<start_of_turn> assistant" up to and with its "<end_of_turn>"; EOS at the end
        ids = row["input_ids"][:n].tolist()
        trained = [False] * n
        for i in range(n - 1):
            if ids[i] == v["assistant"] and ids[i - 1] == v["<start_of_turn>"]:
                j = ids.index(v["<end_of_turn>"], i)
                trained[i + 1 : j + 1] = [True] * (j - i)
        want_labels = [ids[i + 1] if trained[i + 1] else IGNORE_INDEX for i in range(n - 1)] + [eos]
        assert row["labels"][:n].tolist() == want_labels, k
    # step 0 trains example 3, whose second image's tokens (9-12) cross the zigzag boundary at 10 (W = 2)
    assert docs.train[2]["images"]["token_type_ids"][0, 8:14].tolist() == [0, 1, 1, 1, 1, 0]


# ---------------------------------------------------------------- exactness on a test cluster


def train_job(cfg_dict):
    from ringwise.train.loop import run_on_mesh
    from ringwise.train.mesh import make_mesh

    cfg = TrainConfig(**cfg_dict)
    result = run_on_mesh(cfg, make_mesh(cfg.dp, torch.device("cpu"), cfg.timeout, cfg.ulysses))
    if dist.get_rank() == 0:
        losses = [json.loads(line)["loss"] for line in open(Path(cfg.out) / "metrics.jsonl")]
        return losses, result


def one_process_steps(cfg, dtype):
    """transformers' model in one process on the same steps: each step's batch (sample_indices), the token-mean
    loss from the model's own logits, AdamW as the loop's (betas, weight decay, warm-up, clipping). The losses
    and each weight's change over the steps."""
    from ringwise.data import sample_indices
    from ringwise.train.loop import lr_at
    from ringwise.train.pretrained import documents

    data = documents(cfg)
    model = transformers.AutoModelForImageTextToText.from_pretrained(cfg.pretrained, dtype=dtype)
    model.config.use_cache = False
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    losses = []
    for step in range(cfg.steps):
        rows = [data.train[i] for i in sample_indices(step, cfg.batch, len(data.train), cfg.seed)]
        count = sum(int((r["labels"] != IGNORE_INDEX).sum()) for r in rows)
        total = 0.0
        for r in rows:
            inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in r["images"].items()}
            logits = model(input_ids=r["input_ids"][None], **inputs).logits[0]
            loss = torch.nn.functional.cross_entropy(
                logits.double(), r["labels"], ignore_index=IGNORE_INDEX, reduction="sum"
            )
            (loss / count).backward()
            total += loss.item()
        losses.append(total / count)
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        opt.step()
        opt.zero_grad()
    return losses, {n: (p.detach() - start[n]).double() for n, p in model.named_parameters()}


def test_steps_at_two_ranks_match_one_process(cluster, vlm_and_data, tmp_path):
    """Three steps at W = 2 (zigzag; the vision tower on both ranks, its gradients summed) against transformers in
    one process (float64): each step's loss within 1e-5 relative (the ring's loss is float32 cross-entropy); every
    weight's change over the steps, the vision tower's included, within 2x the one-process float32 run's error
    (+ float32's epsilon) and the float32 ceiling."""
    model, data = vlm_and_data
    cfg = config(model, data, tmp_path / "run")
    losses, result = cluster(2).run(train_job, vars(cfg))[0]
    want, moved = one_process_steps(cfg, torch.float64)
    f32, moved32 = one_process_steps(cfg, torch.float32)
    assert len(losses) == 3 and len(set(losses)) == 3, losses
    for got, ref, one in zip(losses, want, f32):
        assert abs(got - ref) <= 1e-5 * ref, (losses, want, f32)
        assert abs(one - ref) <= 1e-5 * ref, (one, ref)  # the one-process float32 run, for scale
    # every weight's change over the three steps (the vision tower's included) vs the one-process float64 run
    from ringwise.train import checkpoint

    path, _ = checkpoint.newest_intact(Path(cfg.out) / "checkpoints")
    trained = {k.removeprefix("hf."): v for k, v in checkpoint.consolidated(path)["model"].items()}
    start = transformers.AutoModelForImageTextToText.from_pretrained(cfg.pretrained, dtype=torch.float64)
    checked = 0
    for name, p in start.named_parameters():
        change = trained[name].double() - p.detach()
        if moved[name].norm() == 0:  # unused by the model (SigLIP's pooling head): no gradient, never stepped
            assert change.norm() == 0, name
            continue
        if name.endswith("k_proj.bias"):  # zero gradient in exact arithmetic (softmax ignores a per-query shift):
            continue  # AdamW steps on round-off, different in every run
        scale = moved[name].norm()
        err, err32 = (
            ((change - moved[name]).norm() / scale).item(),
            ((moved32[name] - moved[name]).norm() / scale).item(),
        )
        assert_within_budget(name, err, err32, FLOAT32_EPS, ceiling=CEILINGS["float32"])
        checked += ".vision_tower." in name
    assert checked >= 10, checked  # the tower's weights among them
    held = result["held_out_loss"]
    assert (
        held["before"]["examples"] == 2 and held["after"]["loss"] is not None and math.isfinite(held["before"]["loss"])
    )
    # export --hf: a folder AutoModelForImageTextToText and AutoProcessor load, with the trained weights
    from ringwise.train.pretrained import export_hf

    export_hf(cfg.out, tmp_path / "exported")
    exported = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "exported", dtype=torch.float32)
    for name, p in exported.named_parameters():
        assert torch.equal(p.detach(), trained[name].float()), name
    assert transformers.AutoProcessor.from_pretrained(tmp_path / "exported").image_seq_length == 4


# ---------------------------------------------------------------- refusals, before any rank starts


def refusals(cfg):
    from ringwise.train.config import problems

    return "\n".join(problems(cfg))


def test_refused_before_any_rank_starts_with_the_reason(vlm_and_data, tmp_path):
    model, data = vlm_and_data
    bare = tmp_path / "bare"  # the checkpoint without its processor
    bare.mkdir()
    for f in model.iterdir():
        if f.name in ("config.json",) or f.suffix == ".safetensors":
            shutil.copy(f, bare / f.name)
    assert "processor cannot be loaded" in refusals(config(bare, data, tmp_path / "a"))

    broken = tmp_path / "broken"  # an image that is not one
    shutil.copytree(data.parent, broken)
    (broken / "img" / "blue.png").write_bytes(b"not a png")
    assert "blue.png cannot be read" in refusals(config(model, broken / "chat.jsonl", tmp_path / "b"))

    assert "longer than --seq-len 24" in refusals(config(model, data, tmp_path / "c", seq_len=24))

    flags = refusals(config(model, data, tmp_path / "d", lora=4, checkpoint_layers=True, dp=2, world=4))
    assert "--lora is not supported with a vision-language --model" in flags
    assert "--checkpoint-layers is not supported with a vision-language --model" in flags
    assert "--dp is not supported with a vision-language --model" in flags
    schedule = config(model, data, tmp_path / "e", seq_len=SEQ, seq_schedule=[[20, 1], [SEQ, 2]])
    assert "--seq-len LEN:STEPS,... is not supported with a vision-language --model" in refusals(schedule)

    from hf_models import save_tiny_checkpoint

    text_model = save_tiny_checkpoint(tmp_path / "llama", "llama")  # an image line for a text-only model
    assert "needs a vision-language --model with its processor; this model is text-only" in refusals(
        config(text_model, data, tmp_path / "f")
    )

    paligemma = transformers.PaliGemmaConfig(
        text_config=transformers.GemmaConfig(**gemma3_config().text_config.to_dict() | {"layer_types": None}),
        vision_config=gemma3_config().vision_config, image_token_id=vocabulary()["<image_soft_token>"],
        projection_dim=32,
    )  # fmt: skip
    other = tmp_path / "paligemma"
    other.mkdir()
    paligemma.save_pretrained(other)
    shutil.copy(next(model.glob("*.safetensors")), other / "model.safetensors")
    refused = refusals(config(other, data, tmp_path / "g"))
    assert refused.count("not yet tested with ringwise finetune (finetune trains: Gemma 3)") == 1, refused
