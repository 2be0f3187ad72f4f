"""Model-predictive concurrency controller.

Each step, per GPU:

1. propagate the nominal RC model (:mod:`rackguard.controllers.thermal`) with the measured power
   and flow, and update the (gain, offset) tracker (:mod:`rackguard.controllers.ident`) and the
   power-vs-concurrency model (:mod:`rackguard.controllers.power`);
2. predict die and HBM temperature over a horizon of ``horizon_steps`` × ``step_s``
   (default 30 s, two slow time constants) plus the steady state, anchored on the
   current estimate (offset-free) and with the gain's upper confidence bound for rises
   (lower bound for falls), and with the supply temperature's rising trend extrapolated;
3. choose the cap sequence: a first block (``boost_block_s``) then a cap held over the
   horizon. Requests in flight are never killed (the gate only stops admitting), so each
   step's power is max(cap power, power of the concurrency still draining, first order with
   the configured request duration). The plant is a positive system, so every row is
   monotone in the held power: the tail's largest feasible power is exact by segments
   (rows are linear in it between drain breakpoints); the first block's cap is bisected
   with the requests it admits draining after it;
4. node constraints: the power budget (less 3σ of the node's summed power noise) and the
   rack share's power; the **heat into the coolant** (plate → coolant, Q = x_plate/R_pc(flow)),
   kept below what the flow carries at design ΔT (and the share's coolant heat) on every row
   of the horizon, with the plates' stored heat and a falling flow's trend extrapolated; and
   the node power ramp limit. Draining power counts as committed. The node's power is split
   by ``MpcSettings.split``: ``even`` (default) water-fills a common per-GPU ceiling,
   ``packed`` fills GPUs one after another (the rest at ``min_cap``). When the power
   already committed exceeds the limit, each GPU gets its share of the limit as a ceiling:
   it admits nothing until its requests drain to it (never min_cap unless the limit is
   below the floors). In one step the node's planned power falls no more than the limit
   needs plus ``node_fall_frac`` of it;
5. the largest integer cap whose conservative power fits is found on the power grid; a rise
   smaller than ``raise_deadband`` is not taken (the change penalty); a cap falls only when
   it exceeds its die/HBM allowance by more than ``fall_deadband_w``, or the node's caps
   together exceed the node limit. Caps never exceed the concurrency whose time per output
   token meets ``Limits.tpot_slo_s`` (the objective is goodput: tokens per second from
   requests meeting the SLO).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal, get_args

import numpy as np
from numpy.typing import NDArray

from rackguard.controllers.api import Binding, Decision, Limits, NodeShare, Observation
from rackguard.controllers.ident import GainOffsetTracker
from rackguard.controllers.power import OnlinePowerModel, RequestTiming
from rackguard.controllers.thermal import DEFAULT_PARAMS, N_STATES, ThermalParams, discretize

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class MpcSettings:
    """Tuning of :class:`MpcController`.

    Attributes:
        step_s: Prediction step.
        horizon_steps: Prediction steps (horizon = step_s × horizon_steps ≥ 15 s).
        gain_sigmas: Standard deviations of the gain used for a conservative prediction.
        assumed_supply_c: Supply temperature assumed when none is measured (the offset
            estimate absorbs the error).
        raise_deadband: A cap rise smaller than this is not taken.
        boost_block_s: Length of the first block of the planned cap sequence.
        requests: Request duration vs concurrency: after a cut, requests in flight drain
            as they complete (the gate never kills one), so the cut power falls slowly.
        rise_hysteresis_w: A cap rises only if its power fits with this much to spare.
        rise_hold_s: For this long after a GPU's cap fell, a rise needs
            ``rise_hold_factor`` × ``rise_hysteresis_w`` to spare: the cap does not reverse
            on every degree of sensor noise.
        rise_hold_factor: See ``rise_hold_s``.
        fall_deadband_w: A cap whose power exceeds its thermal allowance by no more than
            this is kept (node power and coolant limits get no deadband).
        node_fall_frac: In one step the node's planned power falls no more than the node limit
            needs (power − limit) plus this fraction of the limit.
        mem_noise_std_k: Measurement noise the HBM tracker assumes (the die's assumes 0.8 K):
            a filter, so that one whole-degree HBM reading (τ 1 s, it follows power noise)
            moves the estimate less.
        budget_sigmas: Standard deviations of the node's summed power noise kept free
            under the node power budget.
        split: How a node limit is shared: ``even`` (a common per-GPU power ceiling; every
            GPU serves requests at the same latency) or ``packed`` (GPUs filled one after
            another, the rest at ``min_cap``: more concurrency per watt on a concave power
            curve, but requests on the full GPUs are slow).
        flow_trend_s: Time constant of the flow trend's filter.
        flow_lookahead_s: A falling flow trend is extrapolated this far (then held) for the
            coolant heat constraint: about the plates' time constant, the time the heat
            they store takes to reach the coolant.
        flow_anticipate_frac: The extrapolated flow stays at least this fraction of the flow
            now (a trend does not say where a falling flow stops).
    """

    step_s: float = 1.0
    horizon_steps: int = 30
    gain_sigmas: float = 2.0
    assumed_supply_c: float = 30.0
    raise_deadband: int = 2
    boost_block_s: float = 3.0
    requests: RequestTiming = field(default_factory=RequestTiming)
    rise_hysteresis_w: float = 5.0
    rise_hold_s: float = 60.0
    rise_hold_factor: float = 6.0
    fall_deadband_w: float = 4.0
    node_fall_frac: float = 0.05
    mem_noise_std_k: float = 2.5
    budget_sigmas: float = 3.0
    split: Literal["even", "packed"] = "even"
    flow_trend_s: float = 2.0
    flow_lookahead_s: float = 3.0
    flow_anticipate_frac: float = 0.75


@dataclass(frozen=True, slots=True)
class _Predictor:
    a_pow: FloatArray  # (N, 3, 3): Ad^k, k = 1..N
    gain_const: FloatArray  # (N+1, 3): response to unit power held from step 0; last row steady
    h_die: FloatArray  # (N, N): die response at row k to unit power during step j (k ≥ j)
    h_mem: FloatArray  # (N, N): the same for HBM
    h_both: FloatArray  # (2, N, N): h_die and h_mem stacked
    h_t: FloatArray  # (N, 2N): [h_die.T | h_mem.T], one matmul for both rows
    steady: FloatArray  # (2,): steady rise per watt, die and HBM
    tail_pos: NDArray[np.bool_]  # (2, N, N+1): tail_g > 0 (see _largest_held)
    tail_g: FloatArray  # (2, N, N+1): Σ_{j≥J} h[k, j], 1.0 where not positive
    h_plate: FloatArray  # (1, N, N): plate response (the coolant heat rows)
    plate_pos: NDArray[np.bool_]  # (1, N, N+1): as tail_pos, plate
    plate_g: FloatArray  # (1, N, N+1): as tail_g, plate


class MpcController:
    """MPC that picks the highest per-GPU concurrency caps keeping predictions in limits.

    Args:
        limits: Limits to keep (temperatures minus ``margin_c``).
        n_gpus: GPUs on the node.
        model: Nominal thermal parameters (identical GPUs); defaults fitted from traces.
        settings: Tuning.
    """

    def __init__(
        self,
        limits: Limits,
        n_gpus: int,
        model: ThermalParams = DEFAULT_PARAMS,
        *,
        settings: MpcSettings | None = None,
    ) -> None:
        self.settings = settings or MpcSettings()
        self.limits = limits  # the property also derives the SLO's cap
        self.n_gpus = n_gpus
        self.model = model
        self.power_model = OnlinePowerModel(n_gpus, limits.gpu_power_max_w)
        self.die = GainOffsetTracker(n_gpus)
        self.mem = GainOffsetTracker(n_gpus, noise_std_k=self.settings.mem_noise_std_k)
        self._x = np.zeros((n_gpus, N_STATES))
        self._t_s: float | None = None
        self._supply_c: float | None = None
        self._supply_slope_c_per_s = 0.0
        self._mem_seen = np.zeros(n_gpus, dtype=bool)
        self._caps = np.full(n_gpus, limits.min_cap, dtype=np.int64)
        self._fall_t_s = np.full(n_gpus, -math.inf)
        self._predictors: dict[int | None, _Predictor] = {}
        self._flow_lpm: float | None = None
        self._flow_slope_lpm_per_s = 0.0
        self._node_power_w: float | None = None
        self._dt_s = self.settings.step_s
        self.last_power_allowed_w = np.zeros(n_gpus)

    @property
    def limits(self) -> Limits:
        """The limits (temperature targets are ``margin_c`` below them)."""
        return self._limits_given

    @limits.setter
    def limits(self, limits: Limits) -> None:
        self._limits_given = limits
        # Caps never exceed the concurrency that meets the TPOT SLO (nor go below min_cap).
        slo_cap = self.settings.requests.max_concurrency_for_slo(limits.tpot_slo_s)
        hi = max(
            limits.min_cap,
            min(limits.max_cap, math.floor(slo_cap) if math.isfinite(slo_cap) else limits.max_cap),
        )
        self._lim = limits if hi == limits.max_cap else replace(limits, max_cap=hi)

    # --- model -----------------------------------------------------------------------------------
    def _predictor(self, flow_lpm: float | None) -> _Predictor:
        key = None if flow_lpm is None else round(flow_lpm * 10.0)
        pred = self._predictors.get(key)
        if pred is None:
            flow = None if key is None else key / 10.0
            ad, bd = discretize(self.model, self.settings.step_s, flow)
            n = self.settings.horizon_steps
            a_pow = np.empty((n, N_STATES, N_STATES))
            gain = np.empty((n, N_STATES))
            a_k = np.eye(N_STATES)
            acc = np.zeros(N_STATES)
            for k in range(n):
                acc = acc + a_k @ bd
                a_k = ad @ a_k
                a_pow[k] = a_k
                gain[k] = acc
            die, _, mem = self.model.steady_rise_k(1.0, flow)
            steady = np.array([die, 0.0, mem])
            imp = np.diff(gain, axis=0, prepend=np.zeros((1, N_STATES)))  # A^m·B
            lag = np.arange(n)[:, None] - np.arange(n)[None, :]
            h = np.where((lag >= 0)[..., None], imp[np.maximum(lag, 0)], 0.0)  # (N, N, 3)
            h_die = np.ascontiguousarray(h[:, :, 0])
            h_mem = np.ascontiguousarray(h[:, :, 2])
            h_both = np.stack([h_die, h_mem])
            g = np.zeros((2, n, n + 1))
            g[:, :, :-1] = np.cumsum(h_both[:, :, ::-1], axis=2)[:, :, ::-1]
            pos = g > 1e-12
            h_plate = np.ascontiguousarray(h[None, :, :, 1])
            gp = np.zeros((1, n, n + 1))
            gp[:, :, :-1] = np.cumsum(h_plate[:, :, ::-1], axis=2)[:, :, ::-1]
            pos_p = gp > 1e-12
            pred = _Predictor(
                a_pow,
                np.vstack([gain, steady]),
                h_die,
                h_mem,
                h_both,
                np.ascontiguousarray(np.hstack([h_die.T, h_mem.T])),
                np.array([steady[0], steady[2]]),
                pos,
                np.where(pos, g, 1.0),
                h_plate,
                pos_p,
                np.where(pos_p, gp, 1.0),
            )
            if len(self._predictors) > 512:
                self._predictors.clear()
            self._predictors[key] = pred
        return pred

    def _init_state(self, supply_c: float, temp_c: FloatArray, power_w: FloatArray) -> None:
        r_dp = self.model.r_die_plate_k_per_w
        x_die = np.where(np.isfinite(temp_c), temp_c - supply_c, self.model.r_total_k_per_w * power_w)
        x_plate = np.maximum(x_die - r_dp * power_w, 0.0)
        x_die = x_plate + r_dp * power_w
        self._x = np.stack([x_die, x_plate, x_plate + self.model.r_mem_k_per_w * power_w], axis=1)

    # --- step ------------------------------------------------------------------------------------
    def step(self, obs: Observation) -> Decision:
        """Identify from this observation and decide the caps.

        Args:
            obs: The node now.

        Returns:
            Integer caps in [min_cap, max_cap], reason "mpc".
        """
        s = self.settings
        gpus = obs.gpus
        lost = np.array([g.lost for g in gpus], dtype=bool)
        temp_c = np.array([np.nan if g.gpu_temp_c is None or g.lost else g.gpu_temp_c for g in gpus])
        mem_c = np.array([np.nan if g.mem_temp_c is None or g.lost else g.mem_temp_c for g in gpus])
        conc = np.array([max(g.concurrency, 0.0) for g in gpus])
        power_meas = np.array([np.nan if g.power_w is None or g.lost else g.power_w for g in gpus])
        have_power = np.isfinite(power_meas)
        power_w = np.where(have_power, power_meas, self.power_model.conservative_power_w(conc))

        supply_meas = obs.coolant.supply_temp_c if not obs.coolant.stale else None
        flow = obs.coolant.flow_lpm if not obs.coolant.stale else None
        supply_c = supply_meas if supply_meas is not None else (self._supply_c or s.assumed_supply_c)

        if self._t_s is None:
            self._init_state(supply_c, temp_c, power_w)
            dt_s = s.step_s
        else:
            dt_s = max(obs.t_s - self._t_s, 1e-3)
            ad, bd = discretize(self.model, min(dt_s, 60.0), flow)
            self._x = self._x @ ad.T + power_w[:, None] * bd[None, :]
            if self._supply_c is not None and supply_meas is not None:
                slope = (supply_meas - self._supply_c) / dt_s
                alpha = min(dt_s / 30.0, 1.0)
                self._supply_slope_c_per_s += alpha * (slope - self._supply_slope_c_per_s)
            if self._flow_lpm is not None and flow is not None:
                slope = (flow - self._flow_lpm) / dt_s
                alpha = min(dt_s / s.flow_trend_s, 1.0)
                self._flow_slope_lpm_per_s += alpha * (slope - self._flow_slope_lpm_per_s)
        self._t_s = obs.t_s
        self._supply_c = supply_c
        self._dt_s = dt_s
        if flow is None:
            self._flow_slope_lpm_per_s = 0.0
        self._flow_lpm = flow
        valid_p = have_power & ~lost
        self._node_power_w = float(np.sum(power_meas[valid_p])) if np.any(valid_p) else None

        have_t = np.isfinite(temp_c)
        self.die.update(self._x[:, 0], np.where(have_t, temp_c - supply_c, 0.0), have_t, dt_s)
        have_m = np.isfinite(mem_c)
        self._mem_seen |= have_m
        mem_rise = mem_c - supply_c - self.model.mem_offset_c
        self.mem.update(self._x[:, 2], np.where(have_m, mem_rise, 0.0), have_m, dt_s)
        self.power_model.update(conc, power_meas, have_power & ~lost)

        return self._solve(supply_c, flow, lost, conc, obs.share)

    def _solve(
        self,
        supply_c: float,
        flow_lpm: float | None,
        lost: NDArray[np.bool_],
        conc: FloatArray,
        share: NodeShare | None = None,
    ) -> Decision:
        lim = self._lim
        s = self.settings
        pred = self._predictor(flow_lpm)
        n_rows = s.horizon_steps + 1
        # Free response of each state (n, N+1, 3); the last row is the steady state (free → 0).
        free = np.zeros((self.n_gpus, n_rows, N_STATES))
        free[:, :-1, :] = np.einsum("kij,gj->gki", pred.a_pow, self._x)
        t_rows_s = s.step_s * np.arange(1, n_rows + 1, dtype=float)
        t_rows_s[-1] = s.step_s * s.horizon_steps
        supply_rise_k = max(self._supply_slope_c_per_s, 0.0) * t_rows_s  # (N+1,)

        # An estimate already above its target (a noise spike, a whole-degree reading) may
        # come down as fast as the requests in flight drain, not at once: the excess now is
        # allowed on each row, falling linearly to zero over the drain time (none at steady).
        drain_s = s.requests.duration_s(conc)[:, None]
        decay = np.maximum(1.0 - t_rows_s[None, :] / drain_s, 0.0)
        decay[:, -1] = 0.0

        def room(tracker: GainOffsetTracker, state: int, limit_c: float, offset_c: float) -> FloatArray:
            # Largest model rise each row may add over its free response, (n, N+1).
            r_now = self._x[:, state]
            est_c = supply_c + offset_c + tracker.estimate_k(r_now)
            g_hi = np.minimum(tracker.gain + s.gain_sigmas * tracker.gain_std, tracker.gain_max)
            g_lo = np.maximum(tracker.gain - s.gain_sigmas * tracker.gain_std, tracker.gain_min)
            excess_k = np.maximum(est_c - limit_c, 0.0)[:, None] * decay
            head_k = limit_c - est_c[:, None] - supply_rise_k[None, :] + excess_k
            d_rise_max = np.where(head_k >= 0, head_k / g_hi[:, None], head_k / g_lo[:, None])
            return np.asarray(d_rise_max + r_now[:, None] - free[:, :, state])

        room_die = room(self.die, 0, lim.gpu_temp_max_c - lim.margin_c, 0.0)
        room_mem = room(self.mem, 2, lim.mem_temp_max_c - lim.margin_c, self.model.mem_offset_c)
        p_max = lim.gpu_power_max_w
        # Requests in flight are never killed: after a cut they drain as they complete, so the
        # power of step j is max(held power, power of the drained concurrency), pd (n, N).
        pd = self._drained_power_w(conc, s.horizon_steps)
        # A row the drain alone already exceeds cannot be met by any cap: it gets what the drain
        # gives it (the cap then only limits admissions the later rows can afford), instead of
        # stopping all admissions on a tenth of a degree of noise.
        drain_rise = pd @ pred.h_t
        room_die[:, :-1] = np.maximum(room_die[:, :-1], drain_rise[:, : s.horizon_steps])
        room_mem[:, :-1] = np.maximum(room_mem[:, :-1], drain_rise[:, s.horizon_steps :])
        # The largest power held over the whole horizon and beyond (drain included).
        held = self._largest_held(
            np.stack([room_die, room_mem]), pred.h_both, pred.tail_pos, pred.tail_g, pred.steady, pd
        )
        p_die = held[0]
        p_mem = np.where(self._mem_seen, held[1], np.inf)
        p_tail = np.clip(np.minimum(p_die, p_mem), 0.0, p_max)
        # First block: a higher cap for boost_block_s, then the tail cap, with the requests
        # admitted in the block draining after it (found by bisection over integer caps).
        cap_a, p_die, p_mem = self._first_block(room_die, room_mem, pred, pd, p_tail)
        pm = self.power_model
        p_allow = np.clip(np.maximum(pm.power_at_caps_w(cap_a, lim.max_cap), p_tail), 0.0, p_max)
        binding_gpu: list[Binding] = [
            "gpu_temp" if d <= m else "mem_temp" for d, m in zip(p_die, p_mem, strict=True)
        ]

        # Node constraints, shared by a common per-GPU ceiling (water-filling).
        node_w = math.inf
        node_kind: Binding = "none"
        if lim.node_power_budget_w is not None:
            # The budget is kept by the node's 1 s average, which sums every GPU's noise.
            node_w = lim.node_power_budget_w - s.budget_sigmas * self.power_model.node_noise_w()
            node_kind = "power"
        if share is not None and share.power_w < node_w:
            node_w, node_kind = share.power_w, "rack_power"
        if flow_lpm is not None or share is not None:
            q_w, q_kind = self._heat_power_w(flow_lpm, share, pd, conc)
            if q_w < node_w:
                node_w, node_kind = q_w, q_kind
        node_floor_w = 0.0
        if math.isfinite(node_w) and self._node_power_w is not None:
            # Node power falls in a step by no more than the limit now needs plus
            # node_fall_frac of it (a falling flow anticipated, drained requests fell far below).
            lim_now = min(
                math.inf if lim.node_power_budget_w is None else lim.node_power_budget_w,
                math.inf if flow_lpm is None else lim.coolant_heat_max_w(flow_lpm),
                math.inf if share is None else min(share.power_w, share.coolant_heat_w),
            )
            if math.isfinite(lim_now):
                node_floor_w = min(self._node_power_w, lim_now) - s.node_fall_frac * lim_now
        ramp = lim.node_power_ramp_w_per_s
        if ramp is not None and self._node_power_w is not None:
            r_w = self._node_power_w + ramp * self._dt_s
            if r_w < node_w:
                node_w, node_kind = r_w, "power"
        node_bound = False
        p_thermal = p_allow
        if math.isfinite(node_w) and float(np.sum(p_allow)) > node_w:
            p_allow = self._share_node_power(p_allow, node_w, lost, pd[:, 0])
            if float(np.sum(p_allow)) < node_floor_w:
                floor = self._share_node_power(p_thermal, node_floor_w, lost, np.zeros(self.n_gpus))
                p_allow = np.maximum(p_allow, floor)
            node_bound = True
        self.last_power_allowed_w = p_allow

        # Change penalty (hysteresis): a rise must fit with rise_hysteresis_w to spare (unless
        # unconstrained) and be at least raise_deadband; a fall happens only when the current
        # cap no longer fits.
        unconstrained = p_allow >= p_max
        t_now = self._t_s if self._t_s is not None else 0.0
        holding = t_now - self._fall_t_s < s.rise_hold_s
        spare_w = np.where(holding, s.rise_hold_factor * s.rise_hysteresis_w, s.rise_hysteresis_w)
        p_rise = np.where(unconstrained, p_allow, p_allow - spare_w)
        caps_rise = pm.max_concurrency(p_rise, lim.min_cap, lim.max_cap)
        prev = np.clip(self._caps, lim.min_cap, lim.max_cap)  # limits may change on reload
        # A cap within fall_deadband_w of its thermal allowance is kept (sensor noise on a flat
        # power curve moves the cap by tens for a watt). A node limit binds the sum, not each
        # GPU's share: caps whose summed power (draining requests included) fits are kept.
        p_prev = pm.power_at_caps_w(prev, lim.max_cap)
        prev_fits = p_prev <= p_thermal + s.fall_deadband_w
        if node_bound and float(np.sum(np.maximum(p_prev, pd[:, 0]))) > node_w:
            prev_fits &= p_prev <= p_allow
        caps_fit = pm.max_concurrency(p_allow, lim.min_cap, lim.max_cap)
        caps = caps_rise
        small_rise = (caps > prev) & (caps - prev < s.raise_deadband) & (caps < lim.max_cap)
        # On a fall, drop to what fits with the same spare, so that the next falls are fewer
        # (without the spare if the node's power would fall below its floor).
        caps_fall = np.where(pm.power_at_caps_w(caps_fit, lim.max_cap) <= p_rise, caps_fit, caps_rise)
        caps_kept = np.where((caps > prev) & ~small_rise, caps, prev)
        caps = np.where(prev_fits, caps_kept, caps_fall)
        p_caps = pm.power_at_caps_w(caps, lim.max_cap)
        if float(np.sum(p_caps)) < node_floor_w:
            caps = np.where(prev_fits, caps_kept, caps_fit)
            p_caps = pm.power_at_caps_w(caps, lim.max_cap)
        if node_bound and float(np.sum(np.maximum(p_caps, pd[:, 0]))) > node_w:
            caps = np.minimum(caps, prev)  # no rise past the node limit
        caps = np.where(lost, lim.min_cap, caps)
        self._fall_t_s = np.where(caps < prev, t_now, self._fall_t_s)
        self._caps = caps

        # Prediction at the chosen caps (for reporting), die only, drain included.
        p_caps = pm.power_at_caps_w(caps, lim.max_cap)
        r_now = self._x[:, 0]
        u = np.maximum(p_caps[:, None], pd)
        forced = np.concatenate([u @ pred.h_die.T, pred.gain_const[-1, 0] * p_caps[:, None]], axis=1)
        d_rise = free[:, :, 0] + forced - r_now[:, None]
        g_hi = np.minimum(self.die.gain + s.gain_sigmas * self.die.gain_std, self.die.gain_max)
        g_lo = np.maximum(self.die.gain - s.gain_sigmas * self.die.gain_std, self.die.gain_min)
        g_sel = np.where(d_rise >= 0, g_hi[:, None], g_lo[:, None])
        t_pred = supply_c + self.die.estimate_k(r_now)[:, None] + g_sel * d_rise + supply_rise_k[None, :]
        alive = ~lost
        t_max = float(np.max(t_pred[alive])) if np.any(alive) else None

        binding: Binding = "none"
        if node_bound:
            binding = node_kind
        elif np.any(caps < lim.max_cap):
            worst = int(np.argmin(np.where(alive, p_allow, np.inf)))
            binding = binding_gpu[worst]
        assert binding in get_args(Binding)
        return Decision(tuple(int(c) for c in caps), "mpc", binding, t_max)

    def _heat_power_w(
        self, flow_lpm: float | None, share: NodeShare | None, pd: FloatArray, conc: FloatArray
    ) -> tuple[float, Binding]:
        """Largest node power held over the horizon with the heat into the coolant in limits.

        The heat the plates pass to the coolant is Q = Σ x_plate / R_pc(flow), limited to what
        the flow carries at design ΔT (and the rack share's coolant heat): a limit on the plate
        rise, x_plate ≤ Q_max·R_pc(flow), linear in power. The plates' stored heat (their free
        response) is counted, and a falling flow is extrapolated along its trend: the rows
        use the predicted flow's limit, the dynamics the lowest flow over the horizon.

        Args:
            flow_lpm: Node flow now, or None (unknown: reference flow, share's limit only).
            share: The rack share, or None.
            pd: (n, N) drained power per GPU and step (requests in flight are not killed).
            conc: Requests in flight per GPU: the flow is anticipated at least as far as they
                take to drain (power cannot fall faster).

        Returns:
            (node power in W, binding); (inf, "none") if nothing limits it.
        """
        s = self.settings
        lim = self._lim
        n = s.horizon_steps
        t_rows_s = s.step_s * np.arange(1, n + 1, dtype=float)
        ref = self.model.flow_ref_lpm
        if flow_lpm is None:
            flows = np.full(n, ref)
            cap_w = np.full(n, np.inf)
        else:
            slope = min(self._flow_slope_lpm_per_s, 0.0)
            drain_s = float(s.requests.duration_s(float(np.max(conc, initial=0.0))))
            ahead = t_rows_s <= max(s.flow_lookahead_s, drain_s)
            low = max(s.flow_anticipate_frac * flow_lpm, 0.05 * ref)
            flows = np.where(ahead, np.maximum(flow_lpm + slope * t_rows_s, low), max(flow_lpm, 0.05 * ref))
            cap_w = lim.coolant_heat_max_w(1.0) * flows  # ṁ·cp·ΔT is linear in flow
        kind: Binding = "coolant_flow"
        if share is not None:
            # In a rack the CDU's flow is the whole rack's: this node's part of its capacity is
            # the share (the flow still sets the plates' dynamics).
            cap_w = np.full(n, share.coolant_heat_w)
            kind = "rack_coolant"
        if not np.all(np.isfinite(cap_w)):
            return math.inf, "none"
        # Power noise is not in the plan: keep budget_sigmas of it free, as under the budget.
        cap_w = cap_w - s.budget_sigmas * self.power_model.node_noise_w()
        r_pc = self.model.r_plate_coolant_k_per_w * (ref / flows) ** self.model.flow_exponent
        # Steady state at the flow now (the trend is not extrapolated for ever).
        x_max = np.append(cap_w * r_pc, cap_w[-1] * r_pc[-1])  # (N+1,), last: steady
        pred = self._predictor(None if flow_lpm is None else float(np.min(flows)))
        x_node = np.sum(self._x, axis=0)
        free = np.append(pred.a_pow[:, 1, :] @ x_node, 0.0)
        pd_node = np.sum(pd, axis=0)
        room = x_max - free
        # Heat the plates already store above the limit the flow now sets (a step in flow,
        # requests in flight draining) is let decay into the coolant while power is held at
        # that limit: the excess of that plan over the limit now is allowed on every row.
        # Removing it at once would cut power far below the limit, towards min_cap; a falling
        # flow's anticipated, lower limits still apply on top.
        h_pd = pred.h_plate[0] @ pd_node
        at_limit = free[:-1] + pred.h_plate[0] @ np.maximum(pd_node, float(cap_w[-1]))
        room[:-1] += np.maximum(np.maximum(at_limit - float(x_max[-1]), h_pd - room[:-1]), 0.0) + 1e-6
        held = self._largest_held(
            room[None, None, :], pred.h_plate, pred.plate_pos, pred.plate_g, r_pc[-1:], pd_node[None, :]
        )
        return max(float(held[0, 0]), 0.0), kind

    def _drained_power_w(self, conc: FloatArray, n_steps: int) -> FloatArray:
        """Conservative power of the requests now in flight, step by step, if none is admitted.

        Args:
            conc: Requests in flight per GPU.
            n_steps: Steps.

        Returns:
            (n, n_steps): power at the mean drained concurrency of each step (non-increasing).
        """
        step_s = self.settings.step_s
        tau_s = self.settings.requests.duration_s(conc)[:, None]
        t0 = step_s * np.arange(n_steps)[None, :]
        # Mean in flight over each step of the first-order drain n0·exp(−t/τ).
        mean_c = conc[:, None] * tau_s / step_s * (np.exp(-t0 / tau_s) - np.exp(-(t0 + step_s) / tau_s))
        pd = self.power_model.conservative_power_w(mean_c)
        return np.asarray(np.minimum.accumulate(pd, axis=1))

    def _first_block(
        self, room_die: FloatArray, room_mem: FloatArray, pred: _Predictor, pd: FloatArray, p_tail: FloatArray
    ) -> tuple[IntArray, FloatArray, FloatArray]:
        """Largest integer cap held for the first block, then cut to the tail's power.

        After the block, the concurrency admitted in it drains as requests complete (first
        order, the request duration at that concurrency), never below the tail's cap; the
        power of each step is also at least ``pd`` (what is in flight now). Rows are
        monotone in the block's cap, so the caps that fit are a prefix of [min_cap, max_cap]:
        a search evaluating K ≈ √(max_cap − min_cap) candidates per GPU in one vectorised
        call narrows it to one cap in two rounds.

        Returns:
            (cap per GPU, die and HBM slack of the binding row at that cap, W-equivalent
            for choosing the binding constraint).
        """
        s = self.settings
        lim = self._lim
        n_steps = s.horizon_steps
        k_a = max(1, min(n_steps - 1, round(s.boost_block_s / s.step_s)))
        t_after = s.step_s * (np.arange(n_steps) - k_a + 0.5)
        in_block = t_after < 0
        neg_t_after = -np.maximum(t_after, 0.0)
        c_tail = self.power_model.max_concurrency(p_tail, 0, lim.max_cap).astype(float)[:, None, None]
        mem_on = self._mem_seen[:, None]
        rooms = np.concatenate([room_die[:, None, :-1], room_mem[:, None, :-1]], axis=2)  # (n, 1, 2N)
        pd3 = pd[:, None, :]

        def slack(cap: FloatArray) -> tuple[FloatArray, FloatArray]:
            # cap (n, K) → die and HBM slack (n, K).
            tau_s = s.requests.duration_s(cap)[..., None]
            c3 = cap[..., None]
            after = np.maximum(c3 * np.exp(neg_t_after / tau_s), c_tail)
            u = np.maximum(self.power_model.conservative_power_w(np.where(in_block, c3, after)), pd3)
            rows = rooms - (u.reshape(-1, n_steps) @ pred.h_t).reshape((*cap.shape, 2 * n_steps))
            sd = np.min(rows[..., :n_steps], axis=2)
            sm = np.where(mem_on, np.min(rows[..., n_steps:], axis=2), np.inf)
            return sd, sm

        low = np.full(self.n_gpus, lim.min_cap, dtype=np.int64)
        high = np.full(self.n_gpus, lim.max_cap, dtype=np.int64)
        k = max(2, math.ceil(math.sqrt(lim.max_cap - lim.min_cap + 1)))
        ks = np.arange(1, k + 1)
        idx = np.arange(self.n_gpus)
        while np.any(high > low):
            step = np.maximum(-((low - high) // k), 1)  # ceil((high − low)/k)
            cand = np.minimum(low[:, None] + step[:, None] * ks, high[:, None])  # (n, k) ascending
            sd, sm = slack(cand.astype(float))
            n_ok = np.count_nonzero((sd >= 0) & (sm >= 0), axis=1)
            low = np.where(n_ok > 0, cand[idx, np.maximum(n_ok - 1, 0)], low)
            high = np.where(n_ok < k, cand[idx, np.minimum(n_ok, k - 1)] - 1, high)
        sd, sm = slack(np.minimum(low + 1, lim.max_cap).astype(float)[:, None])
        return low, sd[:, 0], sm[:, 0]

    @staticmethod
    def _largest_held(
        room: FloatArray,
        h: FloatArray,
        tail_pos: NDArray[np.bool_],
        tail_g: FloatArray,
        steady: FloatArray,
        pd: FloatArray,
    ) -> FloatArray:
        """Largest power p held over the horizon with every row's forced rise within its room.

        Step j's power is max(p, pd_j): requests in flight drain no faster than ``pd``. With
        pd non-increasing, the steps still above p are the first J, and each row is linear in
        p on every segment pd_J ≤ p < pd_(J−1); rows are monotone in p, so the answer is the
        largest segment-wise bound that lies in its segment (exact, no iteration). Die and
        HBM are done together.

        Args:
            room: (m, n, N+1) largest forced rise per row (m quantities, e.g. die and HBM);
                the last row is the steady state.
            h: (m, N, N) response at row k to unit power during step j.
            tail_pos: (m, N, N+1) Σ_{j≥J} h[k, j] > 0.
            tail_g: (m, N, N+1) Σ_{j≥J} h[k, j], 1.0 where not positive.
            steady: (m,) steady-state rise per watt (the drain is gone by then).
            pd: (n, N) drained power per step, non-increasing.

        Returns:
            (m, n) the largest feasible held power (−inf if none, even at zero).
        """
        n_gpus, n_steps = pd.shape
        rows = room[:, :, :-1]
        # D[g, k, J] = Σ_{j<J} h[k, j]·pd[g, j];  G[k, J] = Σ_{j≥J} h[k, j] (cached in pred).
        d = np.zeros((h.shape[0], n_gpus, n_steps, n_steps + 1))
        np.cumsum(h[:, None, :, :] * pd[None, :, None, :], axis=3, out=d[..., 1:])
        slack = rows[..., None] - d
        pos = tail_pos[:, None]
        bound = np.where(pos, slack / tail_g[:, None], np.where(slack >= 0, np.inf, -np.inf))
        p_j = np.min(bound, axis=2)  # (2, n, N+1)
        hi = np.concatenate([np.full((n_gpus, 1), np.inf), pd], axis=1)
        lo = np.concatenate([pd, np.zeros((n_gpus, 1))], axis=1)
        cand = np.minimum(p_j, hi)
        cand = np.where(cand >= lo, cand, -np.inf)
        return np.minimum(np.max(cand, axis=2), room[:, :, -1] / steady[:, None])

    def _share_node_power(
        self, p_allow: FloatArray, node_w: float, lost: NDArray[np.bool_], committed_w: FloatArray
    ) -> FloatArray:
        """Split a node power limit into per-GPU ceilings (``MpcSettings.split``).

        ``even``: a common ceiling for all (water-filling). ``packed``: GPUs filled one after
        another up to their own ceiling (GPUs now at the highest caps first, so the split is
        stable from tick to tick) while the rest hold ``min_cap``. A GPU's next-step power is
        at least ``committed_w`` (its requests in flight drain, none is killed): a ceiling up
        to it costs nothing, and the node's power is max(ceiling, committed) summed.

        When the committed power alone exceeds the limit, no split of the remainder exists:
        then each GPU gets its even share of the limit (what it may hold once drained), so
        admissions stop in proportion to the excess; caps fall to ``min_cap`` only if the
        limit is below the floors.
        """
        lim = self._lim
        floor = np.minimum(
            self.power_model.conservative_power_w(np.full(self.n_gpus, float(lim.min_cap))), p_allow
        )
        if float(np.sum(np.maximum(floor, committed_w))) > node_w:
            committed_w = np.zeros_like(committed_w)  # over the limit already: share the limit itself
        lo, hi = 0.0, lim.gpu_power_max_w
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            if float(np.sum(np.maximum(np.minimum(p_allow, mid), committed_w))) <= node_w:
                lo = mid
            else:
                hi = mid
        even = np.maximum(np.minimum(p_allow, lo), floor)
        if self.settings.split == "even":
            return even
        base = np.maximum(floor, committed_w)
        spare = node_w - float(np.sum(base))
        if spare < 0.0:
            return even
        packed = np.minimum(base, p_allow)
        for i in np.lexsort((np.arange(self.n_gpus), -self._caps, lost)):
            add = min(float(p_allow[i] - packed[i]), max(spare, 0.0))
            if add > 0.0:
                packed[i] += add
                spare -= add
        return packed

    def confidence(self) -> FloatArray:
        """Per-GPU identification confidence in [0, 1] (min of thermal gain and power curve)."""
        return np.minimum(self.die.confidence(), self.power_model.confidence())
