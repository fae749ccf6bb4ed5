"""Development PKI: files, modes, chains, extensions, manifest round-trip."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.crypto.certs import Issued, cert_fingerprint, load_cert_der, spki_sha256_b64
from gateway.crypto.pki import PkiExistsError, PkiLayout, init_pki, issue_device, load_layout
from gateway.errors import GatewayError

NOW = datetime(2025, 4, 1, 9, 0, tzinfo=UTC)


@pytest.fixture
def layout(tmp_path: Path) -> PkiLayout:
    return init_pki(
        tmp_path / "pki",
        devices=("tablet-01", "pc-02"),
        upstreams=("jlis", "contractor"),
        hostnames=("localhost", "gw.example.test"),
        now=NOW,
    )


def _cert(issued: Issued) -> x509.Certificate:
    return x509.load_pem_x509_certificate(issued.cert.read_bytes())


def _all(layout: PkiLayout) -> list[Issued]:
    return [
        layout.device_ca,
        layout.gateway_ca,
        layout.upstream_ca,
        layout.gateway_server,
        layout.gateway_client,
        *layout.clients.values(),
        *layout.upstreams.values(),
        *layout.devices.values(),
    ]


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, InvalidSignature):  # issuer name mismatch / bad signature
        return False
    return True


def _eku(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def _sans(cert: x509.Certificate) -> set[object]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {*san.get_values_for_type(x509.DNSName), *san.get_values_for_type(x509.IPAddress)}


def test_files_have_expected_names_and_modes(layout: PkiLayout) -> None:
    """Every name gets DIR/<name>.pem (0644) and DIR/<name>.key (0600) and nothing is left over."""
    names = {i.name for i in _all(layout)}
    assert names == {
        "device-ca",
        "gateway-ca",
        "upstream-ca",
        "gateway-server",
        "gateway-client",
        "upstream-jlis",
        "upstream-contractor",
        "client-jlis",
        "client-contractor",
        "device-tablet-01",
        "device-pc-02",
    }
    for issued in _all(layout):
        assert issued.cert == layout.dir / f"{issued.name}.pem"
        assert issued.key == layout.dir / f"{issued.name}.key"
        assert stat.S_IMODE(issued.key.stat().st_mode) == 0o600
        assert stat.S_IMODE(issued.cert.stat().st_mode) == 0o644
    expected = {f"{n}{s}" for n in names for s in (".pem", ".key")} | {"pki.json"}
    assert {p.name for p in layout.dir.iterdir()} == expected  # no temp files left


def test_keys_are_unencrypted_pkcs8_p256(layout: PkiLayout) -> None:
    """Keys are unencrypted PKCS#8 PEM P-256 keys matching their certificates."""
    for issued in _all(layout):
        pem = issued.key.read_bytes()
        assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
        key = serialization.load_pem_private_key(pem, password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert isinstance(key.curve, ec.SECP256R1)
        assert key.public_key() == _cert(issued).public_key()


def test_certificates_chain_to_the_right_ca(layout: PkiLayout) -> None:
    """Device certs chain to the device CA, gateway certs to the gateway CA, upstreams to theirs."""
    device_ca, gateway_ca, upstream_ca = (
        _cert(layout.device_ca),
        _cert(layout.gateway_ca),
        _cert(layout.upstream_ca),
    )
    cas = {"device": device_ca, "gateway": gateway_ca, "upstream": upstream_ca}
    expected = {
        **{d.name: "device" for d in layout.devices.values()},
        layout.gateway_server.name: "gateway",
        layout.gateway_client.name: "gateway",
        **{u.name: "upstream" for u in layout.upstreams.values()},
    }
    leaves = [*layout.devices.values(), layout.gateway_server, layout.gateway_client]
    for issued in [*leaves, *layout.upstreams.values()]:
        cert = _cert(issued)
        assert cert.signature_hash_algorithm is not None
        assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
        for kind, ca in cas.items():
            assert _signed_by(cert, ca) is (kind == expected[issued.name]), issued.name
    for ca in cas.values():
        assert _signed_by(ca, ca)  # self-signed roots


def test_ca_extensions(layout: PkiLayout) -> None:
    """CAs: critical BasicConstraints(ca, pathlen 0), keyCertSign+cRLSign, SKI, 10 years."""
    for issued in (layout.device_ca, layout.gateway_ca, layout.upstream_ca):
        cert = _cert(issued)
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        assert bc.critical and bc.value.ca and bc.value.path_length == 0
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
        assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
        assert not ku.value.digital_signature
        cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        assert cert.not_valid_before_utc == NOW - timedelta(minutes=5)
        assert cert.not_valid_after_utc == NOW + timedelta(days=3650)


def test_leaf_extensions_ekus_and_sans(layout: PkiLayout) -> None:
    """Leaves: not CA, digitalSignature, right EKU, AKI = CA's SKI, SANs and lifetimes."""
    loopback = {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}
    server = _cert(layout.gateway_server)
    assert _eku(server) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert _sans(server) == {"localhost", "gw.example.test", *loopback}
    assert server.not_valid_after_utc == NOW + timedelta(days=397)

    client = _cert(layout.gateway_client)
    assert _eku(client) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "gateway"
    assert client.not_valid_after_utc == NOW + timedelta(days=825)

    for upstream in layout.upstreams.values():
        cert = _cert(upstream)
        assert _eku(cert) == [ExtendedKeyUsageOID.SERVER_AUTH]
        assert _sans(cert) == {"localhost", *loopback}
        assert cert.not_valid_after_utc == NOW + timedelta(days=397)

    for device_id, device in layout.devices.items():
        cert = _cert(device)
        assert _eku(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == device_id
        assert cert.not_valid_after_utc == NOW + timedelta(days=825)

    issuers = [
        (layout.gateway_server, layout.gateway_ca),
        (layout.gateway_client, layout.gateway_ca),
        *((u, layout.upstream_ca) for u in layout.upstreams.values()),
        *((d, layout.device_ca) for d in layout.devices.values()),
    ]
    for leaf, ca in issuers:
        cert = _cert(leaf)
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        assert not bc.ca
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        assert ku.digital_signature and not ku.key_cert_sign
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        ca_ski = _cert(ca).extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        assert aki.key_identifier == ca_ski.digest
        cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        assert cert.not_valid_before_utc == NOW - timedelta(minutes=5)


def test_serials_are_random_and_distinct(layout: PkiLayout) -> None:
    """Every certificate has a distinct large random serial number."""
    serials = [_cert(i).serial_number for i in _all(layout)]
    assert len(set(serials)) == len(serials)
    assert all(s > 2**64 for s in serials)


def test_fingerprints_and_pins(layout: PkiLayout) -> None:
    """Fingerprint is sha256: + hex over the DER; the SPKI pin is base64 SHA-256 of the SPKI."""
    for issued in _all(layout):
        der = load_cert_der(issued.cert)
        cert = x509.load_der_x509_certificate(der)
        assert der == cert.public_bytes(serialization.Encoding.DER)
        assert issued.fingerprint == cert_fingerprint(der)
        assert issued.fingerprint == "sha256:" + hashlib.sha256(der).hexdigest()
        spki = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        pin = spki_sha256_b64(der)
        assert base64.b64decode(pin, validate=True) == hashlib.sha256(spki).digest()
        assert len(pin) == 44 and pin.endswith("=")


def test_load_cert_der_returns_first_certificate(tmp_path: Path, layout: PkiLayout) -> None:
    """load_cert_der on a bundle returns the DER of the first certificate only."""
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(
        layout.gateway_server.cert.read_bytes() + layout.gateway_ca.cert.read_bytes()
    )
    assert cert_fingerprint(load_cert_der(bundle)) == layout.gateway_server.fingerprint


def test_load_cert_der_errors_name_the_file(tmp_path: Path, layout: PkiLayout) -> None:
    """A missing file or a key instead of a certificate is a GatewayError naming the file."""
    with pytest.raises(GatewayError, match=r"missing\.pem"):
        load_cert_der(tmp_path / "missing.pem")
    with pytest.raises(GatewayError, match=r"tablet-01\.key") as info:
        load_cert_der(layout.devices["tablet-01"].key)
    assert "PRIVATE KEY" not in str(info.value)


def test_load_layout_round_trip(layout: PkiLayout) -> None:
    """load_layout re-reads the directory into an equal layout, driven by pki.json names."""
    assert load_layout(layout.dir) == layout
    doc = json.loads((layout.dir / "pki.json").read_text())
    assert sorted(doc["devices"]) == ["pc-02", "tablet-01"]
    assert sorted(doc["upstreams"]) == ["contractor", "jlis"]


def test_load_layout_requires_manifest(tmp_path: Path) -> None:
    """A directory without pki.json is refused with a GatewayError."""
    with pytest.raises(GatewayError, match=r"pki\.json"):
        load_layout(tmp_path)


def test_issue_device_adds_a_device(layout: PkiLayout) -> None:
    """issue_device signs a new device cert with the existing device CA and records it."""
    issued = issue_device(layout.dir, "kiosk-7", now=NOW)
    assert issued.name == "device-kiosk-7"
    assert stat.S_IMODE(issued.key.stat().st_mode) == 0o600
    cert = _cert(issued)
    assert _signed_by(cert, _cert(layout.device_ca))
    assert _eku(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "kiosk-7"
    reloaded = load_layout(layout.dir)
    assert reloaded.devices["kiosk-7"] == issued
    assert reloaded.device_ca == layout.device_ca  # the CA was not replaced
    assert set(reloaded.devices) == {"tablet-01", "pc-02", "kiosk-7"}


def test_issue_device_refuses_duplicate(layout: PkiLayout) -> None:
    """Issuing an already issued device id is refused and leaves its cert untouched."""
    before = layout.devices["tablet-01"].cert.read_bytes()
    with pytest.raises(PkiExistsError):
        issue_device(layout.dir, "tablet-01")
    assert layout.devices["tablet-01"].cert.read_bytes() == before


@pytest.mark.parametrize(
    "bad", ["", "Tablet", "-lead", ".lead", "a/b", "../x", "a b", "x" * 64, "é", "a\n"]
)
def test_invalid_device_id_rejected(tmp_path: Path, bad: str) -> None:
    """Device ids and upstream names outside ^[a-z0-9][a-z0-9._-]{0,62}$ raise ValueError."""
    with pytest.raises(ValueError, match=r"\^\[a-z0-9\]"):
        init_pki(tmp_path / "a", devices=(bad,))
    with pytest.raises(ValueError, match=r"\^\[a-z0-9\]"):
        init_pki(tmp_path / "b", upstreams=(bad,))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_issue_device_rejects_invalid_id(layout: PkiLayout) -> None:
    """issue_device validates the id before touching the directory."""
    with pytest.raises(ValueError, match="device id"):
        issue_device(layout.dir, "../evil")
    assert load_layout(layout.dir) == layout


def test_longest_valid_id_accepted(tmp_path: Path) -> None:
    """A 63-character id with dots, dashes and underscores is valid."""
    name = "a" + "._-9" * 15 + "zz"
    assert len(name) == 63
    assert set(init_pki(tmp_path, devices=(name,)).devices) == {name}


def test_reinit_refused_without_overwrite(layout: PkiLayout) -> None:
    """A second init_pki on the same directory is refused and changes nothing."""
    before = layout.device_ca.cert.read_bytes()
    with pytest.raises(PkiExistsError) as info:
        init_pki(layout.dir)
    assert isinstance(info.value, GatewayError) and isinstance(info.value, FileExistsError)
    assert layout.device_ca.cert.read_bytes() == before
    assert load_layout(layout.dir) == layout


def test_reinit_with_overwrite_replaces_everything(layout: PkiLayout) -> None:
    """overwrite=True issues new CAs and drops certs of devices no longer listed."""
    new = init_pki(layout.dir, devices=("tablet-01",), overwrite=True)
    assert new.device_ca.fingerprint != layout.device_ca.fingerprint
    assert set(new.devices) == {"tablet-01"}
    assert not layout.devices["pc-02"].cert.exists()
    assert not layout.devices["pc-02"].key.exists()
    assert load_layout(layout.dir) == new


def test_defaults_and_naive_now(tmp_path: Path) -> None:
    """Defaults give tablet-01 and one 'upstream'; a naive datetime for now is refused."""
    layout = init_pki(tmp_path / "d")
    assert set(layout.devices) == {"tablet-01"}
    assert set(layout.upstreams) == {"upstream"}
    cert = _cert(layout.devices["tablet-01"])
    assert abs(cert.not_valid_before_utc - (datetime.now(UTC) - timedelta(minutes=5))) < timedelta(
        minutes=1
    )
    with pytest.raises(ValueError, match="timezone"):
        init_pki(tmp_path / "n", now=datetime(2025, 1, 1))
