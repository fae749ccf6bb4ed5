"""TLS context factories, proven by real handshakes over loopback asyncio streams."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import warnings
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest
from cryptography import x509

from gateway.crypto.certs import cert_fingerprint, load_cert_der
from gateway.crypto.pki import PkiLayout, init_pki
from gateway.crypto.tls import (
    INTERMEDIATE_CIPHERS,
    TlsConfigError,
    cert_not_after,
    client_context,
    peer_cert_der,
    server_context,
)
from gateway.errors import GatewayError

GREETING = b"hello\n"
TIMEOUT = 10.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiLayout:
    return init_pki(tmp_path_factory.mktemp("pki"), devices=("tablet-01",), upstreams=("jlis",))


@dataclass
class Listener:
    port: int
    peers: list[bytes | None] = field(default_factory=list)


@contextlib.asynccontextmanager
async def serve(ctx: ssl.SSLContext) -> AsyncIterator[Listener]:
    """A TLS echo-less server: records the peer cert, greets, closes; torn down cleanly."""
    handlers: set[asyncio.Task[None]] = set()
    listener = Listener(port=0)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        listener.peers.append(peer_cert_der(writer.get_extra_info("ssl_object")))
        try:
            writer.write(GREETING)
            await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    listener.port = server.sockets[0].getsockname()[1]
    try:
        yield listener
    finally:
        server.close()
        await server.wait_closed()
        async with asyncio.timeout(TIMEOUT):
            await asyncio.gather(*handlers, return_exceptions=True)


@dataclass
class Outcome:
    data: bytes = b""
    cipher: tuple[str, str, int] | None = None
    error: BaseException | None = None

    @property
    def accepted(self) -> bool:
        return self.error is None and self.data == GREETING

    @property
    def refused(self) -> bool:
        """No greeting: the handshake failed (asyncio's server aborts the socket, so the
        client sees an SSL alert, a reset, or - TLS 1.3 client auth - EOF after its own
        handshake had already completed)."""
        return self.data == b"" and (
            self.error is None or isinstance(self.error, ssl.SSLError | ConnectionError)
        )


async def attempt(ctx: ssl.SSLContext, port: int, hostname: str = "localhost") -> Outcome:
    """Connect, read the greeting to EOF, close; any failure is captured, not raised."""
    out = Outcome()
    try:
        async with asyncio.timeout(TIMEOUT):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=ctx, server_hostname=hostname
            )
            try:
                out.cipher = writer.get_extra_info("cipher")
                out.data = await reader.read()
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (OSError, EOFError) as exc:  # ssl.SSLError is an OSError
        out.error = exc
    return out


def device_server(pki: PkiLayout, profile: str = "intermediate") -> ssl.SSLContext:
    assert profile in ("intermediate", "modern")
    return server_context(
        pki.gateway_server.cert,
        pki.gateway_server.key,
        client_ca=pki.device_ca.cert,
        profile="modern" if profile == "modern" else "intermediate",
    )


def device_client(pki: PkiLayout) -> ssl.SSLContext:
    device = pki.devices["tablet-01"]
    return client_context(ca=pki.gateway_ca.cert, cert=device.cert, key=device.key)


def legacy_client(pki: PkiLayout, *, maximum: ssl.TLSVersion, ciphers: str) -> ssl.SSLContext:
    """A deliberately weak client, built by hand (not by the factory under test)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSv1/TLSv1_1 are deprecated
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = maximum
    ctx.set_ciphers(ciphers)
    ctx.load_verify_locations(pki.gateway_ca.cert)
    device = pki.devices["tablet-01"]
    ctx.load_cert_chain(device.cert, device.key)
    return ctx


async def test_device_cert_accepted_and_fingerprint_seen(pki: PkiLayout) -> None:
    """A device cert from the device CA is accepted; the server sees its DER and fingerprint."""
    async with serve(device_server(pki)) as listener:
        out = await attempt(device_client(pki), listener.port)
    assert out.accepted, out.error
    assert out.cipher is not None and out.cipher[1] == "TLSv1.3"
    assert len(listener.peers) == 1
    der = listener.peers[0]
    assert der == load_cert_der(pki.devices["tablet-01"].cert)
    assert cert_fingerprint(der) == pki.devices["tablet-01"].fingerprint


async def test_certs_pass_x509_strict_verification(pki: PkiLayout) -> None:
    """Our PKI satisfies VERIFY_X509_STRICT (the default of newer Pythons) on both sides."""
    server = device_server(pki)
    server.verify_flags |= ssl.VERIFY_X509_STRICT
    client = device_client(pki)
    client.verify_flags |= ssl.VERIFY_X509_STRICT
    async with serve(server) as listener:
        out = await attempt(client, listener.port)
    assert out.accepted, out.error


