"""Start the training job's ranks: torchrun's elastic launcher locally, or nothing under torchrun."""
from __future__ import annotations

import os
import socket


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def elastic_run(entrypoint, nproc: int, *args) -> None:
    """Run entrypoint(*args) on nproc local ranks through PyTorch's elastic launcher (torchrun's code).

    Under torchrun (RANK and WORLD_SIZE set) it calls entrypoint directly: the same script
    runs locally and on a cluster.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        entrypoint(*args)
        return
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"ringwise-{os.getpid()}",
        rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}", max_restarts=0,
        monitor_interval=0.2, start_method="spawn",
    )
    elastic_launch(config, entrypoint)(*args)
