"""Configuration loading: the shipped file, unknown keys, types, references, paths, secrets."""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from gateway.config import GatewayConfig, load_config, parse_config
from gateway.errors import ConfigError, ConfigProblem

SHIPPED = Path(__file__).resolve().parents[2] / "conf" / "gateway.toml"


def shipped_data() -> dict[str, Any]:
    with SHIPPED.open("rb") as handle:
        return tomllib.load(handle)


def write_config(directory: Path, data: dict[str, Any], name: str = "gateway.toml") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(tomli_w.dumps(data).encode())
    return path


def problems_of(path: Path) -> list[ConfigProblem]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.problems


def edited(edit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    data = copy.deepcopy(shipped_data())
    edit(data)
    return data


def by_key(problems: list[ConfigProblem]) -> dict[str, str]:
    return {p.key: p.message for p in problems}


# ------------------------------------------------------------------ shipped file


def test_shipped_config_parses() -> None:
    """conf/gateway.toml loads without error (paths and credential: refs are not checked)."""
    config = load_config(SHIPPED)
    assert isinstance(config, GatewayConfig)
    assert config.spool.master_key == "credential:spool-master.key"
    assert config.admin.host == "127.0.0.1"


def test_shipped_channels_reference_configured_destinations() -> None:
    """Every shipped channel's destination exists; office channels stay internal."""
    config = load_config(SHIPPED)
    for channel in config.channels.values():
        assert channel.destination in config.destinations
    assert config.channels["issuance-reservation"].destination == "ward-issuance"
    assert config.channels["window-reception"].destination == "ward-issuance"


def test_shipped_overseas_window() -> None:
    """The overseas channel has its 2026-05-26..2027-03-31 window (資料14)."""
    config = load_config(SHIPPED)
    overseas = config.channels["overseas-application"]
    assert (overseas.active_from, overseas.active_until) == (date(2026, 5, 26), date(2027, 3, 31))


def test_erase_on_delivery_is_refused_saying_why(tmp_path: Path) -> None:
    """A config that still sets erase_on_delivery (true or false) is refused: erasure at
    delivery is no longer optional, and the message says so and what to do."""

    def edit(d: dict[str, Any]) -> None:
        d["channels"]["online-application"]["erase_on_delivery"] = False
        d["channels"]["window-reception"]["erase_on_delivery"] = True

    problems = by_key(problems_of(write_config(tmp_path, edited(edit))))
    assert set(problems) == {
        "channels.online-application.erase_on_delivery",
        "channels.window-reception.erase_on_delivery",
    }
    message = problems["channels.online-application.erase_on_delivery"]
    assert "every channel now erases its copy as soon as the destination has it" in message
    assert "cannot keep a delivered copy" in message
    assert "retention_days bounds undelivered copies only" in message
    assert "unknown key" not in message


@pytest.mark.parametrize("key", ["host", "port", "certificate", "private_key", "client_ca"])
def test_a_single_ingress_listener_is_refused_pointing_to_listeners(
    tmp_path: Path, key: str
) -> None:
    """The old [ingress] listener keys are refused with where they went."""
    data = edited(lambda d: d["ingress"].__setitem__(key, "x"))
    (problem,) = problems_of(write_config(tmp_path, data))
    assert problem.key == f"ingress.{key}"
    assert problem.message.startswith("moved to [listeners.NAME]")


def test_shipped_file_fields_and_reject_policy() -> None:
    """Photo and batch channels name their file field; the batch and office channels reject."""
    config = load_config(SHIPPED)
    assert config.channels["online-application"].file_field == "face_photo"
    assert config.channels["card-delegation-batch"].file_field == "batch_file"
    assert config.channels["window-reception"].file_field is None
    rejecting = {n for n, c in config.channels.items() if c.on_unlisted == "reject"}
    assert rejecting == {"card-delegation-batch", "issuance-reservation", "window-reception"}


def test_shipped_config_is_immutable() -> None:
    """The configuration tree is frozen: an attribute cannot be reassigned."""
    config = load_config(SHIPPED)
    with pytest.raises(ValueError, match="frozen"):
        config.listeners["tablets"].port = 1  # type: ignore[misc]


# ------------------------------------------------------------------ unknown keys


def test_unknown_top_level_key_names_file_key_and_close_match(tmp_path: Path) -> None:
    """A misspelt top-level table is an error naming the file and suggesting the real key."""
    data = edited(lambda d: d.__setitem__("ingres", {"port": 1}))
    path = write_config(tmp_path, data)
    (problem,) = problems_of(path)
    assert problem.file == str(path)
    assert problem.key == "ingres"
    assert "unknown key" in problem.message
    assert "did you mean 'ingress'?" in problem.message
    assert str(path) in str(problem)


def test_unknown_channel_key_suggests_fields(tmp_path: Path) -> None:
    """channels.online-application.feilds is unknown, with "did you mean 'fields'?"."""
    data = edited(lambda d: d["channels"]["online-application"].__setitem__("feilds", {}))
    path = write_config(tmp_path, data)
    (problem,) = problems_of(path)
    assert problem.key == "channels.online-application.feilds"
    assert "did you mean 'fields'?" in problem.message


def test_unknown_retry_key_suggests_initial_backoff(tmp_path: Path) -> None:
    """destinations.x.retry.initial_backof is unknown, with the real key suggested."""

    def edit(d: dict[str, Any]) -> None:
        d["destinations"]["dnp-relay"]["retry"] = {"initial_backof": 2.0}

    path = write_config(tmp_path, edited(edit))
    (problem,) = problems_of(path)
    assert problem.key == "destinations.dnp-relay.retry.initial_backof"
    assert "did you mean 'initial_backoff'?" in problem.message


def test_unknown_field_rule_key_suggests_required(tmp_path: Path) -> None:
    """A misspelt key inside one field's rule names the field and suggests the rule key."""

    def edit(d: dict[str, Any]) -> None:
        d["channels"]["online-application"]["fields"]["face_photo"]["requird"] = True

    (problem,) = problems_of(write_config(tmp_path, edited(edit)))
    assert problem.key == "channels.online-application.fields.face_photo.requird"
    assert "did you mean 'required'?" in problem.message


def test_unknown_key_without_close_match_has_no_suggestion(tmp_path: Path) -> None:
    """An unknown key unlike any known one is refused without a misleading suggestion."""
    data = edited(lambda d: d["spool"].__setitem__("zzzzzz", 1))
    (problem,) = problems_of(write_config(tmp_path, data))
    assert problem.key == "spool.zzzzzz"
    assert problem.message == "unknown key"


def test_every_problem_is_reported(tmp_path: Path) -> None:
    """Two mistakes in one file give two problems, each under its own key."""

    def edit(d: dict[str, Any]) -> None:
        d["channels"]["online-application"]["feilds"] = {}
        d["destinations"]["dnp-relay"]["retry"] = {"initial_backof": 2.0}

    problems = problems_of(write_config(tmp_path, edited(edit)))
    assert len(problems) == 2
    assert set(by_key(problems)) == {
        "channels.online-application.feilds",
        "destinations.dnp-relay.retry.initial_backof",
    }


def test_error_text_lists_every_problem_on_its_own_line(tmp_path: Path) -> None:
    """ConfigError's message has one "file: key: message" line per problem."""

    def edit(d: dict[str, Any]) -> None:
        d["ingres"] = {}
        d["admin"]["prot"] = 1

    path = write_config(tmp_path, edited(edit))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    lines = str(info.value).splitlines()
    assert len(lines) == 2
    assert all(line.startswith(f"{path}: ") for line in lines)
    assert any("admin.prot: unknown key (did you mean 'port'?)" in line for line in lines)


# -------------------------------------------------------------- types and rules


def test_bad_type_names_the_key(tmp_path: Path) -> None:
    """A port given as a word is refused under listeners.tablets.port."""
    data = edited(lambda d: d["listeners"]["tablets"].__setitem__("port", "https"))
    (problem,) = problems_of(write_config(tmp_path, data))
    assert problem.key == "listeners.tablets.port"
    assert "integer" in problem.message


def test_out_of_range_value_names_the_key(tmp_path: Path) -> None:
    """A port above 65535 and a zero retention are refused under their own keys."""

    def edit(d: dict[str, Any]) -> None:
        d["admin"]["port"] = 70000
        d["channels"]["express-issuance"]["retention_days"] = 0

    problems = by_key(problems_of(write_config(tmp_path, edited(edit))))
    assert set(problems) == {"admin.port", "channels.express-issuance.retention_days"}


def test_bad_on_unlisted_value_names_the_key(tmp_path: Path) -> None:
    """on_unlisted accepts only "drop" or "reject"."""
    data = edited(lambda d: d["channels"]["window-reception"].__setitem__("on_unlisted", "keep"))
    (problem,) = problems_of(write_config(tmp_path, data))
    assert problem.key == "channels.window-reception.on_unlisted"
    assert "'drop'" in problem.message and "'reject'" in problem.message


def test_unknown_field_format_suggests_a_close_one(tmp_path: Path) -> None:
    """format = "jpeg_foto" is refused under the field's key with 'jpeg_photo' suggested."""

    def edit(d: dict[str, Any]) -> None:
        d["channels"]["online-application"]["fields"]["face_photo"]["format"] = "jpeg_foto"

    (problem,) = problems_of(write_config(tmp_path, edited(edit)))
    assert problem.key.startswith("channels.online-application.fields.face_photo")
    assert "unknown format" in problem.message
    assert "did you mean 'jpeg_photo'?" in problem.message


def test_missing_required_key_is_named(tmp_path: Path) -> None:
    """A channel without its destination is refused under channels.NAME.destination."""
    data = edited(lambda d: d["channels"]["window-reception"].pop("destination"))
    (problem,) = problems_of(write_config(tmp_path, data))
    assert problem.key == "channels.window-reception.destination"
    assert problem.message == "required key is missing"


def test_channel_with_two_file_fields_is_refused(tmp_path: Path) -> None:
    """A channel takes at most one file field."""

    def edit(d: dict[str, Any]) -> None:
        d["channels"]["online-application"]["fields"]["back_photo"] = {"format": "jpeg_photo"}

    (problem,) = problems_of(write_config(tmp_path, edited(edit)))
    assert problem.key == "channels.online-application"
    assert "at most one file field" in problem.message


def test_batch_channel_needs_its_manifest(tmp_path: Path) -> None:
    """An opaque_file channel without the sha256 manifest field is refused."""
    data = edited(lambda d: d["channels"]["card-delegation-batch"]["fields"].pop("sha256"))
    (problem,) = problems_of(write_config(tmp_path, data))
    assert problem.key == "channels.card-delegation-batch"
    assert "sha256" in problem.message


def test_window_that_ends_before_it_starts_is_refused(tmp_path: Path) -> None:
    """active_from after active_until is a configuration error."""

    def edit(d: dict[str, Any]) -> None:
        d["channels"]["overseas-application"]["active_from"] = date(2028, 1, 1)

    (problem,) = problems_of(write_config(tmp_path, edited(edit)))
    assert "active_from must not be after active_until" in problem.message


@pytest.mark.parametrize("network", ["10.60.0.1/24", "office-lan", "10.60.0.0/33", 1060])
def test_bad_source_network_is_one_problem_under_its_index(tmp_path: Path, network: object) -> None:
    """A source network that is not a CIDR network is one problem at source_networks.N."""

    def edit(d: dict[str, Any]) -> None:
        d["channels"]["window-reception"]["source_networks"] = ["10.60.0.0/24", network]

    (problem,) = problems_of(write_config(tmp_path, edited(edit)))
    assert problem.key == "channels.window-reception.source_networks.1"
    assert "CIDR" in problem.message


def test_ipv6_source_network_is_accepted(tmp_path: Path) -> None:
    """An IPv6 network is as good as an IPv4 one in source_networks."""

    def edit(d: dict[str, Any]) -> None:
        d["channels"]["window-reception"]["source_networks"] = ["10.60.0.0/24", "fd00:60::/64"]

    config = load_config(write_config(tmp_path, edited(edit)))
    nets = [str(n) for n in config.channels["window-reception"].source_networks]
    assert nets == ["10.60.0.0/24", "fd00:60::/64"]


# ------------------------------------------------------------------- references


def test_channel_referencing_a_missing_destination_is_refused(tmp_path: Path) -> None:
    """A channel naming an unknown destination is refused under its destination key."""
    data = edited(
        lambda d: d["channels"]["express-issuance"].__setitem__("destination", "jlis-expres")
    )
    path = write_config(tmp_path, data)
    (problem,) = problems_of(path)
    assert problem.file == str(path)
    assert problem.key == "channels.express-issuance.destination"
    assert "no destination by that name" in problem.message
    assert "did you mean 'jlis-express'?" in problem.message


def test_every_missing_destination_is_reported_beside_other_problems(tmp_path: Path) -> None:
    """Two broken references and a bad type in one file give three problems."""

    def edit(d: dict[str, Any]) -> None:
        d["channels"]["express-issuance"]["destination"] = "jlis-expres"
        d["channels"]["overseas-application"]["destination"] = "nowhere"
        d["listeners"]["lgwan"]["port"] = "https"

    problems = by_key(problems_of(write_config(tmp_path, edited(edit))))
    assert set(problems) == {
        "channels.express-issuance.destination",
        "channels.overseas-application.destination",
        "listeners.lgwan.port",
    }
    assert "did you mean" not in problems["channels.overseas-application.destination"]


def test_removed_destination_is_reported_for_each_channel_using_it(tmp_path: Path) -> None:
    """Removing ward-issuance breaks both office channels, and both are named."""
    data = edited(lambda d: d["destinations"].pop("ward-issuance"))
    problems = by_key(problems_of(write_config(tmp_path, data)))
    assert set(problems) == {
        "channels.issuance-reservation.destination",
        "channels.window-reception.destination",
    }


def test_parse_config_without_file_uses_placeholder_name() -> None:
    """parse_config on a mapping names "<config>" unless told the file."""
    data = edited(lambda d: d.__setitem__("ingres", {}))
    with pytest.raises(ConfigError) as info:
        parse_config(data, base=Path("/"))
    assert info.value.problems[0].file == "<config>"


# ------------------------------------------------------------------------ paths


def test_relative_paths_resolve_against_the_config_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Relative paths are taken from the configuration file's folder, not the working dir."""

    def edit(d: dict[str, Any]) -> None:
        d["spool"]["directory"] = "spool"
        d["spool"]["master_key"] = "keys/master.key"
        d["auth"]["devices_file"] = "registry/devices.json"
        d["listeners"]["tablets"]["client_ca"] = "../ca/device-ca.pem"
        d["destinations"]["dnp-relay"]["client_key"] = "keys/client.key"

    conf_dir = tmp_path / "etc" / "gateway"
    path = write_config(conf_dir, edited(edit))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(Path("..") / "etc" / "gateway" / "gateway.toml")
    base = path.resolve().parent
    assert config.spool.directory == base / "spool"
    assert config.spool.master_key == str(base / "keys" / "master.key")
    assert config.auth.devices_file == base / "registry" / "devices.json"
    assert config.listeners["tablets"].client_ca == base / ".." / "ca" / "device-ca.pem"
    assert config.destinations["dnp-relay"].client_key == str(base / "keys" / "client.key")


def test_absolute_paths_and_credentials_are_kept(tmp_path: Path) -> None:
    """Absolute paths and credential:NAME references are kept as written."""
    config = load_config(write_config(tmp_path, shipped_data()))
    tablets = config.listeners["tablets"]
    assert tablets.certificate == Path("/etc/gateway/tls/listener-tablets.pem")
    assert tablets.private_key == "credential:listener-tablets.key"


# ----------------------------------------------------------------------- secrets


def test_inline_master_key_is_refused(tmp_path: Path) -> None:
    """A master_key value holding a newline (a pasted PEM or key) is refused."""
    secret = "-----BEGIN KEY-----\nc2VjcmV0\n-----END KEY-----"
    data = edited(lambda d: d["spool"].__setitem__("master_key", secret))
    path = write_config(tmp_path, data)
    (problem,) = problems_of(path)
    assert problem.key == "spool.master_key"
    assert "never the secret itself" in problem.message
    assert "c2VjcmV0" not in str(problem)


def test_inline_secret_behind_credential_prefix_is_refused(tmp_path: Path) -> None:
    """credential: followed by a multi-line secret is refused, not taken as a name."""

    def edit(d: dict[str, Any]) -> None:
        d["destinations"]["jlis-overseas"]["credential"] = "credential:x\nward:lgwan-pass"

    (problem,) = problems_of(write_config(tmp_path, edited(edit)))
    assert problem.key == "destinations.jlis-overseas.credential"
    assert "never the secret itself" in problem.message


def test_overlong_secret_reference_is_refused(tmp_path: Path) -> None:
    """A secret reference longer than any path (4 KiB) is refused."""
    data = edited(lambda d: d["listeners"]["jukinet"].__setitem__("private_key", "k" * 5000))
    (problem,) = problems_of(write_config(tmp_path, data))
    assert problem.key == "listeners.jukinet.private_key"


@pytest.mark.parametrize("value", ["credential:", "credential:a/b", "credential:.."])
def test_credential_needs_a_plain_name(tmp_path: Path, value: str) -> None:
    """credential:NAME refuses an empty name, a slash or a dot-dot."""
    data = edited(lambda d: d["spool"].__setitem__("master_key", value))
    (problem,) = problems_of(write_config(tmp_path, data))
    assert problem.key == "spool.master_key"
    assert "plain credential name" in problem.message


# -------------------------------------------------------------------- the file


def test_invalid_toml_is_one_problem_naming_the_file(tmp_path: Path) -> None:
    """A file that is not TOML gives a ConfigError naming the file."""
    path = tmp_path / "broken.toml"
    path.write_text("[ingress\nport = 1\n", encoding="utf-8")
    (problem,) = problems_of(path)
    assert problem.file == str(path)
    assert problem.key == ""
    assert problem.message.startswith("not valid TOML")


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """A configuration path that does not exist gives "file not found", not a traceback."""
    path = tmp_path / "absent.toml"
    (problem,) = problems_of(path)
    assert problem.file == str(path)
    assert problem.message == "file not found"


def test_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    """A file in another encoding is refused as unreadable."""
    path = tmp_path / "sjis.toml"
    path.write_bytes("# 設定\n".encode("shift_jis"))
    (problem,) = problems_of(path)
    assert "cannot read" in problem.message


def test_directory_instead_of_file_is_a_config_error(tmp_path: Path) -> None:
    """Pointing at a directory gives a ConfigError, not an OSError."""
    (problem,) = problems_of(tmp_path)
    assert problem.message.startswith("cannot read")


@pytest.mark.parametrize(
    "pasted",
    [
        "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        "n4bQgYhMfWWaL+qgxVrQFaO/TxsrC4Is0V1sFbDwCgg=",
        "ward-user:S3cretPassw0rd",
        "credential:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    ],
)
def test_a_secret_pasted_where_its_path_belongs_is_refused_without_echo(
    tmp_path: Path, pasted: str
) -> None:
    """A key or user:password given inline is refused, and the error never repeats it."""
    data = tomllib.loads(SHIPPED.read_text("utf-8"))
    data["spool"]["master_key"] = pasted
    with pytest.raises(ConfigError) as caught:
        parse_config(data, base=tmp_path, file="gateway.toml")
    problems = [p for p in caught.value.problems if p.key == "spool.master_key"]
    assert problems and "never the secret itself" in problems[0].message
    assert pasted not in str(caught.value)


# ------------------------------------------------------------- payload encryption


def test_shipped_sealed_destinations_have_agreed_recipient_ids() -> None:
    """Each destination that seals binds an id agreed with its recipient, not its table name."""
    config = load_config(SHIPPED)
    assert {n: d.recipient_id for n, d in config.destinations.items()} == {
        "dnp-relay": "jlis-online-application",  # sealed for J-LIS, through the relay
        "jlis-express": "jlis-express",
        "jlis-overseas": "jlis-overseas",
        "jlis-card-management": None,
        "ward-issuance": None,
    }


@pytest.mark.parametrize("destination", ["dnp-relay", "jlis-overseas"])
def test_sealing_without_a_recipient_id_is_refused(tmp_path: Path, destination: str) -> None:
    """hpke and cms both need recipient_id; the message names it and what it is."""
    data = edited(lambda d: d["destinations"][destination].pop("recipient_id"))
    (problem,) = problems_of(write_config(tmp_path, data))
    assert problem.key == f"destinations.{destination}"
    assert "needs recipient_id" in problem.message
    assert "agreed with the recipient" in problem.message


@pytest.mark.parametrize(
    "value",
    [
        "",
        "jlis express",
        "-jlis",
        ".jlis",
        "x" * 65,
        "ｊｌｉｓ",
        "jlis/express",
        "jlis:1",
        "jlis\n",
    ],
)
def test_a_recipient_id_that_is_not_a_short_ascii_token_is_refused(
    tmp_path: Path, value: str
) -> None:
    data = edited(lambda d: d["destinations"]["jlis-express"].__setitem__("recipient_id", value))
    (problem,) = problems_of(write_config(tmp_path, data))
    assert problem.key == "destinations.jlis-express"
    assert problem.message.startswith(
        "recipient_id must be 1 to 64 ASCII letters, digits, '.', '_' or '-', starting with a "
        "letter or digit"
    )


def test_a_recipient_id_of_64_token_characters_is_kept(tmp_path: Path) -> None:
    value = "JLIS.Express_01-" + "x" * 48
    data = edited(lambda d: d["destinations"]["jlis-express"].__setitem__("recipient_id", value))
    assert load_config(write_config(tmp_path, data)).destinations["jlis-express"].recipient_id == (
        value
    )


def test_a_recipient_id_without_payload_encryption_is_refused(tmp_path: Path) -> None:
    data = edited(lambda d: d["destinations"]["ward-issuance"].__setitem__("recipient_id", "ward"))
    (problem,) = problems_of(write_config(tmp_path, data))
    assert problem.key == "destinations.ward-issuance"
    assert 'recipient_id set but payload_encryption is "none"' in problem.message


def test_a_postgresql_spool_needs_its_dsn_and_a_local_one_refuses_it(tmp_path: Path) -> None:
    def postgresql(data: dict[str, Any]) -> None:
        data["spool"]["backend"] = "postgresql"

    def sqlite_with_dsn(data: dict[str, Any]) -> None:
        data["spool"]["dsn"] = "credential:spool-dsn"

    missing = by_key(problems_of(write_config(tmp_path, edited(postgresql), "pg.toml")))
    assert "dsn: required with backend" in missing["spool"]
    stray = by_key(problems_of(write_config(tmp_path, edited(sqlite_with_dsn), "lite.toml")))
    assert 'dsn: only with backend = "postgresql"' in stray["spool"]


def test_a_postgresql_spool_with_its_settings_loads(tmp_path: Path) -> None:
    def shared(data: dict[str, Any]) -> None:
        data["spool"].update(
            backend="postgresql",
            dsn="credential:spool-dsn",
            node_id="gw-01",
            lease_seconds=30,
            pool_size=4,
        )

    spool = load_config(write_config(tmp_path, edited(shared))).spool
    assert (spool.backend, spool.node_id, spool.lease_seconds, spool.pool_size) == (
        "postgresql",
        "gw-01",
        30,
        4,
    )


def test_a_node_id_is_a_plain_name(tmp_path: Path) -> None:
    def bad(data: dict[str, Any]) -> None:
        data["spool"].update(backend="postgresql", dsn="credential:x", node_id="gw 01; drop")

    assert "spool.node_id" in by_key(problems_of(write_config(tmp_path, edited(bad))))
