"""Peak memory per extra local token of `ringwise finetune --checkpoint-layers`, the feed-forward tiled
(--ffn-tile default: the model's hidden size in tokens) against untiled (--ffn-tile 0), at W = 1 and 2.

The model: a random wide-MLP Llama (transformers LlamaConfig, hidden 512, intermediate 8192, 4 layers,
8 heads), saved as a checkpoint folder with a word-level tokenizer (tests/hf_models.py's), trained one
step on random word documents at two lengths, fp32 on CPU, one thread per rank. Each run's peak RSS per
rank is metrics.jsonl's peak_rss_mib (the ranks set glibc's mmap threshold low, and this script sets
MALLOC_MMAP_THRESHOLD_=65536 too, so a freed tensor leaves the resident set at once); KB per extra local
token = (peak at the long length - peak at the short one) / (extra tokens / W). Usage:
    python benchmarks/tiled_ffn.py                      # 4096 -> 8192 tokens, W = 1 and 2
    python benchmarks/tiled_ffn.py --lengths 8192 16384 --worlds 1 --tiles default
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def save_model(folder: Path) -> None:
    import torch
    import transformers
    from hf_models import tiny_tokenizer

    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=512,
        intermediate_size=8192,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=16384,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)


def save_text(folder: Path, tokens: int) -> None:
    from hf_models import word_documents

    folder.mkdir(parents=True)
    docs = word_documents(tokens // 60, seed=0)  # about 62 words (tokens) each
    (folder / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))


def peak_mib(model: Path, text: Path, out: Path, world: int, seq_len: int, tile: str | None) -> float:
    cmd = [sys.executable, "-m", "ringwise.cli", "finetune", "--model", str(model), "--text", str(text)]
    cmd += ["--world", str(world), "--seq-len", str(seq_len), "--steps", "1", "--warmup", "0", "--threads", "1"]
    cmd += ["--checkpoint-layers", "--eval-sequences", "1", "--eval-bucket", str(seq_len), "--eval-lengths", "256"]
    cmd += ["--eval-depths", "0.5", "--eval-per-cell", "1", "--ckpt-every", "100", "--no-plots", "--out", str(out)]
    cmd += [] if tile is None else ["--ffn-tile", tile]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return max(r["peak_rss_mib"] for r in rows)


def run() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs=2, default=[4096, 8192], metavar=("SHORT", "LONG"))
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tiles", nargs="+", default=["0", "default"], help="--ffn-tile values ('default': not given)")
    a = p.parse_args()
    short, long = a.lengths
    with tempfile.TemporaryDirectory() as tmp:
        model, text = Path(tmp) / "model", Path(tmp) / "text"
        save_model(model)
        save_text(text, 6 * long)
        print(f"| W | --ffn-tile | peak RSS per rank at {short} / {long} tokens (MiB) | KB per extra local token |")
        print("|---|---|---|---|")
        for world in a.worlds:
            for tile in [None if t == "default" else t for t in a.tiles]:
                runs = [(Path(tmp) / f"run-{world}-{tile}-{n}", n) for n in (short, long)]
                peaks = [peak_mib(model, text, out, world, n, tile) for out, n in runs]
                per_token = (peaks[1] - peaks[0]) * 1024 / ((long - short) / world)
                name = "default (512)" if tile is None else tile
                print(f"| {world} | {name} | {peaks[0]:.0f} / {peaks[1]:.0f} | {per_token:.1f} |", flush=True)


if __name__ == "__main__":
    run()
