"""The value types of the configuration: paths, secrets, names, networks, addresses.

Each is a pydantic annotated type whose validator names the rule and never repeats a
secret. Relative paths resolve against the configuration file's directory.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated

from pydantic import (
    AfterValidator,
    Field,
    PlainValidator,
    ValidationInfo,
)

FILE_FORMATS = frozenset({"jpeg_photo", "opaque_file"})
"""Field formats that arrive as a file part and stream to the spool."""

BATCH_MANIFEST = ("batch_id", "record_count", "sha256")
"""The manifest a batch channel requires beside its opaque file (資料30)."""

MAX_BODY_LIMIT = 64 * 1024 * 1024
MAX_UNIX_SOCKET_PATH = 107
"""sun_path holds 108 bytes with the terminating NUL."""


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base")
    if value.is_absolute() or base is None:
        return value
    return Path(base) / value


def _secret_spec(value: str, info: ValidationInfo) -> str:
    """A secret's location: a path (resolved like other paths) or ``credential:NAME``."""
    # Checked first: a secret pasted after "credential:" is still a secret pasted inline.
    if "\n" in value or len(value) > 4096 or _looks_like_a_secret(value):
        # The message never repeats the value: it may be the key or password itself.
        raise ValueError("must be a file path or credential:NAME, never the secret itself")
    if value.startswith("credential:"):
        name = value.removeprefix("credential:")
        if not name or "/" in name or name in {".", ".."}:
            raise ValueError("credential:NAME needs a plain credential name")
        return value
    return str(_resolve_path(Path(value), info))


_KEY_LIKE = re.compile(r"[0-9A-Fa-f]{32,}|[A-Za-z0-9+/_-]{32,}={0,2}")


def _looks_like_a_secret(value: str) -> bool:
    """A hex or base64 key, or ``user:password``, pasted where a file's path belongs."""
    name = value.removeprefix("credential:")
    if _KEY_LIKE.fullmatch(name):
        return True
    return not value.startswith("credential:") and ":" in value


def _network(value: object) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """One CIDR network; a single validator so an error is one problem under one key."""
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    try:
        if isinstance(value, str):
            return ipaddress.ip_network(value)
    except ValueError:
        pass
    raise ValueError("must be a network in CIDR notation without host bits, e.g. 10.31.0.0/16")


RelPath = Annotated[Path, AfterValidator(_resolve_path)]
SecretRef = Annotated[str, AfterValidator(_secret_spec)]
Port = Annotated[int, Field(ge=0, le=65535)]
Name = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")]
Network = Annotated[ipaddress.IPv4Network | ipaddress.IPv6Network, PlainValidator(_network)]


def ip_address_text(value: object) -> str:
    """An IP address literal, kept as written in its normal form (no host names: a
    listener or a source address names one network interface, not a DNS answer)."""
    if isinstance(value, str):
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            pass
    raise ValueError("must be an IP address, e.g. 10.31.0.1 (not a host name)")


IpAddress = Annotated[str, PlainValidator(ip_address_text)]
