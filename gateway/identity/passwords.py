"""Staff passwords: scrypt hashes, their constant-time check, and the password rule."""

from __future__ import annotations

import base64
import functools
import secrets

from cryptography.exceptions import InvalidKey
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
MIN_PASSWORD_LENGTH = 10


def hash_password(password: str, *, n: int = SCRYPT_N) -> str:
    """An scrypt hash as ``scrypt$N$r$p$salt$hash`` (base64, no padding)."""
    salt = secrets.token_bytes(16)
    digest = Scrypt(salt=salt, length=32, n=n, r=SCRYPT_R, p=SCRYPT_P).derive(password.encode())
    return "$".join(["scrypt", str(n), str(SCRYPT_R), str(SCRYPT_P), _b64(salt), _b64(digest)])


MAX_SCRYPT_N, MAX_SCRYPT_R, MAX_SCRYPT_P = 2**20, 32, 16
"""Cost bounds a stored hash may ask for: beyond them it is malformed, not verified."""


def _cost(text: str, limit: int) -> int:
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= limit:
        raise ValueError("scrypt parameter out of range")
    return int(text)


def verify_password(password: str, encoded: str) -> bool:
    """Constant-time check of ``password`` against an scrypt hash; False for any bad hash."""
    try:
        scheme, n, r, p, salt, digest = encoded.split("$")
        if scheme != "scrypt":
            return False
        # Bounded first: a malformed hash must answer False, not raise OverflowError or
        # MemoryError, nor make one login cost gigabytes.
        kdf = Scrypt(
            salt=_unb64(salt),
            length=32,
            n=_cost(n, MAX_SCRYPT_N),
            r=_cost(r, MAX_SCRYPT_R),
            p=_cost(p, MAX_SCRYPT_P),
        )
        kdf.verify(password.encode(), _unb64(digest))
    except (ValueError, InvalidKey):
        return False
    return True


@functools.cache
def dummy_hash() -> str:
    """Verified against when the user ID is unknown, so timing does not tell which IDs exist."""
    return hash_password(secrets.token_urlsafe(16))


def check_password_rule(password: str) -> str | None:
    """Why ``password`` is too weak to set, or None."""
    if len(password) < MIN_PASSWORD_LENGTH:
        return f"a staff password needs at least {MIN_PASSWORD_LENGTH} characters"
    return None


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
