"""The configuration tree: one frozen pydantic model per table, unknown keys refused.

Listeners (one per network), destinations, channels and channel groups, the spool,
the registries, the audit log and the admin listener. Build it with
:func:`gateway.config.load.load_config`, which reports every problem by dotted key.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from datetime import date, time
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway.channels.fields import FORMAT_NAMES, SAFE_FIELD_NAME
from gateway.config.types import (
    BATCH_MANIFEST,
    FILE_FORMATS,
    MAX_BODY_LIMIT,
    MAX_UNIX_SOCKET_PATH,
    IpAddress,
    Name,
    Network,
    Port,
    RelPath,
    SecretRef,
)


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class IngressConfig(_Model):
    """HTTP settings every device-facing listener shares."""

    keepalive_timeout: Annotated[float, Field(gt=0, le=3600)] = 75.0
    shutdown_timeout: Annotated[float, Field(gt=0, le=600)] = 30.0
    body_idle_timeout: Annotated[float, Field(gt=0, le=600)] = 30.0


class ListenerConfig(_Model):
    """One device-facing HTTPS listener, on one network (one listener per network).

    Each has its own address, server certificate, device CA and TLS profile: a device
    certificate from one network's CA is refused in the handshake on another, and a
    channel is served only on the listeners it names.
    """

    host: IpAddress
    port: Port = 8443
    certificate: RelPath
    private_key: SecretRef
    client_ca: RelPath
    tls_profile: Literal["intermediate", "modern"] = "intermediate"

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class AdminConfig(_Model):
    """The operators' listener: metrics and health, loopback by default, no personal data.

    ``control_socket`` is a Unix socket (mode 0600) through which ``gatewayctl spool
    requeue|erase`` reach the running daemon; None turns it off.
    """

    enabled: bool = True
    host: str = "127.0.0.1"
    """Loopback by default; for a central Prometheus, an address of the operators'
    network together with ``bearer_token``."""
    port: Port = 9464
    control_socket: RelPath | None = None
    bearer_token: SecretRef | None = None
    """A 0600 file or ``credential:NAME`` holding the token a scraper must send as
    ``Authorization: Bearer TOKEN`` for ``/metrics`` (``/healthz`` and ``/readyz`` stay
    open: they say nothing but up or not)."""

    @model_validator(mode="after")
    def _socket_path_fits(self) -> AdminConfig:
        if self.control_socket and len(bytes(self.control_socket)) > MAX_UNIX_SOCKET_PATH:
            raise ValueError(
                f"control_socket: a Unix socket path is at most {MAX_UNIX_SOCKET_PATH} bytes"
            )
        return self


class AuditConfig(_Model):
    """The operations audit log (管理業務の作業記録): append-only and hash-chained.

    The anchor holds the log's head (to catch a cut-off tail); keep it on another file
    system or copy it away from time to time.
    """

    log: RelPath
    anchor: RelPath | None = None


class ScannerConfig(_Model):
    """clamd, for the channels that set ``scan``: INSTREAM over its Unix socket."""

    clamd_socket: RelPath
    timeout_seconds: Annotated[float, Field(gt=0, le=300)] = 10.0
    """A scan that takes longer (or clamd gone) is a 503 with Retry-After: fail closed."""


class AccessLogConfig(_Model):
    """The access log (アクセスログ): every request attempt, hash-chained, a file a day
    (JST), kept ``retention_days`` (then removed, each removal in the audit log)."""

    directory: RelPath | None = None
    """Where the daily files go; by default ``access/`` beside the spool."""
    retention_days: Annotated[int, Field(ge=1, le=3650)] = 400
    office_opens: time = time(8, 30)
    """When the office opens (JST); the review lists activity outside its hours."""
    office_closes: time = time(17, 15)
    office_closed_days: tuple[date, ...] = ()
    """The office's own closures, besides weekends, national holidays and 12/29–1/3."""
    idle_days: Annotated[int, Field(ge=1)] = 90
    """The review lists devices and users not seen for this long (revocation candidates)."""


