"""ringwise finetune: a pretrained transformers checkpoint trained on the train job's machinery.

Documents are packed with EOS and their boundaries (cu_seqlens); the first step's loss equals plain
transformers in one process (a block-diagonal causal mask per document); three steps agree at W = 1, 2
and 3 (zigzag and contiguous; the feed-forward tiled or not, inside layer checkpointing too) to float32
rounding; per-rank parameter + optimizer bytes fall as 1/W;
the command runs, stops, resumes, evaluates perplexity by position before and after, writes its RoPE
change into the config, and exports a folder transformers loads with the trained weights. A real
pretrained model (SmolLM2-135M) is used where it is installed (else skipped, with the reason)."""

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from helpers import assert_offload_changes_no_bit, offload_step  # noqa: E402
from hf_models import (
    WORDS,
    needs_smollm2,
    save_tiny_checkpoint,
    smollm2_folder,
    tiny_tokenizer,  # noqa: E402
    word_documents,
)

from ringwise.data.documents import PackedDocuments, read_documents, tokenize_documents  # noqa: E402
from ringwise.model import IGNORE_INDEX  # noqa: E402
from ringwise.train.config import TrainConfig  # noqa: E402
from ringwise.train.pretrained import dtype_kwarg, rope_parameters  # noqa: E402

SEQ = 96  # splits for zigzag at W = 2, 3 (units 4, 6) and contiguous at 4


@pytest.fixture(scope="module")
def checkpoint_and_text(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    model = save_tiny_checkpoint(root / "model", "llama", tie_word_embeddings=True)
    text = root / "text"
    text.mkdir()
    docs = word_documents(30, seed=3)
    (text / "a.txt").write_text(docs[0] + " " + docs[1])  # a plain file: one document
    (text / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[2:]))
    return model, text


def config(model, text, out, **kw):
    base = dict(
        pretrained=str(model),
        text=[str(text)],
        data="documents",
        seq_len=SEQ,
        batch=2,
        steps=3,
        lr=1e-3,
        warmup=1,
        weight_decay=0.1,
        ckpt_every=100,
        eval_sequences=2,
        eval_bucket=32,
        eval_per_cell=1,
        eval_depths=[0.5],
        out=str(out),
        no_plots=True,
        timeout=60.0,
    )
    base.update(kw)
    return TrainConfig(**base)


# ---------------------------------------------------------------- documents


