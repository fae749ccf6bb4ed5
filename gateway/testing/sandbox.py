"""A complete throw-away gateway on loopback, shared by the tests, the demo and the bench.

:func:`build_sandbox` makes a PKI with the project's own code, starts one upstream
simulator per destination, writes a master key, the device and staff registries and a
configuration derived from the shipped ``conf/gateway.toml`` (the same six channels on
the same four listeners, each listener on loopback with a port of its own, destinations
pointed at the simulators with a client certificate each, and loopback added to every
channel's source networks); :func:`start_gateway` runs the daemon on it in this event
loop. Devices post to it with :class:`gateway.testing.client.DeviceClient`.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any

import tomli_w
from cryptography.hazmat.primitives.asymmetric import rsa

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
from gateway.daemon import Bound, serve
from gateway.fsutil import write_atomic
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
from gateway.shipped import shipped
from gateway.testing.upstream import Opener, UpstreamSimulator

SHIPPED_CONFIG = shipped("conf/gateway.toml")

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
    clamd_socket: Path | None = None,
) -> Sandbox:
    """Make the PKI, registries, secrets and config; start one simulator per destination.

    The shipped channels scan their photos with clamd; without ``clamd_socket`` the
    sandbox turns scanning off (the demo and most tests have no clamd).
    """
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
            # A recipient knows itself by the recipient_id it agreed with the gateway (it
            # expects that in a sealed payload's binding), not by the gateway's table name.
            dest.get("recipient_id", name),
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
    data["access_log"] = {"directory": str(state / "access"), "retention_days": 400}
    data["spool"].update(
        directory=str(state / "spool"),
        keystore=str(state / "keystore"),
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
        if clamd_socket is None:
            channel["scan"] = False  # no clamd here: scanning only where a test brings one
    if clamd_socket is None:
        data.pop("scanner", None)
    else:
        data["scanner"] = {"clamd_socket": str(clamd_socket), "timeout_seconds": 5}
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
