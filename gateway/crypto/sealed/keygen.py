"""The command line ``python -m gateway.crypto.sealed.keygen``: key files and test vectors.

``--genkey`` writes a new key pair (PREFIX.key, mode 0600, never overwritten, and
PREFIX.pub or PREFIX.pem); ``--write-vectors`` and ``--check-vectors`` write and check
the test vectors in ``docs/test-vectors`` (docs/sealed-payload.md).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway.crypto.sealed.format import (
    KEM_MLKEM768_X25519,
    KEM_X25519,
    SIG_ECDSA_P256,
    SIG_ED25519,
    SigAlg,
)
from gateway.crypto.sealed.generate import (
    generate_cms_recipient,
    generate_recipient_key,
    generate_signing_key,
)
from gateway.crypto.sealed.keys import _signing_key_from_pem
from gateway.crypto.sealed.vectors import check_vector_file, generate_vectors
from gateway.errors import GatewayError
from gateway.fsutil import write_atomic

__all__ = ["main"]


def _write_key_files(prefix: Path, private_pem: bytes, public_pem: bytes, public_ext: str) -> None:
    write_atomic(prefix.with_name(prefix.name + ".key"), private_pem, mode=0o600, replace=False)
    write_atomic(prefix.with_name(prefix.name + public_ext), public_pem, mode=0o644, replace=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.crypto.sealed.keygen",
        description="Sealed-payload keys and test vectors (docs/sealed-payload.md).",
    )
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write-vectors", type=Path, metavar="DIR", help="write test vectors")
    group.add_argument("--check-vectors", type=Path, metavar="DIR", help="check test vectors")
    group.add_argument(
        "--genkey",
        choices=["x25519", "mlkem768-x25519", "ed25519", "ecdsa-p256", "cms-rsa"],
        help="generate a key pair: PREFIX.key (0600) and PREFIX.pub (PREFIX.pem for cms-rsa)",
    )
    parser.add_argument("--out", type=Path, metavar="PREFIX", help="output prefix for --genkey")
    parser.add_argument("--cn", default="sealed-payload recipient", help="CN for cms-rsa")
    args = parser.parse_args(argv)
    try:
        if args.write_vectors is not None:
            for path in generate_vectors(args.write_vectors):
                print(path)
        elif args.check_vectors is not None:
            paths = sorted(Path(args.check_vectors).glob("*.json"))
            if not paths:
                print(f"no vector files in {args.check_vectors}", file=sys.stderr)
                return 1
            for path in paths:
                print(f"{path}: {check_vector_file(path)} cases ok")
        else:
            if args.out is None:
                parser.error("--genkey needs --out PREFIX")
            kind = args.genkey
            if kind in (KEM_X25519, KEM_MLKEM768_X25519):
                private_pem, public_pem = generate_recipient_key(kind)
                _write_key_files(args.out, private_pem, public_pem, ".pub")
            elif kind == "cms-rsa":
                key_pem, cert_pem = generate_cms_recipient(args.cn)
                _write_key_files(args.out, key_pem, cert_pem, ".pem")
            else:
                alg: SigAlg = SIG_ED25519 if kind == "ed25519" else SIG_ECDSA_P256
                pem = generate_signing_key(alg)
                public = _signing_key_from_pem(pem, not_after=None, now=None, where="new key")
                _write_key_files(args.out, pem, public.public_pem(), ".pub")
    except (GatewayError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
