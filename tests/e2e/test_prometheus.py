"""The Prometheus side: alert rules, their unit tests, the Grafana dashboard, live /metrics.

``promtool`` (Debian's ``prometheus`` package, installed by ``scripts/install-tools``)
checks the rules and runs their unit tests, and lints the /metrics text of a real
gateway on loopback that has accepted, refused, retried, held and delivered
submissions, so its labelled series exist, and that of a node whose spool is in
PostgreSQL (the database metrics exist only there). Every metric name the rules and the
dashboard use must be one that live output exports: they cannot drift from the code.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from conftest import Running, start_gateway

from gateway.testing.client import DeviceClient
from gateway.testing.postgres import Postgres, free_loopback_port
from gateway.testing.process import DaemonProcess
from gateway.testing.samples import sample_submission
from gateway.testing.sandbox import CHANNEL_DEVICE, DEVICE_LISTENER, build_sandbox

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_CONF = ROOT / "conf" / "prometheus"
RULES = PROMETHEUS_CONF / "gateway-alerts.yml"
RULE_TESTS = PROMETHEUS_CONF / "gateway-alerts.test.yml"
DASHBOARD = PROMETHEUS_CONF / "gateway-dashboard.json"
INSTALL_HINT = (
    "promtool is not on PATH: run scripts/install-tools (it installs Debian's prometheus "
    "package, which provides promtool); `make test` does so"
)

REQUIRED_ALERTS = {
    "GatewayDown",
    "GatewayUpstreamDown",
    "GatewayOldestUndeliveredAge",
    "GatewayRecordsExpiringUndelivered",
    "GatewayAuthFailureBurst",
    "GatewayCertificateExpiresSoon",
    "GatewaySpoolNearQuota",
    "GatewayHeldRecords",
    "GatewayConfigReloadFailed",
    "GatewayPayloadKeyExpiresSoon",
    "GatewayRetentionStalled",
    "GatewayCopiesOverdue",
    "GatewayTaskFailing",
    "GatewayDatabaseDown",
    "GatewayDatabasePoolExhausted",
    "GatewayLeasesLost",
    "GatewayRegistryListenerDown",
}
# What the dashboard must show (issue 4): one metric per required panel.
DASHBOARD_METRICS = {
    "gateway_submissions_total",
    "gateway_accept_duration_seconds_bucket",
    "gateway_relay_attempts_total",
    "gateway_relay_duration_seconds_bucket",
    "gateway_relay_circuit_open",
    "gateway_spool_records",
    "gateway_spool_bytes",
    "gateway_spool_quota_bytes",
    "gateway_spool_oldest_undelivered_age_seconds",
    "gateway_spool_expiring_undelivered_records",
    "gateway_erasures_total",
    "gateway_auth_failures_total",
    "gateway_tls_handshake_failures_total",
    "gateway_certificate_expiry_timestamp_seconds",
    "gateway_ingress_requests_in_flight",
    "gateway_config_reloads_total",
    "gateway_db_up",
    "gateway_db_pool_connections",
    "gateway_db_pool_requests_waiting",
    "gateway_spool_claims_held",
    "gateway_spool_commit_batches_total",
    "gateway_spool_committed_records_total",
}
METRIC_NAME = re.compile(r"\bgateway_[a-z0-9_]+\b")
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
DELIVERED_CHANNELS = ("express-issuance", "issuance-reservation", "card-delegation-batch")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# ------------------------------------------------------------------ helpers


def run_promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run promtool from the repository root; fail (never skip) when it is not installed."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    return subprocess.run(
        [promtool, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )


def parse_samples(text: str) -> Samples:
    """The samples of a Prometheus text exposition, keyed by name and label set."""
    samples: Samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = SAMPLE.match(line)
        assert match, f"unparsable /metrics line: {line!r}"
        name, labels, value = match.groups()
        samples[(name, frozenset(LABEL.findall(labels or "")))] = float(value)
    return samples


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def exported_names(text: str) -> set[str]:
    """Every metric name the exposition declares or has samples of, with the suffixes
    a histogram or summary family's samples carry."""
    names = {name for name, _labels in parse_samples(text)}
    for family, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE):
        names.add(family)
        if kind in ("histogram", "gaugehistogram"):
            names.update(f"{family}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        elif kind == "summary":
            names.update(f"{family}{suffix}" for suffix in ("_sum", "_count"))
        elif kind == "counter" and not family.endswith("_total"):
            names.add(f"{family}_total")
    return names


def rules_text() -> str:
    """The rules file without its comment lines (expressions, labels and annotations)."""
    return "\n".join(
        line for line in RULES.read_text("utf-8").splitlines() if not line.lstrip().startswith("#")
    )


def dashboard() -> dict[str, Any]:
    doc = json.loads(DASHBOARD.read_text("utf-8"))
    assert isinstance(doc, dict)
    return doc


def graph_panels(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel that shows data (rows only group them), nested ones included."""
    for panel in doc["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def dashboard_queries(doc: dict[str, Any]) -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and variable queries."""
    queries = [t["expr"] for p in graph_panels(doc) for t in p.get("targets", [])]
    for variable in doc["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


# ------------------------------------------------------------------ the live gateway


async def wait_state(device: DeviceClient, submission_id: str, states: set[str]) -> None:
    """Poll the status endpoint (real requests, no sleeping) until one of ``states``."""
    async with asyncio.timeout(30):
        while True:
            reply = await device.status(submission_id)
            assert reply.status == 200, reply.body
            if reply.body["state"] in states:
                return


async def exercise(gateway: Running) -> None:
    """Accepted posts on several channels (delivered, retried, held), a dropped field,
    refusals of every kind; returns once the relay has dealt with every accepted one."""
    sandbox = gateway.sandbox
    port = gateway.port_of("tablet-01")
    for channel in ("online-application", *DELIVERED_CHANNELS):
        fields, files = sample_submission(channel)
        if channel == "express-issuance":  # a drop channel: an unlisted field is dropped
            fields = {**fields, "favourite_food": "natto"}
        device_id = CHANNEL_DEVICE[channel]
        async with DeviceClient(sandbox, device_id, port=gateway.port_of(device_id)) as device:
            reply = await device.submit(channel, fields, files)
            assert reply.status == 202, (channel, reply.body)
            final = {"held"} if channel == "online-application" else {"delivered", "erased"}
            await wait_state(device, reply.body["submission_id"], final)
    fields, files = sample_submission("online-application")
    async with DeviceClient(sandbox, "tablet-01", port=port, password="not the password") as bad:
        assert (await bad.submit("online-application", fields, files)).status == 401
    async with DeviceClient(sandbox, "tablet-01", port=port) as device:
        assert (await device.submit("no-such-channel", fields, files)).status == 404
    async with DeviceClient(sandbox, "pc-01", port=port) as elsewhere:
        assert (await elsewhere.submit("online-application", fields, files)).status == 403
    async with DeviceClient(sandbox, "tablet-lost", port=port) as revoked:
        assert (await revoked.submit("online-application", fields, files)).status == 403


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def live_metrics(tmp_path_factory: pytest.TempPathFactory) -> str:
    """GET /metrics of a real gateway after it accepted, refused, retried, held and delivered."""
    sandbox = await build_sandbox(tmp_path_factory.mktemp("prometheus"))
    sandbox.simulators["jlis-express"].fail_next(1, 503)  # retried, then delivered
    sandbox.simulators["dnp-relay"].fail_next(1, 400)  # held for an operator
    gateway = await start_gateway(sandbox)
    try:
        await exercise(gateway)
        port = gateway.bound.admin_port
        assert port is not None, "the sandbox gateway has no admin listener"
        async with (
            aiohttp.ClientSession() as admin,
            admin.get(f"http://127.0.0.1:{port}/metrics") as response,
        ):
            assert response.status == 200
            assert response.content_type == "text/plain"
            return await response.text()
    finally:
        if not gateway.task.done():
            await gateway.shutdown()
        await sandbox.stop_simulators()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_spool_metrics(tmp_path_factory: pytest.TempPathFactory, postgres: Postgres) -> str:
    """GET /metrics of a node whose spool is in PostgreSQL (a subprocess, as deployed),
    after it accepted and delivered a submission."""
    directory = tmp_path_factory.mktemp("prometheus-postgresql")
    dsn_file = directory / "spool.dsn"
    dsn_file.write_text(postgres.new_database() + "\n", "utf-8")
    dsn_file.chmod(0o600)
    admin_port = free_loopback_port()
    sandbox = await build_sandbox(
        directory,
        overrides={
            "spool.backend": "postgresql",
            "spool.dsn": str(dsn_file),
            "spool.node_id": "metrics-node",
            "admin.port": admin_port,
        },
    )
    daemon = await DaemonProcess(sandbox.config_path, directory / "gatewayd.log").start()
    try:
        channel = "online-application"
        device_id = CHANNEL_DEVICE[channel]
        fields, files = sample_submission(channel)
        async with DeviceClient(sandbox, device_id, port=daemon.port_of(device_id)) as device:
            reply = await device.submit(channel, fields, files)
            assert reply.status == 202, reply.body
            await wait_state(device, reply.body["submission_id"], {"delivered", "erased"})
        async with (
            aiohttp.ClientSession() as admin,
            admin.get(f"http://127.0.0.1:{admin_port}/metrics") as response,
        ):
            assert response.status == 200
            return await response.text()
    finally:
        assert await daemon.terminate() == 0
        await sandbox.stop_simulators()


# ------------------------------------------------------------------ rules


def test_alert_rules_pass_promtool_check_rules() -> None:
    result = run_promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alert_rules_pass_their_unit_tests() -> None:
    result = run_promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_required_alert_is_defined_and_unit_tested() -> None:
    defined = set(re.findall(r"^\s*- alert: (\w+)\s*$", RULES.read_text("utf-8"), re.MULTILINE))
    tested = set(
        re.findall(r"^\s*alertname: (\w+)\s*$", RULE_TESTS.read_text("utf-8"), re.MULTILINE)
    )
    assert defined >= REQUIRED_ALERTS, REQUIRED_ALERTS - defined
    assert defined <= tested, f"alerts without a unit test: {sorted(defined - tested)}"


# ------------------------------------------------------------------ live /metrics


def test_live_metrics_pass_promtool_check_metrics(live_metrics: str) -> None:
    result = run_promtool("check", "metrics", stdin=live_metrics)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_live_metrics_have_the_labelled_series(live_metrics: str) -> None:
    """The scenario is not vacuous: promtool saw labelled series of each kind."""
    s = parse_samples(live_metrics)
    for channel in ("online-application", *DELIVERED_CHANNELS):
        listener = DEVICE_LISTENER[CHANNEL_DEVICE[channel]]
        accepted = {"listener": listener, "channel": channel, "outcome": "accepted"}
        assert sample(s, "gateway_submissions_total", **accepted) == 1
    unknown = {"listener": "tablets", "channel": "unknown", "outcome": "unknown-channel"}
    assert sample(s, "gateway_submissions_total", **unknown)
    for reason in ("bad_credential", "device_not_allowed", "device_revoked"):
        assert sample(s, "gateway_auth_failures_total", listener="tablets", reason=reason) == 1
    assert sample(s, "gateway_certificate_expiry_timestamp_seconds", certificate="listener:lgwan")
    assert sample(s, "gateway_certificate_expiry_timestamp_seconds", certificate="device-ca:lgwan")
    assert sample(s, "gateway_relay_attempts_total", destination="jlis-express", outcome="503")
    assert sample(s, "gateway_relay_attempts_total", destination="dnp-relay", outcome="400")
    assert sample(s, "gateway_relay_retries_total", destination="jlis-express") == 1
    assert sample(s, "gateway_fields_dropped_total", channel="express-issuance", field="other")
    assert sample(s, "gateway_spool_records", state="held") == 1
    assert sample(s, "gateway_relay_circuit_open", destination="jlis-express") == 0
    assert sample(s, "gateway_spool_quota_bytes")
    assert any(n == "gateway_accept_duration_seconds_bucket" for n, _ in s)
    assert any(n == "gateway_certificate_expiry_timestamp_seconds" for n, _ in s)


def test_shared_spool_metrics_pass_promtool_check_metrics(shared_spool_metrics: str) -> None:
    result = run_promtool("check", "metrics", stdin=shared_spool_metrics)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    s = parse_samples(shared_spool_metrics)
    assert sample(s, "gateway_db_up") == 1
    assert sample(s, "gateway_registry_listener_connected") == 1
    assert (sample(s, "gateway_spool_committed_records_total") or 0) >= 1


def test_rules_use_only_exported_metrics(live_metrics: str, shared_spool_metrics: str) -> None:
    used = set(METRIC_NAME.findall(rules_text()))
    assert len(used) >= 10, used
    missing = used - exported_names(live_metrics) - exported_names(shared_spool_metrics)
    assert not missing, f"alert rules use metrics the gateway does not export: {sorted(missing)}"


def test_dashboard_uses_only_exported_metrics(live_metrics: str, shared_spool_metrics: str) -> None:
    used = {name for query in dashboard_queries(dashboard()) for name in METRIC_NAME.findall(query)}
    assert used >= DASHBOARD_METRICS, f"panels missing for: {sorted(DASHBOARD_METRICS - used)}"
    missing = used - exported_names(live_metrics) - exported_names(shared_spool_metrics)
    assert not missing, f"the dashboard uses metrics the gateway does not export: {sorted(missing)}"


# ------------------------------------------------------------------ dashboard


def test_dashboard_is_valid_and_every_panel_has_a_datasource_and_a_query() -> None:
    doc = dashboard()
    assert doc["schemaVersion"] >= 36
    assert doc["uid"] and doc["title"]
    assert [i["name"] for i in doc["__inputs"]] == ["DS_PROMETHEUS"]
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    for name in ("destination", "channel"):
        assert variables[name]["type"] == "query", name
        assert variables[name]["datasource"]["uid"] == "${DS_PROMETHEUS}", name
    panels = list(graph_panels(doc))
    assert len(panels) >= 15
    ids = [p["id"] for p in doc["panels"]] + [p["id"] for p in panels if p not in doc["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels:
        title = panel.get("title")
        assert title, panel
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, title
        assert panel["targets"], f"panel {title!r} has no query"
        for target in panel["targets"]:
            assert target["expr"].strip(), title
            assert target.get("datasource", panel["datasource"]) == panel["datasource"], title
        position = panel["gridPos"]
        assert position["x"] + position["w"] <= 24 and position["w"] > 0 < position["h"], title


def test_dashboard_panels_do_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard()["panels"]:
        pos = panel["gridPos"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Each query, with Grafana's variables filled in, as a recording rule promtool parses."""
    fill = {
        "$__rate_interval": "5m",
        "$__interval": "1m",
        "$__range": "6h",
    }
    rules = ["groups:", "  - name: dashboard", "    rules:"]
    for number, query in enumerate(dashboard_queries(dashboard())):
        if query.startswith("label_values("):  # Grafana's own function, not PromQL
            query = query.removeprefix("label_values(").rsplit(",", 1)[0]
        for variable, value in fill.items():
            query = query.replace(variable, value)
        query = re.sub(r"\$\{?\w+\}?", ".*", query)
        rules += [f"      - record: dashboard:query_{number}", f"        expr: {json.dumps(query)}"]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text("\n".join(rules) + "\n", "utf-8")
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
