"""A complete throw-away gateway on loopback, shared by the tests, the demo and the bench.

:func:`build_sandbox` makes a PKI with the project's own code, starts one upstream
simulator per destination, writes a master key, the device and staff registries and a
configuration derived from the shipped ``conf/gateway.toml`` (the same six channels on
the same four listeners, each listener on loopback with a port of its own, destinations
pointed at the simulators with a client certificate each, and loopback added to every
channel's source networks), and :class:`DeviceClient` posts as a real device would:
HTTPS with a client certificate, staff credential in HTTP Basic, multipart body.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import random
import sys
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any

import aiohttp
import tomli_w
from cryptography.hazmat.primitives.asymmetric import rsa
from PIL import Image

from gateway.config import MAX_UNIX_SOCKET_PATH, GatewayConfig, load_config
from gateway.crypto.keys import write_new_master_key
from gateway.crypto.pki import PkiLayout, init_pki
from gateway.crypto.sealed.generate import (
    generate_cms_recipient,
    generate_recipient_key,
    generate_signing_key,
)
from gateway.crypto.sealed.keys import load_signing_key
from gateway.crypto.sealed.upstream_keys import (
    RecipientPrivateKey,
    recipient_private_key_from_pem,
)
from gateway.crypto.tls import client_context
from gateway.daemon import Bound, serve
from gateway.fsutil import write_atomic
from gateway.identity.auth import basic_authorization
from gateway.identity.passwords import hash_password
from gateway.identity.registry import (
    Device,
    DeviceRegistry,
    User,
    UserRegistry,
    save_devices,
    save_users,
)
from gateway.ops.metrics import Metrics
from gateway.relay.workers import Sleep
from gateway.testing.upstream import Opener, UpstreamSimulator

SHIPPED_CONFIG = Path(__file__).resolve().parents[2] / "conf" / "gateway.toml"

DEVICES: Mapping[str, str] = {
    "tablet-01": "assist-tablet",
    "tablet-lost": "assist-tablet",
    "pc-01": "intranet-pc",
    "records-01": "records-terminal",
    "callcentre-01": "callcentre-pc",
    "counter-01": "counter-terminal",
}
REVOKED = frozenset({"tablet-lost"})
CHANNEL_DEVICE: Mapping[str, str] = {
    # the sandbox device that may post on each channel of conf/gateway.toml
    "online-application": "tablet-01",
    "express-issuance": "tablet-01",
    "overseas-application": "pc-01",
    "card-delegation-batch": "records-01",
    "issuance-reservation": "callcentre-01",
    "window-reception": "counter-01",
}
CHANNEL_DESTINATION: Mapping[str, str] = {
    "online-application": "dnp-relay",
    "express-issuance": "jlis-express",
    "overseas-application": "jlis-overseas",
    "card-delegation-batch": "jlis-card-management",
    "issuance-reservation": "ward-issuance",
    "window-reception": "ward-issuance",
}
DEVICE_LISTENER: Mapping[str, str] = {
    # the shipped listener (network) each sandbox device reaches the gateway on
    "tablet-01": "tablets",
    "tablet-lost": "tablets",
    "pc-01": "lgwan",
    "records-01": "jukinet",
    "callcentre-01": "office-lan",
    "counter-01": "office-lan",
}
STAFF: Mapping[str, str] = {
    "staff-001": "correct horse battery",
    "staff-002": "tr0ub4dor&3-xyz",
    "staff-counter": "counter-staff-pass",
}
STAFF_CHANNELS: Mapping[str, tuple[str, ...]] = {
    # staff-001 handles every flow; the others are named for some (取扱者の指定)
    "staff-001": (
        "group:assist-desk",
        "group:overseas-desk",
        "group:records-office",
        "group:reservation-centre",
        "group:issuance-counter",
    ),
    "staff-002": ("group:assist-desk",),
    "staff-counter": ("window-reception",),
}
UPSTREAM_CREDENTIAL = ("ward-shinjuku", "lgwan-secret-pass")
FAST_SCRYPT_N = 2**10  # sandboxes only: production hashes use registry.SCRYPT_N


def shipped_config_data(path: Path = SHIPPED_CONFIG) -> dict[str, Any]:
    with path.open("rb") as handle:
        return tomllib.load(handle)


@lru_cache(maxsize=16)
def make_jpeg(
    width: int = 600,
    height: int = 800,
    *,
    mode: str = "RGB",
    quality: int = 85,
    seed: int = 1,
    noise: float = 1.0,
) -> bytes:
    """A JPEG of the given size: noise blended into a gradient so it compresses like a photo."""
    rng = random.Random(seed)  # noqa: S311 - test data, not secrets
    bands = len(mode)
    base = Image.linear_gradient("L").resize((width, height))
    if mode != "L":
        base = Image.merge(mode, [base] * bands)
    noisy = Image.frombytes(mode, (width, height), rng.randbytes(width * height * bands))
    image = Image.blend(base, noisy, noise) if noise < 1.0 else noisy
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def photo_of_size(target_bytes: int) -> bytes:
    """A valid face photo of roughly ``target_bytes`` (for the bench)."""
    side = 480
    while True:
        data = make_jpeg(side, side * 4 // 3, quality=85)
        if len(data) >= target_bytes * 0.9 or side >= 6000:
            return data
        side = int(side * (target_bytes / len(data)) ** 0.5) + 16


APPLICATION_ID = "12345678901234567890123"
INDIVIDUAL_NUMBER = "983205673214"


def sample_submission(channel: str) -> tuple[dict[str, str], dict[str, bytes]]:
    """Realistic valid fields and files for each of the six channels (fictional people)."""
    photo = make_jpeg()
    common = {
        "application_id": APPLICATION_ID,
        "wants_e_certificate": "true",
        "wants_braille": "false",
    }
    pins = {
        "pin_signature_cert": "ABC12345",
        "pin_user_cert": "1234",
        "pin_resident_registry": "5678",
        "pin_card_info_input": "9012",
    }
    window = {  # items of 交付窓口受付業務 (fictional person and address)
        "name": "新宿 花子",
        "birth_date": "1985-04-01",
        "address": "東京都新宿区架空町1-2-3",
        "manufacture_control_number": "M-0000123456",
        "shipment_number": "S-2026-004567",
        "reservation_number": "R-2026-000123",
        "recipient_type": "self",
        "reservation_datetime": "2026-12-01T10:30:00+09:00",
        "issuance_window": "本庁舎1階 3番窓口",
        "reception_number": "U-0042",
    }
    reservation = {  # items of 予約電話受付業務
        **window,
        "application_id": APPLICATION_ID,
        "processing_status": "reserved",
        "card_expiry_date": "2036-04-01",
        "phone": "03-5555-0123",
        "email": "hanako@example.jp",
    }
    if channel == "online-application":
        return common, {"face_photo": photo}
    if channel == "express-issuance":
        return {**common, **pins}, {"face_photo": photo}
    if channel == "overseas-application":
        return (
            {
                **common,
                **pins,
                "name": "新宿 太郎",
                "name_kana": "シンジュク タロウ",
                "birth_date": "1990-01-31",
                "sex": "1",
                "registered_domicile": "東京都新宿区",
            },
            {"face_photo": photo},
        )
    if channel == "card-delegation-batch":
        batch = random.Random(7).randbytes(50_000)  # noqa: S311 - an opaque test file
        return (
            {
                "batch_id": "B-20261122-01",
                "record_count": "42",
                "sha256": hashlib.sha256(batch).hexdigest(),
            },
            {"batch_file": batch},
        )
    if channel == "issuance-reservation":
        return reservation, {}
    if channel == "window-reception":
        return {**window, "individual_number": INDIVIDUAL_NUMBER}, {}
    raise KeyError(channel)


def multipart_body(fields: Mapping[str, str], files: Mapping[str, bytes]) -> tuple[bytes, str]:
    """A finished multipart/form-data body and its Content-Type, built once for reuse."""
    boundary = "bench" + hashlib.sha256(repr(sorted(fields.items())).encode()).hexdigest()[:24]
    parts = []
    for name, value in fields.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
            + value.encode()
            + b"\r\n"
        )
    for name, data in files.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
            f'filename="{name}.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'.encode()
            + data
            + b"\r\n"
        )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def encode_form(fields: Mapping[str, str], files: Mapping[str, bytes]) -> aiohttp.FormData:
    form = aiohttp.FormData(quote_fields=False, default_to_multipart=True)
    for name, value in fields.items():
        form.add_field(name, value)
    for name, data in files.items():
        media = "image/jpeg" if name == "face_photo" else "application/octet-stream"
        form.add_field(name, data, filename=f"{name}.bin", content_type=media)
    return form


@dataclass
class Sandbox:
    """Everything a loopback gateway needs, in one directory."""

    dir: Path
    pki: PkiLayout
    config_path: Path
    simulators: dict[str, UpstreamSimulator]
    config: GatewayConfig | None = None

    def reload_config(self) -> GatewayConfig:
        self.config = load_config(self.config_path)
        return self.config

    def edit_config(self, change: Callable[[dict[str, Any]], None]) -> None:
        """Rewrite the configuration file through ``change`` (the daemon's view changes
        on reload; ``self.config`` on :meth:`reload_config`)."""
        data = tomllib.loads(self.config_path.read_text("utf-8"))
        change(data)
        self.config_path.write_text(tomli_w.dumps(data), "utf-8")

    async def stop_simulators(self) -> None:
        for sim in self.simulators.values():
            await sim.stop()


def _secret(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, content, mode=0o600)
    return path


@lru_cache(maxsize=8)
def _cms_recipient(name: str) -> tuple[bytes, RecipientPrivateKey]:
    """A CMS recipient per destination name and process, as (certificate PEM, private
    key): making an RSA-3072 key takes about a second, and loading one back checks it
    (about 0.15 s), so neither is done per sandbox."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    private, certificate = generate_cms_recipient(name, key=key)
    return certificate, recipient_private_key_from_pem(private, certificate_pem=certificate)


