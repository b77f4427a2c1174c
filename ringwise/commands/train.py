"""`ringwise train`: sequence-parallel training of the Blockwise Transformer (the main job).

Also `python -m ringwise.train [flags]` (the module torchrun runs). The launching process
checks every flag, takes --out's lock and only then starts the ranks (ringwise.train.job);
after the job the main process completes summary.json (ringwise.train.summary) and draws the plots
from the run's files (ringwise.train.plots).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from . import flag_problems, refused


def add_arguments(parser) -> None:
    from ..train.config import add_arguments as train_flags

    train_flags(parser)


def run(args, command: str) -> int:
    """`ringwise train` / `ringwise finetune`: 0 on success, 2 (with every problem listed, no
    traceback) on bad flags or a folder in use, 1 when a rank failed. After the job the main process
    completes summary.json (the command, the resolved flags, times and throughput: ringwise.train.summary)
    and draws the plots."""
    from ..train import checkpoint
    from ..train.config import ConfigError, TrainConfig, problems
    from ..train.job import JobFailed, launch
    from ..train.launcher import under_torchrun

    started = time.perf_counter()
    if under_torchrun():  # this process is a rank: honest peak memory from before the data is read
        from ..train.watchdog import return_large_frees

        return_large_frees()
    cfg = TrainConfig.from_args(args)
    flagged = flag_problems(args)
    if flagged:  # the parser's findings and every check of the configuration, at once
        return refused(command, flagged + problems(cfg))
    try:
        launch(cfg)
    except (ConfigError, checkpoint.LockHeld) as e:
        print(f"ringwise {command}: {e}", file=sys.stderr)
        return 2
    except JobFailed as e:
        print(f"ringwise {command}: {e}", file=sys.stderr)
        return 1
    out = Path(cfg.out)
    main_process = not under_torchrun() or os.environ["RANK"] == "0"
    if main_process and (out / "summary.json").exists():
        from ..train.summary import complete_summary

        flags = getattr(args, "_flags", [k for k in vars(args) if not k.startswith("_") and k != "command"])
        complete_summary(out, cfg, flags, getattr(args, "_argv", f"ringwise {command}"), time.perf_counter() - started)
        if not cfg.no_plots:
            from ..train.plots import draw_run

            draw_run(out)
    return 0


def main(args) -> int:
    return run(args, "train")
