"""`ringwise generate --model RUN_DIR|EXPORT.pt|HF_FOLDER --world N (--prompt TEXT | --prompts FILE |
--retrieval K)`: generation across local ranks (the training job's launcher and flags), the prompt
prefilled through the ring and decoded over the sharded KV cache: ringwise's own model
(ringwise.generate), or a transformers model, a folder or a `ringwise finetune` run (generate_hf.py).
The ranks run where `ringwise train`'s do: --device auto|cpu|cuda and --backend gloo|nccl are
resolved by the training job's own rules (ringwise.train.mesh.placement, init_distributed),
also under torchrun.

--retrieval K answers K evaluation documents of the run's own task (its retrieval settings and
evaluation grid are kept in the checkpoint) and prints the accuracy; --check reruns every prompt
in this process with the whole sequence in one SDPA model and fails unless the tokens are
identical. Writes generate.json next to the model: time to first token, per-token latency
(p50/p90), tokens/s, KV bytes per rank and collectives per new token.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from . import flag_problems, refused
from .generation_report import checked, quantile, write_report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        metavar="RUN_DIR|EXPORT.pt|HF_FOLDER",
        help="a `ringwise train` or `finetune` run's folder (its newest intact checkpoint), a `ringwise export` "
        ".pt, or a transformers folder (pretrained, or `ringwise export --hf`)",
    )
    p.add_argument(
        "--prompt", metavar="TEXT", help="text to continue (the model's tokenizer; byte tokens for ringwise's own)"
    )
    p.add_argument(
        "--prompts",
        metavar="FILE.jsonl",
        help='transformers models: one prompt per line, {"prompt": text} or {"messages": [...]} (chat template)',
    )
    p.add_argument("--chat", action="store_true", help="transformers models: --prompt as a user message, chat template")
    p.add_argument(
        "--report",
        metavar="FILE.json",
        help="where the report goes (default: generate.json in the run's folder; none for a plain transformers folder)",
    )
    p.add_argument(
        "--retrieval", type=int, metavar="K", help="answer K evaluation documents of the run's task; or --prompt"
    )
    p.add_argument("--world", type=int, default=2, help="local processes to start (ignored under torchrun)")
    p.add_argument("--layout", default="zigzag", choices=("zigzag", "striped", "contiguous"))
    # the choices and defaults of `ringwise train`'s --device / --backend (a test holds them equal);
    # defined here because ringwise.train.config imports torch and `generate --help` must not
    p.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="default: cuda where torch sees a GPU (each rank binds GPU LOCAL_RANK), else cpu",
    )
    p.add_argument(
        "--backend",
        default=None,
        choices=("gloo", "nccl"),
        help="default: nccl when every rank has a GPU of its own, else gloo",
    )
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", action="store_true", help="rerun in one process and fail unless the tokens are identical")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a rank waits on another")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per rank")


def problems(args) -> list[str]:
    found = []
    given = [
        f for f, v in (("--prompt", args.prompt), ("--prompts", args.prompts), ("--retrieval", args.retrieval)) if v
    ]
    if len(given) != 1:
        found.append(f"give one of --prompt TEXT, --prompts FILE and --retrieval K (got {', '.join(given) or 'none'})")
    if args.model is not None and not Path(args.model).exists():
        found.append(f"{args.model}: no such run folder or file")
    elif args.model is not None:
        from .generate_hf import is_transformers

        hf = is_transformers(Path(args.model))
        if hf and args.retrieval is not None:
            found.append("--retrieval answers a ringwise training run's task: a transformers model takes --prompt(s)")
        if not hf and (args.prompts or args.chat):
            found.append("--prompts and --chat are for transformers models (a folder or a finetune run)")
    if args.prompts and not Path(args.prompts).is_file():
        found.append(f"--prompts {args.prompts}: no such file")
    if args.world < 1:
        found.append(f"--world must be >= 1, got {args.world}")
    if args.max_new_tokens < 1:
        found.append(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.retrieval is not None and args.retrieval < 1:
        found.append(f"--retrieval must be >= 1, got {args.retrieval}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        found.append("--temperature must be >= 0 and --top-p in (0, 1]")
    if args.check and args.temperature > 0:
        found.append("--check compares greedy tokens: drop --temperature")
    if args.world >= 1:
        from ..train.mesh import placement

        try:  # the ranks make the same decision from the same facts, as the training job's do
            placement(args.device, args.backend, local_ranks(args))
        except ValueError as e:
            found.append(str(e))
    return found


def local_ranks(args) -> int:
    """Ranks on this node: torchrun's LOCAL_WORLD_SIZE when it launched us, else --world."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", args.world))


