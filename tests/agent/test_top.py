"""Must-show: ``rackguard top`` in a real terminal (tmux) shows GPU rows, the cap and a leak alarm.

A simulated agent and ``sim-cdu`` (a leak at 2 s) publish through mosquitto; ``top``
runs inside a tmux pane and the test reads the screen with ``capture-pane``.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from rackguard.agent.messages import Claim, ClassDemand, dump
from rackguard.agent.top import TopState

REPO = Path(__file__).resolve().parents[2]


class Tmux:
    """One tmux server on a private socket, one session."""

    def __init__(self, tmp: Path, command: str) -> None:
        self.sock = str(tmp / "tmux.sock")
        subprocess.run(
            ["tmux", "-S", self.sock, "new-session", "-d", "-s", "top", "-x", "160", "-y", "48", command],
            check=True,
        )

    def screen(self) -> str:
        out = subprocess.run(
            ["tmux", "-S", self.sock, "capture-pane", "-p", "-t", "top"], capture_output=True, text=True
        )
        return out.stdout

    def keys(self, *keys: str) -> None:
        subprocess.run(["tmux", "-S", self.sock, "send-keys", "-t", "top", *keys], check=True)

    def wait(self, pred: Callable[[str], bool], timeout_s: float = 30.0) -> str:
        deadline = time.monotonic() + timeout_s
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen()
            if pred(screen):
                return screen
            time.sleep(0.25)
        raise AssertionError(f"screen never matched:\n{screen}")

    def alive(self) -> bool:
        return (
            subprocess.run(
                ["tmux", "-S", self.sock, "has-session", "-t", "top"], capture_output=True
            ).returncode
            == 0
        )

    def kill(self) -> None:
        subprocess.run(["tmux", "-S", self.sock, "kill-server"], capture_output=True)


def test_top_in_tmux_shows_gpus_cap_and_leak_alarm(broker: Any, tmp_path: Path) -> None:
    if not shutil.which("tmux"):
        pytest.fail("tmux is not installed: apt-get install -y tmux")
    scenario = tmp_path / "leak.toml"
    scenario.write_text(
        'duration_s = 120\n[[events]]\nat_s = 2\nkind = "leak"\nsensor = "leak-tray"\nstate = "Critical"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RACKGUARD_")}
    env |= {
        "RACKGUARD_MQTT__PORT": str(broker.port),
        "RACKGUARD_MQTT__HOST": broker.host,
        "RACKGUARD_HTTP__PORT": "0",
        "RACKGUARD_SIM__GPUS": "2",
        "RACKGUARD_LOG__FORMAT": "json",
    }
    cli = [sys.executable, "-m", "rackguard.agent.cli"]
    logs = [(tmp_path / f"p{i}.log").open("wb") for i in range(2)]
    procs = [
        subprocess.Popen(c, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        for c, log in zip(
            [
                [*cli, "run", "--config", "examples/sim.toml"],
                [
                    *cli,
                    "sim-cdu",
                    "--config",
                    "examples/sim.toml",
                    "--scenario",
                    str(scenario),
                    "--period-s",
                    "0.25",
                ],
            ],
            logs,
            strict=True,
        )
    ]
    script = tmp_path / "top.sh"
    exports = " ".join(
        f"{k}={shlex.quote(v)}" for k, v in env.items() if k.startswith(("RACKGUARD_", "PYTHONPATH", "PATH"))
    )
    script.write_text(
        f"cd {shlex.quote(str(REPO))} && env -u COLUMNS -u LINES {exports} {shlex.quote(sys.executable)} -m rackguard.agent.cli "
        f"top --config examples/sim.toml 2>{tmp_path / 'top.err'} || sleep 30\n"
    )
    tmux = Tmux(tmp_path, f"bash {shlex.quote(str(script))}")
    try:
        screen = tmux.wait(lambda s: "GPU 0" in s and "GPU 1" in s and "LEAK ALARM" in s, 40)
        assert "sim-node-1 ONLINE" in screen, screen
        gpu_rows = [line for line in screen.splitlines() if re.match(r"\s*GPU \d", line)]
        assert len(gpu_rows) == 2, screen
        for row in gpu_rows:
            cells = row.split()
            assert cells[2] == "OK", row  # GPU n, state, power W / limit ...
            assert float(cells[3]) > 0, row  # power
        # The leak took the cap to 0 with reason leak; the alarm names the detector and its latch.
        assert "cap 0 (safe_cap 8) reason leak binding safety" in screen, screen
        assert "LEAK ALARM sim-node-1 leak-tray: reads CRITICAL, latched CRITICAL" in screen, screen
        assert "coolant: supply" in screen and "margin" in screen
        # A key changes the scope: the rack view has one row per node.
        tmux.keys("r")
        screen = tmux.wait(lambda s: "scope: rack demo/r1" in s)
        row = next((line for line in screen.splitlines() if line.strip().startswith("sim-node-1")), "")
        assert "ONLINE" in row and "2/2" in row and "leak" in row and "CRITICAL" in row, screen
        tmux.keys("q")
        deadline = time.monotonic() + 10
        while tmux.alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not tmux.alive(), "q did not quit top"
        assert "Traceback" not in (tmp_path / "top.err").read_text()
    finally:
        tmux.kill()
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        for log in logs:
            log.close()


def test_top_state_ignores_garbage_and_history() -> None:
    t = [100.0]
    s = TopState(monotonic=lambda: t[0])
    s.handle("rackguard/s/r/n/telemetry", b"\xff not json")
    s.handle("rackguard/s/r/n/cap", b"[1, 2]")
    s.handle("other/s/r/n/cap", b"{}")
    assert s.rejected == 3 and not s.nodes
    s.handle("rackguard/s/r/n/status", b'{"state": "online", "publish_period_s": 1.0}')
    s.handle("rackguard/s/r/n/telemetry", b'{"historical": true, "gpus": []}')
    assert s.nodes[("s", "r", "n")].state(t[0]) == "STALE"  # history is not the present
    s.handle("rackguard/s/r/n/telemetry", b'{"gpus": []}')
    assert s.nodes[("s", "r", "n")].state(t[0]) == "ONLINE"
    t[0] += 3.5
    assert s.nodes[("s", "r", "n")].state(t[0]) == "STALE"
    s.handle("rackguard/s/r/n/status", b'{"state": "offline"}')
    assert s.nodes[("s", "r", "n")].state(t[0]) == "OFFLINE"


def _claim(node: str, share_w: int, fallback: bool = False) -> bytes:
    return dump(
        Claim(
            node=node,
            inc=1,
            seq=3,
            t_s=0.0,
            heat_w=share_w,
            power_w=share_w,
            floor_w=300,
            demand=[ClassDemand(cls="default", prio=0, demand_w=share_w)],
            cap_total=16,
            share_w=share_w,
            next_w=share_w,
            view="v",
            cfg="c",
            capacity_w=6000,
            budget_w=6000,
            degraded_w=3000,
            fallback=fallback,
        )
    )


def test_top_shows_each_nodes_rack_share_and_the_rack_split() -> None:
    s = TopState(monotonic=lambda: 0.0, scope="rack")
    assert "s/+/+/claim" in " ".join(TopState(site="s").topic_filters())
    s.handle("rackguard/s/r/n0/claim", _claim("n0", 2500))
    s.handle("rackguard/s/r/n1/claim", _claim("n1", 1500, fallback=True))
    console = Console(width=160, record=True)
    console.print(s.render())
    screen = console.export_text()
    row = next(line for line in screen.splitlines() if line.startswith("n0"))
    assert "2500" in row
    assert "rack: shares 4000 W of capacity 6000 W (2 claims)" in screen
    assert "fallback: n1" in screen
    s.set_scope("node")
    console = Console(width=160, record=True)
    console.print(s.render())
    assert "rack share 2500 W of 6000 W" in console.export_text()
