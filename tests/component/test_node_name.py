"""A node's name on the shared spool: held while the node runs, taken again after the
database restarted, and never shared by two running processes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import psycopg
import pytest

from gateway.backends import NodeName, NodeNameTaken
from gateway.errors import SpoolError
from gateway.ops.dbwatch import DatabaseWatch


def end_sessions(dsn: str) -> None:
    """What a restart of the database does to every session but this one's."""
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )


async def test_the_name_is_taken_again_after_the_session_ended(pg_dsn: str) -> None:
    a, b = NodeName(pg_dsn, "node-a"), NodeName(pg_dsn, "node-a")
    await a.hold()
    try:
        with pytest.raises(NodeNameTaken, match="node_id 'node-a'"):
            await b.hold()
        assert await a.keep() is False  # still held: nothing to do
        end_sessions(pg_dsn)
        assert await a.keep() is True  # the lock went with the session: held again
        with pytest.raises(NodeNameTaken):
            await b.hold()
    finally:
        await a.release()
        await b.release()


async def test_a_process_that_took_the_name_meanwhile_is_said(pg_dsn: str) -> None:
    a, b = NodeName(pg_dsn, "node-a"), NodeName(pg_dsn, "node-a")
    await a.hold()
    try:
        end_sessions(pg_dsn)
        await b.hold()  # a copy of a's configuration started in the gap
        with pytest.raises(NodeNameTaken):
            await a.keep()
    finally:
        await a.release()
        await b.release()


async def test_a_session_the_server_kept_is_this_nodes_own_and_is_ended(pg_dsn: str) -> None:
    """The client lost its connection but the server kept the session (and the lock):
    the node ends its own old session and holds the name again, not a false alarm."""
    a = NodeName(pg_dsn, "node-a")
    await a.hold()
    kept = a._conn  # the server's session lives on; the node no longer has it
    a._conn = None
    try:
        assert await a.keep() is True
        assert kept is not None
        with pytest.raises(psycopg.OperationalError):
            await kept.execute("SELECT 1")  # ended by the node
        with pytest.raises(NodeNameTaken):
            await NodeName(pg_dsn, "node-a").hold()
    finally:
        await a.release()
        if kept is not None:
            await kept.close()


class _Spool:
    async def check(self) -> None:
        pass

    async def refresh_stats(self) -> None:
        pass


def _keeper(answers: list[bool | Exception]) -> Callable[[], Awaitable[bool]]:
    async def keep() -> bool:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    return keep


async def test_the_database_watch_keeps_the_name_and_fails_when_it_is_taken() -> None:
    """Each check of a database that answers keeps the name; a name taken by another
    process fails the watch (its supervisor then stops the daemon)."""
    answers: list[bool | Exception] = [False, True, NodeNameTaken("another gateway node")]
    watch = DatabaseWatch(_Spool(), {}, keep_name=_keeper(answers))
    assert await watch.check_once() is True
    assert await watch.check_once() is True
    with pytest.raises(SpoolError):
        await watch.check_once()
    assert answers == []
