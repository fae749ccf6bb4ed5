"""``gatewayctl``: check the configuration, make a development PKI, administer devices and
staff, look after the spool, verify the audit log, and run the demo. Every command that
changes state is written to the operations audit log. Run ``gatewayctl COMMAND --help``
for each command's options."""

from __future__ import annotations

import argparse
import asyncio
import difflib
import getpass
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, date, datetime
from pathlib import Path

from gateway import __version__
from gateway.config import GatewayConfig, load_config
from gateway.crypto.pki import PkiExistsError, cert_fingerprint, init_pki, load_cert_der
from gateway.daemon import registry_problems, secret_problems
from gateway.errors import ConfigError, GatewayError
from gateway.identity.registry import (
    FINGERPRINT_PATTERN,
    ID_PATTERN,
    Device,
    DeviceRegistry,
    User,
    UserRegistry,
    check_password_rule,
    hash_password,
    load_devices,
    load_users,
    save_devices,
    save_users,
    upsert_device,
    upsert_user,
)
from gateway.ops.audit import AuditLog, audit_chain, current_actor
from gateway.ops.chain import ChainBroken
from gateway.ops.control import control_request
from gateway.retention.report import as_csv, certificate
from gateway.retention.sweeper import erasure_ledger
from gateway.spool.store import Record, is_submission_id, read_records, spool_in_use

DEFAULT_CONFIG = Path("/etc/gateway/gateway.toml")
PROTECTIVE = frozenset({"device.revoke", "user.disable", "user.deny"})
"""Actions done even when the audit log cannot take their entry (exit status 3)."""


class UsageError(GatewayError):
    """The command cannot do what was asked; the message says why."""


def _config(args: argparse.Namespace) -> GatewayConfig:
    loaded: GatewayConfig | None = getattr(args, "loaded_config", None)
    if loaded is None:
        loaded = args.loaded_config = load_config(args.config)
    return loaded


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"{len(exc.problems)} problem(s) in {args.config}", file=sys.stderr)
        return 1
    problems = []
    if not args.structure_only:
        problems = secret_problems(config, str(args.config))
        problems += registry_problems(config, str(args.config))
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s) in {args.config}", file=sys.stderr)
        return 1
    print(
        f"{args.config}: OK ({len(config.channels)} channels, "
        f"{len(config.destinations)} destinations)"
    )
    for name, listener in config.listeners.items():
        print(f"  listener {name}: {listener.address}, {listener.tls_profile}")
    for name, channel in sorted(config.channels.items()):
        window = ""
        if channel.active_from or channel.active_until:
            window = f", active {channel.active_from or '…'} to {channel.active_until or '…'}"
        print(
            f"  {name}: on {', '.join(channel.listeners)} → {channel.destination}, "
            f"{len(channel.fields)} fields, unlisted={channel.on_unlisted}, erased on "
            f"delivery, undelivered erased after {channel.retention_days} d{window}"
        )
    return 0


def cmd_pki_init(args: argparse.Namespace) -> int:
    try:
        layout = init_pki(
            args.dir,
            devices=args.device or ["tablet-01"],
            upstreams=args.upstream or ["upstream"],
            hostnames=args.hostname or ["localhost"],
            overwrite=args.force,
        )
    except PkiExistsError:
        raise UsageError(
            f"{args.dir}: a PKI already exists here; pass --force to replace it"
        ) from None
    except ValueError as exc:  # a device or upstream name that breaks the naming rule
        raise UsageError(str(exc)) from None
    print(f"development PKI written to {layout.dir} (ECDSA P-256; keys are 0600)")
    rows = [
        layout.device_ca,
        layout.gateway_ca,
        layout.upstream_ca,
        layout.gateway_server,
        layout.gateway_client,
        *layout.clients.values(),
        *layout.upstreams.values(),
        *layout.devices.values(),
    ]
    for issued in rows:
        print(f"  {issued.name:<24} {issued.cert.name:<28} {issued.fingerprint}")
    print("register devices with: gatewayctl device add --id ID --group GROUP --cert FILE")
    return 0


def _check_id(kind: str, value: str) -> None:
    # The registries refuse such entries on load: never write one.
    if not ID_PATTERN.fullmatch(value):
        raise UsageError(f"{kind} id {value!r} must match {ID_PATTERN.pattern}")


