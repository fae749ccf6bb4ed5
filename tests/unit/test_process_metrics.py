"""The daemon exports the process and garbage-collector series next to its own, so its
memory (the 200 MB target) and CPU can be watched on the dashboard."""

from __future__ import annotations

from prometheus_client import generate_latest

from gateway.ops.metrics import Metrics


def test_process_and_gc_series_are_exported() -> None:
    text = generate_latest(Metrics().registry).decode()
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}
    assert {
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
        "python_gc_objects_collected_total",
        "python_gc_collections_total",
    } <= names
    resident = next(
        float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("process_resident_memory_bytes ")
    )
    assert resident > 10 * 2**20  # this very process: a real reading, not a placeholder