def _recipient_file(name: str, dest: Mapping[str, Any]) -> str:
    return f"{name}.pem" if dest["payload_encryption"] == "cms" else f"{name}.pub"


def _payload_keys(
    directory: Path,
    destinations: Mapping[str, Mapping[str, Any]],
    simulators: Mapping[str, UpstreamSimulator],
    secrets_dir: Path,
) -> Path:
    """A signing key for the gateway, and a recipient key pair for each destination that
    seals payloads: the public half for the gateway, the private half for its simulator."""
    signing = secrets_dir / "payload-signing.key"
    if not signing.exists():
        _secret(signing, generate_signing_key("ed25519"))
    verify = load_signing_key(signing).verify_key
    recipients = directory / "recipients"
    recipients.mkdir(exist_ok=True)
    for name, dest in destinations.items():
        kind = dest.get("payload_encryption", "none")
        if kind == "none":
            continue
        if kind == "cms":
            public, recipient_key = _cms_recipient(name)
        else:
            private, public = generate_recipient_key(dest.get("payload_kem", "x25519"))
            recipient_key = recipient_private_key_from_pem(private)
        write_atomic(recipients / _recipient_file(name, dest), public, mode=0o644)
        simulators[name].opener = Opener(recipient_key, (verify,))
    return signing


