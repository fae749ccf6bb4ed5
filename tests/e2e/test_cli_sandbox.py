"""``gatewayctl`` and ``gatewayd`` driven in-process against a sandbox (its files, PKI and
registries, with its upstream simulators up): configuration checks and the device and
staff registry commands.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from conftest import ctl

from gateway.cli import gatewayctl, gatewayd
from gateway.crypto.pki import init_pki, issue_device
from gateway.identity.passwords import verify_password
from gateway.identity.registry import load_devices, load_users
from gateway.testing.sandbox import Sandbox

NEW_PASSWORD = "a-long-enough-password"


pytestmark = pytest.mark.usefixtures("hermetic_cli")


def stdin(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(text))


def assert_clean_error(err: str) -> None:
    """An error for a person: prefixed with the program name, never a traceback."""
    assert err.startswith("gatewayctl: "), err
    assert "Traceback" not in err


async def test_check_config_accepts_sandbox_config(
    sandbox: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    """A sandbox configuration, whose files and 0600 secrets all exist, passes: exit 0."""
    code, out, err = ctl(capsys, "check-config", "--config", sandbox.config_path)
    assert code == 0, err
    assert err == ""
    assert "OK (6 channels, 5 destinations)" in out


async def test_check_config_reports_group_readable_secret_with_its_mode(
    sandbox: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    """A secret file with mode 0644 is reported by key with '0644': exit 78 (EX_CONFIG)."""
    assert sandbox.config is not None
    os.chmod(sandbox.config.spool.master_key, 0o644)
    code, _out, err = ctl(capsys, "check-config", "--config", sandbox.config_path)
    assert code == 78
    line = next(x for x in err.splitlines() if "spool.master_key" in x)
    assert "0644" in line


# ------------------------------------------------------------------------- devices


async def test_device_add_by_certificate_registers_its_fingerprint(
    sandbox: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    """device add --cert registers the certificate's fingerprint as an active device."""
    assert sandbox.config is not None
    issued = issue_device(sandbox.pki.dir, "tablet-02")
    code, out, err = ctl(
        capsys,
        "device", "add", "--config", sandbox.config_path,
        "--id", "tablet-02", "--group", "assist-tablet", "--cert", issued.cert,
    )  # fmt: skip
    assert code == 0, err
    assert issued.fingerprint in out
    device = load_devices(sandbox.config.auth.devices_file).by_id("tablet-02")
    assert device is not None
    assert (device.fingerprint, device.group, device.revoked) == (
        issued.fingerprint,
        "assist-tablet",
        False,
    )


