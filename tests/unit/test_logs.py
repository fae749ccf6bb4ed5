"""The log's own rules: only safe keys, every key the code logs is one, and journald's
priority prefix when stderr is the journal."""

from __future__ import annotations

import ast
import json
import logging
import os
from pathlib import Path

import pytest
import structlog

from gateway.ops import logs
from gateway.ops.logs import REDACTED, SAFE_KEYS

GATEWAY = Path(__file__).resolve().parents[2] / "gateway"
LEVELS = {"debug", "info", "warning", "error", "exception", "critical"}


def logged_keys() -> dict[str, list[str]]:
    """Every keyword passed to a log call in the gateway's source, with where."""
    found: dict[str, list[str]] = {}
    for path in sorted(GATEWAY.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            direct = isinstance(func, ast.Attribute) and func.attr in LEVELS
            direct = direct and isinstance(func.value, ast.Name) and func.value.id == "log"
            chosen = isinstance(func, ast.Call) and getattr(func.func, "id", "") == "getattr"
            chosen = chosen or isinstance(func, ast.BoolOp | ast.IfExp)
            if direct or chosen:
                for keyword in node.keywords:
                    if keyword.arg is not None:
                        where = f"{path.relative_to(GATEWAY.parent)}:{node.lineno}"
                        found.setdefault(keyword.arg, []).append(where)
    return found


def test_every_key_the_gateway_logs_is_a_safe_key() -> None:
    """A key outside the allow-list is shown as [redacted]: the line would say nothing.
    (Found this way: action, waiting and in_flight were redacted.)"""
    keys = logged_keys()
    assert {"submission_id", "destination", "outcome"} <= set(keys)  # the scan finds calls
    unsafe = {key: where for key, where in keys.items() if key not in SAFE_KEYS}
    assert unsafe == {}


def test_a_key_outside_the_allow_list_is_redacted() -> None:
    event = logs.keep_safe_keys(None, "info", {"event": "x", "name": "新宿 花子"})
    assert event == {"event": "x", "name": REDACTED}


@pytest.mark.parametrize(
    ("method", "prefix"), [("error", "<3>"), ("warning", "<4>"), ("info", "<6>")]
)
def test_lines_carry_journald_priorities_when_stderr_is_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, prefix: str
) -> None:
    """With JOURNAL_STREAM naming the stream (as systemd sets it), each line starts with
    its syslog priority; the rest of the line is the JSON event."""
    saved = structlog.get_config()
    with open(tmp_path / "journal", "w", encoding="utf-8") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        try:
            logs.configure(stream, level=logging.DEBUG)
            getattr(logs.get_logger("gateway.test"), method)("request", status=403)
        finally:
            structlog.configure(**saved)
    line = (tmp_path / "journal").read_text("utf-8").strip()
    assert line.startswith(prefix)
    assert json.loads(line[len(prefix) :])["status"] == 403


def test_no_prefix_on_a_stream_that_is_not_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")
    saved = structlog.get_config()
    with open(tmp_path / "terminal", "w", encoding="utf-8") as stream:
        try:
            logs.configure(stream)
            logs.get_logger("gateway.test").warning("request")
        finally:
            structlog.configure(**saved)
    assert (tmp_path / "terminal").read_text("utf-8").startswith("{")


def test_lines_are_the_standard_json_and_a_value_json_cannot_write_keeps_its_line() -> None:
    """The serializer's fast path writes what ``json.dumps`` writes; a value JSON has no
    form for (a safe key given an object) is written as its repr, not lost."""
    event = {"event": "request", "status": 202, "channel": "窓口", "duration_ms": 1.5}
    assert logs.to_json(event) == json.dumps(event)
    odd = {"event": "x", "error": Path("/spool")}
    assert json.loads(logs.to_json(odd)) == {"event": "x", "error": "PosixPath('/spool')"}


def test_configured_once_each_logger_is_bound_on_its_first_line(tmp_path: Path) -> None:
    """gatewayd configures logging once: a logger is bound on its first line and reused
    (not rebuilt per line), and its lines still pass the allow-list."""
    saved = structlog.get_config()
    log = logs.get_logger("gateway.test.once")
    with open(tmp_path / "out", "w", encoding="utf-8") as stream:
        try:
            logs.configure(stream, once=True)
            log.info("request", status=202, name="新宿 花子")
            bound = vars(log).get("bind")
            log.info("request", status=503)
            assert bound is not None and vars(log).get("bind") is bound
        finally:
            structlog.configure(**saved)
    lines = [json.loads(x) for x in (tmp_path / "out").read_text("utf-8").splitlines()]
    assert [x["status"] for x in lines] == [202, 503]
    assert lines[0]["name"] == REDACTED
    assert "新宿" not in (tmp_path / "out").read_text("utf-8")
