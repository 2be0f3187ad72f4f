"""Must-show: a real Prometheus (Debian's) scrapes a simulated agent while ``sim-cdu`` plays faults.

The shipped alert rules (``deploy/prometheus/rackguard-alerts.yml``, with every ``for:``
shortened to 0 s) fire for the leak, the stale sensor and the cap held at ``safe_cap``;
every query of the shipped Grafana dashboard (``deploy/grafana/rackguard-node.json``)
returns data; ``promtool check metrics`` is clean on the agent's real scrape and
``promtool check rules`` on the shipped rules.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from rackguard.agent.mosquitto import free_port

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy/prometheus/rackguard-alerts.yml"
DASHBOARD = REPO / "deploy/grafana/rackguard-node.json"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"

# The CDU goes silent (stale after its max_age_s of 5 s), the supply probe sends garbage
# (rejected and counted), then the leak tray reads Critical (latched until acknowledged).
SCENARIO = """
duration_s = 120
[[events]]
at_s = 2
kind = "garbage"
sensor = "supply-probe"
for_s = 1.5
[[events]]
at_s = 5
kind = "silent"
sensor = "cdu"
for_s = 11.0
[[events]]
at_s = 19
kind = "leak"
sensor = "leak-tray"
state = "Critical"
"""


def dashboard_queries() -> list[str]:
    """Every target's expression, with the dashboard's variables filled in as Grafana would."""
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p["targets"]]
    return [e.replace("$instance", ".*").replace("$__rate_interval", "15s") for e in exprs]


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def need_prometheus() -> None:
    for tool in (PROMETHEUS, PROMTOOL):
        if not Path(tool).exists():
            pytest.fail(f"{tool} is missing: apt-get install -y prometheus")


def test_promtool_check_rules_and_dashboard_shape() -> None:
    need_prometheus()
    out = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 7 rules found" in out.stdout
    text = RULES.read_text()
    for alert in (
        "CoolantLeak",
        "CoolantStale",
        "CapAtSafeCap",
        "GpuLost",
        "FlowMarginLow",
        "PowerLimitWriteFailing",
    ):
        assert f"alert: Rackguard{alert}" in text
    assert "rackguard_coolant_flow_margin_ratio < 1.1" in text
    example = RULES.parent / "prometheus.example.yml"
    out = subprocess.run([PROMTOOL, "check", "config", str(example)], capture_output=True, text=True)
    assert out.returncode == 0 and "SUCCESS: 7 rules found" in out.stdout, out.stdout + out.stderr
    queries = dashboard_queries()
    assert len(queries) >= 20 and all("rackguard_" in q for q in queries)


def test_alerts_fire_and_every_dashboard_query_returns_data(broker: Any, tmp_path: Path) -> None:
    need_prometheus()
    http_port, prom_port = free_port(), free_port()
    # The shipped rules, with every hold time shortened so the test takes seconds, not minutes.
    rules = tmp_path / "rules.yml"
    rules.write_text(re.sub(r"for: \S+", "for: 0s", RULES.read_text()))
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files: [{rules}]\n"
        "scrape_configs:\n  - job_name: rackguard\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{http_port}']}}]\n"
    )
    scenario = tmp_path / "faults.toml"
    scenario.write_text(SCENARIO)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RACKGUARD_")}
    env |= {
        "RACKGUARD_MQTT__PORT": str(broker.port),
        "RACKGUARD_MQTT__HOST": broker.host,
        "RACKGUARD_HTTP__PORT": str(http_port),
        "RACKGUARD_SIM__GPUS": "2",
        "RACKGUARD_LOG__FORMAT": "json",
    }
    cli = [sys.executable, "-m", "rackguard.agent.cli"]
    cmds = [
        [*cli, "run", "--config", "examples/sim.toml"],
        [
            PROMETHEUS,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
            "--log.level=warn",
        ],
        # Started once Prometheus scrapes the agent, so the scenario's clock starts then.
        [*cli, "sim-cdu", "--config", "examples/sim.toml", "--scenario", str(scenario), "--period-s", "0.25"],
    ]
    logs = [(tmp_path / f"proc{i}.log").open("wb") for i in range(len(cmds))]

    def start(i: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(cmds[i], cwd=REPO, env=env, stdout=logs[i], stderr=subprocess.STDOUT)

    procs = [start(0), start(1)]
    api = f"http://127.0.0.1:{prom_port}/api/v1"
    try:
        # Each evaluation's firing alerts, in order: (alertname, sensor) pairs.
        history: list[set[tuple[str, str]]] = []
        wanted = {"RackguardCoolantLeak", "RackguardCoolantStale", "RackguardCapAtSafeCap"}
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            time.sleep(0.5)
            try:
                alerts = get_json(f"{api}/alerts")["data"]["alerts"]
                up = get_json(f"{api}/query?query=up")["data"]["result"]
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                continue  # Prometheus is still starting
            if not up or up[0]["value"][1] != "1":
                continue
            if len(procs) == 2:
                procs.append(start(2))
            history.append(
                {
                    (a["labels"]["alertname"], a["labels"].get("sensor", ""))
                    for a in alerts
                    if a["state"] == "firing"
                }
            )
            if any(("RackguardCoolantLeak", "leak-tray") in h for h in history):
                break
        fired = {name for h in history for name, _ in h}
        assert wanted <= fired, (fired, history)
        # The stale alert fired for the CDU the scenario silenced, after a time with nothing stale
        # (before sim-cdu's first readings every declared sensor is stale too).
        calm = next(i for i, h in enumerate(history) if not any(n == "RackguardCoolantStale" for n, _ in h))
        stale_at = next(
            i for i, h in enumerate(history) if i > calm and ("RackguardCoolantStale", "cdu") in h
        )
        # safe_cap was held while the CDU was stale; the leak then took the cap below it.
        assert any(("RackguardCapAtSafeCap", "") in h for h in history[stale_at:]), history
        leak = get_json(f"{api}/query?query=" + urllib.parse.quote("rackguard_cap_reason{reason='leak'}"))
        assert leak["data"]["result"][0]["value"][1] == "1"

        empty = []
        for q in dashboard_queries():
            result = get_json(f"{api}/query?query={urllib.parse.quote(q)}")["data"]["result"]
            if not result:
                empty.append(q)
        assert not empty, f"dashboard queries with no data: {empty}"

        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as r:
            scrape = r.read()
        check = subprocess.run([PROMTOOL, "check", "metrics"], input=scrape, capture_output=True)
        assert check.returncode == 0 and not check.stdout.strip() and not check.stderr.strip(), (
            check.stdout.decode() + check.stderr.decode()
        )
        families = {line.split()[2] for line in scrape.decode().splitlines() if line.startswith("# TYPE")}
        assert "rackguard_coolant_leak_detector_state" in families
        assert 'rackguard_gpu_energy_joules_total{gpu="0",uuid="' in scrape.decode()
        assert "# TYPE rackguard_gpu_energy_joules_total counter" in scrape.decode()
    finally:
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
        print(*((tmp_path / f"proc{i}.log").read_text()[-3000:] for i in range(len(cmds))), sep="\n----\n")
    assert [procs[0].returncode, procs[2].returncode] == [0, 0]  # the agent and sim-cdu


def test_gpu_identified_late_moves_its_series_to_the_uuid() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from rackguard.agent.metrics import Metrics

    m = Metrics()
    m.set_gpu_uuid(0, "")  # not identified at start
    m.gpu_power_w.labels(*m.gpu(0)).set(100.0)
    m.gpu_energy_j.labels(*m.gpu(0)).inc(5.0)
    m.set_gpu_uuid(0, "GPU-abc")
    m.gpu_power_w.labels(*m.gpu(0)).set(200.0)

    def samples(name: str) -> list[tuple[dict[str, str], float]]:
        fams = {f.name: f for f in text_string_to_metric_families(m.render().decode())}
        return [(s.labels, s.value) for s in fams[name].samples if not s.name.endswith("_created")]

    assert samples("rackguard_gpu_power_watts") == [({"gpu": "0", "uuid": "GPU-abc"}, 200.0)]
    assert samples("rackguard_gpu_energy_joules") == []  # the old series is gone, not left stale
