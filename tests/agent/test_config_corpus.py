"""A corpus of malformed configs: each one makes ``check-config`` and ``run`` exit 78 naming its key.

The configs, their expected keys and the secret/TLS files they point at live in
``tests/data/bad_configs`` (see its ``manifest.toml``). ``check-config`` and ``run`` agree by
construction (both call ``rackguard.agent.commands.run.load``); the tests check that too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rackguard.agent import config as configmod
from rackguard.agent.commands import check_config
from rackguard.agent.commands import run as runcmd
from tests.agent.config_corpus import CORPUS, SECRETS, argv_for, cases, environ_for

REPO = Path(__file__).resolve().parents[2]
TLS = REPO / "tests" / "data" / "tls"
CASES = cases()


def corpus_results(mode: str) -> dict[str, tuple[int | str, str]]:
    """Run ``mode`` over the whole corpus in one subprocess: case → (exit code, stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RACKGUARD_")}
    r = subprocess.run(
        [sys.executable, "-m", "tests.agent.config_corpus", mode],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    out = {}
    for line in r.stdout.splitlines():
        row = json.loads(line)
        out[row["case"]] = (row["rc"], row["stderr"])
    assert set(out) == set(CASES)
    return out


@pytest.fixture(scope="module")
def checked() -> dict[str, tuple[int | str, str]]:
    return corpus_results("check-config")


@pytest.fixture(scope="module")
def ran() -> dict[str, tuple[int | str, str]]:
    return corpus_results("run")


def assert_names_key(name: str, rc: int | str, stderr: str) -> None:
    case = CASES[name]
    key = str(CORPUS / name) if case["key"] == "FILE" else case["key"]
    assert rc == 78, f"{name}: exit {rc!r}\n{stderr}"
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.startswith("config error: ")]
    assert len(lines) == 1, f"{name}: want one error, got {lines}"
    assert lines[0].startswith(f"config error: {key}: "), f"{name}: want key {key!r}, got {lines[0]!r}"
    assert case.get("words", "") in lines[0], f"{name}: want {case.get('words')!r} in {lines[0]!r}"


def test_corpus_is_large_and_every_file_is_listed() -> None:
    assert len(CASES) >= 60
    assert {p.name for p in CORPUS.glob("*.toml")} - {"manifest.toml"} == set(CASES)
    kinds = {Path(name).stem.split("-")[0] for name in CASES}
    assert {
        "binary",
        "deep",
        "filter",
        "mqtt",
        "http",
        "cap",
        "ca",
        "key",
        "password",
        "hmac",
        "env",
    } <= kinds


@pytest.mark.parametrize("name", sorted(CASES))
def test_check_config_exits_78_naming_the_key(name: str, checked: dict[str, tuple[int | str, str]]) -> None:
    assert_names_key(name, *checked[name])


@pytest.mark.parametrize("name", sorted(CASES))
def test_run_exits_78_with_the_same_error(
    name: str, checked: dict[str, tuple[int | str, str]], ran: dict[str, tuple[int | str, str]]
) -> None:
    assert_names_key(name, *ran[name])
    assert ran[name][1] == checked[name][1]


@pytest.mark.parametrize(
    "name",
    [
        "binary.toml",
        "deep-inline-tables-5000.toml",
        "filter-hash-middle.toml",
        "cap-rise-inf.toml",
        "ca-not-a-cert.toml",
        "password-latin1.toml",
        "env-port.toml",
    ],
)
def test_run_as_its_own_process_exits_78(name: str) -> None:
    """Cases check-config used to pass (or that crashed), run the way systemd runs the agent."""
    r = subprocess.run(
        [sys.executable, "-m", "rackguard.agent.cli", *argv_for("run", CORPUS / name)],
        capture_output=True,
        text=True,
        env=environ_for(CASES[name]),
        cwd=REPO,
        timeout=60,
    )
    assert_names_key(name, r.returncode, r.stderr)


def test_check_config_and_run_use_one_loader(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    """Parity is structural: both commands (and SIGHUP) fail through ``configmod.load``."""
    assert check_config.load_or_exit is runcmd.load_or_exit
    seen: list[Path | None] = []

    def refuse(path: Path | None = None, **_: Any) -> configmod.Config:
        seen.append(path)
        raise configmod.ConfigError([("some.key", "refused by the one loader")])

    monkeypatch.setattr(configmod, "load", refuse)
    f = Path("x.toml")
    assert check_config.main(argparse.Namespace(file=f, print=False)) == 78
    assert runcmd.main(argparse.Namespace(config=f, sim=True)) == 78
    assert seen == [f, f]
    assert capsys.readouterr().err == "config error: some.key: refused by the one loader\n" * 2


def test_a_valid_config_with_every_file_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The corpus' secrets and TLS files, used correctly, are fine: the errors are about what is wrong."""
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(SECRETS))
    f = tmp_path / "good.toml"
    f.write_text(
        '[mqtt]\nhost = "broker.example."\nusername = "node"\npassword_file = "password"\n'
        '[mqtt.tls]\nca_file = "../../tls/ca.crt"\ncert_file = "../../tls/client.crt"\n'
        'key_file = "../../tls/client.key"\n'
        '[http]\nhost = "::1"\n[commands]\nhmac_secret_file = "hmac"\nrequire_signature = true\n'
        '[coolant]\nsubscribe = ["bms/r1/#", "bms/+/leak", "#"]\n'
    )
    cfg = configmod.load(f, environ={})
    assert cfg.mqtt.tls is not None and cfg.mqtt.tls.key_file == SECRETS / "../../tls/client.key"
    pw, key = cfg.mqtt.password(), cfg.commands.secret()
    assert pw is not None and pw.get_secret_value() == "node-password"
    assert key is not None and len(key.get_secret_value()) >= configmod.HMAC_SECRET_MIN_BYTES
    assert cfg.coolant.subscribe == ["bms/r1/#", "bms/+/leak", "#"]
