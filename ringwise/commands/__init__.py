"""The `ringwise` commands, one module each: `add_arguments(parser)` adds the command's flags,
`main(args) -> int` runs it and returns the exit status (0 done, 2 refused before any work, 1
failed). ringwise.cli holds the one registry (command -> module) and imports only the module of
the command it runs, so a module here imports torch inside its functions where its flags must
stay light (`plan`, `generate --help`, `bench X --help` run without torch).

train, finetune, export: the training job (ringwise.train); generate: ringwise.generate across
local ranks; plan: the torch-free planner (ringwise.plan); demo: the attention op measured on
local processes; bench: the suites of ringwise.bench.

A command's main() reports the parser's findings (`flag_problems(args)`: bad values, missing and
unknown flags, see ringwise.cli) together with its own checks, all at once (`refused`), before any
work.
"""

from __future__ import annotations

import sys


def flag_problems(args) -> list[str]:
    """What the parser found wrong with the command line (ringwise.cli.FlagParser)."""
    return list(getattr(args, "_flag_problems", ()))


def refused(command: str, problems: list[str]) -> int:
    """Every problem of a command line on stderr, one a line; the exit status 2."""
    n = len(problems)
    print(
        f"ringwise{' ' + command if command else ''}: {n} problem{'s' * (n != 1)} with the flags:\n  "
        + "\n  ".join(problems),
        file=sys.stderr,
    )
    return 2
