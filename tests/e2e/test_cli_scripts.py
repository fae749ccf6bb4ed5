"""``gatewayctl`` and ``gatewayd`` as scripts use them: where the configuration comes
from (``--config`` before or after the command, ``$GATEWAY_CONFIG``), ``--format json``
on every listing, the documented exit statuses (0, 1, 2, 69, 78), ``--yes`` on what
destroys data, errors in plain words, times in ``--timezone``, shell completion, and
``check-config --credentials-dir``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from conftest import Running, actl, ctl

from gateway.cli import gatewayctl, gatewayd
from gateway.crypto.keys import load_master_key, resolve_secret_path
from gateway.ops.chain import HashChainLog
from gateway.spool.reader import read_records
from gateway.spool.store import Spool
from gateway.testing.samples import sample_submission
from gateway.testing.sandbox import Sandbox

TOKYO = ZoneInfo("Asia/Tokyo")
CHANNEL = "online-application"  # tablet-01 → dnp-relay


@pytest.fixture(autouse=True)
def _hermetic(hermetic_cli: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """No $GATEWAY_CONFIG from whoever runs the tests (see conftest.hermetic_cli)."""
    monkeypatch.delenv("GATEWAY_CONFIG", raising=False)
    monkeypatch.setenv("SUDO_USER", "operator-sato")


class Terminal(io.StringIO):
    """Standard input that is a terminal, with the operator's answer typed in."""

    def isatty(self) -> bool:
        return True


def plain(err: str) -> None:
    """An error for a person: the program's name first, no traceback, no class name."""
    assert err.startswith("gatewayctl: ") or err.startswith("usage: "), err
    for word in ("Traceback", "Error", "Errno", "fromisoformat"):
        assert word not in err, err


