"""Tests for secret-file reading and master-key handling."""

from __future__ import annotations

import base64
import os
import stat
import struct
from pathlib import Path

import pytest

from gateway.crypto.keys import (
    load_master_key,
    read_secret_file,
    resolve_secret_path,
    write_new_master_key,
)
from gateway.errors import SecretFileError

KEY = bytes(range(100, 132))


def _secret(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def test_mode_0644_is_refused_with_mode_in_message(tmp_path: Path) -> None:
    """A world-readable secret is refused and the message shows 0644, the name and path."""
    path = _secret(tmp_path / "k", b"secret", 0o644)
    with pytest.raises(SecretFileError) as info:
        read_secret_file(path, what="upstream token")
    message = str(info.value)
    assert "0644" in message
    assert "upstream token" in message
    assert str(path) in message
    assert "secret" not in message.replace("upstream token", "")


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602, 0o610, 0o601, 0o660])
def test_any_group_or_other_bit_is_refused(tmp_path: Path, mode: int) -> None:
    """Every group/other permission bit alone is enough to refuse the file."""
    path = _secret(tmp_path / "k", b"x", mode)
    with pytest.raises(SecretFileError, match=f"{mode:04o}"):
        read_secret_file(path, what="key")


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_owner_only_modes_are_accepted(tmp_path: Path, mode: int) -> None:
    """Owner-only files are read and returned unchanged."""
    path = _secret(tmp_path / "k", b"\x00secret\xff", mode)
    assert read_secret_file(path, what="key") == b"\x00secret\xff"


def test_missing_file_is_refused(tmp_path: Path) -> None:
    """A missing secret names what and where."""
    with pytest.raises(SecretFileError, match="master key") as info:
        read_secret_file(tmp_path / "nope", what="master key")
    assert str(tmp_path / "nope") in str(info.value)


def test_directory_and_fifo_are_refused(tmp_path: Path) -> None:
    """Only regular files are accepted; a FIFO does not block the open."""
    directory = tmp_path / "d"
    directory.mkdir(mode=0o700)
    with pytest.raises(SecretFileError, match="regular file"):
        read_secret_file(directory, what="key")
    fifo = tmp_path / "f"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(SecretFileError, match="regular file"):
        read_secret_file(fifo, what="key")


def test_symlink_to_private_file_is_checked_on_target(tmp_path: Path) -> None:
    """A symlink is followed and the target's mode is what counts."""
    target = _secret(tmp_path / "target", b"abc", 0o644)
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(SecretFileError, match="0644"):
        read_secret_file(link, what="key")
    target.chmod(0o600)
    assert read_secret_file(link, what="key") == b"abc"


def test_credentials_directory_file_read_the_same_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A credential resolved from $CREDENTIALS_DIRECTORY is read and mode-checked."""
    creds = tmp_path / "creds"
    creds.mkdir(mode=0o700)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    path = resolve_secret_path("credential:master.key", tmp_path / "etc")
    assert path == creds / "master.key"
    _secret(path, KEY, 0o400)
    assert read_secret_file(path, what="master key") == KEY
    path.chmod(0o444)
    with pytest.raises(SecretFileError, match="0444"):
        read_secret_file(path, what="master key")


def _acl(*entries: tuple[int, int, int]) -> bytes:
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


_ANY = 0xFFFFFFFF


def test_systemd_acl_credential_is_accepted_only_in_credentials_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """systemd's 0400+ACL credential (shown as 0440) is accepted there, refused elsewhere."""
    creds = tmp_path / "creds"
    creds.mkdir(mode=0o700)
    path = _secret(creds / "master.key", KEY, 0o400)
    acl = _acl(
        (0x01, 4, _ANY),  # user_obj r
        (0x02, 4, os.geteuid()),  # user:<us> r
        (0x04, 0, _ANY),  # group_obj ---
        (0x10, 4, _ANY),  # mask r
        (0x20, 0, _ANY),  # other ---
    )
    try:
        os.setxattr(path, "system.posix_acl_access", acl)
    except OSError:
        pytest.skip("file system does not support POSIX ACLs")
    assert stat.S_IMODE(path.stat().st_mode) == 0o440
    with pytest.raises(SecretFileError, match="0440"):
        read_secret_file(path, what="master key")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert read_secret_file(path, what="master key") == KEY
    # An ACL that also lets another user or the owning group read is still refused.
    stranger = (0x02, 4, os.geteuid() + 1)
    acl = _acl((0x01, 4, _ANY), stranger, (0x04, 0, _ANY), (0x10, 4, _ANY), (0x20, 0, _ANY))
    os.setxattr(path, "system.posix_acl_access", acl)
    with pytest.raises(SecretFileError, match="0440"):
        read_secret_file(path, what="master key")