async def test_device_list_shows_every_device_and_its_state(
    sandbox: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    """device list prints each registered device with active or REVOKED."""
    assert sandbox.config is not None
    code, out, err = ctl(capsys, "device", "list", "--config", sandbox.config_path)
    assert code == 0, err
    rows = {line.split()[0]: line.split() for line in out.splitlines()}
    registry = load_devices(sandbox.config.auth.devices_file)
    assert set(rows) == {d.id for d in registry.devices}
    assert rows["tablet-lost"][2] == "REVOKED"
    assert rows["tablet-01"][2] == "active"
    assert rows["tablet-01"][3] == sandbox.pki.devices["tablet-01"].fingerprint


async def test_device_revoke_marks_only_that_device_revoked(
    sandbox: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    """device revoke sets revoked on that device and leaves the others as they were."""
    assert sandbox.config is not None
    path = sandbox.config.auth.devices_file
    before = load_devices(path)
    code, out, err = ctl(
        capsys, "device", "revoke", "--config", sandbox.config_path, "--id", "pc-01"
    )
    assert code == 0, err
    assert "pc-01 revoked" in out
    after = load_devices(path)
    for device in before.devices:
        changed = after.by_id(device.id)
        assert changed is not None
        expected = True if device.id == "pc-01" else device.revoked
        assert changed.revoked is expected, device.id
        assert changed.fingerprint == device.fingerprint


async def test_device_revoke_of_unknown_id_is_an_error(
    sandbox: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    """Revoking an id that is not registered exits 1 naming it; the registry is unchanged."""
    assert sandbox.config is not None
    path = sandbox.config.auth.devices_file
    before = path.read_bytes()
    code, _out, err = ctl(
        capsys, "device", "revoke", "--config", sandbox.config_path, "--id", "tablet-99"
    )
    assert code == 1
    assert_clean_error(err)
    assert "no device 'tablet-99'" in err
    assert path.read_bytes() == before


async def test_device_add_with_fingerprint_of_another_device_is_refused(
    sandbox: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    """Adding a device whose fingerprint another device already has exits 1, unchanged."""
    assert sandbox.config is not None
    path = sandbox.config.auth.devices_file
    before = path.read_bytes()
    code, _out, err = ctl(
        capsys,
        "device", "add", "--config", sandbox.config_path, "--id", "tablet-copy",
        "--group", "assist-tablet", "--fingerprint", sandbox.pki.devices["tablet-01"].fingerprint,
    )  # fmt: skip
    assert code == 1
    assert_clean_error(err)
    assert "already has that certificate fingerprint" in err
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    ("device_id", "fingerprint", "message"),
    [
        ("Tablet 02", "sha256:" + "ab" * 32, "must match"),
        ("tablet-02", "sha256:abc", "sha256:<64 hex digits>"),
        ("tablet-02", "md5:" + "ab" * 16, "sha256:<64 hex digits>"),
    ],
    ids=["bad-id", "short-fingerprint", "other-hash"],
)
async def test_device_add_refuses_entries_the_registry_could_not_load(
    sandbox: Sandbox,
    capsys: pytest.CaptureFixture[str],
    device_id: str,
    fingerprint: str,
    message: str,
) -> None:
    """A bad device id or fingerprint is a usage error (exit 2) and never breaks the
    registry file."""
    assert sandbox.config is not None
    path = sandbox.config.auth.devices_file
    before = path.read_bytes()
    code, _out, err = ctl(
        capsys,
        "device", "add", "--config", sandbox.config_path, "--id", device_id,
        "--group", "assist-tablet", "--fingerprint", fingerprint,
    )  # fmt: skip
    assert code == 2
    assert_clean_error(err)
    assert message in err
    assert path.read_bytes() == before


async def test_device_add_accepts_an_uppercase_fingerprint_in_canonical_form(
    sandbox: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    """An uppercase hex fingerprint is stored lowercase, so the registry still loads."""
    assert sandbox.config is not None
    code, _out, err = ctl(
        capsys,
        "device", "add", "--config", sandbox.config_path, "--id", "tablet-02",
        "--group", "assist-tablet", "--fingerprint", "sha256:" + "AB" * 32,
    )  # fmt: skip
    assert code == 0, err
    device = load_devices(sandbox.config.auth.devices_file).by_id("tablet-02")
    assert device is not None and device.fingerprint == "sha256:" + "ab" * 32


# --------------------------------------------------------------------------- users


async def test_user_add_stores_an_scrypt_hash_of_the_stdin_password(
    sandbox: Sandbox, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """user add --password-stdin adds an enabled user whose hash verifies the password."""
    assert sandbox.config is not None
    stdin(monkeypatch, NEW_PASSWORD + "\n")
    code, out, err = ctl(
        capsys, "user", "add", "--config", sandbox.config_path, "--id", "staff-003",
        "--channel", "window-reception", "--password-stdin",
    )  # fmt: skip
    assert code == 0, err
    assert NEW_PASSWORD not in out + err
    user = load_users(sandbox.config.auth.users_file).get("staff-003")
    assert user is not None and user.enabled
    assert NEW_PASSWORD not in user.password_hash
    assert verify_password(NEW_PASSWORD, user.password_hash)
    assert not verify_password(NEW_PASSWORD + "\n", user.password_hash)


async def test_user_add_refuses_a_short_password_stating_the_rule(
    sandbox: Sandbox, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A password under ten characters is refused with the rule (exit 2); no user is
    added."""
    assert sandbox.config is not None
    path = sandbox.config.auth.users_file
    before = path.read_bytes()
    stdin(monkeypatch, "short\n")
    code, _out, err = ctl(
        capsys, "user", "add", "--config", sandbox.config_path, "--id", "staff-003",
        "--channel", "window-reception", "--password-stdin",
    )  # fmt: skip
    assert code == 2
    assert_clean_error(err)
    assert "at least 10 characters" in err
    assert "short" not in err
    assert path.read_bytes() == before


async def test_user_add_of_existing_id_is_refused(
    sandbox: Sandbox, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Adding a staff ID that exists exits 1 pointing at 'user passwd'; the hash is kept."""
    assert sandbox.config is not None
    path = sandbox.config.auth.users_file
    before = path.read_bytes()
    stdin(monkeypatch, NEW_PASSWORD + "\n")
    code, _out, err = ctl(
        capsys, "user", "add", "--config", sandbox.config_path, "--id", "staff-001",
        "--channel", "window-reception", "--password-stdin",
    )  # fmt: skip
    assert code == 1
    assert_clean_error(err)
    assert "user passwd" in err
    assert path.read_bytes() == before


async def test_user_add_refuses_an_id_the_registry_could_not_load(
    sandbox: Sandbox, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A staff ID outside the id rule exits 2 and the users file still loads."""
    assert sandbox.config is not None
    stdin(monkeypatch, NEW_PASSWORD + "\n")
    code, _out, err = ctl(
        capsys, "user", "add", "--config", sandbox.config_path, "--id", "Staff 003",
        "--channel", "window-reception", "--password-stdin",
    )  # fmt: skip
    assert code == 2
    assert_clean_error(err)
    assert "must match" in err
    assert load_users(sandbox.config.auth.users_file).get("Staff 003") is None


async def test_user_passwd_replaces_the_hash_and_keeps_the_user_enabled(
    sandbox: Sandbox, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """user passwd makes the new password verify and the old one fail."""
    assert sandbox.config is not None
    path = sandbox.config.auth.users_file
    old, other = load_users(path).get("staff-001"), load_users(path).get("staff-002")
    assert old is not None
    stdin(monkeypatch, NEW_PASSWORD + "\r\n")
    code, out, err = ctl(
        capsys, "user", "passwd", "--config", sandbox.config_path, "--id", "staff-001",
        "--password-stdin",
    )  # fmt: skip
    assert code == 0, err
    assert "staff-001" in out
    new = load_users(path).get("staff-001")
    assert new is not None and new.enabled
    assert new.password_hash != old.password_hash
    assert verify_password(NEW_PASSWORD, new.password_hash)
    assert not verify_password("correct horse battery", new.password_hash)
    assert load_users(path).get("staff-002") == other


async def test_user_passwd_refuses_a_short_password(
    sandbox: Sandbox, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """user passwd with a short password exits 2 stating the rule; the old hash stays."""
    assert sandbox.config is not None
    path = sandbox.config.auth.users_file
    before = path.read_bytes()
    stdin(monkeypatch, "123456789\n")
    code, _out, err = ctl(
        capsys, "user", "passwd", "--config", sandbox.config_path, "--id", "staff-001",
        "--password-stdin",
    )  # fmt: skip
    assert code == 2
    assert_clean_error(err)
    assert "at least 10 characters" in err
    assert path.read_bytes() == before


async def test_user_disable_disables_only_that_user(
    sandbox: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    """user disable clears enabled on that user and keeps its hash and the others."""
    assert sandbox.config is not None
    path = sandbox.config.auth.users_file
    before = load_users(path)
    code, out, err = ctl(
        capsys, "user", "disable", "--config", sandbox.config_path, "--id", "staff-002"
    )
    assert code == 0, err
    assert "staff-002 disabled" in out
    after = load_users(path)
    assert {u.id for u in after.users} == {u.id for u in before.users}
    for user in before.users:
        changed = after.get(user.id)
        assert changed is not None
        assert changed.enabled is (user.id != "staff-002"), user.id
        assert changed.password_hash == user.password_hash


@pytest.mark.parametrize("action", ["passwd", "disable"])
async def test_user_action_on_unknown_id_is_an_error(
    sandbox: Sandbox,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    action: str,
) -> None:
    """passwd or disable of an unknown staff ID exits 1 naming it; the file is unchanged."""
    assert sandbox.config is not None
    path = sandbox.config.auth.users_file
    before = path.read_bytes()
    stdin(monkeypatch, NEW_PASSWORD + "\n")
    extra = ["--password-stdin"] if action == "passwd" else []
    code, _out, err = ctl(
        capsys, "user", action, "--config", sandbox.config_path, "--id", "staff-999", *extra
    )
    assert code == 1
    assert_clean_error(err)
    assert "no staff user 'staff-999'" in err
    assert path.read_bytes() == before


async def test_gatewayd_refuses_a_master_key_readable_by_others(
    sandbox: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    """gatewayd exits 78 (EX_CONFIG) naming spool.master_key when the key file is 0644."""
    assert sandbox.config is not None
    os.chmod(sandbox.config.spool.master_key, 0o644)
    capsys.readouterr()
    code = gatewayd.main(["--config", str(sandbox.config_path)])
    out, err = capsys.readouterr()
    assert code == 78
    assert out == ""
    problems = err.splitlines()
    assert problems and all(p.startswith("gatewayd: ") for p in problems)
    assert any("spool.master_key" in p and "0644" in p for p in problems), err


async def test_device_add_refuses_an_existing_id_so_a_revoked_device_stays_revoked(
    sandbox: Sandbox, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Adding a device under an id that exists is refused; a revoked device stays revoked."""
    new = init_pki(tmp_path / "other", devices=("tablet-lost",), upstreams=("u",))
    argv = [
        "device",
        "add",
        "--config",
        str(sandbox.config_path),
        "--id",
        "tablet-lost",
        "--group",
        "assist-tablet",
        "--cert",
        str(new.devices["tablet-lost"].cert),
    ]
    assert gatewayctl.main(argv) == 1
    assert "exists" in capsys.readouterr().err
    assert sandbox.config is not None
    device = load_devices(sandbox.config.auth.devices_file).by_id("tablet-lost")
    assert device is not None and device.revoked
