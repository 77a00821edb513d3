"""The documentation site covers the public API: every name in ``jacfd.__all__`` has
a ``::: jacfd.<name>`` entry in docs/api.md (and no entry names anything else), and
every page in mkdocs.yml's nav exists."""

from __future__ import annotations

import re
from pathlib import Path

import jacfd

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _api_entries() -> list[str]:
    return re.findall(r"^:::\s+jacfd\.(\S+)\s*$", (DOCS / "api.md").read_text(), re.M)


def _nav_pages() -> list[str]:
    # The nav's leaves are "- Title: page.md" or "- page.md" lines; parsed without
    # PyYAML, which is not a test dependency.
    text = (ROOT / "mkdocs.yml").read_text()
    nav = text[text.index("\nnav:") :]
    return re.findall(r"^\s*-\s+(?:[^\n]*?:\s+)?(\S+\.md)\s*$", nav, re.M)


def test_every_public_name_is_documented() -> None:
    entries = _api_entries()
    missing = sorted(set(jacfd.__all__) - set(entries))
    assert not missing, f"add `::: jacfd.<name>` to docs/api.md for {missing}"


def test_api_page_documents_only_public_names() -> None:
    entries = _api_entries()
    unknown = sorted(set(entries) - set(jacfd.__all__))
    assert not unknown, f"docs/api.md documents names not in jacfd.__all__: {unknown}"
    duplicates = sorted({name for name in entries if entries.count(name) > 1})
    assert not duplicates, f"documented twice in docs/api.md: {duplicates}"


def test_nav_pages_exist() -> None:
    pages = _nav_pages()
    assert "api.md" in pages and "index.md" in pages
    missing = [page for page in pages if not (DOCS / page).is_file()]
    assert not missing, f"mkdocs.yml's nav names missing pages: {missing}"


def test_every_page_is_in_the_nav() -> None:
    pages = set(_nav_pages())
    orphans = sorted(p.name for p in DOCS.glob("*.md") if p.name not in pages)
    assert not orphans, f"pages not reachable from mkdocs.yml's nav: {orphans}"


def test_returns_sections_are_one_item() -> None:
    """mkdocstrings' Google-style parser starts a new ``Returns`` item at every line
    with the first line's indentation: continuation lines must be indented deeper,
    or one return value renders as a table of fragments."""
    import inspect

    for name in jacfd.__all__:
        doc = inspect.getdoc(getattr(jacfd, name)) or ""
        lines = doc.splitlines()
        if "Returns:" not in lines:
            continue
        section = lines[lines.index("Returns:") + 1 :]
        body = section[: section.index("")] if "" in section else section
        indent = len(body[0]) - len(body[0].lstrip())
        flush = [line for line in body[1:] if len(line) - len(line.lstrip()) <= indent]
        assert not flush, f"{name}'s Returns: indent these continuation lines: {flush}"


def test_every_public_function_has_a_runnable_example() -> None:
    """Examples run as doctests (``--doctest-modules``); the result classes are
    shown in their functions' examples instead."""
    import inspect

    results = {
        "GradCheckEntry",
        "GradCheckError",
        "GradCheckPair",
        "GradCheckReport",
        "SparsityReport",
    }
    missing = [
        name
        for name in sorted(set(jacfd.__all__) - results)
        if ">>> " not in (inspect.getdoc(getattr(jacfd, name)) or "")
    ]
    assert not missing, f"add an Examples: section to {missing}"