async def test_gateway_client_to_upstream_mutual_tls(pki: PkiLayout) -> None:
    """Egress: the gateway client cert is accepted by an upstream trusting the gateway CA."""
    upstream = pki.upstreams["jlis"]
    server = server_context(upstream.cert, upstream.key, client_ca=pki.gateway_ca.cert)
    client = client_context(
        ca=pki.upstream_ca.cert, cert=pki.gateway_client.cert, key=pki.gateway_client.key
    )
    async with serve(server) as listener:
        out = await attempt(client, listener.port, hostname="127.0.0.1")
    assert out.accepted, out.error
    assert listener.peers == [load_cert_der(pki.gateway_client.cert)]


async def test_no_client_cert_refused(pki: PkiLayout) -> None:
    """Without a client certificate the handshake fails and the handler never runs."""
    async with serve(device_server(pki)) as listener:
        out = await attempt(client_context(ca=pki.gateway_ca.cert), listener.port)
    assert out.refused, out
    assert listener.peers == []


async def test_client_cert_from_other_ca_refused(pki: PkiLayout) -> None:
    """A client cert signed by the gateway CA is refused by a listener trusting the device CA."""
    client = client_context(
        ca=pki.gateway_ca.cert, cert=pki.gateway_client.cert, key=pki.gateway_client.key
    )
    async with serve(device_server(pki)) as listener:
        out = await attempt(client, listener.port)
    assert out.refused, out
    assert listener.peers == []


async def test_client_refuses_server_from_other_ca(pki: PkiLayout) -> None:
    """A client trusting the gateway CA refuses an upstream server cert from the upstream CA."""
    upstream = pki.upstreams["jlis"]
    server = server_context(upstream.cert, upstream.key, client_ca=pki.device_ca.cert)
    async with serve(server) as listener:
        out = await attempt(device_client(pki), listener.port)
    assert isinstance(out.error, ssl.SSLCertVerificationError), out.error
    assert listener.peers == []


async def test_client_refuses_wrong_hostname(pki: PkiLayout) -> None:
    """The client checks the hostname: a name not in the server cert's SANs is refused."""
    async with serve(device_server(pki)) as listener:
        out = await attempt(device_client(pki), listener.port, hostname="gw.example.test")
    assert isinstance(out.error, ssl.SSLCertVerificationError), out.error
    assert "hostname" in str(out.error).lower()


async def test_tls11_client_refused(pki: PkiLayout) -> None:
    """A client limited to TLS 1.1 cannot connect; the server minimum is TLS 1.2."""
    server = device_server(pki)
    assert server.minimum_version == ssl.TLSVersion.TLSv1_2
    client = legacy_client(pki, maximum=ssl.TLSVersion.TLSv1_1, ciphers="ALL:@SECLEVEL=0")
    async with serve(server) as listener:
        out = await attempt(client, listener.port)
    assert out.refused, out
    assert listener.peers == []


async def test_tls12_client_gets_ecdhe_aead(pki: PkiLayout) -> None:
    """A TLS 1.2-only client negotiates an ECDHE AEAD suite from the intermediate list."""
    client = device_client(pki)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    client.set_ciphers("ALL")  # offer everything; the server must choose an allowed suite
    async with serve(device_server(pki)) as listener:
        out = await attempt(client, listener.port)
    assert out.accepted, out.error
    assert out.cipher is not None
    name, version, _bits = out.cipher
    assert version == "TLSv1.2"
    assert name in INTERMEDIATE_CIPHERS.split(":")
    assert name.startswith("ECDHE-") and ("GCM" in name or "CHACHA20" in name)


@pytest.mark.parametrize("suite", ["ECDHE-ECDSA-AES128-SHA256", "ECDHE-ECDSA-AES256-SHA"])
async def test_tls12_cbc_suites_refused(pki: PkiLayout, suite: str) -> None:
    """A TLS 1.2 client offering only a non-AEAD (CBC) ECDHE suite is refused."""
    # Static-RSA/DHE suites cannot be tested here: the ECDSA server cert excludes them anyway.
    client = legacy_client(pki, maximum=ssl.TLSVersion.TLSv1_2, ciphers=suite)
    async with serve(device_server(pki)) as listener:
        out = await attempt(client, listener.port)
    assert out.refused, out
    assert listener.peers == []


