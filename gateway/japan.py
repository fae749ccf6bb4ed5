"""Japan Standard Time: the zone the gateway counts its days in (channel windows, key
epochs, retention deadlines, the access log's day files, the reports and certificates).

Japan keeps one offset all year (no daylight saving), so a fixed offset is exact and
needs no time-zone database on the host.
"""

from __future__ import annotations

from datetime import timedelta, timezone

JST = timezone(timedelta(hours=9), "JST")
"""UTC+9, named JST."""
