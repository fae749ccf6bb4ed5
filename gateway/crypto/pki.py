"""Development and test PKI: three CAs and their leaf certificates (ECDSA P-256, SHA-256).

Layout of a PKI directory (``gatewayctl pki init``)::

    device-ca        signs device (tablet/PC) client certificates
    gateway-ca       signs the gateway's server and client certificates
    upstream-ca      stands in for J-LIS / a contractor; signs upstream server certificates
    gateway-server   server auth; SAN localhost, 127.0.0.1, ::1 (+ extra hostnames)
    gateway-client   client auth, CN "gateway"
    upstream-<name>  server auth per upstream; SAN localhost, 127.0.0.1, ::1
    client-<name>    client auth: the gateway's own certificate for that destination
    device-<id>      client auth per device, CN = device id

Each name has ``<name>.pem`` (certificate, 0644) and ``<name>.key`` (PKCS#8 PEM,
unencrypted, 0600, written atomically). ``pki.json`` lists the device ids and upstream
names only; it is written last, so a directory with it is complete.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.crypto.certs import (
    Ca,
    Issued,
    PkiError,
    cert_fingerprint,
    load_cert,
    load_cert_der,
    load_key,
    loopback_sans,
    make_ca,
    make_leaf,
    now_utc,
    server_sans,
)
from gateway.fsutil import write_atomic

__all__ = [
    "MANIFEST",
    "PkiExistsError",
    "PkiLayout",
    "init_pki",
    "issue_device",
    "load_layout",
    "reissue_gateway_server",
]

MANIFEST = "pki.json"
_MANIFEST_VERSION = 1
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_NAME_RULE = "must match ^[a-z0-9][a-z0-9._-]{0,62}$"


class PkiExistsError(PkiError, FileExistsError):
    """``init_pki`` would overwrite an existing PKI (or a device already exists)."""


def _check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(f"{kind} {_NAME_RULE}")
    return name


@dataclass(frozen=True)
class PkiLayout:
    """Every certificate of a development PKI directory."""

    dir: Path
    device_ca: Issued
    gateway_ca: Issued
    upstream_ca: Issued
    gateway_server: Issued
    gateway_client: Issued
    upstreams: Mapping[str, Issued]
    devices: Mapping[str, Issued]
    clients: Mapping[str, Issued]
    """The gateway's own client certificate for each upstream (one per destination)."""


def _issue_device(directory: Path, device_ca: Ca, device_id: str, now: datetime) -> Issued:
    return make_leaf(
        directory,
        f"device-{device_id}",
        device_ca,
        common_name=device_id,
        sans=[x509.DNSName(device_id)],
        server=False,
        now=now,
    )


def _issue_client(directory: Path, gateway_ca: Ca, upstream: str, now: datetime) -> Issued:
    return make_leaf(
        directory,
        f"client-{upstream}",
        gateway_ca,
        common_name=f"gateway-{upstream}",
        sans=[x509.DNSName("gateway")],
        server=False,
        now=now,
    )


def _unique(kind: str, names: Sequence[str]) -> list[str]:
    if isinstance(names, str):
        raise TypeError(f"{kind} must be a sequence of names, not a string")
    out: list[str] = []
    for name in names:
        _check_name(kind, name)
        if name in out:
            raise ValueError(f"{kind} must be unique")
        out.append(name)
    return out


# --------------------------------------------------------------------------- manifest


def _read_manifest(directory: Path) -> tuple[list[str], list[str]]:
    path = directory / MANIFEST
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise PkiError(f"{path}: no PKI manifest (run pki init first)") from exc
    except (OSError, ValueError) as exc:
        raise PkiError(f"{path}: unreadable PKI manifest") from exc
    if not isinstance(doc, dict) or doc.get("version") != _MANIFEST_VERSION:
        raise PkiError(f"{path}: unsupported PKI manifest version")
    lists: list[list[str]] = []
    for key in ("devices", "upstreams"):
        value = doc.get(key)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise PkiError(f"{path}: {key} must be a list of names")
        try:
            lists.append(_unique(key, value))
        except ValueError as exc:
            raise PkiError(f"{path}: {exc}") from exc
    return lists[0], lists[1]


def _write_manifest(directory: Path, devices: Sequence[str], upstreams: Sequence[str]) -> None:
    doc = {"version": _MANIFEST_VERSION, "devices": list(devices), "upstreams": list(upstreams)}
    data = (json.dumps(doc, indent=2) + "\n").encode("utf-8")
    write_atomic(directory / MANIFEST, data, mode=0o644)


def _issued_from_disk(directory: Path, name: str) -> Issued:
    cert = directory / f"{name}.pem"
    key = directory / f"{name}.key"
    if not key.is_file():
        raise PkiError(f"{key}: missing private key")
    return Issued(name=name, cert=cert, key=key, fingerprint=cert_fingerprint(load_cert_der(cert)))


def _load_ca(directory: Path, name: str) -> Ca:
    cert = load_cert(directory / f"{name}.pem")
    key = load_key(directory / f"{name}.key")
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(
        serialization.Encoding.DER, spki
    ) != key.public_key().public_bytes(serialization.Encoding.DER, spki):
        raise PkiError(f"{directory / name}.key: does not match {name}.pem")
    return Ca(cert, key)


