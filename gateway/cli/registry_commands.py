"""gatewayctl's device and staff commands: the registries, and telling the running
daemon of a refusal (revoke, disable, deny) before the command returns.

The registries are the two JSON files, or with ``[spool] backend = "postgresql"`` the
rows every node shares (:mod:`gateway.identity.pgregistry`): read, changed, and written
back only if nobody else wrote in between; every node hears of the change at once."""

from __future__ import annotations

import argparse
import asyncio
import difflib
import getpass
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from gateway.cli.common import (
    EXIT_FAILED,
    EXIT_UNAVAILABLE,
    CommandFailed,
    Commands,
    SubParsers,
    UsageError,
    add_format,
    config_of,
    print_json,
)
from gateway.config import GatewayConfig
from gateway.crypto.certs import cert_fingerprint, load_cert_der
from gateway.errors import GatewayError
from gateway.identity.passwords import check_password_rule, hash_password
from gateway.identity.pgregistry import PgRegistryStore
from gateway.identity.registry import (
    FINGERPRINT_PATTERN,
    ID_PATTERN,
    Device,
    DeviceRegistry,
    FileRegistryStore,
    RegistryStore,
    User,
    UserRegistry,
    with_device,
    with_user,
)
from gateway.ops.audit import current_actor
from gateway.ops.control import DaemonUnavailable, control_request
from gateway.preflight import database_dsn
from gateway.spool.reader import spool_in_use

CONFIRM_WITHIN = 2.0
"""Seconds a shared-database change may take to reach the local daemon (the database
tells it; this command only asks whether it has heard)."""


def shared(config: GatewayConfig) -> bool:
    """The registries live in PostgreSQL, shared by every node."""
    return config.spool.backend == "postgresql" and config.spool.dsn is not None


def registry_store(config: GatewayConfig) -> RegistryStore:
    """Where this configuration keeps its registries: the files, or the shared database
    (seeded from the files if no node has written it yet)."""
    auth = config.auth
    dsn = database_dsn(config)
    if dsn is not None:
        return PgRegistryStore(
            dsn,
            actor=current_actor(),
            seeds={"devices": auth.devices_file, "users": auth.users_file},
        )
    return FileRegistryStore(auth.devices_file, auth.users_file)


def _check_id(kind: str, value: str) -> None:
    # The registries refuse such entries on load: never write one.
    if not ID_PATTERN.fullmatch(value):
        raise UsageError(f"{kind} id {value!r} must match {ID_PATTERN.pattern}")


def cmd_device_add(args: argparse.Namespace) -> int:
    config = config_of(args)
    _check_id("device", args.id)
    if args.fingerprint is not None:
        fingerprint = args.fingerprint.strip().lower()
        if not FINGERPRINT_PATTERN.fullmatch(fingerprint):
            raise UsageError("--fingerprint must be sha256:<64 hex digits>")
    else:
        fingerprint = cert_fingerprint(load_cert_der(args.cert))
    store = registry_store(config)
    current = store.devices()
    if current.by_id(args.id) is not None:
        # Re-adding must never quietly un-revoke a lost tablet: a new id is a new device.
        raise CommandFailed(f"device {args.id!r} exists; a replacement device needs a new id")
    device = Device(args.id, fingerprint, args.group, revoked=False)
    store.save_devices(with_device(current, device, store.devices_source))
    args.audit_detail.update(group=args.group, fingerprint=fingerprint)
    print(f"device {device.id} ({device.group}) registered: {fingerprint}")
    return 0


def cmd_device_list(args: argparse.Namespace) -> int:
    registry = registry_store(config_of(args)).devices()
    devices = sorted(registry.devices, key=lambda d: d.id)
    if args.format == "json":
        print_json(
            [
                {"id": d.id, "group": d.group, "revoked": d.revoked, "fingerprint": d.fingerprint}
                for d in devices
            ]
        )
        return 0
    for device in devices:
        state = "REVOKED" if device.revoked else "active"
        print(f"{device.id:<24} {device.group:<20} {state:<8} {device.fingerprint}")
    return 0


def cmd_device_revoke(args: argparse.Namespace) -> int:
    config = config_of(args)
    store = registry_store(config)
    registry = store.devices()
    device = registry.by_id(args.id)
    if device is None:
        raise CommandFailed(f"no device {args.id!r} in {store.devices_source}")
    devices = tuple(replace(d, revoked=True) if d.id == args.id else d for d in registry.devices)
    store.save_devices(DeviceRegistry(devices))
    return _applied(
        args, f"device {args.id} revoked", _tell_daemon(config, "device", args.id, "revoked", True)
    )


def _read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("new password: ")
        if getpass.getpass("again: ") != password:
            raise UsageError("the two passwords differ")
    problem = check_password_rule(password)
    if problem:
        raise UsageError(problem)
    return password


