"""The README's set-up commands stay true."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"## Try it: two commands\s+```sh\n(.*?)```", text, re.S)
    assert block, "README must open with the two set-up commands"
    return [ln.strip() for ln in block.group(1).splitlines() if ln.strip()]


def test_readme_opens_with_exactly_two_commands() -> None:
    cmds = readme_commands()
    assert len(cmds) == 2
    assert cmds[0].startswith("python3 -m pip install -e")
    assert cmds[1].startswith("rackguard demo")


def test_readme_demo_command_shows_live_readings() -> None:
    cmd = readme_commands()[1].split()
    assert cmd[0] == "rackguard"
    args = [a if a != "60" else "4" for a in cmd[1:]]  # same command, shorter run
    r = subprocess.run(
        [sys.executable, "-m", "rackguard.agent.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "status: online (8 GPUs" in r.stdout
    lines = [ln for ln in r.stdout.splitlines() if re.match(r"\s+\d+\s+8/8\s", ln)]
    assert len(lines) >= 2, r.stdout


def test_readme_test_command_is_what_ci_runs() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()
    block = re.search(r"To run the tests.*?```sh\n(.*?)\n```", readme, re.S)
    assert block, "README must give the test command"
    command = block.group(1).strip()
    assert command.startswith("python3 -m pytest -q")
    assert command in ci.splitlines()


def test_readme_toml_examples_are_valid_config() -> None:
    import tomllib

    from rackguard.agent import config as configmod

    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", text, re.S)
    assert blocks
    for block in blocks:
        configmod.validate(tomllib.loads(block))  # raises ConfigError naming the key