def json_out(out: str) -> Any:
    """The JSON document printed (a daemon running in the test's loop logs to the same
    stdout: the document starts at the first line opening one)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line in ("[", "{", "[]", "{}"))
    return json.loads("\n".join(lines[start:]))


def audit_log(sandbox: Sandbox) -> HashChainLog:
    assert sandbox.config is not None
    where = sandbox.config.audit_log
    return HashChainLog(where.log, anchor=where.anchor)


def add_device(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    return ctl(
        capsys, "device", "add", *argv, "--id", "tablet-new", "--group", "assist-tablet",
        "--fingerprint", "sha256:" + "ab" * 32,
    )  # fmt: skip


# ----------------------------------------------------------- where the config comes from


@pytest.mark.parametrize("where", ["before", "after", "environment"])
async def test_the_configuration_is_taken_from_config_anywhere_or_the_environment(
    sandbox: Sandbox,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    """--config before the command, after it, or $GATEWAY_CONFIG: the same device added."""
    config = str(sandbox.config_path)
    if where == "before":
        code, out, err = ctl(capsys, "--config", config, "device", "list", "--format", "json")
    elif where == "after":
        code, out, err = ctl(capsys, "device", "list", "--format", "json", "--config", config)
    else:
        monkeypatch.setenv("GATEWAY_CONFIG", config)
        code, out, err = ctl(capsys, "device", "list", "--format", "json")
    assert code == 0, err
    assert "tablet-01" in {d["id"] for d in json.loads(out)}


async def test_config_wins_over_the_environment_which_wins_over_the_default(
    sandbox: Sandbox,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    missing = tmp_path / "from-environment.toml"
    monkeypatch.setenv("GATEWAY_CONFIG", str(missing))
    code, _out, err = ctl(capsys, "device", "list")
    assert code == 78
    assert f"gatewayctl: {missing}: file not found" in err  # not /etc/gateway/gateway.toml
    code, _out, err = ctl(capsys, "device", "list", "--config", sandbox.config_path)
    assert code == 0, err
    monkeypatch.setenv("GATEWAY_CONFIG", "")  # empty: as if unset
    code, _out, err = ctl(capsys, "device", "list")
    assert code == 78
    assert "/etc/gateway/gateway.toml" in err


async def test_gatewayd_reads_gateway_config_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """gatewayd without --config takes $GATEWAY_CONFIG; an unusable file exits 78."""
    missing = tmp_path / "nowhere.toml"
    monkeypatch.setenv("GATEWAY_CONFIG", str(missing))
    assert gatewayd.main([]) == 78
    assert f"gatewayd: {missing}: file not found" in capsys.readouterr().err
    monkeypatch.setenv("GATEWAY_CONFIG", str(tmp_path))  # a directory
    assert gatewayd.main([]) == 78
    err = capsys.readouterr().err
    assert f"gatewayd: {tmp_path} is a directory, not a file" in err
    assert "Error" not in err


# ---------------------------------------------------------------------- exit statuses


def test_help_documents_the_exit_statuses(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        gatewayctl.main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for line in (
        "   0  done",
        "   1  the operation failed",
        "   2  usage error",
        "  69  ",
        "  78  ",
    ):
        assert line in out, line
    assert "EX_CONFIG" in out and "EX_UNAVAILABLE" in out and "$GATEWAY_CONFIG" in out
    with pytest.raises(SystemExit):
        gatewayd.main(["--help"])
    assert "  78  the configuration is unusable" in capsys.readouterr().out


async def test_usage_errors_exit_2_and_configuration_errors_78(
    sandbox: Sandbox, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:  # argparse's own
        ctl(capsys, "device", "list", "--config", sandbox.config_path, "--format", "xml")
    assert exited.value.code == 2
    code, _out, err = ctl(  # UsageError: a value the command refuses
        capsys, "spool", "show", "--config", sandbox.config_path, "not-an-id"
    )
    assert code == 2
    plain(err)
    bad = tmp_path / "bad.toml"
    bad.write_text("[spool\n", "utf-8")
    for config, said in (
        (tmp_path / "nowhere.toml", "file not found"),
        (tmp_path, "is a directory"),
        (bad, "not valid TOML"),
    ):
        code, _out, err = ctl(capsys, "device", "list", "--config", config)
        assert code == 78, err
        assert said in err
        plain(err)
    # A secret the configuration names that cannot be used is a configuration error too.
    assert sandbox.config is not None
    new = tmp_path / "new.key"
    assert ctl(capsys, "keys", "new-master", "--out", new)[0] == 0
    os.chmod(sandbox.config.spool.master_key, 0o644)
    code, _out, err = ctl(
        capsys, "keys", "rotate-master", "--config", sandbox.config_path, "--yes", "--new", new
    )
    assert code == 78
    assert "0644" in err
    plain(err)


async def test_a_command_that_needs_the_daemon_exits_69_without_one(
    sandbox: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    """reload with no daemon running: 69 (EX_UNAVAILABLE), said in words."""
    code, out, err = await actl(capsys, "reload", "--config", sandbox.config_path)
    assert code == 69
    assert out == ""
    plain(err)
    assert "gatewayd is not answering on" in err
    sandbox.edit_config(lambda data: data["admin"].pop("control_socket"))
    code, _out, err = await actl(capsys, "reload", "--config", sandbox.config_path)
    assert code == 69
    assert "admin.control_socket is not configured" in err and "SIGHUP" in err


async def test_audit_verify_of_a_missing_log_fails(
    sandbox: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    """No audit log: exit 1 saying so (not "intact: 0 entries"); JSON says intact false."""
    log = audit_log(sandbox).path
    code, out, err = ctl(capsys, "audit", "verify", "--config", sandbox.config_path)
    assert (code, out) == (1, "")
    assert f"gatewayctl: the audit log {log} does not exist" in err
    code, out, err = ctl(
        capsys, "audit", "verify", "--config", sandbox.config_path, "--format", "json"
    )
    assert code == 1
    assert json.loads(out) == {"log": str(log), "intact": False, "reason": "missing"}
    assert not log.exists()


# -------------------------------------------------------------------------- JSON output


async def test_every_listing_has_json(
    gateway: Running, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """device, user, spool list/show, audit list/verify, access-log verify, keys status."""
    sandbox = gateway.sandbox
    assert sandbox.config is not None
    fields, files = sample_submission(CHANNEL)
    async with gateway.client("tablet-01") as client:
        reply = await client.submit(CHANNEL, fields, files)
        assert reply.status == 202, reply.body
    submission_id = reply.body["submission_id"]
    assert add_device(capsys, "--config", sandbox.config_path)[0] == 0
    monkeypatch.setenv("GATEWAY_CONFIG", str(sandbox.config_path))

    async def listing(*argv: str) -> Any:
        code, out, err = await actl(capsys, *argv, "--format", "json")
        assert code == 0, (argv, err)
        return json_out(out)

    devices = await listing("device", "list")
    assert {"id": "tablet-new", "group": "assist-tablet", "revoked": False,
            "fingerprint": "sha256:" + "ab" * 32} in devices  # fmt: skip
    users = await listing("user", "list")
    assert {u["id"] for u in users} >= {"staff-001", "staff-002"}
    rows = await listing("spool", "list", "--state", "all")
    assert [r["submission_id"] for r in rows] == [submission_id]
    shown = await listing("spool", "show", submission_id)
    assert shown["submission_id"] == submission_id and shown["channel"] == CHANNEL
    entries = await listing("audit", "list")
    assert [e["seq"] for e in entries] == list(range(1, len(entries) + 1))
    assert ("device.add", "tablet-new", "ok") in {
        (e["action"], e["target"], e["outcome"]) for e in entries
    }
    verified = await listing("audit", "verify")
    assert verified["intact"] is True and verified["entries"] == len(entries)
    assert verified["head"]["seq"] == len(entries)
    access = await listing("access-log", "verify")
    assert access["intact"] is True and isinstance(access["entries"], int)
    keys = await listing("keys", "status")
    assert keys["keystore"] == str(sandbox.config.keystore_directory)


# ------------------------------------------------------------------------------- times


async def test_times_are_shown_in_tokyo_unless_told_otherwise(
    gateway: Running, capsys: pytest.CaptureFixture[str]
) -> None:
    sandbox = gateway.sandbox
    assert sandbox.config is not None
    config = sandbox.config_path
    fields, files = sample_submission(CHANNEL)
    async with gateway.client("tablet-01") as client:
        reply = await client.submit(CHANNEL, fields, files)
        assert reply.status == 202, reply.body
    submission_id = reply.body["submission_id"]
    [record] = read_records(sandbox.config.spool.directory, record_id=submission_id, limit=1)
    assert add_device(capsys, "--config", config)[0] == 0
    [entry] = [e for e in audit_log(sandbox).entries() if e.body["action"] == "device.add"]
    entry_at = datetime.fromisoformat(entry.at.replace("Z", "+00:00"))

    for zone, argv in (
        (TOKYO, []),
        (UTC, ["--timezone", "UTC"]),
        (TOKYO, ["--timezone", "Asia/Tokyo"]),
    ):
        offset = "+09:00" if zone is TOKYO else "+00:00"
        code, out, err = await actl(
            capsys, *argv, "spool", "show", submission_id, "--config", config, "--format", "json"
        )
        assert code == 0, err
        received = json_out(out)["received_at"]
        assert received == datetime.fromtimestamp(record.received_at, zone).isoformat()
        assert received.endswith(offset)
        code, out, err = await actl(
            capsys, "spool", "list", "--state", "all", *argv, "--config", config
        )
        assert code == 0, err
        shown = datetime.fromtimestamp(record.received_at, zone).isoformat(timespec="seconds")
        assert shown in out

        code, out, err = await actl(capsys, "audit", "list", "--config", config, *argv)
        assert code == 0, err
        assert f" {entry_at.astimezone(zone).isoformat(timespec='seconds')} " in out
        code, out, err = await actl(
            capsys, "audit", "list", "--config", config, *argv, "--format", "json"
        )
        [shown_entry] = [e for e in json_out(out) if e["seq"] == entry.seq]
        assert shown_entry["at"] == entry_at.astimezone(zone).isoformat()

    with pytest.raises(SystemExit) as exited:
        ctl(capsys, "audit", "list", "--config", config, "--timezone", "Tokyo")
    assert exited.value.code == 2
    assert "'Tokyo' is not a time zone" in capsys.readouterr().err


# ---------------------------------------------------------------------------- --yes


async def test_erase_asks_on_a_terminal_and_refuses_without_one(
    sandbox: Sandbox, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No terminal and no --yes: exit 2. At a terminal: "n" does nothing (exit 1), "y"
    goes on (to the daemon, which is not running here: 69). Nothing is recorded before."""
    config = sandbox.config_path
    record = "0" * 32
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))  # piped: not a terminal
    code, out, err = ctl(capsys, "spool", "erase", "--config", config, record)
    assert (code, out) == (2, "")
    assert "cannot be undone" in err and "add --yes" in err
    monkeypatch.setattr("sys.stdin", Terminal("n\n"))
    code, out, err = ctl(capsys, "spool", "erase", "--config", config, record)
    assert (code, out) == (1, "")
    assert "Go on? [y/N]" in err and "not confirmed: nothing done" in err
    assert not audit_log(sandbox).path.exists()
    monkeypatch.setattr("sys.stdin", Terminal("y\n"))
    code, out, err = await actl(capsys, "spool", "erase", "--config", config, record)
    assert code == 69, err
    assert "gatewayd is not answering" in err
    [entry] = audit_log(sandbox).entries()
    assert (entry.body["action"], entry.body["outcome"]) == ("spool.erase", "failed")


