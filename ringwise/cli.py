"""`ringwise` command line: train, export, demo, plan, bench."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from .lab import demo
    from .lab.bench import OPTIONAL, SUITES, suite

    p = argparse.ArgumentParser(prog="ringwise", description="Exact ring attention for near-infinite context")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="ring attention on a long sequence across local processes, measured")
    demo.add_arguments(d)

    from .train import __main__ as train

    train.add_arguments(sub.add_parser("train", help="sequence-parallel training of the Blockwise Transformer "
                                                     "(the main job)"))
    train.add_export_arguments(sub.add_parser("export", help="a training run's newest checkpoint as one .pt file"))

    from .lab.plan import add_plan_arguments

    add_plan_arguments(sub.add_parser("plan", help="the paper's memory/overlap model for a cluster you plan"))

    b = sub.add_parser("bench", help="benchmarks measured side by side (results to --out)")
    b.add_argument("suite", choices=SUITES + OPTIONAL + ("all",))
    b.add_argument("--out", default="results", help="folder for JSON, markdown and plots")
    b.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in well under a minute")
    for name in SUITES + OPTIONAL:
        suite(name).add_arguments(b.add_argument_group(name))
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("train", "export"):
        from .train import __main__ as train

        return train.run(args) if args.command == "train" else train.export(args)
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
