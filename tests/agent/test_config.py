"""Config: every kind of error exits 78 and names the key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


def test_shipped_example_is_valid() -> None:
    r = run_check(REPO / "examples" / "sim.toml")
    assert r.returncode == 0, r.stderr
