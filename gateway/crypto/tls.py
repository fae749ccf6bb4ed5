"""``ssl.SSLContext`` factories for the device listener and upstream clients.

Policy (Mozilla "intermediate"): TLS 1.2 minimum, TLS 1.3 preferred, TLS 1.2 only with
ECDHE + AEAD suites, and key exchange on X25519, P-256 or P-384 only, on TLS 1.3 as on
1.2; ``modern`` is TLS 1.3 only. Compression and renegotiation are off. Trust comes only
from the CA file given: system default CAs are never loaded.
"""

from __future__ import annotations

import ctypes
import functools
import ssl
from datetime import datetime
from pathlib import Path
from typing import Literal, NoReturn

from cryptography import x509

from gateway.errors import GatewayError

__all__ = [
    "INTERMEDIATE_CIPHERS",
    "KEY_EXCHANGE_GROUPS",
    "TlsConfigError",
    "TlsProfile",
    "cert_not_after",
    "client_context",
    "peer_cert_der",
    "server_context",
]

TlsProfile = Literal["intermediate", "modern"]

#: TLS 1.2 suites allowed by the intermediate profile (TLS 1.3 suites are all AEAD).
INTERMEDIATE_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)


KEY_EXCHANGE_GROUPS = "X25519:P-256:P-384"
"""Mozilla "intermediate" key exchange, in preference order. OpenSSL's own default also
offers X448 and P-521 (and, on TLS 1.3, finite-field groups)."""

_SSL_CTRL_SET_GROUPS_LIST = 92  # SSL_CTX_set1_groups_list() is this SSL_CTX_ctrl() call


class TlsConfigError(GatewayError):
    """A TLS certificate, key or CA file is missing or unusable (message names the file)."""


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or "invalid or unsupported PEM data")
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__


def _require_file(path: Path, what: str) -> None:
    try:
        if not path.is_file():
            raise TlsConfigError(f"{what} {path}: not found or not a regular file")
    except OSError as exc:  # pragma: no cover - e.g. EACCES on a parent directory
        raise TlsConfigError(f"{what} {path}: cannot access ({_reason(exc)})") from exc


def _no_password() -> NoReturn:
    # Called by OpenSSL only for an encrypted key; without this it would prompt on the tty.
    raise TlsConfigError("encrypted private keys are not supported")


@functools.cache
def _libssl() -> ctypes.CDLL:
    """The libssl that Python's own ``_ssl`` module is linked against (dlsym on the
    module's handle searches its dependencies), not any other copy in the process."""
    import _ssl  # the C module: its file is the handle to resolve libssl through

    lib = ctypes.CDLL(_ssl.__file__)
    lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_char_p]
    lib.SSL_CTX_ctrl.restype = ctypes.c_long
    lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
    lib.SSL_CTX_get_options.restype = ctypes.c_uint64
    return lib


def set_key_exchange_groups(ctx: ssl.SSLContext, groups: str = KEY_EXCHANGE_GROUPS) -> None:
    """Limit ``ctx`` to these key exchange groups, for TLS 1.3 and 1.2 alike.

    Python 3.15 has ``SSLContext.set_groups``; before it, ``set_ecdh_curve`` takes one
    curve only. So this calls OpenSSL's ``SSL_CTX_set1_groups_list`` on the context
    directly. The ``SSL_CTX`` pointer is the field after the object header in CPython's
    ``PySSLContext``; it is checked against the context's options before it is used, and
    anything unexpected is an error at start, never a silently wider policy.
    """
    setter = getattr(ctx, "set_groups", None)
    if setter is not None:  # pragma: no cover - Python 3.15+
        setter(groups)
        return
    lib = _libssl()
    pointer = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not pointer or lib.SSL_CTX_get_options(pointer) != int(ctx.options):
        raise TlsConfigError("cannot limit the TLS key exchange groups with this Python build")
    if lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_SET_GROUPS_LIST, 0, groups.encode("ascii")) != 1:
        raise TlsConfigError(f"OpenSSL refused the key exchange groups {groups}")


def _base(protocol: int, profile: TlsProfile) -> ssl.SSLContext:
    if profile not in ("intermediate", "modern"):
        raise TlsConfigError(f"unknown TLS profile {profile!r}; use 'intermediate' or 'modern'")
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if profile == "modern" else ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.MAXIMUM_SUPPORTED
    ctx.set_ciphers(INTERMEDIATE_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    # Mozilla intermediate/modern: let the client pick (it knows if it has AES hardware).
    ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    set_key_exchange_groups(ctx)
    return ctx


def _load_chain(ctx: ssl.SSLContext, cert: Path, key: Path) -> None:
    _require_file(cert, "certificate")
    _require_file(key, "private key")
    try:
        ctx.load_cert_chain(certfile=cert, keyfile=key, password=_no_password)
    except TlsConfigError as exc:
        raise TlsConfigError(f"private key {key}: {exc}") from None
    except (ssl.SSLError, OSError, ValueError) as exc:
        # The reason comes from OpenSSL (e.g. KEY_VALUES_MISMATCH); it never quotes the file.
        raise TlsConfigError(
            f"certificate {cert} / private key {key}: cannot load ({_reason(exc)})"
        ) from None


def _load_ca(ctx: ssl.SSLContext, ca: Path, what: str) -> None:
    _require_file(ca, what)
    try:
        ctx.load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise TlsConfigError(f"{what} {ca}: cannot load ({_reason(exc)})") from exc
    if not ctx.get_ca_certs():
        raise TlsConfigError(f"{what} {ca}: contains no CA certificate")


def server_context(
    cert: Path,
    key: Path,
    *,
    client_ca: Path | None,
    profile: TlsProfile = "intermediate",
) -> ssl.SSLContext:
    """Server context; with ``client_ca`` a client certificate from that CA is required."""
    ctx = _base(ssl.PROTOCOL_TLS_SERVER, profile)
    _load_chain(ctx, Path(cert), Path(key))
    if client_ca is not None:
        _load_ca(ctx, Path(client_ca), "client CA")
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_context(
    *,
    ca: Path,
    cert: Path | None = None,
    key: Path | None = None,
    profile: TlsProfile = "intermediate",
) -> ssl.SSLContext:
    """Client context verifying the server by ``ca`` and hostname; optional client cert."""
    if (cert is None) != (key is None):
        raise TlsConfigError("client certificate and private key must be given together")
    ctx = _base(ssl.PROTOCOL_TLS_CLIENT, profile)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load_ca(ctx, Path(ca), "CA")
    if cert is not None and key is not None:
        _load_chain(ctx, Path(cert), Path(key))
    return ctx


def peer_cert_der(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> bytes | None:
    """DER of the verified peer certificate, or ``None`` without TLS or peer certificate."""
    if ssl_object is None:
        return None
    try:
        return ssl_object.getpeercert(binary_form=True)
    except ValueError:  # handshake not done yet
        return None


def cert_not_after(path: Path) -> datetime:
    """``notAfter`` (UTC, timezone-aware) of the first certificate in a PEM file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"certificate {path}: cannot read ({_reason(exc)})") from exc
    try:
        cert = x509.load_pem_x509_certificates(data)[0]
    except (ValueError, IndexError) as exc:
        raise TlsConfigError(f"certificate {path}: not a PEM certificate") from exc
    return cert.not_valid_after_utc
