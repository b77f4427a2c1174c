"""ringwise finetune of a hybrid checkpoint (Qwen3-Next: gated DeltaNet layers around full attention; dense, and its
MoE saved one tensor per expert), and generation from what it exports.

The packed documents' boundaries reset the short convolutions and the delta rule's state (hf_linear), so the
first step's loss equals transformers in one process run document by document at the same global positions;
three steps agree at W = 1, 2 (zigzag) and 3 (contiguous, layers checkpointed) to float32 rounding. The exported
folder generates on a ring of 2 the tokens one process generates (`ringwise generate --check`)."""

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from hf_models import WORDS, tiny_tokenizer, word_documents  # noqa: E402
from hf_versions import EAGER_EXPERTS  # noqa: E402
from test_finetune import config, train_job  # noqa: E402
from test_hf_linear import make_config  # noqa: E402

from ringwise.model import IGNORE_INDEX  # noqa: E402
from ringwise.train.config import TrainConfig  # noqa: E402
from ringwise.train.pretrained import dtype_kwarg  # noqa: E402

SEQ = 96


def _checkpoint_and_text(root, moe):
    """A tiny random Qwen3-Next (dense MLPs, or its MoE: transformers 5 saves the fused experts one per expert)
    and documents of random words."""
    cfg = make_config("qwen3_next")
    cfg.vocab_size = len(tiny_tokenizer())
    if not moe:
        cfg.mlp_only_layers = list(range(cfg.num_hidden_layers))
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    text = root / "text"
    text.mkdir()
    docs = word_documents(30, seed=3)
    (text / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return root / "model", text


@pytest.fixture(scope="module")
def hybrid_and_text(tmp_path_factory):
    return _checkpoint_and_text(tmp_path_factory.mktemp("finetune_hybrid"), moe=False)


def reference_first_loss(cfg):
    """transformers in one process (float64, its delta rule in float64) on step 0's sequences, each document on
    its own at its global positions: the loss over every labelled token of the batch."""
    from test_hf_linear import float64_gated_delta_rule
    from transformers.models.qwen3_next import modeling_qwen3_next as modeling

    from ringwise.data import sample_indices
    from ringwise.integrations.hf_mixers import swapped
    from ringwise.train.pretrained import documents

    def float64_kernel(query, key, value, g, beta, initial_state=None, use_qk_l2norm_in_kernel=False, **_):
        return float64_gated_delta_rule(query, key, value, g, beta, initial_state, use_qk_l2norm_in_kernel)

    data = documents(cfg)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        cfg.pretrained,
        **dtype_kwarg(torch.float64),
        **EAGER_EXPERTS,  # float64 experts: the eager loop
    )
    total, count = 0.0, 0
    with swapped(modeling, dict(torch_chunk_gated_delta_rule=float64_kernel)), torch.no_grad():
        for i in sample_indices(0, cfg.batch, len(data.train), cfg.seed):
            ex = data.train[i]
            bounds = list(ex["cu_seqlens"])
            assert len(bounds) > 2, "the step should pack several documents"
            for a, e in zip(bounds, bounds[1:]):
                logits = model(input_ids=ex["input_ids"][None, a:e], position_ids=torch.arange(a, e)[None]).logits
                labels = ex["labels"][a:e]
                total += torch.nn.functional.cross_entropy(
                    logits[0], labels, ignore_index=IGNORE_INDEX, reduction="sum"
                ).item()
                count += int((labels != IGNORE_INDEX).sum())
    return total / count


def test_hybrid_finetune_steps_agree_across_world_sizes_and_with_one_process(cluster, hybrid_and_text, tmp_path):
    model, text = hybrid_and_text
    runs = {}
    for name, (world, kw) in {
        "W1": (1, {}),
        "W2": (2, {}),
        "W3-contiguous-ckpt": (3, dict(layout="contiguous", checkpoint_layers=True)),
    }.items():
        cfg = config(model, text, tmp_path / name, seq_len=SEQ, **kw)
        runs[name] = cluster(world).run(train_job, vars(cfg))[0]
    ref = reference_first_loss(cfg)
    for name, losses in runs.items():
        assert len(losses) == 3 and len(set(losses)) == 3, losses  # the steps changed the model
        assert abs(losses[0] - ref) <= 1e-5 * ref, (name, losses[0], ref)
        assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(losses, runs["W1"])), (name, losses, runs["W1"])


def _loaded_experts(cfg_dict):
    """On each rank: the sharded finetune model's expert tensors, whole (full_tensor: every rank's shard)."""
    from ringwise.train.mesh import make_mesh
    from ringwise.train.pretrained import build_pretrained

    cfg = TrainConfig(**cfg_dict)
    model = build_pretrained(cfg, make_mesh(cfg.dp, torch.device("cpu"), cfg.timeout, cfg.ulysses))
    return {n.split("hf.", 1)[-1]: p.full_tensor() for n, p in model.named_parameters() if ".experts." in n}


def test_a_moe_checkpoint_saved_per_expert_loads_into_the_fused_experts(cluster, tmp_path):
    """Qwen3-Next's MoE as transformers 5 saves it (gate/up/down one tensor per expert): the finetune joins them as
    transformers' own loader does (stacked per expert, gate and up concatenated), each rank keeping its shard: the
    experts equal transformers' loaded model bit for bit at W=2, and the first step's loss its loss."""
    from ringwise.train.pretrained import stored_keys

    model, text = _checkpoint_and_text(tmp_path, moe=True)
    assert any(".mlp.experts.0.gate_proj.weight" in k for k in stored_keys(model))
    cfg = config(model, text, tmp_path / "run", seq_len=SEQ, steps=1)
    loaded = cluster(2).run(_loaded_experts, vars(cfg))[0]
    want = transformers.AutoModelForCausalLM.from_pretrained(model, **EAGER_EXPERTS).state_dict()
    assert loaded and all(torch.equal(t, want[n]) for n, t in loaded.items()), sorted(loaded)
    losses = cluster(2).run(train_job, vars(cfg))[0]
    ref = reference_first_loss(cfg)
    assert abs(losses[0] - ref) <= 1e-5 * ref, (losses[0], ref)


def test_a_finetuned_hybrid_exports_and_generates_as_one_process(hybrid_and_text, tmp_path, capsys):
    from ringwise.cli import main

    model, text = hybrid_and_text
    out, exported = tmp_path / "run", tmp_path / "exported"
    common = ["--world", "2", "--seq-len", str(SEQ), "--batch", "2", "--steps", "2", "--warmup", "1"]
    assert (
        main(
            [
                "finetune",
                "--model",
                str(model),
                "--text",
                str(text),
                *common,
                "--lr",
                "1e-3",
                "--eval-sequences",
                "2",
                "--eval-bucket",
                "32",
                "--no-plots",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert main(["export", str(out), str(exported), "--hf"]) == 0
    capsys.readouterr()
    prompt = " ".join(WORDS[:40])  # 40 tokens: a 36-token ring prefill, then steps on the states it left
    assert (
        main(
            [
                "generate",
                "--model",
                str(exported),
                "--world",
                "2",
                "--prompt",
                prompt,
                "--max-new-tokens",
                "6",
                "--check",
            ]
        )
        == 0
    )
    said = capsys.readouterr().out
    assert "check: identical tokens to one process" in said, said
    assert Path(exported, "config.json").exists()
