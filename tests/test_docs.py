"""The documentation in docs/: citations resolve, links work, no path outside the repository."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# a citation: ``docs/<page>.md`` followed by one or more section numbers, e.g. "docs/theory.md §6.4",
# "docs/theory.md §8.1-§8.4", "docs/theory.md §5.9, §6 and §7"
CITATION = re.compile(r"docs/([\w/-]+\.md)((?:(?:\s*[,;–-]\s*|\s+and\s+|\s*)§\d+(?:\.\d+)*)+)")
SECTION = re.compile(r"§(\d+(?:\.\d+)*)")
HEADING = re.compile(r"^#{2,6}\s+(\d+(?:\.\d+)*)\.?\s", re.M)
# relative Markdown links and images: [text](target) / ![alt](target)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# spelled in pieces so that this file does not contain them itself
FORBIDDEN = (".." + "/" + "shared", "shared" + "/" + "docs")
CITING = ("riverscape", "experiments", "README.md")


def _headings(page: Path) -> set[str]:
    return set(HEADING.findall(page.read_text(encoding="utf-8")))


def _citations(text: str):
    """``(page, section)`` for every section number of every ``docs/...md §N.M`` citation in ``text``."""
    for match in CITATION.finditer(text):
        for section in SECTION.findall(match.group(2)):
            yield match.group(1), section


def _files(*roots: str, suffixes=(".py", ".md", ".ipynb", ".txt", ".rst", ".toml", ".cfg")) -> list[Path]:
    out = []
    for name in roots:
        path = ROOT / name
        if path.is_file():
            out.append(path)
        elif path.is_dir():
            out += [p for p in sorted(path.rglob("*")) if p.is_file() and p.suffix in suffixes and "__pycache__" not in p.parts]
    return out


def _unresolved(pairs) -> list[str]:
    cache: dict[str, set[str] | None] = {}
    bad = []
    for where, page, section in pairs:
        if page not in cache:
            target = DOCS / page
            cache[page] = _headings(target) if target.is_file() else None
        if cache[page] is None:
            bad.append(f"{where}: docs/{page} does not exist")
        elif section not in cache[page]:
            bad.append(f"{where}: docs/{page} has no numbered heading {section}")
    return bad


def test_docs_pages_exist_with_numbered_sections():
    for name in ("README.md", "theory.md", "experiments.md"):
        assert (DOCS / name).is_file(), name
    numbers = _headings(DOCS / "theory.md")
    assert {"1", "2", "3", "4", "5", "6", "7", "8"} <= numbers
    assert {"3.5", "4.5", "4.7", "6.4", "7.4"} <= numbers  # LSQ, Hutch++, SLQ, t_b, matched null


def test_citation_pattern_reads_lists_and_ranges():
    text = "see docs/theory.md §5.9, §6 and §7 and docs/experiments.md §2.3-§2.4; docs/theory.md §1.4."
    assert list(_citations(text)) == [
        ("theory.md", "5.9"), ("theory.md", "6"), ("theory.md", "7"),
        ("experiments.md", "2.3"), ("experiments.md", "2.4"), ("theory.md", "1.4"),
    ]


def test_every_docs_citation_in_code_and_readme_resolves():
    pairs = []
    for path in _files(*CITING):
        text = path.read_text(encoding="utf-8", errors="replace")
        for page, section in _citations(text):
            pairs.append((str(path.relative_to(ROOT)), page, section))
    assert not _unresolved(pairs), "\n".join(_unresolved(pairs))


def _tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    names = [n for n in out.decode("utf-8", "replace").split("\0") if n]
    return [ROOT / n for n in names if not n.startswith(".ci/")]


def test_no_tracked_file_points_outside_the_repository():
    offenders = []
    for path in _tracked_files() + _files("docs", suffixes=(".md", ".tsv")):
        if not path.is_file():
            continue
        data = path.read_bytes()
        for needle in FORBIDDEN:
            if needle.encode() in data:
                offenders.append(f"{path.relative_to(ROOT)} mentions {needle}")
    assert not offenders, "\n".join(offenders)


def test_relative_markdown_links_point_to_existing_files():
    broken = []
    for page in [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]:
        text = page.read_text(encoding="utf-8")
        text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks hold code, not links
        for target in LINK.findall(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
                continue  # absolute URL (http:, mailto:, ...) or an anchor on the same page
            path = target.split("#", 1)[0].split("?", 1)[0]
            if not path:
                continue
            resolved = (ROOT / path.lstrip("/")) if path.startswith("/") else (page.parent / path)
            if not resolved.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, "\n".join(broken)
