"""Does a trained retrieval model match the question's id, or just find the line seen once?

With recurring ids (`--id-pool`) the needle is the only line that occurs once unless decoys
(other ids seen once) are added. This asks a `ringwise train` checkpoint the needle with 0 to
7 decoys, in one process (plain SDPA attention, same weights), on the evaluation seed.
Usage (after `make demo`):
    python benchmarks/needle_decoys.py runs/demo [--lengths 64 128] [--per-cell 64]
"""

import argparse
import dataclasses

import torch

from ringwise.data import collate, retrieval_eval_grid
from ringwise.model import ModelConfig, Transformer
from ringwise.train import checkpoint


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a ringwise train --out folder (uses its newest checkpoint)")
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 128])
    p.add_argument("--per-cell", type=int, default=64)
    p.add_argument("--decoys", type=int, nargs="+", default=[0, 1, 3, 7])
    args = p.parse_args()
    path, skipped = checkpoint.newest_intact(f"{args.run}/checkpoints")
    if path is None:
        raise SystemExit(f"no intact checkpoint in {args.run}/checkpoints {skipped}")
    state = checkpoint.consolidated(path)  # the sharded checkpoint gathered into this process
    run = state["run"]
    if not run.get("id_pool"):
        raise SystemExit("this run did not use --id-pool: every line's id is distinct, decoys do not apply")
    cfg = dataclasses.replace(ModelConfig(**state["config"]), attention="sdpa")
    model = Transformer(cfg)
    model.load_state_dict(state["model"])
    model.eval()
    task = {k: run[k] for k in ("fmt", "id_digits", "value_digits", "id_chars", "id_pool")}
    print("| decoys | " + " | ".join(f"{L} tokens" for L in args.lengths) + " |")
    print("|---|" + "---|" * len(args.lengths))
    for decoys in args.decoys:
        grid = retrieval_eval_grid(args.lengths, [0.0, 0.25, 0.5, 0.75, 1.0], args.per_cell, decoys=decoys, **task)
        acc = []
        for L in args.lengths:
            hits = total = 0
            for (length, _), examples in grid.items():
                if length != L:
                    continue
                batch = collate(examples)
                with torch.no_grad():
                    pred, mask = model.predict(batch["input_ids"], torch.arange(L), batch["labels"])
                right = torch.zeros_like(mask)
                right[mask] = pred == batch["labels"][mask]
                hits += int((right.sum(1) == mask.sum(1)).sum())
                total += len(examples)
            acc.append(hits / total)
        print(f"| {decoys} | " + " | ".join(f"{a:.1%}" for a in acc) + " |")


if __name__ == "__main__":
    main()
