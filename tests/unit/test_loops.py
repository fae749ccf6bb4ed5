"""Choosing gatewayd's event loop: asyncio's by default, uvloop when asked and installed,
a clear usage error when it is not."""

from __future__ import annotations

import asyncio
import sys

import pytest

from gateway.cli import gatewayd
from gateway.ops.loops import LOOPS, LoopUnavailable, loop_factory, loop_name


@pytest.mark.parametrize("name", LOOPS)
def test_each_loop_is_made_and_known_by_its_name(name: str) -> None:
    loop = loop_factory(name)()
    try:
        assert loop_name(loop) == name
        assert loop.run_until_complete(asyncio.sleep(0, result="ran")) == "ran"
    finally:
        loop.close()


def test_the_default_is_asyncio() -> None:
    loop = loop_factory()()
    try:
        assert type(loop).__module__.startswith("asyncio")
    finally:
        loop.close()


def test_uvloop_not_installed_is_said_with_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now fails
    with pytest.raises(LoopUnavailable, match=r"jp-mynumber-gateway\[uvloop\]"):
        loop_factory("uvloop")
    assert gatewayd.main(["--event-loop", "uvloop"]) == 78  # EX_CONFIG: no restart loop
    assert "uvloop is not installed" in capsys.readouterr().err


def test_an_unknown_loop_is_refused() -> None:
    with pytest.raises(ValueError, match="asyncio, uvloop"):
        loop_factory("tokio")


def test_gatewayd_offers_exactly_the_known_loops(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        gatewayd.main(["--event-loop", "tokio"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert all(name in err for name in LOOPS)
