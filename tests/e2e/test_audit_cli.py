"""The operations audit log: what ``gatewayctl`` and ``gatewayd`` write to it, and what
``gatewayctl audit verify|list`` make of it (docs/contract.md, "Promises": "append-only and
hash-chained"). Commands are driven in-process; a daemon runs in the test's event loop,
so commands that talk to it run in a thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import Running, actl, ctl, start_gateway

from gateway import __version__
from gateway.cli import gatewayctl
from gateway.config import GatewayConfig
from gateway.crypto.keys import load_master_key, resolve_secret_path
from gateway.identity.registry import load_devices, load_users
from gateway.ops.chain import ChainEntry, HashChainLog
from gateway.spool.store import Spool
from gateway.testing.sandbox import Sandbox

OPERATOR = "operator-yamada"
PLANTED_PASSWORD = "Planted-Pw-q7Zx-41c9-horse"
PLANTED_PASSWORD_2 = "Second-Planted-Pw-k3Vv-88"


@pytest.fixture(autouse=True)
def _hermetic(hermetic_cli: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A known sudo caller (see conftest.hermetic_cli for the rest)."""
    monkeypatch.setenv("SUDO_USER", OPERATOR)


def stdin(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(text))


def config_of(sandbox: Sandbox) -> GatewayConfig:
    assert sandbox.config is not None
    return sandbox.config


def audit_paths(sandbox: Sandbox) -> tuple[Path, Path]:
    where = config_of(sandbox).audit_log
    assert where.anchor is not None
    return where.log, where.anchor


def entries(sandbox: Sandbox) -> list[ChainEntry]:
    """The audit log's entries, verified as read."""
    log, anchor = audit_paths(sandbox)
    return list(HashChainLog(log, anchor=anchor).entries())


def fingerprint(n: int) -> str:
    return "sha256:" + hashlib.sha256(f"device {n}".encode()).hexdigest()


def add_device(
    capsys: pytest.CaptureFixture[str], sandbox: Sandbox, device_id: str, n: int
) -> None:
    code, _out, err = ctl(
        capsys,
        "device",
        "add",
        "--config",
        sandbox.config_path,
        "--id",
        device_id,
        "--group",
        "assist-tablet",
        "--fingerprint",
        fingerprint(n),
    )
    assert code == 0, err


def assert_recent(at: str) -> None:
    moment = datetime.fromisoformat(at.replace("Z", "+00:00"))
    assert abs(moment.timestamp() - time.time()) < 60, at


# --------------------------------------------------------- what each command records


