"""The listeners in the configuration: one per network in the shipped file, each channel
bound to its own network's listener, and every mistake named by its key.
"""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from gateway.config import load_config
from gateway.errors import ConfigError

SHIPPED = Path(__file__).resolve().parents[2] / "conf" / "gateway.toml"

# The networks (資料36: tablets never on the ward LAN; 資料14: LGWAN; 資料30:
# the Jukinet line; 資料60: the office LAN), written out here, not read from the file.
SHIPPED_BINDING = {
    "online-application": ("tablets",),
    "express-issuance": ("tablets",),
    "overseas-application": ("lgwan",),
    "card-delegation-batch": ("jukinet",),
    "issuance-reservation": ("office-lan",),
    "window-reception": ("office-lan",),
}


def shipped() -> dict[str, Any]:
    with SHIPPED.open("rb") as handle:
        return tomllib.load(handle)


def problems_of(tmp_path: Path, edit: Callable[[dict[str, Any]], None]) -> dict[str, str]:
    data = copy.deepcopy(shipped())
    edit(data)
    path = tmp_path / "gateway.toml"
    path.write_text(tomli_w.dumps(data), "utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return {p.key: p.message for p in info.value.problems}


# ------------------------------------------------------------------ configuration


def test_the_shipped_file_declares_one_listener_per_network() -> None:
    """tablets, lgwan, jukinet and office-lan, each on its own address and device CA."""
    config = load_config(SHIPPED)
    assert set(config.listeners) == {"tablets", "lgwan", "jukinet", "office-lan"}
    hosts = [listener.host for listener in config.listeners.values()]
    cas = [listener.client_ca for listener in config.listeners.values()]
    assert len(set(hosts)) == len(hosts) and len(set(cas)) == len(cas)


def test_each_shipped_channel_is_served_on_its_own_network_only() -> None:
    """Each channel names exactly the listener of the network its devices are on."""
    config = load_config(SHIPPED)
    assert {n: c.listeners for n, c in config.channels.items()} == SHIPPED_BINDING


def test_each_shipped_destination_has_its_own_client_certificate() -> None:
    """No two destinations share a client certificate or key."""
    config = load_config(SHIPPED)
    certs = [d.client_certificate for d in config.destinations.values()]
    keys = [d.client_key for d in config.destinations.values()]
    assert len(set(certs)) == len(certs) == len(set(keys)) == len(config.destinations)


def test_a_channel_bound_to_an_unknown_listener_names_the_key(tmp_path: Path) -> None:
    """The error names the channel's listeners entry and suggests the close name."""
    problems = problems_of(
        tmp_path,
        lambda d: d["channels"]["window-reception"].update(listeners=["office-lan", "ofice"]),
    )
    assert set(problems) == {"channels.window-reception.listeners.1"}
    message = problems["channels.window-reception.listeners.1"]
    assert "no listener named 'ofice'" in message
    assert "did you mean 'office-lan'?" in message


def test_a_channel_must_name_at_least_one_listener(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, lambda d: d["channels"]["express-issuance"].pop("listeners"))
    assert problems == {"channels.express-issuance.listeners": "required key is missing"}


@pytest.mark.parametrize(
    ("first", "second"),
    [("10.31.0.10", "10.31.0.10"), ("0.0.0.0", "10.40.0.10"), ("::", "::")],
)
def test_two_listeners_on_one_address_name_the_second(
    tmp_path: Path, first: str, second: str
) -> None:
    """Same host and port, or a wildcard and any host on the same port, clash."""

    def edit(d: dict[str, Any]) -> None:
        d["listeners"]["tablets"].update(host=first, port=8443)
        d["listeners"]["lgwan"].update(host=second, port=8443)

    problems = problems_of(tmp_path, edit)
    assert set(problems) == {"listeners.lgwan.port"}
    assert "already listeners.tablets's address" in problems["listeners.lgwan.port"]


def test_a_listener_host_must_be_an_ip_address(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, lambda d: d["listeners"]["jukinet"].update(host="gw.local"))
    assert "must be an IP address" in problems["listeners.jukinet.host"]


def test_a_source_address_must_be_an_ip_address(tmp_path: Path) -> None:
    problems = problems_of(
        tmp_path, lambda d: d["destinations"]["dnp-relay"].update(source_address="eth0")
    )
    assert "must be an IP address" in problems["destinations.dnp-relay.source_address"]


def test_a_channel_group_naming_an_unknown_channel_names_the_key(tmp_path: Path) -> None:
    problems = problems_of(
        tmp_path, lambda d: d["channel_groups"].update({"desk": ["window-receptoin"]})
    )
    assert set(problems) == {"channel_groups.desk.0"}
    assert "did you mean 'window-reception'?" in problems["channel_groups.desk.0"]
