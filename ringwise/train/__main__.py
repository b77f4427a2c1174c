"""`python -m ringwise.train [flags]` is `ringwise train [flags]`, and `python -m ringwise.train
export RUN_DIR OUT.pt` is `ringwise export` (torchrun runs this module: `torchrun ... -m
ringwise.train`).

An entry point, like ringwise.cli, above every layer (tests/test_imports.py): it hands the argv
to the CLI. The rest of ringwise.train imports nothing above it.
"""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    from ..cli import main as ringwise

    argv = sys.argv[1:] if argv is None else list(argv)
    return ringwise(argv if argv[:1] == ["export"] else ["train", *argv])


if __name__ == "__main__":
    sys.exit(main())
