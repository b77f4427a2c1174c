"""Benchmarks that measure the project's claims side by side in one run.

Each sub-benchmark is a module with `add_arguments(parser)` and `run(args) -> dict`;
results go to JSON and markdown (and a PNG where a picture helps) in --out. The flags
of all of them are in `flags.py`, the measurements several share in `common.py`. This
package module imports no suite and not torch, so `ringwise bench X --help` stays light.

The suites live in the package, so that `ringwise bench X` runs from an installed ringwise;
their published results (`make bench`) are in the repository's benchmarks/results/, beside
the loose benchmark scripts (benchmarks/*.py), and BENCHMARKS.md reads them. The suites run on
the process harness of ringwise.testing and draw with ringwise.train.plots.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

SUITES = ("attention", "compute", "overlap", "scaling", "memory", "context", "ulysses", "decode", "masks", "hybrid")
OPTIONAL = ("peers",)  # not in `bench all`: it needs the peers extra
# suite name (the CLI's, the results' file names) -> module, where the two differ:
# `memory_plan` so that the package holds one memory.py (ringwise.testing.memory, the probes)
_MODULES = {"memory": "memory_plan"}


def suite(name: str):
    """The module of benchmark suite `name` (`ringwise bench <name>`)."""
    import importlib

    return importlib.import_module(f"{__name__}.{_MODULES.get(name, name)}")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    import os

    import torch

    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def draw(kind: str, *args, **kwargs) -> Path | None:
    """``ringwise.train.plots.plot_<kind>(...)``; without matplotlib, say so and go on.

    The PNG is optional (the ``plot`` extra), the JSON and markdown results are not, so a
    missing matplotlib costs the picture only, and the user is told how to get it.
    """
    from ringwise.train import plots

    try:
        return getattr(plots, f"plot_{kind}")(*args, **kwargs)
    except ImportError as e:
        print(f"plot skipped: {e}")
        return None


def public_args(args) -> dict:
    """The command line a result was measured with, for its JSON (private `_` keys left out)."""
    return {k: v for k, v in vars(args).items() if not k.startswith("_")}


def write_results(out_dir: str | Path, name: str, data: dict, markdown: str) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = dict(data, machine=machine_info())
    (out / f"{name}.json").write_text(json.dumps(data, indent=2))
    (out / f"{name}.md").write_text(markdown)
    return out
