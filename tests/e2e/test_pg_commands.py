"""gatewayctl with the shared backend (``[spool] backend = "postgresql"``): the audit
log is a table every node appends to (``audit verify``, ``audit list``, the entries of
gatewayctl's own commands), the certificate of erasure is read from the ledger table,
and ``keys status`` / ``keys rotate-master`` work on the keystore schema. The DSN's
password, planted, appears in no output."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from conftest import ctl
from psycopg import sql

from gateway.backends import build_ledger, build_spool
from gateway.crypto.keys import load_master_key
from gateway.crypto.keystore import epoch_of, master_key_id
from gateway.crypto.pgkeystore import ROTATION_REFUSED, PgKeyStore
from gateway.errors import KeystoreError
from gateway.ops.audit import audit_chain
from gateway.ops.metrics import Metrics
from gateway.retention.shared_ledger import SharedLedger
from gateway.retention.sweeper import Sweeper
from gateway.spool.records import NewRecord, new_submission_id
from gateway.testing.sandbox import Sandbox, build_sandbox

pytestmark = pytest.mark.usefixtures("hermetic_cli")

PLANTED = "Planted-Dsn-Pw-7Qx2-kv91"
DAY = 86400.0
T0 = 1_800_000_000.0  # 2027-01-15 17:00 JST
AUDIT = "postgresql:gateway.chain_entries[audit]"


@pytest.fixture
def planted_dsn(pg_dsn: str) -> str:
    """The test's database, reached as a role of its own whose password is planted."""
    params = dict(item.split("=", 1) for item in pg_dsn.split())
    role = f"planted_{params['dbname']}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(PLANTED)
            )
        )
        conn.execute(
            sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
                sql.Identifier(params["dbname"]), sql.Identifier(role)
            )
        )
    params.update(user=role, password=PLANTED)
    return " ".join(f"{key}={value}" for key, value in params.items())


@pytest.fixture
async def box(tmp_path: Path, planted_dsn: str) -> Sandbox:
    dsn_file = tmp_path / "spool.dsn"
    dsn_file.write_text(planted_dsn + "\n", "utf-8")
    os.chmod(dsn_file, 0o600)
    return await build_sandbox(
        tmp_path,
        overrides={
            "spool.backend": "postgresql",
            "spool.dsn": str(dsn_file),
            "spool.node_id": "node-a",
        },
        start_simulators=False,
    )


class Outputs:
    """Everything gatewayctl printed in a test, to look for the planted password."""

    def __init__(self, capsys: pytest.CaptureFixture[str], box: Sandbox) -> None:
        self._capsys = capsys
        self._config = box.config_path
        self.seen: list[str] = []

    def __call__(self, *argv: str | Path) -> tuple[int, str, str]:
        code, out, err = ctl(self._capsys, *argv, "--config", self._config)
        self.seen += [out, err]
        return code, out, err

    def assert_no_password(self) -> None:
        assert self.seen and not [text for text in self.seen if PLANTED in text]


@pytest.fixture
def gatewayctl(capsys: pytest.CaptureFixture[str], box: Sandbox) -> Iterator[Outputs]:
    outputs = Outputs(capsys, box)
    yield outputs
    outputs.assert_no_password()


def fingerprint(n: int) -> str:
    return "sha256:" + hashlib.sha256(f"device {n}".encode()).hexdigest()


def dsn_of(box: Sandbox) -> str:
    assert box.config is not None and box.config.spool.dsn is not None
    return Path(str(box.config.spool.dsn)).read_text("utf-8").strip()


# ----------------------------------------------------------------- the audit log


async def test_audit_verify_and_list_read_the_shared_audit_table(
    box: Sandbox, gatewayctl: Outputs
) -> None:
    code, out, err = gatewayctl("audit", "verify")
    assert code == 0, err  # no node wrote yet: an empty chain, intact (no "missing")
    assert "0 entries" in out and AUDIT in out
    code, out, _ = gatewayctl("audit", "list")
    assert (code, out) == (0, "")
    for n in (1, 2):
        code, _, err = gatewayctl(
            "device", "add", "--id", f"tablet-9{n}", "--group", "assist-tablet",
            "--fingerprint", fingerprint(n),
        )  # fmt: skip
        assert code == 0, err
    assert box.config is not None
    assert not box.config.audit_log.log.exists()  # the table, not the file
    code, out, _ = gatewayctl("audit", "verify", "--format", "json")
    document = json.loads(out)
    assert code == 0 and document["intact"] and document["entries"] == 2
    assert document["log"] == AUDIT and document["head"]["seq"] == 2
    code, out, _ = gatewayctl("audit", "list")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2
    assert all("device.add" in line and "gatewayctl" in line for line in lines)
    assert "tablet-91" in lines[0] and "tablet-92" in lines[1]
    code, out, _ = gatewayctl("audit", "list", "--last", "1", "--format", "json")
    [entry] = json.loads(out)
    assert (entry["seq"], entry["action"], entry["target"]) == (2, "device.add", "tablet-92")
    # gatewayctl's entries are the shared chain's: the daemon's AuditLog reads them
    chain = audit_chain(box.config.audit_log, dsn=dsn_of(box))
    assert [e.body["target"] for e in chain.entries()] == ["tablet-91", "tablet-92"]