class SpoolConfig(_Model):
    """Where accepted submissions are kept, encrypted, until delivered and erased."""

    backend: Literal["sqlite", "postgresql"] = "sqlite"
    """``sqlite``: one node, an index and a file per record in ``directory``.
    ``postgresql``: several nodes share one spool in the database ``dsn`` names, and
    ``directory`` holds only this node's uploads being received."""
    directory: RelPath
    master_key: SecretRef
    dsn: SecretRef | None = None
    """postgresql: the libpq connection string (it carries a password: a secret file or a
    systemd credential, never inline)."""
    node_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")] | None = None
    """postgresql: this node's name in claims and logs; by default the host name."""
    lease_seconds: Annotated[float, Field(ge=5, le=3600)] = 60.0
    """postgresql: how long a claim on a record lasts unless renewed; a dead node's
    records are delivered by another node after at most this long."""
    pool_size: Annotated[int, Field(ge=2, le=100)] = 10
    """postgresql: connections this node keeps to the database."""
    keystore: RelPath | None = None
    """The epoch keystore's directory; by default ``keystore/`` beside the spool. Keep it
    out of backups (or keep its backups no longer than the retention)."""
    quota_bytes: Annotated[int, Field(gt=0)] = 20 * 1024**3
    min_free_bytes: Annotated[int, Field(ge=0)] = 1024**3
    retry_after_seconds: Annotated[int, Field(ge=1, le=3600)] = 30

    @model_validator(mode="after")
    def _dsn_with_postgresql(self) -> SpoolConfig:
        if self.backend == "postgresql" and self.dsn is None:
            raise ValueError('dsn: required with backend = "postgresql"')
        if self.backend == "sqlite" and self.dsn is not None:
            raise ValueError('dsn: only with backend = "postgresql"')
        return self


class AuthConfig(_Model):
    """Device and staff registries and the staff password policy."""

    devices_file: RelPath
    users_file: RelPath
    max_failures: Annotated[int, Field(ge=1, le=100)] = 5
    lockout_seconds: Annotated[int, Field(ge=1, le=86400)] = 900
    credential_cache_seconds: Annotated[int, Field(ge=0, le=3600)] = 300


class RetryConfig(_Model):
    """Exponential backoff with full jitter; ``Retry-After`` wins when it asks for longer."""

    initial_backoff: Annotated[float, Field(gt=0, le=3600)] = 1.0
    max_backoff: Annotated[float, Field(gt=0, le=86400)] = 300.0
    max_retry_after: Annotated[float, Field(gt=0, le=86400)] = 3600.0
    circuit_threshold: Annotated[int, Field(ge=1, le=1000)] = 5
    circuit_cooldown: Annotated[float, Field(gt=0, le=3600)] = 30.0


class DestinationConfig(_Model):
    """An upstream reached over mutual TLS: J-LIS, the contractor, or the ward's own system."""

    url: Annotated[str, Field(pattern=r"^https://[^\s/]+(/\S*)?$")]
    ca: RelPath
    client_certificate: RelPath
    client_key: SecretRef
    spki_pins: tuple[Annotated[str, Field(pattern=r"^[A-Za-z0-9+/]{43}=$")], ...] = ()
    credential: SecretRef | None = None
    source_address: IpAddress | None = None
    """Bind outgoing connections to this local address (the network this upstream is on)."""
    concurrency: Annotated[int, Field(ge=1, le=256)] = 4
    connect_timeout: Annotated[float, Field(gt=0, le=600)] = 10.0
    request_timeout: Annotated[float, Field(gt=0, le=3600)] = 120.0
    tls_profile: Literal["intermediate", "modern"] = "intermediate"
    retry: RetryConfig = RetryConfig()
    payload_encryption: Literal["none", "hpke", "cms"] = "none"
    """Seal each payload for the recipient (docs/sealed-payload.md) on top of TLS."""
    payload_kem: Literal["x25519", "mlkem768-x25519"] = "x25519"
    """HPKE's key encapsulation: X25519, or the hybrid post-quantum ML-KEM-768 + X25519."""
    recipient_id: str | None = None
    """The recipient's id agreed with it out of band, bound into every sealed payload (its
    header's ``destination``); required with payload encryption. Not the table's name, so
    renaming the table changes nothing for the recipient."""
    recipient_key: RelPath | None = None
    """hpke: the recipient's public key (PEM); cms: the recipient's X.509 certificate."""
    recipient_key_not_after: date | None = None
    """The last day (JST) an HPKE recipient key may be used: a bare key has no expiry."""
    signing_key: SecretRef | None = None
    """The gateway's Ed25519 or P-256 signing key (a 0600 file or credential:NAME)."""
    signing_key_not_after: date | None = None
    """Optional: the last day the signing key is to be used (its rotation date)."""

    @model_validator(mode="after")
    def _payload_keys(self) -> DestinationConfig:
        sealing = ("recipient_id", "recipient_key", "signing_key")
        if self.payload_encryption == "none":
            named = [k for k in sealing if getattr(self, k) is not None]
            if named:
                raise ValueError(
                    f'{", ".join(named)} set but payload_encryption is "none": '
                    "say which encryption, or remove them"
                )
            return self
        rid = self.recipient_id
        if rid is not None and not (
            1 <= len(rid) <= 64
            and rid.isascii()
            and rid[0].isalnum()
            and all(c.isalnum() or c in "._-" for c in rid)
        ):
            raise ValueError(
                "recipient_id must be 1 to 64 ASCII letters, digits, '.', '_' or '-', "
                "starting with a letter or digit (the id agreed with the recipient, e.g. "
                '"jlis-express")'
            )
        missing = [k for k in sealing if getattr(self, k) is None]
        if self.payload_encryption == "hpke" and self.recipient_key_not_after is None:
            missing.append("recipient_key_not_after")
        if missing:
            hint = (
                " (recipient_id: the id agreed with the recipient that every payload is bound "
                "to, docs/sealed-payload.md)"
                if rid is None
                else ""
            )
            raise ValueError(
                f"payload_encryption = {self.payload_encryption!r} needs {', '.join(missing)}"
                + hint
            )
        if self.payload_encryption == "cms" and self.payload_kem != "x25519":
            raise ValueError("payload_kem applies to hpke only (cms uses the certificate's RSA)")
        return self


