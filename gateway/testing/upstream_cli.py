"""The command line of the simulated upstream: ``python -m gateway.testing.upstream``
serves one :class:`~gateway.testing.upstream.UpstreamSimulator` until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway.crypto.sealed.upstream_keys import load_recipient_private_key, load_verify_key
from gateway.errors import GatewayError
from gateway.testing.upstream import Opener, UpstreamSimulator, log

__all__ = ["main"]


def _read_credential(path: Path) -> tuple[str, str]:
    text = path.read_text(encoding="utf-8").strip()
    user, sep, password = text.partition(":")
    if not sep or not user:
        raise ValueError(f"{path}: expected one line 'user:password'")
    return user, password


async def _serve(args: argparse.Namespace) -> None:
    credential = _read_credential(args.credential_file) if args.credential_file else None
    opener = None
    if args.recipient_key:
        if not args.trusted_signer:
            raise ValueError("--recipient-key needs at least one --trusted-signer")
        opener = Opener(
            load_recipient_private_key(args.recipient_key, certificate=args.recipient_cert),
            tuple(load_verify_key(path) for path in args.trusted_signer),
        )
    sim = UpstreamSimulator(
        args.name,
        cert=args.cert,
        key=args.key,
        client_ca=args.client_ca,
        host=args.host,
        port=args.port,
        path=args.path,
        credential=credential,
        opener=opener,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with sim:
            log.info(json.dumps({"name": sim.name, "event": "listening", "url": sim.url}))
            await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info(json.dumps({"name": sim.name, "event": "stopped", "received": len(sim.received)}))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gateway.testing.upstream``: a simulated upstream until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(
        prog="python -m gateway.testing.upstream",
        description="Simulated upstream (J-LIS / contractor) behind mutual TLS.",
    )
    parser.add_argument(
        "--name",
        required=True,
        help="name used in receipt ids and logs; with sealed payloads, the recipient_id the "
        "gateway binds them to (its [destinations.NAME] recipient_id, not NAME)",
    )
    parser.add_argument("--cert", type=Path, required=True, help="server certificate (PEM)")
    parser.add_argument("--key", type=Path, required=True, help="server private key (PEM)")
    parser.add_argument(
        "--client-ca", type=Path, required=True, help="CA that signs the gateway client cert"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--path", default="/submissions")
    parser.add_argument(
        "--credential-file",
        type=Path,
        default=None,
        help="file holding 'user:password' to require as HTTP Basic",
    )
    parser.add_argument(
        "--recipient-key",
        type=Path,
        help="accept only sealed payloads (docs/sealed-payload.md), opened with this private key",
    )
    parser.add_argument(
        "--recipient-cert", type=Path, help="with a CMS recipient key: its certificate"
    )
    parser.add_argument(
        "--trusted-signer",
        type=Path,
        action="append",
        help="a signer public key (PEM) whose sealed payloads are trusted (repeat)",
    )
    args = parser.parse_args(argv)

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve(args))
    except (OSError, ValueError, GatewayError) as exc:
        print(f"simulator: {exc}", file=sys.stderr)
        return 1
    finally:
        log.removeHandler(handler)
    return 0
