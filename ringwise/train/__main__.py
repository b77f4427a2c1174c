"""The training command line: `python -m ringwise.train [flags]` (also `ringwise train`) and
`python -m ringwise.train export RUN_DIR OUT.pt` (also `ringwise export`).

The launching process checks every flag, takes --out's lock and only then starts the
ranks; after the job it draws the plots from the run's files. As an entry point this
module sits above ringwise.lab and may import it (lazily, for plots); the rest of
ringwise.train never does.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from . import checkpoint
from .config import ConfigError, TrainConfig, add_arguments, add_finetune_arguments, check  # noqa: F401 (the CLI's)
from .loop import worker
from .parallel import elastic_run, failure_causes, under_torchrun


def launch(cfg: TrainConfig) -> None:
    """Check everything, then run the job: under torchrun directly, else on --world local ranks."""
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


class JobFailed(RuntimeError):
    pass


def draw_plots(out: Path) -> None:
    """Loss curve and retrieval heatmap from metrics.jsonl and summary.json (through lab)."""
    from ..lab.plots import plot_loss_curve, plot_retrieval_heatmap

    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    plot_loss_curve([r["step"] for r in recs], [r["loss"] for r in recs], out / "loss.png",
                    title="Training loss (global mean per labelled token)")
    summary = json.loads((out / "summary.json").read_text())
    if "perplexity" in summary:  # finetune: held-out perplexity by position inside the document
        from ..lab.plots import plot_lines

        runs = {name: r for name, r in summary["perplexity"].items() if r}
        xs = {f"{name} training": [s for s, p in zip(r["starts"], r["ppl"]) if p] for name, r in runs.items()}
        ys = {f"{name} training": [p for p in r["ppl"] if p] for name, r in runs.items()}
        plot_lines(xs, ys, out / "ppl_by_position.png", xlabel="position inside the document (bucket start, tokens)",
                   ylabel="held-out perplexity", title="Perplexity by position, before and after fine-tuning")
    if "passkey" in summary:
        from ..lab.plots import plot_retrieval_heatmap

        r = summary["passkey"]
        plot_retrieval_heatmap(r["accuracy"], r["lengths"], r["depths"], out / "retrieval.png",
                               title="Passkey retrieval after fine-tuning")
    if "retrieval" in summary:
        r = summary["retrieval"]
        plot_retrieval_heatmap(r["accuracy"], r["lengths"], r["depths"], out / "retrieval.png",
                               title="Line retrieval accuracy")


def run(args, command: str = "train") -> int:
    """`ringwise train`: 0 on success, 2 (with every problem listed, no traceback) on bad flags
    or a folder in use."""
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
        draw_plots(out)
    return 0


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a training --out folder")
    p.add_argument("out_file", help="where to write the consolidated checkpoint (.pt), or the folder (--hf)")
    p.add_argument("--hf", action="store_true", help="a ringwise finetune run as a transformers folder "
                   "(safetensors, its config with the new RoPE, the tokenizer)")


def export(args) -> int:
    """`ringwise export RUN_DIR OUT.pt`: the newest intact checkpoint as one file ({step, config, model});
    with --hf, a finetune run's as a folder AutoModelForCausalLM.from_pretrained reads."""
    try:
        if getattr(args, "hf", False):
            from .pretrained import export_hf

            path = export_hf(args.run_dir, args.out_file)
        else:
            path = checkpoint.export(args.run_dir, args.out_file)
    except (FileNotFoundError, ValueError) as e:
        print(f"ringwise export: {e}", file=sys.stderr)
        return 2
    print(f"exported {path} to {args.out_file}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["export"]:
        p = argparse.ArgumentParser(prog="ringwise.train export", description=export.__doc__)
        add_export_arguments(p)
        return export(p.parse_args(argv[1:]))
    p = argparse.ArgumentParser(prog="ringwise.train", description=__doc__.split("\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
