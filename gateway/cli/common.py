"""What every gatewayctl command shares: the configuration it reads, how it refuses,
and how a command is added to the parser."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from gateway.config import GatewayConfig, load_config
from gateway.errors import GatewayError

DEFAULT_CONFIG = Path("/etc/gateway/gateway.toml")
SubParsers = argparse._SubParsersAction  # the type argparse gives add_subparsers()


class UsageError(GatewayError):
    """The command cannot do what was asked; the message says why."""


def config_of(args: argparse.Namespace) -> GatewayConfig:
    """The configuration ``--config`` names, loaded once per command."""
    loaded: GatewayConfig | None = getattr(args, "loaded_config", None)
    if loaded is None:
        loaded = args.loaded_config = load_config(args.config)
    return loaded


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be 1 or more")
    return value


class Commands:
    """Adds a command to a (sub)parser, with ``--config`` and its audit action."""

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
    ) -> argparse.ArgumentParser:
        sub = (parent or self._top).add_parser(name, help=help_, description=help_)
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
