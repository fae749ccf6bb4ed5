"""What a configuration names must be usable before the daemon starts or reloads:
every secret (present, readable by us alone), every certificate and CA file, every
payload key, and a staff registry that names each user's channels.

``gatewayctl check-config``, ``gatewayd`` at start and a reload run the same checks.
Each problem names the configuration file and the dotted key.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from gateway.config import GatewayConfig
from gateway.crypto.keys import (
    CREDENTIAL_PREFIX,
    load_master_key,
    load_upstream_credential,
    read_secret_file,
    resolve_secret_path,
)
from gateway.errors import ConfigProblem, GatewayError, SecretFileError
from gateway.identity.pgregistry import users_in_effect
from gateway.identity.registry import RegistryError, load_users, staff_problems
from gateway.relay.destinations import payload_recipient, payload_signing_key

ROOT = Path("/")


def _dsn_file(path: Path) -> str:
    """A DSN secret: readable by its owner alone, one libpq connection string."""
    try:
        text = read_secret_file(path, what="spool database DSN").decode("utf-8").strip()
    except UnicodeDecodeError:
        raise SecretFileError(f"spool database DSN file {path} is not UTF-8 text") from None
    if not text or "\n" in text:
        raise SecretFileError(f"{path}: must hold one libpq connection string on one line")
    return text


def secret_problems(
    config: GatewayConfig, file: str = "<config>", *, credentials_dir: Path | None = None
) -> list[ConfigProblem]:
    """Every secret the configuration names must exist and be readable by us alone.

    ``credential:NAME`` secrets are looked for in ``credentials_dir`` when one is given
    (checking a unit's credentials before it runs), else in ``$CREDENTIALS_DIRECTORY``.
    """
    problems = []

    def secret(what: str) -> Callable[[Path], object]:
        return lambda path: read_secret_file(path, what=what)

    secrets_: list[tuple[str, str, Callable[[Path], object]]] = [
        (f"listeners.{name}.private_key", listener.private_key, secret("listener private key"))
        for name, listener in config.listeners.items()
    ]
    secrets_.append(("spool.master_key", config.spool.master_key, load_master_key))
    if config.spool.dsn:
        secrets_.append(("spool.dsn", config.spool.dsn, _dsn_file))
    if config.admin.bearer_token:
        token = config.admin.bearer_token
        secrets_.append(("admin.bearer_token", token, secret("admin bearer token")))
    for name, dest in config.destinations.items():
        secrets_.append((f"destinations.{name}.client_key", dest.client_key, secret("client key")))
        if dest.credential:
            secrets_.append(
                (f"destinations.{name}.credential", dest.credential, load_upstream_credential)
            )
    for key, spec, load in secrets_:
        try:
            load(resolve_secret_path(spec, ROOT, credentials_dir))
        except Exception as exc:
            problems.append(ConfigProblem(file, key, str(exc)))
    files = []
    for name, listener in config.listeners.items():
        files += [
            (f"listeners.{name}.certificate", listener.certificate),
            (f"listeners.{name}.client_ca", listener.client_ca),
        ]
    for name, dest in config.destinations.items():
        files += [
            (f"destinations.{name}.ca", dest.ca),
            (f"destinations.{name}.client_certificate", dest.client_certificate),
        ]
    for key, path in files:
        if not path.is_file():
            problems.append(ConfigProblem(file, key, f"{path}: file not found"))
    return problems + _payload_key_problems(config, file, credentials_dir)


def database_dsn(config: GatewayConfig, credentials_dir: Path | None = None) -> str | None:
    """The libpq connection string of a PostgreSQL backend (read from its secret file
    or systemd credential), or None for the local backend."""
    if config.spool.backend != "postgresql" or config.spool.dsn is None:
        return None
    path = resolve_secret_path(config.spool.dsn, ROOT, credentials_dir)
    return _dsn_file(path)


def registry_problems(config: GatewayConfig, file: str = "<config>") -> list[ConfigProblem]:
    """The staff registry must name every user's channels, and only channels (or channel
    groups) this configuration has. Problems name the registry (its file, or its row in
    PostgreSQL with a shared spool) and the entry."""
    path = config.auth.users_file
    try:
        dsn = database_dsn(config)
        if dsn is None:
            users, where = load_users(path), str(path)
        else:
            users, where = users_in_effect(dsn, path)
    except RegistryError as exc:
        return [ConfigProblem(file, "auth.users_file", str(exc))]
    except (GatewayError, OSError) as exc:
        return [ConfigProblem(file, "spool.dsn", str(exc))]
    return [
        ConfigProblem(where, key, message)
        for key, message in staff_problems(users, config.staff_scopes())
    ]


def _payload_key_problems(
    config: GatewayConfig, file: str, credentials_dir: Path | None
) -> list[ConfigProblem]:
    """Every payload encryption key loads: algorithm, size, expiry, file permissions."""
    problems = []
    for name, dest in config.destinations.items():
        if dest.payload_encryption == "none":
            continue
        spec = dest.signing_key
        if credentials_dir is not None and spec and spec.startswith(CREDENTIAL_PREFIX):
            try:  # the same file the unit will pass, looked for where it is now
                found = resolve_secret_path(spec, ROOT, credentials_dir)
            except GatewayError as exc:
                problems.append(ConfigProblem(file, f"destinations.{name}.signing_key", str(exc)))
                continue
            dest = dest.model_copy(update={"signing_key": str(found)})
        for key, load in (
            ("recipient_key", payload_recipient),
            ("signing_key", payload_signing_key),
        ):
            try:
                load(dest)
            except (GatewayError, OSError) as exc:
                problems.append(ConfigProblem(file, f"destinations.{name}.{key}", str(exc)))
    return problems


def keystore_warnings(config: GatewayConfig, file: str = "<config>") -> list[str]:
    """What check-config and gatewayd warn of (not refuse): a keystore a backup of the
    spool would carry along, which would keep erased records readable in that backup.
    Nothing with the shared backend: its keystore is a schema of its own (gateway_keys),
    which the certificate of erasure tells backups to leave out."""
    if config.spool.backend == "postgresql":
        return []
    keystore = config.keystore_directory.resolve()
    spool = config.spool.directory.resolve()
    if keystore == spool or spool in keystore.parents:
        return [
            f"{file}: spool.keystore: warning: {keystore} is inside the spool directory "
            f"{spool}; a backup of the spool would carry the keys whose destruction makes "
            "its erased records unreadable. Put the keystore elsewhere and keep it out of "
            "backups (or keep its backups no longer than the retention)"
        ]
    return []
