"""A simulated rack: N simulated nodes sharing one simulated CDU (shared flow, return set by total heat).

:func:`rack_config` gives one member's config: every member includes the same rack part
(``[rack]``, the CDU and the rack's leak tray, all rack scope, on every node's own
subscription); only ``[node]`` and ``[sim]`` differ. The CDU is :class:`rackguard.sim.cdu.SimCdu`
with the rack's flow (``sim.flow_lpm`` per member), heated by every member
(``rackguard sim-cdu`` in rack mode).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class RackSpec:
    """The simulated rack.

    Attributes:
        nodes: Members (``n0`` … ``n<N-1>``).
        gpus: GPUs per node.
        flow_lpm: Nominal flow per node (the CDU carries ``nodes`` × this).
        supply_temp_c: CDU supply temperature.
        return_limit_c: Highest allowed return temperature: capacity = flow × cp × (limit − supply).
        power_budget_w: The rack's GPU power budget.
        degraded_capacity_w: Capacity that survives one pump lost at the warmest allowed supply.
        floor_w: Each node's floor.
        site: Topic site.
        rack: Topic rack.
    """

    nodes: int = 4
    gpus: int = 4
    flow_lpm: float = 12.0
    supply_temp_c: float = 32.0
    return_limit_c: float = 36.0
    power_budget_w: float = 1500.0 * 4
    degraded_capacity_w: float = 750.0 * 4
    floor_w: float = 300.0
    site: str = "demo"
    rack: str = "r1"

    def names(self) -> list[str]:
        return [f"n{i}" for i in range(self.nodes)]

    @property
    def cdu_topic(self) -> str:
        return f"bms/{self.site}/{self.rack}/cdu"

    @property
    def leak_topic(self) -> str:
        return f"bms/{self.site}/{self.rack}/leak"


def rack_part(spec: RackSpec, *, coordinated: bool = True, cdu_max_age_s: float = 2.0) -> dict[str, Any]:
    """The part every member's config includes: the rack's sensors and (coordinated) ``[rack]``."""
    part: dict[str, Any] = {
        "coolant": {
            "subscribe": [f"bms/{spec.site}/{spec.rack}/#"],
            "leak_clear": "auto",
            "design_delta_t_c": spec.return_limit_c - spec.supply_temp_c,
            "sensors": [
                {
                    "id": "cdu",
                    "kind": "cdu",
                    "topic": spec.cdu_topic,
                    "format": "redfish",
                    "max_age_s": cdu_max_age_s,
                },
                {
                    "id": "rack-leak",
                    "kind": "leak",
                    "topic": spec.leak_topic,
                    "format": "redfish",
                    "max_age_s": 10.0,
                },
            ],
        },
    }
    if coordinated:
        part["rack"] = {
            "members": [{"name": n} for n in spec.names()],
            "power_budget_w": spec.power_budget_w,
            "return_limit_c": spec.return_limit_c,
            "degraded_capacity_w": spec.degraded_capacity_w,
            "floor_w": spec.floor_w,
        }
    return part


def rack_config(
    spec: RackSpec,
    index: int,
    *,
    offered_concurrency: float,
    host: str = "127.0.0.1",
    port: int = 1883,
    coordinated: bool = True,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Member ``index``'s config (a plain dict for ``config.validate``)."""
    cfg: dict[str, Any] = {
        "node": {"site": spec.site, "rack": spec.rack, "name": spec.names()[index]},
        "mqtt": {"host": host, "port": port, "keepalive_s": 5},
        "sensors": {"backend": "sim", "poll_period_s": 0.25, "slow_period_s": 1.0},
        "sim": {
            "gpus": spec.gpus,
            "seed": index,
            "offered_concurrency": offered_concurrency,
            "supply_temp_c": spec.supply_temp_c,
            "flow_lpm": spec.flow_lpm,
        },
        "telemetry": {"publish_period_s": 1.0},
        "http": {"port": 0},
        "log": {"level": "warning", "format": "json"},
        # While its agent is down a node's servers run at safe_cap: keep that under the fallback share.
        # A cut-off node's servers keep its last cap until it expires: well within dead_after_s.
        "control": {"safe_cap": 4, "cap_ttl_s": 5.0, "cap_refresh_s": 2.0},
        **rack_part(spec, coordinated=coordinated),
    }
    for section, values in (extra or {}).items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return cfg
