"""`make lock`: refresh requirements/test.lock, the exact test environment that `make setup` installs.

A fresh venv gets torch (pinned as in the Makefile) and then the newest dev extras, unconstrained; the whole
suite runs in it, and the lock is rewritten only when the suite passes, so the lock only ever names versions
the suite passed with. The version changes are printed either way. Standard library only (run with python3).

    python3 scripts/lock.py [--torch torch==2.13.0]
"""

import argparse
import datetime
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "test.lock"
NOT_LOCKED = {"torch", "ringwise"}  # torch: the Makefile's TORCH pin; ringwise: this repo, installed editable


def canonical(name: str) -> str:
    """PEP 503 name, so `huggingface_hub` and `huggingface-hub` are one package."""
    return name.strip().lower().replace("_", "-").replace(".", "-")


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """{package: version} of a constraints file of `name==version` lines (comments ignored)."""
    if not path.exists():
        return {}
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[canonical(name)] = version.strip()
    return pins


def freeze(python: Path) -> dict[str, str]:
    """{package: version} of what `pip freeze` shows in a venv, less torch and ringwise."""
    out = subprocess.run(
        [str(python), "-m", "pip", "freeze", "--exclude-editable"], capture_output=True, text=True, check=True
    ).stdout
    pins = {}
    for line in out.splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            if canonical(name) not in NOT_LOCKED:
                pins[canonical(name)] = version.strip()
    return pins


def changes(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """One line per package whose pin differs: `name old -> new`, `+ name new`, `- name old`."""
    lines = []
    for name in sorted(old.keys() | new.keys()):
        if name not in old:
            lines.append(f"+ {name} {new[name]}")
        elif name not in new:
            lines.append(f"- {name} {old[name]}")
        elif old[name] != new[name]:
            lines.append(f"  {name} {old[name]} -> {new[name]}")
    return lines


def write_lock(pins: dict[str, str], torch: str, provenance: str, path: Path = LOCK) -> None:
    header = f"""\
# The test/dev environment, exact: a pip constraints file (`make setup` runs
#   pip install -c requirements/test.lock "{torch}", then pip install -c requirements/test.lock -e ".[dev]").
# Everything `pip freeze` shows but torch (the Makefile's TORCH) and ringwise itself.
# Made by `make lock` (scripts/lock.py): a fresh venv, {torch}, the newest dev extras, the whole
# suite; this file is rewritten only when the suite passes. Do not edit by hand: run `make lock`.
# {provenance}; Python {platform.python_version()} on {platform.system()} {platform.machine()}.
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + "".join(f"{name}=={pins[name]}\n" for name in sorted(pins)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch", default="torch==2.13.0", help="torch requirement, as the Makefile's TORCH")
    args = parser.parse_args()
    old = read_lock()
    with tempfile.TemporaryDirectory(prefix="ringwise-lock-") as tmp:
        python = Path(tmp) / "bin" / "python"
        subprocess.run([sys.executable, "-m", "venv", tmp], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run(pip + [args.torch], check=True)
        subprocess.run(pip + ["-e", ".[dev]"], cwd=ROOT, check=True)  # newest versions: no constraints
        new = freeze(python)
        green = subprocess.run([str(python), "-m", "pytest", "-q"], cwd=ROOT).returncode == 0
    diff = changes(old, new)
    print(f"\nversion changes against {LOCK.relative_to(ROOT)}:")
    print("\n".join(diff) if diff else "  none")
    if not green:
        print(f"the suite failed with these versions: {LOCK.relative_to(ROOT)} left as it is")
        return 1
    write_lock(new, args.torch, f"Suite green {datetime.date.today()}")
    print(f"the suite passed: {LOCK.relative_to(ROOT)} rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
