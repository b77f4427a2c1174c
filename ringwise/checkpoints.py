"""Checkpoints that lose nothing.

A checkpoint is written to a hidden temporary file in the same folder, flushed to disk,
then renamed into place: a reader sees a whole checkpoint or none. A process killed
mid-write leaves only a hidden `.tmp` file that `load_latest` never picks up. Contents
are independent of the world size and layout (parameters are replicated), so a run can
resume on a different number of ranks.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

_NAME = re.compile(r"^ckpt-(\d{8})\.pt$")
_RUN_KEYS = ("seed", "batch", "seq_len", "data", "fmt", "id_digits", "value_digits", "questions", "id_chars",
             "id_pool", "loss_on", "lr", "steps", "warmup", "model")


def run_args(args) -> dict:
    """The training arguments a resume must agree with (data order, schedule, model)."""
    return {k: getattr(args, k) for k in _RUN_KEYS}


def save(folder: Path, state: dict, keep: int = 2) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"ckpt-{state['step']:08d}.pt"
    tmp = folder / f".{final.name}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)
    for old in complete_checkpoints(folder)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return final


def complete_checkpoints(folder: Path) -> list[Path]:
    """Whole checkpoints in `folder`, oldest first (temporaries are never listed)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name))


def load_latest(folder: Path, map_location=None) -> dict | None:
    found = complete_checkpoints(folder)
    if not found:
        return None
    state = torch.load(found[-1], map_location=map_location, weights_only=False)
    state["path"] = str(found[-1])
    return state


def check_compatible(state: dict, cfg, args) -> None:
    """Refuse to resume into a different model or data stream, naming what differs."""
    saved_cfg, saved_args = state.get("config", {}), state.get("args", {})
    diffs = [f"model.{k}: checkpoint {v!r}, now {getattr(cfg, k)!r}" for k, v in saved_cfg.items()
             if k != "checkpoint_layers" and getattr(cfg, k, None) != v]
    now = run_args(args)
    diffs += [f"--{k.replace('_', '-')}: checkpoint {v!r}, now {now.get(k)!r}" for k, v in saved_args.items()
              if k in now and now[k] != v]
    if diffs:
        raise ValueError("cannot resume: the checkpoint was made by a different run (" + "; ".join(diffs) +
                         "); use the same settings or a new --out folder")
