"""Virus scanning of uploaded photos (ウイルス対策) against a real clamd (Debian's
clamav-daemon, started once per test session with the tests' own signatures): an
infected photo is 422 malware-detected naming the part and the signature and nothing is
kept; a clean one goes through; the photo streams to clamd while it arrives; no clamd,
or no verdict in time, is 503 with Retry-After (fail closed); every verdict is counted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import Running, start_gateway

from gateway.config import load_config
from gateway.errors import ConfigError
from gateway.testing.clamd import EICAR, MARKER, Clamd, photo_with
from gateway.testing.samples import multipart_body, sample_submission
from gateway.testing.sandbox import build_sandbox

CHANNEL = "online-application"


@pytest.fixture
async def scanning(tmp_path: Path, clamd: Clamd) -> AsyncIterator[Running]:
    box = await build_sandbox(tmp_path, clamd_socket=clamd.socket)
    running = await start_gateway(box)
    try:
        yield running
    finally:
        await running.shutdown()
        await box.stop_simulators()


def scans(gateway: Running, result: str) -> float:
    labels = {"channel": CHANNEL, "result": result}
    return gateway.metrics.registry.get_sample_value("gateway_scans_total", labels) or 0.0


def records(gateway: Running) -> list[Path]:
    config = gateway.sandbox.config
    assert config is not None
    return list((config.spool.directory / "records").iterdir())


@pytest.mark.parametrize(
    ("payload", "signature"),
    [(EICAR, "Gateway.Test.EICAR.UNOFFICIAL"), (MARKER, "Gateway.Test.Marker.UNOFFICIAL")],
)
async def test_an_infected_photo_is_422_naming_part_and_signature_and_nothing_is_kept(
    scanning: Running, payload: bytes, signature: str
) -> None:
    fields, files = sample_submission(CHANNEL)
    infected = {"face_photo": photo_with(payload, files["face_photo"])}
    async with scanning.client() as client:
        reply = await client.submit(CHANNEL, fields, infected)
    assert reply.status == 422
    assert reply.body["type"].endswith("/malware-detected")
    assert reply.body["detail"].startswith(f"face_photo: malware detected ({signature})")
    assert records(scanning) == []
    assert scanning.sandbox.simulators["dnp-relay"].received == []
    assert scans(scanning, "infected") == 1 and scans(scanning, "clean") == 0


async def test_a_clean_photo_is_scanned_and_accepted(scanning: Running) -> None:
    fields, files = sample_submission(CHANNEL)
    async with scanning.client() as client:
        reply = await client.submit(CHANNEL, fields, files)
    assert reply.status == 202
    assert scans(scanning, "clean") == 1


async def test_the_photo_streams_to_clamd_while_it_arrives(tmp_path: Path, clamd: Clamd) -> None:
    """A relay between the gateway and clamd counts what clamd has received: it has
    bytes of the photo before the device has sent the rest of its body."""
    relayed = 0
    got_some = asyncio.Event()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal relayed
        up_reader, up_writer = await asyncio.open_unix_connection(clamd.socket)

        async def upstream() -> None:
            nonlocal relayed
            while data := await reader.read(65536):
                relayed += len(data)
                if relayed > 100_000:
                    got_some.set()
                up_writer.write(data)
                await up_writer.drain()

        async def downstream() -> None:
            while data := await up_reader.read(4096):
                writer.write(data)
                await writer.drain()
            writer.close()

        try:
            await asyncio.gather(upstream(), downstream())
        finally:
            up_writer.close()
            writer.close()

    socket = tmp_path / "relay.sock"
    server = await asyncio.start_unix_server(relay, socket)
    box = await build_sandbox(tmp_path / "box", clamd_socket=socket)
    gateway = await start_gateway(box)
    try:
        fields, files = sample_submission(CHANNEL)
        body, content_type = multipart_body(fields, files)
        half = len(body) // 2

        async def slow_body() -> AsyncIterator[bytes]:
            yield body[:half]
            async with asyncio.timeout(10):
                await got_some.wait()  # clamd has photo bytes; the rest is still here
            yield body[half:]

        async with gateway.client() as client:
            url = f"{client.base}/v1/channels/{CHANNEL}/submissions"
            headers = {"Authorization": client.authorization, "Content-Type": content_type}
            async with client.session.post(url, data=slow_body(), headers=headers) as response:
                assert response.status == 202
        assert got_some.is_set()
    finally:
        await gateway.shutdown()
        await box.stop_simulators()
        server.close()


async def test_no_clamd_is_503_with_retry_after_and_counted(tmp_path: Path) -> None:
    box = await build_sandbox(tmp_path, clamd_socket=tmp_path / "nobody-here.sock")
    gateway = await start_gateway(box)
    try:
        fields, files = sample_submission(CHANNEL)
        async with gateway.client() as client:
            reply = await client.submit(CHANNEL, fields, files)
        assert reply.status == 503
        assert reply.body["type"].endswith("/scanner-unavailable")
        assert reply.headers["Retry-After"] == "30"
        assert records(gateway) == []
        assert scans(gateway, "unavailable") == 1
    finally:
        await gateway.shutdown()
        await box.stop_simulators()


async def test_a_clamd_that_gives_no_verdict_in_time_is_503(tmp_path: Path) -> None:
    """A scanner that takes the stream but never answers: refused once the timeout
    passes (0.3 s here), never let through."""
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        while await reader.read(65536):
            pass

    socket = tmp_path / "silent.sock"
    server = await asyncio.start_unix_server(silent, socket)
    box = await build_sandbox(
        tmp_path / "box",
        clamd_socket=socket,
        overrides={"scanner.timeout_seconds": 0.3},
    )
    gateway = await start_gateway(box)
    try:
        fields, files = sample_submission(CHANNEL)
        async with gateway.client() as client:
            reply = await client.submit(CHANNEL, fields, files)
        assert reply.status == 503 and reply.headers["Retry-After"]
        assert reply.body["type"].endswith("/scanner-unavailable")
        assert records(gateway) == []
    finally:
        await gateway.shutdown()
        await box.stop_simulators()
        for writer in held:
            writer.close()
        server.close()


SHIPPED = Path(__file__).resolve().parents[2] / "conf" / "gateway.toml"


def refusal(tmp_path: Path, old: str, new: str, about: str) -> str:
    """The problem check-config finds, naming ``about``, in the shipped config edited."""
    text = SHIPPED.read_text("utf-8")
    assert old in text
    path = tmp_path / "gateway.toml"
    path.write_text(text.replace(old, new), "utf-8")
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    return str(next(p for p in refused.value.problems if about in str(p)))


def test_check_config_refuses_scan_on_the_opaque_batch_file_and_says_why(
    tmp_path: Path,
) -> None:
    problem = refusal(
        tmp_path,
        "[channels.card-delegation-batch.fields]",
        "scan = true\n[channels.card-delegation-batch.fields]",
        "card-delegation-batch",
    )
    assert "already encrypted" in problem and "ciphertext" in problem


def test_check_config_refuses_scan_without_a_file_part_or_without_a_scanner(
    tmp_path: Path,
) -> None:
    problem = refusal(
        tmp_path,
        "[channels.window-reception.fields]",
        "scan = true\n[channels.window-reception.fields]",
        "window-reception",
    )
    assert "no file part to scan" in problem
    section = SHIPPED.read_text("utf-8").split("[scanner]", 1)[1].split("\n\n", 1)[0]
    problem = refusal(tmp_path, "[scanner]" + section, "", "scanner: channels online-application")
    assert "configure [scanner] clamd_socket" in problem
