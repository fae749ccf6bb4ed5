"""The configuration reference (docs/configuration.md), generated from the models.

Every table and key of the TOML file, with its type, its default (or "required"), its
bounds, and what it means (the attribute's docstring in :mod:`gateway.config.models`).
``python -m gateway.config.reference --write`` rewrites the file; a test fails when the
file no longer matches the models.
"""

from __future__ import annotations

import ast
import inspect
import sys
import textwrap
import types
import typing
from collections.abc import Iterator
from datetime import date, time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from gateway.config import models
from gateway.shipped import CHECKOUT

OUTPUT = CHECKOUT / "docs" / "configuration.md"
HEADER = """# Configuration reference

Generated from `gateway/config/models.py` by `python -m gateway.config.reference --write`;
a test fails when it is stale. One TOML file (`conf/gateway.toml` is the shipped one).
An unknown key is an error naming the file and the dotted key with the closest known one.
Paths are absolute or relative to the configuration file; a secret is a 0600 file path or
`credential:NAME` (a systemd credential, `$CREDENTIALS_DIRECTORY/NAME`), never a value.
Checks that span keys (a channel naming a listener that exists, `scan` only on a photo
channel with `[scanner]` set, ...) are described with the table they concern.
"""


ALIASES = {
    "RelPath": "path",
    "SecretRef": "secret",
    "IpAddress": "IP address",
    "Port": "port",
    "Name": "name",
    "Network": "network (CIDR)",
}


def _written(cls: type) -> dict[str, str]:
    """Each attribute's annotation as written, where it names one of our types."""
    if not cls.__module__.startswith("gateway."):
        return {}
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]
    assert isinstance(body, ast.ClassDef)
    found = {}
    for node in body.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            text = ast.unparse(node.annotation)
            if any(alias in text for alias in ALIASES) and not text.startswith("Annotated"):
                for alias, word in ALIASES.items():
                    text = text.replace(alias, word)
                text = text.replace(" | None", " (optional)").replace("|", "\\|")
                text = text.replace("tuple[", "list of ").replace(", ...", "")
                found[node.target.id] = text.rstrip("]")
    return found


def _docstrings(cls: type) -> dict[str, str]:
    """Attribute docstrings: the string literal right after each annotated attribute."""
    if not cls.__module__.startswith("gateway."):
        return {}
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    body = ast.parse(textwrap.dedent(source)).body[0]
    assert isinstance(body, ast.ClassDef)
    found: dict[str, str] = {}
    for node, following in zip(body.body, [*body.body[1:], None], strict=True):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            found[node.target.id] = " ".join(following.value.value.split())
    return found


def _type(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type(args[0])
    if origin is Literal:
        return " \\| ".join(f"`{a!r}`".replace("'", '"') for a in args)
    if origin in (typing.Union, types.UnionType):
        parts = [_type(a) for a in args if a is not type(None)]
        return " \\| ".join(parts) + (" (optional)" if type(None) in args else "")
    if origin in (tuple, list):
        return f"list of {_type(args[0])}" if args else "list"
    if origin is dict:
        return f"table of {_type(args[1])}"
    if annotation is date:
        return "date (YYYY-MM-DD)"
    if annotation is time:
        return "time (HH:MM)"
    name = getattr(annotation, "__name__", str(annotation))
    return {"RelPath": "path", "SecretRef": "secret", "IpAddress": "IP address"}.get(name, name)


def _bounds(info: FieldInfo) -> str:
    words = []
    for item in info.metadata:
        for attr, sign in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤")):
            value = getattr(item, attr, None)
            if value is not None:
                words.append(f"{sign} {value}")
        if getattr(item, "min_length", None):
            words.append(f"at least {item.min_length}")
    return ", ".join(words)


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(its table's defaults)"
    if value in ((), {}, None, ""):
        return "none" if value is None else "empty"
    return f"`{value}`"


def _nested(annotation: Any) -> tuple[type[BaseModel], str] | None:
    """The model a key holds (as a table, or a table of named tables), if any."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _nested(args[0])
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _nested(inner[0]) if len(inner) == 1 else None
    if origin is dict and inspect.isclass(args[1]) and issubclass(args[1], BaseModel):
        return args[1], ".NAME"
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return annotation, ""
    return None


def _tables(model: type[BaseModel], prefix: str) -> Iterator[tuple[str, type[BaseModel]]]:
    for name, info in model.model_fields.items():
        nested = _nested(info.annotation)
        if nested is not None:
            inner, suffix = nested
            yield f"{prefix}{name}{suffix}", inner
            yield from _tables(inner, f"{prefix}{name}{suffix}.")


def render() -> str:
    lines = [HEADER]
    tables: list[tuple[str, type[BaseModel]]] = [
        ("(top level)", models.GatewayConfig),
        *_tables(models.GatewayConfig, ""),
    ]
    for table, model in tables:
        lines.append(f"\n## `[{table}]`\n" if table != "(top level)" else "\n## Top level\n")
        doc = inspect.getdoc(model)
        if doc:
            lines.append(" ".join(doc.split()) + "\n")
        lines.append("| key | type | default | bounds | meaning |")
        lines.append("|---|---|---|---|---|")
        docs = {k: v for cls in reversed(model.__mro__) for k, v in _docstrings(cls).items()}
        written = {k: v for cls in reversed(model.__mro__) for k, v in _written(cls).items()}
        for name, info in model.model_fields.items():
            if _nested(info.annotation) is not None:
                continue  # a table of its own, below
            meaning = docs.get(name, "").replace("|", "\\|")
            kind = written.get(name) or _type(info.annotation)
            row = [f"`{name}`", kind, _default(info), _bounds(info), meaning]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    text = render()
    if args == ["--write"]:
        Path(OUTPUT).write_text(text, "utf-8")
        print(f"wrote {OUTPUT}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
