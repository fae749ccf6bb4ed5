"""``gatewayctl spool migrate --to postgresql`` on a real PostgreSQL: a local spool with
queued, held, delivered, erased and unreadable records (some over 1 MiB), idempotency
keys, a destroyed key epoch, an erasure ledger, an audit log and registries, moved and
then read back through a PgSpool; SIGKILLed at several points and run again; refused
while gatewayd holds the spool, and when the database's keystore has another key."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import ctl

from gateway.crypto.keys import load_master_key
from gateway.crypto.keystore import epoch_of
from gateway.crypto.pgkeystore import PgKeyStore
from gateway.identity import pgregistry
from gateway.ops.audit import AuditLog, audit_chain
from gateway.ops.chain import ChainEntry
from gateway.ops.pgchain import PgChainLog
from gateway.retention.ledger import erasure_ledger
from gateway.spool.pgqueries import CHUNK_SIZE
from gateway.spool.pgstore import PgSpool
from gateway.spool.records import NewRecord, Record, State, new_submission_id
from gateway.spool.store import Spool
from gateway.testing.sandbox import Sandbox, build_sandbox

MARKER = b"PLANTED-983205673214-\xe6\x96\xb0\xe5\xae\xbf"  # a 個人番号 and 新宿
CHANNEL = "online-application"
DAY = 86400.0
BIG = 1_300_000  # over 1 MiB: five 256 KiB chunks


def payload(n: int, size: int) -> bytes:
    head = f"record-{n:04d}:".encode()
    return (head + MARKER + bytes(range(256)) * (size // 256 + 1))[:size]


@dataclass
class Local:
    """A sandbox's local spool as it was before the migration, and where things are."""

    box: Sandbox
    master: bytes
    dsn: str
    records: dict[str, Record] = field(default_factory=dict)
    plain: dict[str, bytes] = field(default_factory=dict)
    """Plaintext of every live record that is readable."""
    tokens: list[tuple[str, str, str]] = field(default_factory=list)
    """(device, Idempotency-Key, record id)."""
    counts: Counter[str] = field(default_factory=Counter)
    bytes: int = 0
    access: list[tuple[int, str]] = field(default_factory=list)
    destroyed: str = ""
    unreadable: str = ""

    @property
    def config_path(self) -> Path:
        return self.box.config_path

    @property
    def spool_dir(self) -> Path:
        assert self.box.config is not None
        return self.box.config.spool.directory

    def sql(self, query: str, *params: object) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def migrate(self, capsys: pytest.CaptureFixture[str], *more: str) -> tuple[int, str, str]:
        return ctl(capsys, "spool", "migrate", "--to", "postgresql", "--config",
                   self.config_path, *more)  # fmt: skip

    def argv(self, *more: str) -> list[str]:
        return [sys.executable, "-m", "gateway.cli.gatewayctl", "spool", "migrate", "--to",
                "postgresql", "--config", str(self.config_path), *more]  # fmt: skip