def model_file(path: Path, tmp: str) -> Path:
    """An exported .pt as it is; a run folder's newest intact checkpoint exported once, here in
    the launcher, for every rank to load (weights_only, memory-mapped)."""
    if path.is_file():
        return path
    from ..train import checkpoint

    out = Path(tmp) / "model.pt"
    checkpoint.export(path, out)
    return out


def load_model(file: Path):
    import torch

    from ..model import ModelConfig, Transformer
    from ..train.checkpoint import load_export

    state = load_export(file)
    with torch.device("meta"):
        model = Transformer(ModelConfig(**state["config"]))
    model.load_state_dict(state["model"], assign=True)
    return model.eval(), state


def prompts(args, state) -> list[dict]:
    """[{ids (batch, S), answers (batch, n) or None}]: the text prompt, or K retrieval documents
    drawn round-robin over the run's evaluation grid, batched by length."""
    import torch

    if args.prompt is not None:
        from ..data.text import ByteTokenizer

        ids = torch.tensor([[ByteTokenizer.BOS] + list(args.prompt.encode())])
        return [dict(ids=ids, answers=None, new=args.max_new_tokens)]
    task = state.get("task")
    if not task:
        raise ValueError("--retrieval needs a checkpoint that keeps its task (trained by this version)")
    from ..data.retrieval import retrieval_eval_grid

    cells = [(L, d) for L in task["lengths"] for d in task["depths"]]
    per_cell = -(-args.retrieval // len(cells))
    kwargs = {k: task[k] for k in ("fmt", "id_digits", "value_digits", "id_chars", "id_pool")}
    grid = retrieval_eval_grid(task["lengths"], task["depths"], per_cell, decoys=task["decoys"], **kwargs)
    chosen = [grid[cells[i % len(cells)]][i // len(cells)] for i in range(args.retrieval)]
    groups: dict[tuple, list] = {}
    for ex in chosen:
        a, b = ex["answer_span"]
        groups.setdefault((a, b), []).append(ex["input_ids"])
    return [
        dict(ids=torch.stack(docs)[:, :a], answers=torch.stack(docs)[:, a:b], new=b - a)
        for (a, b), docs in groups.items()
    ]


def worker(args, file: str) -> dict | None:
    """One rank: every prompt through ringwise.generate; rank 0 returns the report."""
    import torch
    import torch.distributed as dist

    from ..generate import generate
    from ..testing.comms import count_comms
    from ..train.mesh import init_distributed

    device = init_distributed(args.device, args.backend, args.timeout)
    rank = dist.get_rank()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, state = load_model(Path(file))
    model = model.to(device)
    bar = None
    jobs = [dict(j, ids=j["ids"].to(device)) for j in prompts(args, state)]
    if rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=sum(j["new"] for j in jobs), desc="generate", unit="tok", dynamic_ncols=True)
    results, ttft, latencies, comms, kv = [], [], [], [], []
    for j in jobs:
        stamps = [time.perf_counter()]

        def tick(step, token):
            if device.type == "cuda":  # the token's kernels done, not just queued
                torch.cuda.synchronize(device)
            stamps.append(time.perf_counter())
            if bar is not None:
                bar.update()

        with count_comms() as counted:
            from ..attention.kvcache import KVCache

            cache = KVCache(model.cfg.n_layers, rank, dist.get_world_size())
            tokens = generate(
                model,
                j["ids"],
                j["new"],
                layout=args.layout,
                temperature=args.temperature,
                top_p=args.top_p,
                seed=args.seed,
                cache=cache,
                on_token=tick,
            ).cpu()
        ttft.append(stamps[1] - stamps[0])
        latencies += [b - a for a, b in zip(stamps[1:], stamps[2:])]
        if j["new"] > 1:  # the first new token comes from the prefill; the rest are decode steps
            # the decode step's gathers: torch >= 2.13's all_gather_single, or its older name
            gathers = sum(counted.counts.get(k, 0) for k in ("all_gather_single", "all_gather_into_tensor"))
            comms.append(gathers / (j["new"] - 1))
        kv.append(cache.nbytes())
        results.append(tokens[:, j["ids"].shape[1] :])
    if bar is not None:
        bar.close()
    kv_all = [None] * dist.get_world_size()
    dist.all_gather_object(kv_all, max(kv))
    dist.destroy_process_group()
    if rank != 0:
        return None
    total = sum(j["new"] * j["ids"].shape[0] for j in jobs)
    report = dict(
        world=len(kv_all),
        layout=args.layout,
        prompts=sum(j["ids"].shape[0] for j in jobs),
        new_tokens=total,
        time_to_first_token_s=statistics.median(ttft),
        per_token_latency_s=dict(p50=quantile(latencies, 0.5), p90=quantile(latencies, 0.9)),
        tokens_per_s=total / (sum(ttft) + sum(latencies)),
        kv_bytes_per_rank=kv_all,
        decode_collectives_per_token=max(comms) if comms else None,
    )
    if args.retrieval is not None:
        hits = []
        for got, j in zip(results, jobs):  # an answer counts only when every one of its tokens is right
            hits += (got == j["answers"]).all(1).tolist()
        report["retrieval"] = dict(documents=len(hits), accuracy=sum(hits) / len(hits))
    report["tokens"] = [t.tolist() for t in results]
    write_report(report, Path(args.report))
    return report


def check(args, file: Path, report: dict) -> list[str]:
    """The same prompts in this process, whole-sequence SDPA each step, no cache, on the ranks'
    kind of device: tokens must match."""
    from ..generate import generate_single_process
    from ..train.mesh import placement

    kind, _ = placement(args.device, args.backend, local_ranks(args))
    model, state = load_model(file)
    model = model.to(kind)
    mismatches = []
    for i, (j, got) in enumerate(zip(prompts(args, state), report["tokens"])):
        ids = j["ids"].to(kind)
        want = generate_single_process(model, ids, j["new"])[:, ids.shape[1] :].tolist()
        if want != got:
            mismatches.append(f"prompt group {i}: {got} vs one process {want}")
    return mismatches


def main(args) -> int:
    """0 with the tokens printed and generate.json written; 2 on bad flags or a missing model (before
    any rank starts); 1 when a rank failed or --check found different tokens."""
    found = flag_problems(args) + problems(args)
    if found:
        return refused("generate", found)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from ..train.checkpoint import load_export
    from ..train.launcher import elastic_run, failure_causes, under_torchrun

    path = Path(args.model)
    from .generate_hf import is_transformers

    if is_transformers(path):
        return _main_hf(args, path)
    with tempfile.TemporaryDirectory(prefix="ringwise-generate-") as tmp:
        try:
            file = model_file(path, tmp)
        except FileNotFoundError as e:
            print(f"ringwise generate: {e}", file=sys.stderr)
            return 2
        if args.retrieval is not None and not load_export(file).get("task"):  # memory-mapped: cheap
            print(
                f"ringwise generate: --retrieval needs a checkpoint that keeps its task; {path} was saved "
                "before checkpoints kept it (use --prompt, or train again)",
                file=sys.stderr,
            )
            return 2
        args.report = args.report or str((path if path.is_dir() else path.parent) / "generate.json")
        logs = Path(tmp) / "logs"
        try:
            elastic_run(worker, args.world, args, str(file), log_dir=str(logs))
        except ChildFailedError as e:
            print("ringwise generate: the job failed:\n  " + "\n  ".join(failure_causes(e, str(logs))), file=sys.stderr)
            return 1
        if under_torchrun() and os.environ["RANK"] != "0":  # this rank was one of the job's: rank 0 reports
            return 0
        report = json.loads(Path(args.report).read_text())
        per_token = report["decode_collectives_per_token"]
        line = (
            f"generated {report['new_tokens']} tokens on {report['world']} ranks: first token "
            f"{report['time_to_first_token_s'] * 1e3:.0f} ms, {report['tokens_per_s']:.1f} tokens/s, "
            + (
                "no decode step (one new token per prompt)"
                if per_token is None
                else f"{per_token:.0f} collectives per decoded token, "
                f"p50 {report['per_token_latency_s']['p50'] * 1e3:.1f} ms"
            )
            + f", KV per rank {[round(b / 2**10, 1) for b in report['kv_bytes_per_rank']]} KiB"
        )
        if "retrieval" in report:
            r = report["retrieval"]
            line += f"; retrieval accuracy {r['accuracy']:.0%} over {r['documents']} documents"
            summary = path / "summary.json"
            if path.is_dir() and summary.exists():
                acc = json.loads(summary.read_text()).get("retrieval", {}).get("accuracy")
                if acc:
                    flat = [a for row in acc for a in row]
                    line += f" (the run's own evaluation: {sum(flat) / len(flat):.0%})"
        if args.prompt is not None:
            print(bytes(t for t in report["tokens"][0][0] if t < 256).decode(errors="replace"))
        print(line)
        if args.check:
            return checked(check(args, file, report))
    return 0


def _main_hf(args, path: Path) -> int:
    """main() for a transformers model (generate_hf.py): the texts printed, the report written where asked."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from ..train.launcher import elastic_run, failure_causes, under_torchrun
    from . import generate_hf

    if args.report is None and not (path / "config.json").is_file():  # a finetune run: its own folder
        args.report = str(path / "generate.json")
    try:
        generate_hf.prompt_rows(args)  # a bad prompts file is refused before any rank starts
    except ValueError as e:
        print(f"ringwise generate: {e}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="ringwise-generate-") as tmp:
        try:
            folder = generate_hf.model_folder(path, tmp)
            generate_hf.encoded_prompts(args, folder)  # every prompt through the tokenizer: refused before the ranks
        except (FileNotFoundError, ValueError) as e:
            print(f"ringwise generate: {e}", file=sys.stderr)
            return 2
        report_file = args.report or str(Path(tmp) / "generate.json")  # rank 0 hands the launcher its report
        args.report = report_file
        logs = Path(tmp) / "logs"
        try:
            elastic_run(generate_hf.worker, args.world, args, str(folder), log_dir=str(logs))
        except ChildFailedError as e:
            print("ringwise generate: the job failed:\n  " + "\n  ".join(failure_causes(e, str(logs))), file=sys.stderr)
            return 1
        if under_torchrun() and os.environ["RANK"] != "0":
            return 0
        report = json.loads(Path(report_file).read_text())
        for text in report["texts"]:
            print(text)
        lat = report["per_token_latency_s"]["p50"]
        print(
            f"generated {report['new_tokens']} tokens for {report['prompts']} prompt(s) on {report['world']} ranks: "
            f"first token {report['time_to_first_token_s'] * 1e3:.0f} ms, {report['tokens_per_s']:.1f} tokens/s"
            + ("" if lat is None else f", p50 {lat * 1e3:.1f} ms a token")
        )
        if args.check:
            return checked(generate_hf.check(args, folder, report))
    return 0
