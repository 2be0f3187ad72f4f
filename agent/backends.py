"""The GPU backend a config names, and the host sensor.

Backends are looked up by name (``sensors.backend``) so the daemon depends on the
:class:`~rackguard.sensors.base.GpuBackend` interface only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rackguard.agent import log as logmod
from rackguard.agent.config import Config
from rackguard.sensors.base import GpuBackend


def _nvml(cfg: Config) -> GpuBackend:
    from rackguard.sensors.nvml import NvmlBackend

    return NvmlBackend(indices=cfg.sensors.gpu_indices)


def _sim(cfg: Config) -> GpuBackend:
    """Simulated GPUs alone: they serve what is offered, as a node whose servers ignore the cap would.

    ``rackguard run`` and ``rackguard demo`` also start the node's servers
    (:class:`rackguard.sim.node.SimServers`, which obey the cap); an ``Agent(cfg)`` built in a
    test or benchmark gets the GPUs alone.
    """
    from rackguard.sim.node import from_config

    return from_config(cfg, servers_in_charge=False)[0]


FACTORIES: dict[str, Callable[[Config], GpuBackend]] = {"nvml": _nvml, "sim": _sim}


# What to try when a backend cannot open (the daemon logs it beside the error).
OPEN_HINTS: dict[str, str] = {
    "nvml": "no usable NVIDIA GPU or driver here? `rackguard demo` runs a simulated node with no GPU or "
    'broker; `rackguard run --sim` (sensors.backend = "sim") simulates the GPUs',
}


def make_backend(cfg: Config) -> GpuBackend:
    """The GPU backend named by ``sensors.backend``."""
    return FACTORIES[cfg.sensors.backend](cfg)


def host_sensor() -> Any:
    """The psutil host sensor, or None where it cannot start (host stats are best effort)."""
    try:
        from rackguard.sensors.host import HostSensor

        return HostSensor()
    except Exception as exc:
        logmod.get("agent").warning("host_sensor_unavailable", error=str(exc))
        return None
