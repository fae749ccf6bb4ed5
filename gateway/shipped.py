"""Where the files the project ships (the default configuration, the systemd units, the
Prometheus rules and dashboard) are: in the checkout when running from one, else where
the wheel put them, ``<prefix>/share/gateway/`` (see pyproject's data-files)."""

from __future__ import annotations

import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]
INSTALLED = {"conf/prometheus/": "prometheus/", "conf/": "conf/", "systemd/": "systemd/"}


def shipped(relative: str) -> Path:
    """The shipped file ``relative`` (as in the repository, e.g. ``conf/gateway.toml``)."""
    here = CHECKOUT / relative
    if here.exists():
        return here
    for prefix, installed in INSTALLED.items():
        if relative.startswith(prefix):
            return Path(sys.prefix) / "share" / "gateway" / (installed + relative[len(prefix) :])
    return here
