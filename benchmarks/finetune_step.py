"""A fine-tuning step of a pretrained model: `ringwise finetune` on W ranks against plain transformers in
one process with all the threads, side by side in one run, on the same text and sequence length.

The one-process step: AutoModelForCausalLM (SDPA attention), one sequence of --seq-len tokens of the
same packed text (its own documents masked by transformers' packed-position detection is not used: one
causal sequence), AdamW, clipping. The ring step: `ringwise finetune` (FSDP2, documents via cu_seqlens).
Median of the steps after the first. Usage:
    python benchmarks/finetune_step.py --model models/smollm2-135m --text README.md BENCHMARKS.md
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ringwise.cli import main


def one_process(model_path, ids, steps, threads) -> list[float]:
    import transformers

    torch.set_num_threads(threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch.float32, attn_implementation="sdpa"
    )
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, betas=(0.9, 0.95), weight_decay=0.1)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


def run() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--text", nargs="+", required=True)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads in all (each rank its share)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ring"
        assert (
            main(
                [
                    "finetune",
                    "--model",
                    a.model,
                    "--text",
                    *a.text,
                    "--world",
                    str(a.world),
                    "--seq-len",
                    str(a.seq_len),
                    "--steps",
                    str(a.steps),
                    "--warmup",
                    "1",
                    "--threads",
                    str(a.threads // a.world),
                    "--eval-sequences",
                    "1",
                    "--ckpt-every",
                    str(10 * a.steps),
                    "--no-plots",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
        ring = statistics.median(r["seconds"] for r in rows[1:])
        peak_ring = max(r["peak_rss_mib"] for r in rows)
    from ringwise.train.config import TrainConfig
    from ringwise.train.pretrained import documents

    data = documents(TrainConfig(pretrained=a.model, text=a.text, seq_len=a.seq_len))
    ids = data.train[0]["input_ids"][None]
    single = statistics.median(one_process(a.model, ids, a.steps, a.threads)[1:])
    print(
        f"| {Path(a.model).name}, {a.seq_len} tokens, {a.threads} threads in all | one process {single:.2f} s/step | "
        f"ringwise finetune W = {a.world} {ring:.2f} s/step (peak RSS per rank {peak_ring:.0f} MiB) | "
        f"one process / ring = {single / ring:.2f} |"
    )


if __name__ == "__main__":
    run()
