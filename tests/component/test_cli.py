"""``gatewayctl`` and ``gatewayd`` driven in-process on plain files: exit codes, messages
and the files they change (configuration checks, the development PKI, usage). The same
commands against a sandbox are in ``tests/e2e/test_cli_sandbox.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import structlog
from conftest import ctl

from gateway.cli import gatewayctl, gatewayd
from gateway.crypto.certs import cert_fingerprint, load_cert_der
from gateway.testing.sandbox import SHIPPED_CONFIG

CHANNELS = (
    "online-application",
    "express-issuance",
    "overseas-application",
    "card-delegation-batch",
    "issuance-reservation",
    "window-reception",
)


pytestmark = pytest.mark.usefixtures("hermetic_cli")


def assert_clean_error(err: str) -> None:
    """An error for a person: prefixed with the program name, never a traceback."""
    assert err.startswith("gatewayctl: "), err
    assert "Traceback" not in err


# -------------------------------------------------------------------- check-config


def test_check_config_structure_only_accepts_shipped_file(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """check-config --structure-only on conf/gateway.toml exits 0 and lists the six channels."""
    code, out, err = ctl(capsys, "check-config", "--config", SHIPPED_CONFIG, "--structure-only")
    assert code == 0, err
    assert "OK (6 channels" in out
    for channel in CHANNELS:
        assert f"  {channel}: on " in out
    for listener in ("tablets", "lgwan", "jukinet", "office-lan"):
        assert f"  listener {listener}: " in out
    assert "window-reception: on office-lan → ward-issuance, 13 fields" in out


def test_check_config_names_missing_files_and_secrets_by_dotted_key(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Without --structure-only the shipped file fails, naming each missing file by key."""
    code, out, err = ctl(capsys, "check-config", "--config", SHIPPED_CONFIG)
    assert code == 78  # EX_CONFIG
    assert out == ""
    for key in (
        "spool.master_key",
        "listeners.tablets.private_key",
        "listeners.office-lan.certificate",
        "listeners.jukinet.client_ca",
        "destinations.jlis-overseas.credential",
        "destinations.dnp-relay.client_key",
        "destinations.ward-issuance.ca",
    ):
        assert f"{SHIPPED_CONFIG}: {key}: " in err, key
    assert "problem(s) in" in err


def test_check_config_suggests_the_close_match_of_a_misspelt_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A misspelt key exits 78 naming the file and dotted key, with 'did you mean'."""
    text = SHIPPED_CONFIG.read_text("utf-8")
    assert "keepalive_timeout = 75" in text
    config = tmp_path / "gateway.toml"
    config.write_text(text.replace("keepalive_timeout = 75", "keepalive_timout = 75"), "utf-8")
    code, out, err = ctl(capsys, "check-config", "--config", config, "--structure-only")
    assert code == 78
    assert out == ""
    assert f"{config}: ingress.keepalive_timout: " in err
    assert "did you mean 'keepalive_timeout'" in err


# ------------------------------------------------------------------------ pki init


def test_pki_init_writes_certificates_and_0600_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """pki init writes every certificate, lists its fingerprint, and keeps keys 0600."""
    pki = tmp_path / "pki"
    code, out, err = ctl(
        capsys, "pki", "init", "--dir", pki, "--device", "a", "--device", "b", "--upstream", "u"
    )
    assert code == 0, err
    names = ["device-ca", "gateway-ca", "upstream-ca", "gateway-server", "gateway-client"]
    names += ["device-a", "device-b", "upstream-u", "client-u"]
    for name in names:
        cert, key = pki / f"{name}.pem", pki / f"{name}.key"
        assert cert.is_file() and key.is_file(), name
        assert cert_fingerprint(load_cert_der(cert)) in out, name
        assert key.stat().st_mode & 0o777 == 0o600, name
    assert sorted(p.name for p in pki.glob("*.key")) == sorted(f"{n}.key" for n in names)


def test_pki_init_refuses_to_overwrite_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A second pki init without --force exits non-zero with a clear message, no traceback."""
    pki = tmp_path / "pki"
    assert ctl(capsys, "pki", "init", "--dir", pki, "--device", "a")[0] == 0
    before = (pki / "device-a.pem").read_bytes()
    code, out, err = ctl(capsys, "pki", "init", "--dir", pki, "--device", "a")
    assert code != 0
    assert out == ""
    assert_clean_error(err)
    assert "already exists" in err and "--force" in err
    assert (pki / "device-a.pem").read_bytes() == before
    code, _out, err = ctl(capsys, "pki", "init", "--dir", pki, "--device", "a", "--force")
    assert code == 0, err
    assert (pki / "device-a.pem").read_bytes() != before


def test_pki_init_refuses_a_bad_device_name_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A device name that breaks the naming rule is a usage error (2) stating the rule."""
    code, _out, err = ctl(capsys, "pki", "init", "--dir", tmp_path / "pki", "--device", "Tab 1")
    assert code == 2
    assert_clean_error(err)
    assert "must match" in err


async def test_registry_command_with_missing_config_exits_78(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A registry command given a configuration file that does not exist exits 78."""
    missing = tmp_path / "nowhere.toml"
    code, _out, err = ctl(capsys, "device", "list", "--config", missing)
    assert code == 78
    assert_clean_error(err)
    assert f"{missing}: file not found" in err


# ------------------------------------------------------------------------ gatewayd


def test_gatewayd_with_missing_config_exits_78(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """gatewayd --config <missing file> exits 78 (EX_CONFIG) with the problem on stderr."""
    missing = tmp_path / "nowhere.toml"
    code = gatewayd.main(["--config", str(missing)])
    out, err = capsys.readouterr()
    assert code == 78
    assert out == ""
    assert f"gatewayd: {missing}: file not found" in err
    # Called in-process with arguments, gatewayd leaves loggers free to follow a later
    # configure() (a test's capture); only the program itself binds them for good.
    assert structlog.get_config()["cache_logger_on_first_use"] is False


# ---------------------------------------------------------------------------- help

CTL_COMMANDS = [
    [],
    ["check-config"],
    ["pki"],
    ["pki", "init"],
    ["device"],
    ["device", "add"],
    ["device", "list"],
    ["device", "revoke"],
    ["user"],
    ["user", "add"],
    ["user", "list"],
    ["user", "allow"],
    ["user", "deny"],
    ["user", "passwd"],
    ["user", "disable"],
    ["demo"],
]


@pytest.mark.parametrize("command", CTL_COMMANDS, ids=lambda c: " ".join(c) or "gatewayctl")
def test_gatewayctl_help_prints_usage_and_exits_0(
    capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    """gatewayctl [COMMAND] --help prints its usage and exits 0."""
    with pytest.raises(SystemExit) as exit_:
        gatewayctl.main([*command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: gatewayctl {' '.join(command)}".rstrip())


def test_gatewayd_help_prints_usage_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    """gatewayd --help prints its usage, naming --config, and exits 0."""
    with pytest.raises(SystemExit) as exit_:
        gatewayd.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: gatewayd")
    assert "--config FILE" in out
