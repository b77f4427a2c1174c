"""`ringwise bench SUITE [--quick]`: the benchmark suites of ringwise.bench, results to --out.

The flags of every suite come from the torch-free ringwise.bench.flags, so `ringwise bench X
--help` imports no suite, and `ringwise bench X` imports suite X alone (`all`: each in turn).
"""

from __future__ import annotations

import argparse

from . import flag_problems, refused


def add_arguments(parser) -> None:
    from ..bench.flags import add_bench_arguments

    add_bench_arguments(parser)


def main(args) -> int:
    found = flag_problems(args)
    if found:
        return refused("bench", found)
    from .. import bench

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = vars(parser.parse_args([args.suite]))
    for name in bench.SUITES if args.suite == "all" else (args.suite,):
        mod = bench.suite(name)
        if args.quick:  # small sizes, except where the user chose a value
            for key, value in getattr(mod, "QUICK", {}).items():
                if getattr(args, key) == defaults[key]:
                    setattr(args, key, value)
        mod.run(args)
    return 0