async def test_each_state_changing_command_appends_exactly_one_entry(
    sandbox: Sandbox, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """device add/revoke, user add/passwd/disable: one entry each, with who, what and when."""
    config = str(sandbox.config_path)
    fp = fingerprint(1)
    steps: list[tuple[list[str], str, str, str | None]] = [
        (
            [
                "device",
                "add",
                "--id",
                "tablet-new",
                "--group",
                "assist-tablet",
                "--fingerprint",
                fp,
            ],
            "device.add",
            "tablet-new",
            None,
        ),
        (["device", "revoke", "--id", "tablet-01"], "device.revoke", "tablet-01", None),
        (
            [
                "user",
                "add",
                "--id",
                "staff-900",
                "--channel",
                "group:assist-desk",
                "--password-stdin",
            ],
            "user.add",
            "staff-900",
            PLANTED_PASSWORD,
        ),
        (
            ["user", "passwd", "--id", "staff-001", "--password-stdin"],
            "user.passwd",
            "staff-001",
            PLANTED_PASSWORD_2,
        ),
        (["user", "disable", "--id", "staff-002"], "user.disable", "staff-002", None),
    ]
    for count, (argv, action, target, password) in enumerate(steps, start=1):
        if password is not None:
            stdin(monkeypatch, password + "\n")
        code, _out, err = ctl(capsys, *argv[:2], "--config", config, *argv[2:])
        assert code == 0, (action, err)
        log = entries(sandbox)
        assert len(log) == count, action
        body = log[-1].body
        assert body["action"] == action
        assert body["target"] == target
        assert body["outcome"] == "ok"
        assert body["via"] == "gatewayctl"
        assert body["actor"] == OPERATOR
        assert body["uid"] == os.geteuid()
        assert body["host"]
        assert_recent(log[-1].at)
        if action == "device.add":
            assert body["detail"] == {"group": "assist-tablet", "fingerprint": fp}
        elif action == "user.add":
            assert body["detail"] == {"channels": ["group:assist-desk"]}
        elif action in ("device.revoke", "user.disable"):  # no daemon runs on this spool
            assert body["detail"] == {
                "daemon": "gatewayd is not running; it reads the change when it starts"
            }
        else:
            assert not body.get("detail"), body


async def test_actor_without_sudo_is_the_login_name(
    sandbox: Sandbox, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not run through sudo: the actor is the process's login name."""
    monkeypatch.delenv("SUDO_USER")
    monkeypatch.setenv("LOGNAME", "login-suzuki")
    code, _out, err = ctl(
        capsys, "user", "disable", "--config", sandbox.config_path, "--id", "staff-002"
    )
    assert code == 0, err
    assert entries(sandbox)[-1].body["actor"] == "login-suzuki"


async def test_actor_without_sudo_or_login_name_is_the_uid(
    sandbox: Sandbox, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No SUDO_USER, no login variables, no passwd entry: the actor is "uid:N"."""
    for name in ("SUDO_USER", "LOGNAME", "USER", "LNAME", "USERNAME"):
        monkeypatch.delenv(name, raising=False)

    def no_entry(uid: int) -> Any:
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr("pwd.getpwuid", no_entry)
    code, _out, err = ctl(
        capsys, "user", "disable", "--config", sandbox.config_path, "--id", "staff-002"
    )
    assert code == 0, err
    assert entries(sandbox)[-1].body["actor"] == f"uid:{os.geteuid()}"


async def test_a_failing_command_records_outcome_failed_with_the_reason(
    sandbox: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    """Revoking an unknown device exits 1 and writes outcome "failed" with a reason."""
    code, _out, err = ctl(
        capsys, "device", "revoke", "--config", sandbox.config_path, "--id", "no-such-tablet"
    )
    assert code == 1
    assert "no-such-tablet" in err
    [entry] = entries(sandbox)
    assert entry.body["action"] == "device.revoke"
    assert entry.body["target"] == "no-such-tablet"
    assert entry.body["outcome"] == "failed"
    assert entry.body["actor"] == OPERATOR
    assert "no device" in entry.body["detail"]["reason"]


async def test_read_only_commands_write_nothing(
    sandbox: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    """device list, spool list/show, audit verify/list and check-config leave the log alone."""
    config = config_of(sandbox)
    spool = Spool(
        config.spool.directory,
        load_master_key(resolve_secret_path(config.spool.master_key, Path("/"))),
    )
    await spool.open()  # an (empty) spool index for spool list to read
    await spool.close()
    log, anchor = audit_paths(sandbox)
    path = sandbox.config_path
    for argv in (["device", "list"], ["check-config"]):
        code, _out, err = ctl(capsys, *argv, "--config", path)
        assert code == 0, (argv, err)
    for argv in (["audit", "verify"], ["audit", "list"]):  # no log yet: said, not passed
        code, _out, err = ctl(capsys, *argv, "--config", path)
        assert code == 1, (argv, err)
        assert f"gatewayctl: the audit log {log} does not exist" in err
    assert not log.exists() and not anchor.exists()  # not even created
    add_device(capsys, sandbox, "tablet-new", 1)
    before = log.read_bytes(), anchor.read_bytes()
    for argv in (
        ["device", "list"],
        ["spool", "list"],
        ["spool", "list", "--state", "all", "--format", "json"],
        ["audit", "verify"],
        ["audit", "list"],
        ["check-config"],
    ):
        code, _out, err = ctl(capsys, *argv[:2], "--config", path, *argv[2:])
        assert code == 0, (argv, err)
    code, _out, err = ctl(capsys, "spool", "show", "--config", path, "0" * 32)
    assert code == 1, err  # an unknown record: an error, and still nothing written
    assert (log.read_bytes(), anchor.read_bytes()) == before


async def test_passwords_never_reach_the_audit_log_or_the_output(
    sandbox: Sandbox, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stdin password of user add/passwd is not in the log, the anchor or any output."""
    config = sandbox.config_path
    short = "Zq9-short"  # refused by the rule: the failure's reason must not quote it
    outputs: list[str] = []
    for argv, password in (
        (["user", "add", "--id", "staff-900", "--channel", "window-reception"], PLANTED_PASSWORD),
        (["user", "passwd", "--id", "staff-900"], PLANTED_PASSWORD_2),
        (["user", "passwd", "--id", "staff-900"], short),
    ):
        stdin(monkeypatch, password + "\n")
        code, out, err = ctl(capsys, *argv[:2], "--config", config, *argv[2:], "--password-stdin")
        assert code == (2 if password == short else 0), err  # a refused password: usage
        outputs += [out, err]
    code, out, err = ctl(capsys, "audit", "list", "--config", config)
    assert code == 0, err
    outputs += [out, err]
    log, anchor = audit_paths(sandbox)
    assert [e.body["outcome"] for e in entries(sandbox)] == ["ok", "ok", "failed"]
    stored = log.read_bytes() + anchor.read_bytes()
    for secret in (PLANTED_PASSWORD, PLANTED_PASSWORD_2, short):
        assert secret.encode() not in stored, secret
        assert json.dumps(secret).encode() not in stored, secret
        for text in outputs:
            assert secret not in text, secret


# ----------------------------------------------------------------------- audit verify


def _edit_line_2(lines: list[bytes]) -> list[bytes]:
    entry = json.loads(lines[1])
    entry["body"]["target"] = "somebody-else"
    lines[1] = json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()
    return lines


def _rehash_last(lines: list[bytes]) -> list[bytes]:
    """Edit the last entry and recompute its hash: a consistent chain, but not the anchor's."""
    entry = json.loads(lines[-1])
    entry["body"]["outcome"] = "failed"
    record = {k: entry[k] for k in ("seq", "prev", "at", "body")}
    canonical = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    entry["hash"] = hashlib.sha256(canonical.encode()).hexdigest()
    lines[-1] = json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()
    return lines


def _delete_line_2(lines: list[bytes]) -> list[bytes]:
    del lines[1]
    return lines


def _swap_lines_2_3(lines: list[bytes]) -> list[bytes]:
    lines[1], lines[2] = lines[2], lines[1]
    return lines


def _cut_last(lines: list[bytes]) -> list[bytes]:
    return lines[:-1]


def tamper(log: Path, change: Callable[[list[bytes]], list[bytes]]) -> None:
    lines = log.read_bytes().splitlines()
    log.write_bytes(b"".join(line + b"\n" for line in change(lines)))


async def test_audit_verify_accepts_an_intact_log_and_counts_its_entries(
    sandbox: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    for n in range(1, 5):
        add_device(capsys, sandbox, f"tablet-new-{n}", n)
    code, out, err = ctl(capsys, "audit", "verify", "--config", sandbox.config_path)
    assert code == 0, err
    assert "intact: 4 entries" in out


@pytest.mark.parametrize(
    ("change", "line", "reason"),
    [
        (_edit_line_2, 2, "edited"),
        (_delete_line_2, 2, "deleted_or_reordered"),
        (_swap_lines_2_3, 2, "deleted_or_reordered"),
        (_cut_last, None, "truncated"),
        (_rehash_last, 4, "edited"),
    ],
    ids=["edited", "deleted-middle", "swapped", "last-cut-off", "last-rehashed"],
)
async def test_audit_verify_names_the_line_and_the_reason_of_a_tampered_log(
    sandbox: Sandbox,
    capsys: pytest.CaptureFixture[str],
    change: Callable[[list[bytes]], list[bytes]],
    line: int | None,
    reason: str,
) -> None:
    """Edit, delete, reorder, cut off: exit 1, and stderr says where and why."""
    for n in range(1, 5):
        add_device(capsys, sandbox, f"tablet-new-{n}", n)
    log, _anchor = audit_paths(sandbox)
    tamper(log, change)
    code, out, err = ctl(capsys, "audit", "verify", "--config", sandbox.config_path)
    assert code == 1
    assert out == ""
    assert err.startswith("gatewayctl: audit log BROKEN"), err
    assert f"({reason})" in err
    if line is None:
        assert " line " not in err, err
    else:
        assert f"at line {line} ({reason})" in err
    assert "Traceback" not in err


# ---------------------------------------------------- a broken log and the protective


def _torn_tail(log: Path, anchor: Path) -> None:
    with log.open("ab") as handle:
        handle.write(b'{"at":"2026-01-01T00:00:00.000000Z","body":{')


def _edited_last(log: Path, anchor: Path) -> None:
    text = log.read_bytes()
    head, last = text.rstrip(b"\n").rsplit(b"\n", 1)
    log.write_bytes(head + b"\n" + last.replace(b'"outcome":"ok"', b'"outcome":"no"') + b"\n")


def _anchor_removed(log: Path, anchor: Path) -> None:
    anchor.unlink()


@pytest.mark.parametrize(
    "breakage", [_torn_tail, _edited_last, _anchor_removed], ids=["torn", "edited", "no-anchor"]
)
async def test_a_broken_log_stops_changes_but_not_protective_ones(
    sandbox: Sandbox,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    breakage: Callable[[Path, Path], None],
) -> None:
    """device/user add and user allow are refused unrecorded; revoke, disable and deny
    happen, exit 3, warned."""
    config = config_of(sandbox)
    path = sandbox.config_path
    add_device(capsys, sandbox, "tablet-new", 1)
    add_device(capsys, sandbox, "tablet-new-2", 2)
    log, anchor = audit_paths(sandbox)
    breakage(log, anchor)
    broken = log.read_bytes()
    devices_before = config.auth.devices_file.read_bytes()
    users_before = config.auth.users_file.read_bytes()

    code, _out, err = ctl(
        capsys,
        "device",
        "add",
        "--config",
        path,
        "--id",
        "tablet-refused",
        "--group",
        "assist-tablet",
        "--fingerprint",
        fingerprint(3),
    )
    assert code != 0
    assert "not made" in err
    assert config.auth.devices_file.read_bytes() == devices_before

    stdin(monkeypatch, PLANTED_PASSWORD + "\n")
    code, _out, err = ctl(
        capsys, "user", "add", "--config", path, "--id", "staff-900",
        "--channel", "window-reception", "--password-stdin",
    )  # fmt: skip
    assert code != 0
    assert "not made" in err
    assert config.auth.users_file.read_bytes() == users_before

    code, out, err = ctl(capsys, "device", "revoke", "--config", path, "--id", "tablet-01")
    assert code == 3, err
    assert "revoked" in out
    assert "device.revoke done, but NOT recorded" in err
    revoked = load_devices(config.auth.devices_file).by_id("tablet-01")
    assert revoked is not None and revoked.revoked

    code, out, err = ctl(capsys, "user", "disable", "--config", path, "--id", "staff-002")
    assert code == 3, err
    assert "user.disable done, but NOT recorded" in err
    disabled = load_users(config.auth.users_file).get("staff-002")
    assert disabled is not None and not disabled.enabled

    code, _out, err = ctl(
        capsys, "user", "deny", "--config", path, "--id", "staff-001",
        "--channel", "group:assist-desk",
    )  # fmt: skip
    assert code == 3, err
    assert "user.deny done, but NOT recorded" in err
    denied = load_users(config.auth.users_file).get("staff-001")
    assert denied is not None and "group:assist-desk" not in (denied.channels or ())

    code, _out, err = ctl(
        capsys, "user", "allow", "--config", path, "--id", "staff-002",
        "--channel", "window-reception",
    )  # fmt: skip
    assert code != 0 and "not made" in err  # widening a right waits for a repaired log

    assert log.read_bytes() == broken  # nothing appended to a broken log
    code, _out, _err = ctl(capsys, "audit", "verify", "--config", path)
    assert code == 1


# ------------------------------------------------------------------------- audit list


async def test_audit_list_prints_entries_and_last_n(
    sandbox: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    path = sandbox.config_path
    add_device(capsys, sandbox, "tablet-new", 1)
    ctl(capsys, "device", "revoke", "--config", path, "--id", "tablet-new")
    ctl(capsys, "user", "disable", "--config", path, "--id", "staff-002")
    code, out, err = ctl(capsys, "audit", "list", "--config", path)
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 3
    for n, (line, action, target) in enumerate(
        zip(
            lines,
            ["device.add", "device.revoke", "user.disable"],
            ["tablet-new", "tablet-new", "staff-002"],
            strict=True,
        ),
        start=1,
    ):
        assert line.split()[0] == str(n)
        assert f"{OPERATOR}@" in line
        assert f" gatewayctl {action} {target} ok" in line
    assert fingerprint(1) in lines[0]  # device add's detail

    code, out, err = ctl(capsys, "audit", "list", "--config", path, "--last", "1")
    assert code == 0, err
    [line] = out.splitlines()
    assert line.split()[0] == "3"
    assert "user.disable staff-002 ok" in line

    code, out, err = ctl(capsys, "audit", "list", "--config", path, "--last", "2")
    assert [x.split()[0] for x in out.splitlines()] == ["2", "3"]


@pytest.mark.parametrize("last", ["0", "-1"])
async def test_audit_list_last_below_one_prints_no_entry(
    sandbox: Sandbox, capsys: pytest.CaptureFixture[str], last: str
) -> None:
    """``--last 0`` (or a negative N) is refused or prints nothing; never the whole log."""
    for n in range(1, 4):
        add_device(capsys, sandbox, f"tablet-new-{n}", n)
    capsys.readouterr()
    try:
        code = gatewayctl.main(
            ["audit", "list", "--config", str(sandbox.config_path), "--last", last]
        )
    except SystemExit as exc:  # refused by the argument parser: a usage error
        code = int(exc.code or 0)
        assert code != 0
    out, _err = capsys.readouterr()
    assert out == "", f"--last {last} printed {len(out.splitlines())} entries"


async def test_audit_list_refuses_a_broken_log(
    sandbox: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    for n in range(1, 4):
        add_device(capsys, sandbox, f"tablet-new-{n}", n)
    log, _anchor = audit_paths(sandbox)
    tamper(log, _edit_line_2)
    code, out, err = ctl(capsys, "audit", "list", "--config", sandbox.config_path)
    assert code == 1
    assert "line 2" in err
    assert "Traceback" not in err
    assert "somebody-else" not in out  # nothing printed from an unverified entry


# ------------------------------------------------------------------- the daemon's own


async def test_daemon_start_and_stop_are_recorded_with_the_version(sandbox: Sandbox) -> None:
    running = await start_gateway(sandbox)
    await running.shutdown()
    start, stop = entries(sandbox)
    digest = hashlib.sha256(sandbox.config_path.read_bytes()).hexdigest()
    assert start.body["action"] == "gatewayd.start"
    assert start.body["via"] == "gatewayd"
    assert start.body["actor"] == "gatewayd"
    assert start.body["outcome"] == "ok"
    assert start.body["target"] == str(sandbox.config_path)
    assert start.body["detail"] == {"version": __version__, "config_sha256": digest}
    assert stop.body["action"] == "gatewayd.stop"
    assert stop.body["via"] == "gatewayd"
    assert stop.body["outcome"] == "ok"
    assert stop.body["detail"]["version"] == __version__


async def test_reload_is_recorded(gateway: Running) -> None:
    applied, reason = await gateway.bound.reload()
    assert applied, reason
    last = entries(gateway.sandbox)[-1]
    assert last.body["action"] == "gatewayd.reload"
    assert last.body["outcome"] == "ok"
    assert last.body["via"] == "gatewayd"
    assert last.body["actor"] == "signal:SIGHUP"
    assert last.body["target"] == str(gateway.sandbox.config_path)
    digest = hashlib.sha256(gateway.sandbox.config_path.read_bytes()).hexdigest()
    assert last.body["detail"]["config_sha256"] == digest


async def test_a_refused_reload_is_recorded_as_refused(gateway: Running) -> None:
    """A misspelt key: the reload returns (False, reason naming it), logged "refused"."""
    gateway.sandbox.edit_config(lambda d: d["ingress"].update(shutdown_timout=5))
    applied, reason = await gateway.bound.reload()
    assert not applied
    assert "ingress.shutdown_timout" in reason
    log = entries(gateway.sandbox)
    assert [e.body["action"] for e in log] == ["gatewayd.start", "gatewayd.reload"]
    assert log[-1].body["outcome"] == "refused"
    assert "ingress.shutdown_timout" in log[-1].body["detail"]["reason"]


async def test_gatewayctl_reload_goes_through_the_daemon_which_records_the_caller(
    gateway: Running, capsys: pytest.CaptureFixture[str]
) -> None:
    """gatewayctl reload exits 0; the daemon's entry names the sudo caller and the uid."""
    code, out, err = await actl(capsys, "reload", "--config", gateway.sandbox.config_path)
    assert code == 0, err
    assert "reloaded: " in out  # (stdout also has the in-process daemon's log lines)
    log = entries(gateway.sandbox)
    assert [e.body["action"] for e in log] == ["gatewayd.start", "gatewayd.reload"]
    assert log[-1].body["outcome"] == "ok"
    assert log[-1].body["actor"] == f"{OPERATOR} (uid {os.getuid()})"
    assert log[-1].body["via"] == "gatewayd"


@pytest.mark.parametrize(
    ("key", "change"),
    [
        ("listeners.tablets.port", lambda d: d["listeners"]["tablets"].update(port=1)),
        (
            "listeners.lgwan.private_key",
            lambda d: d["listeners"]["lgwan"].update(private_key="/nonexistent/key"),
        ),
    ],
    ids=["restart-only-setting", "missing-secret"],
)
async def test_gatewayctl_reload_of_a_refused_configuration_exits_1_with_the_reason(
    gateway: Running,
    capsys: pytest.CaptureFixture[str],
    key: str,
    change: Callable[[dict[str, Any]], None],
) -> None:
    """The daemon refuses the new file: exit 1, reason on stderr, entry "refused"."""
    gateway.sandbox.edit_config(change)
    code, out, err = await actl(capsys, "reload", "--config", gateway.sandbox.config_path)
    assert code == 1
    assert "reloaded: " not in out
    assert "reload refused, the old configuration stays" in err
    assert key in err
    last = entries(gateway.sandbox)[-1]
    assert last.body["action"] == "gatewayd.reload"
    assert last.body["outcome"] == "refused"
    assert last.body["actor"] == f"{OPERATOR} (uid {os.getuid()})"
    assert key in last.body["detail"]["reason"]


async def test_gatewayctl_reload_of_a_misspelt_key_fails_naming_the_key(
    gateway: Running, capsys: pytest.CaptureFixture[str]
) -> None:
    """A config gatewayctl itself cannot load: non-zero exit naming the key; the daemon
    keeps serving the old configuration and reloads once the file is fixed."""
    original = gateway.sandbox.config_path.read_text("utf-8")
    gateway.sandbox.edit_config(lambda d: d["ingress"].update(shutdown_timout=5))
    code, out, err = await actl(capsys, "reload", "--config", gateway.sandbox.config_path)
    assert code != 0
    assert "reloaded: " not in out
    assert "ingress.shutdown_timout" in err
    assert "Traceback" not in err
    gateway.sandbox.config_path.write_text(original, "utf-8")
    code, _out, err = await actl(capsys, "reload", "--config", gateway.sandbox.config_path)
    assert code == 0, err
    assert entries(gateway.sandbox)[-1].body["outcome"] == "ok"


WRITER = """
import pathlib, sys
from gateway.ops.audit import AuditLog
from gateway.config import AuditConfig
log, anchor, stop = map(pathlib.Path, sys.argv[1:])
audit = AuditLog(AuditConfig(log=log, anchor=anchor), via="test-writer", actor="writer")
audit.record("test.append", target="1")
print("appending", flush=True)
n = 1
while n < 5 or not stop.exists():
    n += 1
    audit.record("test.append", target=str(n))
print(n)
"""


async def test_concurrent_writers_keep_the_chain_intact(
    gateway: Running, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Another process appends without pause while gatewayctl threads add devices and the
    daemon reloads: every entry is kept, in one chain that verifies."""
    path = str(gateway.sandbox.config_path)
    log, anchor = audit_paths(gateway.sandbox)
    stop = tmp_path / "stop-writer"
    writer = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        WRITER,
        str(log),
        str(anchor),
        str(stop),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
    )
    assert writer.stdout is not None
    async with asyncio.timeout(30):  # until the other process is appending
        assert await writer.stdout.readline() == b"appending\n"

    def add_argv(n: int) -> list[str]:
        device = ["--id", f"tablet-c{n}", "--group", "assist-tablet"]
        return ["device", "add", "--config", path, *device, "--fingerprint", fingerprint(100 + n)]

    threads = [asyncio.to_thread(gatewayctl.main, add_argv(n)) for n in range(6)]
    reloads = [gateway.bound.reload() for _ in range(5)]
    async with asyncio.timeout(60):
        added, reloaded = await asyncio.gather(asyncio.gather(*threads), asyncio.gather(*reloads))
    stop.touch()
    async with asyncio.timeout(30):
        out_bytes, _ = await writer.communicate()
    assert writer.returncode == 0
    written = int(out_bytes)
    assert added == [0] * 6
    assert all(applied for applied, _reason in reloaded), reloaded
    total = 1 + written + 6 + 5  # start, the other process, device adds, reloads
    code, out, err = await actl(capsys, "audit", "verify", "--config", path)
    assert code == 0, err
    assert f"intact: {total} entries" in out
    entries_ = entries(gateway.sandbox)
    assert [e.seq for e in entries_] == list(range(1, total + 1))
    by_writer = [e.body["target"] for e in entries_ if e.body["via"] == "test-writer"]
    assert by_writer == [str(n) for n in range(1, written + 1)]
    adds = sorted(e.body["target"] for e in entries_ if e.body["action"] == "device.add")
    assert adds == sorted(f"tablet-c{n}" for n in range(6))
    assert sum(e.body["action"] == "gatewayd.reload" for e in entries_) == 5