def test_documents_pack_with_their_boundaries_and_cache_their_tokens(tmp_path, monkeypatch):
    """Tokens cached in ringwise's cache folder ($RINGWISE_CACHE/tokens), never beside the data."""
    w, data = WORDS, tmp_path / "data"
    data.mkdir()
    monkeypatch.setenv("RINGWISE_CACHE", str(tmp_path / "cache"))
    (data / "one.txt").write_text(f"{w[1]} {w[2]} {w[3]}")
    (data / "docs.jsonl").write_text(
        json.dumps({"text": f"{w[4]} {w[5]}"}) + "\n\n" + json.dumps({"text": w[6]}) + "\n"
    )
    tok = tiny_tokenizer()
    calls = []
    counting = lambda texts, **kw: calls.append(len(texts)) or tok(texts, **kw)  # noqa: E731
    counting.get_vocab = tok.get_vocab
    docs = tokenize_documents([data], counting)
    assert [d.tolist() for d in docs] == [[17, 18], [19], [14, 15, 16]]  # sorted files: docs.jsonl, then one.txt
    assert calls == [2, 1] and len(list((tmp_path / "cache" / "tokens").iterdir())) == 2
    assert sorted(p.name for p in data.rglob("*")) == ["docs.jsonl", "one.txt"]  # nothing written into the data
    assert [d.tolist() for d in tokenize_documents([data], counting)] == [[17, 18], [19], [14, 15, 16]]
    assert calls == [2, 1], "the second read came from the cache"
    (data / ".ringwise-tokens").mkdir()  # an earlier version's cache beside the data: never read as text
    (data / ".ringwise-tokens" / "one.txt.0123.pt").write_bytes(b"\x80\x02")
    assert [d.tolist() for d in tokenize_documents([data], counting)] == [[17, 18], [19], [14, 15, 16]]
    monkeypatch.delenv("RINGWISE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    from ringwise.data.documents import cache_root

    assert cache_root() == tmp_path / "xdg" / "ringwise"

    eos = tok.eos_token_id
    packed = PackedDocuments(docs, 4, eos)  # stream 7 8 E 9 E 4 5 6 E: windows of 4 (+1 label)
    w0, w1 = packed[0], packed[1]
    assert w0["input_ids"].tolist() == [17, 18, eos, 19] and w0["labels"].tolist() == [18, eos, IGNORE_INDEX, eos]
    assert w0["cu_seqlens"] == [0, 3, 4] and w0["doc_offset"].tolist() == [0, 1, 2, 0]
    assert w1["input_ids"].tolist() == [eos, 14, 15, 16] and w1["labels"].tolist() == [IGNORE_INDEX, 15, 16, eos]
    assert w1["cu_seqlens"] == [0, 1, 4] and w1["doc_offset"].tolist() == [0, 0, 1, 2]  # context from the window


def test_jsonl_lines_need_a_text_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "w1"}) + "\n" + json.dumps({"body": "w2"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: a JSONL line needs a \"text\" string field"):
        read_documents(bad)


# ---------------------------------------------------------------- exactness and memory, on test clusters


def train_job(cfg_dict):
    from ringwise.train.loop import run_on_mesh
    from ringwise.train.mesh import make_mesh

    cfg = TrainConfig(**cfg_dict)
    run_on_mesh(cfg, make_mesh(cfg.dp, torch.device("cpu"), cfg.timeout, cfg.ulysses))
    if dist.get_rank() == 0:
        return [json.loads(line)["loss"] for line in open(Path(cfg.out) / "metrics.jsonl")]


def reference_first_loss(cfg):
    """Plain transformers in one process on step 0's sequences: eager attention with each document's
    causal block, the loss over every labelled token of the batch."""
    from ringwise.data import sample_indices
    from ringwise.train.pretrained import documents

    data = documents(cfg)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        cfg.pretrained, **dtype_kwarg(torch.float64), attn_implementation="eager"
    )
    total, count = 0.0, 0
    for i in sample_indices(0, cfg.batch, len(data.train), cfg.seed):
        ex = data.train[i]
        doc = torch.zeros(SEQ, dtype=torch.long)
        for b in ex["cu_seqlens"][1:-1]:
            doc[b:] += 1
        q, k = torch.arange(SEQ)[:, None], torch.arange(SEQ)[None]
        visible = (k <= q) & (doc[:, None] == doc[None])
        mask = torch.zeros(SEQ, SEQ, dtype=torch.float64).masked_fill(~visible, float("-inf"))[None, None]
        with torch.no_grad():
            logits = model(input_ids=ex["input_ids"][None], attention_mask=mask).logits[0]
        total += torch.nn.functional.cross_entropy(
            logits, ex["labels"], ignore_index=IGNORE_INDEX, reduction="sum"
        ).item()
        count += int((ex["labels"] != IGNORE_INDEX).sum())
    return total / count


