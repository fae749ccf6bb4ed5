"""``gatewayctl demo``: the gateway's main job on an embedded default, end to end.

A throw-away PKI, one simulated upstream per destination, the shipped six channels, and
the real daemon on loopback; realistic submissions on every channel plus the mistakes a
ward office makes (a field that must be dropped, a revoked tablet, a wrong password, a
staff user not named for the channel, a channel asked for on another network, a bad
photo, a 個人番号 with a wrong check digit, an upstream that is briefly down). It prints
what was accepted, rejected (and why), dropped, delivered and erased: names and rules,
never values.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from gateway.crypto.sealed.format import KEM_IDS
from gateway.daemon import Bound
from gateway.ops import logs
from gateway.ops.metrics import Metrics
from gateway.testing.client import DeviceClient, Reply
from gateway.testing.samples import make_jpeg, sample_submission
from gateway.testing.sandbox import (
    CHANNEL_DEVICE,
    DEVICE_LISTENER,
    Sandbox,
    build_sandbox,
    start_gateway,
)


@dataclass
class Case:
    title: str
    channel: str
    device: str
    fields: dict[str, str]
    files: dict[str, bytes]
    password: str | None = None
    idempotency_key: str | None = None
    user: str = "staff-001"


def _cases() -> list[Case]:
    cases = []
    for channel, device in CHANNEL_DEVICE.items():
        fields, files = sample_submission(channel)
        cases.append(Case(f"valid {channel}", channel, device, fields, files))
    fields, files = sample_submission("online-application")
    cases.append(
        Case(
            "name and address must not travel (dropped)",
            "online-application",
            "tablet-01",
            {**fields, "name": "新宿 花子", "address": "東京都新宿区"},
            files,
            idempotency_key="tablet-01-0002",
        )
    )
    cases.append(
        Case(
            "the same post again with its Idempotency-Key (device retry)",
            "online-application",
            "tablet-01",
            {**fields, "name": "新宿 花子", "address": "東京都新宿区"},
            files,
            idempotency_key="tablet-01-0002",
        )
    )
    cases.append(Case("lost tablet, revoked", "online-application", "tablet-lost", fields, files))
    cases.append(
        Case(
            "wrong staff password",
            "express-issuance",
            "tablet-01",
            *sample_submission("express-issuance"),
            password="not-the-password",  # noqa: S106 - the wrong one, on purpose
        )
    )
    cases.append(
        Case(
            "photo below 480 px a side (400×400)",
            "online-application",
            "tablet-01",
            fields,
            {"face_photo": make_jpeg(400, 400)},
        )
    )
    office, _ = sample_submission("window-reception")
    cases.append(
        Case(
            "個人番号 with a wrong check digit",
            "window-reception",
            "counter-01",
            {**office, "individual_number": "983205673215"},
            {},
        )
    )
    cases.append(
        Case(
            "tablet asking for the counter's channel (not served on the tablets' network)",
            "window-reception",
            "tablet-01",
            office,
            {},
        )
    )
    reservation, _ = sample_submission("issuance-reservation")
    cases.append(
        Case(
            "counter terminal on the call centre's channel (same network, not its channel)",
            "issuance-reservation",
            "counter-01",
            reservation,
            {},
            user="staff-counter",
        )
    )
    cases.append(
        Case(
            "staff user not named for the overseas channel (取扱者の指定)",
            "overseas-application",
            "pc-01",
            *sample_submission("overseas-application"),
            user="staff-002",
        )
    )
    return cases


def _describe(reply: Reply) -> str:
    body = reply.body
    if reply.status == 202:
        replay = " (original receipt returned)" if reply.headers.get("Idempotent-Replayed") else ""
        return f"202 accepted as {body.get('submission_id', '?')[:12]}…{replay}"
    kind = str(body.get("type", "")).rsplit("/", 1)[-1]
    violations = body.get("violations") or []
    rules = ", ".join(f"{v['field']}: {v['rule']}" for v in violations)
    detail = rules or body.get("detail", "")
    return f"{reply.status} {kind} — {detail}"


async def _scenario(sandbox: Sandbox, bound: Bound, metrics: Metrics, out: Any) -> int:
    express = sandbox.simulators["jlis-express"]
    express.fail_next(1, 503, retry_after="1")
    clients: dict[tuple[str, str, str | None], DeviceClient] = {}
    accepted: list[tuple[str, str]] = []
    failures = 0
    print("\nposting through the gateway (mutual TLS, staff login, multipart):", file=out)
    try:
        for case in _cases():
            key = (case.device, case.user, case.password)
            if key not in clients:
                clients[key] = DeviceClient(
                    sandbox,
                    case.device,
                    port=bound.ports[DEVICE_LISTENER[case.device]],
                    user=case.user,
                    password=case.password,
                )
            reply = await clients[key].submit(
                case.channel, case.fields, case.files, idempotency_key=case.idempotency_key
            )
            print(
                f"  {case.channel:<22} {case.device:<14} {case.title}\n"
                f"  {'':<22} → {_describe(reply)}",
                file=out,
            )
            if reply.status == 202 and not reply.headers.get("Idempotent-Replayed"):
                accepted.append((case.channel, reply.body["submission_id"]))
            if reply.status >= 500:
                failures += 1
        expected: dict[str, int] = {}
        for channel, _ in accepted:
            dest = sandbox.config.channels[channel].destination if sandbox.config else ""
            expected[dest] = expected.get(dest, 0) + 1
        for dest, count in expected.items():
            try:
                await sandbox.simulators[dest].wait_for(count, timeout=30)
            except TimeoutError:
                print(f"\n{dest}: not everything accepted arrived within 30 s", file=out)
        # The upstream has it; the gateway records the delivery and erases its copy a
        # moment later. Wait for that, as a device polling its status would, so the
        # summary counts what happened, not what had happened so far.
        print("\nwaiting for the gateway to erase each delivered copy…", file=out)
        for channel, submission_id in accepted:
            client = clients[(CHANNEL_DEVICE[channel], "staff-001", None)]
            for _ in range(200):
                state = (await client.status(submission_id)).body.get("state")
                if state in ("erased", "held"):
                    break
                await asyncio.sleep(0.05)
        print("\ndelivered upstream (what each destination received):", file=out)
        for dest, sim in sandbox.simulators.items():
            for received in sim.received:
                names = sorted([*received.fields, *received.files])
                header = received.sealed
                how = "plain multipart (TLS only)"
                if header is not None:
                    kems = {v: k for k, v in KEM_IDS.items()}
                    suite = "CMS" if header.kem_id is None else f"HPKE {kems[header.kem_id]}"
                    how = f"sealed {suite}, signature verified, opened"
                print(
                    f"  {dest:<22} {received.channel:<22} receipt {received.receipt_id}"
                    f"  [{how}]  fields: {', '.join(names)}",
                    file=out,
                )
        if accepted:
            channel, first = accepted[0]
            status = await clients[(CHANNEL_DEVICE[channel], "staff-001", None)].status(first)
            print(
                f"\nstatus of {first[:12]}… as its tablet sees it: {status.body.get('state')}"
                f", upstream receipt {status.body.get('upstream_receipt')}",
                file=out,
            )
    finally:
        for c in clients.values():
            await c.close()
    dropped = {
        s.labels["field"]: s.value
        for m in metrics.registry.collect()
        if m.name == "gateway_fields_dropped"
        for s in m.samples
        if s.name.endswith("_total")
    }
    retries = sum(
        s.value
        for m in metrics.registry.collect()
        if m.name == "gateway_relay_attempts"
        for s in m.samples
        if s.name.endswith("_total") and s.labels["outcome"] != "delivered"
    )
    delivered = sum(len(sim.received) for sim in sandbox.simulators.values())
    erased = {
        s.labels["channel"]: s.value
        for m in metrics.registry.collect()
        if m.name == "gateway_erasures"
        for s in m.samples
        if s.name.endswith("_total") and s.labels["reason"] == "delivered"
    }
    print(
        f"\nsummary: {len(accepted)} accepted, {delivered} delivered, "
        f"{int(retries)} upstream attempt(s) retried, fields dropped: "
        f"{', '.join(f'{k}×{int(v)}' for k, v in sorted(dropped.items())) or 'none'}; "
        f"server copies erased on delivery, on every channel (送信後に自動消去): "
        f"{', '.join(f'{k}×{int(v)}' for k, v in sorted(erased.items())) or 'none'}",
        file=out,
    )
    return 1 if failures or delivered != len(accepted) else 0


async def _main(directory: Path, out: Any, *, kept: bool) -> int:
    print(f"demo files in {directory}", file=out)
    started = time.perf_counter()
    sandbox = await build_sandbox(directory)
    assert sandbox.config is not None
    print(
        f"  PKI, registries and config made ({sandbox.config_path.name}: "
        f"{len(sandbox.config.channels)} channels, {len(sandbox.simulators)} simulated "
        f"upstreams)",
        file=out,
    )
    running = await start_gateway(sandbox.config)
    try:
        bound = running.bound
        where = ", ".join(f"{name} :{port}" for name, port in bound.ports.items())
        print(
            f"  gateway listening on one port per network ({where}; metrics on "
            f"http://127.0.0.1:{bound.admin_port}/metrics)",
            file=out,
        )
        code = await _scenario(sandbox, bound, running.metrics, out)
    finally:
        await running.shutdown()
        await sandbox.stop_simulators()
    where = (
        f"PKI, config, spool and JSON log kept in {directory}"
        if kept
        else "throw-away files removed; `gatewayctl demo --keep DIR` keeps them"
    )
    print(
        f"gateway drained and stopped cleanly in {time.perf_counter() - started:.1f} s ({where})",
        file=out,
    )
    return code


def run_demo(*, keep: Path | None = None, out: Any = None) -> int:
    out = out or sys.stdout
    directory = keep or Path(tempfile.mkdtemp(prefix="gateway-demo-"))
    directory.mkdir(parents=True, exist_ok=True)
    previous = structlog.get_config()
    with (directory / "gateway.log").open("w", encoding="utf-8") as log_file:
        logs.configure(log_file, level=logging.INFO)
        try:
            return asyncio.run(_main(directory, out, kept=keep is not None))
        finally:
            # The log file closes here: no later log line may be written to it.
            structlog.configure(**previous)
            if keep is None:
                shutil.rmtree(directory, ignore_errors=True)
