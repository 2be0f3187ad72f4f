"""Host readings via psutil: CPU, load, memory, CPU temperature, and the agent's own cost."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import psutil

# psutil.sensors_temperatures() chip names that measure the CPU package/cores.
CPU_TEMP_CHIPS = (
    "coretemp",
    "k10temp",
    "zenpower",
    "cpu_thermal",
    "cpu-thermal",
    "soc_thermal",
    "x86_pkg_temp",
)

_MIB = 1024.0 * 1024.0


@dataclass(frozen=True, slots=True)
class HostSample:
    """One read of the host. ``t_s`` is wall-clock seconds when it was read.

    Attributes:
        cpu_pct: whole-machine CPU use since the previous read, 0-100.
        load1, load5, load15: load averages.
        mem_used_pct: used memory, 0-100.
        mem_available_mb: memory available to new processes, MiB.
        cpu_temp_c: hottest CPU sensor reading, or None where there is none.
        agent_cpu_pct: this process's CPU use since the previous read, in % of
            one core (can exceed 100 with several busy threads).
        agent_rss_mb: this process's resident memory, MiB.
    """

    t_s: float
    cpu_pct: float
    load1: float
    load5: float
    load15: float
    mem_used_pct: float
    mem_available_mb: float
    cpu_temp_c: float | None
    agent_cpu_pct: float
    agent_rss_mb: float


def cpu_temp_c() -> float | None:
    """Max current reading of the known CPU temperature chips; None where unavailable."""
    read = getattr(psutil, "sensors_temperatures", None)  # missing on some platforms
    if read is None:
        return None
    try:
        chips = read()
    except (OSError, RuntimeError):
        return None
    temps = [
        t.current
        for chip in CPU_TEMP_CHIPS
        for t in chips.get(chip, ())
        if t.current is not None and math.isfinite(t.current) and 0 < t.current < 150  # drop bogus readings
    ]
    return float(max(temps)) if temps else None


class HostSensor:
    """Cheap, non-blocking host readings, for once per publish period.

    CPU percentages are measured between consecutive ``read`` calls (the first
    interval starts at construction).
    """

    def __init__(self) -> None:
        self._proc = psutil.Process(os.getpid())
        # Prime the non-blocking counters: the next call reports use since now.
        psutil.cpu_percent(interval=None)
        self._proc.cpu_percent(interval=None)

    def read(self) -> HostSample:
        """Read the host now. Does not block beyond a few small /proc reads."""
        t_s = time.time()
        cpu_pct = psutil.cpu_percent(interval=None)
        load1, load5, load15 = psutil.getloadavg()
        vm = psutil.virtual_memory()
        with self._proc.oneshot():
            agent_cpu_pct = self._proc.cpu_percent(interval=None)
            rss_b = self._proc.memory_info().rss
        return HostSample(
            t_s=t_s,
            cpu_pct=float(cpu_pct),
            load1=float(load1),
            load5=float(load5),
            load15=float(load15),
            mem_used_pct=float(vm.percent),
            mem_available_mb=vm.available / _MIB,
            cpu_temp_c=cpu_temp_c(),
            agent_cpu_pct=float(agent_cpu_pct),
            agent_rss_mb=rss_b / _MIB,
        )