def test_steps_agree_across_world_sizes_and_with_one_process(cluster, checkpoint_and_text, tmp_path):
    model, text = checkpoint_and_text
    runs = {}
    meshes = {
        "W1": (1, dict()),  # --ffn-tile default: the hidden size (32) raised to 256 tokens, > the local 96: one tile
        "W2-ffn-tile8": (2, dict(ffn_tile=8)),  # 6 feed-forward tiles per local shard
        "W3-contiguous-untiled": (3, dict(layout="contiguous", ffn_tile=0)),
        "W4-dp2": (4, dict(dp=2)),
        "W4-ulysses2-ckpt-ffn-tile8": (4, dict(ulysses=2, checkpoint_layers=True, ffn_tile=8)),
    }
    for name, (world, kw) in meshes.items():
        cfg = config(model, text, tmp_path / name, **kw)
        runs[name] = cluster(world).run(train_job, vars(cfg))[0]
    ref = reference_first_loss(cfg)
    for world, losses in runs.items():
        assert len(losses) == 3 and len(set(losses)) == 3, losses  # the steps changed the model
        assert abs(losses[0] - ref) <= 1e-5 * ref, (world, losses[0], ref)
        assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(losses, runs["W1"])), (world, losses, runs["W1"])


@pytest.mark.parametrize("world", [1, 2, 3])
def test_offload_params_changes_no_bit_of_a_finetune_step(cluster, checkpoint_and_text, tmp_path, world):
    """--offload-params on a transformers model: every FSDP unit (each decoder layer and the root) under
    CPUOffloadPolicy, and a clipped step gives the same loss, parameters and AdamW moments bit for bit
    (on a CPU run the policy's copies are no-ops: the same kernels in the same order; helpers.offload_step)."""
    model, text = checkpoint_and_text
    cfg = config(model, text, tmp_path / "o", steps=1, grad_clip=1e-3, layout="contiguous", batch=1)
    for got in cluster(world).run(offload_step, cfg):
        assert_offload_changes_no_bit(got)


def bytes_job(cfg_dict):
    """This rank's parameter and optimizer-state bytes after one step (its shards only)."""
    from ringwise.train.loop import setup, step
    from ringwise.train.mesh import make_mesh

    cfg = TrainConfig(**cfg_dict)
    run = setup(cfg, make_mesh(1, torch.device("cpu"), cfg.timeout))
    step(run, 0)
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    params = sum(local(p).numel() * p.element_size() for p in run.model.parameters())
    optim = sum(
        local(v).numel() * v.element_size()
        for s in run.optimizer.state.values()
        for v in s.values()
        if torch.is_tensor(v) and v.dim() > 0
    )
    return params + optim


def test_parameter_and_optimizer_bytes_per_rank_fall_as_one_over_world(cluster, checkpoint_and_text, tmp_path):
    model, text = checkpoint_and_text
    per_rank = {}
    for world in (1, 2, 4):
        cfg = config(model, text, tmp_path / f"b{world}", steps=1, batch=world, layout="contiguous")
        per_rank[world] = max(cluster(world).run(bytes_job, vars(cfg)))
    for world in (2, 4):
        assert per_rank[1] / per_rank[world] == pytest.approx(world, rel=0.05), per_rank


def one_process_answers(path, flip):
    """A passkey document maker whose labels are what the one-process model (plain transformers, eager,
    the whole document) predicts at the key's positions: the ring's evaluation must find every one
    right; `flip` makes one label wrong, which must count the document as missed."""
    from ringwise.train.passkey import passkey_document

    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, **dtype_kwarg(torch.float64), attn_implementation="eager"
    )

    def make(tokenizer, length, depth, key):
        ids, labels = passkey_document(tokenizer, length, depth, key)
        with torch.no_grad():
            predicted = model(input_ids=ids[None]).logits[0].argmax(-1)
        keep = labels != IGNORE_INDEX
        labels[keep] = predicted[keep]
        if flip:
            labels[keep.nonzero()[0]] += 1
        return ids, labels

    return make


def passkey_job(cfg_dict, flip):
    from ringwise.train.loop import setup
    from ringwise.train.mesh import make_mesh
    from ringwise.train.passkey import passkey_accuracy

    cfg = TrainConfig(**cfg_dict)
    run = setup(cfg, make_mesh(1, torch.device("cpu"), cfg.timeout))
    return passkey_accuracy(
        run, run.task.tokenizer, [48, SEQ], [0.0, 0.5, 1.0], 2, document=one_process_answers(cfg.pretrained, flip)
    )


