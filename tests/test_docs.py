"""The documentation a fresh clone can follow: a README of at most 10,000 characters, every relative
link of README.md and docs/*.md reaching a file (and heading) of the repository, every section that the
code, tests and benchmarks cite by name existing in the file they name, and no citation of a file that
is not in the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# [text](target) outside code; images and absolute URLs are not checked
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
# README "Section", docs/results.md, "Section" or docs/budget.md 'Section' in a comment or message
SECTION_CITE = re.compile(r"""\b(README(?:\.md)?|docs/[\w./-]+\.md),? ["']([^"'\n]{3,80})["']""")


def _tracked_files() -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [REPO / line for line in out.splitlines() if (REPO / line).is_file()]


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _headings(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return [m.group(1).strip() for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M)]


def _without_code(text: str) -> str:
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def test_readme_is_at_most_ten_thousand_characters():
    size = len((REPO / "README.md").read_text())
    assert size <= 10_000, f"README.md has {size} characters: move detail into docs/"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_reach_a_file_and_heading(doc):
    broken = []
    for target in LINK.findall(_without_code(doc.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in {_slug(h) for h in _headings(dest)}:
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(REPO)}")
    assert not broken, f"{doc.relative_to(REPO)}: " + "; ".join(broken)


def test_sections_cited_by_name_exist():
    missing = []
    for path in _tracked_files():
        if path.suffix not in (".py", ".md", ".yaml", ".sh", ".toml") or path.name == "test_docs.py":
            continue
        for name, section in SECTION_CITE.findall(path.read_text(errors="replace")):
            target = REPO / ("README.md" if name.startswith("README") else name)
            headings = _headings(target) if target.is_file() else []
            if not any(h == section or h.startswith(section) for h in headings):
                missing.append(f"{path.relative_to(REPO)} cites {name} {section!r}")
    assert not missing, "\n".join(missing)


def test_no_file_cites_the_spec_that_is_not_in_the_repository():
    spec = "SOCO" + "_SPEC"  # spelled in two parts so that this file does not match itself
    citing = [p.relative_to(REPO).as_posix() for p in _tracked_files() if spec in p.read_text(errors="replace")]
    assert not citing, f"{spec} is not in the repository; cite docs/method.md instead: {citing}"
