"""The systemd side: the unit's sandbox rating, what it declares, the sysusers and tmpfiles
files, and the sd_notify client against real Unix datagram sockets.

The unit checks need systemd's own tools (``systemd-analyze``, ``systemd-sysusers``,
``systemd-tmpfiles``; Debian's "systemd" package, which ``scripts/install-tools``
installs). A missing ``systemd-analyze`` is a failure, not a skip: the sandbox rating is
a promise. None of it needs a running systemd, the gatewayd binary or the ``gateway``
user on this machine (see each test for how).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from gateway.ops.sdnotify import Notifier, watchdog_loop

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "gatewayd.service"
SYSUSERS = ROOT / "systemd" / "gatewayd.sysusers"
TMPFILES = ROOT / "systemd" / "gatewayd.tmpfiles"
SHIPPED_CONFIG = ROOT / "conf" / "gateway.toml"

MAX_EXPOSURE = 1.5
TOOL_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/bin", "/bin", "/usr/sbin", "/sbin"])
# Plain, untranslated, uncoloured output from the systemd tools.
TOOL_ENV = {
    "PATH": TOOL_PATH,
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "SYSTEMD_COLORS": "0",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_LOG_COLOR": "0",
}


def systemd_tool(name: str) -> str | None:
    return shutil.which(name, path=TOOL_PATH)


def require_systemd_analyze() -> str:
    tool = systemd_tool("systemd-analyze")
    if tool is None:
        pytest.fail(
            "systemd-analyze is not installed, so the unit's sandboxing cannot be checked: "
            "run scripts/install-tools (Debian package 'systemd'; `make test` does this)"
        )
    return tool


def run_tool(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(arg) for arg in argv],
        capture_output=True,
        text=True,
        env=TOOL_ENV,
        timeout=120,
        check=False,
    )


# ------------------------------------------------------------------ unit file parsing


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as section -> key -> every value in order (systemd.syntax(7) subset)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = pending + raw.strip() if pending else raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path}: {line!r} outside any section"
        key, sep, value = line.partition("=")
        assert sep, f"{path}: {line!r} is not KEY=VALUE"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def parse_timespan(value: str) -> float:
    """'45s', '1min 30s', '30' (seconds) -> seconds."""
    units = {"ms": 0.001, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "": 1.0}
    total = 0.0
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value)
    assert parts, f"not a time span: {value!r}"
    for number, unit in parts:
        total += float(number) * units[unit]
    return total


@pytest.fixture(scope="module")
def unit() -> dict[str, list[str]]:
    sections = parse_unit(UNIT)
    assert {"Unit", "Service", "Install"} <= sections.keys()
    return sections["Service"]


def last(service: dict[str, list[str]], key: str) -> str:
    assert key in service, f"{UNIT.name} sets no {key}="
    return service[key][-1]


def shipped_config() -> dict[str, Any]:
    with SHIPPED_CONFIG.open("rb") as fileobj:
        return tomllib.load(fileobj)


def credential_names(node: object) -> set[str]:
    """Every NAME of a "credential:NAME" value anywhere in a TOML tree."""
    if isinstance(node, str):
        return {node.removeprefix("credential:")} if node.startswith("credential:") else set()
    if isinstance(node, dict):
        return set().union(*(credential_names(value) for value in node.values()))
    if isinstance(node, list):
        return set().union(*(credential_names(value) for value in node))
    return set()


# ------------------------------------------------------------------ the sandbox rating


def test_unit_sandbox_exposure_is_at_most_1_5() -> None:
    """`systemd-analyze security --offline=true` rates the shipped unit 1.5 or lower.

    Offline mode reads only the unit file: it needs neither a running systemd, nor
    /usr/bin/gatewayd, nor the "gateway" user, so it works on a clean machine.
    """
    analyze = require_systemd_analyze()
    result = run_tool(analyze, "security", "--offline=true", "--no-pager", UNIT)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    # A misspelt or unknown directive is only warned about (and then not counted).
    problems = [line for line in result.stderr.splitlines() if "ignoring" in line.lower()]
    assert not problems, "\n".join(problems)
    found = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", report)
    assert found, f"no overall exposure figure in:\n{report}"
    exposure = float(found.group(1))
    assert exposure <= MAX_EXPOSURE, f"exposure {exposure} > {MAX_EXPOSURE}:\n{report}"
    # The tool's own gate agrees (the threshold is in tenths).
    gated = run_tool(
        analyze, "security", "--offline=true", f"--threshold={int(MAX_EXPOSURE * 10)}", UNIT
    )
    assert gated.returncode == 0, gated.stdout + gated.stderr


def test_unit_verifies_cleanly(tmp_path: Path) -> None:
    """`systemd-analyze verify` finds nothing wrong with the unit.

    verify wants the Exec*= binaries and the targets the unit refers to, so it runs with
    --root on a throw-away tree: the system's unit directory copied in, and stand-ins
    for /usr/bin/gatewayd, /usr/bin/gatewayctl and /bin/kill.
    """
    analyze = require_systemd_analyze()
    system_units = next(
        (Path(p) for p in ("/usr/lib/systemd/system", "/lib/systemd/system") if Path(p).is_dir()),
        None,
    )
    assert system_units is not None, "no systemd unit directory on this machine"
    root = tmp_path / "root"
    shutil.copytree(system_units, root / "usr/lib/systemd/system", symlinks=True)
    shutil.copy(UNIT, root / "usr/lib/systemd/system" / UNIT.name)
    for program in ("usr/bin/gatewayd", "usr/bin/gatewayctl", "bin/kill"):
        stand_in = root / program
        stand_in.parent.mkdir(parents=True, exist_ok=True)
        stand_in.write_text("#!/bin/sh\nexit 0\n")
        stand_in.chmod(0o755)
    result = run_tool(analyze, "verify", f"--root={root}", "--man=no", UNIT.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not result.stderr.strip(), result.stderr


# ------------------------------------------------------------------ what the unit declares


def test_unit_is_a_notify_service_with_watchdog(unit: dict[str, list[str]]) -> None:
    assert last(unit, "Type") == "notify"
    assert last(unit, "NotifyAccess") == "main"
    assert parse_timespan(last(unit, "WatchdogSec")) > 0
    # gatewayctl reload waits for the daemon's answer (a refused configuration fails it)
    assert last(unit, "ExecReload").split()[:2] == ["/usr/bin/gatewayctl", "reload"]
    assert last(unit, "Restart") == "on-failure"
    assert last(unit, "ExecStart").startswith("/usr/bin/gatewayd --config /etc/gateway/")


def test_stop_timeout_covers_the_drain(unit: dict[str, list[str]]) -> None:
    shutdown_timeout = float(shipped_config()["ingress"]["shutdown_timeout"])
    assert parse_timespan(last(unit, "TimeoutStopSec")) > shutdown_timeout


def test_unit_runs_as_the_dedicated_user(unit: dict[str, list[str]]) -> None:
    assert last(unit, "User") == "gateway"
    assert last(unit, "Group") == "gateway"
    assert unit.get("DynamicUser", ["no"])[-1] in ("no", "false")
    assert last(unit, "UMask") == "0077"
    assert last(unit, "NoNewPrivileges") == "yes"
    assert last(unit, "CapabilityBoundingSet") == ""


def test_every_configured_credential_is_loaded(unit: dict[str, list[str]]) -> None:
    wanted = credential_names(shipped_config())
    assert wanted, "the shipped configuration names no credential:NAME"
    loaded = {value.partition(":")[0] for value in unit.get("LoadCredential", [])}
    assert wanted <= loaded, f"no LoadCredential= for {sorted(wanted - loaded)}"
    for value in unit["LoadCredential"]:
        name, _, source = value.partition(":")
        assert source == f"/etc/gateway/credentials/{name}", value


def test_every_path_the_daemon_writes_is_writable(unit: dict[str, list[str]]) -> None:
    """ProtectSystem=strict: what the shipped configuration writes lies in a directory the
    unit makes writable (State-, Logs-, RuntimeDirectory= or ReadWritePaths=)."""
    assert last(unit, "ProtectSystem") == "strict"

    def each(key: str) -> list[str]:  # a directive may list several, space-separated
        return [d for value in unit.get(key, []) for d in value.split()]

    writable = [PurePosixPath("/var/lib", d) for d in each("StateDirectory")]
    writable += [PurePosixPath("/var/log", d) for d in each("LogsDirectory")]
    writable += [PurePosixPath("/run", d) for d in each("RuntimeDirectory")]
    for value in unit.get("ReadWritePaths", []):
        writable += [PurePosixPath(p.lstrip("-")) for p in value.split()]
    config = shipped_config()
    written = [
        config["spool"]["directory"],
        config["spool"]["keystore"],
        config["access_log"]["directory"],
        config["auth"]["devices_file"],
        config["auth"]["users_file"],
    ]
    written += [v for k, v in config.get("audit", {}).items() if k in ("log", "anchor")]
    if "control_socket" in config.get("admin", {}):
        written.append(config["admin"]["control_socket"])
    for path in map(PurePosixPath, written):
        assert path.is_absolute(), path
        assert any(path.is_relative_to(w) for w in writable), f"{path} is read-only in the unit"


def test_unit_keeps_what_a_python_daemon_needs(unit: dict[str, list[str]]) -> None:
    """The sandbox leaves the daemon its system calls and socket families."""
    filters = unit.get("SystemCallFilter", [])
    assert "@system-service" in filters
    assert not any(group in f for f in filters for group in ("@process", "@network-io"))
    families = set(last(unit, "RestrictAddressFamilies").split())
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= families
    assert unit.get("PrivateNetwork", ["no"])[-1] in ("no", "false")


# ------------------------------------------------------------------ sysusers and tmpfiles


def parse_columns(path: Path) -> list[list[str]]:
    """Non-comment lines split like sysusers.d/tmpfiles.d do (double quotes group)."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            rows.append([field.strip('"') for field in re.findall(r'"[^"]*"|\S+', line)])
    return rows