def _control_socket(state: Path) -> Path:
    """``state/control.sock``, or a short name in /tmp when that path is too long to bind."""
    path = state / "control.sock"
    if len(os.fsencode(path)) <= MAX_UNIX_SOCKET_PATH:
        return path
    digest = hashlib.sha256(os.fsencode(path)).hexdigest()[:16]
    return Path("/tmp") / f"gateway-{digest}.sock"  # noqa: S108 - unique per sandbox


async def build_sandbox(
    directory: Path,
    *,
    base: Path = SHIPPED_CONFIG,
    overrides: Mapping[str, Any] | None = None,
    start_simulators: bool = True,
    simulator_ports: Mapping[str, int] | None = None,
    listener_ports: Mapping[str, int] | None = None,
) -> Sandbox:
    """Make the PKI, registries, secrets and config; start one simulator per destination."""
    data = shipped_config_data(base)
    destinations: dict[str, Any] = data["destinations"]
    pki = init_pki(
        directory / "pki", devices=tuple(DEVICES), upstreams=tuple(destinations), overwrite=True
    )
    simulators: dict[str, UpstreamSimulator] = {}
    for name, dest in destinations.items():
        credential = UPSTREAM_CREDENTIAL if "credential" in dest else None
        upstream = pki.upstreams[name]
        sim = UpstreamSimulator(
            name,
            cert=upstream.cert,
            key=upstream.key,
            client_ca=pki.gateway_ca.cert,
            credential=credential,
            port=(simulator_ports or {}).get(name, 0),
        )
        if start_simulators:
            await sim.start()
        simulators[name] = sim
    secrets_dir = directory / "secrets"
    master = secrets_dir / "spool-master.key"
    if not master.exists():
        secrets_dir.mkdir(parents=True, exist_ok=True)
        write_new_master_key(master)
    credential_file = _secret(
        secrets_dir / "upstream.credential", ":".join(UPSTREAM_CREDENTIAL).encode()
    )
    state = directory / "state"
    state.mkdir(exist_ok=True)
    save_devices(
        state / "devices.json",
        DeviceRegistry(
            tuple(
                Device(d, pki.devices[d].fingerprint, group, d in REVOKED)
                for d, group in DEVICES.items()
            )
        ),
    )
    save_users(
        state / "users.json",
        UserRegistry(
            tuple(
                User(u, hash_password(p, n=FAST_SCRYPT_N), channels=STAFF_CHANNELS[u])
                for u, p in STAFF.items()
            )
        ),
    )

    data["ingress"].update(shutdown_timeout=5)
    for name, listener in data["listeners"].items():
        listener.update(
            host="127.0.0.1",
            port=(listener_ports or {}).get(name, 0),
            certificate=str(pki.gateway_server.cert),
            private_key=str(pki.gateway_server.key),
            client_ca=str(pki.device_ca.cert),
        )
    data["admin"].update(host="127.0.0.1", port=0, control_socket=str(_control_socket(state)))
    data["audit"] = {"log": str(state / "audit.jsonl"), "anchor": str(state / "audit.anchor")}
    data["spool"].update(
        directory=str(state / "spool"),
        master_key=str(master),
        quota_bytes=8 * 1024**3,
        min_free_bytes=64 * 1024**2,
    )
    data["auth"].update(
        devices_file=str(state / "devices.json"), users_file=str(state / "users.json")
    )
    signing_key = _payload_keys(directory, destinations, simulators, secrets_dir)
    for name, dest in destinations.items():
        if dest.get("payload_encryption", "none") != "none":
            dest.update(
                recipient_key=str(directory / "recipients" / _recipient_file(name, dest)),
                recipient_key_not_after=date.today() + timedelta(days=365),
                signing_key=str(signing_key),
            )
        dest.update(
            url=simulators[name].url
            if start_simulators
            else f"https://localhost:{(simulator_ports or {}).get(name, 9)}/submissions",
            ca=str(pki.upstream_ca.cert),
            client_certificate=str(pki.clients[name].cert),
            client_key=str(pki.clients[name].key),
        )
        dest.pop("source_address", None)  # the shipped networks' addresses are not here
        dest.setdefault("retry", {}).update(initial_backoff=0.05, max_backoff=0.5)
        if "credential" in dest:
            dest["credential"] = str(credential_file)
    for channel in data["channels"].values():
        channel["source_networks"] = [*channel["source_networks"], "127.0.0.0/8", "::1/128"]
    for dotted, value in (overrides or {}).items():
        target = data
        *parents, last = dotted.split(".")
        for part in parents:
            target = target.setdefault(part, {})
        target[last] = value
    config_path = directory / "gateway.toml"
    config_path.write_text(tomli_w.dumps(data), "utf-8")
    sandbox = Sandbox(directory, pki, config_path, simulators)
    sandbox.reload_config()
    return sandbox