def cmd_device_add(args: argparse.Namespace) -> int:
    config = _config(args)
    _check_id("device", args.id)
    if args.fingerprint is not None:
        fingerprint = args.fingerprint.strip().lower()
        if not FINGERPRINT_PATTERN.fullmatch(fingerprint):
            raise UsageError("--fingerprint must be sha256:<64 hex digits>")
    else:
        fingerprint = cert_fingerprint(load_cert_der(args.cert))
    if load_devices(config.auth.devices_file).by_id(args.id) is not None:
        # Re-adding must never quietly un-revoke a lost tablet: a new id is a new device.
        raise UsageError(f"device {args.id!r} exists; a replacement device needs a new id")
    device = Device(args.id, fingerprint, args.group, revoked=False)
    upsert_device(config.auth.devices_file, device)
    args.audit_detail.update(group=args.group, fingerprint=fingerprint)
    print(f"device {device.id} ({device.group}) registered: {fingerprint}")
    return 0


def cmd_device_list(args: argparse.Namespace) -> int:
    config = _config(args)
    registry = load_devices(config.auth.devices_file)
    for device in sorted(registry.devices, key=lambda d: d.id):
        state = "REVOKED" if device.revoked else "active"
        print(f"{device.id:<24} {device.group:<20} {state:<8} {device.fingerprint}")
    return 0


def cmd_device_revoke(args: argparse.Namespace) -> int:
    config = _config(args)
    registry = load_devices(config.auth.devices_file)
    device = registry.by_id(args.id)
    if device is None:
        raise UsageError(f"no device {args.id!r} in {config.auth.devices_file}")
    devices = tuple(replace(d, revoked=True) if d.id == args.id else d for d in registry.devices)
    save_devices(config.auth.devices_file, DeviceRegistry(devices))
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
    config = _config(args)
    _check_id("staff user", args.id)
    channels = _scopes(config, args.channel)
    if load_users(config.auth.users_file).get(args.id) is not None:
        raise UsageError(f"user {args.id!r} exists; use 'gatewayctl user passwd'")
    user = User(args.id, hash_password(_read_password(args)), channels=channels)
    upsert_user(config.auth.users_file, user)
    args.audit_detail.update(channels=list(channels))
    print(f"staff user {args.id} added, named for: {', '.join(channels)}")
    return 0


def cmd_user_list(args: argparse.Namespace) -> int:
    config = _config(args)
    users = sorted(load_users(config.auth.users_file).users, key=lambda u: u.id)
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
        json.dump(rows, sys.stdout, ensure_ascii=False, indent=2)
        sys.stdout.write("\n")
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
    config = _config(args)
    registry = load_users(config.auth.users_file)
    user = registry.get(args.id)
    if user is None:
        raise UsageError(f"no staff user {args.id!r}")
    current = list(user.channels or ())
    if allow:
        wanted = _scopes(config, args.channel)  # denying needs no check: it fixes typos too
        changed = [c for c in wanted if c not in current]
        after = (*current, *changed)
    else:
        changed = [c for c in dict.fromkeys(args.channel) if c in current]
        after = tuple(c for c in current if c not in changed)
    if after != user.channels:
        upsert_user(config.auth.users_file, replace(user, channels=after))
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
    config = _config(args)
    user = load_users(config.auth.users_file).get(args.id)
    if user is None:
        raise UsageError(f"no staff user {args.id!r}")
    upsert_user(
        config.auth.users_file, replace(user, password_hash=hash_password(_read_password(args)))
    )
    print(f"password of staff user {args.id} changed")
    return 0


def cmd_user_disable(args: argparse.Namespace) -> int:
    config = _config(args)
    registry = load_users(config.auth.users_file)
    user = registry.get(args.id)
    if user is None:
        raise UsageError(f"no staff user {args.id!r}")
    users = tuple(replace(u, enabled=False) if u.id == args.id else u for u in registry.users)
    save_users(config.auth.users_file, UserRegistry(users))
    return _applied(
        args,
        f"staff user {args.id} disabled",
        _tell_daemon(config, "user", args.id, "enabled", False),
    )


def _applied(args: argparse.Namespace, done: str, told: tuple[bool, str]) -> int:
    """Report a registry change and what the running daemon made of it: exit 0 once the
    daemon has applied it (or none runs), 1 when a running daemon did not confirm."""
    confirmed, how = told
    if isinstance(getattr(args, "audit_detail", None), dict):
        args.audit_detail.update(daemon=how)
    if confirmed:
        print(f"{done}: {how}")
        return 0
    args.audit_outcome = "ok"  # the registry file did change; the daemon's part is detail
    print(f"gatewayctl: {done} in the registry file, but {how}", file=sys.stderr)
    return 1


