"""The device and staff registries in PostgreSQL, shared by every node: the table, and
publishing a new registry document so that every node hears of it at once.

``gateway.registries`` holds one row per registry (``devices``, ``users``): the document
exactly as the file holds it (the same parser and checks, :mod:`gateway.identity.registry`),
a version that every write raises by one, its SHA-256, and who wrote it when. A write
(:func:`publish`) locks the row, refuses a stale ``expected_version`` (two operators
editing at once: the second is told to run the command again), writes, and sends
``NOTIFY gateway_registry, 'NAME:VERSION'`` in the same transaction, so the followers
(:mod:`gateway.identity.pgfollower`) hear of it exactly when it is committed.

The first node (or ``gatewayctl``) that finds a registry missing seeds it from its
configured file (:func:`seed_if_absent`); from then on the table is the registry and
the files are never read into it again. Synchronous (psycopg): ``gatewayctl`` and
start-up. Errors never quote a document (it holds password hashes) or the DSN.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from gateway.identity.registry import (
    DeviceRegistry,
    RegistryError,
    UserRegistry,
    devices_text,
    load_users,
    parse_devices,
    parse_users,
    users_text,
)
from gateway.pgutil import SCHEMA, connect, ensure_schema, translated

REGISTRIES = ("devices", "users")
CHANNEL = "gateway_registry"
"""The NOTIFY channel; each payload is ``NAME:VERSION``."""
TABLE = f"{SCHEMA}.registries"
"""Written out in the statements below (no SQL is built from strings)."""

DDL = """
CREATE TABLE IF NOT EXISTS gateway.registries (
    name text PRIMARY KEY CHECK (name IN ('devices', 'users')),
    body text NOT NULL,
    version bigint NOT NULL CHECK (version >= 1),
    digest text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    updated_by text NOT NULL
)
"""

SEED_SQL = """
INSERT INTO gateway.registries (name, body, version, digest, updated_by)
VALUES (%(name)s, %(body)s, 1, %(digest)s, %(actor)s)
ON CONFLICT (name) DO NOTHING
RETURNING version
"""
NOTIFY_SQL = "SELECT pg_notify(%s, %s)"


class RegistryConflict(RegistryError):
    """Someone else wrote the registry between our read and our write: nothing written."""


def source(name: str) -> str:
    """How errors name a registry kept in the database: ``gateway.registries/devices``."""
    return f"{TABLE}/{name}"


def digest(body: str) -> str:
    return "sha256:" + hashlib.sha256(body.encode("utf-8")).hexdigest()


def empty_body(name: str) -> str:
    """The document of an empty registry, as :func:`publish` stores it."""
    _known(name)
    return devices_text(DeviceRegistry()) if name == "devices" else users_text(UserRegistry())


def validate(name: str, body: str, where: str | None = None) -> DeviceRegistry | UserRegistry:
    """``body`` parsed as registry ``name``, with the file's checks and its messages (naming
    ``where``, by default :func:`source`); RegistryError if it cannot be used."""
    _known(name)
    label = where or source(name)
    return parse_devices(body, label) if name == "devices" else parse_users(body, label)


def _known(name: str) -> None:
    if name not in REGISTRIES:
        raise RegistryError(f"no registry {name!r}: the registries are {', '.join(REGISTRIES)}")


@dataclass(frozen=True)
class Seed:
    """What a node would put in a registry nobody has written yet: its configured file."""

    name: str
    body: str
    where: str

    @classmethod
    def from_file(cls, name: str, path: Path) -> Seed:
        """The file's document (a missing file: the empty registry); RegistryError if it
        cannot be read."""
        try:
            body = path.read_text("utf-8")
        except FileNotFoundError:
            body = empty_body(name)
        except (OSError, UnicodeDecodeError) as exc:
            raise RegistryError(f"{path}: cannot read: {type(exc).__name__}") from None
        return cls(name, body, str(path))


# ------------------------------------------------------------------ connections


@contextmanager
def session(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """A connection with the table in place; the driver's errors as the spool's
    (StorageUnavailable when the database cannot be reached), never quoting a value."""
    with translated():
        conn = connect(dsn)
        try:
            ensure_schema(conn, DDL)
            yield conn
        except psycopg.errors.IntegrityError as exc:
            # Its text may quote the row (a document with password hashes): only its code.
            raise RegistryError(
                f"{TABLE}: the database refused the write ({exc.sqlstate})"
            ) from None
        finally:
            conn.close()


def load_with(conn: psycopg.Connection[Any], name: str) -> tuple[str, int]:
    """``(body, version)`` of registry ``name``; the empty registry and 0 when absent."""
    _known(name)
    row = conn.execute(
        "SELECT body, version FROM gateway.registries WHERE name = %s", (name,)
    ).fetchone()
    conn.rollback()  # nothing held between a read and a later write
    if row is None:
        return empty_body(name), 0
    return str(row[0]), int(row[1])


def seed_with(conn: psycopg.Connection[Any], seed: Seed, *, actor: str = "seed") -> bool:
    """Insert ``seed`` as version 1 unless the registry exists; True if it was inserted."""
    validate(seed.name, seed.body, seed.where)
    with conn.transaction():
        row = conn.execute(
            SEED_SQL,
            {"name": seed.name, "body": seed.body, "digest": digest(seed.body), "actor": actor},
        ).fetchone()
        if row is not None:
            conn.execute(NOTIFY_SQL, (CHANNEL, f"{seed.name}:1"))
    return row is not None


def publish_with(
    conn: psycopg.Connection[Any],
    name: str,
    body: str,
    *,
    expected_version: int | None,
    actor: str,
) -> int:
    """:func:`publish` on an open connection (from :func:`session`)."""
    validate(name, body)  # refused before the database is touched: the row stays as it is
    with conn.transaction():
        row = conn.execute(
            "SELECT version FROM gateway.registries WHERE name = %s FOR UPDATE", (name,)
        ).fetchone()
        current = 0 if row is None else int(row[0])
        if expected_version is not None and expected_version != current:
            raise RegistryConflict(_conflict(name, current, expected_version))
        version = current + 1
        values = {"name": name, "body": body, "digest": digest(body), "actor": actor}
        if row is None:
            inserted = conn.execute(SEED_SQL, values).fetchone()
            if inserted is None:  # another writer created it since our SELECT
                raise RegistryConflict(_conflict(name, None, expected_version))
        else:
            conn.execute(
                "UPDATE gateway.registries SET body = %(body)s, version = %(version)s, "
                "digest = %(digest)s, updated_at = now(), updated_by = %(actor)s "
                "WHERE name = %(name)s",
                {**values, "version": version},
            )
        conn.execute(NOTIFY_SQL, (CHANNEL, f"{name}:{version}"))
    return version


def _conflict(name: str, current: int | None, expected: int | None) -> str:
    now = "newly written" if current is None else f"now at version {current}"
    read = "" if expected is None else f", not {expected} as read"
    return (
        f"{source(name)} was changed by someone else meanwhile ({now}{read}); nothing was "
        "written: run the command again"
    )


# ------------------------------------------------------------------ the API


def publish(
    dsn: str, name: str, body: str, *, expected_version: int | None = None, actor: str
) -> int:
    """Store ``body`` as registry ``name`` and tell every node; returns the new version.

    The body is checked first with the registry's own parser (RegistryError with the
    file's messages; nothing written). ``expected_version`` is the version the change was
    made from (0: the registry must not exist yet); if the registry has moved on since,
    :class:`RegistryConflict` and nothing is written. None writes whatever is there.
    """
    with session(dsn) as conn:
        return publish_with(conn, name, body, expected_version=expected_version, actor=actor)


def load(dsn: str, name: str) -> tuple[str, int]:
    """``(body, version)`` of registry ``name``; ``(empty registry, 0)`` when absent,
    the table included (a read creates nothing)."""
    with translated(), connect(dsn) as conn:
        try:
            return load_with(conn, name)
        except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName):
            return empty_body(name), 0


def users_in_effect(dsn: str, users_file: Path) -> tuple[UserRegistry, str]:
    """The staff registry a node starting now would use, and where it is kept: the
    table's, or while no node has written it, the file that would seed it. For the
    checks before a start or a reload (``staff_problems``) and ``check-config``."""
    body, version = load(dsn, "users")
    if version == 0:
        return load_users(users_file), str(users_file)
    return parse_users(body, source("users")), source("users")


def seed_if_absent(dsn: str, name: str, body: str, *, where: str | None = None) -> bool:
    """Insert ``body`` as version 1 of registry ``name`` if the table has no such registry
    yet (the first node to start seeds it); True if it did. Never overwrites."""
    with session(dsn) as conn:
        return seed_with(conn, Seed(name, body, where or source(name)))


class PgRegistryStore:
    """The registries in PostgreSQL as ``gatewayctl`` edits them (a
    :class:`~gateway.identity.registry.RegistryStore`): a save writes back what was read,
    changed, and is refused (:class:`RegistryConflict`) if another writer came between.

    Registries nobody has written yet are first seeded from ``seeds`` (this node's
    configured files), as the first node to start would have done.
    """

    def __init__(self, dsn: str, *, actor: str, seeds: dict[str, Path] | None = None) -> None:
        self._dsn = dsn
        self._actor = actor
        self._seeds = seeds or {}
        self._versions: dict[str, int] = {}
        self.devices_source = source("devices")
        self.users_source = source("users")
        self.published: dict[str, int] = {}
        """The version each save wrote, by registry."""

    def _read(self, name: str) -> str:
        with session(self._dsn) as conn:
            if name in self._seeds:
                seed_with(conn, Seed.from_file(name, self._seeds[name]), actor=self._actor)
            body, self._versions[name] = load_with(conn, name)
        return body

    def _save(self, name: str, body: str) -> None:
        if name not in self._versions:
            raise RegistryError(f"{source(name)}: read before it is written")
        self.published[name] = publish(
            self._dsn, name, body, expected_version=self._versions[name], actor=self._actor
        )
        self._versions[name] = self.published[name]

    def devices(self) -> DeviceRegistry:
        return parse_devices(self._read("devices"), self.devices_source)

    def users(self) -> UserRegistry:
        return parse_users(self._read("users"), self.users_source)

    def save_devices(self, registry: DeviceRegistry) -> None:
        self._save("devices", devices_text(registry))

    def save_users(self, registry: UserRegistry) -> None:
        self._save("users", users_text(registry))
