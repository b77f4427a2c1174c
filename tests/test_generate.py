"""Generation with ringwise's model over a sequence-sharded cache: the same tokens on every rank,
and greedy tokens equal to one process's SDPA model run on the whole sequence each step, for
W = 1..4, every layout, prompts not divisible by 2W."""

import pytest
import torch

import ringwise
from ringwise.generate import generate, generate_single_process
from ringwise.model import Transformer, model_config


def tiny_model():
    torch.manual_seed(0)
    return Transformer(model_config("tiny"))


def prompt(length, batch=2):
    return torch.randint(
        0, model_config("tiny").vocab_size, (batch, length), generator=torch.Generator().manual_seed(length)
    )


def generate_case(case):
    model = tiny_model().eval()
    kw = dict(temperature=case.get("temperature", 0.0), top_p=case.get("top_p", 1.0), seed=7)
    tokens = generate(model, prompt(case["prompt"]), case["new"], layout=case["layout"], **kw)
    return tokens


GRID = [
    dict(world=W, layout=layout, prompt=length, new=6)
    for W in (1, 2, 3, 4)
    for layout in ringwise.LAYOUTS
    for length in (5, 13)
]
GRID += [dict(world=W, layout="zigzag", prompt=11, new=6, temperature=0.8, top_p=0.9) for W in (2, 3)]


@pytest.mark.parametrize(
    "case",
    GRID,
    ids=lambda c: f"W{c['world']}-{c['layout']}-S{c['prompt']}" + ("-sampled" if "temperature" in c else ""),
)
def test_generation_matches_one_process(grid_results, case):
    results = grid_results(generate_case, GRID, case)
    for r in results:
        assert torch.equal(r, results[0]), "ranks generated different tokens"
    assert torch.equal(results[0][:, : case["prompt"]], prompt(case["prompt"]))
    if "temperature" in case:  # seeded sampling: the same draw on every rank, as in one process
        single = generate(tiny_model().eval(), prompt(case["prompt"]), case["new"], temperature=0.8, top_p=0.9, seed=7)
        assert torch.equal(results[0], single)
    else:
        assert torch.equal(results[0], generate_single_process(tiny_model(), prompt(case["prompt"]), case["new"]))


def test_generate_command_answers_the_runs_questions_and_checks_them(cluster, tmp_path, capsys):
    """`ringwise generate --model RUN_DIR --world 3 --retrieval 4 --check`: a short retrieval run trained on the test
    cluster, its evaluation documents answered over the sharded cache on 3 launched ranks (a prompt length
    not divisible by 6), tokens identical to one process, generate.json written; bad flags refused first."""
    import json

    from test_train import job_args, run_job

    from ringwise.cli import main

    out = tmp_path / "run"
    cluster(2).run(run_job, job_args(out, steps=3, ckpt_every=3))
    assert main(["generate", "--model", str(out), "--world", "3", "--retrieval", "4", "--check", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "check: identical tokens to one process" in printed and "retrieval accuracy" in printed
    report = json.loads((out / "generate.json").read_text())
    assert report["world"] == 3 and report["retrieval"]["documents"] == 4
    assert report["decode_collectives_per_token"] == 2  # one all-gather per layer of the tiny model
    assert len(report["kv_bytes_per_rank"]) == 3 and all(b > 0 for b in report["kv_bytes_per_rank"])
    assert report["time_to_first_token_s"] > 0 and report["tokens_per_s"] > 0
    assert main(["generate", "--model", str(tmp_path / "nothing"), "--prompt", "x", "--max-new-tokens", "0"]) == 2
    err = capsys.readouterr().err
    assert "no such run folder" in err and "--max-new-tokens must be >= 1" in err
    # an export without its task (saved before checkpoints kept it): --retrieval refused before any rank starts
    assert main(["export", str(out), str(tmp_path / "model.pt")]) == 0
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    state["task"] = None
    torch.save(state, tmp_path / "old.pt")
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path / "old.pt"), "--retrieval", "2"]) == 2
    assert "--retrieval needs a checkpoint that keeps its task" in capsys.readouterr().err


