"""The erasure ledger: the hash-chained, append-only record of every erasure, kept
beside the spool with its anchor (特記事項 11–12: 消去をしたことの記録)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from gateway.ops.chain import HashChainLog


def erasure_ledger(
    spool_directory: Path, *, clock: Callable[[], float] = time.time
) -> HashChainLog:
    """The erasure ledger beside the spool, with its anchor."""
    return HashChainLog(
        spool_directory / "erasure-ledger.jsonl",
        clock=clock,
        anchor=spool_directory / "erasure-ledger.anchor",
        kind="ledger",
    )
