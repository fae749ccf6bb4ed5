"""``gatewayctl``: check the configuration, make a development PKI, administer devices and
staff, and run the demo. Run ``gatewayctl COMMAND --help`` for each command's options."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, date, datetime
from pathlib import Path

from gateway import __version__
from gateway.chain import HashChainLog
from gateway.config import GatewayConfig, load_config
from gateway.crypto.pki import PkiExistsError, cert_fingerprint, init_pki, load_cert_der
from gateway.daemon import secret_problems
from gateway.errors import ConfigError, GatewayError
from gateway.registry import (
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
from gateway.retention.report import as_csv, certificate

DEFAULT_CONFIG = Path("/etc/gateway/gateway.toml")


class UsageError(GatewayError):
    """The command cannot do what was asked; the message says why."""


def _config(args: argparse.Namespace) -> GatewayConfig:
    config = load_config(args.config)
    return config


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"{len(exc.problems)} problem(s) in {args.config}", file=sys.stderr)
        return 1
    problems = [] if args.structure_only else secret_problems(config, str(args.config))
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s) in {args.config}", file=sys.stderr)
        return 1
    print(
        f"{args.config}: OK ({len(config.channels)} channels, "
        f"{len(config.destinations)} destinations)"
    )
    for name, channel in sorted(config.channels.items()):
        window = ""
        if channel.active_from or channel.active_until:
            window = f", active {channel.active_from or '…'} to {channel.active_until or '…'}"
        erase = "on delivery" if channel.erase_on_delivery else "after retention"
        print(
            f"  {name}: → {channel.destination}, {len(channel.fields)} fields, "
            f"unlisted={channel.on_unlisted}, retention {channel.retention_days} d, "
            f"erase {erase}{window}"
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
    print(f"device {args.id} revoked: the gateway refuses it from its next request on")
    return 0


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


def cmd_user_add(args: argparse.Namespace) -> int:
    config = _config(args)
    _check_id("staff user", args.id)
    if load_users(config.auth.users_file).get(args.id) is not None:
        raise UsageError(f"user {args.id!r} exists; use 'gatewayctl user passwd'")
    upsert_user(config.auth.users_file, User(args.id, hash_password(_read_password(args))))
    print(f"staff user {args.id} added")
    return 0


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
    print(f"staff user {args.id} disabled")
    return 0


def cmd_erasure_report(args: argparse.Namespace) -> int:
    config = _config(args)
    directory = config.spool.directory
    ledger = HashChainLog(
        directory / "erasure-ledger.jsonl", anchor=directory / "erasure-ledger.anchor"
    )
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


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    return run_demo(keep=args.keep)


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
    ) -> argparse.ArgumentParser:
        sub = parent.add_parser(name, help=help_, description=help_)
        sub.set_defaults(handler=handler)
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
        "add", cmd_device_add, "register a device by its client certificate", parent=device
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
        "disable a lost or stolen device at once (端末無効化)",
        parent=device,
    )
    revoke.add_argument("--id", required=True)

    user = commands.add_parser("user", help="staff users").add_subparsers(
        dest="user_command", required=True, metavar="ACTION"
    )
    for name, handler, text in (
        ("add", cmd_user_add, "add a staff user (password asked, or read from stdin)"),
        ("passwd", cmd_user_passwd, "set a staff user's password"),
    ):
        sub = command(name, handler, text, parent=user)
        sub.add_argument("--id", required=True)
        sub.add_argument(
            "--password-stdin",
            action="store_true",
            help="read the password from the first line of standard input",
        )
    disable = command("disable", cmd_user_disable, "disable a staff user", parent=user)
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


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"gatewayctl: {problem}", file=sys.stderr)
        return 2
    except (GatewayError, OSError) as exc:
        print(f"gatewayctl: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
