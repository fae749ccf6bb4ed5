"""Structured JSON logs that cannot carry personal data.

structlog processors are pure functions of the event dict. The last one before
rendering keeps only keys from :data:`SAFE_KEYS`; anything else is replaced by
``"[redacted]"``, so a careless ``log.info(..., value=x)`` cannot leak a field value.
Values of the safe keys are names, ids, counts and reasons chosen by the gateway.

Under systemd, when stderr is the journal's stream (``JOURNAL_STREAM`` names it), each
line starts with its syslog priority (``<3>`` error, ``<4>`` warning, ``<6>`` info,
``<7>`` debug), which journald takes as the entry's priority (``SyslogLevelPrefix=``, on
by default): ``journalctl -p warning`` then lists refusals and ``-p err`` faults.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

SAFE_KEYS = frozenset(
    {
        "event",
        "level",
        "timestamp",
        "logger",
        "logger_name",
        "request_id",
        "listener",
        "ports",
        "task",
        "method",
        "channel",
        "device_id",
        "user_id",
        "outcome",
        "status",
        "problem",
        "duration_ms",
        "fields",
        "dropped",
        "rules",
        "submission_id",
        "key_epoch",
        "destination",
        "attempt",
        "reason",
        "retry_in",
        "receipt",
        "state",
        "bytes",
        "address",
        "port",
        "url",
        "records",
        "requeued",
        "orphans_removed",
        "missing_files",
        "keys_migrated",
        "unreadable",
        "error",
        "config",
        "version",
        "count",
        "remote",
        "client_port",
        "fingerprint",
        "pid",
        "signal",
        "action",
        "waiting",
        "in_flight",
        "access_file",
        "last_seq",
        "event_loop",
    }
)
REDACTED = "[redacted]"
QUOTING_LOGGERS = ("python_multipart", "multipart")
"""Standard-library loggers whose messages may quote request bytes."""


def keep_safe_keys(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Replace the value of any key outside :data:`SAFE_KEYS`."""
    for key in list(event_dict):
        if key not in SAFE_KEYS:
            event_dict[key] = REDACTED
    return event_dict


PRIORITIES = {"critical": 2, "exception": 3, "error": 3, "warning": 4, "info": 6, "debug": 7}
"""syslog priorities by structlog method name, for journald's level prefix."""


def with_priority(_logger: Any, method: str, rendered: str) -> str:
    """The rendered line with journald's ``<N>`` priority prefix."""
    return f"<{PRIORITIES.get(method, 6)}>{rendered}"


def to_journal(stream: TextIO) -> bool:
    """True when ``stream`` is the journal's stream systemd gave us (``JOURNAL_STREAM``
    is ``device:inode`` of it)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


def to_json(event_dict: Any, **_kw: Any) -> str:
    """``json.dumps`` on its fast path (the module's shared encoder, built once); a value
    JSON has no form for is written as its ``repr`` rather than losing the line."""
    try:
        return json.dumps(event_dict)
    except TypeError:
        return json.dumps(event_dict, default=repr)


def configure(
    stream: TextIO | None = None, level: int = logging.INFO, *, once: bool = False
) -> None:
    """JSON lines to ``stream`` (stderr by default), one event per line, each with its
    syslog priority in front when the stream is the journal's.

    ``once``: the process configures logging this one time (``gatewayd``), so each
    module's logger is bound on its first line and reused, not rebuilt for every line
    (a request line 19.5 → 16 µs). Tests that reconfigure in one process leave it off:
    a cached logger keeps the processors it was bound with."""
    out = stream or sys.stderr
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        keep_safe_keys,
        structlog.processors.JSONRenderer(serializer=to_json),
    ]
    if to_journal(out):
        processors.append(with_priority)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=once,
    )
    # The multipart parser's warnings quote body bytes: silenced outright, its child
    # loggers (python_multipart.multipart, ...) included, which `disabled` alone misses.
    for name in QUOTING_LOGGERS:
        logging.getLogger(name).disabled = True
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)
    # Every other library logs through the standard library: its records are rendered
    # here as events whose text is dropped (a message or traceback may quote a request)
    # and whose keys pass keep_safe_keys like any other event.
    root = logging.getLogger()
    if not any(isinstance(h, _LibraryLogHandler) for h in root.handlers):
        root.addHandler(_LibraryLogHandler())


class _LibraryLogHandler(logging.Handler):
    """Standard-library records as ``library_log`` events: logger, level, exception type."""

    def emit(self, record: logging.LogRecord) -> None:
        error = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else None
        log = structlog.get_logger(logger_name=record.name)
        level = "error" if record.levelno >= logging.ERROR else "warning"
        getattr(log, level)("library_log", error=error)


def get_logger(name: str) -> Any:
    return structlog.get_logger(logger_name=name)