def test_sysusers_declares_the_gateway_user() -> None:
    rows = parse_columns(SYSUSERS)
    assert rows[0][:4] == ["u", "gateway", "-", "Secure transmission gateway"]
    assert rows[0][4:] == ["/var/lib/gateway", "/usr/sbin/nologin"]


def test_sysusers_and_tmpfiles_apply_to_a_scratch_root(tmp_path: Path) -> None:
    """systemd-sysusers creates the user in a scratch root; systemd-tmpfiles then parses
    the tmpfiles file (resolving "gateway" from that root's /etc/passwd) and, as root,
    creates the directories there with the modes and owners the unit expects."""
    sysusers, tmpfiles = systemd_tool("systemd-sysusers"), systemd_tool("systemd-tmpfiles")
    if sysusers is None or tmpfiles is None:
        python_check_of_tmpfiles()  # no systemd tools: at least the columns make sense
        return
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    created = run_tool(sysusers, f"--root={root}", SYSUSERS)
    assert created.returncode == 0, created.stderr
    passwd = {
        line.split(":")[0]: line.split(":")
        for line in (root / "etc/passwd").read_text().splitlines()
    }
    assert "gateway" in passwd, created.stderr
    _, _, uid_text, gid_text, _, home, shell = passwd["gateway"]
    uid, gid = int(uid_text), int(gid_text)
    assert (home, shell) == ("/var/lib/gateway", "/usr/sbin/nologin")
    assert 0 < uid < 1000 and 0 < gid < 1000  # a system user

    # Syntax only (every path excluded): works without privileges.
    parsed = run_tool(tmpfiles, f"--root={root}", "--create", "--exclude-prefix=/", TMPFILES)
    assert parsed.returncode == 0, parsed.stderr
    assert not parsed.stderr.strip(), parsed.stderr
    if os.geteuid() != 0:
        python_check_of_tmpfiles()  # creating root- and gateway-owned directories needs root
        return
    applied = run_tool(tmpfiles, f"--root={root}", "--create", TMPFILES)
    assert applied.returncode == 0, applied.stderr
    expected = {
        "var/lib/gateway": (0o700, uid, gid),
        "var/lib/gateway/spool": (0o700, uid, gid),
        "var/lib/gateway-keystore": (0o700, uid, gid),
        "var/log/gateway": (0o750, uid, gid),
        "etc/gateway": (0o750, 0, gid),
        "etc/gateway/credentials": (0o700, 0, 0),
    }
    for relative, (mode, owner, group) in expected.items():
        st = (root / relative).stat()
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (mode, owner, group), relative


