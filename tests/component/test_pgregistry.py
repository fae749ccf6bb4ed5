"""The device and staff registries in a real PostgreSQL: publishing with optimistic
concurrency, seeding, followers on LISTEN/NOTIFY (two nodes hearing a revocation, a
follower whose connection is killed catching up), gatewayctl writing to the database,
and no password hash or DSN password in any error or log line."""

from __future__ import annotations

import asyncio
import io
import json
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import structlog
from conftest import actl

from gateway.errors import StorageUnavailable
from gateway.identity.passwords import hash_password, verify_password
from gateway.identity.pgfollower import FollowedRegistries, PgRegistryFollower, RegistryFeed
from gateway.identity.pgregistry import (
    RegistryConflict,
    Seed,
    load,
    publish,
    seed_if_absent,
    source,
    users_in_effect,
)
from gateway.identity.registry import (
    Device,
    DeviceRegistry,
    RegistryError,
    User,
    UserRegistry,
    devices_text,
    load_devices,
    load_users,
    parse_devices,
    users_text,
)
from gateway.testing.postgres import Postgres
from gateway.testing.sandbox import build_sandbox

FP_A = "sha256:" + "a" * 64
FP_B = "sha256:" + "b" * 64
WITHIN = 10.0
"""Seconds any wait may take before the test fails (a hang, not a slow machine)."""


@pytest.fixture(scope="module")
def staff_hash() -> str:
    """A planted secret: a staff password hash that must never be shown."""
    return hash_password("planted-secret-password", n=2**10)


def devices_doc(*, revoked: bool = False) -> str:
    return devices_text(
        DeviceRegistry(
            (
                Device("tablet-01", FP_A, "assist-tablet", revoked=revoked),
                Device("tablet-02", FP_B, "assist-tablet"),
            )
        )
    )


def users_doc(password_hash: str, *, enabled: bool = True, channels: tuple[str, ...] = ()) -> str:
    return users_text(UserRegistry((User("staff-001", password_hash, enabled, channels),)))


def write_text(path: str | Path, text: str) -> None:
    Path(path).write_text(text, "utf-8")


def row(dsn: str, name: str) -> tuple[Any, ...] | None:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT body, version, digest, updated_by FROM gateway.registries WHERE name = %s",
            (name,),
        ).fetchone()


# ------------------------------------------------------------------ publishing


def test_publish_and_load_round_trip_and_each_write_raises_the_version(pg_dsn: str) -> None:
    """An absent registry loads as the empty one at version 0; each publish stores the
    document as given, one version higher, with its digest and who wrote it."""
    body, version = load(pg_dsn, "devices")
    assert (parse_devices(body, "test").devices, version) == ((), 0)
    assert publish(pg_dsn, "devices", devices_doc(), expected_version=0, actor="alice") == 1
    assert load(pg_dsn, "devices") == (devices_doc(), 1)
    revoked = devices_doc(revoked=True)
    assert publish(pg_dsn, "devices", revoked, expected_version=1, actor="bob") == 2
    assert publish(pg_dsn, "devices", revoked, actor="carol") == 3  # no expectation: written
    stored = row(pg_dsn, "devices")
    assert stored is not None
    assert stored[0] == revoked and stored[1] == 3 and stored[3] == "carol"
    assert str(stored[2]).startswith("sha256:") and len(stored[2]) == 7 + 64
    assert load(pg_dsn, "users")[1] == 0  # each registry on its own


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("devices", '{"version": 1, "devices": [{"id": "tablet-01", "fingerprint": "x"}]}'),
        ("devices", "{not json"),
        ("users", '{"version": 2, "users": []}'),
        ("users", "twice"),  # one user twice, with the planted hash (made in the test)
    ],
)
def test_an_invalid_body_is_refused_with_the_files_message_and_the_row_is_unchanged(
    pg_dsn: str, tmp_path: Path, staff_hash: str, name: str, bad: str
) -> None:
    """The database refuses what the file would: the same message, naming the row
    instead of the file; the stored registry stays as it was."""
    if bad == "twice":
        entry = {"id": "staff-001", "password_hash": staff_hash, "channels": []}
        bad = json.dumps({"version": 1, "users": [entry, entry]})
    good = devices_doc() if name == "devices" else users_doc(staff_hash)
    publish(pg_dsn, name, good, actor="alice")
    before = row(pg_dsn, name)
    file = tmp_path / f"{name}.json"
    file.write_text(bad, "utf-8")
    with pytest.raises(RegistryError) as from_file:
        (load_devices if name == "devices" else load_users)(file)
    with pytest.raises(RegistryError) as from_database:
        publish(pg_dsn, name, bad, expected_version=1, actor="mallory")
    assert str(from_database.value) == str(from_file.value).replace(str(file), source(name))
    assert staff_hash not in str(from_database.value)
    assert row(pg_dsn, name) == before


