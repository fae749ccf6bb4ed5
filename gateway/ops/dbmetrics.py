"""Metrics of the shared spool (PostgreSQL): the connection pool, the claim leases,
the group commits and the registries' notification listener, read at scrape time.

Only exported by a node whose spool is in PostgreSQL; the names are in the contract
(docs/contract.md, "Metrics"). Labels are fixed words, never anything a device sent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


@dataclass(frozen=True)
class DatabaseSnapshot:
    """What the collector reads: one call, so a scrape sees one moment."""

    up: bool
    pool: Mapping[str, int] = field(default_factory=dict)
    """psycopg_pool's get_stats(): pool_size, pool_available, requests_waiting, ..."""
    claims_held: int = 0
    lease_renewals: int = 0
    leases_lost: int = 0
    claims_taken_over: int = 0
    commit_batches: int = 0
    committed_records: int = 0
    registry_listener_connected: bool | None = None


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


class DatabaseCollector(Collector):
    """Collects a :class:`DatabaseSnapshot` at each scrape."""

    def __init__(self, snapshot: Callable[[], DatabaseSnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        s = self._snapshot()
        pool = s.pool
        size, idle = pool.get("pool_size", 0), pool.get("pool_available", 0)
        yield _gauge("gateway_db_up", "1 while the spool database answers", float(s.up))
        connections = GaugeMetricFamily(
            "gateway_db_pool_connections", "Connections in this node's pool", labels=["state"]
        )
        connections.add_metric(["idle"], idle)
        connections.add_metric(["in_use"], max(0, size - idle))
        yield connections
        yield _gauge(
            "gateway_db_pool_max_connections",
            "Most connections the pool may open",
            pool.get("pool_max", 0),
        )
        yield _gauge(
            "gateway_db_pool_requests_waiting",
            "Callers waiting for a connection now",
            pool.get("requests_waiting", 0),
        )
        yield _counter(
            "gateway_db_pool_connection_errors",
            "Failed attempts to open a connection",
            pool.get("connections_errors", 0),
        )
        yield _counter(
            "gateway_db_pool_connections_lost",
            "Connections found broken and replaced",
            pool.get("connections_lost", 0),
        )
        yield _gauge(
            "gateway_spool_claims_held",
            "Records this node has claimed (a lease it renews) and is delivering",
            s.claims_held,
        )
        yield _counter(
            "gateway_spool_lease_renewals", "Claim leases this node renewed", s.lease_renewals
        )
        yield _counter(
            "gateway_spool_leases_lost",
            "Claims this node found taken by another node when renewing (its lease ran out)",
            s.leases_lost,
        )
        yield _counter(
            "gateway_spool_claims_taken_over",
            "Records this node claimed whose lease another node had let run out",
            s.claims_taken_over,
        )
        yield _counter(
            "gateway_spool_commit_batches",
            "Transactions that committed accepted submissions (group commit)",
            s.commit_batches,
        )
        yield _counter(
            "gateway_spool_committed_records",
            "Accepted submissions committed by those transactions",
            s.committed_records,
        )
        if s.registry_listener_connected is not None:
            yield _gauge(
                "gateway_registry_listener_connected",
                "1 while this node listens for registry changes (LISTEN gateway_registry)",
                float(s.registry_listener_connected),
            )
