"""After a power cut that tore the last append of the audit log and of the erasure
ledger, the gateway starts by itself: the torn bytes are kept aside and the repair is
in the audit log. (Before, gatewayd exited 1 until an operator cut the line off.)"""

from __future__ import annotations

from pathlib import Path

from gateway.ops.chain import HashChainLog
from gateway.retention.ledger import erasure_ledger
from gateway.testing.fakes import FakeSleep
from gateway.testing.sandbox import build_sandbox, start_gateway


async def test_the_gateway_starts_after_torn_appends_and_records_the_repair(
    tmp_path: Path,
) -> None:
    box = await build_sandbox(tmp_path, start_simulators=False)
    config = box.config
    assert config is not None
    audit = config.audit_log
    # A first run leaves an audit log and a ledger behind, as a real one would.
    fake = FakeSleep()
    running = await start_gateway(config, sleep=fake, clock=fake.clock)
    await running.shutdown()
    ledger = erasure_ledger(config.spool.directory)
    ledger.append({"submission_id": "0" * 32, "reason": "operator"})
    for path in (audit.log, ledger.path):
        with path.open("ab") as handle:
            handle.write(b'{"at":"2026-11-29T03:04:05.000000Z","body":{"act')  # torn
    running = await start_gateway(config, sleep=fake, clock=fake.clock)
    await running.shutdown()
    for path in (audit.log, ledger.path):
        kept = list(path.parent.glob(f"{path.name}.torn-*"))
        assert len(kept) == 1 and kept[0].read_bytes().endswith(b'"body":{"act')
    entries = [e.body for e in HashChainLog(audit.log, anchor=audit.anchor).entries()]
    repairs = [e for e in entries if e["action"] == "gatewayd.repair"]
    assert {r["target"] for r in repairs} == {str(audit.log), str(ledger.path)}
    assert all(r["detail"]["torn_final_line_bytes"] == 48 for r in repairs)
    assert ledger.verify() == 1
