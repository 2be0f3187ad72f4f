"""Plain data exchanged between the agent and the controllers.

The agent converts its sensor snapshot into an :class:`Observation`, a controller
returns a :class:`Decision` (one integer concurrency cap per GPU), and the
:class:`~rackguard.controllers.safety.SafetyLayer` may lower it further.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from rackguard.physics import WATER_CP_J_PER_KG_K, WATER_DENSITY_KG_PER_L, heat_w


@dataclass(frozen=True, slots=True)
class GpuObs:
    """One GPU as seen at one tick.

    Attributes:
        gpu_temp_c: Die temperature, or None if the read failed.
        mem_temp_c: HBM temperature, or None if unsupported/failed.
        power_w: Board power, or None if the read failed.
        concurrency: Requests in flight on this GPU now.
        lost: The GPU stopped answering.
    """

    gpu_temp_c: float | None
    mem_temp_c: float | None
    power_w: float | None
    concurrency: float
    lost: bool = False


@dataclass(frozen=True, slots=True)
class CoolantObs:
    """The node's coolant loop.

    Attributes:
        supply_temp_c: Supply temperature; None = no coolant sensors configured/known.
        flow_lpm: Flow through this node's cold plates; None = unknown.
        stale: A configured coolant sensor has no valid reading within max_age_s.
        leak: Leak detector state.
    """

    supply_temp_c: float | None = None
    flow_lpm: float | None = None
    stale: bool = False
    leak: Literal["ok", "warning", "critical"] = "ok"


@dataclass(frozen=True, slots=True)
class NodeShare:
    """This node's share of the rack, from the rack allocation (the rack issue).

    Attributes:
        power_w: GPU power the node may draw.
        coolant_heat_w: Heat the node may put into the coolant.
    """

    power_w: float
    coolant_heat_w: float


@dataclass(frozen=True, slots=True)
class Observation:
    """Everything a controller sees at one tick.

    Attributes:
        t_s: Monotonic seconds.
        gpus: One entry per GPU, in a fixed order.
        coolant: The node's coolant loop.
        share: The node's rack share this tick, or None outside a rack. It tightens
            ``Limits.node_power_budget_w``, and its heat replaces the limit from the node's flow
            (in a rack the measured flow is the whole rack's; the share is this node's part).
    """

    t_s: float
    gpus: tuple[GpuObs, ...]
    coolant: CoolantObs
    share: NodeShare | None = None


@dataclass(frozen=True, slots=True)
class Limits:
    """Limits and safety settings; temperature defaults are the H100's NVML thresholds.

    Attributes:
        gpu_temp_max_c: Die temperature limit (NVML "GPU max").
        mem_temp_max_c: HBM temperature limit (NVML "memory max").
        slowdown_c: Hardware slowdown temperature.
        margin_c: The MPC keeps predictions this far below the limits; the safety layer
            trips at slowdown_c - margin_c (die) and mem_temp_max_c (HBM), so every MPC
            target sits a gap below its trip (hysteresis). 2 K covers the measurement rounding (NVML reads
            whole °C) and the ±1 K the die swings with power noise between control steps
            (BENCHMARKS.md, "Controllers": margin sweep).
        node_power_budget_w: Node GPU power budget, or None for none.
        design_delta_t_c: Coolant supply→return temperature rise the loop is designed for.
        coolant_cp_j_per_kg_k: Coolant specific heat.
        coolant_density_kg_per_l: Coolant density.
        min_cap: Smallest cap the MPC proposes (safety may go lower).
        max_cap: Largest cap.
        safe_cap: Cap while something is wrong (stale/lost/thermal).
        leak_cap: Cap on a leak warning (a critical leak gives 0).
        cap_rise_per_s: Largest allowed cap increase per second.
        gpu_power_max_w: Largest power one GPU can draw (H100 enforced limit).
        node_power_ramp_w_per_s: Largest rise of node power per second the MPC plans
            (power smoothing for the grid's sake), or None for none.
        tpot_slo_s: Per-token latency SLO (time per output token); the MPC caps each GPU
            at the concurrency that meets it. None: no SLO.
    """

    gpu_temp_max_c: float = 87.0
    mem_temp_max_c: float = 95.0
    slowdown_c: float = 89.0
    margin_c: float = 2.0
    node_power_budget_w: float | None = None
    design_delta_t_c: float = 10.0
    coolant_cp_j_per_kg_k: float = WATER_CP_J_PER_KG_K
    coolant_density_kg_per_l: float = WATER_DENSITY_KG_PER_L
    min_cap: int = 1
    max_cap: int = 256
    safe_cap: int = 8
    leak_cap: int = 4
    cap_rise_per_s: float = 32.0
    gpu_power_max_w: float = 700.0
    node_power_ramp_w_per_s: float | None = None
    tpot_slo_s: float | None = None

    def coolant_heat_max_w(self, flow_lpm: float) -> float:
        """Heat the measured flow carries at the design ΔT: Q = ṁ·cp·ΔT.

        Args:
            flow_lpm: Flow through the node's cold plates.

        Returns:
            The heat in watts.
        """
        return heat_w(
            flow_lpm,
            self.design_delta_t_c,
            cp_j_per_kg_k=self.coolant_cp_j_per_kg_k,
            density_kg_per_l=self.coolant_density_kg_per_l,
        )


Reason = Literal["mpc", "leak", "stale", "thermal", "gpu_lost", "manual"]
Binding = Literal[
    "gpu_temp", "mem_temp", "power", "coolant_flow", "rack_power", "rack_coolant", "safety", "manual", "none"
]


@dataclass(frozen=True, slots=True)
class Decision:
    """Concurrency caps for one tick.

    Attributes:
        caps: One integer cap per GPU.
        reason: Why the caps are what they are.
        binding: Which constraint limits them.
        predicted_max_temp_c: Hottest predicted die temperature over the horizon, if known.
    """

    caps: tuple[int, ...]
    reason: Reason
    binding: Binding
    predicted_max_temp_c: float | None = None

    @property
    def total(self) -> int:
        """Sum of the per-GPU caps."""
        return sum(self.caps)


class Controller(Protocol):
    """Anything that turns an observation into a decision."""

    def step(self, obs: Observation) -> Decision:
        """Decide the caps for this tick."""
        ...
