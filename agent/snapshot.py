"""One frozen picture of the node per tick, and the controllers' view of it.

On a tick that controls or publishes, the agent builds one :class:`NodeSnapshot` from the
GPU poller, the coolant monitor and the gate tracker; the control step and the telemetry
window of that tick read that one object, so what is decided and what is reported come
from the same readings. A leak or an operator command takes a fresh one between ticks.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from rackguard.agent.coolant_monitor import CoolantMonitor
from rackguard.agent.gate_reports import GateTracker
from rackguard.agent.sensing import GpuState, GpuStateName
from rackguard.controllers.api import CoolantObs, GpuObs, NodeShare, Observation
from rackguard.sensors.base import GpuSample
from rackguard.sensors.coolant import CoolantSnapshot


@dataclass(frozen=True, slots=True)
class GpuSnapshot:
    """One GPU in a snapshot.

    Attributes:
        index: GPU index.
        uuid: GPU UUID ("" while not yet identified).
        state: ``ok`` or ``lost``.
        sample: The last good sample while ``ok``, else None.
        in_flight: Requests in flight from fresh gate reports, or None.
    """

    index: int
    uuid: str
    state: GpuStateName
    sample: GpuSample | None
    in_flight: float | None


@dataclass(frozen=True, slots=True)
class NodeSnapshot:
    """Everything the node knows at one instant.

    Attributes:
        t_s: Wall-clock seconds when the snapshot was taken.
        mono_s: Monotonic seconds, same instant.
        gpus: Per GPU.
        coolant: The coolant loop, or None when no coolant sensor is declared (unknown, not stale).
        caps: The caps in force, used as the concurrency of a GPU no gate reports for.
    """

    t_s: float
    mono_s: float
    gpus: tuple[GpuSnapshot, ...]
    coolant: CoolantSnapshot | None
    caps: tuple[int, ...] | None = None

    @property
    def gpu_power_w(self) -> float | None:
        """Electrical power of the node's GPUs, or None if any GPU's is unknown."""
        return gpu_power_w(g.sample for g in self.gpus)


def gpu_power_w(samples: Iterable[GpuSample | None]) -> float | None:
    """Sum of sample powers, or None if there is none or any is unknown."""
    powers = [s.power_w if s is not None else None for s in samples]
    if not powers or any(p is None for p in powers):
        return None
    return float(sum(p for p in powers if p is not None))


def take(
    gpus: Sequence[GpuState],
    coolant: CoolantMonitor,
    gates: GateTracker,
    caps: tuple[int, ...] | None = None,
) -> NodeSnapshot:
    """Freeze the poller's GPUs, the coolant monitor and the gates' in-flight counts."""
    in_flight = gates.in_flight(len(gpus))
    frozen = tuple(
        GpuSnapshot(
            index=g.info.index,
            uuid=g.info.uuid,
            state=g.state,
            sample=g.sample if g.state == "ok" else None,
            in_flight=in_flight[i] if i < len(in_flight) else None,
        )
        for i, g in enumerate(gpus)
    )
    power = gpu_power_w(g.sample for g in frozen)
    return NodeSnapshot(
        t_s=time.time(),
        mono_s=time.monotonic(),
        gpus=frozen,
        coolant=coolant.snapshot(power) if coolant.sensors else None,
        caps=caps,
    )


def observation(
    snap: NodeSnapshot, share: NodeShare | None = None, flow_fraction: float = 1.0
) -> Observation:
    """The controllers' view of a snapshot (the only conversion there is).

    Args:
        snap: The snapshot.
        share: The node's rack share (None outside a rack).
        flow_fraction: The node's part of the measured flow (in a rack the CDU's flow is the
            whole rack's; the node's cold plates get its weight's part).
    """
    gpus = []
    for i, g in enumerate(snap.gpus):
        s = g.sample
        if g.in_flight is not None:
            concurrency = g.in_flight
        elif snap.caps is not None and i < len(snap.caps):
            concurrency = float(snap.caps[i])
        else:
            concurrency = 0.0
        gpus.append(
            GpuObs(
                gpu_temp_c=s.gpu_temp_c if s else None,
                mem_temp_c=s.mem_temp_c if s else None,
                power_w=s.power_w if s else None,
                concurrency=concurrency,
                lost=g.state == "lost",
            )
        )
    c = snap.coolant
    coolant = (
        CoolantObs()
        if c is None
        else CoolantObs(
            supply_temp_c=c.supply_temp_c,
            flow_lpm=None if c.flow_lpm is None else c.flow_lpm * flow_fraction,
            stale=c.stale,
            leak=c.leak,
        )
    )
    return Observation(t_s=snap.mono_s, gpus=tuple(gpus), coolant=coolant, share=share)
