"""`ringwise` command line: train, finetune, export, generate, plan, demo, bench.

One registry, COMMANDS: command -> (help line, its module in ringwise.commands). A command
module has `add_arguments(parser)` and `main(args) -> int`; only the chosen command's module is
imported (the others are listed with their help, no flags), so `ringwise plan` and `ringwise
--help` run without torch, and `ringwise bench X` imports suite X alone.

One vocabulary (docs/cli.md): the same flag for the same thing in every command, every flag's
default in its --help. Every problem of a command line is reported at once: the parser
(FlagParser) records a bad value, a missing required flag or an unknown flag instead of
stopping at the first, puts the flag's default in place of a bad value, and hands the list to
the command as `args._flag_problems` (with `args._argv`, the command line as typed, and
`args._flags`, the names of the command's flags); the command's main() lists them together with its own
checks (ringwise.commands.refused) before any work, exit status 2.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import shlex
import sys

from . import __version__

# command -> (its help line, the module that adds its flags and runs it)
COMMANDS = {
    "demo": ("ring attention on a long sequence across local processes, measured", "ringwise.commands.demo"),
    "train": ("sequence-parallel training of the Blockwise Transformer (the main job)", "ringwise.commands.train"),
    "finetune": (
        "context extension of a pretrained transformers model on your text (the train job's machinery)",
        "ringwise.commands.finetune",
    ),
    "export": (
        "a training run's newest checkpoint as one .pt file (or, --hf, a transformers folder)",
        "ringwise.commands.export",
    ),
    "generate": ("generation from a trained model across local ranks (sharded KV cache)", "ringwise.commands.generate"),
    "plan": ("the paper's memory/overlap model for a cluster you plan", "ringwise.commands.plan"),
    "bench": ("benchmarks measured side by side (results to --out)", "ringwise.commands.bench"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's help ends with its default: "(default: 600)", a list's values space-separated, as
    typed. Left out where there is none to show (None, a switch's False) or the help says it already."""

    @staticmethod
    def _default(action) -> str | None:
        default = action.default
        if (
            default is None
            or default is False
            or default is argparse.SUPPRESS
            or not action.option_strings
            or "default" in (action.help or "").lower()
        ):
            return None
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"(default: {shown.replace('%', '%%')})"

    def _get_help_string(self, action):
        default = self._default(action)
        return action.help if default is None else f"{action.help or ''} {default}".lstrip()

    def _format_action(self, action):
        default = self._default(action)
        if not (action.help or "").strip() and default is not None:  # a flag without help: its default
            action = copy.copy(action)
            action.help = default
        return super()._format_action(action)


class FlagProblems(Exception):
    """The command line cannot be parsed further (a flag without its value, a missing positional):
    what was found until then, every problem in `problems`."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


_INVALID = object()  # a value that failed its type or choices: replaced by the flag's default after parsing


def flag_name(action) -> str:
    """--seq-len for a flag, RUN_DIR for a positional."""
    return action.option_strings[0] if action.option_strings else (action.metavar or action.dest.upper())


class FlagParser(argparse.ArgumentParser):
    """An ArgumentParser that records every bad value, missing required flag and unknown flag in
    `problems` (shared by the subcommands' parsers) instead of exiting at the first one; a bad value
    is replaced by the flag's default, so the command's own checks still run on the rest."""

    def __init__(self, *args, problems: list[str] | None = None, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.problems = [] if problems is None else problems
        self._invalid: dict[str, argparse.Action] = {}

    def parse_known_args(self, args=None, namespace=None):
        required = [a for a in self._actions if a.required and a.option_strings]
        for a in required:  # checked below, with the rest, instead of by argparse's error()
            a.required = False
        self._required = required  # (--help, printed while parsing, shows them as required)
        try:
            ns, extras = super().parse_known_args(args, namespace)
        finally:
            for a in required:
                a.required = True
            self._required = []
        for a in required:
            if getattr(ns, a.dest, None) is None:
                self.problems.append(f"{flag_name(a)} {a.metavar or a.dest.upper()}: required")
        for dest, action in self._invalid.items():
            setattr(ns, dest, action.default)
        return ns, extras

    def format_help(self):
        return self._with_required(super().format_help)

    def format_usage(self):
        return self._with_required(super().format_usage)

    def _with_required(self, format):
        for a in getattr(self, "_required", ()):
            a.required = True
        try:
            return format()
        finally:
            for a in getattr(self, "_required", ()):
                a.required = False

    def _get_value(self, action, arg_string):
        try:
            return super()._get_value(action, arg_string)
        except argparse.ArgumentError as e:
            kind = {int: "an integer", float: "a number"}.get(action.type)
            self._bad(action, f"{flag_name(action)} {arg_string}: " + (f"must be {kind}" if kind else e.message))
            return _INVALID

    def _check_value(self, action, value):
        if value is _INVALID:
            return
        if isinstance(action, argparse._SubParsersAction) or action.choices is None or value in action.choices:
            return super()._check_value(action, value)
        self._bad(action, f"{flag_name(action)} {value}: must be one of {', '.join(map(str, action.choices))}")

    def _bad(self, action, message: str) -> None:
        self.problems.append(message)
        self._invalid[action.dest] = action

    def error(self, message):
        raise FlagProblems(self.problems + [message])


def command_module(command: str):
    """The module of `command` (ringwise.commands.<command>), imported now."""
    return importlib.import_module(COMMANDS[command][1])


def build_parser(commands=tuple(COMMANDS)) -> FlagParser:
    """The `ringwise` parser with the flags of `commands` (default all); the other commands
    are listed with their help but take no flags, so their modules are not imported."""
    p = FlagParser(prog="ringwise", description="Exact ring attention for near-infinite context")
    p.add_argument("--version", action="version", version=f"ringwise {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for name, (help_line, _) in COMMANDS.items():
        command = sub.add_parser(name, help=help_line, description=help_line, problems=p.problems)
        if name in commands:
            command_module(name).add_arguments(command)
    return p


def chosen_command(argv) -> str | None:
    """The command argv names: its first word (the top level has no options but --help, --version)."""
    return argv[0] if argv and argv[0] in COMMANDS else None


def parse(argv) -> argparse.Namespace:
    """argv parsed, every problem found in `_flag_problems` (raises FlagProblems where parsing stopped)."""
    command = chosen_command(argv)
    parser = build_parser(() if command is None else (command,))
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.problems.append(f"unrecognized {' '.join(unknown)} (ringwise {args.command} --help lists the flags)")
    args._flag_problems = list(parser.problems)
    args._argv = shlex.join(["ringwise", *argv])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
    args._flags = [a.dest for a in sub._actions if a.option_strings and a.dest != "help"]  # the command's own
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse(argv)
    except FlagProblems as e:
        from .commands import refused

        command = chosen_command(argv)
        if command is None:  # no command, or an unknown one: argparse's own message and usage
            build_parser(()).print_usage(sys.stderr)
        return refused(command or "", e.problems)
    return command_module(args.command).main(args)


if __name__ == "__main__":
    sys.exit(main())
