"""What `ringwise generate` writes and says for either kind of model (generate.py, generate_hf.py): the
report file, the latency quantiles, --check's verdict."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def quantile(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def write_report(report: dict, out: Path) -> None:
    """The report as JSON, written whole or not at all."""
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out)


def checked(mismatches: list[str]) -> int:
    """--check's verdict: 1 with the differences, or 0 with the confirmation."""
    if mismatches:
        print(
            "ringwise generate --check: tokens differ from one process:\n  " + "\n  ".join(mismatches), file=sys.stderr
        )
        return 1
    print("check: identical tokens to one process")
    return 0