async def test_a_tampered_audit_table_is_reported_by_seq_and_stops_changes(
    box: Sandbox, gatewayctl: Outputs
) -> None:
    for n in (1, 2, 3):
        code, _, err = gatewayctl(
            "device", "add", "--id", f"tablet-9{n}", "--group", "assist-tablet",
            "--fingerprint", fingerprint(n),
        )  # fmt: skip
        assert code == 0, err
    with psycopg.connect(dsn_of(box), autocommit=True) as conn:
        conn.execute(
            "UPDATE gateway.chain_entries SET body = replace(body, 'tablet-92', 'tablet-99') "
            "WHERE chain = 'audit' AND seq = 2"
        )
    code, _, err = gatewayctl("audit", "verify")
    assert code == 1 and "BROKEN at seq 2 (edited)" in err
    code, out, _ = gatewayctl("audit", "verify", "--format", "json")
    document = json.loads(out)
    assert code == 1 and not document["intact"]
    assert (document["seq"], document["reason"], document["log"]) == (2, "edited", AUDIT)
    code, _, err = gatewayctl("audit", "list")
    assert code == 1 and "seq 2" in err
    code, _, err = gatewayctl(
        "device", "add", "--id", "tablet-94", "--group", "assist-tablet",
        "--fingerprint", fingerprint(4),
    )  # fmt: skip
    assert code == 1 and "cannot record this change, so it was not made" in err


# ---------------------------------------------------------------- erasure report


async def test_the_erasure_report_is_read_from_the_shared_ledger(
    box: Sandbox, gatewayctl: Outputs, tmp_path: Path
) -> None:
    """Erasures made by a node (a PgSpool and its Sweeper, in this process), certified."""
    assert box.config is not None
    master = load_master_key(Path(str(box.config.spool.master_key)))
    spool = build_spool(box.config, master, clock=lambda: T0)
    await spool.open()
    ledger = build_ledger(box.config, clock=lambda: T0)
    assert isinstance(ledger, SharedLedger)  # the daemon's sweeper takes the nodes' lock
    sweeper = Sweeper(spool, ledger, Metrics(), clock=lambda: T0)
    try:
        received = T0 - 8 * DAY
        ids = []
        for n in range(3):
            pending = await spool.create(new_submission_id())
            pending.write(os.urandom(200))
            record = await spool.commit(
                pending,
                NewRecord(
                    channel="online-application", destination="dnp-relay",
                    device_id="tablet-01", user_id="staff-001", received_at=received + n,
                    expires_at=received + n + 7 * DAY, content_type="multipart/form-data",
                    body_sha256="0" * 64, content_sha256="1" * 64, field_names=(),
                    idempotency_key=None,
                ),
            )  # fmt: skip
            ids.append(record.id)
        assert await sweeper.sweep() == 3
    finally:
        await sweeper.close()
        await spool.close()
    code, out, err = gatewayctl("erasure-report", "--from", "2027-01-15", "--to", "2027-01-15")
    assert code == 0, err
    cert = json.loads(out)
    assert cert["total"] == 3 and sorted(r["submission_id"] for r in cert["records"]) == sorted(ids)
    assert cert["ledger"]["path"] == "postgresql:gateway.chain_entries[ledger]"
    assert cert["ledger"]["entries"] == 4  # three records, then their epoch
    epoch = epoch_of(received + 7 * DAY)
    assert {r["key_epoch"] for r in cert["records"]} == {epoch}
    assert all(r["epoch_destroyed_at"] for r in cert["records"])
    media = cert["sanitization_record"]["media"]
    assert media["key_epochs_pending"] == []
    assert "PostgreSQL" in media["type"]
    backup = media["data_backup"]
    assert "gateway_keys" in backup and "pg_dump --exclude-schema=gateway_keys" in backup
    assert "separate cluster" in backup and "7 days" in backup
    assert "--exclude-schema=gateway_keys" in media["data_backup_ja"]
    assert "3 erasures" in err and "(4 entries)" in err
    code, out, err = gatewayctl(
        "erasure-report", "--from", "2027-01-15", "--to", "2027-01-15", "--format", "csv"
    )
    assert code == 0 and "gateway_keys" in out
    pdf = tmp_path / "certificate.pdf"
    code, _, err = gatewayctl(
        "erasure-report", "--from", "2027-01-15", "--to", "2027-01-15",
        "--format", "pdf", "--output", pdf,
    )  # fmt: skip
    assert code == 0, err
    assert pdf.read_bytes().startswith(b"%PDF") and PLANTED.encode() not in pdf.read_bytes()


