"""Device and staff registries: who may connect, and who may post on which channel.

A device is known by the SHA-256 fingerprint of its client certificate (端末の証明書);
staff by user ID with an scrypt password hash and the channels they are named for
(取扱者をあらかじめ指定: a user may post only on the channels, or ``group:NAME`` channel
groups, listed for them). Both live in small JSON files that ``gatewayctl`` rewrites
atomically; the daemon re-reads them when they change, and ``gatewayctl`` tells it at
once, so a revoked device or a disabled user is refused on its next request without a
restart. With ``[spool] backend = "postgresql"`` the same documents, parsed and checked
here, live in the shared database instead (:mod:`gateway.identity.pgregistry`).
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from gateway.errors import GatewayError
from gateway.fsutil import write_atomic

ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
SCOPE_PATTERN = re.compile(r"^(group:)?[a-z0-9][a-z0-9._-]{0,62}$")
"""A staff user's channel entry: a channel name, or ``group:NAME`` of a channel group."""
FINGERPRINT_PATTERN = re.compile(r"^sha256:[0-9a-f]{64}$")


class RegistryError(GatewayError):
    """A registry file is malformed; the message names the file and the entry, no secrets."""


@dataclass(frozen=True)
class Device:
    """A tablet or PC, identified by its client certificate's fingerprint."""

    id: str
    fingerprint: str
    group: str
    revoked: bool = False


@dataclass(frozen=True)
class User:
    """A staff member who operates a device (職員ID), named for the channels they handle.

    ``channels`` lists channel names and ``group:NAME`` channel groups. ``None`` marks an
    entry from before staff were named per channel: such a registry is refused at start
    until every user is given their channels (``gatewayctl user allow``).
    """

    id: str
    password_hash: str
    enabled: bool = True
    channels: tuple[str, ...] | None = ()


@dataclass(frozen=True)
class DeviceRegistry:
    """An immutable snapshot of the device registry."""

    devices: tuple[Device, ...] = ()

    def by_fingerprint(self, fingerprint: str) -> Device | None:
        return self._index().get(fingerprint)

    def by_id(self, device_id: str) -> Device | None:
        return next((d for d in self.devices if d.id == device_id), None)

    def _index(self) -> Mapping[str, Device]:
        index: dict[str, Device] | None = self.__dict__.get("_fp_index")
        if index is None:
            index = {d.fingerprint: d for d in self.devices}
            object.__setattr__(self, "_fp_index", index)
        return index


@dataclass(frozen=True)
class UserRegistry:
    """An immutable snapshot of the staff registry."""

    users: tuple[User, ...] = ()

    def get(self, user_id: str) -> User | None:
        index: dict[str, User] | None = self.__dict__.get("_index")
        if index is None:
            index = {u.id: u for u in self.users}
            object.__setattr__(self, "_index", index)
        return index.get(user_id)


