"""The documents users read stand on their own and name only tests that exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
CITED = re.compile(r"tests/((?:[a-z0-9_]+/)*test_[a-z0-9_]+\.py)::(test_[a-z0-9_]+)")
"""A cited test, as ``tests/TIER/FILE.py::test_name`` (the path below ``tests/``, and the name)."""


def test_the_compliance_matrix_cites_only_tests_that_exist() -> None:
    """Every ``tests/TIER/FILE.py::test_name`` in docs/compliance.md is a test of that file."""
    text = (ROOT / "docs" / "compliance.md").read_text("utf-8")
    cited = set(CITED.findall(text))
    assert len(cited) >= 50, "the matrix cites too few tests to be the matrix"
    missing = [
        f"{file}::{name}"
        for file, name in sorted(cited)
        if not (ROOT / "tests" / file).is_file()
        or f"def {name}(" not in (ROOT / "tests" / file).read_text("utf-8")
    ]
    assert not missing, missing


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_no_document_points_outside_the_repository(doc: Path) -> None:
    """README and docs/ are what users read: nothing in them links out of the tree."""
    text = doc.read_text("utf-8")
    assert "../shared" not in text
    assert "DESIGN.md" not in text
    for target in re.findall(r"\]\(([^)#]+)", text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        assert (doc.parent / target).exists(), f"{doc.name} links to missing {target}"
