"""A central Prometheus scrapes /metrics with a bearer token (admin.bearer_token): without
it, or with another, 401; /healthz and /readyz stay open; the token file is a secret
like any other (0600 or a credential)."""

from __future__ import annotations

import os
from pathlib import Path

import aiohttp
import pytest
from conftest import ctl, start_gateway

from gateway.errors import SecretFileError
from gateway.testing.sandbox import build_sandbox

TOKEN = "scrape-token-6f1c2a9e"


def token_file(tmp_path: Path, mode: int = 0o600) -> Path:
    path = tmp_path / "admin.token"
    path.write_text(TOKEN + "\n")
    os.chmod(path, mode)
    return path


async def test_metrics_need_the_bearer_token_when_one_is_set(tmp_path: Path) -> None:
    box = await build_sandbox(
        tmp_path / "box",
        start_simulators=False,
        overrides={"admin.bearer_token": str(token_file(tmp_path))},
    )
    running = await start_gateway(box)
    try:
        base = f"http://127.0.0.1:{running.bound.admin_port}"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/metrics") as none:
                assert none.status == 401
                assert none.headers["WWW-Authenticate"].startswith("Bearer")
                assert TOKEN not in await none.text()
            wrong = {"Authorization": "Bearer not-the-token"}
            async with http.get(f"{base}/metrics", headers=wrong) as refused:
                assert refused.status == 401
            right = {"Authorization": f"Bearer {TOKEN}"}
            async with http.get(f"{base}/metrics", headers=right) as scraped:
                assert scraped.status == 200
                assert "gateway_build_info" in await scraped.text()
            async with http.get(f"{base}/healthz") as health:
                assert health.status == 200
    finally:
        await running.shutdown()


async def test_a_token_file_others_can_read_is_refused(tmp_path: Path) -> None:
    box = await build_sandbox(
        tmp_path / "box",
        start_simulators=False,
        overrides={"admin.bearer_token": str(token_file(tmp_path, 0o644))},
    )
    with pytest.raises(SecretFileError, match="must not be accessible by group or others"):
        await start_gateway(box)


@pytest.mark.usefixtures("hermetic_cli")
async def test_check_config_refuses_a_token_file_others_can_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The token is checked before start like every secret: exit 78, not a start failure."""
    box = await build_sandbox(
        tmp_path / "box",
        start_simulators=False,
        overrides={"admin.bearer_token": str(token_file(tmp_path, 0o644))},
    )
    code, _, err = ctl(capsys, "check-config", "--config", box.config_path)
    assert code == 78
    assert "admin.bearer_token" in err and "group or others" in err
    assert TOKEN not in err