def _tell_daemon(
    config: GatewayConfig, kind: str, ident: str, key: str, expected: object
) -> tuple[bool, str]:
    """Make the running daemon apply a registry change now: (confirmed, how it went).

    Confirmed once the daemon answers that it holds ``key == expected`` for the entry.
    Without a running daemon (its spool is not locked) the change waits in the file for
    the next start, which counts as confirmed. A running daemon that cannot be asked or
    does not confirm is not: it still reads the file within a second, but this command
    cannot say it has.
    """
    if not spool_in_use(config.spool.directory):
        return True, "gatewayd is not running; it reads the change when it starts"
    if config.admin.control_socket is None:
        return False, (
            "admin.control_socket is not configured, so the running gatewayd cannot confirm "
            "it; it reads the file within a second"
        )
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
    except GatewayError as exc:
        return False, f"the running gatewayd did not confirm it ({exc})"
    held = answer.get(kind)
    if not isinstance(held, dict) or held.get(key) != expected:
        return False, (
            "the running gatewayd still holds the old entry; check its log "
            "(registry_unreadable) and run 'gatewayctl reload'"
        )
    return True, "the running gatewayd has applied it; it is refused from now on"


def cmd_erasure_report(args: argparse.Namespace) -> int:
    config = _config(args)
    ledger = erasure_ledger(config.spool.directory)
    if args.to < args.from_:
        raise UsageError("--to is before --from")
    cert = certificate(
        ledger,
        args.from_,
        args.to,
        operator=args.operator,
        organization=args.organization,
        now=datetime.now(UTC),
    )
    if args.format == "csv":
        sys.stdout.write(as_csv(cert))
    else:
        json.dump(cert, sys.stdout, ensure_ascii=False, indent=2)
        sys.stdout.write("\n")
    print(
        f"{cert['total']} erasures from {args.from_} to {args.to}; ledger verified "
        f"({cert['ledger']['entries']} entries)",
        file=sys.stderr,
    )
    return 0


def _spool_rows(records: Sequence[Record]) -> list[dict[str, object]]:
    def iso(ts: float | None) -> str | None:
        return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()

    return [
        {
            "submission_id": r.id,
            "channel": r.channel,
            "destination": r.destination,
            "state": r.state,
            "device_id": r.device_id,
            "user_id": r.user_id,
            "received_at": iso(r.received_at),
            "expires_at": iso(r.expires_at),
            "delivered_at": iso(r.delivered_at),
            "held_at": iso(r.held_at),
            "erased_at": iso(r.erased_at),
            "attempts": r.attempts,
            "last_error": r.last_error,
            "upstream_receipt": r.upstream_receipt,
            "size": r.plaintext_size,
            "fields": list(r.field_names),
        }
        for r in records
    ]


def cmd_spool_list(args: argparse.Namespace) -> int:
    config = _config(args)
    states = () if args.state == "all" else (args.state,)
    records = read_records(
        config.spool.directory, states=states, channel=args.channel, limit=args.limit
    )
    rows = _spool_rows(records)
    if args.format == "json":
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    for row in rows:
        print(
            f"{row['submission_id']}  {row['state']:<9} {row['channel']:<22} "
            f"{row['received_at']}  attempts={row['attempts']}  {row['last_error'] or ''}"
        )
    print(f"{len(rows)} record(s)", file=sys.stderr)
    return 0


