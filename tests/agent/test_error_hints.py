"""Errors say what to do: no NVML points at --sim and demo, a busy port names http.port."""

from __future__ import annotations

import socket

import pytest

from rackguard.agent import config as configmod
from rackguard.agent.daemon import Agent
from rackguard.agent.localbus import LocalBroker
from rackguard.sensors.base import GpuInfo, SensorError
from rackguard.sim.node import SimBackend


class NoDriver(SimBackend):
    """The NVML boundary on a machine without the driver: opening fails as NVML's does."""

    name = "nvml"

    def open(self) -> list[GpuInfo]:
        raise SensorError("NVML init failed: NVML Shared Library Not Found [NVML_ERROR_LIBRARY_NOT_FOUND]")


def cfg(**over: object) -> configmod.Config:
    return configmod.validate(
        {"sensors": {"backend": "sim"}, "sim": {"gpus": 1}, "http": {"port": 0}, **over}
    )


async def test_no_nvml_hints_at_sim_and_demo(capsys: pytest.CaptureFixture[str]) -> None:
    assert await Agent(cfg(), NoDriver(1), client_factory=LocalBroker().client).run() == 1
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "backend_open_failed" in ln)
    assert "NVML Shared Library Not Found" in line
    assert "rackguard demo" in line and "rackguard run --sim" in line


async def test_http_port_in_use_names_http_port(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        agent = Agent(cfg(http={"port": port}), SimBackend(1), client_factory=LocalBroker().client)
        assert await agent.run() == 1
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "http_bind_failed" in ln)
    assert "http.port" in line and f"127.0.0.1:{port}" in line and "0 to turn HTTP off" in line
