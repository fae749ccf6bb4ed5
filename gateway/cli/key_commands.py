"""gatewayctl's keys commands: the epoch keystore's state, and master-key rotation.

``keys rotate-master --new FILE`` is how a ward retires a master key it no longer
trusts (a copy gone astray, a staff change): every live epoch key is wrapped again by
the new key, the switch is one atomic rename, and the old key's files are destroyed.
It needs the keystore to itself (stop gatewayd first), survives a crash at any step (run
it again: it finishes or starts over), and is written to the audit log.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path

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
from gateway.errors import KeystoreError, SecretFileError
from gateway.preflight import ROOT


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


def _new_key(args: argparse.Namespace) -> bytes:
    try:
        return load_master_key(args.new)
    except SecretFileError as exc:
        raise UsageError(f"--new: {exc}") from None


def _confirm_rotation(args: argparse.Namespace) -> None:
    _new_key(args)  # a bad --new is said before the question
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
    """The keystore as its files say (no key is opened; works while gatewayd runs)."""
    directory = config_of(args).keystore_directory
    if not directory.is_dir():
        raise CommandFailed(f"keystore {directory} does not exist (gatewayd makes it)")
    now = datetime.now(UTC).timestamp()
    live = sorted(
        {p.name.split(".")[0].removeprefix("epoch-") for p in directory.glob("epoch-*.key")}
    )
    destroyed = sorted(p.name for p in (directory / "destroyed").glob("*"))
    epochs = {
        "live": [e for e in live if epoch_end(e) > now],
        "passed": [e for e in live if epoch_end(e) <= now],
        "destroyed": destroyed,
    }
    kid = _current(directory)
    if args.format == "json":
        print_json({"keystore": str(directory), "master_key_id": kid, **epochs})
        return 0
    print(f"keystore {directory}, under master key {kid}")
    for state, days in epochs.items():
        shown = ", ".join(days[-10:]) + (" …" if len(days) > 10 else "")
        print(f"  {state}: {len(days)}{': ' + shown if days else ''}")
    return 0


def register(commands: SubParsers[argparse.ArgumentParser], command: Commands) -> None:
    keys = commands.add_parser("keys", help="the epoch keystore and the master key").add_subparsers(
        dest="keys_command", required=True, metavar="ACTION"
    )
    rotate = command(
        "rotate-master",
        cmd_keys_rotate_master,
        "wrap every epoch key by a new master key and destroy the old key's files "
        "(stop gatewayd first; asks first, --yes does not); audited",
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
