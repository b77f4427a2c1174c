"""`ringwise train`: sequence-parallel training of the Blockwise Transformer.

config.py (TrainConfig, flags, validation) <- launcher.py (the local launcher, torchrun's
environment), mesh.py (devices, groups, the mesh, FSDP2), watchdog.py (heartbeats, failed peers named,
/proc) <- checkpoint.py (DCP checkpoints, export, run lock) <- tasks.py (what a run trains and how
it is judged: RetrievalTask, TextTask, FinetuneTask, with pretrained.py, passkey.py, perplexity.py)
<- loop.py (setup / step / save / train) <- job.py (launch: check, lock, start the ranks);
plots.py (the run's PNGs, drawn after the job). The command is ringwise.commands.train; __main__.py
is its `python -m ringwise.train` entry point. Locally `ringwise train --world 4` starts the ranks
through PyTorch's elastic launcher (the code torchrun runs); on a cluster the same module runs
under `torchrun --nnodes N --nproc-per-node 8 -m ringwise.train ...`.
"""

from .config import ConfigError, TrainConfig, add_arguments, check, problems
from .launcher import elastic_run, free_port
from .loop import compute_gradients, lr_at, run_on_mesh, save, setup, step, worker
from .mesh import Mesh, make_mesh, shard_model
from .tasks import FinetuneTask, RetrievalTask, Task, TextTask, task_for

__all__ = [
    "TrainConfig",
    "ConfigError",
    "add_arguments",
    "check",
    "problems",
    "Mesh",
    "make_mesh",
    "shard_model",
    "elastic_run",
    "free_port",
    "setup",
    "step",
    "save",
    "compute_gradients",
    "lr_at",
    "run_on_mesh",
    "worker",
    "Task",
    "RetrievalTask",
    "TextTask",
    "FinetuneTask",
    "task_for",
]
