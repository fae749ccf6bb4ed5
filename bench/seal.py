"""Cost of sealing (issue 5): encrypt to the recipient and sign, then verify and open.

For each suite (hpke-x25519, hpke-mlkem768-x25519, cms) and signer (Ed25519, ECDSA
P-256) this seals a 300 KB and a 7 MB canonical payload with the gateway's own code
(:class:`gateway.crypto.seal.Sealer`, keys loaded from files as the daemon loads them)
and opens it again with :func:`gateway.crypto.seal.open_sealed`. Reported per case:
the median wall time of one seal (including joining the payload into one bytes object)
and of one open, the throughput in MB/s (10^6 bytes) and the bytes the seal adds.
Single-threaded, in this process; nothing else runs meanwhile.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from gateway.crypto.sealed.generate import (
    generate_cms_recipient,
    generate_recipient_key,
    generate_signing_key,
)
from gateway.crypto.sealed.keys import SigningKey, load_recipient, load_signing_key
from gateway.crypto.sealed.open import open_sealed
from gateway.crypto.sealed.seal import Sealer
from gateway.crypto.sealed.upstream_keys import load_recipient_private_key

SUITES = ("hpke-x25519", "hpke-mlkem768-x25519", "cms")
SIGNERS = ("ed25519", "ecdsa-p256-sha256")
SIZES = (300_000, 7_000_000)
BIND = {
    "channel": "online-application",
    "submission_id": "019e6a4c12347a5d3c2b1e0f9a8b7c6d",
    "destination": "dnp-relay",
}
CONTENT_TYPE = "multipart/form-data; boundary=bench"


def _median_seconds(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def _write(path: Path, data: bytes, mode: int) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def run(sizes: Sequence[int] = SIZES, repeat: int | None = None) -> list[dict[str, Any]]:
    """Measure every suite × signer × size; ``repeat`` defaults to 40 (small) or 8 (large)."""
    _run(sizes, repeat=1)  # one pass to warm the allocator up, then the real one
    return _run(sizes, repeat)


def _run(sizes: Sequence[int], repeat: int | None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    not_after = datetime.now(UTC) + timedelta(days=365)
    with tempfile.TemporaryDirectory(prefix="gateway-bench-seal-") as tmp:
        d = Path(tmp)
        signers: dict[str, SigningKey] = {
            alg: load_signing_key(_write(d / f"{alg}.key", generate_signing_key(alg), 0o600))  # type: ignore[arg-type]
            for alg in SIGNERS
        }
        trusted = [s.verify_key for s in signers.values()]
        for suite in SUITES:
            if suite == "cms":
                key_pem, cert_pem = generate_cms_recipient("bench")
                cert = _write(d / "cms.pem", cert_pem, 0o644)
                recipient = load_recipient(cert, suite="cms")
                private = load_recipient_private_key(
                    _write(d / "cms.key", key_pem, 0o600), certificate=cert
                )
            else:
                kem = suite.removeprefix("hpke-")
                key_pem, pub_pem = generate_recipient_key(kem)  # type: ignore[arg-type]
                recipient = load_recipient(
                    _write(d / f"{suite}.pub", pub_pem, 0o644),
                    suite="hpke",
                    kem=kem,  # type: ignore[arg-type]
                    not_after=not_after,
                )
                private = load_recipient_private_key(_write(d / f"{suite}.key", key_pem, 0o600))
            for alg, signer in signers.items():
                sealer = Sealer(recipient, signer)
                for size in sizes:
                    plaintext = os.urandom(size)
                    n = repeat or (40 if size < 1_000_000 else 8)

                    def seal_once(sealer: Sealer = sealer, plaintext: bytes = plaintext) -> bytes:
                        sealed = sealer.seal(
                            plaintext, content_type=CONTENT_TYPE, created=time.time(), **BIND
                        )
                        return sealed.data

                    data = seal_once()

                    def open_once(data: bytes = data, private: Any = private) -> bytes:
                        opened = open_sealed(
                            data,
                            recipient_key=private,
                            trusted_signers=trusted,
                            channel=BIND["channel"],
                            submission_id=BIND["submission_id"],
                            destination=BIND["destination"],
                        )
                        return opened.plaintext

                    assert open_once() == plaintext
                    seal_s = _median_seconds(seal_once, n)
                    open_s = _median_seconds(open_once, n)
                    rows.append(
                        {
                            "suite": suite,
                            "signer": alg,
                            "payload_bytes": size,
                            "seal_ms": round(seal_s * 1000, 3),
                            "seal_mb_per_s": round(size / seal_s / 1e6, 1),
                            "open_ms": round(open_s * 1000, 3),
                            "open_mb_per_s": round(size / open_s / 1e6, 1),
                            "overhead_bytes": len(data) - size,
                            "samples": n,
                        }
                    )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'suite':<22}{'signer':<19}{'payload':>10}{'seal ms':>10}{'MB/s':>8}"
        f"{'open ms':>10}{'MB/s':>8}{'overhead':>10}"
    ]
    for r in rows:
        lines.append(
            f"{r['suite']:<22}{r['signer']:<19}{r['payload_bytes']:>10}{r['seal_ms']:>10.2f}"
            f"{r['seal_mb_per_s']:>8.0f}{r['open_ms']:>10.2f}{r['open_mb_per_s']:>8.0f}"
            f"{r['overhead_bytes']:>10}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    results = run()
    print(table(results))
    sys.exit(0)
