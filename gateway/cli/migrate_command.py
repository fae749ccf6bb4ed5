"""``gatewayctl spool migrate --to postgresql``: move this node's local spool into
PostgreSQL (:mod:`gateway.spool.migrate` does the work; this is the command: its
options, its refusals, its progress on standard error, its audit entry and its report).

The configuration given is the one after the switch (``[spool] backend =
"postgresql"`` with its ``dsn``), naming the same spool directory, keystore, audit log
and registry files as before; ``--from-directory`` and ``--from-keystore`` say where
the old ones are when they moved. gatewayd must be stopped. Interrupted (a crash, a
refusal fixed meanwhile), the command is simply run again: it finishes what is left.
Once it has copied the audit log, it appends ``spool.migrate`` there (in PostgreSQL);
a migration that fails before that is recorded as failed in the audit log file, which
the next run then copies along.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any

from gateway.backends import node_name
from gateway.cli.common import (
    CommandFailed,
    Commands,
    SubParsers,
    UsageError,
    config_of,
    positive,
    say,
)
from gateway.config import GatewayConfig
from gateway.crypto.keys import load_master_key, resolve_secret_path
from gateway.errors import GatewayError
from gateway.ops.audit import AUDIT_CHAIN, AuditLog, audit_chain, current_actor
from gateway.ops.pgchain import PgChainLog
from gateway.preflight import ROOT, database_dsn
from gateway.retention.ledger import LEDGER_CHAIN, erasure_ledger
from gateway.spool.migrate import MIGRATE_ACTION, Report, Source, migrate
from gateway.spool.reader import spool_in_use

LOCAL_FILES = (
    "index.sqlite3, index.sqlite3-wal, index.sqlite3-shm, records/, erasure-ledger.jsonl, "
    "erasure-ledger.anchor"
)


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def cmd_spool_migrate(args: argparse.Namespace) -> int:
    config = config_of(args)
    dsn = database_dsn(config)
    if dsn is None:
        raise UsageError(
            "give the configuration as it is after the switch: [spool] backend = "
            '"postgresql" with its dsn (this one keeps the local backend)'
        )
    directory: Path = args.from_directory or config.spool.directory
    keystore: Path = args.from_keystore or config.keystore_directory
    file_audit = AuditLog(config.audit_log, via="gatewayctl")
    try:
        for spool in dict.fromkeys((directory, config.spool.directory)):
            if spool_in_use(spool):
                raise CommandFailed(
                    f"{spool} is in use by a running gatewayd: stop gatewayd before migrating "
                    "its spool (nothing was copied)"
                )
        source = Source(
            spool=directory,
            keystore=keystore,
            chains={
                LEDGER_CHAIN: erasure_ledger(directory),
                AUDIT_CHAIN: audit_chain(config.audit_log),
            },
            registries={"devices": config.auth.devices_file, "users": config.auth.users_file},
            hold=(config.spool.directory,),
        )
        master = load_master_key(resolve_secret_path(config.spool.master_key, ROOT))
        report = migrate(
            source,
            dsn=dsn,
            master=master,
            node_id=node_name(config),
            actor=current_actor(),
            progress=_progress,
            every=args.progress_every,
        )
    except (GatewayError, OSError) as exc:
        # The audit log file is still this node's log (the next run copies this entry);
        # a log that cannot take it does not hide the error itself.
        with contextlib.suppress(GatewayError, OSError):
            file_audit.record(
                MIGRATE_ACTION, outcome="failed", detail={"to": "postgresql", "reason": say(exc)}
            )
        raise
    seq = report.chains[AUDIT_CHAIN].migration_seq
    if seq is None:  # step 5, once: an earlier run that got this far wrote it already
        shared = AuditLog(config.audit_log, via="gatewayctl", dsn=dsn)
        try:
            seq = shared.record(MIGRATE_ACTION, detail=_detail(report, node_name(config))).seq
        finally:
            if isinstance(shared.chain, PgChainLog):
                shared.chain.close()
    print(_summary(report, config, directory, keystore, seq))
    return 0


def _detail(report: Report, node: str) -> dict[str, Any]:
    """The audit entry's detail: counts and names, never a record's data."""
    keys, records = report.keys, report.records
    ledger, audit = report.chains[LEDGER_CHAIN], report.chains[AUDIT_CHAIN]
    assert keys is not None
    return {
        "to": "postgresql",
        "node": node,
        "epoch_keys": keys.epochs + keys.epochs_there,
        "destroyed_epochs": keys.destroyed + keys.destroyed_there,
        "registries": dict(report.registries),
        "records": records.total,
        "records_copied": records.copied,
        "records_already_there": records.there,
        "records_verified": records.total,
        "access_entries": report.access,
        "ledger_entries": ledger.entries,
        "audit_entries": audit.entries,
    }


_REGISTRY = {
    "seeded": "seeded from {path}",
    "same": "already held {path}'s document",
    "kept": "the database's kept: it differs from {path}, which was NOT copied",
    "absent": "{path} does not exist: nothing copied",
}


def _summary(
    report: Report, config: GatewayConfig, directory: Path, keystore: Path, seq: int
) -> str:
    keys, records = report.keys, report.records
    ledger, audit = report.chains[LEDGER_CHAIN], report.chains[AUDIT_CHAIN]
    assert keys is not None
    files = {"devices": config.auth.devices_file, "users": config.auth.users_file}
    registries = "; ".join(
        f"{name}: {_REGISTRY[how].format(path=files[name])}"
        for name, how in report.registries.items()
    )
    earlier = f", {records.there} by an earlier run" if records.there else ""
    checked = "SHA-256, data key, first segment decrypted"
    if records.unreadable:
        checked += f"; {records.unreadable} by SHA-256 only: key epoch already gone locally"
    stays = directory == config.spool.directory
    remove = (
        f"the local spool's files in {directory} ({LOCAL_FILES}; the directory stays: "
        "gatewayd stages uploads there)"
        if stays
        else f"the old spool directory {directory}"
    )
    return "\n".join(
        [
            f"spool moved to PostgreSQL (node {node_name(config)}) from {directory} and "
            f"{keystore}:",
            f"  keys        {keys.epochs + keys.epochs_there} epoch key(s) ({keys.epochs} "
            f"copied now), the idempotency key, {keys.destroyed + keys.destroyed_there} "
            "destroyed epoch(s)",
            f"  registries  {registries}",
            f"  records     {records.total} ({records.copied} copied now{earlier}), every one "
            f"verified: {records.live} live ({checked}), {records.erased} erased "
            "(metadata)",
            f"  access log  {report.access} entry(ies) waiting for export, copied for this node",
            f"  ledger      {ledger.entries} entry(ies) ({ledger.copied} copied now), chain "
            f"verified ({ledger.verified} entries)",
            f"  audit log   {audit.entries} entry(ies) ({audit.copied} copied now), chain "
            f"verified; {MIGRATE_ACTION} recorded as seq {seq}",
            "The local files are left as they were. Next:",
            "  1. start gatewayd with this configuration, and check it (/readyz, "
            "gatewayctl audit verify, a test submission)",
            f"  2. once a backup of the database is checked, remove {remove}, and the local "
            f"keystore {keystore} (its keys are in the database now)",
        ]
    )


def register(spool: SubParsers[argparse.ArgumentParser], command: Commands) -> None:
    """``spool migrate`` under ``gatewayctl spool``."""
    sub = command(
        "migrate",
        cmd_spool_migrate,
        "move this node's local spool (index, records, keystore, erasure ledger, audit log, "
        "registries) into PostgreSQL, every record verified; stop gatewayd first; run it "
        "again if it was interrupted; audited",
        parent=spool,
        audited=MIGRATE_ACTION,
    )
    sub.set_defaults(audit_self=True)  # the entry goes to PostgreSQL, after the copy
    sub.add_argument(
        "--to",
        choices=["postgresql"],
        required=True,
        help="the backend to move to (the configuration's, after the switch)",
    )
    sub.add_argument(
        "--from-directory",
        type=Path,
        metavar="DIR",
        help="the local spool directory (default: [spool] directory)",
    )
    sub.add_argument(
        "--from-keystore",
        type=Path,
        metavar="DIR",
        help="the local keystore directory (default: [spool] keystore)",
    )
    sub.add_argument(
        "--progress-every",
        type=positive,
        default=1000,
        metavar="N",
        help="a progress line on standard error every N records (default 1000)",
    )