def _scopes(config: GatewayConfig, wanted: Sequence[str]) -> tuple[str, ...]:
    """The ``--channel`` values, each a channel or ``group:NAME`` of this configuration."""
    known = sorted(config.staff_scopes())
    for scope in wanted:
        if scope not in known:
            close = difflib.get_close_matches(scope, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(
                f"--channel {scope!r}: no channel or channel group by that name{hint}; "
                f"known: {', '.join(known)}"
            )
    return tuple(dict.fromkeys(wanted))


def cmd_user_add(args: argparse.Namespace) -> int:
    config = config_of(args)
    _check_id("staff user", args.id)
    channels = _scopes(config, args.channel)
    store = registry_store(config)
    exists = f"user {args.id!r} exists; use 'gatewayctl user passwd'"
    if store.users().get(args.id) is not None:  # said before a password is asked for
        raise CommandFailed(exists)
    user = User(args.id, hash_password(_read_password(args)), channels=channels)
    current = store.users()  # read again: the password may have taken a while to type
    if current.get(args.id) is not None:
        raise CommandFailed(exists)
    store.save_users(with_user(current, user))
    args.audit_detail.update(channels=list(channels))
    print(f"staff user {args.id} added, named for: {', '.join(channels)}")
    return 0


def cmd_user_list(args: argparse.Namespace) -> int:
    config = config_of(args)
    users = sorted(registry_store(config).users().users, key=lambda u: u.id)
    rows = [
        {
            "id": u.id,
            "enabled": u.enabled,
            "channels": None if u.channels is None else list(u.channels),
            "allowed": sorted(config.expand_staff_scope(u.channels or ())),
        }
        for u in users
    ]
    if args.format == "json":
        print_json(rows)
        return 0
    for row in rows:
        state = "active" if row["enabled"] else "DISABLED"
        named = (
            "(not named for any channel)"
            if row["channels"] is None
            else ", ".join(
                row["channels"]  # type: ignore[arg-type]
            )
            or "(none)"
        )
        print(f"{row['id']:<24} {state:<9} {named}")
    return 0


def _change_channels(args: argparse.Namespace, allow: bool) -> int:
    config = config_of(args)
    store = registry_store(config)
    registry = store.users()
    user = registry.get(args.id)
    if user is None:
        raise CommandFailed(f"no staff user {args.id!r}")
    current = list(user.channels or ())
    if allow:
        wanted = _scopes(config, args.channel)  # denying needs no check: it fixes typos too
        changed = [c for c in wanted if c not in current]
        after = (*current, *changed)
    else:
        changed = [c for c in dict.fromkeys(args.channel) if c in current]
        after = tuple(c for c in current if c not in changed)
    if after != user.channels:
        store.save_users(with_user(registry, replace(user, channels=after)))
    verb = "allowed" if allow else "denied"
    args.audit_detail.update({verb: changed, "channels": list(after)})
    note = "" if changed else f" (nothing to change: already {verb})"
    done = f"staff user {args.id} now named for: {', '.join(after) or '(none)'}{note}"
    if allow or not changed:
        print(done)  # a wider right may wait for the file watch (within a second)
        return 0
    # Taking a channel away is a refusal like a disable: applied before this returns.
    return _applied(args, done, _tell_daemon(config, "user", args.id, "channels", list(after)))


def cmd_user_allow(args: argparse.Namespace) -> int:
    return _change_channels(args, allow=True)


def cmd_user_deny(args: argparse.Namespace) -> int:
    return _change_channels(args, allow=False)


def cmd_user_passwd(args: argparse.Namespace) -> int:
    store = registry_store(config_of(args))
    if store.users().get(args.id) is None:  # said before a password is asked for
        raise CommandFailed(f"no staff user {args.id!r}")
    password_hash = hash_password(_read_password(args))
    registry = store.users()  # read again: the user may have changed while it was typed
    user = registry.get(args.id)
    if user is None:
        raise CommandFailed(f"no staff user {args.id!r}")
    store.save_users(with_user(registry, replace(user, password_hash=password_hash)))
    print(f"password of staff user {args.id} changed")
    return 0


def cmd_user_disable(args: argparse.Namespace) -> int:
    config = config_of(args)
    store = registry_store(config)
    registry = store.users()
    user = registry.get(args.id)
    if user is None:
        raise CommandFailed(f"no staff user {args.id!r}")
    users = tuple(replace(u, enabled=False) if u.id == args.id else u for u in registry.users)
    store.save_users(UserRegistry(users))
    return _applied(
        args,
        f"staff user {args.id} disabled",
        _tell_daemon(config, "user", args.id, "enabled", False),
    )


def _applied(args: argparse.Namespace, done: str, told: tuple[int, str]) -> int:
    """Report a registry change and what the running daemon made of it: exit 0 once the
    daemon has applied it (or none runs), 69 when a running daemon cannot be asked, 1
    when it was asked but did not confirm."""
    status, how = told
    if isinstance(getattr(args, "audit_detail", None), dict):
        args.audit_detail.update(daemon=how)
    if status == 0:
        print(f"{done}: {how}")
        return 0
    args.audit_outcome = "ok"  # the registry did change; the daemon's part is detail
    where = "database" if shared(config_of(args)) else "file"
    print(f"gatewayctl: {done} in the registry {where}, but {how}", file=sys.stderr)
    return status


def _tell_daemon(
    config: GatewayConfig,
    kind: str,
    ident: str,
    key: str,
    expected: object,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[int, str]:
    """Make the running daemon apply a registry change now: (exit status, how it went).

    0 once the daemon answers that it holds ``key == expected`` for the entry. Without
    a running daemon (its spool is not locked) the change waits in the file for the
    next start, which counts as done. A running daemon that cannot be asked (69) or does
    not confirm (1) still reads the file within a second, but this command cannot say
    it has. With the shared database the daemon hears of the change from the database,
    not from this command: it is asked again for up to :data:`CONFIRM_WITHIN` seconds.
    """
    medium = "hears of it from the database" if shared(config) else "reads the file"
    if not spool_in_use(config.spool.directory):
        if shared(config):
            return 0, "gatewayd is not running here; the running nodes hear of it at once"
        return 0, "gatewayd is not running; it reads the change when it starts"
    if config.admin.control_socket is None:
        return EXIT_UNAVAILABLE, (
            "admin.control_socket is not configured, so the running gatewayd cannot confirm "
            f"it; it {medium} within a second"
        )
    deadline = clock() + (CONFIRM_WITHIN if shared(config) else 0.0)
    while True:
        try:
            answer = asyncio.run(
                control_request(
                    config.admin.control_socket,
                    "POST",
                    "/v1/registries/apply",
                    actor=current_actor(),
                    query={kind: ident},
                )
            )
        except DaemonUnavailable as exc:
            return EXIT_UNAVAILABLE, f"the running gatewayd cannot be asked to confirm it: {exc}"
        except GatewayError as exc:
            return EXIT_FAILED, f"the running gatewayd did not confirm it: {exc}"
        held = answer.get(kind)
        if isinstance(held, dict) and held.get(key) == expected:
            return 0, "the running gatewayd has applied it; it is refused from now on"
        if clock() >= deadline:
            return EXIT_FAILED, (
                "the running gatewayd still holds the old entry; check its log "
                "(registry_unreadable) and run 'gatewayctl reload'"
            )
        sleep(0.05)


def register(commands: SubParsers[argparse.ArgumentParser], command: Commands) -> None:
    device = commands.add_parser("device", help="device registry").add_subparsers(
        dest="device_command", required=True, metavar="ACTION"
    )
    add = command(
        "add",
        cmd_device_add,
        "register a device by its client certificate",
        parent=device,
        audited="device.add",
    )
    add.add_argument("--id", required=True)
    add.add_argument("--group", required=True, help="device group, e.g. assist-tablet")
    source = add.add_mutually_exclusive_group(required=True)
    source.add_argument("--cert", type=Path, help="the device's certificate (PEM)")
    source.add_argument("--fingerprint", help="sha256:<hex> of the certificate")
    add_format(command("list", cmd_device_list, "list registered devices", parent=device))
    revoke = command(
        "revoke",
        cmd_device_revoke,
        "disable a lost or stolen device at once (端末無効化): applied by the running daemon "
        "before this returns",
        parent=device,
        audited="device.revoke",
    )
    revoke.add_argument("--id", required=True)

    user = commands.add_parser("user", help="staff users").add_subparsers(
        dest="user_command", required=True, metavar="ACTION"
    )
    channel_help = (
        "a channel, or group:NAME of [channel_groups], the user may post on (repeat); staff "
        "are named per channel (取扱者の指定)"
    )
    for name, handler, text in (
        (
            "add",
            cmd_user_add,
            "add a staff user, named for the channels they handle (password asked, or read "
            "from stdin)",
        ),
        ("passwd", cmd_user_passwd, "set a staff user's password"),
    ):
        sub = command(name, handler, text, parent=user, audited=f"user.{name}")
        sub.add_argument("--id", required=True)
        if name == "add":
            sub.add_argument("--channel", action="append", required=True, help=channel_help)
        sub.add_argument(
            "--password-stdin",
            action="store_true",
            help="read the password from the first line of standard input",
        )
    users_list = command(
        "list", cmd_user_list, "list staff users and the channels they are named for", parent=user
    )
    add_format(users_list)
    for name, handler, text in (
        ("allow", cmd_user_allow, "name a staff user for more channels or channel groups"),
        ("deny", cmd_user_deny, "take channels or channel groups away from a staff user"),
    ):
        sub = command(name, handler, text, parent=user, audited=f"user.{name}")
        sub.add_argument("--id", required=True)
        sub.add_argument("--channel", action="append", required=True, help=channel_help)
    disable = command(
        "disable",
        cmd_user_disable,
        "disable a staff user at once (applied by the running daemon before this returns)",
        parent=user,
        audited="user.disable",
    )
    disable.add_argument("--id", required=True)
