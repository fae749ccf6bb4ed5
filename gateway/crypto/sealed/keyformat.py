"""Key encodings: key ids, SPKI/PKCS#8/PEM, the MLKEM768-X25519 key format, HPKE suites (pure).

Nothing here reads a file or judges whether a key may be used; that is
:mod:`gateway.crypto.sealed.keys`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from typing import Final, TypeAlias

from cryptography.hazmat.primitives import hpke, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mlkem, rsa, x25519

from gateway.crypto.sealed.format import KEM_MLKEM768_X25519, KEM_X25519

__all__ = ["key_id"]

HpkePublicKey: TypeAlias = x25519.X25519PublicKey | hpke.MLKEM768X25519PublicKey
HpkePrivateKey: TypeAlias = x25519.X25519PrivateKey | hpke.MLKEM768X25519PrivateKey
SignerPrivateKey: TypeAlias = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
SignerPublicKey: TypeAlias = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey

# PEM labels of our own: the base64 body is the draft's raw key, no ASN.1 (the draft's
# SubjectPublicKeyInfo / PKCS#8 forms, OID 1.3.6.1.4.1.62253.25722, wrap the same bytes).
HYBRID_PUBLIC_LABEL: Final = "MLKEM768-X25519 PUBLIC KEY"
HYBRID_PRIVATE_LABEL: Final = "MLKEM768-X25519 PRIVATE KEY"
_MLKEM768_PUBLIC_SIZE = 1184
_X25519_SIZE = 32
HYBRID_PUBLIC_SIZE: Final = _MLKEM768_PUBLIC_SIZE + _X25519_SIZE
HYBRID_SEED_SIZE: Final = 32

_HPKE_KEMS = {KEM_X25519: hpke.KEM.X25519, KEM_MLKEM768_X25519: hpke.KEM.MLKEM768_X25519}


def key_id(public_bytes: bytes) -> str:
    """Lowercase hex SHA-256 of a key's canonical public encoding (see ``_public_bytes``)."""
    return hashlib.sha256(public_bytes).hexdigest()


def _spki(key: x25519.X25519PublicKey | rsa.RSAPublicKey | SignerPublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _spki_pem(key: x25519.X25519PublicKey | rsa.RSAPublicKey | SignerPublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _pkcs8_pem(
    key: x25519.X25519PrivateKey | rsa.RSAPrivateKey | SignerPrivateKey,
) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem(label: str, data: bytes) -> bytes:
    text = base64.b64encode(data).decode("ascii")
    lines = "\n".join(text[i : i + 64] for i in range(0, len(text), 64))
    return f"-----BEGIN {label}-----\n{lines}\n-----END {label}-----\n".encode("ascii")


_PEM_BEGIN = re.compile(rb"-----BEGIN ([A-Z0-9][A-Z0-9 -]*?)-----")
_PEM_BLOCK = re.compile(
    rb"-----BEGIN ([A-Z0-9][A-Z0-9 -]*?)-----\r?\n([A-Za-z0-9+/=\r\n]*)-----END \1-----"
)


def _pem_labels(data: bytes) -> list[str]:
    return [m.decode("ascii") for m in _PEM_BEGIN.findall(data)]


def _pem_single(data: bytes, label: str) -> bytes | None:
    """The decoded body of the only PEM block, if it has ``label``; None otherwise."""
    blocks = _PEM_BLOCK.findall(data)
    if len(blocks) != 1 or blocks[0][0].decode("ascii") != label:
        return None
    try:
        return base64.b64decode(re.sub(rb"\s+", b"", blocks[0][1]), validate=True)
    except (binascii.Error, ValueError):
        return None


def _describe(key: object) -> str:
    """A key's algorithm in words, for error messages (never its value)."""
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        return f"an RSA-{key.key_size} key"
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        return f"an EC key on curve {key.curve.name}"
    if isinstance(key, ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey):
        return "an Ed25519 key"
    if isinstance(key, x25519.X25519PublicKey | x25519.X25519PrivateKey):
        return "an X25519 key"
    if isinstance(key, mlkem.MLKEM768PublicKey | mlkem.MLKEM768PrivateKey):
        return "an ML-KEM-768 key"
    return f"a {type(key).__name__} key"


def _hpke_suite(kem: str) -> hpke.Suite:
    return hpke.Suite(_HPKE_KEMS[kem], hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


def _hybrid_from_seed(seed: bytes) -> tuple[hpke.MLKEM768X25519PrivateKey, bytes]:
    """X-Wing key derivation: SHAKE256(seed, 96) = ML-KEM-768 seed d | z (64) | X25519 key (32).

    ``expandDecapsulationKey`` of draft-connolly-cfrg-xwing-kem-06 section 5.2 (the same
    in -05 to -10): ``seed`` is the draft's 32-byte decapsulation key ``sk``. Returns the
    private key and the 1216-byte public key, the draft's ``pk = pk_M | pk_X``.
    """
    if len(seed) != HYBRID_SEED_SIZE:
        raise ValueError(f"an MLKEM768-X25519 private key is a {HYBRID_SEED_SIZE}-byte seed")
    expanded = hashlib.shake_256(seed).digest(96)
    m = mlkem.MLKEM768PrivateKey.from_seed_bytes(expanded[:64])
    x = x25519.X25519PrivateKey.from_private_bytes(expanded[64:])
    public = m.public_key().public_bytes_raw() + x.public_key().public_bytes_raw()
    return hpke.MLKEM768X25519PrivateKey(m, x), public


def _hybrid_public(data: bytes) -> hpke.MLKEM768X25519PublicKey:
    if len(data) != HYBRID_PUBLIC_SIZE:
        raise ValueError(f"an MLKEM768-X25519 public key is {HYBRID_PUBLIC_SIZE} bytes")
    m = mlkem.MLKEM768PublicKey.from_public_bytes(data[:_MLKEM768_PUBLIC_SIZE])
    x = x25519.X25519PublicKey.from_public_bytes(data[_MLKEM768_PUBLIC_SIZE:])
    return hpke.MLKEM768X25519PublicKey(m, x)