async def test_rotate_master_needs_yes_without_a_terminal(
    sandbox: Sandbox, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    new = tmp_path / "new.key"
    assert ctl(capsys, "keys", "new-master", "--out", new)[0] == 0
    code, _out, err = ctl(
        capsys, "keys", "rotate-master", "--config", sandbox.config_path, "--new", new
    )
    assert code == 2
    assert "add --yes" in err
    assert not audit_log(sandbox).path.exists()  # refused before anything
    code, _out, err = ctl(capsys, "keys", "new-master", "--out", new)
    assert code == 1 and "already exists" in err  # not a configuration error


# --------------------------------------------------------------------- plain words


async def test_errors_are_said_in_plain_words(
    sandbox: Sandbox, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = sandbox.config_path
    with pytest.raises(SystemExit) as exited:
        ctl(capsys, "access-log", "verify", "--config", config, "--from", "30/11/2026")
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "argument --from: '30/11/2026': DATE must be YYYY-MM-DD, e.g. 2026-11-30" in err
    assert "fromisoformat" not in err
    code, _out, err = ctl(capsys, "device", "add", "--config", config, "--id", "tablet-new",
                          "--group", "assist-tablet", "--cert", tmp_path)  # fmt: skip
    assert code == 1
    plain(err)
    assert str(tmp_path) in err
    code, _out, err = ctl(capsys, "device", "list", "--config", tmp_path)
    assert code == 78
    plain(err)
    assert f"{tmp_path}: is a directory" in err
    assert sandbox.config is not None
    devices = sandbox.config.auth.devices_file
    devices.unlink()
    devices.mkdir()  # the registry path is a directory
    code, _out, err = ctl(capsys, "device", "list", "--config", config)
    assert code == 1
    plain(err)
    assert f"{devices}: cannot read: it is a directory, not a file" in err


# ------------------------------------------------------------------------- completion


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_prints_a_script(capsys: pytest.CaptureFixture[str], shell: str) -> None:
    code, out, err = ctl(capsys, "completion", shell)
    assert code == 0, err
    assert "gatewayctl" in out and "spool" in out and "--timezone" in out


def test_the_bash_completion_completes_commands_and_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    script = tmp_path / "gatewayctl"
    script.write_text(ctl(capsys, "completion", "bash")[1], "utf-8")
    probe = (
        f"source {script}\n"
        'complete_words() { COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); COMPREPLY=();'
        ' _shtab_gatewayctl; echo "${COMPREPLY[*]}"; }\n'
        "complete_words gatewayctl sp\n"
        "complete_words gatewayctl spool ''\n"
        "complete_words gatewayctl spool erase --y\n"
    )
    done = subprocess.run([bash, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines() == ["spool", "list show requeue erase migrate", "--yes"]


# ------------------------------------------------------------------- --credentials-dir


async def test_check_config_reads_credentials_from_the_directory_given(
    sandbox: Sandbox, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """credential:NAME secrets are checked as DIR/NAME, the environment left alone."""
    assert sandbox.config is not None
    master = resolve_secret_path(sandbox.config.spool.master_key, Path("/"))
    credstore = tmp_path / "credstore"
    credstore.mkdir(mode=0o700)
    sandbox.edit_config(lambda data: data["spool"].update(master_key="credential:spool-master.key"))
    code, _out, err = ctl(capsys, "check-config", "--config", sandbox.config_path)
    assert code == 78
    assert "spool.master_key" in err and "--credentials-dir" in err
    argv = ["check-config", "--config", sandbox.config_path, "--credentials-dir", credstore]
    code, _out, err = ctl(capsys, *argv)
    assert code == 78
    assert f"{credstore / 'spool-master.key'} does not exist" in err
    copy = credstore / "spool-master.key"
    copy.write_bytes(master.read_bytes())
    copy.chmod(0o600)
    code, out, err = ctl(capsys, *argv)
    assert code == 0, err
    assert "OK (" in out
    assert "CREDENTIALS_DIRECTORY" not in os.environ
    assert load_master_key(copy) == load_master_key(master)
    code, _out, err = ctl(capsys, "check-config", "--config", sandbox.config_path,
                          "--credentials-dir", tmp_path / "none")  # fmt: skip
    assert code == 2
    assert "is not a directory" in err


async def test_read_only_listings_need_no_running_daemon(
    sandbox: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    """spool list --format json on an empty spool is an empty list, exit 0."""
    assert sandbox.config is not None
    master = load_master_key(resolve_secret_path(sandbox.config.spool.master_key, Path("/")))
    spool = Spool(sandbox.config.spool.directory, master)
    await spool.open()
    await spool.close()
    code, out, err = ctl(
        capsys, "spool", "list", "--config", sandbox.config_path, "--format", "json"
    )
    assert code == 0, err
    assert json.loads(out) == []