def cmd_spool_show(args: argparse.Namespace) -> int:
    config = _config(args)
    _check_submission_ids([args.id])
    records = read_records(config.spool.directory, record_id=args.id, limit=1)
    if not records:
        raise UsageError(f"no record {args.id} in {config.spool.directory}")
    json.dump(_spool_rows(records)[0], sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def _check_submission_ids(ids: Sequence[str]) -> None:
    for value in ids:
        if not is_submission_id(value):
            raise UsageError(f"{value!r} is not a submission id")


def _spool_action(args: argparse.Namespace, action: str) -> int:
    """Ask the running daemon to requeue or erase each record; one audit entry per record."""
    config = _config(args)
    _check_submission_ids(args.ids)
    if config.admin.control_socket is None:
        raise UsageError("admin.control_socket is not configured: the daemon cannot be asked")
    audit: AuditLog = args.audit
    failures = 0
    for submission_id in args.ids:
        try:
            asyncio.run(
                control_request(
                    config.admin.control_socket, "POST", f"/v1/spool/{submission_id}/{action}"
                )
            )
        except GatewayError as exc:
            failures += 1
            audit.record(
                f"spool.{action}",
                target=submission_id,
                outcome="failed",
                detail={"reason": str(exc)},
            )
            print(f"gatewayctl: {submission_id}: {exc}", file=sys.stderr)
            continue
        audit.record(f"spool.{action}", target=submission_id)
        done = "queued again" if action == "requeue" else "erased (ledger reason: operator)"
        print(f"{submission_id} {done}")
    return 1 if failures else 0


def cmd_spool_requeue(args: argparse.Namespace) -> int:
    return _spool_action(args, "requeue")


def cmd_spool_erase(args: argparse.Namespace) -> int:
    return _spool_action(args, "erase")


def cmd_reload(args: argparse.Namespace) -> int:
    """Ask the running daemon to reload; it writes the audit entry (with the outcome)."""
    config = _config(args)
    if config.admin.control_socket is None:
        raise UsageError("admin.control_socket is not configured: send SIGHUP to gatewayd")
    try:
        answer = asyncio.run(
            control_request(
                config.admin.control_socket, "POST", "/v1/reload", actor=current_actor()
            )
        )
    except GatewayError as exc:
        print(f"gatewayctl: reload refused, the old configuration stays: {exc}", file=sys.stderr)
        return 1
    print(f"reloaded: {answer['reason']}")
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    chain = audit_chain(_config(args).audit_log)
    try:
        count = chain.verify()
    except ChainBroken as exc:
        line = "" if exc.line is None else f" at line {exc.line}"
        print(f"gatewayctl: audit log BROKEN{line} ({exc.reason}): {exc}", file=sys.stderr)
        return 1
    seq, digest = chain.head
    print(f"audit log intact: {count} entries, head {seq} {digest} ({chain.path})")
    return 0


def cmd_audit_list(args: argparse.Namespace) -> int:
    chain = audit_chain(_config(args).audit_log)
    entries = list(chain.entries())  # verified as read: a broken chain raises ChainBroken
    for entry in entries[-args.last :] if args.last else entries:
        body = entry.body
        print(
            f"{entry.seq:>6} {entry.at} {body.get('actor')}@{body.get('host')} "
            f"{body.get('via')} {body.get('action')} {body.get('target') or '-'} "
            f"{body.get('outcome')}"
            + (f" {json.dumps(body['detail'], ensure_ascii=False)}" if body.get("detail") else "")
        )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    return run_demo(keep=args.keep)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be 1 or more")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gatewayctl", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str,
        handler: Callable[[argparse.Namespace], int],
        help_: str,
        parent: argparse._SubParsersAction[argparse.ArgumentParser] = commands,
        config: bool = True,
        audited: str | None = None,
    ) -> argparse.ArgumentParser:
        sub = parent.add_parser(name, help=help_, description=help_)
        sub.set_defaults(handler=handler, audit_action=audited)
        if config:
            sub.add_argument(
                "--config",
                type=Path,
                default=DEFAULT_CONFIG,
                metavar="FILE",
                help=f"gateway configuration (default {DEFAULT_CONFIG})",
            )
        return sub

    check = command(
        "check-config",
        cmd_check_config,
        "validate the configuration and every file and secret it names",
    )
    check.add_argument(
        "--structure-only",
        action="store_true",
        help="check keys and values only, not the files they name",
    )

    pki = commands.add_parser("pki", help="development PKI").add_subparsers(
        dest="pki_command", required=True, metavar="ACTION"
    )
    init = command(
        "init",
        cmd_pki_init,
        "make a throw-away CA set and certificates for development and tests",
        parent=pki,
        config=False,
    )
    init.add_argument("--dir", type=Path, required=True, help="where to write the files")
    init.add_argument("--device", action="append", metavar="ID", help="a device id (repeat)")
    init.add_argument(
        "--upstream",
        action="append",
        metavar="NAME",
        help="an upstream server certificate to make (repeat)",
    )
    init.add_argument(
        "--hostname",
        action="append",
        metavar="NAME",
        help="extra DNS name or IP for the gateway's server certificate",
    )
    init.add_argument("--force", action="store_true", help="replace an existing PKI")

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
    command("list", cmd_device_list, "list registered devices", parent=device)
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
    users_list.add_argument("--format", choices=["text", "json"], default="text")
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

    report = command(
        "erasure-report",
        cmd_erasure_report,
        "certificate of erasure for a period, from the verified erasure ledger",
    )
    report.add_argument(
        "--from",
        dest="from_",
        type=date.fromisoformat,
        required=True,
        metavar="DATE",
        help="first day, YYYY-MM-DD (JST)",
    )
    report.add_argument(
        "--to",
        type=date.fromisoformat,
        required=True,
        metavar="DATE",
        help="last day, YYYY-MM-DD (JST), included",
    )
    report.add_argument("--format", choices=["json", "csv"], default="json")
    report.add_argument(
        "--operator",
        default="(not given)",
        help="who reviews this certificate, for the sanitization record",
    )
    report.add_argument(
        "--organization",
        default="(not given)",
        help="the organization the certificate is issued by",
    )

    spool = commands.add_parser("spool", help="spooled records (metadata only)").add_subparsers(
        dest="spool_command", required=True, metavar="ACTION"
    )
    listing = command(
        "list", cmd_spool_list, "list spooled records, newest first (no field values)", parent=spool
    )
    listing.add_argument(
        "--state",
        choices=["queued", "held", "delivered", "erased", "all"],
        default="held",
        help="which records (default: held, the ones waiting for an operator)",
    )
    listing.add_argument("--channel", help="only this channel")
    listing.add_argument(
        "--limit", type=_positive, default=100, help="at most this many (default 100)"
    )
    listing.add_argument("--format", choices=["text", "json"], default="text")
    show = command("show", cmd_spool_show, "one record's metadata, as JSON", parent=spool)
    show.add_argument("id", metavar="SUBMISSION_ID")
    for name, handler, text in (
        ("requeue", cmd_spool_requeue, "send held records again (through the running daemon)"),
        (
            "erase",
            cmd_spool_erase,
            "crypto-erase records now, recorded in the erasure ledger with reason 'operator'",
        ),
    ):
        sub = command(name, handler, text, parent=spool, audited=f"spool.{name}")
        sub.set_defaults(audit_self=True)
        sub.add_argument("ids", nargs="+", metavar="SUBMISSION_ID")

    command(
        "reload",
        cmd_reload,
        "make the running daemon read its configuration, certificates and registries again "
        "(as SIGHUP does, but answered: a refused configuration is reported here)",
    )

    audit = commands.add_parser("audit", help="operations audit log").add_subparsers(
        dest="audit_command", required=True, metavar="ACTION"
    )
    command(
        "verify",
        cmd_audit_verify,
        "check the audit log's hash chain and anchor: any edit, deletion, reordering or "
        "truncation is reported with its line",
        parent=audit,
    )
    audit_list = command(
        "list", cmd_audit_list, "print the (verified) audit log, one entry a line", parent=audit
    )
    audit_list.add_argument(
        "--last", type=_positive, metavar="N", help="only the last N entries (N ≥ 1)"
    )

    demo = command(
        "demo",
        cmd_demo,
        "run a throw-away gateway with simulated upstreams and post through it",
        config=False,
    )
    demo.add_argument(
        "--keep",
        type=Path,
        metavar="DIR",
        help="keep the demo's files (PKI, config, spool, logs) in DIR",
    )
    return parser


