"""`ringwise train`: sequence-parallel training of the Blockwise Transformer (the main job).

Also `python -m ringwise.train [flags]` (the module torchrun runs). The launching process
checks every flag, takes --out's lock and only then starts the ranks (ringwise.train.job);
after the job the main process draws the plots from the run's files (ringwise.train.plots).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


def add_arguments(parser) -> None:
    from ..train.config import add_arguments as train_flags

    train_flags(parser)


def run(args, command: str) -> int:
    """`ringwise train` / `ringwise finetune`: 0 on success, 2 (with every problem listed, no
    traceback) on bad flags or a folder in use, 1 when a rank failed."""
    from ..train import checkpoint
    from ..train.config import ConfigError, TrainConfig
    from ..train.job import JobFailed, launch
    from ..train.launcher import under_torchrun

    cfg = TrainConfig.from_args(args)
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
    if main_process and not cfg.no_plots and (out / "summary.json").exists():
        from ..train.plots import draw_run

        draw_run(out)
    return 0


def main(args) -> int:
    return run(args, "train")
