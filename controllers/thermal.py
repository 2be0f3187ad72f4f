"""Per-GPU thermal RC model, its exact discretisation, simulation and offline fit.

The model is a two-node Cauer ladder, die → cold plate → coolant supply, plus a
first-order HBM node that follows the plate::

    C_die   d(x_die)/dt   = P − (x_die − x_plate)/R_dp
    C_plate d(x_plate)/dt = (x_die − x_plate)/R_dp − x_plate/R_pc(flow)
    tau_mem d(x_mem)/dt   = x_plate + r_mem·P − x_mem

States are rises over the coolant supply temperature (T_die = T_supply + x_die,
T_mem = T_supply + mem_offset + x_mem). The plate→coolant conductance grows with
flow as flow^0.8 (turbulent convection), so R_pc(flow) = R_pc·(flow_ref/flow)^0.8.
Inputs are held constant over a step (zero-order hold) and discretised exactly
with a matrix exponential, so any step length is valid.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from functools import lru_cache

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]

N_STATES = 3  # die, plate, mem


@dataclass(frozen=True, slots=True)
class ThermalParams:
    """Parameters of one GPU's thermal model (see the module docstring).

    Attributes:
        r_die_plate_k_per_w: Die→plate thermal resistance.
        tau_die_s: Die node time constant R_dp·C_die.
        r_plate_coolant_k_per_w: Plate→coolant resistance at ``flow_ref_lpm``.
        tau_plate_s: Plate node time constant R_pc·C_plate at ``flow_ref_lpm``.
        r_mem_k_per_w: Extra HBM rise per watt over the plate.
        tau_mem_s: HBM time constant.
        mem_offset_c: HBM offset over supply + model rise (heat from other sources).
        power_lag_s: The power reading lags the heat by this much (NVML's power is a
            ~1 s moving average on the H100); only used when fitting/replaying traces.
        flow_ref_lpm: Node flow the plate resistance refers to (assumed: the trace
            machine's flow was not observable; configure your node's design flow).
        flow_exponent: Plate conductance ∝ flow^flow_exponent.
    """

    r_die_plate_k_per_w: float
    tau_die_s: float
    r_plate_coolant_k_per_w: float
    tau_plate_s: float
    r_mem_k_per_w: float = 0.012
    tau_mem_s: float = 40.0
    mem_offset_c: float = 3.0
    power_lag_s: float = 0.0
    flow_ref_lpm: float = 12.0
    flow_exponent: float = 0.8

    @property
    def r_total_k_per_w(self) -> float:
        """Steady-state die rise per watt at the reference flow."""
        return self.r_die_plate_k_per_w + self.r_plate_coolant_k_per_w

    def scaled(self, resistance_factor: float) -> ThermalParams:
        """The same GPU with every thermal resistance multiplied (time constants kept).

        Args:
            resistance_factor: 1.3 = a plant that runs 30 % hotter per watt.

        Returns:
            The scaled parameters.
        """
        f = resistance_factor
        return replace(
            self,
            r_die_plate_k_per_w=self.r_die_plate_k_per_w * f,
            r_plate_coolant_k_per_w=self.r_plate_coolant_k_per_w * f,
            r_mem_k_per_w=self.r_mem_k_per_w * f,
        )

    def as_dict(self) -> dict[str, float]:
        """Named parameters with units in the names."""
        return {k: float(v) for k, v in asdict(self).items()}

    def r_plate_at(self, flow_lpm: float | None) -> float:
        """Plate→coolant resistance at a flow (reference flow if unknown).

        Args:
            flow_lpm: Node flow, or None.

        Returns:
            Resistance in K/W.
        """
        if flow_lpm is None:
            return self.r_plate_coolant_k_per_w
        ratio = self.flow_ref_lpm / max(flow_lpm, 0.05 * self.flow_ref_lpm)
        return self.r_plate_coolant_k_per_w * ratio**self.flow_exponent

    def steady_rise_k(self, power_w: float, flow_lpm: float | None = None) -> tuple[float, float, float]:
        """Steady-state (die, plate, mem) rises over supply at constant power."""
        x_plate = self.r_plate_at(flow_lpm) * power_w
        return x_plate + self.r_die_plate_k_per_w * power_w, x_plate, x_plate + self.r_mem_k_per_w * power_w


# Fitted offline with `rackguard model fit tests/data/h100_llm_decode.csv` (H100 80GB
# HBM3, driver 580.159.04, NVML sampled at 0.1 s; open-loop die RMSE 0.88 K, HBM 1.12 K) and
# rounded. With the die path held fixed, h100_matmul_burst.csv fits with RMSE 1.6 K (only
# supply and initial state refitted). tau_die sits at the fit's lower bound: on NVML's 0.1 s
# samples the die is effectively instantaneous once the power reading's ~0.36 s lag is
# accounted for. Total 0.046 K/W matches the ~0.048 K/W step measured in facts/h100.md. The
# traces' cooling defines the reference flow. Re-fit on your own hardware.
DEFAULT_PARAMS = ThermalParams(
    r_die_plate_k_per_w=0.0275,
    tau_die_s=0.05,
    r_plate_coolant_k_per_w=0.0189,
    tau_plate_s=15.4,
    r_mem_k_per_w=0.0315,
    tau_mem_s=1.0,
    mem_offset_c=1.0,
    power_lag_s=0.36,
)


def continuous_matrices(params: ThermalParams, flow_lpm: float | None) -> tuple[FloatArray, FloatArray]:
    """Continuous-time (A, B) with state (die, plate, mem) rises and input power.

    Args:
        params: Model parameters.
        flow_lpm: Node flow (reference flow if None).

    Returns:
        A (3×3) and B (3,).
    """
    r_dp = params.r_die_plate_k_per_w
    c_die = params.tau_die_s / r_dp
    r_pc = params.r_plate_at(flow_lpm)
    c_plate = params.tau_plate_s / params.r_plate_coolant_k_per_w  # capacity does not change with flow
    a = np.array(
        [
            [-1.0 / (r_dp * c_die), 1.0 / (r_dp * c_die), 0.0],
            [1.0 / (r_dp * c_plate), -(1.0 / r_dp + 1.0 / r_pc) / c_plate, 0.0],
            [0.0, 1.0 / params.tau_mem_s, -1.0 / params.tau_mem_s],
        ]
    )
    b = np.array([1.0 / c_die, 0.0, params.r_mem_k_per_w / params.tau_mem_s])
    return a, b


# Padé (13, 13) coefficients and the 1-norm up to which it is accurate to double precision
# (Higham, "The scaling and squaring method for the matrix exponential revisited", 2005).
_PADE13 = (
    64764752532480000.0,
    32382376266240000.0,
    7771770303897600.0,
    1187353796428800.0,
    129060195264000.0,
    10559470521600.0,
    670442572800.0,
    33522128640.0,
    1323241920.0,
    40840800.0,
    960960.0,
    16380.0,
    182.0,
    1.0,
)
_THETA13 = 5.371920351148152


def expm(m: FloatArray) -> FloatArray:
    """Matrix exponential by scaling and squaring with a (13, 13) Padé approximant.

    Numpy only (the daemon does not load scipy); meant for the small ZOH matrices here.

    Args:
        m: Square matrix.

    Returns:
        exp(m).
    """
    m = np.asarray(m, dtype=float)
    norm = float(np.max(np.sum(np.abs(m), axis=0))) if m.size else 0.0
    squarings = max(0, math.ceil(math.log2(norm / _THETA13))) if norm > _THETA13 else 0
    a = m / 2.0**squarings
    b = _PADE13
    ident = np.eye(m.shape[0])
    a2 = a @ a
    a4 = a2 @ a2
    a6 = a4 @ a2
    u = a @ (a6 @ (b[13] * a6 + b[11] * a4 + b[9] * a2) + b[7] * a6 + b[5] * a4 + b[3] * a2 + b[1] * ident)
    v = a6 @ (b[12] * a6 + b[10] * a4 + b[8] * a2) + b[6] * a6 + b[4] * a4 + b[2] * a2 + b[0] * ident
    e = np.linalg.solve(v - u, v + u)
    for _ in range(squarings):
        e = e @ e
    return np.asarray(e)


@lru_cache(maxsize=4096)
def _discretize_cached(
    params: ThermalParams, dt_ms: int, flow_key: int | None
) -> tuple[FloatArray, FloatArray]:
    flow = None if flow_key is None else flow_key / 100.0
    a, b = continuous_matrices(params, flow)
    m = np.zeros((N_STATES + 1, N_STATES + 1))
    m[:N_STATES, :N_STATES] = a
    m[:N_STATES, N_STATES] = b
    e = expm(m * (dt_ms / 1000.0))
    ad = np.ascontiguousarray(e[:N_STATES, :N_STATES])
    bd = np.ascontiguousarray(e[:N_STATES, N_STATES])
    ad.flags.writeable = False
    bd.flags.writeable = False
    return ad, bd


def discretize(
    params: ThermalParams, dt_s: float, flow_lpm: float | None = None
) -> tuple[FloatArray, FloatArray]:
    """Exact zero-order-hold discretisation, cached (dt to 1 ms, flow to 0.01 lpm).

    Args:
        params: Model parameters.
        dt_s: Step length.
        flow_lpm: Node flow (reference flow if None).

    Returns:
        Ad (3×3) and Bd (3,), read-only.
    """
    flow_key = None if flow_lpm is None else round(flow_lpm * 100.0)
    return _discretize_cached(params, max(1, round(dt_s * 1000.0)), flow_key)


def simulate_rise(
    params: ThermalParams,
    t_s: FloatArray,
    power_w: FloatArray,
    x0: FloatArray,
    flow_lpm: FloatArray | None = None,
) -> FloatArray:
    """Simulate state rises over a sampled trace (power held from each sample to the next).

    Args:
        params: Model parameters.
        t_s: Sample times, increasing.
        power_w: Power at each sample.
        x0: State at t_s[0].
        flow_lpm: Flow at each sample (reference flow if None).

    Returns:
        States, shape (len(t_s), 3).
    """
    n = len(t_s)
    out = np.empty((n, N_STATES))
    x = np.asarray(x0, dtype=float).copy()
    out[0] = x
    dts = np.diff(t_s)
    for k in range(n - 1):
        flow = None if flow_lpm is None else float(flow_lpm[k])
        ad, bd = discretize(params, float(dts[k]), flow)
        x = ad @ x + bd * power_w[k]
        out[k + 1] = x
    return out


@dataclass(frozen=True, slots=True)
class Trace:
    """A measured trace (see tests/data/README.md)."""

    t_s: FloatArray
    power_w: FloatArray
    gpu_temp_c: FloatArray
    mem_temp_c: FloatArray | None = None
    coolant_supply_c: FloatArray | None = None
    concurrency: FloatArray | None = None


class TraceError(ValueError):
    """A trace cannot be used (missing column, too few rows, bad numbers)."""


MIN_TRACE_ROWS = 20
REQUIRED_COLUMNS = ("t_s", "power_w", "gpu_temp_c")
OPTIONAL_COLUMNS = ("mem_temp_c", "coolant_supply_c", "concurrency")


def parse_trace_csv(text: str) -> Trace:
    """Parse CSV text with columns t_s, power_w, gpu_temp_c (+ optional ones).

    Rows with an empty or non-numeric required value are dropped; an optional column
    with any empty value is ignored.

    Args:
        text: The CSV file's contents.

    Returns:
        The trace.

    Raises:
        TraceError: A required column is missing, or fewer than MIN_TRACE_ROWS usable rows.
    """
    import csv
    import io

    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise TraceError(f"missing column(s) {', '.join(missing)}; have {', '.join(header) or 'none'}")
    cols: dict[str, list[float]] = {c: [] for c in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS) if c in header}
    for row in reader:
        try:
            req = [float(row[c]) for c in REQUIRED_COLUMNS]
        except (TypeError, ValueError):
            continue
        if not all(math.isfinite(v) for v in req):
            continue
        for c, v in zip(REQUIRED_COLUMNS, req, strict=True):
            cols[c].append(v)
        for c in OPTIONAL_COLUMNS:
            if c in cols:
                try:
                    cols[c].append(float(row[c]))
                except (TypeError, ValueError):
                    cols[c].append(math.nan)
    n = len(cols["t_s"])
    if n < MIN_TRACE_ROWS:
        raise TraceError(f"only {n} usable rows; need at least {MIN_TRACE_ROWS}")
    t = np.asarray(cols["t_s"])
    if np.any(np.diff(t) <= 0):
        raise TraceError("t_s must increase strictly")

    def opt(name: str) -> FloatArray | None:
        if name not in cols:
            return None
        a = np.asarray(cols[name])
        return None if np.any(~np.isfinite(a)) else a

    return Trace(
        t_s=t,
        power_w=np.asarray(cols["power_w"]),
        gpu_temp_c=np.asarray(cols["gpu_temp_c"]),
        mem_temp_c=opt("mem_temp_c"),
        coolant_supply_c=opt("coolant_supply_c"),
        concurrency=opt("concurrency"),
    )


@dataclass(frozen=True, slots=True)
class FitResult:
    """Outcome of :func:`fit_trace`.

    Attributes:
        params: Fitted thermal parameters.
        supply_c: Effective supply temperature (or offset over the measured supply).
        x0_k: Estimated initial state rises (die, plate, mem).
        rmse_open_loop_c: Die RMSE of a whole-trace simulation driven only by power.
        rmse_10s_c: Die RMSE of 10 s-ahead predictions anchored on the measured die
            temperature at each start point (the MPC's offset-free predictor).
        rmse_mem_open_loop_c: HBM open-loop RMSE, if the trace has HBM temperatures.
    """

    params: ThermalParams
    supply_c: float
    x0_k: tuple[float, float, float]
    rmse_open_loop_c: float
    rmse_10s_c: float
    rmse_mem_open_loop_c: float | None


def _supply(trace: Trace, offset_c: float) -> FloatArray:
    base = trace.coolant_supply_c if trace.coolant_supply_c is not None else np.zeros_like(trace.t_s)
    return base + offset_c


def fit_trace(trace: Trace, *, fixed_die: ThermalParams | None = None) -> FitResult:
    """Fit the thermal model to one trace by nonlinear least squares on the open-loop error.

    Fitted: R_dp, tau_die, R_pc, tau_plate, the effective supply temperature (or an offset
    over the measured one) and the plate's initial rise (traces may start hot; the die
    starts at its quasi-steady state over the plate). With HBM data, r_mem, tau_mem,
    mem_offset and the HBM initial rise are fitted afterwards on the die path's plate.

    Args:
        trace: The measured trace (the reference flow is assumed throughout).
        fixed_die: Keep these die-path parameters and fit only supply/initial state.

    Returns:
        The fit and its error figures.
    """
    from scipy.optimize import least_squares  # offline only: the daemon never loads scipy

    t = trace.t_s - trace.t_s[0]
    p = trace.power_w
    y = trace.gpu_temp_c
    p0 = float(p[0])

    def die_params(v: FloatArray) -> ThermalParams:
        if fixed_die is not None:
            return fixed_die
        return replace(
            DEFAULT_PARAMS,
            r_die_plate_k_per_w=float(math.exp(v[2])),
            tau_die_s=float(math.exp(v[3])),
            r_plate_coolant_k_per_w=float(math.exp(v[4])),
            tau_plate_s=float(math.exp(v[5])),
            power_lag_s=float(v[6]),
        )

    def sim(v: FloatArray) -> tuple[ThermalParams, FloatArray]:
        prm = die_params(v)
        x_plate0 = float(v[1])
        p_heat = lagged_power(t, p, prm.power_lag_s)
        x0 = np.array([x_plate0 + prm.r_die_plate_k_per_w * float(p_heat[0]), x_plate0, x_plate0])
        return prm, simulate_rise(prm, t, p_heat, x0)

    def resid(v: FloatArray) -> FloatArray:
        _, xs = sim(v)
        return _supply(trace, float(v[0])) + xs[:, 0] - y

    d = DEFAULT_PARAMS
    guess_supply = float(y[0]) - d.r_total_k_per_w * p0
    v0 = np.array(
        [
            guess_supply,
            d.r_plate_coolant_k_per_w * p0,
            math.log(d.r_die_plate_k_per_w),
            math.log(d.tau_die_s),
            math.log(d.r_plate_coolant_k_per_w),
            math.log(d.tau_plate_s),
            0.5,
        ]
    )
    lo = np.array([-20.0, -5.0, math.log(0.003), math.log(0.05), math.log(0.002), math.log(2.0), 0.0])
    hi = np.array([80.0, 60.0, math.log(0.2), math.log(5.0), math.log(0.2), math.log(200.0), 1.5])
    if fixed_die is not None:
        v0, lo, hi = v0[:2], lo[:2], hi[:2]
    sol = least_squares(resid, v0, bounds=(lo, hi), x_scale="jac")
    v = sol.x
    prm, xs = sim(v)
    supply_off = float(v[0])
    supply = _supply(trace, supply_off)
    err = supply + xs[:, 0] - y
    rmse_open = float(np.sqrt(np.mean(err**2)))
    x0 = xs[0].copy()

    rmse_mem: float | None = None
    if trace.mem_temp_c is not None and fixed_die is None:
        ym = trace.mem_temp_c

        def mem_sim(w: FloatArray) -> tuple[ThermalParams, FloatArray]:
            pm = replace(
                prm, r_mem_k_per_w=float(math.exp(w[0])), tau_mem_s=float(math.exp(w[1])), mem_offset_c=0.0
            )
            x0m = np.array([x0[0], x0[1], float(w[3])])
            return pm, simulate_rise(pm, t, lagged_power(t, p, pm.power_lag_s), x0m)[:, 2]

        def mem_resid(w: FloatArray) -> FloatArray:
            _, xm = mem_sim(w)
            return supply + float(w[2]) + xm - ym

        w0 = np.array([math.log(0.012), math.log(40.0), float(ym[0] - supply[0] - x0[1]), x0[1]])
        wlo = np.array([math.log(1e-4), math.log(1.0), -20.0, -5.0])
        whi = np.array([math.log(0.2), math.log(600.0), 40.0, 60.0])
        msol = least_squares(mem_resid, w0, bounds=(wlo, whi), x_scale="jac")
        pm, xm = mem_sim(msol.x)
        prm = replace(pm, mem_offset_c=float(msol.x[2]))
        x0 = np.array([x0[0], x0[1], float(msol.x[3])])
        rmse_mem = float(np.sqrt(np.mean((supply + prm.mem_offset_c + xm - ym) ** 2)))

    return FitResult(
        params=prm,
        supply_c=supply_off,
        x0_k=(float(x0[0]), float(x0[1]), float(x0[2])),
        rmse_open_loop_c=rmse_open,
        rmse_10s_c=rmse_ahead(t, y, supply + xs[:, 0], horizon_s=10.0),
        rmse_mem_open_loop_c=rmse_mem,
    )


def lagged_power(t_s: FloatArray, power_w: FloatArray, lag_s: float) -> FloatArray:
    """The heat that a lagging power reading stands for: power read lag_s later.

    Args:
        t_s: Sample times.
        power_w: Power readings.
        lag_s: How far the readings lag the heat.

    Returns:
        Power advanced by lag_s (the last reading is held at the end).
    """
    if lag_s <= 0.0:
        return power_w
    return np.interp(t_s + lag_s, t_s, power_w)


def rmse_ahead(
    t_s: FloatArray, measured_c: FloatArray, simulated_c: FloatArray, *, horizon_s: float
) -> float:
    """RMSE of h-ahead predictions: from each point, simulated change + the measured start.

    The prediction of T(t+h) from t is T_meas(t) + (T_sim(t+h) − T_sim(t)), i.e. the
    model's response to the measured power anchored on the measurement (offset-free).

    Args:
        t_s: Sample times.
        measured_c: Measured temperatures.
        simulated_c: Open-loop simulated temperatures.
        horizon_s: Prediction horizon.

    Returns:
        The RMSE over all start points that have a sample at least h later (nan if none).
    """
    idx = np.searchsorted(t_s, t_s + horizon_s)
    ok = idx < len(t_s)
    if not np.any(ok):
        return math.nan
    k = np.nonzero(ok)[0]
    j = idx[ok]
    pred = measured_c[k] + simulated_c[j] - simulated_c[k]
    return float(np.sqrt(np.mean((pred - measured_c[j]) ** 2)))