def test_passkey_evaluation_through_the_ring_reads_the_whole_document(cluster, checkpoint_and_text, tmp_path):
    model, text = checkpoint_and_text
    cfg = config(model, text, tmp_path / "p", layout="zigzag")
    assert cluster(3).run(passkey_job, vars(cfg), False) == [[[1.0, 1.0]] * 3] * 3
    assert cluster(2).run(passkey_job, vars(cfg), True) == [[[0.0, 0.0]] * 3] * 2


# ---------------------------------------------------------------- the command


def test_finetune_command_runs_resumes_evaluates_and_exports(checkpoint_and_text, tmp_path):
    from ringwise.cli import main
    from ringwise.train import checkpoint

    model, text = checkpoint_and_text
    out = tmp_path / "run"
    flags = [
        "finetune",
        "--model",
        str(model),
        "--text",
        str(text),
        "--world",
        "2",
        "--seq-len",
        str(SEQ),
        "--batch",
        "2",
        "--steps",
        "3",
        "--warmup",
        "1",
        "--lr",
        "1e-3",
        "--eval-sequences",
        "2",
        "--eval-bucket",
        "32",
        "--rope-scaling",
        "linear",
        "--rope-factor",
        "2",
        "--out",
        str(out),
    ]
    assert main(flags + ["--stop-after", "2"]) == 0
    assert not (out / "summary.json").exists() and (out / "eval_before.json").exists()
    on_three = list(flags)
    on_three[on_three.index("--world") + 1] = "3"
    # resumed on another world size (DCP reshards), with the model state in host memory: the flag reaches
    # the build, and the resumed steps, the evaluation and the checkpoint run with it
    assert main(on_three + ["--resume", "--offload-params"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [0, 1, 2]
    # what was asked (the command line), what ran (every flag resolved), how long and how fast
    assert summary["command"].startswith(f"ringwise finetune --model {model} ") and "--resume" in summary["command"]
    config = summary["config"]
    assert config["model"] == str(model) and config["world"] == 3 and config["device"] == "cpu"
    assert config["backend"] == "gloo" and config["dtype"] == "fp32" and config["lr"] == 1e-3
    assert config["eval_sequences"] == 2 and config["eval_lengths"] == [48, 96] and config["rope_factor"] == 2.0
    assert config["mesh"] == dict(dp=1, cp=3, ulysses=1) and "out" not in config and "data" not in config
    assert config["offload_params"] is True
    assert summary["wall_time_s"] > 0 and summary["train_time_s"] > 0 and summary["steps_timed"] == 3
    # tokens/s from the unrounded time: train_time_s is rounded to 1 ms, tokens_per_s to 0.1, and no more apart
    seconds, want = summary["train_time_s"], 3 * 2 * SEQ / summary["train_time_s"]
    assert abs(summary["tokens_per_s"] - want) <= want * 0.0005 / (seconds - 0.0005) + 0.05
    before, after = summary["perplexity"]["before"], summary["perplexity"]["after"]
    assert before == json.loads((out / "eval_before.json").read_text())["perplexity"]  # measured once, before step 0
    assert before["starts"] == [0, 32, 64] and sum(before["tokens"]) == sum(after["tokens"]) > 0
    assert before["sequences"] == after["sequences"] == 2  # --eval-sequences 2: exactly 2
    assert all(p is None or math.isfinite(p) for p in before["ppl"] + after["ppl"])
    passkey = summary["passkey"]
    assert passkey["lengths"] == [48, 96] and len(passkey["accuracy"]) == len(passkey["depths"]) == 5
    assert passkey["before"] == json.loads((out / "eval_before.json").read_text())["passkey"]["accuracy"]
    for name in ("loss.png", "ppl_by_position.png", "retrieval.png"):
        assert (out / name).stat().st_size > 0

    exported = tmp_path / "exported"
    assert main(["export", str(out), str(exported), "--hf"]) == 0
    assert main(["export", str(out), str(exported), "--hf"]) == 2  # never over another folder
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".exported.tmp")]
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in exported.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o666 & ~umask}, modes  # as new files are
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported, **dtype_kwarg(torch.float32))
    rope = rope_parameters(hf.config)  # rope_parameters, or 4.x's rope_scaling and rope_theta
    assert rope["rope_type"] == "linear" and rope["factor"] == 2.0
    assert (
        hf.config.max_position_embeddings == 2 * transformers.AutoConfig.from_pretrained(model).max_position_embeddings
    )
    meta = checkpoint.read_meta(checkpoint.newest_intact(out / "checkpoints")[0])
    assert meta["config"] == dict(transformers=str(out / "hf")) and meta["task"] is None
    trained = checkpoint.consolidated(checkpoint.newest_intact(out / "checkpoints")[0])["model"]
    assert all(torch.equal(trained[f"hf.{k}"], v) for k, v in hf.state_dict().items())
    assert not torch.equal(
        hf.state_dict()["model.layers.0.mlp.up_proj.weight"],
        transformers.AutoModelForCausalLM.from_pretrained(model).state_dict()["model.layers.0.mlp.up_proj.weight"],
    )
    assert transformers.AutoTokenizer.from_pretrained(exported)(f"{WORDS[3]} {WORDS[4]} 71", add_special_tokens=False)[
        "input_ids"
    ] == [16, 17, 10, 4]