async def _fill(box: Sandbox, local: Local) -> None:
    """Records in every state, an erased one in a destroyed epoch, a held one whose
    epoch was destroyed (unreadable), access entries, ledger and audit entries."""
    config = box.config
    assert config is not None
    spool = Spool(config.spool.directory, local.master, keystore=config.keystore_directory)
    await spool.open()
    now = time.time()
    ids: list[str] = []

    async def put(n: int, size: int, *, key: str | None = None, days: float = 7) -> str:
        record_id = new_submission_id()
        data = payload(n, size)
        token = spool.idempotency_token("tablet-01", CHANNEL, key) if key else None
        pending = spool.begin(record_id)
        pending.write(data)
        await spool.commit(
            pending,
            NewRecord(
                channel=CHANNEL, destination="dnp-relay", device_id="tablet-01",
                user_id="staff-001", received_at=now + n / 1000, expires_at=now + days * DAY,
                content_type="multipart/form-data; boundary=gw-test",
                body_sha256=hashlib.sha256(data).hexdigest(),
                content_sha256=hashlib.sha256(b"c" + data).hexdigest(),
                field_names=("application_id", "face_photo"), idempotency_key=token,
            ),
        )  # fmt: skip
        local.plain[record_id] = data
        if key:
            local.tokens.append(("tablet-01", key, record_id))
        ids.append(record_id)
        return record_id

    for n in range(20):
        size = BIG if n % 7 == 3 else 3000 + 997 * n
        await put(n, size, key=f"key-{n:03d}" if n % 2 else None)
    await put(20, 0, key="empty")  # an empty plaintext: one empty, final segment
    for record_id in ids[0:4]:
        await spool.mark_delivered(record_id, at=now + 1, receipt=f"receipt-{record_id[:6]}")
    for record_id in ids[4:7]:
        await spool.mark_held(record_id, at=now + 2, reason="upstream refused (HTTP 400)")
    await spool.note_failed_attempt(ids[8], "upstream timed out")
    erased = await spool.erase([*ids[0:2], ids[4], ids[9]], reason="operator", at=now + 3)
    gone = await put(30, 5000, days=30)  # its epoch is destroyed once it is erased
    erased += await spool.erase([gone], reason="retention", at=now + 4)
    local.destroyed = epoch_of(now + 30 * DAY)
    assert spool.keys.destroy(local.destroyed)
    local.unreadable = await put(31, 4000, days=40)  # held at the next start: key gone
    assert spool.keys.destroy(epoch_of(now + 40 * DAY))
    for entry in ("reader-1", "reader-2"):
        body = json.dumps({"user": "staff-001", "action": "status", "entry": entry})
        local.access.append((await spool.record_access(body), body))
    await spool.close()
    ledger = erasure_ledger(config.spool.directory)
    ledger.append_many(
        [{"submission_id": e.submission_id, "reason": e.reason, "state_before": e.state_before}
         for e in erased]
    )  # fmt: skip
    spool = Spool(config.spool.directory, local.master, keystore=config.keystore_directory)
    await spool.open()  # holds the unreadable record
    for record_id in ids:
        record = await spool.get(record_id)
        assert record is not None
        local.records[record_id] = record
        if record.erased_at is not None or record_id == local.unreadable:
            local.plain.pop(record_id, None)
    assert local.records[local.unreadable].state == State.HELD
    local.counts = +Counter(spool.counts)
    local.bytes = spool.bytes
    await spool.close()
    audit = AuditLog(config.audit_log, via="gatewayctl", actor="tester")
    for device in ("tablet-01", "pc-01"):
        audit.record("device.add", target=device)


@pytest.fixture
async def local(tmp_path: Path, pg_dsn: str, hermetic_cli: None) -> AsyncIterator[Local]:
    box = await build_sandbox(tmp_path, start_simulators=False)
    assert box.config is not None
    master = load_master_key(Path(box.config.spool.master_key))
    state = Local(box, master, pg_dsn)
    await _fill(box, state)
    dsn_file = tmp_path / "secrets" / "spool.dsn"
    dsn_file.write_text(pg_dsn + "\n", "utf-8")
    dsn_file.chmod(0o600)

    def switch(data: dict[str, Any]) -> None:
        data["spool"].update(backend="postgresql", dsn=str(dsn_file), node_id="node-a")

    box.edit_config(switch)
    box.reload_config()
    yield state


