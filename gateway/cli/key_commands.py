"""gatewayctl's keys commands: the epoch keystore's state, and master-key rotation.

``keys rotate-master --new FILE`` is how a ward retires a master key it no longer
trusts (a copy gone astray, a staff change): every live epoch key is wrapped again by
the new key, the switch is one atomic rename, and the old key's files are destroyed.
It needs the keystore to itself (stop gatewayd first), survives a crash at any step (run
it again: it finishes or starts over), and is written to the audit log.

With the shared backend the keystore is the schema ``gateway_keys`` of the spool's
database (:mod:`gateway.crypto.pgkeystore`): ``keys status`` reads its tables, and
``keys rotate-master`` re-seals every row in one transaction, refused while any node
(or another gatewayctl) has the keystore open, then vacuums the old seals away.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path

from gateway.backends import keystore_location
from gateway.cli.common import (
    CommandFailed,
    Commands,
    SubParsers,
    UsageError,
    add_format,
    config_of,
    confirm,
    print_json,
)
from gateway.crypto.keys import load_master_key, resolve_secret_path, write_new_master_key
from gateway.crypto.keystore import KeyStore, epoch_end, master_key_id
from gateway.crypto.pgkeystore import KeystoreState, PgKeyStore, keystore_state, vacuum_keystore
from gateway.errors import GatewayError, KeystoreError, SecretFileError
from gateway.preflight import ROOT, database_dsn


def _current(directory: Path) -> str | None:
    try:
        return (directory / "CURRENT").read_text("ascii").strip()
    except FileNotFoundError:
        return None


def cmd_keys_rotate_master(args: argparse.Namespace) -> int:
    config = config_of(args)
    directory = config.keystore_directory
    old = load_master_key(resolve_secret_path(config.spool.master_key, ROOT))
    new = _new_key(args)
    old_id, new_id = master_key_id(old), master_key_id(new)
    dsn = database_dsn(config)
    if dsn is not None:
        return _rotate_shared(args, dsn, old, new)
    args.audit_detail.update(keystore=str(directory), to_master_key_id=new_id)
    if _current(directory) == new_id:
        # A rotation that committed before it was cut short: finish it (opening removes
        # the old key's files) and say what remains to do.
        store = KeyStore(directory, new)
        _open(store)
        store.close()
        args.audit_detail.update(resumed=True)
        print(f"keystore {directory}: already under master key {new_id}; old files removed")
        print(_next_steps(args.new))
        return 0
    store = KeyStore(directory, old)
    _open(store)
    try:
        count = store.rotate(new)
    finally:
        store.close()
    args.audit_detail.update(from_master_key_id=old_id, epochs=count)
    print(
        f"keystore {directory}: {count} epoch keys and the idempotency key now wrapped by "
        f"master key {new_id} (was {old_id}); the old key's files are destroyed"
    )
    print(_next_steps(args.new))
    return 0


def _rotate_shared(args: argparse.Namespace, dsn: str, old: bytes, new: bytes) -> int:
    """The rotation of the keystore in PostgreSQL: one transaction, all or nothing, so a
    run cut short is run again from the start, and one after success has nothing to do."""
    where = keystore_location(config_of(args))
    old_id, new_id = master_key_id(old), master_key_id(new)
    args.audit_detail.update(keystore=where, to_master_key_id=new_id)
    if keystore_state(dsn).master_key_id == new_id:
        args.audit_detail.update(resumed=True)
        print(f"keystore {where}: already under master key {new_id}; nothing left to do")
        print(_next_steps(args.new))
        return 0
    store = PgKeyStore(dsn, old)
    store.open()  # KeystoreError: under another master key, or a rotation under way
    try:
        count = store.rotate(new)  # KeystoreError (ROTATION_REFUSED) while a node runs
    finally:
        store.close()
    args.audit_detail.update(from_master_key_id=old_id, epochs=count)
    print(
        f"keystore {where}: {count} epoch keys and the idempotency key now sealed by "
        f"master key {new_id} (was {old_id}), in one transaction"
    )
    try:
        vacuum_keystore(dsn)
    except GatewayError as exc:  # done all the same; the old seals wait for a VACUUM
        args.audit_detail.update(vacuumed=False)
        print(
            f"gatewayctl: warning: the keystore's tables were not vacuumed ({exc}): run "
            "VACUUM on gateway_keys.epoch_keys and gateway_keys.current, or wait for "
            "autovacuum, to remove the rows sealed by the old key",
            file=sys.stderr,
        )
    print(_next_steps(args.new))
    return 0


def _new_key(args: argparse.Namespace) -> bytes:
    try:
        return load_master_key(args.new)
    except SecretFileError as exc:
        raise UsageError(f"--new: {exc}") from None


def _confirm_rotation(args: argparse.Namespace) -> None:
    _new_key(args)  # a bad --new is said before the question
    config = config_of(args)
    if config.spool.backend == "postgresql":
        where = keystore_location(config)
        confirm(args, f"seal the keystore {where} by {args.new} (the old key opens it no more)")
        return
    confirm(args, f"wrap the keystore by {args.new} and destroy the old master key's files")


def _open(store: KeyStore) -> None:
    try:
        store.open()
    except KeystoreError as exc:
        if "in use" in str(exc):
            raise KeystoreError(f"{exc}: stop gatewayd before rotating its master key") from None
        raise


def _next_steps(new: Path) -> str:
    return (
        f"next: make {new} the configured spool.master_key (the spool-master.key "
        "credential), start gatewayd, and destroy every copy of the old key"
    )


def cmd_keys_new_master(args: argparse.Namespace) -> int:
    try:
        write_new_master_key(args.out)
    except SecretFileError as exc:  # --out names an existing file: not a configuration's
        raise CommandFailed(str(exc)) from None
    print(f"wrote a new master key to {args.out} (0600; never replaces a file)")
    return 0


def cmd_keys_status(args: argparse.Namespace) -> int:
    """The keystore as its files (or its tables) say: no key is opened, so it works while
    gatewayd runs."""
    config = config_of(args)
    dsn = database_dsn(config)
    where = keystore_location(config)
    if dsn is None:
        state = _files_state(config.keystore_directory)
    else:
        state = keystore_state(dsn)
        if state == KeystoreState(None, [], []):
            raise CommandFailed(f"keystore {where} does not exist yet (gatewayd makes it)")
    now = datetime.now(UTC).timestamp()
    epochs = {
        "live": [e for e in state.live if epoch_end(e) > now],
        "passed": [e for e in state.live if epoch_end(e) <= now],
        "destroyed": state.destroyed,
    }
    kid = state.master_key_id
    if args.format == "json":
        print_json({"keystore": where, "master_key_id": kid, **epochs})
        return 0
    print(f"keystore {where}, under master key {kid}")
    for state_name, days in epochs.items():
        shown = ", ".join(days[-10:]) + (" …" if len(days) > 10 else "")
        print(f"  {state_name}: {len(days)}{': ' + shown if days else ''}")
    return 0


def _files_state(directory: Path) -> KeystoreState:
    if not directory.is_dir():
        raise CommandFailed(f"keystore {directory} does not exist (gatewayd makes it)")
    live = sorted(
        {p.name.split(".")[0].removeprefix("epoch-") for p in directory.glob("epoch-*.key")}
    )
    destroyed = sorted(p.name for p in (directory / "destroyed").glob("*"))
    return KeystoreState(_current(directory), live, destroyed)


def register(commands: SubParsers[argparse.ArgumentParser], command: Commands) -> None:
    keys = commands.add_parser("keys", help="the epoch keystore and the master key").add_subparsers(
        dest="keys_command", required=True, metavar="ACTION"
    )
    rotate = command(
        "rotate-master",
        cmd_keys_rotate_master,
        "wrap every epoch key by a new master key and destroy the old key's files "
        "(stop gatewayd first, on every node; asks first, --yes does not); audited",
        parent=keys,
        audited="keys.rotate_master",
        destructive=True,
    )
    rotate.set_defaults(confirm=_confirm_rotation)
    rotate.add_argument(
        "--new", type=Path, required=True, metavar="FILE", help="the new master key (0600)"
    )
    new = command(
        "new-master",
        cmd_keys_new_master,
        "write a fresh random master key (64 hex characters) to a new 0600 file",
        parent=keys,
        config=False,
    )
    new.add_argument("--out", type=Path, required=True, metavar="FILE")
    status = command(
        "status", cmd_keys_status, "the key epochs: live, passed, destroyed", parent=keys
    )
    add_format(status)
