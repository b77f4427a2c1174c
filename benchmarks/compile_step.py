"""Compiled vs eager training step of the `small` model, side by side in one run.

Runs `ringwise train` twice on the same flags, eager then `--compile` (inductor, each block
fullgraph), and compares the median step time over the steps after warm-up (the first steps
compile). Usage: python benchmarks/compile_step.py [--world 2 --seq-len 1024 --steps 12 --warmup-steps 4]
"""

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from ringwise.cli import main


def step_seconds(out: Path, skip: int) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["seconds"] for r in rows if "seconds" in r and "loss" in r][skip:]


def run() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--model", default="small")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup-steps", type=int, default=4, help="steps left out of the median (compilation)")
    a = p.parse_args()
    flags = [
        "train",
        "--world",
        str(a.world),
        "--model",
        a.model,
        "--seq-len",
        str(a.seq_len),
        "--batch",
        str(a.batch),
        "--steps",
        str(a.steps),
        "--ckpt-every",
        str(a.steps),
        "--eval-per-cell",
        "1",
        "--eval-lengths",
        str(a.seq_len),
        "--no-plots",
        "--loss-on",
        "all",
    ]
    med = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in (("eager", []), ("compiled", ["--compile"])):
            out = Path(tmp) / name
            assert main(flags + ["--out", str(out)] + extra) == 0
            med[name] = statistics.median(step_seconds(out, a.warmup_steps))
    print(
        f"| model {a.model}, W = {a.world}, seq {a.seq_len}, batch {a.batch} | eager {med['eager']:.3f} s/step | "
        f"compiled {med['compiled']:.3f} s/step | eager / compiled = {med['eager'] / med['compiled']:.3f} |"
    )


if __name__ == "__main__":
    run()
