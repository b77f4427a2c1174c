"""The documentation's links hold: every relative link (and image) in README.md, BENCHMARKS.md and
docs/*.md points to a file of the repository, and where it names an anchor (`page.md#heading`,
`#heading`), to a heading of that page, by GitHub's rule for heading anchors. Links out of the
repository (http:, https:, mailto:) are not followed. Every page of docs/ is linked from the README.

(The code examples and command lines of the same pages are run and checked by
tests/test_readme_examples.py.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^\s*(```+|~~~+)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http:, https:, mailto:, ...


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the lines outside fenced code blocks, inline code spans blanked."""
    out, fence = [], None
    for n, line in enumerate(path.read_text().splitlines(), 1):
        m = FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)
        elif fence is not None and line.strip().startswith(fence):
            fence = None
        elif fence is None:
            out.append((n, re.sub(r"`[^`]*`", lambda s: "`" + "x" * (len(s.group()) - 2) + "`", line)))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (not - or _), spaces to -."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown page; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    lines = [line for _, line in _raw_prose(path)]
    for line in lines:
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def _raw_prose(path: Path) -> list[tuple[int, str]]:
    """Lines outside fenced code blocks, as written (headings keep their code spans)."""
    raw = path.read_text().splitlines()
    return [(n, raw[n - 1]) for n, _ in prose_lines(path)]


def links(path: Path) -> list[tuple[int, str]]:
    return [(n, m.group(1)) for n, line in prose_lines(path) for m in LINK.finditer(line)]


CASES = [(page, n, target) for page in PAGES for n, target in links(page) if not EXTERNAL.match(target)]


def test_the_pages_have_links():
    """The extraction itself finds the links it must check (so a broken pattern cannot pass silently)."""
    found = {(p.name, t) for p, _, t in CASES}
    assert ("README.md", "docs/op.md") in found
    assert ("README.md", "BENCHMARKS.md#the-demo") in found
    assert ("README.md", "benchmarks/results/demo_loss.png") in found
    assert any(p == "BENCHMARKS.md" and t.startswith("benchmarks/results/") for p, t in found)
    assert any(p.endswith(".md") and t.startswith("../BENCHMARKS.md#") for p, t in found)


@pytest.mark.parametrize("page, line, target", CASES, ids=[f"{p.relative_to(ROOT)}:{n}: {t}" for p, n, t in CASES])
def test_relative_link_resolves(page, line, target):
    where = f"{page.relative_to(ROOT)}:{line}"
    file_part, _, anchor = target.partition("#")
    dest = page if not file_part else (page.parent / file_part).resolve()
    assert dest.exists(), f"{where}: {target!r} points to {dest}, which does not exist"
    assert dest.is_relative_to(ROOT), f"{where}: {target!r} leaves the repository"
    if anchor:
        assert dest.suffix == ".md", f"{where}: {target!r}: an anchor into a file that is not markdown"
        assert anchor in anchors(dest), (
            f"{where}: {target!r}: no heading of {dest.relative_to(ROOT)} has the "
            f"anchor #{anchor}; its anchors: {sorted(anchors(dest))}"
        )


def test_every_docs_page_is_linked_from_the_readme():
    linked = {
        (ROOT / t.partition("#")[0]).resolve()
        for _, t in links(ROOT / "README.md")
        if not EXTERNAL.match(t) and t.partition("#")[0]
    }
    orphans = [p.relative_to(ROOT).as_posix() for p in PAGES[2:] if p.resolve() not in linked]
    assert not orphans, f"docs pages the README does not link to: {orphans}"