def _run(args: argparse.Namespace) -> int:
    """Run the command; a state-changing one only once the audit log can take its entry,
    and with that entry written after it (outcome ``ok`` or ``failed``)."""
    action: str | None = args.audit_action
    if action is None:
        return int(args.handler(args))
    audit = AuditLog(_config(args).audit_log, via="gatewayctl")
    try:
        audit.check()
    except (GatewayError, OSError) as exc:
        if action not in PROTECTIVE:
            raise UsageError(
                f"the audit log cannot record this change, so it was not made: {exc} "
                "(see 'gatewayctl audit verify')"
            ) from None
        # Disabling a lost tablet or a user must never wait for a repaired log.
        args.audit_detail = {}
        args.handler(args)
        print(
            f"gatewayctl: {action} done, but NOT recorded in the audit log: {exc}",
            file=sys.stderr,
        )
        return 3
    args.audit = audit
    args.audit_detail = {}
    if getattr(args, "audit_self", False):
        return int(args.handler(args))
    target = getattr(args, "id", None)
    try:
        status = int(args.handler(args))
    except (GatewayError, OSError) as exc:
        audit.record(action, target=target, outcome="failed", detail={"reason": str(exc)})
        raise
    ok = status == 0 or getattr(args, "audit_outcome", None) == "ok"
    audit.record(action, target=target, outcome="ok" if ok else "failed", detail=args.audit_detail)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"gatewayctl: {problem}", file=sys.stderr)
        return 2
    except (GatewayError, OSError) as exc:
        print(f"gatewayctl: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
