"""A ward device as the tests, the demo and the bench use it: HTTPS with its own client
certificate, a staff login in HTTP Basic, multipart posts and status reads."""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from gateway.crypto.pki import PkiLayout
from gateway.crypto.tls import client_context
from gateway.identity.auth import basic_authorization
from gateway.testing.samples import encode_form
from gateway.testing.sandbox import STAFF, Sandbox


@dataclass
class Reply:
    status: int
    body: dict[str, Any]
    headers: Mapping[str, str]


class DeviceClient:
    """A ward device: its own client certificate, a staff login, multipart posts."""

    def __init__(
        self,
        sandbox: Sandbox | PkiLayout,
        device_id: str,
        *,
        port: int,
        host: str = "localhost",
        user: str = "staff-001",
        password: str | None = None,
        limit: int = 100,
        trace_configs: list[aiohttp.TraceConfig] | None = None,
    ) -> None:
        pki = sandbox.pki if isinstance(sandbox, Sandbox) else sandbox
        device = pki.devices[device_id]
        context = client_context(ca=pki.gateway_ca.cert, cert=device.cert, key=device.key)
        # A listener on another loopback address is still "localhost" to its certificate.
        self.base = f"https://{host}:{port}"
        self.server_hostname = None if host == "localhost" else "localhost"
        self.authorization = basic_authorization(
            user, STAFF.get(user, "") if password is None else password
        )
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=context, limit=limit), trace_configs=trace_configs
        )

    async def close(self) -> None:
        await self.session.close()

    async def __aenter__(self) -> DeviceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _headers(self, extra: Mapping[str, str] | None) -> dict[str, str]:
        return {"Authorization": self.authorization, **(extra or {})}

    async def submit(
        self,
        channel: str,
        fields: Mapping[str, str],
        files: Mapping[str, bytes] | None = None,
        *,
        idempotency_key: str | None = None,
        headers: Mapping[str, str] | None = None,
        data: Any = None,
    ) -> Reply:
        extra = dict(headers or {})
        if idempotency_key:
            extra["Idempotency-Key"] = idempotency_key
        body = data if data is not None else encode_form(fields, files or {})
        async with self.session.post(
            f"{self.base}/v1/channels/{channel}/submissions",
            data=body,
            headers=self._headers(extra),
            server_hostname=self.server_hostname,
        ) as response:
            return Reply(response.status, await _json(response), dict(response.headers))

    async def post_raw(
        self, channel: str, body: bytes, content_type: str, headers: Mapping[str, str] | None = None
    ) -> int:
        """Post a prepared body; returns the status only (for load generation)."""
        extra = {"Content-Type": content_type, **(headers or {})}
        async with self.session.post(
            f"{self.base}/v1/channels/{channel}/submissions",
            data=body,
            headers=self._headers(extra),
            server_hostname=self.server_hostname,
        ) as response:
            await response.read()
            return response.status

    async def status(self, submission_id: str) -> Reply:
        async with self.session.get(
            f"{self.base}/v1/submissions/{submission_id}",
            headers=self._headers(None),
            server_hostname=self.server_hostname,
        ) as response:
            return Reply(response.status, await _json(response), dict(response.headers))


async def _json(response: aiohttp.ClientResponse) -> dict[str, Any]:
    text = await response.text()
    try:
        doc = json.loads(text)
    except ValueError:
        return {"_text": text}
    return doc if isinstance(doc, dict) else {"_value": doc}


@dataclass
class OneShot:
    """What a post on a connection of its own gave: the status, the JSON answer, whether
    the TLS session was resumed, and the session to resume next time."""

    status: int
    body: dict[str, Any]
    resumed: bool
    session: ssl.SSLSession | None


def post_on_new_connection(
    port: int,
    context: ssl.SSLContext,
    channel: str,
    body: bytes,
    content_type: str,
    *,
    session: ssl.SSLSession | None = None,
    user: str = "staff-001",
) -> OneShot:
    """A device that connects for one upload and hangs up (blocking; run it on a thread):
    a full handshake, or a resumed one when ``session`` is given."""
    head = (
        f"POST /v1/channels/{channel}/submissions HTTP/1.1\r\nHost: localhost\r\n"
        f"Authorization: {basic_authorization(user, STAFF.get(user, ''))}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    with (
        socket.create_connection(("127.0.0.1", port), timeout=60) as raw,
        context.wrap_socket(raw, server_hostname="localhost", session=session) as tls,
    ):
        tls.sendall(head.encode() + body)
        answer = bytearray()
        while chunk := tls.recv(65536):
            answer += chunk
        resumed, next_session = bool(tls.session_reused), tls.session
    status_line, _, rest = bytes(answer).partition(b"\r\n")
    payload = rest.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in rest else b"{}"
    try:
        doc = json.loads(payload)
    except ValueError:
        doc = {}
    return OneShot(int(status_line.split()[1]), doc, resumed, next_session)
