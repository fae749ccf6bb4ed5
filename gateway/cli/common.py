"""What every gatewayctl command shares: the configuration it reads (``--config``, then
``$GATEWAY_CONFIG``, then /etc/gateway/gateway.toml), its exit statuses, how it refuses
in plain words, how it asks before destroying data, how it prints times and JSON, and
how a command is added to the parser."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime, tzinfo
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import shtab

from gateway.config import GatewayConfig, load_config
from gateway.errors import ConfigError, ConfigProblem, GatewayError
from gateway.japan import JST

DEFAULT_CONFIG = Path("/etc/gateway/gateway.toml")
CONFIG_ENV = "GATEWAY_CONFIG"
DEFAULT_TIMEZONE = "Asia/Tokyo"
SubParsers = argparse._SubParsersAction  # the type argparse gives add_subparsers()

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_RECORDED = 3
EXIT_UNAVAILABLE = 69  # sysexits.h EX_UNAVAILABLE

EXIT_STATUS_HELP = """\
exit status:
   0  done; for a check (check-config, audit verify, access-log verify): it passed
   1  the operation failed, or a check found a problem (the message says which)
   2  usage error: a bad option or value, or a destructive command without --yes
      when no terminal can confirm it; nothing was done
   3  a protective change (device revoke, user disable, user deny) was made but
      could not be written to the audit log
  69  the running gatewayd is needed but cannot be reached (EX_UNAVAILABLE)
  78  the configuration is unusable: its file is missing or invalid, or a secret
      or file it names is (EX_CONFIG)

