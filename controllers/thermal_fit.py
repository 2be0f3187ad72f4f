"""Calibrate the thermal model (:mod:`rackguard.controllers.thermal`) from measured traces.

Loading is robust to what real logs contain: rows are sorted by time, duplicate
timestamps merged (column means), blank or non-numeric cells taken as missing (power is
interpolated, a missing temperature is left out of the residuals), and the trace is split
into segments at gaps longer than ``GAP_PERIODS`` median sample periods. Each segment
gets its own initial state, each trace its own supply temperature (or offset over a
measured supply); several traces of one GPU can be fitted together (:func:`fit_traces`).

NVML's power reading is a 1 s trailing average (a load that stops at once reads as a
1 s ramp while the die drops within one sample): the heat is recovered first by a
regularised deconvolution (:func:`deconvolve_boxcar`). The die's response to that heat
is identified in its Foster form (two first-order modes,
``die = supply + g1·F(τ1)·P + g2·F(τ2)·P + free decay``) by variable projection: only
τ1, τ2 and a residual lag are searched (a 3×3 grid of starts screened, least squares
from the best two); the gains, supply and initial states are linear and solved exactly
at every step. The
Foster form is then converted to the Cauer ladder the controller uses (exact for two
nodes, any positive gains). HBM is fitted afterwards the same way on the die path's
plate (τ_mem searched, r_mem, offset and initial states linear). Each segment is
simulated on a uniform grid of the median period with exact zero-order-hold steps
(``scipy.signal.lfilter``) and read back at the sample times, so 3,000 rows fit in a
fraction of a second. scipy is imported only here, never by the daemon.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from rackguard.controllers.thermal import DEFAULT_PARAMS, FloatArray, ThermalParams, discretize

MIN_TRACE_ROWS = 20
MIN_SEGMENT_ROWS = 10
GAP_PERIODS = 5.0  # a gap longer than this many median periods splits the trace
MIN_DURATION_S = 10.0
MIN_POWER_STEP_W = 50.0
MIN_TEMP_SPAN_C = 2.0
REQUIRED_COLUMNS = ("t_s", "power_w", "gpu_temp_c")
OPTIONAL_COLUMNS = ("mem_temp_c", "coolant_supply_c", "concurrency")
CELL_RANGES: dict[str, tuple[float, float]] = {
    "t_s": (-1e9, 1e9),
    "power_w": (0.0, 5000.0),
    "gpu_temp_c": (-40.0, 150.0),
    "mem_temp_c": (-40.0, 150.0),
    "coolant_supply_c": (-20.0, 100.0),
    "concurrency": (0.0, 1e7),
}

# Physical ranges of the searched parameters (seconds). Wide on purpose: a fit that lands
# on one of them is reported as not identifiable from the trace.
BOUNDS_S: dict[str, tuple[float, float]] = {
    "tau_fast_s": (0.01, 20.0),  # die + package
    "tau_slow_s": (2.0, 2000.0),  # cold plate + coolant film
    "tau_mem_s": (0.02, 600.0),  # HBM stacks
    "power_lag_s": (0.0, 2.0),  # the power reading behind the heat
}
# NVML's power reading on Hopper is the average over the last second: undone before fitting.
POWER_WINDOW_S = 1.0
DECONV_SMOOTH = 1.0  # weight of the total variation (W² per W of step)
DECONV_EPS_W = 1.0  # steps smaller than this are smoothed rather than kept sharp
NO_HBM_WARNING = "no mem_temp_c column: the HBM parameters are the built-in ones, not fitted"


class TraceError(ValueError):
    """A trace cannot be used, with the reason (missing column, too short, no power step ...).

    Attributes:
        trace_index: Which of :func:`fit_traces`' traces it is, when it raised it.
    """

    trace_index: int | None = None


@dataclass(frozen=True, slots=True)
class Trace:
    """A cleaned, time-sorted trace (see tests/data/README.md for the columns).

    Attributes:
        t_s: Sample times, strictly increasing.
        power_w: Power; missing cells interpolated.
        gpu_temp_c: Die temperature; NaN where the cell was missing.
        mem_temp_c: HBM temperature (NaN where missing), None without the column.
        coolant_supply_c: Measured supply (missing cells interpolated), None without it.
        concurrency: Batch concurrency where known (NaN elsewhere), None without it.
        segments: ``[start, stop)`` row ranges between gaps; each has its own initial state.
        cleaned: What loading changed, by kind (counts).
    """

    t_s: FloatArray
    power_w: FloatArray
    gpu_temp_c: FloatArray
    mem_temp_c: FloatArray | None = None
    coolant_supply_c: FloatArray | None = None
    concurrency: FloatArray | None = None
    segments: tuple[tuple[int, int], ...] = ()
    cleaned: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.segments:
            object.__setattr__(self, "segments", ((0, len(self.t_s)),))


def _number(cell: str | None) -> float:
    if cell is None:
        return math.nan
    try:
        v = float(cell)
    except ValueError:
        return math.nan
    return v if math.isfinite(v) else math.nan


def _fill(t: FloatArray, v: FloatArray) -> FloatArray:
    ok = np.isfinite(v)
    return v if ok.all() else np.interp(t, t[ok], v[ok])


def parse_trace_csv(text: str) -> Trace:
    """Parse and clean CSV text with columns t_s, power_w, gpu_temp_c (+ optional ones).

    Args:
        text: The CSV file's contents.

    Returns:
        The cleaned trace; ``cleaned`` counts what was changed.

    Raises:
        TraceError: A required column is missing, no power at all, or fewer than
            MIN_TRACE_ROWS usable rows.
    """
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in (reader.fieldnames or [])]
    reader.fieldnames = header
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise TraceError(f"missing column(s) {', '.join(missing)}; have {', '.join(header) or 'none'}")
    names = [c for c in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS) if c in header]
    rows = [[_number(row.get(c)) for c in names] for row in reader]
    raw = np.array(rows, dtype=float).reshape(len(rows), len(names))
    cleaned: dict[str, int] = {"rows_read": len(rows)}
    blank = np.isnan(raw)
    for j, c in enumerate(names):
        if c != "t_s" and (n := int(blank[:, j].sum())):
            cleaned[f"missing_{c}"] = n
    for j, c in enumerate(names):  # a reading outside its physical range is a bad cell
        lo, hi = CELL_RANGES[c]
        bad = ~((raw[:, j] >= lo) & (raw[:, j] <= hi)) & ~np.isnan(raw[:, j])
        if n_bad := int(bad.sum()):
            cleaned[f"out_of_range_{c}"] = n_bad
            raw[bad, j] = math.nan
    timed = raw[np.isfinite(raw[:, 0])]
    cleaned["rows_without_time"] = len(raw) - len(timed)
    t_raw = timed[:, 0]
    cleaned["out_of_order"] = int(np.sum(np.diff(t_raw) < 0))
    timed = timed[np.argsort(t_raw, kind="stable")]
    uniq, inv = np.unique(timed[:, 0], return_inverse=True)
    cleaned["duplicate_timestamps_merged"] = len(timed) - len(uniq)
    ok = np.isfinite(timed)
    sums = np.zeros((len(uniq), len(names)))
    counts = np.zeros((len(uniq), len(names)))
    np.add.at(sums, inv, np.where(ok, timed, 0.0))
    np.add.at(counts, inv, ok)
    with np.errstate(invalid="ignore", divide="ignore"):
        merged = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    col = {c: merged[:, j] for j, c in enumerate(names)}
    t = col["t_s"]
    if len(t) < MIN_TRACE_ROWS:
        raise TraceError(f"only {len(t)} usable rows; need at least {MIN_TRACE_ROWS}")
    if not np.isfinite(col["power_w"]).any() or not np.isfinite(col["gpu_temp_c"]).any():
        raise TraceError("no usable power_w or gpu_temp_c values")
    cleaned["power_interpolated"] = int(np.sum(~np.isfinite(col["power_w"])))
    power = _fill(t, col["power_w"])

    # Segments: split at gaps, drop segments too short to hold a state estimate.
    dt = np.diff(t)
    gap_s = GAP_PERIODS * float(np.median(dt))
    cuts = [0, *(np.nonzero(dt > gap_s)[0] + 1).tolist(), len(t)]
    cleaned["gaps"] = len(cuts) - 2
    segs = [(a, b) for a, b in itertools.pairwise(cuts) if b - a >= MIN_SEGMENT_ROWS]
    keep = np.zeros(len(t), dtype=bool)
    for a, b in segs:
        keep[a:b] = True
    cleaned["rows_in_short_segments_dropped"] = int(np.sum(~keep))
    if int(keep.sum()) < MIN_TRACE_ROWS:
        raise TraceError(f"only {int(keep.sum())} usable rows; need at least {MIN_TRACE_ROWS}")
    starts = np.cumsum([0] + [b - a for a, b in segs])
    segments = tuple((int(starts[i]), int(starts[i + 1])) for i in range(len(segs)))
    cleaned["segments"] = len(segments)

    def opt(name: str, fill: bool) -> FloatArray | None:
        if name not in col or not np.isfinite(col[name][keep]).any():
            return None
        return _fill(t, col[name])[keep] if fill else col[name][keep]

    return Trace(
        t_s=t[keep],
        power_w=power[keep],
        gpu_temp_c=col["gpu_temp_c"][keep],
        mem_temp_c=opt("mem_temp_c", False),
        coolant_supply_c=opt("coolant_supply_c", True),
        concurrency=opt("concurrency", False),
        segments=segments,
        cleaned=cleaned,
    )


def check_identifiable(trace: Trace) -> None:
    """Raise when the trace cannot identify a thermal model, saying why.

    Raises:
        TraceError: Too short, no power step, or a constant temperature.
    """
    duration = sum(float(trace.t_s[b - 1] - trace.t_s[a]) for a, b in trace.segments)
    if duration < MIN_DURATION_S:
        raise TraceError(f"too short: {duration:.1f} s of data; need at least {MIN_DURATION_S:.0f} s")
    p5, p95 = np.percentile(trace.power_w, [5, 95])
    if p95 - p5 < MIN_POWER_STEP_W:
        raise TraceError(
            f"no power step: the 5th-95th percentile of power spans only {p95 - p5:.0f} W; "
            f"need a load change of at least {MIN_POWER_STEP_W:.0f} W"
        )
    temp = trace.gpu_temp_c[np.isfinite(trace.gpu_temp_c)]
    if temp.size == 0 or float(np.ptp(temp)) < MIN_TEMP_SPAN_C:
        span = float(np.ptp(temp)) if temp.size else 0.0
        raise TraceError(
            f"constant temperature: gpu_temp_c spans {span:.1f} °C; need at least {MIN_TEMP_SPAN_C:.0f} °C"
        )


# --- Foster ↔ Cauer --------------------------------------------------------------------------------


def foster_to_cauer(
    tau1_s: float, g1_k_per_w: float, tau2_s: float, g2_k_per_w: float
) -> tuple[float, float, float, float]:
    """Two Foster modes (τ, gain) → the two-node ladder (R_dp, τ_die, R_pc, τ_plate).

    Z(s) = g1/(1+τ1 s) + g2/(1+τ2 s) = 1/(C_d s + 1/(R_dp + R_pc/(1+τ_plate s))).
    """
    a0 = g1_k_per_w + g2_k_per_w
    a1 = g1_k_per_w * tau2_s + g2_k_per_w * tau1_s
    c_die = tau1_s * tau2_s / a1
    b = tau1_s + tau2_s - c_die * a0
    r_dp = a1 / b
    return r_dp, r_dp * c_die, a0 - r_dp, b


def cauer_to_foster(params: ThermalParams) -> tuple[tuple[float, float], tuple[float, float], FloatArray]:
    """The die path's Foster modes ((τ1, g1), (τ2, g2)), τ1 < τ2, and the ladder's eigenvectors.

    Returns:
        The fast and slow modes, and V (2×2, columns = eigenvectors of (die, plate) in
        the same order) to map modal amplitudes to states.
    """
    a, b = _ladder(params)
    lam, v = np.linalg.eig(a)
    lam, v = lam.real, v.real
    order = np.argsort(lam)  # most negative first = fastest
    lam, v = lam[order], v[:, order]
    w = np.linalg.inv(v)
    residue = v[0, :] * (w @ b)  # die output residues
    taus = -1.0 / lam
    g = residue * taus
    return (float(taus[0]), float(g[0])), (float(taus[1]), float(g[1])), v


def _ladder(params: ThermalParams) -> tuple[FloatArray, FloatArray]:
    r_dp, r_pc = params.r_die_plate_k_per_w, params.r_plate_coolant_k_per_w
    c_d, c_p = params.tau_die_s / r_dp, params.tau_plate_s / r_pc
    a = np.array([[-1 / (r_dp * c_d), 1 / (r_dp * c_d)], [1 / (r_dp * c_p), -(1 / r_dp + 1 / r_pc) / c_p]])
    return a, np.array([1 / c_d, 0.0])


# --- simulation on a uniform grid ----------------------------------------------------------------


def deconvolve_boxcar(
    reading_w: FloatArray, taps: int, *, smooth: float = DECONV_SMOOTH, iters: int = 15
) -> FloatArray:
    """The heat whose trailing moving average over ``taps`` samples is the power reading.

    NVML's power on the H100 is a 1 s average: a load that stops at once reads as a
    1 s ramp while the die cools within one sample. Inverting the average is ill-posed,
    so it is regularised with total variation (heat is piecewise steady with sharp
    steps), solved by iteratively reweighted least squares. The ``taps − 1`` samples
    before the start are unknowns too (a trace may start mid-ramp).

    Args:
        reading_w: Power readings on a uniform grid.
        taps: Samples in the averaging window (1: the reading is the heat).
        smooth: Weight of the total-variation term (W² per W of step).
        iters: Reweighting iterations.

    Returns:
        Heat on the same grid.
    """
    from scipy.linalg import solveh_banded

    n = len(reading_w)
    if taps <= 1 or n < 2:
        return reading_w
    m = taps
    size = n + m - 1  # heat[c] for c = 0 .. size-1; reading k averages heat[k .. k+m-1]
    u = max(m - 1, 1)
    # Normal equations (AᵀA + Dᵀ W D) heat = Aᵀ r in upper banded form (A: the average,
    # D: first differences): AᵀA[i, i+d] counts the readings that cover both.
    ata = np.zeros((u + 1, size))
    i = np.arange(size)
    for d in range(min(m, u + 1)):
        count = np.clip(np.minimum(n - 1, i) - np.maximum(0, i + d - m + 1) + 1, 0, None)
        ata[u - d, d:] = count[: size - d] / m**2
    rhs = np.convolve(reading_w, np.ones(m)) / m
    heat = np.concatenate([np.full(m - 1, reading_w[0]), reading_w])
    for _ in range(iters):
        w = smooth / (np.abs(np.diff(heat)) + DECONV_EPS_W)
        ab = ata.copy()
        ab[u, :-1] += w
        ab[u, 1:] += w
        ab[u - 1, 1:] -= w
        heat = solveh_banded(ab, rhs, check_finite=False)
    out: FloatArray = np.asarray(heat[m - 1 :], dtype=float)
    return out


@dataclass(frozen=True, slots=True)
class _Segment:
    t_s: FloatArray  # sample times from 0
    grid_s: FloatArray  # uniform grid from 0 covering the samples
    heat_w: FloatArray  # heat on the grid (the power reading with its averaging undone)
    die_c: FloatArray  # target: die − measured supply (NaN missing)
    mem_c: FloatArray | None  # target: HBM − measured supply
    supply_c: FloatArray  # measured supply at the samples (zeros without the column)
    h_s: float  # the grid's step: the trace's median sample period
    group: int  # which trace: each has its own supply
    weight: float  # residual weight: every trace counts the same, whatever its length


def _segments(traces: Sequence[Trace], power_window_s: float) -> list[_Segment]:
    n_valid = [max(int(np.isfinite(tr.gpu_temp_c).sum()), 1) for tr in traces]
    out = []
    for g, trace in enumerate(traces):
        dts = np.concatenate([np.diff(trace.t_s[a:b]) for a, b in trace.segments])
        h = max(round(float(np.median(dts)), 3), 0.001)
        taps = max(1, round(power_window_s / h))
        supply = trace.coolant_supply_c if trace.coolant_supply_c is not None else np.zeros_like(trace.t_s)
        weight = math.sqrt(float(np.mean(n_valid)) / n_valid[g])  # 1 for a single trace
        for a, b in trace.segments:
            t = trace.t_s[a:b] - trace.t_s[a]
            grid = h * np.arange(math.ceil(t[-1] / h) + 1)
            heat = deconvolve_boxcar(np.interp(grid, t, trace.power_w[a:b]), taps)
            mem = None if trace.mem_temp_c is None else trace.mem_temp_c[a:b] - supply[a:b]
            die = trace.gpu_temp_c[a:b] - supply[a:b]
            out.append(_Segment(t, grid, heat, die, mem, supply[a:b], h, g, weight))
    return out


def _lsq(x: FloatArray, y: FloatArray) -> FloatArray:
    """Least squares by column-scaled normal equations (fast; lstsq if ill-conditioned)."""
    scale = np.sqrt(np.einsum("ij,ij->j", x, x))
    scale[scale == 0.0] = 1.0
    xs = x / scale
    try:
        chol = np.linalg.cholesky(xs.T @ xs)
    except np.linalg.LinAlgError:
        chol = None
    if chol is not None and (d := np.abs(np.diag(chol))).min() > 1e-5 * d.max():  # cond < ~1e10
        z = np.linalg.solve(chol, xs.T @ y)
        return np.asarray(np.linalg.solve(chol.T, z) / scale)
    return np.asarray(np.linalg.lstsq(x, y, rcond=None)[0])


def _first_order(u: FloatArray, pole: float, gain: float, x0: float = 0.0) -> FloatArray:
    """x[k+1] = pole·x[k] + gain·u[k], x[0] = x0 (exact ZOH of a first-order lag)."""
    from scipy.signal import lfilter

    y: FloatArray = lfilter([0.0, gain], [1.0, -pole], u, zi=[x0])[0]
    return y


def _heat(seg: _Segment, lag_s: float) -> FloatArray:
    """Heat on the grid, lag_s later (what is left of the reading's delay after deconvolution)."""
    return np.interp(seg.grid_s + lag_s, seg.grid_s, seg.heat_w) if lag_s > 0.0 else seg.heat_w


def _die_columns(seg: _Segment, taus: tuple[float, float], lag_s: float) -> FloatArray:
    """Per sample: unit-gain forced responses of both modes, then both free decays."""
    p = _heat(seg, lag_s)
    cols = []
    for tau in taus:
        e = math.exp(-seg.h_s / tau)
        cols.append(np.interp(seg.t_s, seg.grid_s, _first_order(p, e, 1.0 - e)))
    cols += [np.exp(-seg.t_s / tau) for tau in taus]
    return np.stack(cols, axis=1)


@dataclass(frozen=True, slots=True)
class _DieSolution:
    gains: FloatArray  # (2,)
    supply_c: FloatArray  # per trace
    free: FloatArray  # (n_segments, 2) modal amplitudes at each segment's start
    resid: FloatArray  # valid samples only, weighted
    pred: list[FloatArray]  # per segment, die − measured supply


def _solve_die(
    segs: list[_Segment], taus: tuple[float, float], lag_s: float, gains: FloatArray | None
) -> _DieSolution:
    """Linear part of the die fit for fixed (τ1, τ2, lag): gains (unless given), supplies, free decays."""
    n_seg, n_grp = len(segs), segs[-1].group + 1
    blocks = [_die_columns(s, taus, lag_s) for s in segs]
    n_lin = (2 if gains is None else 0) + n_grp + 2 * n_seg
    rows = []
    targets = []
    for i, (seg, cols) in enumerate(zip(segs, blocks, strict=True)):
        ok = np.isfinite(seg.die_c)
        x = np.zeros((int(ok.sum()), n_lin))
        y = seg.die_c[ok].copy()
        j = 0
        if gains is None:
            x[:, 0:2] = cols[ok, 0:2]
            j = 2
        else:
            y -= cols[ok, 0:2] @ gains
        x[:, j + seg.group] = 1.0
        x[:, j + n_grp + 2 * i : j + n_grp + 2 + 2 * i] = cols[ok, 2:4]
        rows.append(x * seg.weight)
        targets.append(y * seg.weight)
    xm, ym = np.concatenate(rows), np.concatenate(targets)
    beta = _lsq(xm, ym)
    if gains is None and np.any(beta[:2] < 1e-6):  # a mode with negative gain: not a ladder
        from scipy.optimize import lsq_linear

        lo = np.full(n_lin, -np.inf)
        lo[:2] = 1e-6
        beta = lsq_linear(xm, ym, bounds=(lo, np.full(n_lin, np.inf))).x
    g = beta[:2] if gains is None else np.asarray(gains, dtype=float)
    j = 2 if gains is None else 0
    supply = beta[j : j + n_grp]
    free = beta[j + n_grp :].reshape(n_seg, 2)
    pred = [
        cols[:, 0:2] @ g + supply[s.group] + cols[:, 2:4] @ free[i]
        for i, (s, cols) in enumerate(zip(segs, blocks, strict=True))
    ]
    resid = np.concatenate(
        [s.weight * (pr - s.die_c)[np.isfinite(s.die_c)] for pr, s in zip(pred, segs, strict=True)]
    )
    return _DieSolution(g, supply, free, resid, pred)


def _states(
    segs: list[_Segment], params: ThermalParams, die: _DieSolution, v: FloatArray
) -> list[tuple[FloatArray, FloatArray]]:
    """(die, plate) rises on each segment's grid: forced + free, from the Cauer ladder's modes."""
    (tau1, _), (tau2, _), _ = cauer_to_foster(params)
    out = []
    for i, seg in enumerate(segs):
        p = _heat(seg, params.power_lag_s)
        x = np.zeros((len(seg.grid_s), 2))
        w_b = np.linalg.solve(v, _ladder(params)[1])  # modal input gains
        for k, tau in enumerate((tau1, tau2)):
            e = math.exp(-seg.h_s / tau)
            amp = die.free[i, k] / v[0, k]
            mode = _first_order(p, e, w_b[k] * tau * (1.0 - e)) + amp * np.exp(-seg.grid_s / tau)
            x += np.outer(mode, v[:, k])
        out.append((x[:, 0], x[:, 1]))
    return out


def _mem_columns(
    seg: _Segment, params: ThermalParams, die_plate: tuple[FloatArray, FloatArray]
) -> FloatArray:
    """Per sample: HBM rise with r_mem = 0 from zero state, unit-r_mem response, free decay."""
    base = replace(params, r_mem_k_per_w=0.0)
    ad, bd = discretize(base, seg.h_s)
    e = math.exp(-seg.h_s / params.tau_mem_s)
    p = _heat(seg, params.power_lag_s)
    drive = ad[2, 0] * die_plate[0] + ad[2, 1] * die_plate[1] + bd[2] * p
    cols = [
        _first_order(drive, e, 1.0),
        _first_order(p, e, 1.0 - e),
    ]
    return np.stack(
        [*(np.interp(seg.t_s, seg.grid_s, c) for c in cols), np.exp(-seg.t_s / params.tau_mem_s)], 1
    )


@dataclass(frozen=True, slots=True)
class _MemSolution:
    r_mem_k_per_w: float
    offset_c: float
    free: FloatArray  # (n_segments,), NaN for a segment without HBM readings
    resid: FloatArray  # weighted
    pred: list[FloatArray]  # NaN for a segment without HBM readings


def _solve_mem(
    segs: list[_Segment],
    params: ThermalParams,
    die_plate: list[tuple[FloatArray, FloatArray]],
    supply_c: FloatArray,
    fixed: bool,
) -> _MemSolution:
    """Linear part of the HBM fit for a fixed τ_mem: r_mem and offset (unless fixed), initial rises.

    Only segments with HBM readings take part (a trace may lack the column).
    """
    idx = [i for i, s in enumerate(segs) if s.mem_c is not None]
    blocks = {i: _mem_columns(segs[i], params, die_plate[i]) for i in idx}
    n_free = len(idx)
    n_lin = (0 if fixed else 2) + n_free
    rows, targets = [], []
    for k, i in enumerate(idx):
        seg, cols = segs[i], blocks[i]
        assert seg.mem_c is not None
        ok = np.isfinite(seg.mem_c)
        x = np.zeros((int(ok.sum()), n_lin))
        y = seg.mem_c[ok] - supply_c[seg.group] - cols[ok, 0]
        if fixed:
            y = y - params.r_mem_k_per_w * cols[ok, 1] - params.mem_offset_c
        else:
            x[:, 0] = cols[ok, 1]
            x[:, 1] = 1.0
        x[:, n_lin - n_free + k] = cols[ok, 2]
        rows.append(x * seg.weight)
        targets.append(y * seg.weight)
    beta = _lsq(np.concatenate(rows), np.concatenate(targets))
    r_mem, offset = (params.r_mem_k_per_w, params.mem_offset_c) if fixed else (float(beta[0]), float(beta[1]))
    free = np.full(len(segs), math.nan)
    free[idx] = beta[n_lin - n_free :]
    pred = [
        supply_c[s.group] + offset + c[:, 0] + r_mem * c[:, 1] + free[i] * c[:, 2]
        if (c := blocks.get(i)) is not None
        else np.full(len(s.t_s), math.nan)
        for i, s in enumerate(segs)
    ]
    resid = np.concatenate(
        [
            s.weight * (pred[i] - s.mem_c)[np.isfinite(s.mem_c)]
            for i, s in enumerate(segs)
            if s.mem_c is not None
        ]
    )
    return _MemSolution(r_mem, offset, free, resid, pred)


# --- the fit --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FitResult:
    """Outcome of :func:`fit_trace` or :func:`validate`.

    Attributes:
        params: The thermal parameters (fitted, or the ones validated).
        supply_c: Effective supply temperature (or offset over the measured supply) of
            the first trace (each trace of a joint fit has its own: validate on it).
        x0_k: Initial state rises (die, plate, mem) of the first segment.
        rmse_open_loop_c: Die RMSE of a simulation driven only by power (supply and
            each segment's initial state estimated), over every sample of every trace.
        rmse_10s_c: Die RMSE of 10 s-ahead predictions anchored on the measured die
            temperature at each start point (the MPC's offset-free predictor).
        rmse_mem_open_loop_c: HBM open-loop RMSE, if the trace has HBM temperatures.
        rmse_mem_10s_c: HBM 10 s-ahead RMSE, if the trace has HBM temperatures.
        intervals: 95 % confidence intervals of the searched parameters (corrected for
            autocorrelated residuals), by name; empty for a validation.
        time_constants_s: The searched time constants (die fast, plate slow, HBM) and lag.
        warnings: A parameter at a bound, an interval wider than the parameter ...
        die_pred_c: Predicted die temperature at each sample (for plots).
        mem_pred_c: Predicted HBM temperature at each sample, or None.
        power_window_s: The power reading's averaging window that was undone.
    """

    params: ThermalParams
    supply_c: float
    x0_k: tuple[float, float, float]
    rmse_open_loop_c: float
    rmse_10s_c: float
    rmse_mem_open_loop_c: float | None
    rmse_mem_10s_c: float | None = None
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    time_constants_s: dict[str, float] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    die_pred_c: FloatArray = field(default_factory=lambda: np.zeros(0))
    mem_pred_c: FloatArray | None = None
    power_window_s: float = POWER_WINDOW_S

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures (no arrays)."""

        def r(v: float | None) -> float | None:
            return None if v is None or not math.isfinite(v) else round(v, 4)

        return {
            "params": self.params.as_dict(),
            "power_window_s": self.power_window_s,
            "supply_c": round(self.supply_c, 3),
            "initial_state_k": dict(
                zip(("die", "plate", "mem"), (round(v, 3) for v in self.x0_k), strict=True)
            ),
            "rmse_open_loop_c": r(self.rmse_open_loop_c),
            "rmse_10s_c": r(self.rmse_10s_c),
            "rmse_mem_open_loop_c": r(self.rmse_mem_open_loop_c),
            "rmse_mem_10s_c": r(self.rmse_mem_10s_c),
            "time_constants_s": {k: round(v, 4) for k, v in self.time_constants_s.items()},
            "intervals_95": {k: [round(lo, 4), round(hi, 4)] for k, (lo, hi) in self.intervals.items()},
            "bounds": {k: list(v) for k, v in BOUNDS_S.items() if k in self.time_constants_s},
            "warnings": list(self.warnings),
        }


def _rmse(e: FloatArray) -> float:
    return float(np.sqrt(np.mean(e**2))) if e.size else math.nan


def _ahead_errors(segs: list[_Segment], pred: list[FloatArray], meas: str, horizon_s: float) -> FloatArray:
    errs = []
    for seg, p in zip(segs, pred, strict=True):
        y = seg.die_c if meas == "die" else seg.mem_c
        if y is None:
            continue
        idx = np.searchsorted(seg.t_s, seg.t_s + horizon_s)
        ok = idx < len(seg.t_s)
        k, j = np.nonzero(ok)[0], idx[ok]
        e = y[k] + p[j] - p[k] - y[j]
        errs.append(e[np.isfinite(e)])
    return np.concatenate(errs)


def _interval(
    x: FloatArray, jac: FloatArray, resid: FloatArray, n_linear: int
) -> tuple[FloatArray, FloatArray] | None:
    """95 % half-widths of x from the projected Jacobian, inflated for residual autocorrelation."""
    n, p = len(resid), len(x) + n_linear
    if n <= p + 2:
        return None
    rho = float(np.corrcoef(resid[:-1], resid[1:])[0, 1]) if np.std(resid) > 0 else 0.0
    rho = min(max(rho, 0.0), 0.99)
    s2 = float(resid @ resid) / (n - p) * (1 + rho) / (1 - rho)
    try:
        cov = np.linalg.pinv(jac.T @ jac) * s2
    except np.linalg.LinAlgError:
        return None
    half = 1.96 * np.sqrt(np.maximum(np.diag(cov), 0.0))
    return x - half, x + half


def _exp(log_v: float) -> float:
    return math.exp(min(float(log_v), 30.0))


def _at_bound(name: str, value: float) -> str | None:
    for b in BOUNDS_S[name]:
        if abs(value - b) < 1e-3 if b == 0.0 else abs(math.log(value / b)) < 0.01:
            return f"{name} = {value:.4g} sits at its bound {b:g}: not identifiable from this trace"
    return None


def fit_trace(trace: Trace, *, power_window_s: float = POWER_WINDOW_S) -> FitResult:
    """Fit the thermal model to one trace: :func:`fit_traces` with one trace."""
    return fit_traces([trace], power_window_s=power_window_s)


def fit_traces(traces: Sequence[Trace], *, power_window_s: float = POWER_WINDOW_S) -> FitResult:
    """Fit one thermal model to one or more traces of the same GPU (see the module docstring).

    Each trace has its own supply temperature and each segment its own initial state;
    the thermal parameters are shared. Every trace weighs the same in the fit, whatever
    its length or sample rate (a 14 s step test is not drowned by a 3-minute log).

    Args:
        traces: Cleaned traces (the reference flow is assumed throughout).
        power_window_s: The power reading is the mean heat over this window (0: no averaging).

    Returns:
        The fit, its error figures over all traces, confidence intervals and warnings.
        Per-trace figures: :func:`validate` the fitted parameters on each trace (it
        estimates the same supply and initial states the joint fit did).

    Raises:
        TraceError: A trace cannot identify a model (too short, no power step, constant
            temperature; ``trace_index`` says which), or there is none.
    """
    from scipy.optimize import least_squares

    if not traces:
        raise TraceError("no trace to fit")
    for i, trace in enumerate(traces):
        try:
            check_identifiable(trace)
        except TraceError as exc:
            exc.trace_index = i
            raise
    segs = _segments(traces, power_window_s)
    (lo_f, hi_f), (lo_s, hi_s), (lo_l, hi_l) = (
        BOUNDS_S["tau_fast_s"],
        BOUNDS_S["tau_slow_s"],
        BOUNDS_S["power_lag_s"],
    )

    def unpack(v: FloatArray) -> tuple[tuple[float, float], float]:
        return (math.exp(v[0]), math.exp(v[1])), float(v[2])

    def resid(v: FloatArray) -> FloatArray:
        taus, lag = unpack(v)
        return _solve_die(segs, taus, lag, None).resid

    lo = np.array([math.log(lo_f), math.log(lo_s), lo_l])
    hi = np.array([math.log(hi_f), math.log(hi_s), hi_l])
    # Multi-start: screen a grid of starting points (one linear solve each), then descend
    # from the best two.
    grid = [np.array([math.log(f), math.log(s), 0.1]) for f in (0.05, 0.3, 2.0) for s in (5.0, 25.0, 150.0)]
    starts = sorted(grid, key=lambda v: float(np.sum(resid(v) ** 2)))[:2]
    best = None
    for v0 in starts:
        sol = least_squares(resid, v0, bounds=(lo, hi), x_scale=[1.0, 1.0, 0.3], diff_step=1e-4)
        if best is None or sol.cost < best.cost:
            best = sol
    assert best is not None
    (tau1, tau2), lag = unpack(best.x)
    die = _solve_die(segs, (tau1, tau2), lag, None)
    r_dp, tau_die, r_pc, tau_plate = foster_to_cauer(tau1, float(die.gains[0]), tau2, float(die.gains[1]))
    prm = replace(
        DEFAULT_PARAMS,
        r_die_plate_k_per_w=r_dp,
        tau_die_s=tau_die,
        r_plate_coolant_k_per_w=r_pc,
        tau_plate_s=tau_plate,
        power_lag_s=lag,
    )
    names = ["tau_fast_s", "tau_slow_s", "power_lag_s"]
    values = [tau1, tau2, lag]
    intervals: dict[str, tuple[float, float]] = {}
    ci = _interval(best.x, best.jac, die.resid, 2 + len(die.supply_c) + 2 * len(segs))
    if ci is not None:
        intervals["tau_fast_s"] = (_exp(ci[0][0]), _exp(ci[1][0]))
        intervals["tau_slow_s"] = (_exp(ci[0][1]), _exp(ci[1][1]))
        intervals["power_lag_s"] = (float(ci[0][2]), float(ci[1][2]))

    mem: _MemSolution | None = None
    if any(s.mem_c is not None for s in segs):
        prm, mem, mem_ci = _fit_mem(segs, prm, die)
        names.append("tau_mem_s")
        values.append(prm.tau_mem_s)
        if mem_ci is not None:
            intervals["tau_mem_s"] = mem_ci
    taus = dict(zip(names, values, strict=True))
    res = _result(segs, prm, die, mem, intervals, taus, power_window_s)
    if mem is None:
        res = replace(res, warnings=(*res.warnings, NO_HBM_WARNING))
    return res


def _fit_mem(
    segs: list[_Segment], prm: ThermalParams, die: _DieSolution
) -> tuple[ThermalParams, _MemSolution, tuple[float, float] | None]:
    from scipy.optimize import least_squares

    _, _, v = cauer_to_foster(prm)
    die_plate = _states(segs, prm, die, v)
    lo, hi = BOUNDS_S["tau_mem_s"]

    def solve(log_tau: float) -> _MemSolution:
        return _solve_mem(segs, replace(prm, tau_mem_s=math.exp(log_tau)), die_plate, die.supply_c, False)

    grid = np.linspace(math.log(lo), math.log(hi), 12)
    start = grid[int(np.argmin([_rmse(solve(g).resid) for g in grid]))]
    sol = least_squares(
        lambda x: solve(float(x[0])).resid, [start], bounds=([math.log(lo)], [math.log(hi)]), diff_step=1e-4
    )
    mem = solve(float(sol.x[0]))
    prm = replace(
        prm, tau_mem_s=math.exp(float(sol.x[0])), r_mem_k_per_w=mem.r_mem_k_per_w, mem_offset_c=mem.offset_c
    )
    ci = _interval(sol.x, sol.jac, mem.resid, 2 + sum(s.mem_c is not None for s in segs))
    return prm, mem, None if ci is None else (_exp(ci[0][0]), _exp(ci[1][0]))


def _result(
    segs: list[_Segment],
    prm: ThermalParams,
    die: _DieSolution,
    mem: _MemSolution | None,
    intervals: dict[str, tuple[float, float]],
    taus: dict[str, float],
    power_window_s: float,
) -> FitResult:
    _, _, v = cauer_to_foster(prm)
    x0 = v @ (die.free[0] / v[0, :])
    warnings = [w for k, val in taus.items() if (w := _at_bound(k, val)) is not None]
    for k, (lo, hi) in intervals.items():
        if k in taus and taus[k] > 0 and (hi - lo) > 2.0 * taus[k]:
            warnings.append(f"{k} is poorly determined: 95 % interval [{lo:.3g}, {hi:.3g}]")
    supply = np.concatenate([s.supply_c for s in segs])
    die_pred = np.concatenate(die.pred)
    die_meas = np.concatenate([s.die_c for s in segs])
    mem_pred = mem_rmse = None
    mem_x0 = float(x0[1])  # without HBM readings in the first segment: HBM starts at the plate
    if mem is not None:
        if math.isfinite(mem.free[0]):
            mem_x0 = float(mem.free[0])
        mem_pred = np.concatenate(mem.pred)
        mem_meas = np.concatenate(
            [s.mem_c if s.mem_c is not None else np.full(len(s.t_s), np.nan) for s in segs]
        )
        mem_rmse = _rmse((mem_pred - mem_meas)[np.isfinite(mem_meas)])
        mem_pred = mem_pred + supply
    return FitResult(
        params=prm,
        supply_c=float(die.supply_c[0]),
        x0_k=(float(x0[0]), float(x0[1]), mem_x0),
        rmse_open_loop_c=_rmse((die_pred - die_meas)[np.isfinite(die_meas)]),
        rmse_10s_c=_rmse(_ahead_errors(segs, die.pred, "die", 10.0)),
        rmse_mem_open_loop_c=mem_rmse,
        rmse_mem_10s_c=None if mem is None else _rmse(_ahead_errors(segs, mem.pred, "mem", 10.0)),
        intervals=intervals,
        time_constants_s=taus,
        warnings=tuple(warnings),
        die_pred_c=die_pred + supply,
        mem_pred_c=mem_pred,
        power_window_s=power_window_s,
    )


def validate(
    params: ThermalParams, trace: Trace, *, power_window_s: float = POWER_WINDOW_S, hbm: bool = True
) -> FitResult:
    """Open-loop error of given parameters on a trace they were not fitted to.

    Only what a new trace cannot share with the fit is estimated: the supply
    temperature and each segment's initial state (die/plate modes, HBM rise).

    Args:
        params: The model to check (e.g. from another trace's fit).
        trace: The unseen trace.
        power_window_s: The power reading's averaging window (as in the fit).
        hbm: Check the HBM part too (False when it was not fitted: no HBM figures then).

    Returns:
        Error figures with ``params`` unchanged.
    """
    segs = _segments([trace], power_window_s)
    (tau1, g1), (tau2, g2), _ = cauer_to_foster(params)
    die = _solve_die(segs, (tau1, tau2), params.power_lag_s, np.array([g1, g2]))
    mem = None
    if hbm and trace.mem_temp_c is not None:
        _, _, v = cauer_to_foster(params)
        mem = _solve_mem(segs, params, _states(segs, params, die, v), die.supply_c, True)
    return _result(segs, params, die, mem, {}, {}, power_window_s)
