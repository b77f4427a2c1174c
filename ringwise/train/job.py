"""A training job from the launching process: `launch(cfg)` checks every flag, takes --out's
lock and only then starts the ranks (`loop.worker` on each); under torchrun it runs this rank.

`ringwise train` / `ringwise finetune` (ringwise.commands.train) call it, then draw the plots
from the run's files (ringwise.train.plots).
"""

from __future__ import annotations

import tempfile

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from . import checkpoint
from .config import TrainConfig, check
from .launcher import elastic_run, failure_causes, under_torchrun
from .loop import worker


class JobFailed(RuntimeError):
    """A rank failed; the message holds each rank's cause, a line each."""


def launch(cfg: TrainConfig) -> None:
    """Check everything, then run the job: under torchrun directly, else on --world local ranks.
    Raises ConfigError (bad flags), checkpoint.LockHeld (--out in use) or JobFailed."""
    check(cfg, checkpoint.resume_problems(cfg))
    if under_torchrun():  # no launching process of ours: rank 0 takes the lock (loop.job_lock)
        elastic_run(worker, cfg.world, cfg)
        return
    with checkpoint.RunLock(cfg.out), tempfile.TemporaryDirectory(prefix="ringwise-logs-") as logs:
        # checked again under the lock: a job that held the folder until now may have left checkpoints
        check(cfg, checkpoint.resume_problems(cfg))
        try:
            elastic_run(worker, cfg.world, cfg, True, log_dir=logs)
        except ChildFailedError as e:  # the ranks printed their tracebacks: end with the causes, a line each
            raise JobFailed("the job failed:\n  " + "\n  ".join(failure_causes(e, logs))) from None