The configuration is --config FILE (before or after the command), else
$GATEWAY_CONFIG, else /etc/gateway/gateway.toml. Times are shown in --timezone
(default Asia/Tokyo)."""


class UsageError(GatewayError):
    """The command was asked wrongly (an option, a value, the input): nothing was done;
    the message says what to change. Exit status 2."""


class CommandFailed(GatewayError):
    """The command was well formed but could not be done (the entry it names does not
    exist or already does, the audit log cannot record it). Exit status 1."""


def config_path(given: Path | None, environ: Mapping[str, str] = os.environ) -> Path:
    """``--config`` if given, else ``$GATEWAY_CONFIG`` if set and not empty, else the
    default."""
    if given is not None:
        return given
    named = environ.get(CONFIG_ENV, "")
    return Path(named) if named else DEFAULT_CONFIG


def load_plainly(path: Path) -> GatewayConfig:
    """:func:`load_config`, with an unreadable file said in plain words."""
    try:
        return load_config(path)
    except ConfigError as exc:
        raise ConfigError([_plain_problem(path, p) for p in exc.problems]) from None


def _plain_problem(path: Path, problem: ConfigProblem) -> ConfigProblem:
    if problem.key or not problem.message.startswith("cannot read:"):
        return problem
    if "UnicodeDecodeError" in problem.message:
        return ConfigProblem(problem.file, "", "is not UTF-8 text, so not a configuration file")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        return ConfigProblem(problem.file, "", os_reason(exc))
    return ConfigProblem(problem.file, "", "cannot be read")


def config_of(args: argparse.Namespace) -> GatewayConfig:
    """The configuration ``--config`` (or ``$GATEWAY_CONFIG``) names, loaded once."""
    loaded: GatewayConfig | None = getattr(args, "loaded_config", None)
    if loaded is None:
        path = config_path(getattr(args, "config", None))
        loaded = args.loaded_config = load_plainly(path)
    return loaded


_OS_REASONS = {
    errno.ENOENT: "does not exist",
    errno.EISDIR: "is a directory, not a file",
    errno.ENOTDIR: "cannot be reached: a part of the path is not a directory",
    errno.EACCES: "cannot be used: permission denied (run as the gateway's user or root)",
    errno.EPERM: "cannot be used: not permitted (run as the gateway's user or root)",
    errno.ECONNREFUSED: "refuses connections: nothing is listening there",
    errno.EEXIST: "already exists",
    errno.ENOSPC: "cannot be written: its file system is full",
    errno.EDQUOT: "cannot be written: the disk quota is used up",
    errno.EROFS: "cannot be written: its file system is read-only",
    errno.ELOOP: "cannot be opened: too many symbolic links, or a link where none may be",
}


def os_reason(exc: OSError) -> str:
    """What went wrong, in words, without the path: "is a directory, not a file"."""
    reason = _OS_REASONS.get(exc.errno or 0)
    if reason is None:
        reason = f"cannot be used: {(exc.strerror or 'system error').lower()}"
    return reason


def plain_os_error(exc: OSError, path: object = None) -> str:
    """An OSError as a sentence naming its path: "/etc/x is a directory, not a file"."""
    where = path if path is not None else exc.filename
    if where is None:
        return (exc.strerror or "a system call failed").lower()
    return f"{where} {os_reason(exc)}"


_CLASS_NAMES = {
    "FileNotFoundError": "it does not exist",
    "IsADirectoryError": "it is a directory, not a file",
    "NotADirectoryError": "a part of its path is not a directory",
    "PermissionError": "permission denied (run as the gateway's user or root)",
    "UnicodeDecodeError": "it is not UTF-8 text",
    "JSONDecodeError": "it is not valid JSON",
}


def say(exc: object) -> str:
    """An error (or a problem) for a person: an OSError as a sentence naming its path,
    and a Python class name a lower layer left in a message put in words."""
    if isinstance(exc, OSError):
        return plain_os_error(exc)
    text = str(exc)
    for name, words in _CLASS_NAMES.items():
        text = text.replace(name, words)
    return text


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be 1 or more")
    return value


def iso_date(text: str) -> date:
    """A day given as YYYY-MM-DD (the argparse type of every DATE option)."""
    try:
        if len(text) != 10:
            raise ValueError(text)
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: DATE must be YYYY-MM-DD, e.g. 2026-11-30"
        ) from None


def time_zone(text: str) -> tzinfo:
    """``UTC`` or an IANA time zone name (the argparse type of ``--timezone``)."""
    if text.upper() in ("UTC", "Z"):
        return UTC
    try:
        return ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        if text == DEFAULT_TIMEZONE:
            return JST  # no tz database installed: Japan has one offset all year
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time zone: give UTC or an IANA name such as Asia/Tokyo"
        ) from None


def zone_of(args: argparse.Namespace) -> tzinfo:
    """The ``--timezone`` the command was given, or Asia/Tokyo."""
    zone: tzinfo | None = getattr(args, "timezone", None)
    return zone if zone is not None else time_zone(DEFAULT_TIMEZONE)


def local_time(value: float | str | None, zone: tzinfo, *, text: bool = False) -> str | None:
    """A POSIX time or an ISO 8601 string, in ``zone``, as ISO 8601 with its offset: to
    the microsecond for JSON, to the second for text (``2026-11-30T10:00:00+09:00``)."""
    if value is None:
        return None
    if isinstance(value, str):
        moment = datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(zone)
    else:
        moment = datetime.fromtimestamp(value, zone)
    return moment.isoformat(timespec="seconds") if text else moment.isoformat()


def print_json(document: Any) -> None:
    json.dump(document, sys.stdout, ensure_ascii=False, indent=2)
    sys.stdout.write("\n")


def confirm(args: argparse.Namespace, what: str) -> None:
    """Go on only with ``--yes`` or a "yes" typed at the terminal; refuse otherwise."""
    if getattr(args, "yes", False):
        return
    stdin = sys.stdin
    if stdin is None or not stdin.isatty():
        raise UsageError(
            f"this would {what}, which cannot be undone; standard input is not a "
            "terminal to confirm it on: add --yes"
        )
    sys.stderr.write(f"gatewayctl: this will {what}, which cannot be undone. Go on? [y/N] ")
    sys.stderr.flush()
    answer = stdin.readline().strip().lower()
    if answer not in ("y", "yes"):
        raise CommandFailed("not confirmed: nothing done")


def add_format(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--format",
        choices=["text", "json"],
        default="text",
        help="text for people (default), or JSON for scripts",
    )


def add_global_options(parser: argparse.ArgumentParser, config: bool = True) -> None:
    """``--config`` and ``--timezone``, on the program and again on each command, so
    that they may come before or after it (no default here: see :func:`config_path`)."""
    if config:
        option = parser.add_argument(
            "--config",
            type=Path,
            default=argparse.SUPPRESS,
            metavar="FILE",
            help=f"gateway configuration (default ${CONFIG_ENV}, else {DEFAULT_CONFIG})",
        )
        option.complete = shtab.FILE  # type: ignore[attr-defined]
    parser.add_argument(
        "--timezone",
        type=time_zone,
        default=argparse.SUPPRESS,
        metavar="ZONE",
        help=f"time zone of the times shown: UTC or an IANA name (default {DEFAULT_TIMEZONE})",
    )


class Commands:
    """Adds a command to a (sub)parser, with the global options and its audit action;
    ``destructive`` adds ``--yes`` (see :func:`confirm`)."""

    def __init__(self, top: SubParsers[argparse.ArgumentParser]) -> None:
        self._top = top

    def __call__(
        self,
        name: str,
        handler: Callable[[argparse.Namespace], int],
        help_: str,
        parent: SubParsers[argparse.ArgumentParser] | None = None,
        config: bool = True,
        audited: str | None = None,
        destructive: bool = False,
    ) -> argparse.ArgumentParser:
        sub = (parent or self._top).add_parser(name, help=help_, description=help_)
        sub.set_defaults(handler=handler, audit_action=audited)
        if config:
            add_global_options(sub)
        if destructive:
            sub.add_argument(
                "--yes",
                action="store_true",
                help="do it without asking (needed when standard input is not a terminal)",
            )
        return sub
