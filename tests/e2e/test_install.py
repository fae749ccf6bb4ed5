"""The install a ward's operator runs (``sudo make install``, i.e. ``scripts/install``),
done into a throw-away root: a virtual environment of the locked dependencies and the
gateway's wheel under /opt/gateway, the /usr/bin links, the unit and its companions,
the alert rules and dashboard, the documents the unit's Documentation= names, and a
configuration left for the operator. Then the installed commands are run from outside
the checkout: ``gatewayd --version``, ``gatewayctl check-config`` and the demo."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import pytest

from gateway import __version__
from gateway.testing.sandbox import build_sandbox

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
         "-w", str(out), str(ROOT)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    (found,) = out.glob("*.whl")
    return found


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("root")
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "install"), "--root", str(root), "--wheel", str(wheel)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"gatewayd {__version__}" in done.stdout
    yield root


def test_the_wheel_carries_the_license_and_the_shipped_files(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    data = {n.split(".data/data/", 1)[1] for n in names if ".data/data/" in n}
    assert {
        "share/gateway/conf/gateway.toml",
        "share/gateway/systemd/gatewayd.service",
        "share/gateway/prometheus/gateway-alerts.yml",
        "share/gateway/prometheus/gateway-dashboard.json",
        "share/doc/gateway/LICENSE",
    } <= data
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "License-Expression: Apache-2.0" in text
    requires = [line.lower() for line in text.splitlines() if line.startswith("Requires-Dist:")]
    assert requires and not any("pyopenssl" in line for line in requires)  # only what is imported


def test_everything_lands_where_the_unit_and_the_readme_say(installed: Path) -> None:
    for path in (
        "opt/gateway/bin/gatewayd",
        "opt/gateway/bin/gatewayctl",
        "usr/lib/systemd/system/gatewayd.service",
        "usr/lib/sysusers.d/gatewayd.conf",
        "usr/lib/tmpfiles.d/gatewayd.conf",
        "usr/share/gateway/prometheus/gateway-alerts.yml",
        "usr/share/gateway/prometheus/gateway-dashboard.json",
        "usr/share/doc/gateway/LICENSE",
        "etc/gateway/gateway.toml",
        "etc/gateway/gateway.toml.example",
    ):
        assert (installed / path).is_file(), path
    for command in ("gatewayd", "gatewayctl"):
        link = installed / "usr" / "bin" / command
        assert link.is_symlink() and str(link.readlink()) == f"/opt/gateway/bin/{command}"
    unit = (installed / "usr/lib/systemd/system/gatewayd.service").read_text()
    for doc in re.findall(r"^Documentation=file://(\S+)", unit, re.MULTILINE):
        assert (installed / unquote(doc.replace("%%", "%")).lstrip("/")).is_file(), doc
    assert (installed / "etc/gateway/credentials").stat().st_mode & 0o077 == 0


def test_the_installed_commands_work_outside_the_checkout(installed: Path, tmp_path: Path) -> None:
    bin_ = installed / "opt" / "gateway" / "bin"
    version = subprocess.run(
        [str(bin_ / "gatewayd"), "--version"], capture_output=True, text=True, cwd=tmp_path,
        check=False,
    )  # fmt: skip
    assert version.stdout.strip() == f"gatewayd {__version__}"
    shipped = subprocess.run(
        [str(bin_ / "gatewayctl"), "check-config", "--structure-only", "--config",
         str(installed / "etc" / "gateway" / "gateway.toml")],
        capture_output=True, text=True, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert shipped.returncode == 0, shipped.stderr
    assert "OK (6 channels" in shipped.stdout


async def test_check_config_of_a_complete_configuration_with_the_installed_gatewayctl(
    installed: Path, tmp_path: Path
) -> None:
    box = await build_sandbox(tmp_path / "box", start_simulators=False)
    checked = await asyncio.to_thread(
        subprocess.run,
        [str(installed / "opt/gateway/bin/gatewayctl"), "check-config", "--config",
         str(box.config_path)],
        capture_output=True, text=True, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr


def test_the_demo_runs_from_the_installed_wheel(installed: Path, tmp_path: Path) -> None:
    demo = subprocess.run(
        [str(installed / "opt/gateway/bin/gatewayctl"), "demo"],
        capture_output=True, text=True, cwd=tmp_path, check=False, timeout=300,
    )  # fmt: skip
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
    assert "summary: 7 accepted, 7 delivered" in demo.stdout
