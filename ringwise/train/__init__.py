"""`ringwise train`: sequence-parallel training of the Blockwise Transformer.

config.py (TrainConfig, flags, validation) <- launcher.py (the local launcher, torchrun's
environment), mesh.py (devices, groups, the mesh, FSDP2), watchdog.py (heartbeats, failed peers named,
/proc) <- checkpoint.py (DCP checkpoints, export, run lock) <- loop.py (setup / step / evaluate /
save) <- job.py (launch: check, lock, start the ranks); plots.py (the run's PNGs, drawn after
the job). The command is ringwise.commands.train; __main__.py is its `python -m ringwise.train`
entry point. Locally `ringwise train --world 4` starts the ranks through PyTorch's elastic
launcher (the code torchrun runs); on a cluster the same module runs under `torchrun --nnodes N
--nproc-per-node 8 -m ringwise.train ...`.
"""
from .config import ConfigError, TrainConfig, add_arguments, check, problems
from .loop import compute_gradients, evaluate, lr_at, make_dataset, run_on_mesh, save, setup, step, worker
from .launcher import elastic_run, free_port
from .mesh import Mesh, make_mesh, shard_model

__all__ = ["TrainConfig", "ConfigError", "add_arguments", "check", "problems", "Mesh", "make_mesh", "shard_model",
           "elastic_run", "free_port", "setup", "step", "evaluate", "save", "compute_gradients", "lr_at",
           "make_dataset", "run_on_mesh", "worker"]