def test_generate_places_its_ranks_as_train_does(tmp_path, capsys):
    """`ringwise generate` runs wherever `ringwise train` runs: the same --device / --backend choices and
    defaults, resolved by the training job's placement, so an impossible pair is refused, naming the fix,
    before any rank starts."""
    from ringwise.cli import build_parser, main

    def placement_flags(command):
        sub = next(a for a in build_parser((command,))._actions if getattr(a, "choices", None))
        options = sub.choices[command]._option_string_actions
        return {flag: (options[flag].choices, options[flag].default) for flag in ("--device", "--backend")}

    assert placement_flags("generate") == placement_flags("train")
    (tmp_path / "model.pt").write_bytes(b"")
    model = ["--model", str(tmp_path / "model.pt")]
    assert main(["generate", *model, "--prompt", "x", "--device", "cpu", "--backend", "nccl"]) == 2
    assert "--backend nccl needs --device cuda" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["generate", *model, "--prompt", "x", "--device", "cuda"]) == 2
        assert "--device cuda: torch sees no GPU" in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_generate_command_on_a_gpu_checks_against_one_process(cluster, tmp_path, capsys):
    """`ringwise generate --device cuda`: ranks sharing the GPU talk over gloo (hops staged through the host), the
    decode gathers on CUDA tensors; the tokens equal one process's (--check runs on the same kind of device)."""
    from test_train import job_args, run_job

    from ringwise.cli import main

    out = tmp_path / "run"
    cluster(2).run(run_job, job_args(out, steps=3, ckpt_every=3))
    argv = ["generate", "--model", str(out), "--world", "2", "--device", "cuda", "--backend", "gloo"]
    assert main([*argv, "--retrieval", "2", "--check", "--threads", "1"]) == 0
    assert "check: identical tokens to one process" in capsys.readouterr().out


def test_generate_command_runs_a_transformers_model(tmp_path, capsys):
    """`ringwise generate --model HF_FOLDER --world 2`: a tiny random Llama and its word tokenizer (with a chat
    template), a plain prompt and a JSONL file (a prompt and a chat), prefilled through the ring and decoded over
    the sharded cache by rw.generate on 2 launched ranks; --check: greedy tokens identical to transformers'
    own generate() in one process; the report where --report says. Then what is refused before any rank
    starts: --retrieval for a transformers model, --prompts for ringwise's own, a bad JSONL line, a chat
    without a template, a finetune run without a checkpoint."""
    import json

    from hf_models import save_tiny_checkpoint, tiny_tokenizer

    from ringwise.cli import main

    folder = save_tiny_checkpoint(tmp_path / "llama")
    tok = tiny_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}waz{% endif %}"
    )
    tok.save_pretrained(folder)
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "waa wab 7 1 4"}, {"messages": [{"role": "user", "content": "wac wad wae waf wag"}]}]
    prompts.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    report = tmp_path / "report.json"
    common = ["--model", str(folder), "--world", "2", "--max-new-tokens", "6", "--threads", "1"]
    assert main(["generate", *common, "--prompts", str(prompts), "--check", "--report", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "check: identical tokens to one process" in printed
    got = json.loads(report.read_text())
    assert got["world"] == 2 and got["prompts"] == 2 and [len(t) for t in got["tokens"]] == [6, 6]
    assert got["prompt_tokens"] == [5, 6]  # five tokens (the tokenizer adds no BOS); five words and the template's
    # opening of the assistant's turn
    assert got["time_to_first_token_s"] > 0 and got["tokens_per_s"] > 0
    assert main(["generate", *common, "--prompt", "waa wab", "--chat", "--check"]) == 0
    assert "check: identical tokens to one process" in capsys.readouterr().out

    def refused(*argv):
        assert main(["generate", *argv]) == 2
        return capsys.readouterr().err

    assert "a transformers model takes --prompt(s)" in refused("--model", str(folder), "--retrieval", "2")
    (tmp_path / "model.pt").write_bytes(b"")
    assert "--prompts and --chat are for transformers models" in refused(
        "--model", str(tmp_path / "model.pt"), "--prompts", str(prompts)
    )
    (tmp_path / "bad.jsonl").write_text('{"prompt": "waa"}\n{"text": "wab"}\n')
    assert "bad.jsonl:2: each line needs" in refused("--model", str(folder), "--prompts", str(tmp_path / "bad.jsonl"))
    plain = save_tiny_checkpoint(tmp_path / "plain")
    assert "no chat template" in refused("--model", str(plain), "--prompt", "waa", "--chat")
    run = tmp_path / "run"
    (run / "hf").mkdir(parents=True)
    (run / "hf" / "config.json").write_text((folder / "config.json").read_text())
    assert "no intact checkpoint" in refused("--model", str(run), "--prompt", "waa")
