"""Every relative link in the README, the docs and the benchmarks' README points to a file that
exists, and its #anchor, if any, to a heading of that file (GitHub's heading slugs)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), ROOT / "benchmarks" / "README.md"])

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
# [text](target) and ![alt](target), with an optional "title"; the text may hold inline code.
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^()\s<>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:|^//")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines, fenced = [], None
    for line in text.splitlines():
        match = FENCE.match(line)
        if match:
            if fenced is None:
                fenced = match.group(1)
            elif match.group(1) == fenced:
                fenced = None
            continue
        if fenced is None:
            lines.append(line)
    return lines


def links(text: str) -> list[str]:
    """Link targets in the prose, inline code spans left out (a link's text may hold code)."""
    found = []
    for line in prose_lines(text):
        definition = REFERENCE_DEFINITION.match(line)
        if definition:
            found.append(definition.group(1))
            continue
        # A code span is never a link, but may be a link's text: keep it, without brackets or parentheses.
        plain = INLINE_CODE.sub(lambda m: re.sub(r"[][()]", "_", m.group(0)), line)
        found += [m.group(1) for m in INLINE_LINK.finditer(plain)]
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text lowercased, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = INLINE_CODE.sub(lambda m: m.group(2), text)
    text = re.sub(r"<[^>]+>", "", text).replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a page's headings; a repeated heading gets -1, -2, ... as on GitHub."""
    names: set[str] = set()
    counts: dict[str, int] = {}
    for line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if match:
            base = slug(match.group(2))
            count = counts.get(base, 0)
            counts[base] = count + 1
            names.add(f"{base}-{count}" if count else base)
    return names


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """'target: why' for every relative link of ``page`` that leads nowhere."""
    problems = []
    for target in links(page.read_text(encoding="utf-8")):
        if not target or SCHEME.match(target):
            continue
        path_part, _, anchor = target.partition("#")
        destination = (page.parent / path_part).resolve() if path_part else page.resolve()
        if not destination.is_relative_to(root.resolve()):
            problems.append(f"{target}: outside the repository")
        elif not destination.exists():
            problems.append(f"{target}: no such file")
        elif anchor:
            if destination.suffix != ".md" or not destination.is_file():
                problems.append(f"{target}: an anchor into a file that is not a Markdown page")
            elif anchor not in anchors(destination):
                problems.append(f"{target}: no heading with that anchor in {destination.name}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_relative_link_leads_somewhere(page):
    assert broken_links(page) == []


def test_the_docs_are_linked_from_the_readme():
    readme_links = {target.partition("#")[0] for target in links((ROOT / "README.md").read_text(encoding="utf-8"))}
    pages = {f"docs/{page.name}" for page in (ROOT / "docs").glob("*.md")}
    assert sorted(pages - readme_links) == []


def test_the_readme_stays_short():
    assert len((ROOT / "README.md").read_bytes()) <= 10 * 1024


def test_slugs_follow_github():
    assert slug("Serving (`benchmarks/serve.py`)") == "serving-benchmarksservepy"
    assert slug("Quantized models (`benchmarks/quant_models.py`, also run by `make bench`)") == (
        "quantized-models-benchmarksquant_modelspy-also-run-by-make-bench"
    )
    assert slug("The ChatGLM family") == "the-chatglm-family"
    assert slug("Multi-turn: a **new** [turn](x.md)") == "multi-turn-a-new-turn"
    assert slug("ChatGLM's `api.py` protocol") == "chatglms-apipy-protocol"


def test_a_broken_link_or_anchor_is_found(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# Page\n\n## Options\n\n## Options\n", encoding="utf-8")
    readme = tmp_path / "README.md"
    readme.write_text(
        "\n".join(
            [
                "# Title",
                "[fine](docs/page.md) [fine too](docs/page.md#options) [second](docs/page.md#options-1)",
                "[here](#title) [web](https://example.com/missing.md) `[code](missing.md)`",
                "```",
                "[in a code block](missing.md)",
                "```",
                "[gone](docs/missing.md) [no heading](docs/page.md#usage) [no third](docs/page.md#options-2)",
                "[not here](#nothing) [outside](../elsewhere.md)",
                "![picture](docs/missing.png)",
                "[ref]: docs/gone.md",
            ]
        ),
        encoding="utf-8",
    )
    assert broken_links(readme, tmp_path) == [
        "docs/missing.md: no such file",
        "docs/page.md#usage: no heading with that anchor in page.md",
        "docs/page.md#options-2: no heading with that anchor in page.md",
        "#nothing: no heading with that anchor in README.md",
        "../elsewhere.md: outside the repository",
        "docs/missing.png: no such file",
        "docs/gone.md: no such file",
    ]
