"""`ringwise` command line: train, finetune, export, generate, plan, demo, bench.

One registry, COMMANDS: command -> (help line, its module in ringwise.commands). A command
module has `add_arguments(parser)` and `main(args) -> int`; only the chosen command's module is
imported (the others are listed with their help, no flags), so `ringwise plan` and `ringwise
--help` run without torch, and `ringwise bench X` imports suite X alone.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# command -> (its help line, the module that adds its flags and runs it)
COMMANDS = {
    "demo": ("ring attention on a long sequence across local processes, measured", "ringwise.commands.demo"),
    "train": ("sequence-parallel training of the Blockwise Transformer (the main job)", "ringwise.commands.train"),
    "finetune": ("context extension of a pretrained transformers model on your text (the train job's machinery)",
                 "ringwise.commands.finetune"),
    "export": ("a training run's newest checkpoint as one .pt file (or, --hf, a transformers folder)",
               "ringwise.commands.export"),
    "generate": ("generation from a trained model across local ranks (sharded KV cache)", "ringwise.commands.generate"),
    "plan": ("the paper's memory/overlap model for a cluster you plan", "ringwise.commands.plan"),
    "bench": ("benchmarks measured side by side (results to --out)", "ringwise.commands.bench"),
}


def command_module(command: str):
    """The module of `command` (ringwise.commands.<command>), imported now."""
    return importlib.import_module(COMMANDS[command][1])


def build_parser(commands=tuple(COMMANDS)) -> argparse.ArgumentParser:
    """The `ringwise` parser with the flags of `commands` (default all); the other commands
    are listed with their help but take no flags, so their modules are not imported."""
    p = argparse.ArgumentParser(prog="ringwise", description="Exact ring attention for near-infinite context")
    sub = p.add_subparsers(dest="command", required=True)
    for name, (help_line, _) in COMMANDS.items():
        command = sub.add_parser(name, help=help_line)
        if name in commands:
            command_module(name).add_arguments(command)
    return p


def chosen_command(argv) -> str | None:
    """The command argv names: its first word (the top level has no options but --help)."""
    return argv[0] if argv and argv[0] in COMMANDS else None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = chosen_command(argv)
    args = build_parser(() if command is None else (command,)).parse_args(argv)
    return command_module(args.command).main(args)


if __name__ == "__main__":
    sys.exit(main())