@dataclass
class RunningGateway:
    """A daemon running in this event loop, as the tests, the demo and the bench use it."""

    bound: Bound
    metrics: Metrics
    stop: asyncio.Event
    task: asyncio.Task[None]

    async def shutdown(self) -> None:
        self.stop.set()
        await self.task

    def port_of(self, device_id: str) -> int:
        """The port of the listener a sandbox device reaches the gateway on."""
        return self.bound.ports[DEVICE_LISTENER[device_id]]


async def start_gateway(
    config: GatewayConfig,
    *,
    sleep: Sleep = asyncio.sleep,
    clock: Callable[[], float] = time.time,
    metrics: Metrics | None = None,
    config_path: Path | None = None,
) -> RunningGateway:
    """Start :func:`gateway.daemon.serve` as a task; returns once it listens.

    With ``config_path``, ``running.bound.reload()`` reads that file again (SIGHUP)."""
    stop = asyncio.Event()
    ready: asyncio.Future[Bound] = asyncio.get_running_loop().create_future()
    metrics = metrics or Metrics()
    task = asyncio.create_task(
        serve(
            config,
            shutdown_trigger=stop.wait,
            sleep=sleep,
            clock=clock,
            metrics=metrics,
            on_ready=ready.set_result,
            config_path=config_path,
        )
    )
    waiters: set[asyncio.Future[Any]] = {task, ready}
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()
        raise RuntimeError("the gateway stopped before it was ready")
    return RunningGateway(ready.result(), metrics, stop, task)


