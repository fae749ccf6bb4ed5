"""Prometheus metrics with the names of the contract (docs/contract.md, "Metrics").

One :class:`Metrics` per daemon, on its own registry (tests run several daemons in one
process). Label values are listener, channel, destination, state and reason names from
the configuration or from fixed sets: never anything a device sent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.registry import Collector

from gateway import __version__
from gateway.spool.records import DELIVERING, State

SPOOL_STATES = (State.QUEUED, DELIVERING, State.DELIVERED, State.HELD)
"""The states ``gateway_spool_records`` counts (erased records are no longer in the spool)."""


class _SpoolCollector(Collector):
    """Reads the spool's in-memory counters at scrape time."""

    def __init__(self, snapshot: Callable[[], tuple[dict[str, int], int, float | None]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        counts, size, oldest_age = self._snapshot()
        records = GaugeMetricFamily(
            "gateway_spool_records", "Records in the spool by state", labels=["state"]
        )
        for state in SPOOL_STATES:
            records.add_metric([state], counts.get(state, 0))
        yield records
        yield GaugeMetricFamily(
            "gateway_spool_bytes", "Bytes of encrypted records in the spool", value=size
        )
        yield GaugeMetricFamily(
            "gateway_spool_oldest_undelivered_age_seconds",
            "Age of the oldest record not yet delivered (0 when none)",
            value=oldest_age or 0.0,
        )


class Metrics:
    """Every metric the gateway exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # process_* (resident memory, CPU seconds, open files: the memory target is
        # watched on process_resident_memory_bytes) and python_gc_*.
        ProcessCollector(registry=r)
        GCCollector(registry=r)
        self.submissions = Counter(
            "gateway_submissions",
            "Submissions by listener, channel and outcome",
            ["listener", "channel", "outcome"],
            registry=r,
        )
        self.fields_dropped = Counter(
            "gateway_fields_dropped",
            "Fields dropped because the channel does not allow them",
            ["channel", "field"],
            registry=r,
        )
        self.relay_attempts = Counter(
            "gateway_relay_attempts",
            "Upstream delivery attempts by outcome",
            ["destination", "outcome"],
            registry=r,
        )
        self.relay_duration = Histogram(
            "gateway_relay_duration_seconds",
            "Duration of one upstream delivery attempt",
            ["destination"],
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )
        self.deliveries = Counter(
            "gateway_deliveries", "Submissions delivered upstream", ["channel"], registry=r
        )
        self.erasures = Counter(
            "gateway_erasures", "Server copies erased", ["channel", "reason"], registry=r
        )
        self.auth_failures = Counter(
            "gateway_auth_failures",
            "Refused device or staff authentication, by listener and reason",
            ["listener", "reason"],
            registry=r,
        )
        self.certificate_expiry = Gauge(
            "gateway_certificate_expiry_timestamp_seconds",
            "When a certificate the gateway uses expires",
            ["certificate"],
            registry=r,
        )
        self.build_info = Gauge("gateway_build_info", "Gateway version", ["version"], registry=r)
        self.build_info.labels(version=__version__).set(1)
        self.in_flight = Gauge(
            "gateway_ingress_requests_in_flight", "Ingress requests being handled", registry=r
        )
        self.time_to_accept = Histogram(
            "gateway_accept_duration_seconds",
            "Time from request to 202 receipt",
            ["listener", "channel"],
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
        )
        self.expiring_undelivered = Gauge(
            "gateway_spool_expiring_undelivered_records",
            "Records not yet delivered whose retention ends within the next 24 hours",
            ["channel"],
            registry=r,
        )
        self.relay_circuit_open = Gauge(
            "gateway_relay_circuit_open",
            "1 while the destination's circuit breaker holds requests back",
            ["destination"],
            registry=r,
        )
        self.relay_in_flight = Gauge(
            "gateway_relay_in_flight", "Upstream deliveries under way", ["destination"], registry=r
        )
        self.relay_retries = Counter(
            "gateway_relay_retries",
            "Delivery attempts that failed and will be retried after a backoff",
            ["destination"],
            registry=r,
        )
        self.tls_handshake_failures = Counter(
            "gateway_tls_handshake_failures",
            "TLS handshakes that failed, by listener and reason",
            ["listener", "reason"],
            registry=r,
        )
        self.spool_quota_bytes = Gauge(
            "gateway_spool_quota_bytes", "The spool's configured quota in bytes", registry=r
        )
        self.spool_free_bytes = Gauge(
            "gateway_spool_filesystem_free_bytes",
            "Free bytes on the spool's file system, read at scrape time",
            registry=r,
        )
        self.reloads = Counter(
            "gateway_config_reloads",
            "Configuration reloads (SIGHUP) by outcome",
            ["outcome"],
            registry=r,
        )
        for outcome in ("applied", "failed"):
            self.reloads.labels(outcome=outcome)  # a first failure is then an increase
        self.last_reload = Gauge(
            "gateway_config_last_reload_success_timestamp_seconds",
            "When the running configuration was loaded",
            registry=r,
        )
        self.payload_key_expiry = Gauge(
            "gateway_payload_key_expiry_timestamp_seconds",
            "When a payload encryption or signing key stops being valid",
            ["destination", "key"],
            registry=r,
        )
        self.outcome_write_failures = Counter(
            "gateway_relay_outcome_write_failures",
            "Writes of a delivery's outcome (delivered, held, erased) that the disk refused; "
            "the outcome is kept and written again with backoff",
            ["destination", "outcome"],
            registry=r,
        )
        self.outcomes_unrecorded = Gauge(
            "gateway_relay_outcomes_unrecorded",
            "Outcomes known but not yet on disk (a record delivered but not yet marked so)",
            registry=r,
        )
        self.scans = Counter(
            "gateway_scans",
            "Files streamed to the virus scanner, by verdict (clean, infected, unavailable)",
            ["channel", "result"],
            registry=r,
        )
        self.access_log_entries = Counter(
            "gateway_access_log_entries",
            "Access log entries written to the day files",
            registry=r,
        )
        self.access_log_dropped = Counter(
            "gateway_access_log_dropped",
            "Access log entries dropped: the disk refused them longer than memory could keep",
            registry=r,
        )
        self.access_log_suppressed = Counter(
            "gateway_access_log_suppressed",
            "Failed TLS handshakes not logged one by one (per-address rate limit)",
            ["listener"],
            registry=r,
        )
        self.task_failures = Counter(
            "gateway_task_failures",
            "Long-lived tasks that raised (each is restarted with backoff)",
            ["task"],
            registry=r,
        )
        self.spool_overdue = Gauge(
            "gateway_spool_overdue_records",
            "Copies past their deadline (retention ended, or delivered a while ago) and "
            "not yet erased, as of the last sweep",
            registry=r,
        )
        self.keystore_epochs = Gauge(
            "gateway_keystore_epochs",
            "Key epochs in the keystore: live (a key), passed (its day over, its key not yet "
            "destroyed), destroyed (a tombstone)",
            ["state"],
            registry=r,
        )
        for state in ("live", "passed", "destroyed"):
            self.keystore_epochs.labels(state=state).set(0)
        self.last_sweep = Gauge(
            "gateway_retention_last_sweep_timestamp_seconds",
            "When the retention sweeper last finished a sweep",
            registry=r,
        )
        self.audit_entries = Counter(
            "gateway_audit_entries",
            "Entries the daemon wrote to the operations audit log",
            ["action"],
            registry=r,
        )

    def watch_spool(self, snapshot: Callable[[], tuple[dict[str, int], int, float | None]]) -> None:
        self.registry.register(_SpoolCollector(snapshot))
