"""Whole-file writes are atomic, durable and keep their mode."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.fsutil import write_atomic


def test_write_atomic_sets_the_mode_whatever_the_umask(tmp_path: Path) -> None:
    """A file written with mode 0600 is 0600 even under a permissive umask."""
    old = os.umask(0)
    try:
        write_atomic(tmp_path / "key", b"secret", mode=0o600)
    finally:
        os.umask(old)
    assert (tmp_path / "key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "key").read_bytes() == b"secret"


def test_write_atomic_replaces_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    """Replacing a file leaves exactly the new content and no stray temporary file."""
    write_atomic(tmp_path / "f", b"old", mode=0o644)
    write_atomic(tmp_path / "f", b"new", mode=0o644)
    assert (tmp_path / "f").read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_write_atomic_without_replace_never_touches_an_existing_file(tmp_path: Path) -> None:
    """With replace=False an existing file is kept and FileExistsError raised."""
    write_atomic(tmp_path / "f", b"first", replace=False)
    with pytest.raises(FileExistsError):
        write_atomic(tmp_path / "f", b"second", replace=False)
    assert (tmp_path / "f").read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]