async def check_migrated(local: Local, tmp_path: Path) -> None:
    """The database holds exactly what the local spool held: every record's metadata,
    plaintext and idempotency token; the counts; the chains (the audit log's followed by
    one ``spool.migrate``); the keys, registries and waiting access entries."""
    config = local.box.config
    assert config is not None
    keys = PgKeyStore(local.dsn, local.master)
    pg = PgSpool(tmp_path / "check-stage", local.master, dsn=local.dsn, node_id="check", keys=keys)
    await pg.open()
    try:
        for record_id, record in local.records.items():
            assert await pg.get(record_id) == record
            if record_id in local.plain:
                got = b"".join(await pg.open_plaintext(record))
                assert got == local.plain[record_id]
        for device, key, record_id in local.tokens:
            found = await pg.find_idempotent(device, pg.idempotency_token(device, CHANNEL, key))
            assert found is not None and found.id == record_id
        assert +Counter(pg.counts) == local.counts
        assert pg.bytes == local.bytes
        assert keys.is_destroyed(local.destroyed)
    finally:
        await pg.close()
    assert local.sql("SELECT count(*) FROM gateway.records") == [(len(local.records),)]
    chunks = dict(local.sql("SELECT record_id, count(*) FROM gateway.record_chunks GROUP BY 1"))
    live = {i: r for i, r in local.records.items() if r.erased_at is None}
    assert chunks == {i: -(-r.ciphertext_size // CHUNK_SIZE) for i, r in live.items()}
    assert max(chunks.values()) >= 5  # the big ones
    assert local.sql(
        "SELECT count(*) FROM gateway.records WHERE claimed_by IS NOT NULL OR "
        "(state = 'erased') <> (wrapped_key IS NULL)"
    ) == [(0,)]
    ledger_file = list(erasure_ledger(config.spool.directory).entries())
    ledger = PgChainLog(local.dsn, "ledger")
    assert _same(list(ledger.entries()), ledger_file) and len(ledger_file) == 5
    audit_file = list(audit_chain(config.audit_log).entries())
    audit = PgChainLog(local.dsn, "audit")
    entries = list(audit.entries())
    assert _same(entries[: len(audit_file)], audit_file)
    extra = [e.body for e in entries[len(audit_file) :]]
    assert [(b["action"], b["outcome"]) for b in extra] == [("spool.migrate", "ok")]
    assert extra[0]["detail"]["records"] == len(local.records)
    for name, path in (("devices", config.auth.devices_file), ("users", config.auth.users_file)):
        assert pgregistry.load(local.dsn, name)[0] == path.read_text("utf-8")
    pending = local.sql("SELECT seq, body FROM gateway.access_pending WHERE node = 'node-a'")
    assert sorted(pending) == local.access


def _same(got: list[ChainEntry], want: list[ChainEntry]) -> bool:
    return [(e.seq, e.prev, e.at, dict(e.body), e.hash) for e in got] == [
        (e.seq, e.prev, e.at, dict(e.body), e.hash) for e in want
    ]


def _private(local: Local, text: str) -> None:
    """No record value, no key and no database password in what the command says."""
    assert MARKER.decode("utf-8", "replace")[:20] not in text
    assert local.master.hex() not in text
    password = next(p.split("=", 1)[1] for p in local.dsn.split() if p.startswith("password="))
    assert password not in text


# --------------------------------------------------------------------- the copy


async def test_migrate_moves_everything_and_verifies_it(
    local: Local, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One run moves everything; the database then serves every record as the local
    spool did; the local files stay; a second run changes nothing."""
    before = {p.name for p in local.spool_dir.iterdir()}
    code, out, err = local.migrate(capsys)
    assert code == 0, err
    _private(local, out + err)
    total = len(local.records)
    assert f"records     {total} ({total} copied now)" in out
    assert "1 by SHA-256 only" in out  # the unreadable one
    assert "spool.migrate recorded as seq 3" in out
    assert f"records: {total}/{total} copied" in err
    assert f"records: {total}/{total} verified" in err
    assert {p.name for p in local.spool_dir.iterdir()} >= before  # nothing removed
    await check_migrated(local, tmp_path)

    code, out, err = local.migrate(capsys)  # again: nothing to do, nothing written twice
    assert code == 0, err
    assert f"(0 copied now, {total} by an earlier run)" in out
    assert "spool.migrate recorded as seq 3" in out
    await check_migrated(local, tmp_path)


async def test_progress_every_n_records(local: Local, capsys: pytest.CaptureFixture[str]) -> None:
    """A line every N records on standard error, for the copy and for the checks."""
    code, _, err = local.migrate(capsys, "--progress-every", "5")
    assert code == 0, err
    total = len(local.records)
    marks = [*range(5, total, 5), total]
    copied = [line for line in err.splitlines() if line.endswith(" copied") and "records" in line]
    assert copied == [f"records: {n}/{total} copied" for n in marks]
    assert f"records: 10/{total} verified" in err


async def test_old_paths_given_by_options(
    local: Local, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--from-directory and --from-keystore name the local spool and keystore when the
    configuration's paths are already the new node's."""
    config = local.box.config
    assert config is not None
    old_spool, old_keys = tmp_path / "old-spool", tmp_path / "old-keystore"
    config.spool.directory.rename(old_spool)
    config.keystore_directory.rename(old_keys)
    code, out, err = local.migrate(
        capsys, "--from-directory", str(old_spool), "--from-keystore", str(old_keys)
    )
    assert code == 0, err
    assert f"remove the old spool directory {old_spool}" in out
    assert local.sql("SELECT count(*) FROM gateway.records") == [(len(local.records),)]


# ----------------------------------------------------------------- crash safety


def _run_until(local: Local, lines: int) -> list[str]:
    """Run the migration in a process of its own and SIGKILL it once it has printed
    ``lines`` progress lines; returns them (the process may have finished first)."""
    env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    proc = subprocess.Popen(
        local.argv("--progress-every", "2"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stderr is not None
    seen: list[str] = []
    with proc.stderr:
        while len(seen) < lines and (line := proc.stderr.readline()):
            seen.append(line.decode())
        proc.kill()
        proc.wait()
    return seen


async def test_killed_at_any_step_a_new_run_finishes_it(
    local: Local, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGKILLed after the keys, twice during the copy, during the checks, during the
    chains and at the very end, the migration is run again each time; the last run
    finishes it, and the database is as after one clean run: no record, chunk or entry
    twice, the audit entry of the migration written once."""
    copy = -(-len(local.records) // 2)  # progress lines of the copy, and of the checks
    # keys, registries, copy lines, access, check lines, ledger, audit
    points = (1, 3, 2 + copy // 2, 3 + copy + copy // 2, 3 + 2 * copy + 1, 3 + 2 * copy + 2)
    stages = [_run_until(local, lines) for lines in points]
    assert stages[0][-1].startswith("keys:") and stages[1][-1].startswith("records: 2/")
    assert stages[-1][-1].startswith("chain audit:")
    code, _, err = local.migrate(capsys)
    assert code == 0, err
    await check_migrated(local, tmp_path)


# --------------------------------------------------------------------- refusals


async def test_refused_while_gatewayd_holds_the_spool(
    local: Local, capsys: pytest.CaptureFixture[str]
) -> None:
    """A daemon's lock on the spool (as gatewayd holds it): exit 1, told to stop
    gatewayd, nothing copied; the failure is in the audit log file."""
    fd = os.open(local.spool_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, out, err = local.migrate(capsys)
    finally:
        os.close(fd)
    assert code == 1 and out == ""
    assert "in use by a running gatewayd: stop gatewayd" in err
    assert local.sql("SELECT to_regclass('gateway.records')") == [(None,)]
    config = local.box.config
    assert config is not None
    last = list(audit_chain(config.audit_log).entries())[-1].body
    assert (last["action"], last["outcome"]) == ("spool.migrate", "failed")


async def test_refused_when_the_database_has_another_key_for_an_epoch(
    local: Local, capsys: pytest.CaptureFixture[str]
) -> None:
    """The database's keystore made its own key for one of the epochs: stop, nothing
    overwritten, nothing else of the keystore written, no record copied."""
    epoch = epoch_of(next(iter(local.records.values())).expires_at)
    theirs = PgKeyStore(local.dsn, local.master)
    theirs.open()
    key = theirs.key_for(epoch)
    theirs.close()
    code, out, err = local.migrate(capsys)
    assert code == 1, out
    assert f"different key for epoch {epoch}: nothing overwritten" in err
    assert "step keys" in err
    again = PgKeyStore(local.dsn, local.master)
    again.open()
    try:
        assert again.get(epoch) == key and again.live() == [epoch] and again.destroyed() == []
    finally:
        again.close()
    assert local.sql("SELECT to_regclass('gateway.records')") == [(None,)]
    _private(local, out + err)


async def test_a_damaged_file_stops_the_copy_and_is_named(
    local: Local, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A record file that is not what its row says: the record is named, its batch not
    committed; once the file is put right, a new run finishes the migration."""
    live = sorted(i for i, r in local.records.items() if r.erased_at is None)
    victim = local.spool_dir / "records" / live[5]
    original = victim.read_bytes()
    victim.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    code, _, err = local.migrate(capsys, "--progress-every", "1")
    assert code == 1
    assert f"step records: record {live[5]}: its file's size or SHA-256" in err
    assert local.sql("SELECT count(*) FROM gateway.records WHERE id = %s", live[5]) == [(0,)]
    victim.write_bytes(original)
    code, _, err = local.migrate(capsys)
    assert code == 0, err
    await check_migrated(local, tmp_path)


async def test_a_registry_the_database_has_is_kept(
    local: Local, capsys: pytest.CaptureFixture[str]
) -> None:
    """A staff registry already in the database (another document) is not replaced."""
    body = pgregistry.empty_body("users")
    pgregistry.publish(local.dsn, "users", body, actor="someone")
    code, out, err = local.migrate(capsys)
    assert code == 0, err
    assert "users: the database's kept: it differs from" in out
    assert "devices: seeded from" in out
    assert pgregistry.load(local.dsn, "users") == (body, 1)


async def test_a_diverging_chain_in_the_database_stops_it(
    local: Local, capsys: pytest.CaptureFixture[str]
) -> None:
    """An audit chain in the database that is not a copy of this file: stop, the seq
    named, nothing appended to it."""
    other = PgChainLog(local.dsn, "audit")
    other.append({"action": "something.else"})
    other.close()
    code, _, err = local.migrate(capsys)
    assert code == 1
    assert "step chains (audit): the PostgreSQL chain differs from the file at seq 1" in err
    assert local.sql("SELECT count(*) FROM gateway.chain_entries WHERE chain='audit'") == [(1,)]


async def test_an_idempotency_token_taken_there_names_the_record(
    local: Local, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A record of the shared spool already holds one of the tokens (another spool's
    records were put there): the local record is named, its batch not committed."""
    device, key, record_id = local.tokens[0]
    keys = PgKeyStore(local.dsn, local.master)
    pg = PgSpool(tmp_path / "other", local.master, dsn=local.dsn, node_id="other", keys=keys)
    await pg.open()
    try:
        pending = pg.begin(new_submission_id())
        pending.write(b"another spool's record")
        now = time.time()
        await pg.commit(
            pending,
            NewRecord(
                channel=CHANNEL, destination="dnp-relay", device_id=device, user_id="staff-001",
                received_at=now, expires_at=now + 90 * DAY, content_type="text/plain",
                body_sha256="0" * 64, content_sha256="0" * 64, field_names=(),
                idempotency_key=pg.idempotency_token(device, CHANNEL, key),
            ),
        )  # fmt: skip
    finally:
        await pg.close()
    code, _, err = local.migrate(capsys, "--progress-every", "1")
    assert code == 1
    assert f"step records: record {record_id}: its idempotency token is already held" in err
    assert local.sql("SELECT count(*) FROM gateway.records WHERE id = %s", record_id) == [(0,)]
