"""`ringwise` command line: train, export, generate, demo, plan, bench.

Only the chosen command's flags are built, from its own module, imported then: `ringwise
plan` and `ringwise --help` run without torch, and `ringwise bench X` imports suite X alone
(every suite's flags come from the torch-free `ringwise.lab.bench.flags`).
"""
from __future__ import annotations

import argparse
import importlib
import sys


# command -> (its help line, "module:function" that adds its flags to a parser)
COMMANDS = {
    "demo": ("ring attention on a long sequence across local processes, measured", "ringwise.lab.demo:add_arguments"),
    "train": ("sequence-parallel training of the Blockwise Transformer (the main job)",
              "ringwise.train.__main__:add_arguments"),
    "finetune": ("context extension of a pretrained transformers model on your text (the train job's machinery)",
                 "ringwise.train.__main__:add_finetune_arguments"),
    "export": ("a training run's newest checkpoint as one .pt file (or, --hf, a transformers folder)",
               "ringwise.train.__main__:add_export_arguments"),
    "generate": ("generation from a trained model across local ranks (sharded KV cache)",
                 "ringwise.lab.generation:add_arguments"),
    "plan": ("the paper's memory/overlap model for a cluster you plan", "ringwise.lab.plan:add_plan_arguments"),
    "bench": ("benchmarks measured side by side (results to --out)", "ringwise.lab.bench.flags:add_bench_arguments"),
}


def _flag_adder(command: str):
    module, function = COMMANDS[command][1].split(":")
    return getattr(importlib.import_module(module), function)


def build_parser(commands=tuple(COMMANDS)) -> argparse.ArgumentParser:
    """The `ringwise` parser with the flags of `commands` (default all); the other commands
    are listed with their help but take no flags, so their modules are not imported."""
    p = argparse.ArgumentParser(prog="ringwise", description="Exact ring attention for near-infinite context")
    sub = p.add_subparsers(dest="command", required=True)
    for name, (help_line, _) in COMMANDS.items():
        command = sub.add_parser(name, help=help_line)
        if name in commands:
            _flag_adder(name)(command)
    return p


def chosen_command(argv) -> str | None:
    """The command argv names: its first word (the top level has no options but --help)."""
    return argv[0] if argv and argv[0] in COMMANDS else None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = chosen_command(argv)
    parser = build_parser(() if command is None else (command,))
    args = parser.parse_args(argv)
    if args.command in ("train", "finetune", "export"):
        from .train import __main__ as train

        return train.export(args) if args.command == "export" else train.run(args, args.command)
    elif args.command == "generate":
        from .lab import generation

        return generation.run(args)
    elif args.command == "demo":
        from .lab import demo

        demo.run(args)
    elif args.command == "plan":
        from .lab.plan import run_plan

        try:
            return run_plan(args)
        except ValueError as e:
            print(f"ringwise plan: {e}", file=sys.stderr)
            return 2
    elif args.command == "bench":
        from .lab.bench import SUITES, suite

        defaults = vars(parser.parse_args(["bench", args.suite]))
        for name in SUITES if args.suite == "all" else (args.suite,):
            mod = suite(name)
            if args.quick:  # small sizes, except where the user chose a value
                for key, value in getattr(mod, "QUICK", {}).items():
                    if getattr(args, key) == defaults[key]:
                        setattr(args, key, value)
            mod.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