def test_a_write_from_a_stale_version_is_refused_and_says_to_run_again(pg_dsn: str) -> None:
    """Two operators read version 1; the first writes version 2; the second, still at
    version 1, is refused and the first one's registry stays."""
    publish(pg_dsn, "devices", devices_doc(), actor="seed")
    _body, read_by_both = load(pg_dsn, "devices")
    first = devices_doc(revoked=True)
    assert publish(pg_dsn, "devices", first, expected_version=read_by_both, actor="alice") == 2
    with pytest.raises(RegistryConflict) as refused:
        publish(pg_dsn, "devices", devices_doc(), expected_version=read_by_both, actor="bob")
    message = str(refused.value)
    assert "changed by someone else" in message and "run the command again" in message
    assert "version 2" in message
    assert load(pg_dsn, "devices") == (first, 2)
    with pytest.raises(RegistryConflict):  # "must not exist yet" when it does
        publish(pg_dsn, "devices", first, expected_version=0, actor="carol")


def test_of_writers_racing_from_one_version_exactly_one_wins(pg_dsn: str) -> None:
    """Eight writers on eight connections all start from version 1 at once: the row lock
    lets one write version 2 and refuses the seven others."""
    publish(pg_dsn, "devices", devices_doc(), actor="seed")
    start = threading.Barrier(8)

    def write(index: int) -> int | str:
        start.wait(timeout=WITHIN)
        try:
            return publish(
                pg_dsn, "devices", devices_doc(revoked=True), expected_version=1, actor=f"op{index}"
            )
        except RegistryConflict:
            return "refused"

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(write, range(8)))
    assert sorted(outcomes, key=str) == [2] + ["refused"] * 7
    assert load(pg_dsn, "devices")[1] == 2


def test_a_registry_absent_on_both_sides_is_created_by_only_one_writer(pg_dsn: str) -> None:
    """Writers that all expect no registry yet (version 0): one creates it."""
    start = threading.Barrier(4)

    def write(_index: int) -> int | str:
        start.wait(timeout=WITHIN)
        try:
            return publish(pg_dsn, "devices", devices_doc(), expected_version=0, actor="op")
        except RegistryConflict:
            return "refused"

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(write, range(4)))
    assert sorted(outcomes, key=str) == [1] + ["refused"] * 3


def test_the_staff_registry_in_effect_is_the_tables_or_else_the_seed_file(
    pg_dsn: str, tmp_path: Path, staff_hash: str
) -> None:
    """Before any node wrote it (no table even: nothing is created by reading), the
    users file that would seed it; then the table's, wherever the file says."""
    file = tmp_path / "users.json"
    file.write_text(users_doc(staff_hash, channels=("from-file",)), "utf-8")
    users, where = users_in_effect(pg_dsn, file)
    assert where == str(file) and users.users[0].channels == ("from-file",)
    assert row_count(pg_dsn) is None
    publish(pg_dsn, "users", users_doc(staff_hash, channels=("from-table",)), actor="alice")
    users, where = users_in_effect(pg_dsn, file)
    assert where == "gateway.registries/users" and users.users[0].channels == ("from-table",)


def row_count(dsn: str) -> int | None:
    """Rows in gateway.registries, None when the table does not exist."""
    with psycopg.connect(dsn) as conn:
        if conn.execute("SELECT to_regclass('gateway.registries')").fetchone() == (None,):
            return None
        found = conn.execute("SELECT count(*) FROM gateway.registries").fetchone()
        return None if found is None else int(found[0])


