"""Every document a user reads stays inside the repository: each relative link in README.md
and docs/*.md resolves to a file here (and its #anchor to a heading of that file)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# [text](target) outside code; images too. Inline code and fenced blocks are skipped.
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def anchors(path: Path) -> set[str]:
    """The #anchors GitHub gives the headings of a Markdown file."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for line in _FENCE.sub("", path.read_text()).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def links(path: Path) -> list[str]:
    text = re.sub(r"`[^`\n]*`", "", _FENCE.sub("", path.read_text()))
    return _LINK.findall(text)


def resolve(source: Path, target: str) -> tuple[Path, str]:
    """(file, anchor) of a relative link; a bare #anchor points into `source` itself."""
    file_part, _, anchor = target.partition("#")
    return ((source.parent / file_part).resolve() if file_part else source), anchor


def test_the_documents_exist_and_have_links() -> None:
    assert (REPO / "docs" / "reference.md") in DOCUMENTS
    assert sum(len(links(d)) for d in DOCUMENTS) > 10  # the checker finds links at all


def test_the_checker_catches_a_broken_link(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("# Title\n[ok](#title) [gone](missing.md) [out](../../x.md)\n")
    (ok, gone, out) = (resolve(doc, t) for t in links(doc))
    assert ok == (doc, "title") and ok[1] in anchors(doc)
    assert not gone[0].exists()
    assert not out[0].is_relative_to(tmp_path)


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves_inside_the_repository(document: Path) -> None:
    for target in links(document):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        path, anchor = resolve(document, target)
        assert path.is_relative_to(REPO), f"{target} leaves the repository"
        assert path.exists(), f"{target}: no such file"
        if anchor and path.suffix == ".md":
            assert anchor in anchors(path), f"{target}: no such heading in {path.name}"