def test_both_models_offer_the_same_calls():
    """The training job calls ringwise's Transformer and a pretrained model alike (tasks.py)."""
    import inspect

    from ringwise.model import Transformer
    from ringwise.train.pretrained import PretrainedLM

    for name in ("set_ring", "loss", "predict", "token_losses"):
        assert inspect.signature(getattr(Transformer, name)) == inspect.signature(getattr(PretrainedLM, name)), name


def calls_job(cfg_dict):
    """A sharded pretrained model's training calls on this rank, summed over the ring."""
    from ringwise.train.loop import build
    from ringwise.train.mesh import make_mesh

    cfg = TrainConfig(**cfg_dict)
    run = build(cfg, make_mesh(1, torch.device("cpu"), cfg.timeout))
    ex = run.task.held_out[0]
    shard = run.model.ring
    ids, labels = (shard.shard(ex[k][None]) for k in ("input_ids", "labels"))
    pos = shard.positions(SEQ)
    loss, n = run.model.loss(ids, pos, labels, ex["cu_seqlens"])
    with torch.no_grad():
        per_token = run.model.token_losses(ids, pos, labels, ex["cu_seqlens"])
    predicted, mask = run.model.predict(ids, pos, labels, ex["cu_seqlens"])
    sums = torch.stack([loss.detach().double(), per_token.sum().double(), n.double(), mask.sum().double()])
    dist.all_reduce(sums, group=shard.group)
    return sums.tolist(), bool((per_token[~mask] == 0).all()), predicted.numel() == int(mask.sum())


def test_a_pretrained_models_calls_agree_on_the_ring(cluster, checkpoint_and_text, tmp_path):
    model, text = checkpoint_and_text
    for (loss, summed, n, labelled), zero_elsewhere, one_per_label in cluster(2).run(
        calls_job, vars(config(model, text, tmp_path / "c"))
    ):
        assert abs(loss - summed) <= 1e-6 * loss and n == labelled > 0 and zero_elsewhere and one_per_label