@dataclass
class Reply:
    status: int
    body: dict[str, Any]
    headers: Mapping[str, str]


class DeviceClient:
    """A ward device: its own client certificate, a staff login, multipart posts."""

    def __init__(
        self,
        sandbox: Sandbox | PkiLayout,
        device_id: str,
        *,
        port: int,
        host: str = "localhost",
        user: str = "staff-001",
        password: str | None = None,
        limit: int = 100,
        trace_configs: list[aiohttp.TraceConfig] | None = None,
    ) -> None:
        pki = sandbox.pki if isinstance(sandbox, Sandbox) else sandbox
        device = pki.devices[device_id]
        context = client_context(ca=pki.gateway_ca.cert, cert=device.cert, key=device.key)
        # A listener on another loopback address is still "localhost" to its certificate.
        self.base = f"https://{host}:{port}"
        self.server_hostname = None if host == "localhost" else "localhost"
        self.authorization = basic_authorization(
            user, STAFF.get(user, "") if password is None else password
        )
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=context, limit=limit), trace_configs=trace_configs
        )

    async def close(self) -> None:
        await self.session.close()

    async def __aenter__(self) -> DeviceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _headers(self, extra: Mapping[str, str] | None) -> dict[str, str]:
        return {"Authorization": self.authorization, **(extra or {})}

    async def submit(
        self,
        channel: str,
        fields: Mapping[str, str],
        files: Mapping[str, bytes] | None = None,
        *,
        idempotency_key: str | None = None,
        headers: Mapping[str, str] | None = None,
        data: Any = None,
    ) -> Reply:
        extra = dict(headers or {})
        if idempotency_key:
            extra["Idempotency-Key"] = idempotency_key
        body = data if data is not None else encode_form(fields, files or {})
        async with self.session.post(
            f"{self.base}/v1/channels/{channel}/submissions",
            data=body,
            headers=self._headers(extra),
            server_hostname=self.server_hostname,
        ) as response:
            return Reply(response.status, await _json(response), dict(response.headers))

    async def post_raw(
        self, channel: str, body: bytes, content_type: str, headers: Mapping[str, str] | None = None
    ) -> int:
        """Post a prepared body; returns the status only (for load generation)."""
        extra = {"Content-Type": content_type, **(headers or {})}
        async with self.session.post(
            f"{self.base}/v1/channels/{channel}/submissions",
            data=body,
            headers=self._headers(extra),
            server_hostname=self.server_hostname,
        ) as response:
            await response.read()
            return response.status

    async def status(self, submission_id: str) -> Reply:
        async with self.session.get(
            f"{self.base}/v1/submissions/{submission_id}",
            headers=self._headers(None),
            server_hostname=self.server_hostname,
        ) as response:
            return Reply(response.status, await _json(response), dict(response.headers))


