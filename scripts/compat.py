"""`make test-compat`: the transformers-facing tests on the newest transformers and on the oldest that
pyproject allows, each in its own venv (.compat/<version>/, reused while it has the right versions), and a
table of every family's verdict per version (.compat/verdicts.md and .json):

    exact    the family's exactness test passed
    refused  its refusal was asserted (a refusal test passed, or a test skipped as "... is refused ..., checked")
    broken   one of its tests failed or errored
    absent   skipped: this transformers has no such config ("has no <Config>")
    skipped  skipped for another reason (the JSON has each test's outcome and reason)
    -        no test of it ran on that version

The families are not listed here: this file is also a pytest plugin (`-p compat`) that tags each test with the
family it is parametrized by, its `name` (or `family`, or a case dict's "name"), so new or renamed cases
(a `falcon_alibi`, a `-W2` suffix in the id) need no change. Standard library only (run with python3).

    python3 scripts/compat.py [--versions newest 4.53.0] [--torch torch==2.13.0] [-- extra pytest args]
"""

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / ".compat"
OLDEST = "4.53.0"  # pyproject: transformers>=4.53
# the transformers-facing tests: every test_hf_*.py (a new one joins by its name), and two more
TESTS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_hf_*.py")) + [
    "tests/test_transformers.py",
    "tests/test_finetune.py",
]
REFUSED_SKIP = re.compile(r"is refused\b.*\bchecked")
ABSENT_SKIP = re.compile(r"has no \w+")


def pytest_collection_modifyitems(items):
    """Plugin hook: write each test's family into the JUnit XML (a `family` property)."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        family = params.get("name", params.get("family"))
        if family is None and isinstance(params.get("case"), dict):
            family = params["case"].get("name")
        if isinstance(family, str):
            item.user_properties.append(("family", family))


def newest_transformers() -> str:
    """The version pip would install now (a dry run, no install)."""
    report = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--quiet",
            "--report",
            "-",
            "--no-deps",
            "--ignore-installed",
            "transformers",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(report)["install"][0]["metadata"]["version"]


def venv_for(version: str, torch: str) -> Path:
    """.compat/<version>/'s python, with torch pinned, transformers==version and the dev extras (pip chooses the
    rest); reused as it is while its torch, transformers and pyproject.toml are the ones it was installed with."""
    env = OUT / version
    python, marker = env / "bin" / "python", env / ".installed"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    want = f"{torch} transformers=={version} pyproject {digest}"
    if marker.exists() and marker.read_text() == want:
        return python
    print(f"== installing {torch} and transformers=={version} into {env.relative_to(ROOT)}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run(pip + [torch], check=True)
    subprocess.run(pip + ["-e", ".[dev]", f"transformers=={version}"], cwd=ROOT, check=True)
    marker.write_text(want)
    return python


def run_tests(python: Path, junit: Path, extra: list[str]) -> int:
    """pytest on the transformers-facing tests, this file loaded as a plugin; its exit status."""
    path = os.pathsep.join(p for p in (str(ROOT / "scripts"), os.environ.get("PYTHONPATH")) if p)
    cmd = [str(python), "-m", "pytest", "-q", "-p", "compat", f"--junitxml={junit}", *TESTS, *extra]
    return subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=path)).returncode


def outcomes(junit: Path) -> list[dict]:
    """Each test of a JUnit XML: its id, family (or None), outcome (passed, failure, error, skipped), message."""
    tests = []
    for case in ET.parse(junit).iter("testcase"):
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            element = case.find(tag)
            if element is not None:
                outcome, message = tag, element.get("message", "")
                break
        tests.append(
            dict(
                test=f"{case.get('classname')}::{case.get('name')}",
                family=props.get("family"),
                outcome=outcome,
                message=message,
            )
        )
    return tests


def verdict(tests: list[dict]) -> str:
    """One family's verdict on one version, from its tests (a test of refusals has "refus" in its id)."""

    def seen(outcome, reason=None, refusal=None):
        return any(
            t["outcome"] == outcome
            and (reason is None or reason.search(t["message"]))
            and (refusal is None or ("refus" in t["test"].lower()) == refusal)
            for t in tests
        )

    if seen("failure") or seen("error"):
        return "broken"
    if seen("passed", refusal=False):
        return "exact"
    if seen("passed", refusal=True) or seen("skipped", REFUSED_SKIP):
        return "refused"
    if seen("skipped", ABSENT_SKIP):
        return "absent"
    return "skipped"


def table(families: dict[str, dict[str, str]], columns: list[str]) -> str:
    rows = [["family", *columns], ["---"] * (len(columns) + 1)]
    rows += [
        [family, *(by_version.get(c.split()[0], "-") for c in columns)]
        for family, by_version in sorted(families.items())
    ]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--versions", nargs="+", default=["newest", OLDEST], help="transformers versions, or newest")
    parser.add_argument("--torch", default="torch==2.13.0", help="torch requirement, as the Makefile's TORCH")
    parser.add_argument("pytest_args", nargs="*", help="after --: extra pytest arguments (e.g. -k gpt2)")
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    columns, families, runs = [], {}, {}
    for requested in args.versions:
        version = newest_transformers() if requested == "newest" else requested
        columns.append(f"{version} (newest)" if requested == "newest" else version)
        junit = OUT / version / "junit.xml"
        junit.unlink(missing_ok=True)
        python = venv_for(version, args.torch)
        print(f"== transformers {version}: pytest", flush=True)
        rc = run_tests(python, junit, args.pytest_args)
        tests = outcomes(junit) if junit.exists() else []
        runs[version] = dict(
            pytest_exit=rc, tests=tests, failed=[t["test"] for t in tests if t["outcome"] in ("failure", "error")]
        )
        for family in {t["family"] for t in tests if t["family"]}:
            families.setdefault(family, {})[version] = verdict([t for t in tests if t["family"] == family])

    report = table(families, columns)
    failed = [f"- transformers {v}: {t}" for v, run in runs.items() for t in run["failed"]]
    failed += [
        f"- transformers {v}: pytest exited {run['pytest_exit']}"
        for v, run in runs.items()
        if run["pytest_exit"] != 0 and not run["failed"]
    ]
    text = report + ("\n\nFailed:\n" + "\n".join(failed) if failed else "") + "\n"
    (OUT / "verdicts.md").write_text(text)
    (OUT / "verdicts.json").write_text(json.dumps(dict(columns=columns, families=families, runs=runs), indent=1))
    print("\n" + text + f"(written to {(OUT / 'verdicts.md').relative_to(ROOT)} and verdicts.json)")
    broken = any(v == "broken" for by_version in families.values() for v in by_version.values())
    return 1 if broken or failed else 0


if __name__ == "__main__":
    sys.exit(main())
