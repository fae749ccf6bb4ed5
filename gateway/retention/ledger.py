"""The erasure ledger: the hash-chained, append-only record of every erasure, kept
beside the spool with its anchor, or in PostgreSQL with the shared backend (特記事項
11–12: 消去をしたことの記録)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import overload

from gateway.ops.chain import HashChainLog
from gateway.ops.pgchain import PgChainLog

LEDGER_CHAIN = "ledger"
"""The erasure ledger's chain in ``gateway.chain_entries``."""


@overload
def erasure_ledger(
    spool_directory: Path, *, clock: Callable[[], float] = ..., dsn: None = None
) -> HashChainLog: ...


@overload
def erasure_ledger(
    spool_directory: Path, *, clock: Callable[[], float] = ..., dsn: str
) -> PgChainLog: ...


@overload
def erasure_ledger(
    spool_directory: Path, *, clock: Callable[[], float] = ..., dsn: str | None
) -> HashChainLog | PgChainLog: ...


def erasure_ledger(
    spool_directory: Path, *, clock: Callable[[], float] = time.time, dsn: str | None = None
) -> HashChainLog | PgChainLog:
    """The erasure ledger: beside the spool with its anchor, or (``dsn`` given) the
    chain ``ledger`` in PostgreSQL, shared by every node."""
    if dsn is not None:
        return PgChainLog(dsn, LEDGER_CHAIN, clock=clock)
    return HashChainLog(
        spool_directory / "erasure-ledger.jsonl",
        clock=clock,
        anchor=spool_directory / "erasure-ledger.anchor",
        kind="ledger",
    )