def test_seeding_fills_an_absent_registry_once_and_never_overwrites(
    pg_dsn: str, staff_hash: str
) -> None:
    """The first seed is version 1; a later node's seed (another file) changes nothing,
    nor does a seed after the registry was edited."""
    assert seed_if_absent(pg_dsn, "devices", devices_doc())
    assert not seed_if_absent(pg_dsn, "devices", devices_doc(revoked=True))
    assert load(pg_dsn, "devices") == (devices_doc(), 1)
    publish(pg_dsn, "devices", devices_doc(revoked=True), expected_version=1, actor="alice")
    assert not seed_if_absent(pg_dsn, "devices", devices_doc())
    assert load(pg_dsn, "devices") == (devices_doc(revoked=True), 2)
    assert seed_if_absent(pg_dsn, "users", users_doc(staff_hash))  # each registry on its own


def test_a_broken_file_is_never_seeded_and_its_path_is_named(pg_dsn: str, tmp_path: Path) -> None:
    """A seed is checked like the file it comes from; the error names the file."""
    file = tmp_path / "devices.json"
    file.write_text('{"version": 1, "devices": [{"id": "BAD!", "fingerprint": "x"}]}', "utf-8")
    seed = Seed.from_file("devices", file)
    with pytest.raises(RegistryError, match="^" + re.escape(f"{file}: devices[0].id: must")):
        seed_if_absent(pg_dsn, seed.name, seed.body, where=seed.where)
    assert row(pg_dsn, "devices") is None
    assert Seed.from_file("devices", tmp_path / "missing.json").body == devices_text(
        DeviceRegistry()
    )


# ------------------------------------------------------------------ following


