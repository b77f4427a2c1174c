"""Every code example in README.md and docs/*.md runs as written, and does what its comments say.

Python blocks (```python). Each is found by the file and the heading above it, its key (a second
block under one heading gets " (2)", ...), and must have a case in EXAMPLES: a new example without
one fails test_every_python_example_has_a_case, as does a case whose example is gone. A block runs
*as written*, on W = 2 and 3 ranks (or the case's own `worlds`) of the suite's live local gloo
clusters, every rank exec'ing its text, except for the case's substitutions (the table in each
case: text as written -> text as run, and why; each must still match the block, or the test
fails). Before a block runs, each rank's random state is set differently (a real job's ranks
have no reason to share one), so an example that forgets to seed its "same on every rank" input
fails. Names an example takes from its surroundings (`path`, `input_ids`: the example says so
in a comment) come from the case's `given`. The case's check then compares what the ranks got
with one process on the whole sequence.

Shell commands: every command line of the fenced bash/sh/shell/console blocks (each line must be a
command this test knows how to check), and those of the indented code blocks and inline `...` spans
that start with ringwise, torchrun, python or make. A command is checked without launching
anything, in a temporary folder holding what it reads (the `world` fixture: copies of the
repository's *.md files, a tiny random Llama with a byte-level tokenizer where the README fetches
SmolLM2, data/, the runs/demo/ that `make demo` would make):

- `ringwise ...`, `python -m ringwise.cli ...`, `python -m ringwise.train ...`: the command's own
  entry point (ringwise.cli.main / ringwise.train.__main__.main) parses the argv and runs the same
  flag validation as before any rank starts; LAUNCH_POINTS (the launcher, the checkpoint export,
  the demo and benchmark runs) raise instead of starting anything, and the command must reach one
  (or, `ringwise plan`, `--help`: finish with status 0). A flag the parser rejects, or a flag
  combination the validation refuses, fails the test with the command's own message.
- `torchrun ...`: torchrun's own parser reads its flags; the module then runs as under torchrun on
  one of its nodes (WORLD_SIZE = nnodes x nproc-per-node, LOCAL_WORLD_SIZE = nproc-per-node, and
  torch.cuda.device_count() = nproc-per-node: the nodes' GPUs, which this machine lacks).
- `python -c CODE`: CODE runs in this process. `python SCRIPT ...`: SCRIPT exists and compiles
  (it downloads or runs for minutes). `make TARGET`: TARGET is a Makefile target (not run).
- A synopsis (`[...]`, `a|b`, `(...)`, or an upper-case placeholder that PLACEHOLDERS does not
  fill): its command exists and every --flag it names is one of the command's flags.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.distributed as dist
from helpers import CEILINGS, assemble, assert_within_budget, max_err, reference_attention, visible_mask

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


# ---------------------------------------------------------------- reading the markdown


@dataclass
class Block:
    source: str  # "README.md"
    line: int  # the first line of its text
    heading: str
    lang: str  # the fence's language; "indented" for an indented code block
    text: str


@dataclass
class Span:
    source: str
    line: int
    text: str


FENCE = re.compile(r"^(```+|~~~+)\s*([\w+-]*)")


def read_markdown(path: Path) -> tuple[list[Block], list[Span]]:
    """The code blocks (fenced and indented) and inline code spans of a markdown file."""
    lines = path.read_text().splitlines()
    source = str(path.relative_to(ROOT))
    blocks, prose = [], []
    heading, prev_blank, i = "", True, 0
    while i < len(lines):
        line = lines[i]
        m = FENCE.match(line)
        if m:
            j = i + 1
            while j < len(lines) and not lines[j].startswith(m.group(1)):
                j += 1
            blocks.append(Block(source, i + 2, heading, m.group(2).lower(), "\n".join(lines[i + 1 : j]) + "\n"))
            i, prev_blank = j + 1, False
            continue
        if prev_blank and line.startswith("    ") and line.strip():
            j = i
            while j < len(lines) and (lines[j].startswith("    ") or not lines[j].strip()):
                j += 1
            blocks.append(Block(source, i + 1, heading, "indented", "\n".join(t[4:] for t in lines[i:j]) + "\n"))
            i, prev_blank = j, True
            continue
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        prose.append((i + 1, line))
        prev_blank = not line.strip()
        i += 1
    text = "\n".join(t for _, t in prose)
    starts = [n for n, _ in prose]
    spans = [
        Span(source, starts[text.count("\n", 0, m.start())], " ".join(m.group(1).split()))
        for m in re.finditer(r"`([^`]+)`", text)
    ]
    return blocks, spans


def python_blocks() -> dict[str, Block]:
    found = {}
    for path in DOCS:
        for b in read_markdown(path)[0]:
            if b.lang in ("python", "py", "python3"):
                key = f"{b.source} > {b.heading}"
                n = sum(k == key or k.startswith(key + " (") for k in found)
                found[key if n == 0 else f"{key} ({n + 1})"] = b
    return found


# ---------------------------------------------------------------- Python examples on the ranks


def run_example(code: str, given: dict, collect: Callable):
    """On every rank: exec the example's text (the names the example takes from its surroundings
    in `given`), then collect(namespace) -> what the check compares."""
    torch.manual_seed(1000 + dist.get_rank())  # ranks of a real job hold different random states
    namespace = {"__name__": "__readme__", **given}
    try:
        exec(compile(code, "<readme example>", "exec"), namespace)
        return collect(namespace)
    finally:
        if "ringwise.integrations.transformers" in sys.modules:  # the next job on this cluster gets the plain ring
            sys.modules["ringwise.integrations.transformers"].use_ring()


@dataclass
class Example:
    """How one Python example runs and what is checked. substitutions: (as written, as run, why)."""

    substitutions: list[tuple[str, str, str]]
    collect: Callable  # on each rank, after the example: namespace -> picklable results
    check: Callable  # in this process: check(per-rank results, W, given)
    given: Callable = lambda world: {}  # world folder -> names the example takes from its surroundings
    worlds: tuple = (2, 3)


# --- "The op, in your model": ring attention fwd + bwd on a seeded global x

OP_SEQ = 48  # splits into 2W zigzag chunks at W = 2 and 3


def collect_op(ns):
    import ringwise

    q, k, v = ns["q"], ns["k"], ns["v"]
    pos = ringwise.positions(ns["x"].shape[1], layout="zigzag")
    # the text below the example: had x itself required grad, x.grad would be this rank's share only
    x = ns["x"].clone().requires_grad_()
    parts = (ringwise.shard(t, dim=1, layout="zigzag") for t in (x, x[:, :, :8], x[:, :, :8]))
    ringwise.ring_attention(*parts, causal=True, layout="zigzag").sum().backward()
    return dict(
        x=ns["x"],
        out=ns["out"].detach(),
        full=ns["full"].detach(),
        grads=[t.grad for t in (q, k, v)],
        leaves=[t.is_leaf and t.requires_grad for t in (q, k, v)],
        x_grad=x.grad,
        q_is_x_at_pos=torch.equal(q.detach(), ns["x"][:, pos]),
    )


def check_op(results, W, given):
    from ringwise.attention.layout import global_indices

    x = results[0]["x"]
    for r in results:
        assert torch.equal(r["x"], x), "the ranks drew different global x (the comment says: the same on every rank)"
        assert r["leaves"] == [True] * 3 and r["q_is_x_at_pos"]
        assert r["out"].shape == (1, OP_SEQ // W, 32, 128)  # the comment: (1, 131072/W, 32, 128)
        assert r["full"].shape == (1, OP_SEQ, 32, 128)
        assert torch.equal(r["full"], results[0]["full"]), "unshard gave the ranks different tensors"
    kv = x[:, :, :8]
    # float64 oracle and the one-process float32 kernel (SDPA), forward and the gradients of full.sum()
    q64, k64, v64 = (t.double().requires_grad_() for t in (x, kv, kv))
    ref, _ = reference_attention(q64, k64, v64, causal=True)
    ref.sum().backward()
    q32, k32, v32 = (t.transpose(1, 2).clone().requires_grad_() for t in (x, kv, kv))
    one = torch.nn.functional.scaled_dot_product_attention(q32, k32, v32, is_causal=True, enable_gqa=True)
    one.sum().backward()
    one = one.transpose(1, 2)
    assert_within_budget("full", max_err(results[0]["full"], ref), max_err(one, ref), 1e-6, ceiling=CEILINGS["float32"])
    # each rank's q.grad, k.grad, v.grad: the one-process gradient at that rank's positions
    for i, (name, t64, t32) in enumerate(zip("qkv", (q64, k64, v64), (q32, k32, v32))):
        got = torch.empty_like(t64.grad, dtype=torch.float32)
        for rank, r in enumerate(results):
            got[:, global_indices("zigzag", rank, W, OP_SEQ)] = r["grads"][i]
        assert_within_budget(
            f"d{name}",
            max_err(got, t64.grad),
            max_err(t32.grad.transpose(1, 2), t64.grad),
            1e-6,
            ceiling=CEILINGS["float32"],
        )
    # a replicated x: each rank's x.grad is its share; their sum is the one-process gradient
    dx64, dx32 = q64.grad.clone(), q32.grad.transpose(1, 2).clone()
    dx64[:, :, :8] += k64.grad + v64.grad
    dx32[:, :, :8] += (k32.grad + v32.grad).transpose(1, 2)
    summed = sum(r["x_grad"] for r in results)
    assert_within_budget("dx summed", max_err(summed, dx64), max_err(dx32, dx64), 1e-6, ceiling=CEILINGS["float32"])
    assert all(max_err(r["x_grad"], dx64) > 1e-2 for r in results), "one rank's x.grad is not just its share"


# --- the float32 kernel one process runs: the error budget's yardstick (against float64)


def sdpa32(q, k, v, causal=False, mask=None):
    """One process's float32 SDPA, (batch, seq, heads, dim) in and out; GQA; mask: bool (sq, sk), True = visible."""
    q, k, v = (t.float().transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
    return out.transpose(1, 2)


def check_global(results, W, want, one, name, ceiling=CEILINGS["float32"]):
    """Every rank drew the same inputs and assembled output `full`; it is within budget of float64."""
    for r in results:
        assert torch.equal(r["x"], results[0]["x"]), "the ranks drew different global inputs (the same on every rank)"
        assert torch.equal(r["full"], results[0]["full"]), "the ranks hold different global outputs"
    assert_within_budget(name, max_err(results[0]["full"], want), max_err(one, want), 1e-6, ceiling=ceiling)


# --- docs/op.md, "one sharding, said once": SeqShard.shard / ring_attention / unshard


def collect_seqshard(ns):
    return dict(x=ns["x"], out_shape=tuple(ns["out"].shape), full=ns["full"].detach())


def check_seqshard(results, W, given):
    x = results[0]["x"]
    assert all(r["out_shape"] == (2, OP_SEQ // W, 8, 64) for r in results)  # the comment: (2, 4096/W, 8, 64)
    want, _ = reference_attention(x, x, x, causal=True)
    check_global(results, W, want, sdpa32(x, x, x, causal=True), "SeqShard full")


# --- docs/masks.md: packed documents and a window, against the float64 mask

MASK_DOCS, MASK_WINDOW = [0, 10, 30, 48], 12  # documents spanning shards; a window of a few shards' tokens


def collect_masks(ns):
    return dict(x=torch.stack([ns["q"], ns["k"], ns["v"]]), out=ns["out"].detach())


def check_masks(results, W, given):
    q, k, v = results[0]["x"]
    for r in results:
        assert torch.equal(r["x"], results[0]["x"]), "the ranks drew different global q, k, v"
    got = assemble([r["out"] for r in results], "zigzag", 1)
    vis = visible_mask(OP_SEQ, causal=True, window=MASK_WINDOW, cu_seqlens=MASK_DOCS)
    want, _ = reference_attention(q, k, v, mask=vis)
    assert_within_budget(
        "masked out", max_err(got, want), max_err(sdpa32(q, k, v, mask=vis), want), 1e-6, ceiling=CEILINGS["float32"]
    )


def check_mask_example(vis):
    """check(results, W, given) of a docs/masks.md example whose global visibility is `vis`."""

    def check(results, W, given):
        q, k, v = results[0]["x"]
        for r in results:
            assert torch.equal(r["x"], results[0]["x"]), "the ranks drew different global q, k, v"
        got = assemble([r["out"] for r in results], "zigzag", 1)
        want, _ = reference_attention(q, k, v, mask=vis)
        assert_within_budget(
            "masked out",
            max_err(got, want),
            max_err(sdpa32(q, k, v, mask=vis), want),
            1e-6,
            ceiling=CEILINGS["float32"],
        )

    return check


_POS = torch.arange(OP_SEQ)
MASK_IMAGES = torch.full((OP_SEQ,), -1)
MASK_IMAGES[3:11], MASK_IMAGES[30:41] = 0, 1  # the example's two images, as run


# --- docs/ulysses.md: a (2 x W/2) Ulysses x ring mesh from mesh_groups


def check_ulysses(results, W, given):
    x = results[0]["x"]
    assert all(r["out_shape"] == (1, OP_SEQ // W, 8, 64) for r in results)  # the comment: (1, 8192/W, 8, 64)
    want, _ = reference_attention(x, x, x, causal=True)
    check_global(results, W, want, sdpa32(x, x, x, causal=True), "Ulysses full")


# --- docs/inference.md: decode_attention of one new token over a striped share of the cache

DECODE_WINDOW = 16


def collect_decode(ns):
    return dict(x=torch.cat([ns["k"], ns["v"]], 2), q=ns["q"], full=ns["out"])


def check_decode(results, W, given):
    k, v = results[0]["x"].chunk(2, dim=2)
    q = results[0]["q"]
    assert results[0]["full"].shape == (1, 1, 32, 64)
    pos = torch.arange(OP_SEQ)
    vis = ((pos <= OP_SEQ) & (OP_SEQ - pos <= DECODE_WINDOW))[None, :]  # the new token sits at position OP_SEQ
    want, _ = reference_attention(q, k, v, mask=vis)
    # the comment: bit-identical on every rank (check_global asserts torch.equal across ranks)
    check_global(results, W, want, sdpa32(q, k, v, mask=vis), "decode out")


# --- docs/design.md: the lse merge of two key blocks, in plain PyTorch


def collect_merge(ns):
    q, k, v = ns["q"], ns["k"], ns["v"]
    return dict(q=q, k=k, v=v, o=ns["o"], lse=ns["lse"], one=ns["attend"](q, k, v))


def check_merge(results, W, given):
    for r in results:  # every rank runs the whole example: one process's arithmetic
        q, k, v = r["q"], r["k"], r["v"]
        want, want_lse = reference_attention(q[None, :, None], k[None, :, None], v[None, :, None])
        one_o, one_lse = r["one"]
        assert_within_budget(
            "merged o", max_err(r["o"], want[0, :, 0]), max_err(one_o, want[0, :, 0]), 1e-6, ceiling=CEILINGS["float32"]
        )
        assert_within_budget(
            "merged lse",
            max_err(r["lse"], want_lse[0, 0]),
            max_err(one_lse, want_lse[0, 0]),
            1e-6,
            ceiling=CEILINGS["float32"],
        )


# --- tiny transformers checkpoints stand in for `path`

TINY_MODEL = "models/smollm2-135m"  # in the world folder, where the README fetches SmolLM2: a tiny random Llama


def tiny_tokenizer():
    """A byte-level tokenizer (one token per byte, no merges; no download): any text, many tokens."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>"
    )


def save_tiny_llama(folder: Path) -> Path:
    """A random 2-layer Llama (GQA, float64: the ring and one process agree to round-off) and its tokenizer."""
    import transformers

    tokenizer = tiny_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attention_dropout=0.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).double()
    model.save_pretrained(folder)
    # a chat template, as SmolLM2-Instruct's tokenizer has one (`ringwise generate --chat`)
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tokenizer.save_pretrained(folder)
    return folder


def tokens(shape, seed):
    return torch.randint(3, 200, shape, generator=torch.Generator().manual_seed(seed))


# --- "Hugging Face transformers": shard_batch + causal_lm_loss against one process

HF_SEQ, HF_DOCS = 48, [0, 10, 48]
F32_REL = 1e-6  # relative agreement of a float32 cross-entropy (eps 1.2e-7) summed over a few ranks


def given_hf(world):
    return dict(path=str(world / TINY_MODEL), input_ids=tokens((2, HF_SEQ), 1))


def collect_hf(ns):
    return dict(loss=ns["loss"].detach(), grads={n: p.grad for n, p in ns["model"].named_parameters()})


def check_hf(results, W, given):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(given["path"], attn_implementation="sdpa")
    assert model.dtype == torch.float64
    ids = given["input_ids"]
    bounds = torch.tensor(HF_DOCS)
    doc = torch.repeat_interleave(torch.arange(len(HF_DOCS) - 1), bounds[1:] - bounds[:-1])
    mask = ((doc[:, None] == doc[None, :]) & torch.ones(HF_SEQ, HF_SEQ, dtype=torch.bool).tril())[None, None]
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    labels[:, bounds[1:] - 1] = -100  # no target across a document's end
    logits = model(input_ids=ids, attention_mask=mask.expand(ids.shape[0], 1, HF_SEQ, HF_SEQ)).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    loss.backward()
    # the comments: the sum over ranks is the mean loss; summed parameter gradients are the exact gradient.
    # The model is float64, but causal_lm_loss takes the cross-entropy in float32: float32 round-off.
    total = sum(r["loss"] for r in results)
    assert abs(total.item() - loss.item()) <= F32_REL * abs(loss.item()), (total.item(), loss.item())
    for n, p in model.named_parameters():
        got = sum(r["grads"][n] for r in results)
        assert max_err(got, p.grad) <= F32_REL * p.grad.abs().max().item(), n


# --- "Vision-language models": rw.shard_multimodal_batch + the model's loss against one process

TINY_VLM = "models/qwen2-vl"  # in the world folder: a random Qwen2-VL (2 text layers, 1 vision block), float64
VLM_IMAGE = 5  # its image token id
VLM_IMAGES = ((9, (1, 4, 4)), (20, (1, 4, 6)))  # (first image token, (t, h, w) patches): 4 and 6 tokens, across shards


def save_tiny_qwen2_vl(folder: Path) -> Path:
    import transformers

    config = transformers.Qwen2VLConfig(
        text_config=dict(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_parameters=dict(rope_type="default", mrope_section=[2, 1, 1], rope_theta=10000.0),
        ),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=4),
        image_token_id=VLM_IMAGE,
        video_token_id=6,
        vision_start_token_id=7,
    )
    torch.manual_seed(0)
    transformers.AutoModelForImageTextToText.from_config(config).double().save_pretrained(folder)
    return folder


def given_vlm(world):
    """The processor's global batch: 48 tokens, two images (their patches flattened as Qwen2-VL's processor does)."""
    folder = world / TINY_VLM
    if not (folder / "config.json").exists():
        save_tiny_qwen2_vl(folder)
    ids = torch.randint(10, 64, (1, HF_SEQ), generator=torch.Generator().manual_seed(3))
    types = torch.zeros_like(ids)
    for at, (t, h, w) in VLM_IMAGES:
        ids[0, at : at + t * h * w // 4] = VLM_IMAGE
        types[0, at : at + t * h * w // 4] = 1
    patches = sum(t * h * w for _, (t, h, w) in VLM_IMAGES)
    inputs = dict(
        input_ids=ids,
        pixel_values=torch.randn(
            patches, 3 * 2 * 4 * 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64
        ),
        image_grid_thw=torch.tensor([thw for _, thw in VLM_IMAGES]),
        mm_token_type_ids=types,
    )
    return dict(path=str(folder), inputs=inputs)


def check_vlm(results, W, given):
    import transformers

    model = transformers.AutoModelForImageTextToText.from_pretrained(given["path"], attn_implementation="eager")
    assert model.dtype == torch.float64
    inputs = dict(given["inputs"])
    ids = inputs.pop("input_ids")
    loss = model(input_ids=ids, labels=ids.masked_fill(ids == VLM_IMAGE, -100), **inputs).loss
    loss.backward()
    # the comments: the sum over ranks is the mean loss; summed parameter gradients, the tower's included, are
    # one process's (the model's loss takes the cross-entropy in float32: float32 round-off)
    total = sum(r["loss"] for r in results)
    assert abs(total.item() - loss.item()) <= F32_REL * abs(loss.item()), (total.item(), loss.item())
    assert any(".visual." in n for n in results[0]["grads"])
    for n, p in model.named_parameters():
        got = sum(r["grads"][n] for r in results)
        assert max_err(got, p.grad) <= F32_REL * p.grad.abs().max().item(), n


# --- "Inference": rw.generate against model.generate in one process

GEN_NEW = 8


def given_path(world):
    return dict(path=str(world / TINY_MODEL))


def collect_tiles(ns):
    import ringwise.integrations.transformers as rw

    return dict(auto=ns["auto"], after=[rw.ffn_tile_of(ns[m]) for m in ("model", "by_1024", "untiled")])


def check_tiles(results, W, given):
    import transformers

    hidden = transformers.AutoConfig.from_pretrained(given["path"]).hidden_size
    for r in results:  # the comments: T = the hidden size, at least 256; 0 untiles; a size tiles by it
        assert r == dict(auto=max(hidden, 256), after=[0, 1024, 0]), r


def given_generate(world):
    return dict(path=str(world / TINY_MODEL), input_ids=tokens((2, 21), 2))


def collect_generate(ns):
    return ns["out"]


def check_generate(results, W, given):
    import transformers

    for r in results:
        assert torch.equal(r, results[0]), "ranks generated different sequences"
    model = transformers.AutoModelForCausalLM.from_pretrained(given["path"], attn_implementation="eager")
    torch.manual_seed(0)  # as the example seeds every rank
    want = model.generate(given["input_ids"], max_new_tokens=GEN_NEW, do_sample=True, top_p=0.9)
    assert want.shape[1] > given["input_ids"].shape[1]
    assert torch.equal(results[0], want), (results[0], want)


# --- "transformers' Trainer and TRL": ring_trainer(Trainer) against a plain Trainer in one process

TRAINER_LENGTHS = (30, 17)  # the data set: two sequences of unequal lengths, one batch of 2 (every step sees both)


def given_trainer(world):
    data = [{"input_ids": tokens((n,), 10 + i).tolist()} for i, n in enumerate(TRAINER_LENGTHS)]
    return dict(path=str(world / TINY_MODEL), dataset=data)


def collect_trainer(ns):
    return [h["loss"] for h in ns["trainer"].state.log_history if "loss" in h]


def check_trainer(results, W, given):
    import tempfile

    import transformers
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = transformers.AutoModelForCausalLM.from_pretrained(given["path"], attn_implementation="sdpa")
    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            out, per_device_train_batch_size=2, max_steps=10, logging_steps=1, report_to=[], use_cpu=True
        )
        trainer = transformers.Trainer(
            model=model,
            args=args,
            train_dataset=given["dataset"],
            data_collator=DataCollatorForLanguageModeling(pad_token_id=0),
        )
        trainer.train()
    want = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    # the comment: every rank logs the whole batch's loss (the cross-entropy is float32: float32 round-off)
    for r in results:
        assert len(r) == len(want) == 10, (r, want)
        assert all(abs(a - b) <= F32_REL * abs(b) for a, b in zip(r, want)), (r, want)


def collect_rings(ns):
    from ringwise.integrations.hf_rings import DEFAULT

    return dist.get_process_group_ranks(DEFAULT["shard"].group)


def check_rings(results, W, given):
    R = given["R"]
    for rank, ring in enumerate(results):  # rings of R consecutive ranks
        assert ring == list(range(rank // R * R, rank // R * R + R)), (rank, ring)


INIT = (
    'dist.init_process_group("nccl")',
    'dist.is_initialized() or dist.init_process_group("gloo")',
    "the cluster's ranks already share a gloo process group (no GPUs here)",
)
INIT_GLOO = (
    'dist.init_process_group("gloo")',
    'dist.is_initialized() or dist.init_process_group("gloo")',
    "the cluster's ranks already share a gloo process group",
)

EXAMPLES = {
    "README.md > The op, in your model": Example(
        substitutions=[
            INIT,
            ('device="cuda"', 'device="cpu"', "no GPU here"),
            ("131072", str(OP_SEQ), "a sequence this machine holds (2W zigzag chunks at W = 2, 3)"),
        ],
        collect=collect_op,
        check=check_op,
    ),
    "docs/op.md > A minimal example: one sharding, said once": Example(
        substitutions=[
            INIT_GLOO,
            ("4096", str(OP_SEQ), "a sequence this machine holds (2W zigzag chunks at W = 2, 3)"),
        ],
        collect=collect_seqshard,
        check=check_seqshard,
    ),
    "docs/masks.md > A minimal example: three documents, a 256-token window": Example(
        substitutions=[
            ("[0, 1000, 2500, 4096]", str(MASK_DOCS), "three documents of the shorter sequence"),
            ("4096", str(OP_SEQ), "a sequence this machine holds (2W zigzag chunks at W = 2, 3)"),
            ("window=256", f"window={MASK_WINDOW}", "a window as short against the sequence"),
        ],
        collect=collect_masks,
        check=check_masks,
    ),
    "docs/masks.md > Sliding windows": Example(
        substitutions=[
            ("4096", str(OP_SEQ), "a sequence this machine holds (2W zigzag chunks at W = 2, 3)"),
            ("window=(128, 128)", "window=(7, 3)", "a window as short against the sequence, and lopsided"),
        ],
        collect=collect_masks,
        check=check_mask_example(visible_mask(OP_SEQ, causal=False, window=(7, 3))),
    ),
    "docs/masks.md > Groups (images, prefixes)": Example(
        substitutions=[
            ("torch.full((4096,), -1)", f"torch.full(({OP_SEQ},), -1)", "the shorter sequence"),
            ("4096", str(OP_SEQ), "a sequence this machine holds (2W zigzag chunks at W = 2, 3)"),
            ("ids[100:356] = 0", "ids[3:11] = 0", "an image inside the shorter sequence"),
            ("ids[2000:2256] = 1", "ids[30:41] = 1", "another, across shards"),
        ],
        collect=collect_masks,
        check=check_mask_example(visible_mask(OP_SEQ, causal=True, group_ids=MASK_IMAGES)),
    ),
    "docs/masks.md > Any other mask: `mask_mod`": Example(
        substitutions=[
            ("4096", str(OP_SEQ), "a sequence this machine holds (2W zigzag chunks at W = 2, 3)"),
            ("(k_pos < 64) | (q_pos - k_pos <= 256)", "(k_pos < 4) | (q_pos - k_pos <= 6)", "as short against it"),
        ],
        collect=collect_masks,
        check=check_mask_example(
            visible_mask(OP_SEQ, causal=True) & ((_POS[None, :] < 4) | (_POS[:, None] - _POS[None, :] <= 6))
        ),
    ),
    "docs/ulysses.md > A minimal example": Example(
        substitutions=[
            INIT,
            ('device="cuda"', 'device="cpu"', "no GPU here"),
            ("8192", str(OP_SEQ), "a sequence this machine holds (2R x U pieces at W = 2, 4)"),
        ],
        collect=collect_seqshard,
        check=check_ulysses,
        worlds=(2, 4),
    ),
    "docs/transformers.md > A minimal example: three lines": Example(
        substitutions=[("[0, 900, 4096]", str(HF_DOCS), "the tiny model's sequence (2W zigzag chunks at W = 2, 3)")],
        given=given_hf,
        collect=collect_hf,
        check=check_hf,
    ),
    "docs/transformers.md > Feed-forward tiling": Example(
        substitutions=[], given=given_path, collect=collect_tiles, check=check_tiles
    ),
    "docs/transformers.md > Vision-language models": Example(
        substitutions=[], given=given_vlm, collect=collect_hf, check=check_vlm
    ),
    "docs/inference.md > A minimal example: one new token against a sharded cache": Example(
        substitutions=[
            ("4096", str(OP_SEQ), "a cache this machine holds (W striped shares at W = 2, 3)"),
            ("window=1024", f"window={DECODE_WINDOW}", "a window as short against the cache"),
        ],
        collect=collect_decode,
        check=check_decode,
    ),
    "docs/inference.md > transformers models: `rw.generate`": Example(
        substitutions=[("max_new_tokens=256", f"max_new_tokens={GEN_NEW}", "fewer tokens, same code")],
        given=given_generate,
        collect=collect_generate,
        check=check_generate,
    ),
    "docs/trainer.md > A minimal example": Example(
        substitutions=[
            ('"out"', '__import__("tempfile").mkdtemp()', "a temporary folder, not the working directory"),
            ("report_to=[])", "report_to=[], use_cpu=True)", "CPU ranks: accelerate runs them distributed only so"),
        ],
        given=given_trainer,
        collect=collect_trainer,
        check=check_trainer,
    ),
    "docs/trainer.md > A data-parallel x ring mesh": Example(
        substitutions=[], given=lambda world: dict(R=2), collect=collect_rings, check=check_rings, worlds=(2, 4)
    ),
    "docs/design.md > A minimal example: the merge every part relies on": Example(
        substitutions=[], collect=collect_merge, check=check_merge
    ),
}


def as_run(key: str, block: Block) -> str:
    code = block.text
    for written, run, why in EXAMPLES[key].substitutions:
        assert written in code, (
            f"{key}: the substitution {written!r} -> {run!r} ({why}) no longer matches the example; update EXAMPLES"
        )
        code = code.replace(written, run)
    return code


def test_every_python_example_has_a_case():
    found = python_blocks()
    untested = sorted(set(found) - set(EXAMPLES))
    assert not untested, f"Python examples without a case in EXAMPLES (tests/test_readme_examples.py): {untested}"
    gone = sorted(set(EXAMPLES) - set(found))
    assert not gone, f"cases in EXAMPLES whose example is gone (or moved under another heading): {gone}"


@pytest.mark.parametrize(
    "key, world_size",
    [(key, W) for key, case in EXAMPLES.items() for W in case.worlds],
    ids=[f"{key}-{W}" for key, case in EXAMPLES.items() for W in case.worlds],
)
def test_python_example_runs_as_written(cluster, world, key, world_size):
    case = EXAMPLES[key]
    block = python_blocks().get(key)
    if block is None:
        pytest.fail(f"no Python example {key!r} (test_every_python_example_has_a_case says more)")
    code = as_run(key, block)
    given = case.given(world)
    for name in given:
        assert re.search(rf"\b{name}\b", block.text), f"{key}: given {name!r}, which the example never names"
    results = cluster(world_size).run(run_example, code, given, case.collect)
    case.check(results, world_size, given)


# ---------------------------------------------------------------- shell commands

# Placeholders that the README's synopses use in commands otherwise complete; any other
# upper-case word (or [ ] | ( ) ...) makes a command a synopsis (its flags are checked).
PLACEHOLDERS = {
    "$HEAD": "head-node",
    "PATH": TINY_MODEL,
    "FILES": "README.md BENCHMARKS.md",
    "RUN_DIR": "runs/demo",
    "OUT.pt": "exported.pt",
    "OUT": "exported",
    "FOLDER": "exported",
}
SYNOPSIS = re.compile(r"[\[\]|()]|\.\.\.")
# Folders the README's commands read that a command not run here (make demo) would have made.
MADE_BEFORE = ["runs/demo"]
# transformers folders the README's export commands write (from runs this suite does not train): tiny Llamas here.
EXPORTED_BEFORE = ["models/smollm2-lora"]
TEXT_KB = 400  # data/: enough text for two 131072-token sequences of the byte-level tokenizer


def is_synopsis(text: str) -> bool:
    """[ ] | ( ) ..., or an upper-case placeholder (a word like N, TEXT or OUT.pt that is no file here)."""
    text = re.sub(r"#.*", "", text)
    return bool(SYNOPSIS.search(text)) or any(
        re.fullmatch(r"[A-Z][A-Z_]*(\.\w+)?", w) and not (ROOT / w).exists() for w in text.split()
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The folder the commands run in: the repository's *.md files, the tiny model, data/, runs/demo/."""
    folder = tmp_path_factory.mktemp("readme-world")
    for md in ROOT.glob("*.md"):
        shutil.copy(md, folder / md.name)
    save_tiny_llama(folder / TINY_MODEL)
    for exported in EXPORTED_BEFORE:  # what the README's `ringwise export ... --hf` writes: a transformers folder
        save_tiny_llama(folder / exported)
    for made in MADE_BEFORE:
        (folder / made).mkdir(parents=True)
    (folder / "data").mkdir()
    readme = (ROOT / "README.md").read_text()
    (folder / "data" / "text.txt").write_text(readme * (TEXT_KB * 1024 // len(readme) + 1))
    return folder


class Launched(Exception):
    """A command got past its validation to the point where it starts ranks or does its work."""


def _stub_suite(name):
    from types import SimpleNamespace

    return SimpleNamespace(run=lambda args: (_ for _ in ()).throw(Launched(f"bench {name}")))


def _launched(*args, **kwargs):
    raise Launched()


# (module, attribute) -> replacement: where each command stops being validation and starts work
LAUNCH_POINTS = {
    ("ringwise.train.job", "elastic_run"): _launched,  # train, finetune (local ranks or torchrun)
    ("ringwise.commands.generate", "model_file"): _launched,  # generate: after problems(), before loading
    ("ringwise.train.checkpoint", "export"): _launched,  # export
    ("ringwise.train.pretrained", "export_hf"): _launched,  # export --hf
    ("ringwise.commands.demo", "run"): _launched,  # demo
    ("ringwise.bench", "suite"): _stub_suite,  # bench X
}
MODULE_MAINS = {"ringwise.cli": ("ringwise.cli", "main"), "ringwise.train": ("ringwise.train.__main__", "main")}


def module_main(module: str):
    import importlib

    if module not in MODULE_MAINS:
        pytest.fail(f"python -m {module}: not an entry point this test knows (MODULE_MAINS); is it one?")
    mod, fn = MODULE_MAINS[module]
    return getattr(importlib.import_module(mod), fn)


@dataclass
class Command:
    where: str
    text: str
    synopsis: bool = False
    words: list[str] = field(default_factory=list)


def logical_lines(text: str) -> list[str]:
    return [line.strip() for line in re.sub(r"\\\n", " ", text).splitlines() if line.strip()]


def shell_commands() -> list[Command]:
    """Every command line of the shell blocks, and the commands of indented blocks and inline spans."""
    starts = re.compile(r"^(?:[A-Z_]+=\S+\s+)*(ringwise|torchrun|python3?|make)(\s|$)")
    found = []
    for path in DOCS:
        blocks, spans = read_markdown(path)
        for b in blocks:
            shell = b.lang in ("bash", "sh", "shell", "console")
            if not (shell or b.lang in ("indented", "")):
                continue
            for line in logical_lines(b.text):
                line = line[2:] if b.lang == "console" and line.startswith("$ ") else line
                if line.startswith("#"):
                    continue
                if shell or starts.match(line):
                    found.append(Command(f"{b.source}:{b.line}", line))
        for s in spans:
            if starts.match(s.text) and len(s.text.split()) > 1:  # `ringwise` alone names the package
                found.append(Command(f"{s.source}:{s.line} (inline)", s.text))
    for c in found:
        text = c.text
        for placeholder, value in PLACEHOLDERS.items():
            text = re.sub(rf"(?<![\w./-]){re.escape(placeholder)}(?![\w/-])", value, text)
        # an inline `ringwise finetune` names a command in a sentence: a synopsis, its command must exist
        c.synopsis = is_synopsis(text) or ("inline" in c.where and len(text.split()) <= 2)
        if not c.synopsis:
            c.words = shlex.split(text, comments=True)
    return found


COMMANDS = shell_commands()


def run_main(main, argv):
    """main(argv) -> ("launched" | exit status, its stdout + stderr)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            status = main(argv)
        except Launched:
            status = "launched"
        except SystemExit as e:  # argparse: a rejected flag (2), --help (0)
            status = e.code
    return status, out.getvalue()


def check_ringwise(main, argv, where):
    status, output = run_main(main, argv)
    assert status in ("launched", 0, None), f"{where}: {' '.join(argv)} -> exit status {status}:\n{output}"


def check_torchrun(argv, where, monkeypatch):
    from torch.distributed.run import get_args_parser

    status, output = run_main(lambda a: get_args_parser().parse_args(a), argv)
    assert not isinstance(status, int) or status == 0, f"{where}: torchrun rejects its flags:\n{output}"
    args = get_args_parser().parse_args(argv)
    assert args.module, f"{where}: torchrun runs a script, not -m ringwise...; teach this test to check it"
    nodes, per_node = int(str(args.nnodes).split(":")[-1]), int(args.nproc_per_node)
    monkeypatch.setenv("WORLD_SIZE", str(nodes * per_node))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(per_node))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: per_node)  # the nodes' GPUs
    check_ringwise(module_main(args.training_script), args.training_script_args, where)


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([\w.-]+)\s*:(?!=)", text, re.M))


def check_synopsis(words: list[str], where: str):
    """A synopsis: the ringwise command exists and takes every --flag named."""
    from ringwise.cli import COMMANDS as CLI
    from ringwise.cli import build_parser

    if words[0] == "make":
        missing = set(words[1:]) - makefile_targets()
        assert not missing, f"{where}: the Makefile has no target {sorted(missing)}"
    if words[0] != "ringwise":
        return  # python synopses name no flags of ours
    if len(words) == 1 or words[1].startswith("-"):
        unknown = [w for w in words[1:] if w.startswith("--") and w not in ("--help", "--version")]
        assert not unknown, f"{where}: `ringwise` takes no {unknown}"
        return
    assert words[1] in CLI, f"{where}: `ringwise {words[1]}` is no command (ringwise.cli.COMMANDS)"
    sub = next(a for a in build_parser((words[1],))._actions if hasattr(a, "choices") and a.choices)
    options = sub.choices[words[1]]._option_string_actions
    unknown = [w for w in words if w.startswith("--") and w not in options]
    assert not unknown, f"{where}: `ringwise {words[1]}` has no flag {unknown}"


@pytest.mark.parametrize("command", COMMANDS, ids=[f"{c.where}: {c.text[:60]}" for c in COMMANDS])
def test_shell_command_is_valid(command, world, monkeypatch):
    import importlib

    monkeypatch.chdir(world)
    if command.synopsis:
        check_synopsis(re.findall(r"[\w./-]+", command.text), command.where)
        return
    for (module, name), stub in LAUNCH_POINTS.items():
        monkeypatch.setattr(importlib.import_module(module), name, stub)
    words = list(command.words)
    while words and re.match(r"^[A-Z_]+=", words[0]):  # VAR=value prefixes
        words.pop(0)
    program, args = words[0], words[1:]
    if program == "ringwise":
        from ringwise.cli import main

        check_ringwise(main, args, command.where)
    elif program == "torchrun":
        check_torchrun(args, command.where, monkeypatch)
    elif program in ("python", "python3") and args[:1] == ["-m"]:
        check_ringwise(module_main(args[1]), args[2:], command.where)
    elif program in ("python", "python3") and args[:1] == ["-c"]:
        exec(compile(args[1], f"<{command.where}>", "exec"), {"__name__": "__main__"})
    elif program in ("python", "python3"):
        script = ROOT / args[0]
        assert script.is_file(), f"{command.where}: no script {args[0]}"
        compile(script.read_text(), str(script), "exec")
    elif program == "make":
        targets = [a for a in args if not a.startswith("-") and "=" not in a]
        missing = set(targets) - makefile_targets()
        assert not missing, f"{command.where}: the Makefile has no target {sorted(missing)}"
    else:
        pytest.fail(
            f"{command.where}: `{command.text}`: no way to check this command; teach "
            "tests/test_readme_examples.py (or write it as a synopsis)"
        )


def test_the_shell_commands_are_found():
    """The extraction itself: the README's fenced commands, continuations joined, are all here."""
    texts = [" ".join(c.words) for c in COMMANDS if not c.synopsis]
    assert any(t.startswith("ringwise train --world 4") for t in texts)
    assert any(t.startswith("torchrun --nnodes 4") and "-m ringwise.train" in t for t in texts)
    assert any(t.startswith("ringwise finetune --model") and "--rope-theta" in t for t in texts)
    assert any(t.startswith("ringwise generate --model runs/demo") for t in texts)
