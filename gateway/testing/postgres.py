"""A private PostgreSQL server for the tests and the bench: Debian's packages, a cluster
made by ``initdb`` in a temporary directory, on a loopback port, with password
authentication (SCRAM) for one role of our own. It is started once and stopped at the
end; each test gets a database of its own (:meth:`Postgres.new_database`), made from
a template in a few milliseconds.

PostgreSQL refuses to run as root: under root (CI) the cluster belongs to the
``postgres`` account the Debian package creates, and every server command runs as it;
the cluster then lives in a directory of its own under the system's temporary directory
(the account cannot enter root's 0700 directories), removed by :meth:`Postgres.stop`.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

ROLE = "gateway_test"
TEMPLATE = "gateway_template"


def pg_bindir() -> Path | None:
    """The newest installed PostgreSQL's bin directory (Debian's layout), or None."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Postgres:
    """A PostgreSQL server in ``directory`` until :meth:`stop` (None: a new temporary
    directory, removed at the end)."""

    directory: Path | None = None
    port: int = 0
    password: str = field(default_factory=lambda: secrets.token_urlsafe(18), repr=False)
    _databases: int = 0
    _user: pwd.struct_passwd | None = None

    _own_directory: bool = False

    @property
    def home(self) -> Path:
        assert self.directory is not None, "not started"
        return self.directory

    @property
    def data(self) -> Path:
        return self.home / "data"

    @property
    def password_file(self) -> Path:
        return self.home / "password"

    def dsn(self, database: str = "postgres") -> str:
        """A libpq connection string with the password in it (tests only)."""
        return (
            f"host=127.0.0.1 port={self.port} dbname={database} user={ROLE} "
            f"password={self.password} connect_timeout=5"
        )

    def _run(self, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        bindir = pg_bindir()
        assert bindir is not None
        command = [str(bindir / str(args[0])), *(str(a) for a in args[1:])]
        owner = self._user
        done = subprocess.run(  # noqa: S603 - our own fixed arguments
            command,
            check=False,
            capture_output=True,
            text=True,
            cwd=self.home,
            env={**os.environ, "LC_ALL": "C", "TZ": "UTC"},
            timeout=120,
            user=None if owner is None else owner.pw_uid,
            group=None if owner is None else owner.pw_gid,
            extra_groups=None if owner is None else [],
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stderr.strip()}")
        return done

    def start(self) -> Postgres:
        if pg_bindir() is None:
            raise RuntimeError(
                "PostgreSQL is not installed: scripts/install-tools installs Debian's "
                "postgresql package (make test runs it)"
            )
        if os.geteuid() == 0:
            self._user = pwd.getpwnam("postgres")
        if self.directory is None or self._user is not None:
            self.directory = Path(tempfile.mkdtemp(prefix="gateway-pg-"))
            self._own_directory = True
        self.home.mkdir(parents=True, exist_ok=True)
        if self._user is not None:
            os.chown(self.home, self._user.pw_uid, self._user.pw_gid)
        self.password_file.write_text(self.password + "\n", "ascii")
        if self._user is not None:
            os.chown(self.password_file, self._user.pw_uid, self._user.pw_gid)
        self.password_file.chmod(0o600)
        self._run(
            "initdb",
            "-D",
            self.data,
            "-U",
            ROLE,
            "--auth-local=scram-sha-256",
            "--auth-host=scram-sha-256",
            f"--pwfile={self.password_file}",
            "-E",
            "UTF8",
            "--no-instructions",
        )
        self.port = self.port or free_loopback_port()
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.home}'",
            "max_connections": "200",
            "shared_buffers": "'64MB'",
            "log_min_messages": "warning",
            "fsync": "on",
            "synchronous_commit": "on",
        }
        with (self.data / "postgresql.conf").open("a", encoding="ascii") as conf:
            conf.write("".join(f"{name} = {value}\n" for name, value in settings.items()))
        self.restart()
        self._make_template()
        return self

    def _make_template(self) -> None:
        import psycopg

        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {TEMPLATE}")

    def new_database(self) -> str:
        """A new empty database; returns its DSN."""
        import psycopg

        self._databases += 1
        name = f"gw_{os.getpid()}_{self._databases}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE} STRATEGY FILE_COPY")
        return self.dsn(name)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``immediate`` is a crash: no checkpoint, recovery at start)."""
        if self.directory is not None and self.data.exists():
            self._run("pg_ctl", "-D", self.data, "-m", mode, "-w", "stop", check=False)

    def remove(self) -> None:
        """Stop the server and delete its cluster (when this object made the directory)."""
        self.stop()
        if self._own_directory and self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)

    def restart(self) -> None:
        """Start the server (again after :meth:`stop`: same port, same data)."""
        self._run(
            "pg_ctl",
            "-D",
            self.data,
            "-l",
            self.home / "server.log",
            "-w",
            "-t",
            "60",
            "start",
        )

    def running(self) -> bool:
        return self._run("pg_ctl", "-D", self.data, "status", check=False).returncode == 0

    def __enter__(self) -> Postgres:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()


def wait_until_up(server: Postgres, within: float = 30.0) -> None:
    """Block until the server accepts connections (after :meth:`Postgres.restart`)."""
    import psycopg

    deadline = time.monotonic() + within
    while True:
        try:
            with psycopg.connect(server.dsn(), connect_timeout=2):
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
