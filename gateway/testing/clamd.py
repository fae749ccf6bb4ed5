"""A private clamd for the tests and the bench: Debian's clamav-daemon, on a Unix socket
in a temporary directory, with a signature database written here (no download, ever).

Two signatures, both body patterns that match anywhere in a file:

- ``Gateway.Test.EICAR``: the EICAR anti-virus test string;
- ``Gateway.Test.Marker``: a marker of this project's own (:data:`MARKER`).

A JPEG that carries either in a comment is still a valid photo, so a test can post it
through the whole ingress and see the scanner, not the photo check, refuse it.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from PIL import Image

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
MARKER = b"gateway-test-malware-marker-7f3e9a"
SIGNATURES = {"Gateway.Test.EICAR": EICAR, "Gateway.Test.Marker": MARKER}
CLAMD_PATHS = ("/usr/sbin/clamd", "/usr/bin/clamd")


def clamd_binary() -> str | None:
    found = shutil.which("clamd")
    return found or next((p for p in CLAMD_PATHS if Path(p).exists()), None)


def photo_with(payload: bytes, photo: bytes) -> bytes:
    """``photo`` saved again with ``payload`` in a JPEG comment: a valid photo still."""
    image = Image.open(io.BytesIO(photo))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85, comment=payload)
    return out.getvalue()


@dataclass
class Clamd:
    """clamd running on ``socket`` until :meth:`stop`."""

    directory: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.directory / "clamd.sock"

    def start(self, *, ready_within: float = 60.0) -> Clamd:
        binary = clamd_binary()
        if binary is None:
            raise RuntimeError(
                "clamd is not installed: scripts/install-tools installs Debian's "
                "clamav-daemon (make test runs it)"
            )
        database = self.directory / "db"
        database.mkdir(parents=True, exist_ok=True)
        lines = [f"{name}:0:*:{pattern.hex()}" for name, pattern in SIGNATURES.items()]
        (database / "gateway-test.ndb").write_text("\n".join(lines) + "\n", "ascii")
        config = self.directory / "clamd.conf"
        config.write_text(
            f"LocalSocket {self.socket}\n"
            f"DatabaseDirectory {database}\n"
            f"TemporaryDirectory {self.directory}\n"
            f"LogFile {self.directory / 'clamd.log'}\n"
            f"PidFile {self.directory / 'clamd.pid'}\n"
            "Foreground yes\n"
            "StreamMaxLength 16M\n"
            "SelfCheck 0\n",
            "ascii",
        )
        self.process = subprocess.Popen(  # noqa: S603 - our own fixed arguments
            [binary, f"--config-file={config}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + ready_within
        while not self.socket.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = (self.directory / "clamd.log").read_text("utf-8", "replace")[-2000:]
                self.stop()
                raise RuntimeError(f"clamd did not start: {log}")
            time.sleep(0.02)  # a subprocess starting: nothing to wait on but its socket
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> Clamd:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