# --------------------------------------------------------------------------- public API


def init_pki(
    directory: Path,
    *,
    devices: Sequence[str] = ("tablet-01",),
    upstreams: Sequence[str] = ("upstream",),
    hostnames: Sequence[str] = ("localhost",),
    now: datetime | None = None,
    overwrite: bool = False,
) -> PkiLayout:
    """Create a complete development PKI in ``directory`` and return its layout."""
    device_ids = _unique("device id", devices)
    upstream_names = _unique("upstream name", upstreams)
    if isinstance(hostnames, str):
        raise TypeError("hostnames must be a sequence of names, not a string")
    sans = server_sans(hostnames)
    at = now_utc(now)
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    manifest = directory / MANIFEST
    stale: list[str] = []
    if manifest.exists():
        if not overwrite:
            raise PkiExistsError(f"{manifest}: a PKI already exists here (use overwrite)")
        with contextlib.suppress(PkiError):
            old_devices, old_upstreams = _read_manifest(directory)
            stale = [f"device-{d}" for d in old_devices if d not in device_ids]
            stale += [f"upstream-{u}" for u in old_upstreams if u not in upstream_names]
            stale += [f"client-{u}" for u in old_upstreams if u not in upstream_names]
        manifest.unlink()  # the directory is incomplete until the new manifest is written

    device_ca, device_ca_k = make_ca(directory, "device-ca", "Gateway Dev Device CA", at)
    gateway_ca, gateway_ca_k = make_ca(directory, "gateway-ca", "Gateway Dev Gateway CA", at)
    upstream_ca, upstream_ca_k = make_ca(directory, "upstream-ca", "Gateway Dev Upstream CA", at)
    gateway_server = make_leaf(
        directory,
        "gateway-server",
        gateway_ca_k,
        common_name="gateway-server",
        sans=sans,
        server=True,
        now=at,
    )
    gateway_client = make_leaf(
        directory,
        "gateway-client",
        gateway_ca_k,
        common_name="gateway",
        sans=[x509.DNSName("gateway")],
        server=False,
        now=at,
    )
    upstream_certs = {
        u: make_leaf(
            directory,
            f"upstream-{u}",
            upstream_ca_k,
            common_name=u,
            sans=loopback_sans(),
            server=True,
            now=at,
        )
        for u in upstream_names
    }
    client_certs = {u: _issue_client(directory, gateway_ca_k, u, at) for u in upstream_names}
    device_certs = {d: _issue_device(directory, device_ca_k, d, at) for d in device_ids}
    for name in stale:
        for suffix in (".pem", ".key"):
            with contextlib.suppress(FileNotFoundError):
                (directory / f"{name}{suffix}").unlink()
    _write_manifest(directory, device_ids, upstream_names)
    return PkiLayout(
        dir=directory,
        device_ca=device_ca,
        gateway_ca=gateway_ca,
        upstream_ca=upstream_ca,
        gateway_server=gateway_server,
        gateway_client=gateway_client,
        upstreams=upstream_certs,
        devices=device_certs,
        clients=client_certs,
    )


def issue_device(layout_dir: Path, device_id: str, *, now: datetime | None = None) -> Issued:
    """Issue one more device client certificate from the device CA in ``layout_dir``."""
    _check_name("device id", device_id)
    at = now_utc(now)
    directory = Path(layout_dir)
    devices, upstreams = _read_manifest(directory)
    if device_id in devices:
        raise PkiExistsError(f"{directory / MANIFEST}: device {device_id!r} already issued")
    issued = _issue_device(directory, _load_ca(directory, "device-ca"), device_id, at)
    _write_manifest(directory, [*devices, device_id], upstreams)
    return issued


def reissue_gateway_server(
    layout_dir: Path, *, hostnames: Sequence[str] = ("localhost",), now: datetime | None = None
) -> Issued:
    """A new key and certificate for the gateway's server, from the same gateway CA,
    written over the old files (certificate rotation: then reload the daemon)."""
    directory = Path(layout_dir)
    return make_leaf(
        directory,
        "gateway-server",
        _load_ca(directory, "gateway-ca"),
        common_name="gateway-server",
        sans=server_sans(hostnames),
        server=True,
        now=now_utc(now),
    )


def load_layout(directory: Path) -> PkiLayout:
    """Re-read a PKI directory written by :func:`init_pki`."""
    directory = Path(directory)
    devices, upstreams = _read_manifest(directory)
    return PkiLayout(
        dir=directory,
        device_ca=_issued_from_disk(directory, "device-ca"),
        gateway_ca=_issued_from_disk(directory, "gateway-ca"),
        upstream_ca=_issued_from_disk(directory, "upstream-ca"),
        gateway_server=_issued_from_disk(directory, "gateway-server"),
        gateway_client=_issued_from_disk(directory, "gateway-client"),
        upstreams={u: _issued_from_disk(directory, f"upstream-{u}") for u in upstreams},
        devices={d: _issued_from_disk(directory, f"device-{d}") for d in devices},
        clients={u: _issued_from_disk(directory, f"client-{u}") for u in upstreams},
    )
