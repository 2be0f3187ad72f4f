"""The power-limit actuator, with a fake at the NVML boundary (never a real GPU's limits)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from rackguard.agent import config as configmod
from rackguard.agent.actuators import PowerLimitSink
from rackguard.agent.commands import restore_power_limits
from rackguard.agent.daemon import Agent
from rackguard.agent.localbus import LocalBroker
from rackguard.agent.power_limits import PowerLimitActuator, PowerLimitError, load_state, restore
from rackguard.agent.routes import health
from rackguard.controllers.api import Decision
from rackguard.sensors.base import Capability, GpuInfo, SensorError
from rackguard.sim.node import SimBackend

INFOS = [
    GpuInfo(index=i, uuid=f"GPU-{i}", name="fake", power_limit_min_w=200.0, power_limit_max_w=700.0)
    for i in range(2)
]


class FakeDevice:
    """Records writes; ``fail`` makes writes to those GPUs raise like NvmlBackend does."""

    def __init__(self, limits_w: dict[int, float]) -> None:
        self.limits_w = dict(limits_w)
        self.writes: list[tuple[int, float]] = []
        self.fail: set[int] = set()

    def get_power_limit_w(self, index: int) -> float | None:
        return self.limits_w[index]

    def set_power_limit_w(self, index: int, watts: float) -> None:
        if index in self.fail:
            raise SensorError(f"gpu {index}: Insufficient Permissions")
        self.writes.append((index, watts))
        self.limits_w[index] = watts


def decision(reason: str = "mpc") -> Decision:
    return Decision(caps=(8, 8), reason=reason, binding="none")  # type: ignore[arg-type]


def test_budget_split_min_on_safety_clamp_and_writes_only_on_change(tmp_path: Path) -> None:
    dev = FakeDevice({0: 700.0, 1: 650.0})
    state = tmp_path / "state" / "power_limits.json"
    act = PowerLimitActuator(INFOS, dev, state, budget_w=900.0)
    act.start()
    assert [(s.uuid, s.original_w) for s in load_state(state)] == [("GPU-0", 700.0), ("GPU-1", 650.0)]
    assert dev.writes == []  # saved before any write
    assert act.apply(decision()) == [0, 1] and dev.writes == [(0, 450.0), (1, 450.0)]
    assert act.apply(decision()) == [] and len(dev.writes) == 2  # unchanged: no write
    act.apply(decision("leak"))
    act.apply(decision("thermal"))
    assert dev.writes[2:] == [(0, 200.0), (1, 200.0)]  # device minimum, written once
    act.budget_w = 100.0  # below the minimum: clamped
    act.apply(decision())
    assert dev.writes[4:] == []  # already at 200 W
    act.budget_w = 5_000.0  # above the maximum: clamped
    act.apply(decision())
    assert dev.writes[4:] == [(0, 700.0), (1, 700.0)]
    assert act.restore() == [] and dev.limits_w == {0: 700.0, 1: 650.0} and not state.exists()


def test_gpu_not_identified_at_start_is_never_read_or_written(tmp_path: Path) -> None:
    class Strict(FakeDevice):
        def get_power_limit_w(self, index: int) -> float | None:
            assert index != 1, "the unidentified GPU must not be asked"
            return super().get_power_limit_w(index)

    dev = Strict({0: 700.0})
    infos = [INFOS[0], GpuInfo(index=1, uuid="", name="")]  # as NvmlBackend.open() lists it
    state = tmp_path / "power_limits.json"
    act = PowerLimitActuator(infos, dev, state, budget_w=900.0)
    act.start()
    assert [s.index for s in load_state(state)] == [0]
    act.apply(decision("leak"))
    assert dev.writes == [(0, 200.0)]


def test_failed_write_is_an_error_and_crash_leftovers_keep_originals(tmp_path: Path) -> None:
    state = tmp_path / "power_limits.json"
    dev = FakeDevice({0: 700.0, 1: 700.0})
    act = PowerLimitActuator(INFOS, dev, state, budget_w=800.0)
    act.start()
    dev.fail = {1}
    with pytest.raises(PowerLimitError, match="gpu 1"):
        act.apply(decision())
    assert dev.writes == [(0, 400.0)]
    # "Crash": a new actuator finds the state file and keeps the true originals, not 400 W.
    dev.fail = set()
    act2 = PowerLimitActuator(INFOS, dev, state, budget_w=None)
    act2.start()
    assert act2.original_w == {0: 700.0, 1: 700.0}
    # What `rackguard restore-power-limits` does after a crash (matched by UUID).
    dev.limits_w[0] = 300.0
    assert restore(state, dev, INFOS) == [] and dev.limits_w[0] == 700.0 and not state.exists()
    assert restore(state, dev, INFOS) == []  # nothing to do


def test_restore_keeps_state_file_when_a_gpu_fails(tmp_path: Path) -> None:
    state = tmp_path / "power_limits.json"
    dev = FakeDevice({0: 700.0, 1: 700.0})
    PowerLimitActuator(INFOS, dev, state, budget_w=None).start()
    dev.fail = {0}
    errors = restore(state, dev, INFOS)
    assert len(errors) == 1 and "gpu 0" in errors[0] and state.exists()


def test_restore_command_without_state_file_exits_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    args = argparse.Namespace(config=None, state_file=tmp_path / "none.json")
    assert restore_power_limits.main(args) == 0
    assert "nothing to restore" in capsys.readouterr().out


@pytest.mark.parametrize(
    "body", ["{not json", '{"schema": "other"}', '{"schema": "%s"}', '{"schema": "%s", "gpus": [1]}']
)
def test_restore_command_with_corrupt_state_file_says_so_not_nvml(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], body: str
) -> None:
    import argparse

    from rackguard.agent.power_limits import STATE_SCHEMA

    state = tmp_path / "power_limits.json"
    state.write_text(body.replace("%s", STATE_SCHEMA))
    args = argparse.Namespace(config=None, state_file=state)
    assert restore_power_limits.main(args) == 1
    err = capsys.readouterr().err
    assert f"{state} is corrupt, so no power limit was restored" in err
    assert "NVML" not in err and state.exists()  # this machine has no NVML: it was never asked


class PowerSim(SimBackend):
    """The simulator plus a fake power-limit boundary."""

    capabilities = frozenset({Capability.POWER_LIMIT})

    def __init__(self, gpus: int) -> None:
        super().__init__(gpus)
        self.dev = FakeDevice({i: 700.0 for i in range(gpus)})
        self.get_power_limit_w = self.dev.get_power_limit_w
        self.set_power_limit_w = self.dev.set_power_limit_w


async def test_agent_writes_limits_and_restores_them_on_shutdown(tmp_path: Path) -> None:
    state = tmp_path / "pl.json"
    cfg = configmod.validate(
        {
            "node": {"name": "pl"},
            "sensors": {"backend": "sim", "poll_period_s": 0.05, "slow_period_s": 0.1},
            "telemetry": {"publish_period_s": 0.2},
            "control": {"period_s": 0.1, "node_power_budget_w": 1000.0},
            "http": {"port": 0},
            "sim": {"gpus": 2},
            "power_limits": {"enabled": True, "state_file": str(state), "min_on_reasons": ["gpu_lost"]},
        }
    )
    backend = PowerSim(2)
    agent = Agent(cfg, backend, client_factory=LocalBroker().client)
    task = asyncio.create_task(agent.run())
    try:
        for _ in range(200):
            if backend.dev.writes:
                break
            await asyncio.sleep(0.02)
        assert json.loads(state.read_text())["gpus"][0]["original_w"] == 700.0
        assert sorted(backend.dev.writes[:2]) == [(0, 500.0), (1, 500.0)]
        backend.lose_gpu(1)  # reason gpu_lost → every GPU at its minimum
        for _ in range(200):
            if (0, 200.0) in backend.dev.writes:
                break
            await asyncio.sleep(0.02)
        assert (0, 200.0) in backend.dev.writes and (1, 200.0) in backend.dev.writes
    finally:
        agent.request_stop("test")
        assert await asyncio.wait_for(task, 10) == 0
    assert backend.dev.limits_w == {0: 700.0, 1: 700.0} and not state.exists()


async def test_failed_write_makes_healthz_503_until_a_retry_succeeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = configmod.validate(
        {
            "node": {"name": "pl"},
            "sensors": {"backend": "sim", "poll_period_s": 0.05, "slow_period_s": 0.1},
            "control": {"period_s": 0.1, "node_power_budget_w": 1000.0},
            "http": {"port": 0},
            "sim": {"gpus": 2},
            "power_limits": {"enabled": True, "state_file": str(tmp_path / "pl.json")},
        }
    )
    backend = PowerSim(2)
    backend.dev.fail = {1}
    agent = Agent(cfg, backend, client_factory=LocalBroker().client)
    monkeypatch.setattr(PowerLimitSink, "RETRY_S", 0.3)
    task = asyncio.create_task(agent.run())
    try:
        for _ in range(200):
            if agent.power_error is not None:
                break
            await asyncio.sleep(0.02)
        problems = health(agent)
        assert any(p.startswith("power limit write failed: gpu 1: setting 500 W failed") for p in problems)
        assert backend.dev.writes == [(0, 500.0)]
        backend.dev.fail = set()  # the write works again: the next retry (or decision) lands it
        for _ in range(200):
            if (1, 500.0) in backend.dev.writes:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.05)
        assert (1, 500.0) in backend.dev.writes and agent.power_error is None
        assert not any("power limit" in p for p in health(agent))
    finally:
        agent.request_stop("test")
        assert await asyncio.wait_for(task, 10) == 0


async def test_reloaded_control_budget_reaches_the_power_limit_writer(tmp_path: Path) -> None:
    data = {
        "node": {"name": "pl"},
        "sensors": {"backend": "sim", "poll_period_s": 0.05, "slow_period_s": 0.1},
        "telemetry": {"publish_period_s": 0.2},
        "control": {"period_s": 0.1, "node_power_budget_w": 1000.0},
        "http": {"port": 0},
        "sim": {"gpus": 2},
        "power_limits": {"enabled": True, "state_file": str(tmp_path / "pl.json")},
    }
    current = configmod.validate(data)
    backend = PowerSim(2)
    agent = Agent(current, backend, client_factory=LocalBroker().client, reload_config=lambda: current)
    task = asyncio.create_task(agent.run())
    try:
        for _ in range(200):
            if len(backend.dev.writes) >= 2:
                break
            await asyncio.sleep(0.02)
        assert sorted(backend.dev.writes[:2]) == [(0, 500.0), (1, 500.0)]
        data["control"] = {"period_s": 0.1, "node_power_budget_w": 800.0}
        current = configmod.validate(data)
        agent.reload()
        for _ in range(200):
            if (1, 400.0) in backend.dev.writes and (0, 400.0) in backend.dev.writes:
                break
            await asyncio.sleep(0.02)
        assert (0, 400.0) in backend.dev.writes and (1, 400.0) in backend.dev.writes
        assert agent.reload_kept == []
    finally:
        agent.request_stop("test")
        assert await asyncio.wait_for(task, 10) == 0
