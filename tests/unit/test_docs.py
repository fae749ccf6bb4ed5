"""The documents users read stand on their own and name only tests that exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
CLIMBS_OUT = re.compile(r"(?<![\w.])\.\./")
"""A relative path that starts by leaving its folder: from README or docs/, out of the tree
sooner or later (the documents never need one)."""
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
    """README and docs/ are what users read, and all they have: nothing in them links or
    refers to a path out of the tree, and every relative link lands on a file in it."""
    text = doc.read_text("utf-8")
    climbing = CLIMBS_OUT.search(text)
    assert climbing is None, f"{doc.name} refers to a path above its folder: {climbing}"
    for target in re.findall(r"\]\(([^)#]+)", text):
        if target.startswith(("http://", "https://", "mailto:", "file:")):
            continue
        path = (doc.parent / target).resolve()
        assert path.is_relative_to(ROOT), f"{doc.name} links out of the repository: {target}"
        assert path.exists(), f"{doc.name} links to missing {target}"
