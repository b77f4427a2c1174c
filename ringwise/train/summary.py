"""What a run's summary.json says besides the job's results: what was asked and what ran, and how fast.

The job's rank 0 writes the results (loop.py: final loss, the evaluations); after the job the
launching process (`ringwise train` / `ringwise finetune`, as it draws the plots) adds, from the
run's own files and its flags:

- `command`: the command line as typed;
- `config`: every flag of the command as resolved, keyed by the flag's name with `_` for `-`
  (`--device auto` as the device the ranks ran on, an unset `--backend`, `--dtype`, `--threads`,
  `--eval-lengths` as what they became, `--world` as the job's world size also under torchrun,
  finetune's `--model` as the checkpoint folder), and `mesh` (dp x cp x ulysses);
- `wall_time_s`: this command's time, from the flags' check to the summary (start-up, evaluation
  and checkpoints included; a resumed run counts this invocation only);
- `train_time_s`, `tokens_per_s`, `peak_memory_mib`: the optimizer steps' time (metrics.jsonl,
  every step of the run), the tokens they trained (steps x batch x seq_len) per second of it, and
  the highest per-rank peak memory of any step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# the flags a summary leaves out: where it is written, and switches of this invocation only
_NOT_CONFIG = {"out", "resume", "stop_after", "no_plots"}


def resolved_config(cfg, flags) -> dict:
    """{flag: value as run} for `flags` (the command's flag names, dest form) of TrainConfig `cfg`."""
    from .mesh import placement

    world = cfg.world_size
    kind, backend = placement(cfg.device, cfg.backend, cfg.local_ranks)
    cp = world // (cfg.dp * cfg.ulysses)
    resolved = dict(
        world=world,
        device=kind,
        backend=backend,
        dtype=cfg.dtype or ("bf16" if kind == "cuda" else "fp32"),
        threads=cfg.threads or (max(1, (os.cpu_count() or 1) // world) if kind == "cpu" else None),
        eval_lengths=cfg.eval_lengths_for(cp),
    )
    if cfg.seq_schedule:  # --seq-len as given: the schedule (seq_len alone is its longest stage)
        from .config import schedule_text

        resolved["seq_len"] = schedule_text(cfg.seq_schedule)
    config = {k: resolved.get(k, getattr(cfg, k)) for k in flags if hasattr(cfg, k) and k not in _NOT_CONFIG}
    if "pretrained" in config:  # finetune's --model
        config["model"] = config.pop("pretrained")
    config["mesh"] = dict(dp=cfg.dp, cp=cp, ulysses=cfg.ulysses)
    return config


def throughput(cfg, metrics: Path) -> dict:
    """train_time_s, tokens_per_s and peak_memory_mib from the run's metrics.jsonl (empty: {})."""
    try:
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    except OSError:
        return {}
    if not records:
        return {}
    seconds = sum(r["seconds"] for r in records)
    peaks = [r.get("peak_gpu_mib", r.get("peak_rss_mib")) for r in records]
    peaks = [p for p in peaks if p is not None]
    return dict(
        train_time_s=round(seconds, 3),
        steps_timed=len(records),
        tokens_per_s=round(sum(cfg.batch * r.get("seq_len", cfg.seq_len) for r in records) / seconds, 1)
        if seconds > 0
        else None,
        peak_memory_mib=max(peaks) if peaks else None,
    )


def complete_summary(out, cfg, flags, command: str, wall_time_s: float) -> dict:
    """Add the command, the resolved configuration, the wall time and the throughput to out/summary.json
    (written whole, then renamed); the new summary."""
    path = Path(out) / "summary.json"
    results = json.loads(path.read_text())
    for key in ("command", "config", "wall_time_s", "train_time_s", "steps_timed", "tokens_per_s", "peak_memory_mib"):
        results.pop(key, None)  # a finished run evaluated again: this invocation's
    config = resolved_config(cfg, flags)
    sequences = ((results.get("perplexity") or {}).get("after") or {}).get("sequences")
    if "eval_sequences" in config and sequences is not None:
        config["eval_sequences"] = sequences
    summary = dict(
        command=command,
        config=config,
        **results,
        wall_time_s=round(wall_time_s, 3),
        **throughput(cfg, Path(out) / "metrics.jsonl"),
    )
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(path)
    return summary