def _read_text(path: Path) -> str | None:
    """The file's text, or None when it does not exist (an empty registry)."""
    try:
        return path.read_text("utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise RegistryError(f"{path}: cannot read: {type(exc).__name__}") from None


def _entries(text: str | None, where: str, key: str) -> list[dict[str, Any]]:
    if text is None:
        return []
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{where}: cannot read: {type(exc).__name__}") from None
    if not isinstance(doc, dict) or doc.get("version") != 1 or not isinstance(doc.get(key), list):
        raise RegistryError(f'{where}: expected {{"version": 1, "{key}": [...]}}')
    entries: list[dict[str, Any]] = doc[key]
    return entries


def load_devices(path: Path) -> DeviceRegistry:
    """Read ``devices.json``; a missing file is an empty registry."""
    return parse_devices(_read_text(path), str(path))


def parse_devices(text: str | None, source: str) -> DeviceRegistry:
    """A device registry from the text of a ``devices.json`` document (None: empty), with
    the file's checks; errors name ``source`` (the file, or wherever the text was kept)."""
    devices = []
    for i, entry in enumerate(_entries(text, source, "devices")):
        where = f"{source}: devices[{i}]"
        try:
            device = Device(
                id=str(entry["id"]),
                fingerprint=str(entry["fingerprint"]),
                group=str(entry.get("group", "")),
                revoked=bool(entry.get("revoked", False)),
            )
        except (KeyError, TypeError):
            raise RegistryError(f"{where}: needs id and fingerprint") from None
        _check_flag(entry, "revoked", where)
        if not ID_PATTERN.fullmatch(device.id):
            raise RegistryError(f"{where}.id: must match {ID_PATTERN.pattern}")
        if not FINGERPRINT_PATTERN.fullmatch(device.fingerprint):
            raise RegistryError(f"{where}.fingerprint: must be sha256:<64 hex digits>")
        devices.append(device)
    _unique(source, "devices", [d.id for d in devices], "id")
    _unique(source, "devices", [d.fingerprint for d in devices], "fingerprint")
    return DeviceRegistry(tuple(devices))


def load_users(path: Path) -> UserRegistry:
    """Read ``users.json``; a missing file is an empty registry."""
    return parse_users(_read_text(path), str(path))


def parse_users(text: str | None, source: str) -> UserRegistry:
    """A staff registry from the text of a ``users.json`` document (None: empty), with the
    file's checks; errors name ``source`` and the entry, never a password hash."""
    users = []
    for i, entry in enumerate(_entries(text, source, "users")):
        where = f"{source}: users[{i}]"
        try:
            user = User(
                id=str(entry["id"]),
                password_hash=str(entry["password_hash"]),
                enabled=bool(entry.get("enabled", True)),
                channels=_channels(entry, where),
            )
        except (KeyError, TypeError):
            raise RegistryError(f"{where}: needs id and password_hash") from None
        _check_flag(entry, "enabled", where)
        if not ID_PATTERN.fullmatch(user.id):
            raise RegistryError(f"{where}.id: must match {ID_PATTERN.pattern}")
        if not user.password_hash.startswith("scrypt$"):
            raise RegistryError(f"{where}.password_hash: must be an scrypt hash")
        users.append(user)
    _unique(source, "users", [u.id for u in users], "id")
    return UserRegistry(tuple(users))


def _channels(entry: dict[str, Any], where: str) -> tuple[str, ...] | None:
    if "channels" not in entry:
        return None  # written before staff were named per channel
    value = entry["channels"]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RegistryError(f"{where}.channels: must be a list of channel names")
    for index, scope in enumerate(value):
        if not SCOPE_PATTERN.fullmatch(scope):
            raise RegistryError(f"{where}.channels[{index}]: must be a channel name or group:NAME")
    return tuple(dict.fromkeys(value))


def staff_problems(users: UserRegistry, scopes: Iterable[str]) -> list[tuple[str, str]]:
    """What keeps this staff registry from being used with a configuration whose channels
    and channel groups are ``scopes`` (names, and ``group:NAME``), as (where, why) pairs;
    empty when nothing does.

    Users named for no channel at all (a registry from before staff were named per
    channel) and entries naming an unknown channel or group are both refused, with the
    users named and the command that fixes them.
    """
    known = sorted(scopes)
    problems = []
    legacy = [u.id for u in users.users if u.channels is None]
    if legacy:
        problems.append(
            (
                "users",
                f"staff user(s) {', '.join(legacy)} are not named for any channel; each user "
                "must list the channels they may post on (取扱者の指定). Fix with: "
                + "; ".join(
                    f"gatewayctl user allow --id {user} --channel CHANNEL" for user in legacy
                ),
            )
        )
    for index, user in enumerate(users.users):
        for position, scope in enumerate(user.channels or ()):
            if scope not in known:
                close = difflib.get_close_matches(scope, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(
                    (
                        f"users[{index}].channels[{position}]",
                        f"staff user {user.id} is allowed {scope!r}, which is no channel or "
                        f"channel group{hint}; fix with: gatewayctl user deny --id {user.id} "
                        f"--channel {scope}",
                    )
                )
    return problems


def _check_flag(entry: dict[str, Any], key: str, where: str) -> None:
    # bool("false") is True: a hand-edited "enabled": "false" must not enable anyone.
    if key in entry and not isinstance(entry[key], bool):
        raise RegistryError(f"{where}.{key}: must be true or false")


def _unique(source: str, key: str, values: Iterable[str], what: str) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise RegistryError(f"{source}: {key}: two entries share one {what}")
        seen.add(value)


def _document(doc: dict[str, Any]) -> str:
    return json.dumps(doc, ensure_ascii=False, indent=2) + "\n"


def devices_text(registry: DeviceRegistry) -> str:
    """The ``devices.json`` document of ``registry``, as the file holds it."""
    return _document({"version": 1, "devices": [asdict(d) for d in registry.devices]})


def _user_entry(user: User) -> dict[str, Any]:
    entry = asdict(user)
    if user.channels is None:
        del entry["channels"]  # left as it was: still refused until it is given channels
    else:
        entry["channels"] = list(dict.fromkeys(user.channels))
    return entry


def users_text(registry: UserRegistry) -> str:
    """The ``users.json`` document of ``registry``, as the file holds it."""
    return _document({"version": 1, "users": [_user_entry(u) for u in registry.users]})


def _write_atomic(path: Path, text: str) -> None:
    """Readers (the daemon) see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text.encode("utf-8"), mode=0o600)


def save_devices(path: Path, registry: DeviceRegistry) -> None:
    _write_atomic(path, devices_text(registry))


def save_users(path: Path, registry: UserRegistry) -> None:
    _write_atomic(path, users_text(registry))


def with_device(current: DeviceRegistry, device: Device, source: str) -> DeviceRegistry:
    """``current`` with ``device`` added, or replacing the entry with its id."""
    others = tuple(d for d in current.devices if d.id != device.id)
    if any(d.fingerprint == device.fingerprint for d in others):
        raise RegistryError(f"{source}: another device already has that certificate fingerprint")
    return DeviceRegistry((*others, device))


def with_user(current: UserRegistry, user: User) -> UserRegistry:
    """``current`` with ``user`` added, or replacing the entry with its id."""
    return UserRegistry((*(u for u in current.users if u.id != user.id), user))


def upsert_device(path: Path, device: Device) -> DeviceRegistry:
    """Add ``device`` or replace the entry with its id; returns the new registry."""
    registry = with_device(load_devices(path), device, str(path))
    save_devices(path, registry)
    return registry


def upsert_user(path: Path, user: User) -> UserRegistry:
    """Add ``user`` or replace the entry with its id; returns the new registry."""
    registry = with_user(load_users(path), user)
    save_users(path, registry)
    return registry


class RegistryStore(Protocol):
    """Where ``gatewayctl`` reads and writes the registries: the files, or PostgreSQL
    (:class:`gateway.identity.pgregistry.PgRegistryStore`). A save writes what was read,
    changed; the PostgreSQL store refuses it if someone else wrote in between."""

    devices_source: str
    users_source: str

    def devices(self) -> DeviceRegistry: ...

    def users(self) -> UserRegistry: ...

    def save_devices(self, registry: DeviceRegistry) -> None: ...

    def save_users(self, registry: UserRegistry) -> None: ...


class FileRegistryStore:
    """The registries as the two JSON files (one node: ``[spool] backend = "sqlite"``)."""

    def __init__(self, devices_file: Path, users_file: Path) -> None:
        self._devices_file = devices_file
        self._users_file = users_file
        self.devices_source = str(devices_file)
        self.users_source = str(users_file)

    def devices(self) -> DeviceRegistry:
        return load_devices(self._devices_file)

    def users(self) -> UserRegistry:
        return load_users(self._users_file)

    def save_devices(self, registry: DeviceRegistry) -> None:
        save_devices(self._devices_file, registry)

    def save_users(self, registry: UserRegistry) -> None:
        save_users(self._users_file, registry)