@dataclass
class Node:
    """One gateway node's follower, with what it was handed and when."""

    follower: PgRegistryFollower
    feed: RegistryFeed
    heard: list[tuple[str, int, float]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def on_change(self, name: str, body: str, version: int) -> None:
        self.feed(name, body, version)
        self.heard.append((name, version, time.monotonic()))
        self.changed.set()

    async def wait_for(self, name: str, version: int, *, exactly: bool = False) -> float:
        """When (time.monotonic) this node was handed ``version`` of ``name`` (or a later
        one, unless ``exactly``)."""

        def heard(held: int) -> bool:
            return held == version if exactly else held >= version

        async with asyncio.timeout(WITHIN):
            while not heard(self.feed.version(name)):
                self.changed.clear()  # no await since the check: nothing slips in between
                await self.changed.wait()
        return next(at for n, v, at in self.heard if n == name and heard(v))


class GatedSleep:
    """A backoff sleep that holds the follower until the test opens it."""

    def __init__(self) -> None:
        self.calls: list[float] = []
        self.entered = asyncio.Event()
        self.opened = asyncio.Event()

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        self.entered.set()
        await self.opened.wait()


Nodes = Callable[..., Awaitable[Node]]


@pytest.fixture
async def nodes(pg_dsn: str) -> AsyncIterator[Nodes]:
    """Start followers (``await nodes(...)``); every one is closed at the end."""
    started: list[Node] = []

    async def start(
        *, seeds: tuple[Seed, ...] = (), sleep: Callable[[float], Awaitable[object]] | None = None
    ) -> Node:
        feed = RegistryFeed()
        holder: list[Node] = []
        follower = PgRegistryFollower(
            pg_dsn,
            lambda name, body, version: holder[0].on_change(name, body, version),
            seeds=seeds,
            sleep=sleep or asyncio.sleep,
            poll_interval=30,
        )
        node = Node(follower, feed)
        holder.append(node)
        started.append(node)
        await follower.start()
        return node

    yield start
    for node in started:
        await node.follower.close()


async def test_start_seeds_from_the_files_once_and_delivers_both_registries(
    nodes: Nodes, tmp_path: Path, staff_hash: str, pg_dsn: str
) -> None:
    """The first node seeds both registries from its files and is handed both; a second
    node with other files is handed the first node's registries."""
    devices, users = tmp_path / "devices.json", tmp_path / "users.json"
    devices.write_text(devices_doc(), "utf-8")
    users.write_text(users_doc(staff_hash), "utf-8")
    first = await nodes(seeds=(Seed.from_file("devices", devices), Seed.from_file("users", users)))
    assert first.follower.connected
    assert first.follower.last_version == {"devices": 1, "users": 1}
    assert first.feed.latest["devices"] == (devices_doc(), 1)
    devices.write_text(devices_doc(revoked=True), "utf-8")  # another node's other file
    second = await nodes(seeds=(Seed.from_file("devices", devices),))
    assert second.feed.latest["devices"] == (devices_doc(), 1)
    assert load(pg_dsn, "devices") == (devices_doc(), 1)


async def test_two_nodes_hear_a_revocation_within_a_second(
    nodes: Nodes, pg_dsn: str, staff_hash: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A revocation published from a third connection reaches both nodes' callbacks well
    within one second of publish() returning."""
    seeds = (Seed("devices", devices_doc(), "seed"), Seed("users", users_doc(staff_hash), "seed"))
    first, second = await nodes(seeds=seeds), await nodes()
    delays: list[float] = []
    for round_ in range(5):
        revoked = round_ % 2 == 0
        version = await asyncio.to_thread(
            publish, pg_dsn, "devices", devices_doc(revoked=revoked), actor="alice"
        )
        returned = time.monotonic()
        for node in (first, second):
            heard = await node.wait_for("devices", version)
            delays.append(heard - returned)
            view = FollowedRegistries(node.feed)
            tablet = view.devices.by_id("tablet-01")
            assert tablet is not None and tablet.revoked is revoked
    worst = max(delays)
    with capsys.disabled():
        print(f"\nrevocation delay after publish() returned: worst {worst * 1000:.1f} ms")
    assert worst < 1.0
    assert first.follower.reconnects == second.follower.reconnects == 0


async def backend_of(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        found = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'gateway-registry' "
            "AND datname = current_database()"
        ).fetchall()
    assert len(found) == 1, found
    return int(found[0][0])


async def test_a_follower_whose_connection_is_killed_reconnects_and_catches_up(
    nodes: Nodes, pg_dsn: str
) -> None:
    """Its backend terminated, the follower says it is disconnected and waits its
    backoff; a revocation published meanwhile (its notification lost) is delivered once
    it is connected again."""
    publish(pg_dsn, "devices", devices_doc(), actor="seed")
    sleep = GatedSleep()
    node = await nodes(sleep=sleep)
    assert node.follower.last_version["devices"] == 1
    pid = await backend_of(pg_dsn)
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)
    async with asyncio.timeout(WITHIN):
        await sleep.entered.wait()
    assert not node.follower.connected
    assert node.follower.last_error == "OperationalError"
    version = await asyncio.to_thread(
        publish, pg_dsn, "devices", devices_doc(revoked=True), actor="alice"
    )
    assert node.feed.version("devices") == 1  # not heard: disconnected
    sleep.opened.set()
    await node.wait_for("devices", version)
    assert node.follower.connected
    assert node.follower.reconnects == 1
    assert node.follower.last_version["devices"] == version
    assert sleep.calls == [0.1]
    tablet = FollowedRegistries(node.feed).devices.by_id("tablet-01")
    assert tablet is not None and tablet.revoked
    assert await backend_of(pg_dsn) != pid


async def test_a_follower_retries_with_a_doubling_backoff_while_the_database_refuses(
    nodes: Nodes, pg_dsn: str, postgres: Postgres
) -> None:
    """While its database cannot be reached the follower keeps trying, each wait twice
    the last; it catches up once the database is back."""
    publish(pg_dsn, "devices", devices_doc(), actor="seed")
    waits: list[float] = []
    resumed = asyncio.Event()
    blocked = asyncio.Event()

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 3:
            blocked.set()
            await resumed.wait()

    node = await nodes(sleep=sleep)
    name = psycopg.conninfo.conninfo_to_dict(pg_dsn)["dbname"]
    with psycopg.connect(postgres.dsn(), autocommit=True) as admin:
        admin.execute(f"ALTER DATABASE {name} WITH ALLOW_CONNECTIONS false")
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )
        async with asyncio.timeout(WITHIN):
            await blocked.wait()
        admin.execute(f"ALTER DATABASE {name} WITH ALLOW_CONNECTIONS true")
    assert waits == [0.1, 0.2, 0.4]
    assert not node.follower.connected
    version = await asyncio.to_thread(
        publish, pg_dsn, "devices", devices_doc(revoked=True), actor="alice"
    )
    resumed.set()
    await node.wait_for("devices", version)
    assert node.follower.connected and node.follower.reconnects == 1


async def test_a_registry_restored_to_an_older_version_is_followed_all_the_same(
    nodes: Nodes, pg_dsn: str
) -> None:
    """The table is the registry: a row set back to an older version (a database
    restored from a backup) is delivered too, not ignored until it passes the old one."""
    publish(pg_dsn, "devices", devices_doc(), actor="seed")
    publish(pg_dsn, "devices", devices_doc(revoked=True), actor="alice")
    node = await nodes()
    assert node.feed.version("devices") == 2
    with psycopg.connect(pg_dsn) as conn:  # what a restore does: no publish(), no NOTIFY
        conn.execute(
            "UPDATE gateway.registries SET body = %s, version = 1 WHERE name = 'devices'",
            (devices_doc(),),
        )
        conn.execute("NOTIFY gateway_registry, 'users:1'")  # any wake-up: both are compared
    await node.wait_for("devices", 1, exactly=True)
    tablet = FollowedRegistries(node.feed).devices.by_id("tablet-01")
    assert tablet is not None and not tablet.revoked


async def test_close_stops_the_follower_and_its_connection(nodes: Nodes, pg_dsn: str) -> None:
    """After close() no connection of the follower is left and nothing more is heard."""
    node = await nodes(seeds=(Seed("devices", devices_doc(), "seed"),))
    await node.follower.close()
    await node.follower.close()  # twice is harmless
    assert not node.follower.connected
    with psycopg.connect(pg_dsn) as conn:
        left = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'gateway-registry'"
            " AND datname = current_database()"
        ).fetchone()
    assert left == (0,)
    publish(pg_dsn, "devices", devices_doc(revoked=True), actor="alice")
    assert node.feed.version("devices") == 1


async def test_an_unreachable_database_fails_start_without_its_password(
    postgres: Postgres,
) -> None:
    """start() with a wrong password or a closed port raises StorageUnavailable naming
    neither the DSN nor its password; nothing is left running."""
    wrong = postgres.dsn().replace(postgres.password, "wrong-" + postgres.password)
    closed = postgres.dsn().replace(f"port={postgres.port}", "port=1")
    for dsn in (wrong, closed):
        follower = PgRegistryFollower(dsn, lambda *_: None)
        with pytest.raises(StorageUnavailable) as refused:
            await follower.start()
        assert postgres.password not in str(refused.value)
        assert not follower.connected
        await follower.close()
    with pytest.raises(StorageUnavailable) as refused_publish:
        publish(wrong, "devices", devices_doc(), actor="alice")
    assert postgres.password not in str(refused_publish.value)


# ------------------------------------------------------------------ the daemon's view


def test_the_view_keeps_the_last_good_users_and_still_applies_a_revocation(
    staff_hash: str,
) -> None:
    """A users document this node cannot use (a channel it lacks) is reported once,
    without the hash, and the last good users stay; a device revocation in the same
    round is applied all the same."""
    feed = RegistryFeed()
    feed("devices", devices_doc(), 1)
    feed("users", users_doc(staff_hash, channels=("online-application",)), 1)
    errors: list[str] = []
    view = FollowedRegistries(
        feed,
        on_error=errors.append,
        validate_users=lambda users: [
            f"{u.id}: unknown channel"
            for u in users.users
            if not set(u.channels or ()) <= {"online-application"}
        ],
    )
    assert view.refresh() == []
    feed("users", users_doc(staff_hash, channels=("nowhere",)), 2)
    feed("devices", devices_doc(revoked=True), 2)
    problems = view.refresh()
    assert problems == ["staff-001: unknown channel"] == errors
    assert all(staff_hash not in p for p in problems)
    user = view.users.get("staff-001")
    assert user is not None and user.channels == ("online-application",)
    tablet = view.devices.by_id("tablet-01")
    assert tablet is not None and tablet.revoked
    assert view.versions == {"devices": 2, "users": 1}
    assert view.refresh() == []  # reported once per version
    assert view.refresh(force=True) == ["staff-001: unknown channel"]
    feed("users", users_doc(staff_hash, enabled=False, channels=("online-application",)), 3)
    view.refresh()
    disabled = view.users.get("staff-001")
    assert disabled is not None and not disabled.enabled


def test_a_view_of_a_registry_that_cannot_be_used_is_refused_at_once() -> None:
    """Built over a document that cannot be used (a reload, a start), the view raises
    as the file watcher does over a broken file; an empty feed is two empty registries."""
    assert FollowedRegistries(RegistryFeed()).devices.devices == ()
    feed = RegistryFeed()
    feed("devices", '{"version": 1, "devices": "nope"}', 4)
    with pytest.raises(RegistryError, match=r"^gateway\.registries/devices: expected"):
        FollowedRegistries(feed)


# ------------------------------------------------------------------ gatewayctl


@pytest.fixture
async def shared_sandbox(tmp_path: Path, pg_dsn: str) -> Any:
    """A sandbox configuration with ``[spool] backend = "postgresql"`` (its DSN in a
    0600 file); no simulator is started."""
    dsn_file = tmp_path / "spool-dsn.conf"
    dsn_file.write_text(pg_dsn + "\n", "utf-8")
    dsn_file.chmod(0o600)
    return await build_sandbox(
        tmp_path / "box",
        start_simulators=False,
        overrides={"spool.backend": "postgresql", "spool.dsn": str(dsn_file)},
    )


@pytest.mark.usefixtures("hermetic_cli")
async def test_gatewayctl_revokes_in_the_database_and_every_follower_hears_it(
    shared_sandbox: Any, nodes: Nodes, pg_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """With the shared backend ``device revoke`` and ``user disable`` write the database
    (seeded from the files first), not the files; a node's follower is handed registries
    in which the device is revoked and the user disabled."""
    config = shared_sandbox.config
    devices_file, users_file = config.auth.devices_file, config.auth.users_file
    files_before = (devices_file.read_bytes(), users_file.read_bytes())
    node = await nodes()  # a node already running: nothing seeded yet
    assert node.feed.latest == {}
    argv = ("--config", shared_sandbox.config_path)
    code, out, err = await actl(capsys, "device", "revoke", *argv, "--id", "tablet-01")
    assert code == 0, err
    assert "tablet-01 revoked" in out and "hear of it" in out
    await node.wait_for("devices", 2)  # version 1: the seed; version 2: the revocation
    view = FollowedRegistries(node.feed)
    tablet = view.devices.by_id("tablet-01")
    assert tablet is not None and tablet.revoked
    assert {d.id for d in view.devices.devices} == {
        d.id for d in load_devices(devices_file).devices
    }
    code, out, err = await actl(capsys, "user", "disable", *argv, "--id", "staff-001")
    assert code == 0, err
    await node.wait_for("users", 2)
    staff = FollowedRegistries(node.feed).users.get("staff-001")
    assert staff is not None and not staff.enabled
    code, out, _err = await actl(capsys, "device", "list", *argv, "--format", "json")
    assert code == 0 and '"revoked": true' in out
    assert (devices_file.read_bytes(), users_file.read_bytes()) == files_before
    code, _out, err = await actl(capsys, "device", "revoke", *argv, "--id", "tablet-99")
    assert code == 1 and "no device 'tablet-99' in gateway.registries/devices" in err


@pytest.mark.usefixtures("hermetic_cli")
async def test_gatewayctl_adds_a_user_and_changes_a_password_in_the_database(
    shared_sandbox: Any,
    nodes: Nodes,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``user add`` and ``user passwd`` store their scrypt hashes in the shared registry
    (each a new version every node is handed), and print neither hash nor password."""
    node = await nodes()
    argv = ("--config", shared_sandbox.config_path)
    monkeypatch.setattr("sys.stdin", io.StringIO("first-long-password\n"))
    code, out, err = await actl(
        capsys,
        "user",
        "add",
        *argv,
        "--id",
        "staff-new",
        "--channel",
        "online-application",
        "--password-stdin",
    )
    assert code == 0, err
    await node.wait_for("users", 2)
    added = FollowedRegistries(node.feed).users.get("staff-new")
    assert added is not None and verify_password("first-long-password", added.password_hash)
    monkeypatch.setattr("sys.stdin", io.StringIO("second-long-password\n"))
    code, out2, err2 = await actl(
        capsys, "user", "passwd", *argv, "--id", "staff-new", "--password-stdin"
    )
    assert code == 0, err2
    await node.wait_for("users", 3)
    changed = FollowedRegistries(node.feed).users.get("staff-new")
    assert changed is not None and verify_password("second-long-password", changed.password_hash)
    shown = out + err + out2 + err2
    assert added.password_hash not in shown and changed.password_hash not in shown
    assert "long-password" not in shown


@pytest.mark.usefixtures("hermetic_cli")
async def test_gatewayctl_never_shows_a_stored_hash_or_the_dsn_password(
    shared_sandbox: Any,
    pg_dsn: str,
    postgres: Postgres,
    staff_hash: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A registry edited by hand into something unusable (a planted hash in it) is
    refused by gatewayctl naming the row and the entry, never the hash; a database that
    refuses the password is said without the DSN."""
    planted = f'{{"version": 1, "users": [{{"id": "staff-001", "password_hash": "{staff_hash}", '
    planted += '"enabled": "yes"}]}'
    with psycopg.connect(pg_dsn) as conn:  # what publish() would refuse, put there by hand
        conn.execute(
            "CREATE SCHEMA IF NOT EXISTS gateway; CREATE TABLE gateway.registries (name text "
            "PRIMARY KEY, body text NOT NULL, version bigint NOT NULL, digest text NOT NULL, "
            "updated_at timestamptz NOT NULL DEFAULT now(), updated_by text NOT NULL)"
        )
        conn.execute(
            "INSERT INTO gateway.registries VALUES ('users', %s, 7, 'x', now(), 'hand')",
            (planted,),
        )
    argv = ("--config", shared_sandbox.config_path)
    with structlog.testing.capture_logs() as logs:
        code, out, err = await actl(capsys, "user", "disable", *argv, "--id", "staff-001")
    assert code == 1
    assert "gateway.registries/users: users[0].enabled: must be true or false" in err
    assert staff_hash not in out + err + repr(logs)
    assert load(pg_dsn, "users")[1] == 7
    write_text(shared_sandbox.config.spool.dsn, pg_dsn.replace(postgres.password, "not-the-pw"))
    code, out, err = await actl(capsys, "device", "list", *argv)
    assert code == 1 and "database is unavailable" in err
    assert postgres.password not in out + err and "not-the-pw" not in err


async def test_follower_logs_name_versions_never_documents_or_the_dsn(
    nodes: Nodes, pg_dsn: str, postgres: Postgres, staff_hash: str
) -> None:
    """Everything the follower logs while seeding, hearing a change, losing its
    connection and coming back holds no document (hash) and no DSN password."""
    sleep = GatedSleep()
    with structlog.testing.capture_logs() as logs:
        node = await nodes(seeds=(Seed("users", users_doc(staff_hash), "seed"),), sleep=sleep)
        version = await asyncio.to_thread(
            publish, pg_dsn, "users", users_doc(staff_hash, enabled=False), actor="alice"
        )
        await node.wait_for("users", version)
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (await backend_of(pg_dsn),))
        async with asyncio.timeout(WITHIN):
            await sleep.entered.wait()
        again = await asyncio.to_thread(
            publish, pg_dsn, "users", users_doc(staff_hash), actor="alice"
        )
        sleep.opened.set()
        await node.wait_for("users", again)
    events = [entry["event"] for entry in logs]
    assert "registry_seeded" in events and "registry_changed" in events
    assert "registry_follower_lost" in events and "registry_follower_reconnected" in events
    assert staff_hash not in repr(logs) and postgres.password not in repr(logs)
