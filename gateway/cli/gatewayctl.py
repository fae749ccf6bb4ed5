"""``gatewayctl``: check the configuration, make a development PKI, administer devices and
staff, look after the spool, verify the audit log, and run the demo. Every command that
changes state is written to the operations audit log. Run ``gatewayctl COMMAND --help``
for each command's options."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway import __version__
from gateway.backends import build_audit
from gateway.cli import (
    access_commands,
    erasure_commands,
    key_commands,
    registry_commands,
    spool_commands,
)
from gateway.cli.common import (
    EXIT_FAILED,
    EXIT_NOT_RECORDED,
    EXIT_STATUS_HELP,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    CommandFailed,
    Commands,
    UsageError,
    add_global_options,
    config_of,
    config_path,
    load_plainly,
    say,
)
from gateway.crypto.pki import PkiExistsError, init_pki
from gateway.errors import EXIT_CONFIG, ConfigError, GatewayError, SecretFileError
from gateway.ops.control import DaemonUnavailable
from gateway.preflight import keystore_warnings, registry_problems, secret_problems

PROTECTIVE = frozenset({"device.revoke", "user.disable", "user.deny"})
"""Actions done even when the audit log cannot take their entry (exit status 3)."""

COMPLETION_FILES = {
    "bash": "/usr/share/bash-completion/completions/gatewayctl",
    "zsh": "/usr/share/zsh/vendor-completions/_gatewayctl",
}


def cmd_check_config(args: argparse.Namespace) -> int:
    """Exit 0 when the configuration is usable, 78 (EX_CONFIG) when it is not."""
    credentials: Path | None = args.credentials_dir
    if credentials is not None and not credentials.is_dir():
        raise UsageError(f"--credentials-dir {credentials} is not a directory")
    try:
        config = load_plainly(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"{len(exc.problems)} problem(s) in {args.config}", file=sys.stderr)
        return EXIT_CONFIG
    problems = []
    if not args.structure_only:
        problems = secret_problems(config, str(args.config), credentials_dir=credentials)
        problems += registry_problems(config, str(args.config))
    for problem in problems:
        print(say(problem), file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s) in {args.config}", file=sys.stderr)
        return EXIT_CONFIG
    print(
        f"{args.config}: OK ({len(config.channels)} channels, "
        f"{len(config.destinations)} destinations)"
    )
    for warning in keystore_warnings(config, str(args.config)):
        print(warning, file=sys.stderr)
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


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    return run_demo(keep=args.keep)


def cmd_completion(args: argparse.Namespace) -> int:
    import shtab

    sys.stdout.write(shtab.complete(_parser(), shell=args.shell))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gatewayctl",
        description=__doc__,
        epilog=EXIT_STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    add_global_options(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    command = Commands(commands)

    check = command(
        "check-config",
        cmd_check_config,
        "validate the configuration and every file and secret it names (exit 78 if unusable)",
    )
    check.add_argument(
        "--structure-only",
        action="store_true",
        help="check keys and values only, not the files they name",
    )
    check.add_argument(
        "--credentials-dir",
        type=Path,
        metavar="DIR",
        help="check each credential:NAME secret as DIR/NAME (e.g. /etc/credstore, as root "
        "before the unit runs); default $CREDENTIALS_DIRECTORY",
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

    registry_commands.register(commands, command)
    spool_commands.register(commands, command)
    erasure_commands.register(commands, command)
    access_commands.register(commands, command)
    key_commands.register(commands, command)

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
    completion = command(
        "completion",
        cmd_completion,
        "print the shell completion script, e.g. gatewayctl completion bash > "
        f"{COMPLETION_FILES['bash']}",
        config=False,
    )
    completion.add_argument("shell", choices=sorted(COMPLETION_FILES))
    return parser


def _run(args: argparse.Namespace) -> int:
    """Run the command; a state-changing one only once the audit log can take its entry,
    and with that entry written after it (outcome ``ok`` or ``failed``)."""
    action: str | None = args.audit_action
    ask = getattr(args, "confirm", None)
    if ask is not None:
        ask(args)  # before anything, the audit log included: a refusal changes nothing
    if action is None:
        return int(args.handler(args))
    audit = build_audit(config_of(args), via="gatewayctl")  # a file, or the shared table
    try:
        audit.check()
    except (GatewayError, OSError) as exc:
        if action not in PROTECTIVE:
            raise CommandFailed(
                f"the audit log cannot record this change, so it was not made: {say(exc)} "
                "(see 'gatewayctl audit verify')"
            ) from None
        # Disabling a lost tablet or a user must never wait for a repaired log.
        args.audit_detail = {}
        args.handler(args)
        print(
            f"gatewayctl: {action} done, but NOT recorded in the audit log: {say(exc)}",
            file=sys.stderr,
        )
        return EXIT_NOT_RECORDED
    args.audit = audit
    args.audit_detail = {}
    if getattr(args, "audit_self", False):
        return int(args.handler(args))
    target = getattr(args, "id", None)
    try:
        status = int(args.handler(args))
    except (GatewayError, OSError) as exc:
        audit.record(action, target=target, outcome="failed", detail={"reason": say(exc)})
        raise
    ok = status == 0 or getattr(args, "audit_outcome", None) == "ok"
    audit.record(action, target=target, outcome="ok" if ok else "failed", detail=args.audit_detail)
    return status


def _failure(exc: BaseException) -> int:
    """The exit status for an error (see EXIT_STATUS_HELP)."""
    if isinstance(exc, ConfigError | SecretFileError):
        return EXIT_CONFIG
    if isinstance(exc, UsageError):
        return EXIT_USAGE
    if isinstance(exc, DaemonUnavailable):
        return EXIT_UNAVAILABLE
    return EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.config = config_path(getattr(args, "config", None))
    try:
        return _run(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"gatewayctl: {say(problem)}", file=sys.stderr)
        return EXIT_CONFIG
    except (GatewayError, OSError) as exc:
        print(f"gatewayctl: {say(exc)}", file=sys.stderr)
        return _failure(exc)


if __name__ == "__main__":
    sys.exit(main())