def python_check_of_tmpfiles() -> None:
    rows = parse_columns(TMPFILES)
    users = {row[1] for row in parse_columns(SYSUSERS) if row[0] in ("u", "g")}
    paths = {}
    for row in rows:
        assert len(row) >= 4, row
        kind, path, mode, user, group = (row + ["-"] * 5)[:5]
        assert kind == "d", row
        assert re.fullmatch(r"0[0-7]{3}", mode), row
        assert user in users | {"root"} and group in users | {"root"}, row
        paths[path] = (mode, user, group)
    assert paths["/var/lib/gateway"] == ("0700", "gateway", "gateway")
    assert paths["/var/lib/gateway/spool"] == ("0700", "gateway", "gateway")
    assert paths["/var/lib/gateway-keystore"] == ("0700", "gateway", "gateway")
    assert paths["/etc/gateway"] == ("0750", "root", "gateway")


def test_tmpfiles_and_unit_agree_on_directories(unit: dict[str, list[str]]) -> None:
    paths = {row[1]: row[2] for row in parse_columns(TMPFILES)}
    assert paths["/var/lib/gateway"] == last(unit, "StateDirectoryMode")
    assert paths["/var/log/gateway"] == last(unit, "LogsDirectoryMode")
    assert paths["/etc/gateway"] == last(unit, "ConfigurationDirectoryMode")
    spool = PurePosixPath(shipped_config()["spool"]["directory"])
    assert str(spool) in paths


