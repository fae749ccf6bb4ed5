"""Loading the configuration file: every problem reported at once, by file and dotted
key, with the closest known key for a misspelt one and the reason for a key an older
version had."""

from __future__ import annotations

import contextlib
import difflib
import tomllib
from collections.abc import Mapping
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ValidationError,
)

from gateway.config.models import (
    NO_CHANNEL,
    NO_DESTINATION,
    NO_LISTENER,
    GatewayConfig,
    address_clash,
)
from gateway.config.types import ip_address_text
from gateway.errors import ConfigError, ConfigProblem


def _unknown_name(kind: str, name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"no {kind} named {name!r}{hint}; known: {', '.join(sorted(known)) or 'none'}"


def _names(data: Mapping[str, Any], key: str) -> list[str]:
    table = data.get(key)
    return [str(k) for k in table] if isinstance(table, Mapping) else []


def _reference_problems(data: Mapping[str, Any], file: str) -> list[ConfigProblem]:
    """Every broken reference and listener address clash, each under its dotted key:
    a channel's destination or listener that is not configured, a channel group's
    unknown channel, two listeners on one address.

    Read from the raw mapping so these are reported beside every other problem (an
    "after" model validator would run only once the rest of the file is valid).
    """
    problems = []
    known = _names(data, "destinations")
    listeners = _names(data, "listeners")
    channels = data.get("channels")
    for name, channel in channels.items() if isinstance(channels, Mapping) else ():
        if not isinstance(channel, Mapping):
            continue
        target = channel.get("destination")
        if isinstance(target, str) and target not in known:
            close = difflib.get_close_matches(target, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(
                ConfigProblem(file, f"channels.{name}.destination", NO_DESTINATION + hint)
            )
        served = channel.get("listeners")
        for index, listener in enumerate(served if isinstance(served, list) else ()):
            if isinstance(listener, str) and listener not in listeners:
                problems.append(
                    ConfigProblem(
                        file,
                        f"channels.{name}.listeners.{index}",
                        _unknown_name("listener", listener, listeners),
                    )
                )
    channel_names = _names(data, "channels")
    groups = data.get("channel_groups")
    for group, members in groups.items() if isinstance(groups, Mapping) else ():
        for index, member in enumerate(members if isinstance(members, list) else ()):
            if isinstance(member, str) and member not in channel_names:
                problems.append(
                    ConfigProblem(
                        file,
                        f"channel_groups.{group}.{index}",
                        _unknown_name("channel", member, channel_names),
                    )
                )
    table = data.get("listeners")
    addresses = {}
    for name, listener in table.items() if isinstance(table, Mapping) else ():
        if isinstance(listener, Mapping):
            host, port = listener.get("host"), listener.get("port", 8443)
            with contextlib.suppress(ValueError):
                if isinstance(host, str) and isinstance(port, int):
                    addresses[str(name)] = (ip_address_text(host), port)
    clash = address_clash(addresses)
    if clash:
        problems.append(ConfigProblem(file, f"listeners.{clash[0]}.port", clash[1]))
    return problems


RETIRED_KEYS: Mapping[tuple[str, ...], str] = {
    ("channels", "*", "erase_on_delivery"): (
        "no longer a setting: every channel now erases its copy as soon as the destination "
        "has it (送信後に自動消去), and the gateway cannot keep a delivered copy any more; "
        "retention_days bounds undelivered copies only. Remove this key"
    ),
    **{
        ("ingress", key): (
            "moved to [listeners.NAME]: the gateway has one listener per network, each with "
            "its own host, port, certificate, private_key, client_ca and tls_profile, and "
            "each channel names its listeners"
        )
        for key in ("host", "port", "certificate", "private_key", "client_ca", "tls_profile")
    },
}
"""Keys an older configuration may still hold, with why they went and what replaces them."""


def _retired(loc: tuple[int | str, ...]) -> str | None:
    for pattern, message in RETIRED_KEYS.items():
        if len(pattern) == len(loc) and all(
            p == "*" or p == str(part) for p, part in zip(pattern, loc, strict=True)
        ):
            return message
    return None


def _is_reference_message(message: str) -> bool:
    """A whole-model problem that :func:`_reference_problems` reports under its own key."""
    return any(
        text in message
        for text in (NO_DESTINATION, NO_LISTENER, NO_CHANNEL, "is already listeners.")
    )


def _known_keys(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The keys the model expects at ``loc`` (the parent of an unknown key)."""
    current: Any = model
    index = 0
    while index < len(loc):
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        info = current.model_fields.get(str(loc[index]))
        if info is None:
            return []
        current = info.annotation
        index += 1
        if get_origin(current) is dict:
            current = get_args(current)[1]
            index += 1  # the next part is a user-chosen name (a channel, a field)
        if get_origin(current) in (UnionType, Union):
            models = [a for a in get_args(current) if isinstance(a, type)]
            current = next((a for a in models if issubclass(a, BaseModel)), None)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _problems_from(error: ValidationError, file: str) -> list[ConfigProblem]:
    problems = []
    for item in error.errors(include_url=False):
        loc = tuple(item["loc"])
        key = ".".join(str(p) for p in loc)
        message = str(item["msg"])
        if item["type"] == "extra_forbidden" and (retired := _retired(loc)):
            message = retired
        elif item["type"] == "extra_forbidden":
            known = _known_keys(GatewayConfig, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            message = "unknown key" + (f" (did you mean {close[0]!r}?)" if close else "")
        elif item["type"] == "missing":
            message = "required key is missing"
        elif message.startswith("Value error, "):
            message = message.removeprefix("Value error, ")
        problems.append(ConfigProblem(file, key, message))
    return problems


def parse_config(data: Mapping[str, Any], *, base: Path, file: str = "<config>") -> GatewayConfig:
    """Validate a configuration mapping; relative paths resolve against ``base``."""
    references = _reference_problems(data, file)
    try:
        config = GatewayConfig.model_validate(data, context={"base": base})
    except ValidationError as exc:
        problems = [
            p
            for p in _problems_from(exc, file)
            if not (references and not p.key and _is_reference_message(p.message))
        ]
        raise ConfigError(problems + references) from None
    if references:  # pragma: no cover - the model validator refuses these first
        raise ConfigError(references)
    return config


def load_config(path: Path) -> GatewayConfig:
    """Read and validate a TOML configuration file; :class:`ConfigError` lists every problem."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError([ConfigProblem(str(path), "", "file not found")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        problem = ConfigProblem(str(path), "", f"cannot read: {type(exc).__name__}")
        raise ConfigError([problem]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([ConfigProblem(str(path), "", f"not valid TOML: {exc}")]) from None
    return parse_config(data, base=path.resolve().parent, file=str(path))
