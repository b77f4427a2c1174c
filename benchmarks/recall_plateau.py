"""Why the demo's task is shaped as it is: when does a 2-layer model leave the recall plateau?

Same model as the demo (preset `small`, one process, SDPA attention), same optimiser. Each
sequence is lines `key value SEP` with keys drawn (with replacement) from 16 symbols, each key
keeping one random value; the loss is on the value of every line whose key occurred before.
Three variants differ only in the output classes:

  shared    keys and values from one 16-symbol alphabet, vocabulary 17
  +unused   the same data, 247 extra output classes that are never targets (byte-sized vocab)
  separate  keys and values from two 16-symbol alphabets (keys are never targets), vocabulary 33

Prints the mean value loss every 100 steps (chance ln 16 = 2.77). Usage:
    python benchmarks/recall_plateau.py [--steps 600] [--threads 1]
"""

import argparse
import random
import time

import torch

from ringwise.model import Transformer, model_config

VARIANTS = {"shared": (True, 0), "+unused": (True, 247), "separate": (False, 0)}


def batch(rng, shared, seq_len=128, size=16, symbols=16):
    sep = symbols if shared else 2 * symbols
    xs, ys = [], []
    for _ in range(size):
        value_of = {k: rng.randrange(symbols) + (0 if shared else symbols) for k in range(symbols)}
        toks, labels, seen = [], [], set()
        while len(toks) + 3 <= seq_len:
            k = rng.randrange(symbols)
            toks += [k, value_of[k], sep]
            labels += [value_of[k] if k in seen else -100, -100, -100]  # position of k predicts its value
            seen.add(k)
        pad = seq_len - len(toks)
        xs.append(toks + [sep] * pad)
        ys.append(labels + [-100] * pad)
    return torch.tensor(xs), torch.tensor(ys), sep + 1


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    curves = {}
    for name, (shared, extra) in VARIANTS.items():
        torch.manual_seed(0)
        rng = random.Random(0)
        vocab = batch(random.Random(0), shared, size=1)[2] + extra
        model = Transformer(model_config("small", vocab_size=vocab, attention="sdpa"))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
        curves[name], t0 = [], time.time()
        for step in range(1, args.steps + 1):
            x, y, _ = batch(rng, shared)
            loss, n = model(x, torch.arange(x.shape[1]), y)
            (loss / n).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            if step % 100 == 0:
                curves[name].append((loss / n).item())
        print(f"{name}: vocabulary {vocab}, {time.time() - t0:.0f} s", flush=True)
    steps = list(range(100, args.steps + 1, 100))
    print("\n| variant | " + " | ".join(f"step {s}" for s in steps) + " |")
    print("|---|" + "---|" * len(steps))
    for name, losses in curves.items():
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in losses) + " |")


if __name__ == "__main__":
    main()