def test_validation_and_the_build_share_one_tokenization(checkpoint_and_text, tmp_path, monkeypatch):
    """The flag check tokenizes --text (config.py); the build's task reuses it in the same process
    (a rank under torchrun does both); an edited file is read again."""
    import shutil

    import ringwise.train.pretrained as pretrained
    from ringwise.train.config import problems
    from ringwise.train.tasks import task_for

    model, text = checkpoint_and_text
    shutil.copytree(text, tmp_path / "text")
    cfg = config(model, tmp_path / "text", tmp_path / "run")
    made = []
    real = pretrained._prepare_documents
    monkeypatch.setattr(pretrained, "_prepare_documents", lambda c: made.append(c) or real(c))
    assert problems(cfg) == [] and len(made) == 1
    task = task_for(cfg)
    assert task.train_data is pretrained.documents(cfg).train and task.tokenizer is not None and len(made) == 1
    edited = tmp_path / "text" / "a.txt"
    os.utime(edited, ns=(edited.stat().st_atime_ns, edited.stat().st_mtime_ns + 10**9))
    assert task_for(cfg).train_data is not task.train_data and len(made) == 2


def test_bad_flags_are_listed_before_any_rank_starts(checkpoint_and_text, tmp_path, capsys):
    from ringwise.cli import main

    model, text = checkpoint_and_text
    (tmp_path / "short.txt").write_text("w1 w2")
    assert main(["finetune", "--model", str(tmp_path), "--text", str(text), "--out", str(tmp_path / "a")]) == 2
    assert "no config.json there" in capsys.readouterr().err
    assert (
        main(
            [
                "finetune",
                "--model",
                str(model),
                "--text",
                str(tmp_path / "short.txt"),
                "--rope-scaling",
                "yarn",
                "--eval-fraction",
                "1.5",
                "--seq-len",
                "32",
                "--world",
                "2",
                "--out",
                str(tmp_path / "b"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "--rope-scaling and --rope-factor go together" in err and "--eval-fraction 1.5" in err
    assert "training and evaluation need 2 at least" in err  # the text checked too, in the same pass
    assert (
        main(
            [
                "finetune",
                "--model",
                str(model),
                "--text",
                str(tmp_path / "short.txt"),
                "--seq-len",
                "32",
                "--world",
                "2",
                "--out",
                str(tmp_path / "c"),
            ]
        )
        == 2
    )
    assert "training and evaluation need 2 at least" in capsys.readouterr().err
    # --eval-sequences beyond the held-out share: refused, naming how many there are (never silently fewer)
    assert (
        main(
            [
                "finetune",
                "--model",
                str(model),
                "--text",
                str(text),
                "--seq-len",
                str(SEQ),
                "--world",
                "2",
                "--eval-sequences",
                "99",
                "--steps",
                "0",
                "--out",
                str(tmp_path / "d"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "2 problems" in err and "--steps 0" in err and "--eval-sequences 99: the held-out share holds " in err, err
    # a model whose feed-forward cannot be tiled (OPT's is inline in its layer): refused unless --ffn-tile 0
    opt = tmp_path / "opt"
    small = dict(vocab_size=64, hidden_size=32, ffn_dim=64, word_embed_proj_dim=32, num_attention_heads=4)
    transformers.AutoModelForCausalLM.from_config(transformers.OPTConfig(**small, num_hidden_layers=2)).save_pretrained(
        opt
    )
    tiny_tokenizer().save_pretrained(opt)
    flags = ["finetune", "--model", str(opt), "--text", str(text), "--seq-len", str(SEQ), "--world", "2"]
    assert main([*flags, "--steps", "0", "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "2 problems" in err and "--ffn-tile: OPTDecoderLayer (layer 0) has no feed-forward module" in err, err
    assert main([*flags, "--steps", "0", "--ffn-tile", "0", "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err
    assert "1 problem" in err and "--ffn-tile" not in err, err


# ---------------------------------------------------------------- a real pretrained model


def real_model_loss(path, seq):
    from ringwise.attention.seqshard import SeqShard
    from ringwise.train.mesh import make_mesh
    from ringwise.train.pretrained import build_pretrained

    cfg = TrainConfig(pretrained=str(path), seq_len=seq, layout="zigzag")
    mesh = make_mesh(1, torch.device("cpu"), 120)
    model = build_pretrained(cfg, mesh)
    ids = torch.randint(0, 49152, (1, seq + 1), generator=torch.Generator().manual_seed(0))
    shard = SeqShard("zigzag", mesh.cp_group)
    with torch.no_grad():
        loss, n = model.loss(shard.shard(ids[:, :-1]), shard.positions(seq), shard.shard(ids[:, 1:]), [0, seq])
    t = torch.stack([loss.double(), n.double()])
    dist.all_reduce(t)
    return (t[0] / t[1]).item()


@needs_smollm2
def test_smollm2_sharded_load_matches_transformers(cluster):
    path, seq = smollm2_folder(), 256
    got = cluster(2).run(real_model_loss, path, seq, timeout=600)
    ids = torch.randint(0, 49152, (1, seq + 1), generator=torch.Generator().manual_seed(0))
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, **dtype_kwarg(torch.float32))
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(ref(input_ids=ids[:, :-1]).logits[0], ids[0, 1:]).item()
    assert got[0] == got[1] and abs(got[0] - want) <= 1e-5 * want, (got, want)


def test_chat_and_completion_lines_train_on_the_answers_only(tmp_path, monkeypatch):
    """JSONL "messages" lines go through the tokenizer's chat template and are trained on the assistant's turns
    only; "prompt"/"completion" lines on the completion only; "text" lines whole. Packed, a context-only
    token's label is ignored, the EOS after a reply is trained; a chat without a template is refused."""
    from ringwise.data.documents import trained_split

    monkeypatch.setenv("RINGWISE_CACHE", str(tmp_path / "cache"))
    tok = tiny_tokenizer()  # a template whose role words are in the tiny vocabulary: user "waa", assistant "wab"
    tok.chat_template = (
        "{% for m in messages %}{{ 'waa' if m['role'] == 'user' else 'wab' }} {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}wab {% endif %}"
    )
    vocab = tok.get_vocab()
    data = tmp_path / "chat.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": "wac wad"}, {"role": "assistant", "content": "wae 1"}]},
        {"prompt": "waf wag", "completion": "wah 2 3"},
        {"text": "wai waj"},
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    chat, completion, text = tokenize_documents([data], tok)
    w = {x: vocab[x] for x in ("waa", "wab", "wac", "wad", "wae", "waf", "wag", "wah", "wai", "waj")}
    ids, trained = trained_split(chat)
    assert ids.tolist() == [w["waa"], w["wac"], w["wad"], w["wab"], w["wae"], vocab["1"]]
    assert trained.tolist() == [False, False, False, False, True, True]  # the reply, not its role word
    ids, trained = trained_split(completion)
    assert ids.tolist() == [w["waf"], w["wag"], w["wah"], vocab["2"], vocab["3"]]
    assert trained.tolist() == [False, False, True, True, True]
    assert trained_split(text)[1].all()
    eos = tok.eos_token_id
    window = PackedDocuments([chat], 6, eos)[0]  # 6 tokens + the EOS as the last label
    assert window["labels"].tolist() == [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, w["wae"], vocab["1"], eos]
    window = PackedDocuments([completion], 4, eos)[0]
    assert window["labels"].tolist() == [IGNORE_INDEX, w["wah"], vocab["2"], vocab["3"]]
    packed = PackedDocuments([chat, completion], 2, eos)  # 6 + 1 + 5 + 1 tokens: 6 windows of 2 (+1 label), of
    labelled = [p["labels"].tolist() for p in packed]  # which 2 are context only (labels wac wad; waf wag): skipped
    assert (
        len(packed) == 4
        and labelled[0] == [IGNORE_INDEX, w["wae"]]
        and all(any(x != IGNORE_INDEX for x in row) for row in labelled)
    )
    tok.chat_template = None
    with pytest.raises(
        ValueError, match=r"chat.jsonl \(document 1\): a \"messages\" line needs the model's chat template"
    ):
        tokenize_documents([data], tok)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "waa"}) + "\n")
    with pytest.raises(ValueError, match=r'bad.jsonl:1: a JSONL line needs a "text" string field, a "messages" list'):
        read_documents(bad)