class FieldConfig(_Model):
    """One field a channel lets through, with its format rule."""

    format: str
    required: bool = False
    max_length: Annotated[int, Field(ge=1, le=10_000)] | None = None
    label: str = ""

    @model_validator(mode="after")
    def _known_format(self) -> FieldConfig:
        if self.format not in FORMAT_NAMES | FILE_FORMATS:
            known = sorted(FORMAT_NAMES | FILE_FORMATS)
            hint = difflib.get_close_matches(self.format, known, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ValueError(f"unknown format{extra}; known formats: {', '.join(known)}")
        return self


class ChannelConfig(_Model):
    """One approved flow: who may send which fields where, and how long a copy is kept.

    The gateway's copy is erased as soon as the destination has it; ``retention_days``
    bounds how long an undelivered copy may be kept (受信後1週間で消去).
    """

    description: str = ""
    listeners: tuple[Name, ...]
    """The listeners (networks) this channel is served on; elsewhere it does not exist."""
    destination: Name
    devices: tuple[str, ...]
    source_networks: tuple[Network, ...]
    active_from: date | None = None
    active_until: date | None = None
    on_unlisted: Literal["drop", "reject"] = "drop"
    retention_days: Annotated[int, Field(ge=1, le=366)] = 7
    max_body_bytes: Annotated[int, Field(ge=1024, le=MAX_BODY_LIMIT)] = 8 * 1024 * 1024
    scan: bool = False
    """Stream the file part (the photo) to clamd as it arrives; the verdict comes before
    the 202 (ウイルス対策)."""
    photo_check: Literal["decode", "structure"] = "decode"
    """How the face photo is checked: ``decode`` decodes it with Pillow (at 1/8 scale, on
    the photo-check threads, within their memory budget); ``structure`` only walks the
    JPEG's markers and segments (frame, tables, scan framing, EOI), much cheaper, but
    corrupt entropy-coded data inside a well-framed scan then passes."""
    fields: dict[str, FieldConfig]

    @model_validator(mode="after")
    def _coherent(self) -> ChannelConfig:
        for name in self.fields:
            if not SAFE_FIELD_NAME.match(name):
                raise ValueError("field names must match ^[a-z][a-z0-9_]{0,63}$")
        files = [n for n, f in self.fields.items() if f.format in FILE_FORMATS]
        if len(files) > 1:
            raise ValueError("a channel takes at most one file field")
        if self.active_from and self.active_until and self.active_from > self.active_until:
            raise ValueError("active_from must not be after active_until")
        if not self.listeners:
            raise ValueError("listeners must name at least one listener")
        if not self.devices:
            raise ValueError("devices must name at least one device or group:NAME")
        if not self.source_networks:
            raise ValueError("source_networks must name at least one network")
        if self.scan and not files:
            raise ValueError("scan = true, but this channel has no file part to scan")
        if self.scan and any(f.format == "opaque_file" for f in self.fields.values()):
            raise ValueError(
                "scan = true on an opaque batch file: it is already encrypted, so a scanner "
                "would see only ciphertext (scan is for photos; the batch is scanned where "
                "it is made)"
            )
        if any(f.format == "opaque_file" for f in self.fields.values()):
            missing = [m for m in BATCH_MANIFEST if m not in self.fields]
            if missing:
                raise ValueError(f"a batch channel needs manifest fields {', '.join(missing)}")
        return self

    @property
    def file_field(self) -> str | None:
        for name, rule in self.fields.items():
            if rule.format in FILE_FORMATS:
                return name
        return None


class GatewayConfig(_Model):
    """The whole configuration; build it with :func:`load_config`."""

    ingress: IngressConfig = IngressConfig()
    listeners: Annotated[dict[Name, ListenerConfig], Field(min_length=1)]
    admin: AdminConfig = AdminConfig()
    spool: SpoolConfig
    auth: AuthConfig
    audit: AuditConfig | None = None
    access_log: AccessLogConfig = AccessLogConfig()
    scanner: ScannerConfig | None = None
    destinations: dict[Name, DestinationConfig]
    channels: dict[Name, ChannelConfig]
    channel_groups: dict[Name, tuple[Name, ...]] = {}
    """Named sets of channels, for staff: a user allowed ``group:NAME`` may post on each."""

    def listeners_of(self, channel: str) -> tuple[str, ...]:
        """The listeners a channel is served on (none for an unknown channel)."""
        config = self.channels.get(channel)
        return config.listeners if config else ()

    def staff_scopes(self) -> frozenset[str]:
        """What a staff user's ``channels`` entry may name: a channel or ``group:NAME``."""
        return frozenset(self.channels) | {f"group:{g}" for g in self.channel_groups}

    def expand_staff_scope(self, entries: tuple[str, ...]) -> frozenset[str]:
        """The channels a user's entries (channel names, ``group:NAME``) allow."""
        allowed: set[str] = set()
        for entry in entries:
            if entry.startswith("group:"):
                allowed.update(self.channel_groups.get(entry.removeprefix("group:"), ()))
            elif entry in self.channels:
                allowed.add(entry)
        return frozenset(allowed)

    @property
    def audit_log(self) -> AuditConfig:
        """Where the audit log is: as configured, else ``audit.jsonl`` beside the spool."""
        if self.audit is not None:
            return self.audit
        base = self.spool.directory.parent
        return AuditConfig(log=base / "audit.jsonl", anchor=base / "audit.anchor")

    @property
    def keystore_directory(self) -> Path:
        """Where the epoch keys are: as configured, else ``keystore/`` beside the spool."""
        return self.spool.keystore or self.spool.directory.parent / "keystore"

    @property
    def access_log_directory(self) -> Path:
        """Where the access log's daily files are: as configured, else beside the spool."""
        return self.access_log.directory or self.spool.directory.parent / "access"

    @model_validator(mode="after")
    def _references(self) -> GatewayConfig:
        # parse_config reports each broken reference under its own key beforehand; this
        # check keeps a GatewayConfig built any other way just as coherent.
        for name, channel in self.channels.items():
            if channel.destination not in self.destinations:
                raise ValueError(f"channels.{name}.destination: {NO_DESTINATION}")
            for listener in channel.listeners:
                if listener not in self.listeners:
                    raise ValueError(f"channels.{name}.listeners: {NO_LISTENER}")
        scanned = [name for name, channel in self.channels.items() if channel.scan]
        if scanned and self.scanner is None:
            raise ValueError(
                f"scanner: channels {', '.join(scanned)} set scan = true: configure "
                "[scanner] clamd_socket"
            )
        for group, members in self.channel_groups.items():
            for member in members:
                if member not in self.channels:
                    raise ValueError(f"channel_groups.{group}: {NO_CHANNEL}")
        clash = address_clash({n: (lc.host, lc.port) for n, lc in self.listeners.items()})
        if clash:
            raise ValueError(f"listeners.{clash[0]}: {clash[1]}")
        return self


NO_DESTINATION = "no destination by that name"
NO_LISTENER = "no listener by that name"
NO_CHANNEL = "no channel by that name"
WILDCARDS = frozenset({"0.0.0.0", "::"})  # noqa: S104 - compared, never bound here


def address_clash(addresses: Mapping[str, tuple[str, int]]) -> tuple[str, str] | None:
    """The first listener whose address another listener already takes, and why.

    Port 0 (any free port, for tests) never clashes; a wildcard host clashes with every
    host on the same port, as the kernel would refuse the second bind.
    """
    seen: list[tuple[str, str, int]] = []
    for name, (host, port) in addresses.items():
        for other, other_host, other_port in seen:
            if port == 0 or port != other_port:
                continue
            if host == other_host or host in WILDCARDS or other_host in WILDCARDS:
                return name, f"{host} port {port} is already listeners.{other}'s address"
        seen.append((name, host, port))
    return None