async def test_modern_profile_refuses_tls12(pki: PkiLayout) -> None:
    """The modern profile is TLS 1.3 only: a TLS 1.2 client fails, a TLS 1.3 client works."""
    server = device_server(pki, "modern")
    assert server.minimum_version == ssl.TLSVersion.TLSv1_3
    old = device_client(pki)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    async with serve(server) as listener:
        refused = await attempt(old, listener.port)
        accepted = await attempt(device_client(pki), listener.port)
    assert refused.refused, refused
    assert accepted.accepted, accepted.error
    assert len(listener.peers) == 1


async def test_server_without_client_ca_needs_no_client_cert(pki: PkiLayout) -> None:
    """client_ca=None means CERT_NONE: no client cert needed and peer_cert_der gives None."""
    server = server_context(pki.gateway_server.cert, pki.gateway_server.key, client_ca=None)
    assert server.verify_mode == ssl.CERT_NONE
    async with serve(server) as listener:
        out = await attempt(client_context(ca=pki.gateway_ca.cert), listener.port)
    assert out.accepted, out.error
    assert listener.peers == [None]


def test_context_settings(pki: PkiLayout) -> None:
    """Both contexts: TLS 1.2+, ECDHE+AEAD only, no compression/renegotiation, own CA only."""
    server = device_server(pki)
    client = device_client(pki)
    assert server.verify_mode == ssl.CERT_REQUIRED
    assert client.verify_mode == ssl.CERT_REQUIRED and client.check_hostname
    for ctx in (server, client):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
        assert ctx.options & ssl.OP_NO_COMPRESSION
        assert ctx.options & ssl.OP_NO_RENEGOTIATION
        assert not ctx.options & ssl.OP_CIPHER_SERVER_PREFERENCE
        tls12 = [c for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
        assert {c["name"] for c in tls12} == set(INTERMEDIATE_CIPHERS.split(":"))
        assert all(c["kea"] == "kx-ecdhe" and c["aead"] for c in tls12)
        assert ctx.cert_store_stats()["x509_ca"] == 1  # no system default CAs
    modern = client_context(ca=pki.gateway_ca.cert, profile="modern")
    assert modern.minimum_version == ssl.TLSVersion.TLSv1_3


def test_missing_files_name_the_file(pki: PkiLayout, tmp_path: Path) -> None:
    """A missing cert, key or CA file is a TlsConfigError (a GatewayError) naming that file."""
    missing = tmp_path / "nope.pem"
    key = pki.gateway_server.key
    with pytest.raises(TlsConfigError, match="nope"):
        server_context(missing, key, client_ca=None)
    with pytest.raises(TlsConfigError, match="nope"):
        server_context(pki.gateway_server.cert, missing, client_ca=None)
    with pytest.raises(TlsConfigError, match="nope"):
        server_context(pki.gateway_server.cert, key, client_ca=missing)
    with pytest.raises(GatewayError, match="nope"):
        client_context(ca=missing)
    with pytest.raises(TlsConfigError, match="nope"):
        cert_not_after(missing)


def test_invalid_files_never_leak_key_material(pki: PkiLayout) -> None:
    """Mismatched or misplaced keys are refused; messages name files, never key contents."""
    device = pki.devices["tablet-01"]
    key_lines = [ln for ln in device.key.read_text().splitlines() if "-----" not in ln]
    cases: list[Callable[[], object]] = [
        lambda: server_context(device.cert, pki.gateway_server.key, client_ca=None),
        lambda: server_context(device.key, device.key, client_ca=None),
        lambda: client_context(ca=device.key),
        lambda: client_context(ca=pki.gateway_ca.cert, cert=device.cert, key=device.cert),
        lambda: cert_not_after(device.key),
    ]
    for make in cases:
        with pytest.raises(TlsConfigError) as info:
            make()
        message = str(info.value)
        assert str(pki.dir) in message
        assert "PRIVATE KEY" not in message
        assert not any(line in message for line in key_lines)


def test_client_cert_requires_key(pki: PkiLayout) -> None:
    """A client certificate without its key (or vice versa) is a configuration error."""
    with pytest.raises(TlsConfigError):
        client_context(ca=pki.gateway_ca.cert, cert=pki.gateway_client.cert)
    with pytest.raises(TlsConfigError):
        client_context(ca=pki.gateway_ca.cert, key=pki.gateway_client.key)


def test_peer_cert_der_none() -> None:
    """peer_cert_der(None) (a plain TCP connection) is None."""
    assert peer_cert_der(None) is None


def test_cert_not_after_matches_certificate(pki: PkiLayout) -> None:
    """cert_not_after returns the timezone-aware notAfter of the certificate."""
    path = pki.gateway_server.cert
    expected = x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc
    got = cert_not_after(path)
    assert got == expected
    assert isinstance(got, datetime) and got.utcoffset() is not None


# ------------------------------------------------------------ key exchange groups
# On TLS 1.2 the client's supported groups also say which curves ECDSA certificates may
# use, on both sides, so a 1.2 client offering only X25519 cannot complete a handshake
# with P-256 certificates whatever the server allows. The TLS 1.2 cases therefore use an
# RSA server certificate (ECDHE-RSA suites) and no client certificate, so that the
# group offered is the key exchange alone.


@pytest.fixture(scope="module")
def rsa_server(pki: PkiLayout, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An RSA-2048 server certificate for localhost, issued by the gateway CA."""
    from datetime import UTC, timedelta

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    ca_cert = x509.load_pem_x509_certificate(pki.gateway_ca.cert.read_bytes())
    ca_key = serialization.load_pem_private_key(pki.gateway_ca.key.read_bytes(), None)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rsa-server")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    directory = tmp_path_factory.mktemp("rsa")
    cert_path, key_path = directory / "server.pem", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def group_server(
    pki: PkiLayout, rsa_server: tuple[Path, Path], version: ssl.TLSVersion
) -> ssl.SSLContext:
    if version == ssl.TLSVersion.TLSv1_3:
        return device_server(pki)
    cert, key = rsa_server
    return server_context(cert, key, client_ca=None)


def client_offering(pki: PkiLayout, group: str, version: ssl.TLSVersion) -> ssl.SSLContext:
    """A device client built by hand that offers only ``group`` on exactly ``version``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ctx.maximum_version = version
    ctx.set_ecdh_curve(group)  # OpenSSL 3: the only group in supported_groups
    ctx.load_verify_locations(pki.gateway_ca.cert)
    if version == ssl.TLSVersion.TLSv1_3:
        device = pki.devices["tablet-01"]
        ctx.load_cert_chain(device.cert, device.key)
    return ctx


VERSIONS = [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2]


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.name)
@pytest.mark.parametrize("group", ["X448", "secp521r1"])
async def test_key_exchange_outside_intermediate_is_refused(
    pki: PkiLayout, rsa_server: tuple[Path, Path], group: str, version: ssl.TLSVersion
) -> None:
    """A client offering only X448, or only P-521, is refused, on TLS 1.3 as on 1.2."""
    async with serve(group_server(pki, rsa_server, version)) as listener:
        out = await attempt(client_offering(pki, group, version), listener.port)
    assert out.refused, out
    assert listener.peers == []


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.name)
@pytest.mark.parametrize("group", ["X25519", "prime256v1", "secp384r1"])
async def test_key_exchange_on_intermediate_groups_is_accepted(
    pki: PkiLayout, rsa_server: tuple[Path, Path], group: str, version: ssl.TLSVersion
) -> None:
    """X25519, P-256 and P-384 each complete the handshake, on TLS 1.3 and 1.2."""
    async with serve(group_server(pki, rsa_server, version)) as listener:
        out = await attempt(client_offering(pki, group, version), listener.port)
    assert out.accepted, out.error
    assert out.cipher is not None and out.cipher[1] == version.name.replace("_", ".")


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.name)
@pytest.mark.parametrize("group", ["X448", "secp521r1"])
async def test_without_the_limit_openssl_would_share_x448_and_p521(
    rsa_server: tuple[Path, Path], pki: PkiLayout, group: str, version: ssl.TLSVersion
) -> None:
    """The control: a bare OpenSSL context shares X448 and P-521, so the refusals above
    come from the gateway's policy, not from OpenSSL's defaults."""
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    bare.load_cert_chain(*rsa_server)
    async with serve(bare) as listener:
        out = await attempt(client_offering(pki, group, version), listener.port)
    assert out.accepted, out.error


async def test_gateway_client_offers_only_intermediate_groups(pki: PkiLayout) -> None:
    """Egress too: an upstream that accepts only P-521 gets no handshake from the gateway."""
    upstream = pki.upstreams["jlis"]
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(upstream.cert, upstream.key)
    server.set_ecdh_curve("secp521r1")
    client = client_context(
        ca=pki.upstream_ca.cert, cert=pki.gateway_client.cert, key=pki.gateway_client.key
    )
    async with serve(server) as listener:
        out = await attempt(client, listener.port, hostname="127.0.0.1")
    assert not out.accepted
    assert listener.peers == []


def test_unknown_group_list_is_an_error_at_start() -> None:
    """A group list OpenSSL does not know is refused loudly, never silently widened."""
    from gateway.crypto.tls import set_key_exchange_groups

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with pytest.raises(TlsConfigError, match="refused the key exchange groups"):
        set_key_exchange_groups(ctx, "X25519:no-such-group")
