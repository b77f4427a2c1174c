"""The planner's per-token bytes (`ringwise plan --model config.json`) against a measured slope.

Runs `ringwise finetune --checkpoint-layers` at two sequence lengths on one CPU rank (float32), reads
each run's peak resident memory (metrics.jsonl's peak_rss_mib: VmHWM, with glibc's mmap threshold low
so that freed tensors leave the resident set) and divides the difference by the difference in tokens:
the bytes one more token costs, model state and every constant cancelled. The planner's figure is
its ledger's per-token bytes on the device for the same config, dtype, flags and one rank.

    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/plan_ledger.py --model models/smollm2-135m \
        --text README.md BENCHMARKS.md docs
    python benchmarks/plan_ledger.py --make-wide models/wide-mlp   # the wide-MLP model, random weights
    python benchmarks/plan_ledger.py --model models/wide-mlp --text README.md BENCHMARKS.md docs --ffn-tile 0

Any further finetune flag is passed on (--ffn-tile, --save-attention, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ringwise import plan

WIDE = dict(hidden_size=512, intermediate_size=8192, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8)


def make_wide(folder: Path) -> Path:
    """A random Llama with a wide MLP (hidden 512, intermediate 8192, 4 layers) and a byte-level
    tokenizer (one token per byte), saved as a transformers folder."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {c: i + 3 for i, c in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>"
    )
    config = transformers.LlamaConfig(
        vocab_size=len(vocab), max_position_embeddings=8192, bos_token_id=1, eos_token_id=2, **WIDE
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def peak_mib(model: str, text: list[str], seq_len: int, extra: list[str], out: Path) -> float:
    """The run's peak resident MiB (the largest peak_rss_mib of its steps)."""
    cmd = [
        sys.executable, "-m", "ringwise.cli", "finetune", "--model", model, "--text", *text,
        "--world", "1", "--device", "cpu", "--dtype", "fp32", "--checkpoint-layers", "--seq-len", str(seq_len),
        "--steps", "2", "--warmup", "1", "--ckpt-every", "100", "--no-plots", "--eval-sequences", "1",
        "--eval-bucket", str(seq_len), "--eval-lengths", "256", "--eval-depths", "0.5", "--eval-per-cell", "1",
        "--out", str(out), *extra,
    ]  # fmt: skip
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=os.environ.get("MALLOC_MMAP_THRESHOLD_", "65536"))
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return max(r["peak_rss_mib"] for r in records if "peak_rss_mib" in r)


def planned(model: str, extra: list[str]) -> plan.Ledger:
    """The planner's ledger for this config on one rank in float32, with the run's memory flags."""
    tile = extra[extra.index("--ffn-tile") + 1] if "--ffn-tile" in extra else None
    modes = plan.MemoryModes(
        checkpoint_layers=True,
        save_attention="--save-attention" in extra,
        offload_activations="--offload-activations" in extra,
        ffn_tile=None if tile is None else int(tile),
    )
    return plan.ledger(plan.read_config(model), 1, "fp32", modes)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a transformers checkpoint folder")
    p.add_argument("--text", nargs="+", default=["README.md", "BENCHMARKS.md", "docs"])
    p.add_argument("--lengths", nargs=2, type=int, default=[2048, 4096])
    p.add_argument("--make-wide", metavar="FOLDER", help="save the wide-MLP model there and stop")
    args, extra = p.parse_known_args(argv)
    if args.make_wide:
        print(make_wide(Path(args.make_wide)))
        return
    if not args.model:
        p.error("--model (or --make-wide) is required")
    short, long = args.lengths
    with tempfile.TemporaryDirectory() as tmp:
        peaks = [peak_mib(args.model, args.text, n, extra, Path(tmp) / str(n)) for n in (short, long)]
    slope = (peaks[1] - peaks[0]) * 2**20 / (long - short)
    print(f"peak RSS {peaks[0]:.1f} MiB at {short}, {peaks[1]:.1f} MiB at {long}: {slope:,.0f} B/token", flush=True)
    led = planned(args.model, extra)
    per_token = led.slope(short, long)
    print(
        json.dumps(
            dict(
                model=args.model,
                flags=extra,
                lengths=[short, long],
                peak_rss_mib=[round(x, 1) for x in peaks],
                measured_bytes_per_token=round(slope),
                planned_bytes_per_token=round(per_token),
                planned_over_measured=round(per_token / slope, 3),
                planned_peak_phase=[led.peak(short)[1], led.peak(long)[1]],
                planned_phases_per_token={p: round(led.bytes_per_token(p)) for p in led.phases_per_token},
            ),
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
