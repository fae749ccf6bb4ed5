"""Staff are named per channel (取扱者をあらかじめ指定): the daemon's refusal, the
gatewayctl commands, and the refusal of a registry from before (the registry file itself:
``tests/unit/test_staff_registry.py``)."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import Running, ctl

from gateway.cli import gatewayd
from gateway.errors import ConfigError
from gateway.identity.registry import UserRegistry, load_users, save_users
from gateway.ops.chain import HashChainLog
from gateway.preflight import registry_problems
from gateway.testing.samples import sample_submission
from gateway.testing.sandbox import Sandbox, build_sandbox, start_gateway

pytestmark = pytest.mark.usefixtures("hermetic_cli")


def make_legacy(sandbox: Sandbox) -> Path:
    """Rewrite users.json as it was before staff were named: no channels key at all."""
    assert sandbox.config is not None
    path = sandbox.config.auth.users_file
    doc = json.loads(path.read_text("utf-8"))
    for user in doc["users"]:
        user.pop("channels")
    path.write_text(json.dumps(doc), "utf-8")
    return path


# ----------------------------------------------------------------- the daemon's answer


async def test_a_user_not_named_for_the_channel_gets_403(gateway: Running) -> None:
    """staff-counter is named for window-reception only: on the call centre's channel,
    from the same office network, it gets 403 user-not-allowed-on-channel."""
    fields, files = sample_submission("issuance-reservation")
    async with gateway.client("callcentre-01", user="staff-counter") as client:
        reply = await client.submit("issuance-reservation", fields, files)
    assert reply.status == 403
    assert reply.body["type"].endswith("/user-not-allowed-on-channel")
    assert "issuance-reservation" not in json.dumps(reply.body)  # nothing about the channel
    labels = {"listener": "office-lan", "reason": "user_not_allowed_on_channel"}
    assert gateway.metrics.registry.get_sample_value("gateway_auth_failures_total", labels) == 1


async def test_a_wrong_password_is_401_before_any_channel_rule(gateway: Running) -> None:
    """With a wrong password the same request is 401: a stranger learns nothing about
    which staff user may post where."""
    fields, files = sample_submission("issuance-reservation")
    async with gateway.client(
        "callcentre-01", user="staff-counter", password="not-the-password"
    ) as client:
        reply = await client.submit("issuance-reservation", fields, files)
    assert reply.status == 401


async def test_a_user_named_for_a_channel_or_its_group_may_post(gateway: Running) -> None:
    """staff-counter by channel name, staff-002 by group:assist-desk: both accepted;
    staff-002 is refused on the overseas channel, which its group does not hold."""
    fields, files = sample_submission("window-reception")
    async with gateway.client("counter-01", user="staff-counter") as counter:
        assert (await counter.submit("window-reception", fields, files)).status == 202
    fields, files = sample_submission("express-issuance")
    async with gateway.client("tablet-01", user="staff-002") as tablet:
        assert (await tablet.submit("express-issuance", fields, files)).status == 202
    fields, files = sample_submission("overseas-application")
    async with gateway.client("pc-01", user="staff-002") as pc:
        reply = await pc.submit("overseas-application", fields, files)
    assert reply.status == 403 and reply.body["type"].endswith("/user-not-allowed-on-channel")


async def test_allow_takes_effect_on_the_running_daemon(
    gateway: Running, capsys: pytest.CaptureFixture[str]
) -> None:
    """gatewayctl user allow changes what the running daemon lets the user do."""
    fields, files = sample_submission("overseas-application")
    async with gateway.client("pc-01", user="staff-002") as pc:
        assert (await pc.submit("overseas-application", fields, files)).status == 403
        code, _out, err = ctl(
            capsys, "user", "allow", "--config", gateway.sandbox.config_path,
            "--id", "staff-002", "--channel", "group:overseas-desk",
        )  # fmt: skip
        assert code == 0, err
        gateway.sleep.now += 1  # the watcher looks at the file again
        assert (await pc.submit("overseas-application", fields, files)).status == 202


# ----------------------------------------------------------- a registry from before


async def test_check_config_refuses_a_registry_whose_users_name_no_channel(
    sandbox: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    """check-config names the users and gives the command that fixes each; after it is
    run for each of them, check-config passes."""
    make_legacy(sandbox)
    code, _out, err = ctl(capsys, "check-config", "--config", sandbox.config_path)
    assert code == 78  # EX_CONFIG: the configuration (its staff registry) is unusable
    assert "staff-001, staff-002, staff-counter are not named for any channel" in err
    for user in ("staff-001", "staff-002", "staff-counter"):
        assert f"gatewayctl user allow --id {user} --channel CHANNEL" in err
    for user in ("staff-001", "staff-002", "staff-counter"):
        code, _out, err = ctl(
            capsys, "user", "allow", "--config", sandbox.config_path,
            "--id", user, "--channel", "window-reception",
        )  # fmt: skip
        assert code == 0, err
    code, _out, err = ctl(capsys, "check-config", "--config", sandbox.config_path)
    assert code == 0, err


async def test_the_daemon_refuses_to_start_on_a_registry_from_before(
    sandbox: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    """gatewayd exits 78 (EX_CONFIG) with the same message; serve() refuses too."""
    make_legacy(sandbox)
    assert sandbox.config is not None
    capsys.readouterr()
    code = gatewayd.main(["--config", str(sandbox.config_path)])
    _out, err = capsys.readouterr()
    assert code == 78
    assert "are not named for any channel" in err and "gatewayctl user allow" in err
    with pytest.raises(ConfigError):
        await start_gateway(sandbox.config)
    assert registry_problems(sandbox.config)


async def test_a_user_allowed_an_unknown_channel_is_refused_at_start(sandbox: Sandbox) -> None:
    """A hand-edited users.json naming a channel the configuration does not have."""
    assert sandbox.config is not None
    path = sandbox.config.auth.users_file
    registry = load_users(path)
    save_users(
        path,
        UserRegistry(
            tuple(
                replace(u, channels=("window-recepton",)) if u.id == "staff-002" else u
                for u in registry.users
            )
        ),
    )
    (problem,) = registry_problems(sandbox.config)
    assert problem.file == str(path)
    assert problem.key == "users[1].channels[0]"
    assert "did you mean 'window-reception'?" in problem.message


async def test_a_running_daemon_keeps_its_users_when_the_file_names_an_unknown_channel(
    gateway: Running,
) -> None:
    """The watcher keeps the last good staff registry (and logs why) rather than take
    one that names a channel the configuration does not have."""
    config = gateway.sandbox.config
    assert config is not None
    path = config.auth.users_file
    registry = load_users(path)
    save_users(
        path,
        UserRegistry(
            tuple(
                replace(u, channels=("nowhere",), enabled=False) if u.id == "staff-001" else u
                for u in registry.users
            )
        ),
    )
    gateway.sleep.now += 1
    fields, files = sample_submission("online-application")
    async with gateway.client("tablet-01") as tablet:
        assert (await tablet.submit("online-application", fields, files)).status == 202


# --------------------------------------------------------------------- gatewayctl


def audit(sandbox: Sandbox) -> list[dict[str, object]]:
    assert sandbox.config is not None
    where = sandbox.config.audit_log
    return [e.body for e in HashChainLog(where.log, anchor=where.anchor).entries()]


async def test_user_add_requires_known_channels(
    sandbox: Sandbox, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """user add without --channel is a usage error; an unknown channel is refused with
    the close name; a known one is stored and audited."""
    config = sandbox.config_path
    monkeypatch.setattr("sys.stdin", io.StringIO("a long enough password\n"))
    with pytest.raises(SystemExit) as exited:
        ctl(capsys, "user", "add", "--config", config, "--id", "s-9", "--password-stdin")
    assert exited.value.code == 2
    monkeypatch.setattr("sys.stdin", io.StringIO("a long enough password\n"))
    code, _out, err = ctl(
        capsys, "user", "add", "--config", config, "--id", "s-9",
        "--channel", "group:assist-dsk", "--password-stdin",
    )  # fmt: skip
    assert code == 2  # a usage error: no such channel
    assert "--channel 'group:assist-dsk'" in err and "did you mean 'group:assist-desk'?" in err
    assert sandbox.config is not None
    assert load_users(sandbox.config.auth.users_file).get("s-9") is None
    monkeypatch.setattr("sys.stdin", io.StringIO("a long enough password\n"))
    code, out, err = ctl(
        capsys, "user", "add", "--config", config, "--id", "s-9",
        "--channel", "group:assist-desk", "--channel", "window-reception", "--password-stdin",
    )  # fmt: skip
    assert code == 0, err
    assert "named for: group:assist-desk, window-reception" in out
    added = load_users(sandbox.config.auth.users_file).get("s-9")
    assert added is not None and added.channels == ("group:assist-desk", "window-reception")
    last = audit(sandbox)[-1]
    assert last["action"] == "user.add" and last["outcome"] == "ok"
    assert last["detail"] == {"channels": ["group:assist-desk", "window-reception"]}


async def test_user_allow_and_deny_change_the_list_and_are_audited(
    sandbox: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    config = sandbox.config_path
    assert sandbox.config is not None
    path = sandbox.config.auth.users_file
    code, out, err = ctl(
        capsys, "user", "allow", "--config", config, "--id", "staff-counter",
        "--channel", "issuance-reservation",
    )  # fmt: skip
    assert code == 0, err
    assert "now named for: window-reception, issuance-reservation" in out
    body = audit(sandbox)[-1]
    assert body["action"] == "user.allow" and body["target"] == "staff-counter"
    assert body["detail"] == {
        "allowed": ["issuance-reservation"],
        "channels": ["window-reception", "issuance-reservation"],
    }
    code, out, err = ctl(
        capsys, "user", "deny", "--config", config, "--id", "staff-counter",
        "--channel", "window-reception",
    )  # fmt: skip
    assert code == 0, err
    user = load_users(path).get("staff-counter")
    assert user is not None and user.channels == ("issuance-reservation",)
    body = audit(sandbox)[-1]
    assert body["action"] == "user.deny"
    assert body["detail"] == {
        "denied": ["window-reception"],
        "channels": ["issuance-reservation"],
        "daemon": "gatewayd is not running; it reads the change when it starts",
    }
    # Allowing what it has, or denying what it lacks, changes nothing and says so.
    before = path.read_bytes()
    code, out, _err = ctl(
        capsys, "user", "deny", "--config", config, "--id", "staff-counter",
        "--channel", "window-reception",
    )  # fmt: skip
    assert code == 0 and "nothing to change" in out
    assert path.read_bytes() == before
    # An unknown channel cannot be allowed, but can be denied (a hand-made typo).
    code, _out, err = ctl(
        capsys, "user", "allow", "--config", config, "--id", "staff-counter",
        "--channel", "nowhere",
    )  # fmt: skip
    assert code == 2 and "no channel or channel group by that name" in err
    code, _out, err = ctl(
        capsys, "user", "allow", "--config", config, "--id", "nobody",
        "--channel", "window-reception",
    )  # fmt: skip
    assert code == 1 and "no staff user 'nobody'" in err


async def test_user_list_shows_each_users_channels(
    sandbox: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    """Text and JSON listings: state, named entries and the channels they expand to."""
    code, out, err = ctl(capsys, "user", "list", "--config", sandbox.config_path)
    assert code == 0, err
    line = next(x for x in out.splitlines() if x.startswith("staff-002 "))
    assert "active" in line and "group:assist-desk" in line
    code, out, err = ctl(
        capsys, "user", "list", "--config", sandbox.config_path, "--format", "json"
    )
    assert code == 0, err
    rows = {row["id"]: row for row in json.loads(out)}
    assert rows["staff-002"]["channels"] == ["group:assist-desk"]
    assert rows["staff-002"]["allowed"] == ["express-issuance", "online-application"]
    assert rows["staff-counter"]["allowed"] == ["window-reception"]
    assert "password_hash" not in out and "scrypt$" not in out
    make_legacy(sandbox)
    code, out, _err = ctl(capsys, "user", "list", "--config", sandbox.config_path)
    assert "(not named for any channel)" in out


async def test_a_sandbox_can_be_rebuilt_with_staff_named(tmp_path: Path) -> None:
    """build_sandbox writes every staff user with channels: check passes at once."""
    box = await build_sandbox(tmp_path, start_simulators=False)
    assert box.config is not None
    assert registry_problems(box.config) == []
