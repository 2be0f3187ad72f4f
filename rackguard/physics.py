"""Coolant physics shared by every layer: water's constants and Q = ṁ·cp·ΔT.

Pure arithmetic, no I/O: the sensors (derived coolant values), the controllers (the
heat the flow can carry) and the simulator (the loop's return temperature) all use
these, so the product and its benchmark plant agree on the physics.
"""

from __future__ import annotations

from typing import Final

WATER_CP_J_PER_KG_K: Final = 4186.0
WATER_DENSITY_KG_PER_L: Final = 0.997


def mass_flow_kg_per_s(flow_lpm: float, density_kg_per_l: float = WATER_DENSITY_KG_PER_L) -> float:
    """Mass flow of a volumetric flow in L/min (negative flows count as none)."""
    return max(flow_lpm, 0.0) / 60.0 * density_kg_per_l


def heat_w(
    flow_lpm: float,
    delta_t_c: float,
    *,
    cp_j_per_kg_k: float = WATER_CP_J_PER_KG_K,
    density_kg_per_l: float = WATER_DENSITY_KG_PER_L,
) -> float:
    """Heat a flow carries with a temperature rise ``delta_t_c``: Q = ṁ·cp·ΔT."""
    return mass_flow_kg_per_s(flow_lpm, density_kg_per_l) * cp_j_per_kg_k * delta_t_c


def flow_required_lpm(
    power_w: float,
    *,
    design_delta_t_c: float,
    cp_j_per_kg_k: float = WATER_CP_J_PER_KG_K,
    density_kg_per_l: float = WATER_DENSITY_KG_PER_L,
) -> float:
    """Flow that removes ``power_w`` with a supply→return rise of ``design_delta_t_c``: P / (ρ·cp·ΔT)."""
    return power_w / (density_kg_per_l * cp_j_per_kg_k * design_delta_t_c) * 60.0
