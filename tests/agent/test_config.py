"""Config: every kind of error exits 78 and names the key."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rackguard.agent import config as configmod

REPO = Path(__file__).resolve().parents[2]


def run_check(path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("RACKGUARD_")}
    e.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "rackguard.agent.cli", "check-config", str(path)],
        capture_output=True,
        text=True,
        env=e,
        cwd=REPO,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("toml", "key", "words"),
    [
        ('[mqtt]\nport = "many"\n', "mqtt.port", "integer"),
        ("[mqtt]\nport = 70000\n", "mqtt.port", "less than or equal"),
        ("[sensors]\npoll_period_s = 0\n", "sensors.poll_period_s", "greater than"),
        ("[mqtt]\nprot = 1884\n", "mqtt.prot", "unknown key"),
        ("[bogus]\nx = 1\n", "bogus", "unknown key"),
        ('[sensors]\nbackend = "rocm"\n', "sensors.backend", "'nvml' or 'sim'"),
        ('[node]\nsite = "a/b"\n', "node.site", "pattern"),
        ('[mqtt]\nusername = "u"\npassword_file = "/nonexistent/pw"\n', "mqtt.password_file", "cannot read"),
    ],
)
def test_bad_config_exits_78_naming_the_key(tmp_path: Path, toml: str, key: str, words: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(toml)
    r = run_check(f)
    assert r.returncode == 78, r.stderr
    line = next((ln for ln in r.stderr.splitlines() if f": {key}:" in ln), None)
    assert line is not None, r.stderr
    assert words in line


def test_unreadable_toml_exits_78(tmp_path: Path) -> None:
    f = tmp_path / "broken.toml"
    f.write_text("[mqtt\nport = 1\n")
    r = run_check(f)
    assert r.returncode == 78
    assert str(f) in r.stderr and "invalid TOML" in r.stderr


def test_missing_file_exits_78(tmp_path: Path) -> None:
    r = run_check(tmp_path / "nope.toml")
    assert r.returncode == 78
    assert "cannot read config file" in r.stderr


def test_env_override_is_validated_and_named(tmp_path: Path) -> None:
    f = tmp_path / "ok.toml"
    f.write_text("[mqtt]\nport = 1883\n")
    assert run_check(f, {"RACKGUARD_MQTT__PORT": "1884"}).returncode == 0
    r = run_check(f, {"RACKGUARD_MQTT__PORT": "abc"})
    assert r.returncode == 78 and "mqtt.port" in r.stderr


def test_env_overrides_apply_over_file(tmp_path: Path) -> None:
    f = tmp_path / "ok.toml"
    f.write_text('[mqtt]\nport = 1883\nhost = "a"\n')
    cfg = configmod.load(f, environ={"RACKGUARD_MQTT__PORT": "1884", "RACKGUARD_SENSORS__BACKEND": "sim"})
    assert cfg.mqtt.port == 1884 and cfg.mqtt.host == "a" and cfg.sensors.backend == "sim"


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    with pytest.raises(configmod.ConfigError) as ei:
        configmod.validate({"mqtt": {"port": 0, "keepalive_s": "x"}, "nope": 1})
    keys = {k for k, _ in ei.value.errors}
    assert keys == {"mqtt.port", "mqtt.keepalive_s", "nope"}


def test_cross_field_rule_names_section() -> None:
    with pytest.raises(configmod.ConfigError) as ei:
        configmod.validate({"sensors": {"poll_period_s": 2.0, "slow_period_s": 1.0}})
    assert any(k == "sensors" and "slow_period_s" in r for k, r in ei.value.errors)


def test_secret_from_credentials_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mqtt-password").write_text("s3cret\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    cfg = configmod.validate({"mqtt": {"username": "node1", "password_file": "mqtt-password"}})
    pw = cfg.mqtt.password()
    assert pw is not None and pw.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(cfg) and "s3cret" not in str(cfg.redacted())


@pytest.mark.parametrize("name", ["sim.toml", "gateway.toml"])
def test_shipped_example_is_valid(name: str) -> None:
    r = run_check(REPO / "examples" / name)
    assert r.returncode == 0, r.stderr


# -- errors that say what to do (#16) ----------------------------------------------------


@pytest.mark.parametrize(
    ("data", "key", "hint"),
    [
        ({"mqtt": {"prot": 1884}}, "mqtt.prot", "did you mean `port`?"),
        ({"mqtt": {"keepalive": 10}}, "mqtt.keepalive", "did you mean `keepalive_s`?"),
        ({"contrl": {}}, "contrl", "did you mean `control`?"),
        ({"mqtt": {"tls": {"ca_fiel": "x"}}}, "mqtt.tls.ca_fiel", "did you mean `ca_file`?"),
        (
            {"coolant": {"sensors": [{"id": "l", "kind": "leak", "topic": "t", "true_sate": "warning"}]}},
            "coolant.sensors[0].true_sate",
            "did you mean `true_state`?",
        ),
    ],
)
def test_unknown_key_suggests_the_closest_one(data: dict[str, Any], key: str, hint: str) -> None:
    with pytest.raises(configmod.ConfigError) as ei:
        configmod.validate(data)
    assert [(k, r) for k, r in ei.value.errors if k == key] == [(key, f"unknown key; {hint}")]


def test_unknown_key_far_from_any_gets_no_guess() -> None:
    with pytest.raises(configmod.ConfigError) as ei:
        configmod.validate({"mqtt": {"zzzzzz": 1}})
    assert ei.value.errors == [("mqtt.zzzzzz", "unknown key")]


def test_env_override_error_names_the_variable(tmp_path: Path) -> None:
    f = tmp_path / "ok.toml"
    f.write_text("[mqtt]\nport = 1883\n")
    r = run_check(f, {"RACKGUARD_MQTT__PORT": "abc", "RACKGUARD_HTTP__PORT": "9100"})
    assert r.returncode == 78
    assert r.stderr.splitlines() == [
        "config error: mqtt.port: Input should be a valid integer, unable to parse string as an integer "
        "(got 'abc') (from the environment: RACKGUARD_MQTT__PORT=abc)"
    ]


def test_env_variable_that_is_no_override_is_an_error() -> None:
    """``RACKGUARD_MQTT_PORT`` (one underscore) would be ignored silently; it is refused with the fix."""
    assert configmod.load(None, environ={"RACKGUARD_SIGN_KEY": "k"}).mqtt.port == 1883  # not ours: left alone
    with pytest.raises(configmod.ConfigError) as ei:
        configmod.load(None, environ={"RACKGUARD_MQTT_PORT": "1884", "RACKGUARD_SIGN_KEY": "k"})
    assert ei.value.errors == [
        (
            "RACKGUARD_MQTT_PORT",
            "not a config override (they are RACKGUARD_<SECTION>__<KEY>); did you mean RACKGUARD_MQTT__PORT?",
        )
    ]


def test_missing_relative_credential_says_credentials_directory_is_unset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(configmod.ConfigError) as ei:
        configmod.validate({"mqtt": {"username": "u", "password_file": "mqtt-password"}})
    [(key, reason)] = ei.value.errors
    assert key == "mqtt.password_file"
    assert reason.startswith(
        "cannot read 'mqtt-password': No such file or directory ($CREDENTIALS_DIRECTORY is unset"
    )
    assert f"looked in the working directory ({tmp_path})" in reason and "LoadCredential=" in reason


def test_missing_relative_credential_names_the_credentials_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    with pytest.raises(configmod.ConfigError) as ei:
        configmod.validate({"commands": {"hmac_secret_file": "cmd-hmac"}})
    assert ei.value.errors == [
        (
            "commands.hmac_secret_file",
            f"cannot read 'cmd-hmac': No such file or directory (looked in $CREDENTIALS_DIRECTORY ({tmp_path}))",
        )
    ]


# -- what run would reject, check-config rejects (#17) -----------------------------------


@pytest.mark.parametrize(
    "good", ["bms/#", "#", "+", "bms/+/leak", "+/+/#", "bms//x", "bms/r1/leak", "$SYS/x"]
)
def test_valid_topic_filters_pass(good: str) -> None:
    assert configmod.validate({"coolant": {"subscribe": [good]}}).coolant.subscribe == [good]


@pytest.mark.parametrize("bad", ["bms/#/x", "bms/+x", "x+", "#/", "bms/x#", "", "a\x00b", "##"])
def test_invalid_topic_filters_fail(bad: str) -> None:
    with pytest.raises(configmod.ConfigError) as ei:
        configmod.validate({"coolant": {"subscribe": ["ok/#", bad]}})
    assert [k for k, _ in ei.value.errors] == ["coolant.subscribe[1]"]


@pytest.mark.parametrize(
    "good", ["localhost", "broker.site1.example", "broker.example.", "10.0.0.1", "::1", "gpu_node-7"]
)
def test_valid_broker_hosts_pass(good: str) -> None:
    assert configmod.validate({"mqtt": {"host": good}}).mqtt.host == good


@pytest.mark.parametrize("bad", ["", " ", "a b", "-x", "x-", "a..b", "[::1]", "h:1883", "x" * 64, "a/b"])
def test_invalid_hosts_fail(bad: str) -> None:
    with pytest.raises(configmod.ConfigError) as ei:
        configmod.validate({"mqtt": {"host": bad}, "http": {"host": bad}})
    assert sorted(k for k, _ in ei.value.errors) == ["http.host", "mqtt.host"]


@pytest.mark.parametrize("good", ["127.0.0.1", "0.0.0.0", "::", "::1", "10.1.2.3", "localhost"])
def test_http_listens_on_an_address(good: str) -> None:
    assert configmod.validate({"http": {"host": good}}).http.host == good


def test_http_host_name_is_refused_not_resolved_at_start() -> None:
    """A name would need DNS when the agent starts (a failed lookup stopped it with exit 1)."""
    with pytest.raises(configmod.ConfigError) as ei:
        configmod.validate({"http": {"host": "nonexistent.invalid"}})
    assert ei.value.errors[0][0] == "http.host" and "IP address to listen on" in ei.value.errors[0][1]


@pytest.mark.parametrize("key", ["outbox.path", "power_limits.state_file", "mqtt.password_file"])
def test_paths_with_nul_fail(key: str) -> None:
    section, name = key.split(".")
    data: dict[str, Any] = {section: {name: "state/a\x00b"}}
    if section == "mqtt":
        data["mqtt"]["username"] = "u"
    with pytest.raises(configmod.ConfigError) as ei:
        configmod.validate(data)
    assert [k for k, _ in ei.value.errors] == [key]


def test_hmac_secret_minimum_is_32_bytes(tmp_path: Path) -> None:
    f = tmp_path / "k"
    f.write_text("k" * 32 + "\n")
    cfg = configmod.validate({"commands": {"hmac_secret_file": str(f)}})
    secret = cfg.commands.secret()
    assert secret is not None and secret.get_secret_value() == "k" * 32
    f.write_text("é" * 15 + "k\n")  # 31 bytes in UTF-8: the minimum counts bytes, not characters
    with pytest.raises(configmod.ConfigError) as ei:
        configmod.validate({"commands": {"hmac_secret_file": str(f)}})
    assert "31-byte secret; at least 32 bytes" in ei.value.errors[0][1]


def test_every_float_must_be_finite() -> None:
    """No float field anywhere takes inf or nan (TOML can write both)."""
    floats = [
        (section, name)
        for section, info in configmod.Config.model_fields.items()
        for name, f in info.annotation.model_fields.items()  # type: ignore[union-attr]
        if f.annotation in (float, float | None)
    ]
    assert len(floats) > 20
    for section, name in floats:
        for bad in (math.inf, -math.inf, math.nan):
            with pytest.raises(configmod.ConfigError) as ei:
                configmod.validate({section: {name: bad}})
            assert ei.value.errors[0][0] == f"{section}.{name}", (section, name, bad)