# ------------------------------------------------------------------ the sd_notify client


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A bound Unix datagram socket standing in for systemd: (NOTIFY_SOCKET value, socket)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        name = str(tmp_path / "notify.sock")
        sock.bind(name)
    else:
        name = f"@gatewayd-test-{uuid.uuid4().hex}"
        sock.bind("\0" + name[1:])
    sock.setblocking(False)
    with sock:
        yield name, sock


def received(sock: socket.socket) -> list[str]:
    """Every datagram queued so far (sends are synchronous: nothing is in flight)."""
    messages = []
    while True:
        try:
            messages.append(sock.recv(4096).decode("utf-8"))
        except BlockingIOError:
            return messages


def test_messages_arrive_exactly(listener: tuple[str, socket.socket]) -> None:
    name, sock = listener
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": name})
    assert notifier is not None
    assert notifier.ready()
    assert notifier.ready("serving 6 channels")
    assert notifier.status("draining: 3 in flight")
    assert notifier.status("two\nlines")
    assert notifier.watchdog()
    assert notifier.stopping()
    assert notifier.extend_timeout(1.5)
    assert notifier.notify(ERRNO=5)
    assert received(sock) == [
        "READY=1\n",
        "READY=1\nSTATUS=serving 6 channels\n",
        "STATUS=draining: 3 in flight\n",
        "STATUS=two lines\n",
        "WATCHDOG=1\n",
        "STOPPING=1\n",
        "EXTEND_TIMEOUT_USEC=1500000\n",
        "ERRNO=5\n",
    ]


def test_reloading_carries_the_monotonic_time(listener: tuple[str, socket.socket]) -> None:
    name, sock = listener
    notifier = Notifier(name)
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    [message] = received(sock)
    found = re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=(\d+)\n", message)
    assert found, message
    assert before <= int(found.group(1)) <= after


