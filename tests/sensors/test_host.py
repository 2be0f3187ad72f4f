"""HostSensor with real psutil; the temperature chip selection with a stubbed sensor list."""

from __future__ import annotations

import math
import time
from typing import NamedTuple

import psutil
import pytest

from rackguard.sensors import host
from rackguard.sensors.host import HostSample, HostSensor


class Temp(NamedTuple):  # the shape of psutil.sensors_temperatures() entries
    label: str
    current: float
    high: float | None
    critical: float | None


def test_read_is_sane() -> None:
    sensor = HostSensor()
    sum(i * i for i in range(200_000))  # burn a little CPU between reads
    s = sensor.read()
    assert isinstance(s, HostSample)
    assert abs(s.t_s - time.time()) < 60
    assert 0 <= s.cpu_pct <= 100
    assert min(s.load1, s.load5, s.load15) >= 0
    assert 0 < s.mem_used_pct <= 100
    assert 0 < s.mem_available_mb < psutil.virtual_memory().total / 2**20
    assert s.cpu_temp_c is None or (isinstance(s.cpu_temp_c, float) and 0 < s.cpu_temp_c < 150)
    assert s.agent_cpu_pct >= 0
    assert 1 < s.agent_rss_mb < 100_000
    assert all(math.isfinite(v) for v in (s.cpu_pct, s.load1, s.mem_available_mb, s.agent_rss_mb))


def test_repeated_reads_are_independent_and_frozen() -> None:
    sensor = HostSensor()
    a, b = sensor.read(), sensor.read()
    assert b.t_s >= a.t_s
    with pytest.raises(AttributeError):
        a.cpu_pct = 1.0  # type: ignore[misc]


def test_cpu_temp_is_max_of_cpu_chips_only(monkeypatch: pytest.MonkeyPatch) -> None:
    chips = {
        "coretemp": [Temp("Package id 0", 61.0, 80.0, 100.0), Temp("Core 0", 58.0, 80.0, 100.0)],
        "k10temp": [Temp("Tctl", 64.5, None, None)],
        "nvme": [Temp("Composite", 90.0, 80.0, 85.0)],  # not a CPU
        "acpitz": [Temp("", 99.0, None, None)],
    }
    monkeypatch.setattr(psutil, "sensors_temperatures", lambda: chips)
    assert host.cpu_temp_c() == 64.5
    chips["coretemp"].append(Temp("Core 9", 0.0, None, None))  # bogus readings are ignored
    chips["k10temp"] = [Temp("Tctl", float("nan"), None, None)]
    assert host.cpu_temp_c() == 61.0


def test_cpu_temp_none_without_sensors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(psutil, "sensors_temperatures", lambda: {})
    assert host.cpu_temp_c() is None
    monkeypatch.delattr(psutil, "sensors_temperatures")
    assert host.cpu_temp_c() is None
