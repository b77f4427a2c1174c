"""`ringwise generate --model FOLDER|FINETUNE_RUN`: generation from a transformers model across local
ranks: a transformers folder (pretrained or `ringwise export --hf`), or a `ringwise finetune` run
(its newest intact checkpoint, exported once in the launcher). The model's tokenizer and chat
template; prompts from --prompt (with --chat, one user message) or a JSONL file (--prompts: a
`prompt` or a `messages` list per line); greedy or sampling. The prompt is prefilled through the
ring and decoded over the sharded cache by `rw.generate`; the ranks run where `ringwise train`'s
do (the same --device / --backend rules). --check reruns every prompt greedily in this process
with transformers' own generate() on SDPA and fails unless the tokens are identical.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

from .generation_report import quantile, write_report


def is_transformers(path: Path) -> bool:
    """A transformers folder, or a finetune run (which keeps its model's config in hf/)."""
    return path.is_dir() and ((path / "config.json").is_file() or (path / "hf" / "config.json").is_file())


def model_folder(path: Path, tmp: str) -> Path:
    """The transformers folder to load: the folder itself, or a finetune run's newest intact checkpoint
    exported once, here in the launcher, for every rank to load."""
    if (path / "config.json").is_file():
        return path
    from ..train.pretrained import export_hf

    out = Path(tmp) / "hf"
    export_hf(path, out)
    return out


def prompt_rows(args) -> list[dict]:
    """[{"prompt": text} or {"messages": [...]}]: --prompt (as one user message with --chat), or the
    lines of --prompts (JSONL). A bad line is refused with its number."""
    if args.prompt is not None:
        return [{"messages": [{"role": "user", "content": args.prompt}]} if args.chat else {"prompt": args.prompt}]
    rows = []
    for n, line in enumerate(Path(args.prompts).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{args.prompts}:{n}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not (
            isinstance(row.get("prompt"), str) or isinstance(row.get("messages"), list)
        ):
            raise ValueError(f'{args.prompts}:{n}: each line needs a "prompt" string or a "messages" list')
        rows.append(row)
    if not rows:
        raise ValueError(f"{args.prompts}: no prompts")
    return rows


def encode(tokenizer, row: dict) -> list[int]:
    """A row's token ids: its messages through the tokenizer's chat template (with the assistant's
    turn opened), or its prompt as plain text."""
    if "messages" in row:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the model's tokenizer has no chat template: give plain prompts (no --chat, no messages)")
        ids = tokenizer.apply_chat_template(row["messages"], add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        return [int(i) for i in ids]
    return [int(i) for i in tokenizer(row["prompt"])["input_ids"]]


def encoded_prompts(args, folder) -> list[list[int]]:
    """Every prompt's token ids, with the model's tokenizer (ValueError for one it cannot encode)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return [encode(tokenizer, row) for row in prompt_rows(args)]


def generate_kwargs(args, tokenizer) -> dict:
    """transformers' generate() options for these flags (the same on every rank)."""
    kwargs: dict = dict(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0)
    if args.temperature > 0:
        kwargs.update(temperature=args.temperature, top_p=args.top_p)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        kwargs["pad_token_id"] = tokenizer.eos_token_id
    return kwargs


class _Stamps:
    """A logits processor that only notes the time of each step (the first: the prompt's prefill)."""

    def __init__(self, device) -> None:
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())
        return scores


def worker(args, folder: str) -> dict | None:
    """One rank: every prompt through rw.generate; rank 0 returns the report (and writes it, if asked)."""
    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer, LogitsProcessorList

    from ..integrations import transformers as rw
    from ..train.mesh import init_distributed

    device = init_distributed(args.device, args.backend, args.timeout)
    rank = dist.get_rank()
    if args.threads:
        torch.set_num_threads(args.threads)
    rw.use_ring(layout=args.layout)
    model = rw.from_pretrained(folder).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = prompt_rows(args)
    bar = None
    if rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=len(rows), desc="generate", unit="prompt", dynamic_ncols=True)
    tokens, texts, ttft, latencies, lengths = [], [], [], [], []
    for row in rows:
        ids = torch.tensor([encode(tokenizer, row)], device=device)
        stamps = _Stamps(device)
        torch.manual_seed(args.seed)  # the same random state on every rank: the same samples
        start = time.perf_counter()
        with torch.no_grad():
            out = rw.generate(
                model, ids, logits_processor=LogitsProcessorList([stamps]), **generate_kwargs(args, tokenizer)
            )
        new = out[0, ids.shape[1] :].tolist()
        tokens.append(new)
        texts.append(tokenizer.decode(new, skip_special_tokens=True))
        lengths.append(ids.shape[1])
        ttft.append(stamps.times[0] - start)
        latencies += [b - a for a, b in zip(stamps.times, stamps.times[1:])]
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    world = dist.get_world_size()
    dist.destroy_process_group()
    if rank != 0:
        return None
    generated = sum(len(t) for t in tokens)
    report = dict(
        world=world,
        layout=args.layout,
        model=str(args.model),
        prompts=len(rows),
        prompt_tokens=lengths,
        new_tokens=generated,
        time_to_first_token_s=statistics.median(ttft),
        per_token_latency_s=dict(p50=quantile(latencies, 0.5), p90=quantile(latencies, 0.9)),
        tokens_per_s=generated / (sum(ttft) + sum(latencies)) if generated else 0.0,
        tokens=tokens,
        texts=texts,
    )
    if args.report:
        write_report(report, Path(args.report))
    return report


def check(args, folder: Path, report: dict) -> list[str]:
    """Every prompt greedily in this process, transformers' own generate() on SDPA, on the ranks' kind
    of device: the tokens must match."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..train.mesh import placement

    kind, _ = placement(args.device, args.backend, int(os.environ.get("LOCAL_WORLD_SIZE", args.world)))
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa", device_map=kind).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    mismatches = []
    for i, (row, got) in enumerate(zip(prompt_rows(args), report["tokens"])):
        ids = torch.tensor([encode(tokenizer, row)], device=kind)
        with torch.no_grad():
            want = model.generate(ids, **generate_kwargs(args, tokenizer))[0, ids.shape[1] :].tolist()
        if want != got:
            mismatches.append(f"prompt {i}: {got} vs one process {want}")
    return mismatches