async def _json(response: aiohttp.ClientResponse) -> dict[str, Any]:
    text = await response.text()
    try:
        doc = json.loads(text)
    except ValueError:
        return {"_text": text}
    return doc if isinstance(doc, dict) else {"_value": doc}


class DaemonProcess:
    """``gatewayd`` as a separate process (crash tests and the bench).

    Waits for the daemon's ``ready`` log line to learn its port, then copies its JSON log
    lines to ``log_path`` while it runs.
    """

    def __init__(
        self, config_path: Path, log_path: Path, *, env: Mapping[str, str] | None = None
    ) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.process: asyncio.subprocess.Process | None = None
        self.ports: dict[str, int] = {}
        self._pump: asyncio.Task[None] | None = None

    async def start(self, *, ready_within: float = 30.0) -> DaemonProcess:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.cli.gatewayd",
            "--config",
            str(self.config_path),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=self.env,
        )
        assert self.process.stderr is not None
        log = self.log_path.open("ab")
        async with asyncio.timeout(ready_within):
            while True:
                line = await self.process.stderr.readline()
                if not line:
                    log.close()
                    raise RuntimeError(f"gatewayd exited before ready (log: {self.log_path})")
                log.write(line)
                event = _json_line(line)
                if event.get("event") == "ready":
                    self.ports = {str(k): int(v) for k, v in event["ports"].items()}
                    break
        self._pump = asyncio.create_task(self._copy(self.process.stderr, log))
        return self

    @staticmethod
    async def _copy(stream: asyncio.StreamReader, log: Any) -> None:
        try:
            while line := await stream.readline():
                log.write(line)
                log.flush()  # readable by a test waiting for a line
        finally:
            log.close()

    def port_of(self, device_id: str) -> int:
        """The port of the listener a sandbox device reaches the gateway on."""
        return self.ports[DEVICE_LISTENER[device_id]]

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def kill(self) -> int:
        """SIGKILL: no drain, no cleanup; what a power cut or an OOM kill does."""
        assert self.process is not None
        self.process.kill()
        return await self._reap()

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    async def terminate(self) -> int:
        """SIGTERM: the daemon drains and exits."""
        assert self.process is not None
        self.process.terminate()
        return await self._reap()

    async def _reap(self) -> int:
        assert self.process is not None
        code = await self.process.wait()
        if self._pump is not None:
            await self._pump
        return code

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks

    def _status(self, key: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        return 0

    def rss_bytes(self) -> int:
        return self._status("VmRSS")

    def peak_rss_bytes(self) -> int:
        return self._status("VmHWM")

    def helpers(self) -> list[int]:
        """Pids of the daemon's descendants (the photo-check fork server and workers)."""
        parents: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                parents[int(entry.name)] = int(stat[1])
        found: list[int] = []
        frontier = {self.pid}
        while frontier:
            frontier = {pid for pid, ppid in parents.items() if ppid in frontier}
            found.extend(frontier)
        return found

    def helpers_cpu_seconds(self) -> float:
        total = 0.0
        for pid in self.helpers():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def helpers_peak_rss_bytes(self) -> int:
        """Sum of the helpers' peak RSS (an upper bound of their peak together)."""
        total = 0
        for pid in self.helpers():
            try:
                text = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) * 1024
        return total

    async def __aenter__(self) -> DaemonProcess:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        if self.process is not None and self.process.returncode is None:
            await self.terminate()


def _json_line(line: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(line)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}
