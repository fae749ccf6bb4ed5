"""The driver's errors as the gateway's: never the driver's text, which quotes rows."""

from __future__ import annotations

import psycopg
import pytest

from gateway.errors import SpoolError
from gateway.pgutil import connect, translated

PLANTED = "新宿 花子 123456789012"


@pytest.mark.parametrize(
    "row",
    [
        (PLANTED, None),  # NOT NULL: "Failing row contains (...)"
        (PLANTED, "x"),  # CHECK: the same
        ("dup", "ok"),  # UNIQUE: "Key (a)=(...) already exists"
    ],
)
def test_a_refused_row_is_named_by_its_class_never_by_its_values(
    pg_dsn: str, row: tuple[str, str | None]
) -> None:
    conn = connect(pg_dsn, autocommit=True)
    try:
        conn.execute("CREATE TABLE t (a text UNIQUE, b text NOT NULL CHECK (b <> 'x'))")
        conn.execute("INSERT INTO t VALUES (%s, 'ok')", ("dup",))
        with pytest.raises(SpoolError) as caught, translated():
            conn.execute("INSERT INTO t VALUES (%s, %s)", row)
    finally:
        conn.close()
    assert not isinstance(caught.value, psycopg.Error)
    assert "refused the row" in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    for value in (PLANTED, "dup"):
        assert value not in str(caught.value)