# ------------------------------------------------------------------------- keys


async def test_keys_status_and_rotate_master_on_the_keystore_schema(
    box: Sandbox, gatewayctl: Outputs, tmp_path: Path
) -> None:
    assert box.config is not None
    dsn = dsn_of(box)
    old = load_master_key(Path(str(box.config.spool.master_key)))
    code, _, err = gatewayctl("keys", "status")
    assert code == 1 and "postgresql:gateway_keys does not exist yet" in err
    node = PgKeyStore(dsn, old)  # a running node: its keystore open
    node.open()
    epoch = epoch_of(time.time() + 7 * DAY)
    epoch_key = node.key_for(epoch)
    try:
        code, out, err = gatewayctl("keys", "status", "--format", "json")
        assert code == 0, err
        status = json.loads(out)
        assert status == {
            "keystore": "postgresql:gateway_keys", "master_key_id": master_key_id(old),
            "live": [epoch], "passed": [], "destroyed": [],
        }  # fmt: skip
        new_file = tmp_path / "secrets" / "spool-master.new.key"
        code, _, _ = ctl_plain(gatewayctl, "keys", "new-master", "--out", new_file)
        assert code == 0
        new = load_master_key(new_file)
        code, _, err = gatewayctl("keys", "rotate-master", "--new", new_file, "--yes")
        assert code == 1 and ROTATION_REFUSED in err  # refused while a node runs
    finally:
        node.close()
    entry = list(audit_chain(box.config.audit_log, dsn=dsn).entries())[-1].body
    assert (entry["action"], entry["outcome"]) == ("keys.rotate_master", "failed")
    code, out, err = gatewayctl("keys", "rotate-master", "--new", new_file, "--yes")
    assert code == 0, err
    assert master_key_id(old) in out and master_key_id(new) in out
    assert old.hex() not in out + err and new.hex() not in out + err
    entry = list(audit_chain(box.config.audit_log, dsn=dsn).entries())[-1].body
    assert (entry["action"], entry["outcome"]) == ("keys.rotate_master", "ok")
    assert entry["detail"]["from_master_key_id"] == master_key_id(old)
    assert entry["detail"]["to_master_key_id"] == master_key_id(new)
    assert entry["detail"]["keystore"] == "postgresql:gateway_keys"
    code, out, err = gatewayctl("keys", "rotate-master", "--new", new_file, "--yes")
    assert code == 0 and "already under master key" in out, err
    with pytest.raises(KeystoreError, match="is under master key"):
        PgKeyStore(dsn, old).open()  # the old key is refused from now on
    rotated = PgKeyStore(dsn, new)
    rotated.open()
    try:
        assert rotated.get(epoch) == epoch_key  # the same epoch key, sealed anew
    finally:
        rotated.close()
    code, out, _ = gatewayctl("keys", "status")
    assert code == 0 and f"postgresql:gateway_keys, under master key {master_key_id(new)}" in out


def ctl_plain(outputs: Outputs, *argv: str | Path) -> tuple[int, str, str]:
    """A command without --config (keys new-master takes none)."""
    code, out, err = ctl(outputs._capsys, *argv)
    outputs.seen += [out, err]
    return code, out, err


async def test_check_config_has_no_keystore_directory_warning_on_the_shared_backend(
    box: Sandbox, gatewayctl: Outputs
) -> None:
    """A keystore directory inside the spool's is warned of with the local backend; with
    the shared one that directory is not used (the keystore is a schema)."""
    assert box.config is not None
    inside = box.config.spool.directory / "keystore"
    box.edit_config(lambda data: data["spool"].update(keystore=str(inside)))
    code, _, err = gatewayctl("check-config")
    assert code == 0, err
    assert "warning" not in err
    box.edit_config(lambda data: data["spool"].update(backend="sqlite"))
    box.edit_config(lambda data: data["spool"].pop("dsn"))
    code, _, err = gatewayctl("check-config")
    assert code == 0 and "spool.keystore: warning" in err, err
