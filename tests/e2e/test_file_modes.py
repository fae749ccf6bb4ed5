"""Everything the daemon writes with personal data or keys is its own: mode 0600 (0700
for directories), whatever the umask it was started with."""

from __future__ import annotations

import os
import stat

from conftest import Running

from gateway.testing.samples import sample_submission
from gateway.testing.sandbox import CHANNEL_DEVICE


async def test_every_file_in_the_state_directory_is_the_daemons_alone(gateway: Running) -> None:
    """After accepting, delivering, erasing and holding records, every file under the
    state directory (index and its WAL and SHM, record files, ledger, audit log,
    anchors, registries, lock, control socket) is 0600, every directory the daemon made
    0700, though the test process's umask is 022."""
    umask = os.umask(0o022)
    os.umask(umask)
    assert umask == 0o022, "the test needs a permissive umask to mean anything"
    gateway.sandbox.simulators["dnp-relay"].fail_next(1, 422)  # one record stays, held
    for channel, device in CHANNEL_DEVICE.items():
        fields, files = sample_submission(channel)
        async with gateway.client(device) as client:
            assert (await client.submit(channel, fields, files)).status == 202
    config = gateway.sandbox.config
    assert config is not None
    state = config.spool.directory.parent
    seen = {p.name for p in state.rglob("*")}
    for needed in ("index.sqlite3", "index.sqlite3-wal", "erasure-ledger.jsonl", "lock"):
        assert needed in seen, needed
    spool = config.spool.directory
    loose = []
    for path in state.rglob("*"):
        try:
            mode = stat.S_IMODE(path.lstat().st_mode)
        except FileNotFoundError:
            continue  # a temporary file renamed into place since the listing
        made_by_daemon = path.is_dir() and (path == spool or spool in path.parents)
        if (path.is_dir() and made_by_daemon and mode & 0o077) or (
            not path.is_dir() and mode & 0o077
        ):
            loose.append((str(path.relative_to(state)), oct(mode)))
    assert not loose, loose
    assert any((spool / "records").iterdir()), "the held record's file was checked too"
