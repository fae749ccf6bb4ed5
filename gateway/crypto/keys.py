"""Secret material read from files: permission checks and master-key parsing.

Error messages name the secret, the path and the rule broken, never file contents.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import stat
import struct
from pathlib import Path

from gateway.errors import SecretFileError
from gateway.fsutil import write_atomic

__all__ = [
    "CREDENTIAL_PREFIX",
    "MASTER_KEY_SIZE",
    "MAX_SECRET_FILE_SIZE",
    "load_master_key",
    "read_secret_file",
    "resolve_secret_path",
    "write_new_master_key",
]

CREDENTIAL_PREFIX = "credential:"
MASTER_KEY_SIZE = 32
MAX_SECRET_FILE_SIZE = 1 << 20

_HEX_KEY = re.compile(rb"[0-9a-fA-F]{64}")
_KEY_RULE = (
    "must hold a 256-bit key: 32 raw random bytes, 64 hex characters, "
    "or base64 of 32 bytes (an optional trailing newline is allowed)"
)

# POSIX ACL extended attribute (linux/posix_acl_xattr.h), little-endian.
_ACL_XATTR = "system.posix_acl_access"
_ACL_VERSION = 2
_ACL_USER_OBJ = 0x01
_ACL_USER = 0x02
_ACL_GROUP_OBJ = 0x04
_ACL_GROUP = 0x08
_ACL_MASK = 0x10
_ACL_OTHER = 0x20


def _under_credentials_directory(path: Path) -> bool:
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return False
    real_dir = os.path.realpath(directory)
    real_path = os.path.realpath(path)
    return os.path.commonpath([real_dir, real_path]) == real_dir and real_path != real_dir


def _acl_grants_only_us(fd: int, st: os.stat_result) -> bool:
    """True if the file's ACL lets no one but its owner (root or us) and us read it.

    systemd writes credentials 0400 owned by root and grants the service user read
    access with an ACL entry; with an ACL the group bits of ``st_mode`` show the ACL
    mask, so such a file looks like 0440 although no group can read it.
    """
    uid = os.geteuid()
    if st.st_uid not in (0, uid):
        return False
    try:
        blob = os.getxattr(fd, _ACL_XATTR)
    except OSError:
        return False
    if len(blob) < 4 or (len(blob) - 4) % 8:
        return False
    (version,) = struct.unpack_from("<I", blob)
    if version != _ACL_VERSION:
        return False
    entries = list(struct.iter_unpack("<HHI", blob[4:]))
    mask = 0o7
    for tag, perm, _ in entries:
        if tag == _ACL_MASK:
            mask = perm
    for tag, perm, qualifier in entries:
        if tag in (_ACL_USER_OBJ, _ACL_MASK):
            continue
        if tag == _ACL_USER:
            if qualifier != uid and perm & mask:
                return False
        elif tag in (_ACL_GROUP_OBJ, _ACL_GROUP):
            if perm & mask:
                return False
        elif tag == _ACL_OTHER:
            if perm:
                return False
        else:
            return False
    return True


def read_secret_file(path: Path, *, what: str) -> bytes:
    """Read a secret file that only its owner can access.

    Refuses a missing or unreadable path, anything but a regular file, a file larger
    than :data:`MAX_SECRET_FILE_SIZE`, and a file whose mode grants group or others any
    access (``mode & 0o077``). Files in ``$CREDENTIALS_DIRECTORY`` (systemd
    ``LoadCredential=``) get the same check, except that group bits which merely
    reflect an ACL granting this process's user read access are accepted.
    """
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise SecretFileError(f"{what} file {path} does not exist") from None
    except PermissionError:
        raise SecretFileError(f"{what} file {path} is not readable by this process") from None
    except OSError as exc:
        raise SecretFileError(f"{what} file {path} cannot be opened: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SecretFileError(f"{what} file {path} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077 and not (
            _under_credentials_directory(path) and _acl_grants_only_us(fd, st)
        ):
            raise SecretFileError(
                f"{what} file {path} has mode {mode:04o}; it must not be accessible "
                f"by group or others (chmod 600 it)"
            )
        chunks: list[bytes] = []
        total = 0
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            total += len(chunk)
            if total > MAX_SECRET_FILE_SIZE:
                raise SecretFileError(
                    f"{what} file {path} is larger than {MAX_SECRET_FILE_SIZE} bytes"
                )
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise SecretFileError(f"{what} file {path} cannot be read: {exc.strerror}") from None
    finally:
        os.close(fd)


def resolve_secret_path(spec: str, base: Path, credentials_dir: Path | None = None) -> Path:
    """Turn a configured secret location into a path.

    ``credential:NAME`` names a systemd credential: ``credentials_dir/NAME`` when a
    directory is given (``gatewayctl check-config --credentials-dir``), else
    ``$CREDENTIALS_DIRECTORY/NAME``. Anything else is a path; a relative one is taken
    relative to ``base``.
    """
    if spec.startswith(CREDENTIAL_PREFIX):
        name = spec[len(CREDENTIAL_PREFIX) :]
        if not name or name in (".", "..") or "/" in name or "\0" in name:
            raise SecretFileError(f"{spec!r} does not name a credential")
        if credentials_dir is not None:
            return credentials_dir / name
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise SecretFileError(
                f"{spec!r} needs $CREDENTIALS_DIRECTORY (systemd LoadCredential=), which is "
                "not set; outside the unit, check it with 'gatewayctl check-config "
                "--credentials-dir DIR'"
            )
        return Path(directory) / name
    if not spec or "\0" in spec:
        raise SecretFileError("secret file path is empty or invalid")
    path = Path(spec)
    return path if path.is_absolute() else base / path


def _looks_like_text(data: bytes) -> bool:
    return all(0x20 <= b < 0x7F or b in (0x09, 0x0A, 0x0D) for b in data)


def load_master_key(path: Path) -> bytes:
    """Load the 256-bit master key: raw, hex or base64 (see :data:`_KEY_RULE`)."""
    data = read_secret_file(path, what="master key")
    key: bytes | None = None
    # 32 printable characters are a passphrase, not 32 random bytes.
    if len(data) == MASTER_KEY_SIZE and not _looks_like_text(data):
        key = data
    else:
        text = data.strip(b" \t\r\n")
        if _HEX_KEY.fullmatch(text):
            key = bytes.fromhex(text.decode("ascii"))
        else:
            try:
                decoded = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                decoded = b""
            if len(decoded) == MASTER_KEY_SIZE:
                key = decoded
    if key is None or key == bytes(MASTER_KEY_SIZE):
        raise SecretFileError(f"master key file {path} {_KEY_RULE}")
    return key


def load_upstream_credential(path: Path) -> tuple[str, str]:
    """An upstream's HTTP Basic credential: a file holding ``user-id:password``.

    The error never quotes the file (a decoding error would show a byte of it).
    """
    data = read_secret_file(path, what="upstream credential")
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise SecretFileError(f"{path}: an upstream credential file is UTF-8 text") from None
    user, sep, password = text.partition(":")
    if not sep or not user:
        raise SecretFileError(f"{path}: an upstream credential file holds user-id:password")
    return user, password


def write_new_master_key(path: Path) -> None:
    """Create ``path`` holding a fresh key as 64 hex characters and a newline.

    The file is created mode 0600 with ``O_CREAT | O_EXCL`` (never replacing an
    existing file or following a symlink), written, and fsynced with its directory.
    """
    content = (os.urandom(MASTER_KEY_SIZE).hex() + "\n").encode("ascii")
    try:
        write_atomic(path, content, mode=0o600, replace=False)
    except FileExistsError:
        raise SecretFileError(
            f"master key file {path} already exists; refusing to overwrite it"
        ) from None
    except OSError as exc:
        raise SecretFileError(f"master key file {path} cannot be created: {exc.strerror}") from None