def test_invalid_fields_send_nothing(listener: tuple[str, socket.socket]) -> None:
    name, sock = listener
    notifier = Notifier(name)
    assert not notifier.notify()
    assert not notifier.notify(ready=1)
    assert not notifier.notify(**{"A=B": 1})
    assert received(sock) == []


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"NOTIFY_SOCKET": ""},
        {"NOTIFY_SOCKET": "relative/notify"},
        {"NOTIFY_SOCKET": "@"},
        {"NOTIFY_SOCKET": "vsock:2:1234"},
        {"WATCHDOG_USEC": "30000000"},
    ],
)
def test_from_environ_without_a_usable_socket_is_none(environ: dict[str, str]) -> None:
    assert Notifier.from_environ(environ) is None


def test_from_environ_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert Notifier.from_environ() is None
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    notifier = Notifier.from_environ()
    assert notifier is not None
    assert notifier.notify_socket == "/run/systemd/notify"


@pytest.mark.parametrize(
    ("watchdog", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "<self>"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "<other>"}, None),
        ({"WATCHDOG_USEC": "1000"}, 0.0005),
        ({}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
    ],
)
def test_watchdog_interval(watchdog: dict[str, str], expected: float | None) -> None:
    pids = {"<self>": str(os.getpid()), "<other>": str(os.getpid() + 1)}
    environ = {"NOTIFY_SOCKET": "/run/systemd/notify"}
    environ |= {key: pids.get(value, value) for key, value in watchdog.items()}
    notifier = Notifier.from_environ(environ)
    assert notifier is not None
    assert notifier.watchdog_interval() == expected


def test_sending_to_nobody_returns_false(tmp_path: Path) -> None:
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as gone:
        gone.bind(str(stale))  # bound, then closed: the path stays, nobody reads
    plain_file = tmp_path / "plain"
    plain_file.write_text("")
    for name in (
        str(tmp_path / "missing.sock"),
        str(stale),
        str(plain_file),
        f"@gatewayd-test-nobody-{uuid.uuid4().hex}",
        "/" + "x" * 200,  # longer than sockaddr_un allows
    ):
        notifier = Notifier(name)
        assert notifier.ready() is False, name
        assert notifier.watchdog() is False, name
        assert notifier.reloading() is False, name


def test_a_full_queue_does_not_block(listener: tuple[str, socket.socket]) -> None:
    """Nobody reads: once the listener's queue is full, sends fail at once (EAGAIN)."""
    name, _ = listener
    notifier = Notifier(name)
    results = [notifier.watchdog() for _ in range(5000)]
    assert results[0] is True
    assert False in results


def test_invalid_socket_value_is_refused() -> None:
    with pytest.raises(ValueError, match="NOTIFY_SOCKET"):
        Notifier("relative.sock")


async def test_watchdog_loop_pings_until_cancelled(listener: tuple[str, socket.socket]) -> None:
    name, sock = listener
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "30000000"})
    assert notifier is not None
    sleeps: list[float] = []
    third = asyncio.Event()

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 3:
            third.set()
            await asyncio.Future()  # parked here until cancelled
        await asyncio.sleep(0)

    task = asyncio.create_task(watchdog_loop(notifier, sleep=fake_sleep))
    await third.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sleeps == [15.0, 15.0, 15.0]
    assert received(sock) == ["WATCHDOG=1\n"] * 3


async def test_watchdog_loop_explicit_interval(listener: tuple[str, socket.socket]) -> None:
    name, sock = listener
    sleeps: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 2:
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await watchdog_loop(Notifier(name), sleep=fake_sleep, interval=0.25)
    assert sleeps == [0.25, 0.25]
    assert received(sock) == ["WATCHDOG=1\n"] * 2


async def test_watchdog_loop_without_a_watchdog_returns_at_once(
    listener: tuple[str, socket.socket],
) -> None:
    name, sock = listener

    async def never(seconds: float) -> None:
        raise AssertionError("slept without a watchdog")

    await watchdog_loop(None, sleep=never)
    await watchdog_loop(Notifier(name), sleep=never)  # no WATCHDOG_USEC
    other = Notifier(name, watchdog_usec=30_000_000, watchdog_pid=os.getpid() + 1)
    await watchdog_loop(other, sleep=never)
    assert received(sock) == []