def test_resolve_plain_paths(tmp_path: Path) -> None:
    """Relative paths resolve against base; absolute paths are kept."""
    assert resolve_secret_path("keys/master.key", tmp_path) == tmp_path / "keys/master.key"
    assert resolve_secret_path("/etc/gw/k", tmp_path) == Path("/etc/gw/k")
    with pytest.raises(SecretFileError):
        resolve_secret_path("", tmp_path)


def test_credential_spec_without_directory_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """credential:NAME outside systemd (no $CREDENTIALS_DIRECTORY) is refused."""
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(SecretFileError, match="CREDENTIALS_DIRECTORY"):
        resolve_secret_path("credential:master.key", tmp_path)


@pytest.mark.parametrize("name", ["", ".", "..", "../etc/shadow", "a/b"])
def test_credential_names_cannot_escape(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """Credential names with path separators or dot names are refused."""
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    with pytest.raises(SecretFileError):
        resolve_secret_path(f"credential:{name}", tmp_path)


@pytest.mark.parametrize(
    "content",
    [
        KEY,
        KEY.hex().encode(),
        KEY.hex().encode() + b"\n",
        KEY.hex().upper().encode() + b"\r\n",
        base64.b64encode(KEY),
        base64.b64encode(KEY) + b"\n",
    ],
    ids=["raw", "hex", "hex-newline", "HEX-crlf", "base64", "base64-newline"],
)
def test_master_key_forms(tmp_path: Path, content: bytes) -> None:
    """Raw, hex and base64 encodings of the same key all load to the same 32 bytes."""
    path = _secret(tmp_path / "master.key", content)
    assert load_master_key(path) == KEY


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"hunter2-hunter2-hunter2-hunter2\n",  # 32 printable bytes: a passphrase
        b"SUPERSECRETVALUE" * 2,
        KEY[:31],
        KEY + b"\n",
        KEY.hex().encode()[:-2] + b"\n",
        KEY.hex().encode() + b"00",
        b"zz" * 32,
        base64.b64encode(KEY[:24]),
        base64.b64encode(KEY + b"!"),
        bytes(32).hex().encode(),
        b"\xff" * 64,
    ],
    ids=[
        "empty",
        "passphrase",
        "printable-32",
        "raw-31",
        "raw-newline",
        "hex-62",
        "hex-66",
        "not-hex",
        "base64-24",
        "base64-33",
        "all-zero",
        "binary-64",
    ],
)
def test_bad_master_key_refused_without_echo(tmp_path: Path, content: bytes) -> None:
    """Malformed key files are refused with a rule, never the file's contents."""
    path = _secret(tmp_path / "master.key", content)
    with pytest.raises(SecretFileError, match="must hold a 256-bit key") as info:
        load_master_key(path)
    message = str(info.value)
    stripped = content.strip()
    if len(stripped) >= 4:
        assert stripped.decode("latin-1") not in message
        assert stripped.hex() not in message
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__


def test_master_key_mode_is_checked(tmp_path: Path) -> None:
    """A valid key in a group-readable file is refused."""
    path = _secret(tmp_path / "master.key", KEY.hex().encode(), 0o640)
    with pytest.raises(SecretFileError, match="0640"):
        load_master_key(path)


def test_write_new_master_key_creates_0600_hex(tmp_path: Path) -> None:
    """A new master key file is mode 0600, 64 hex chars plus newline, and loads."""
    path = tmp_path / "master.key"
    old_umask = os.umask(0)
    try:
        write_new_master_key(path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    content = path.read_bytes()
    assert len(content) == 65 and content.endswith(b"\n")
    key = load_master_key(path)
    assert key.hex().encode() == content.strip()
    other = tmp_path / "other.key"
    write_new_master_key(other)
    assert load_master_key(other) != key


def test_write_new_master_key_refuses_overwrite(tmp_path: Path) -> None:
    """An existing file (or dangling symlink) is never replaced."""
    path = tmp_path / "master.key"
    write_new_master_key(path)
    before = path.read_bytes()
    with pytest.raises(SecretFileError, match="refusing to overwrite"):
        write_new_master_key(path)
    assert path.read_bytes() == before
    link = tmp_path / "link.key"
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(SecretFileError):
        write_new_master_key(link)
    assert not (tmp_path / "elsewhere").exists()


def test_write_new_master_key_missing_directory(tmp_path: Path) -> None:
    """A missing parent directory is reported as SecretFileError."""
    with pytest.raises(SecretFileError, match="cannot be created"):
        write_new_master_key(tmp_path / "no" / "master.key")
