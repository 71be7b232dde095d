"""The documentation stays true to the tree: every module is in the module map, every relative link and anchor
resolves, the README stays short, and every "methods.md §N" the code cites exists."""
from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MAPPED_FOLDERS = ("erasers", "nodes", "cli", "shapes", "testing")
README_MAX_LINES = 250

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CITATION = re.compile(r"methods\.md (§[\d.]+(?:[–-][\d.]+)?(?:(?:, | and )§?[\d.]+(?:[–-][\d.]+)?)*)")
SECTION = re.compile(r"\d+(?:\.\d+)*")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")


def linked_documents() -> list[Path]:
    cards = [*sorted((ROOT / "weights").rglob("README.md")), ROOT / "workflows" / "README.md"]
    return [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted(DOCS.glob("*.md")), *cards]


def modules() -> list[str]:
    """Every .py module (not __init__.py) under the mapped folders, as a path from the repository root."""
    found = []
    for folder in MAPPED_FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name != "__init__.py" and "__pycache__" not in path.parts:
                found.append(path.relative_to(ROOT).as_posix())
    return found


def outside_fences(text: str) -> list[str]:
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = text.replace("`", "").replace("*", "").lower()
    text = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def anchors(markdown: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for line in outside_fences(markdown.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def relative_links(markdown: Path) -> list[str]:
    links = []
    for line in outside_fences(markdown.read_text(encoding="utf-8")):
        line = re.sub(r"`[^`]*`", "", line)
        links += [target for target in LINK.findall(line) if not re.match(r"^[a-z][a-z0-9+.-]*:", target)]
    return links


def methods_sections() -> set[str]:
    sections = set()
    for line in outside_fences((DOCS / "methods.md").read_text(encoding="utf-8")):
        match = re.match(r"^#{2,6}\s+(\d+(?:\.\d+)*)\.?\s", line)
        if match:
            sections.add(match.group(1))
    return sections


def code_citations() -> list[tuple[str, int, str]]:
    cited = []
    for path in sorted(ROOT.rglob("*.py")):
        relative = path.relative_to(ROOT)
        if relative.parts[0] in (".venv", "artifacts") or relative.as_posix() == "tests/test_docs.py":
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for citation in CITATION.findall(line):
                cited += [(relative.as_posix(), number, section) for section in SECTION.findall(citation)]
    return cited


def test_the_module_list_is_computed_from_the_tree():
    listed = modules()
    assert "erasers/erasure.py" in listed and "nodes/comfy_adapter.py" in listed and "cli/main.py" in listed
    assert not any(path.endswith("__init__.py") for path in listed)


def test_every_module_under_erasers_nodes_cli_shapes_and_testing_is_in_the_design_module_map():
    design = (DOCS / "design.md").read_text(encoding="utf-8")
    mapped = design[design.index("## Module map"):]
    missing = [path for path in modules() if f"`{path}`" not in mapped]
    assert not missing, f"docs/design.md's module map lacks {missing}: add one line per module with its role"


def test_every_relative_link_in_the_readme_changelog_docs_and_cards_resolves_to_a_file_and_heading():
    broken = []
    for markdown in linked_documents():
        for target in relative_links(markdown):
            file_part, _, anchor = target.partition("#")
            destination = (markdown.parent / file_part).resolve() if file_part else markdown
            where = f"{markdown.relative_to(ROOT)} → {target}"
            if not destination.exists():
                broken.append(f"{where}: no such file")
            elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
                broken.append(f"{where}: no heading with that anchor")
    assert not broken, "\n".join(broken)


def test_the_citation_pattern_reads_lists_and_ranges():
    found = [SECTION.findall(c) for c in CITATION.findall("(methods.md §1.2, §4.2) and docs/methods.md §2–3.")]
    assert found == [["1.2", "4.2"], ["2", "3"]]


def test_the_anchor_check_knows_github_slugs():
    assert slug("2.4 In EraseKit: the shared low-rank solve") == "24-in-erasekit-the-shared-low-rank-solve"
    assert slug("Where each method's math lives") == "where-each-methods-math-lives"
    assert slug("`erasekit bench spm`") == "erasekit-bench-spm"


def test_the_readme_has_at_most_250_lines():
    lines = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/"


def test_every_methods_md_section_cited_in_the_code_exists_in_docs_methods_md():
    sections = methods_sections()
    cited = code_citations()
    assert cited, "no citation found: the pattern no longer matches how the code cites methods.md"
    missing = [f"{path}:{line} cites §{section}" for path, line, section in cited if section not in sections]
    assert not missing, "docs/methods.md lacks:\n" + "\n".join(missing)


@pytest.mark.parametrize("document", ["design.md", "methods.md", "shapes-world.md", "benchmarks.md",
                                      "compatibility.md", "usage.md"])
def test_each_document_the_readme_points_to_exists(document):
    assert (DOCS / document).is_file()
    assert f"docs/{document}" in (ROOT / "README.md").read_text(encoding="utf-8")
