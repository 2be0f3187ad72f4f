"""Power as a monotone saturating function of concurrency, and its online identification.

The curve is ``P(c) = idle_w + span_w·(1 − exp(−c/sat_concurrency))``: monotone, concave,
saturating, which is what the H100 LLM-decoding measurements show (facts/h100.md:
concurrency 1→256 raised average power from 132 W to 214–326 W; a matrix workload sits
at the 700 W cap). The shape is workload dependent, so :class:`OnlinePowerModel` learns it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class PowerCurve:
    """A saturating power-vs-concurrency curve.

    Attributes:
        idle_w: Power at zero concurrency.
        span_w: Power added at saturation.
        sat_concurrency: Concurrency scale of the saturation (63 % of span reached here).
    """

    idle_w: float
    span_w: float
    sat_concurrency: float

    def power_w(self, concurrency: FloatArray | float) -> FloatArray:
        """Power at a concurrency (vectorised)."""
        c = np.maximum(np.asarray(concurrency, dtype=float), 0.0)
        return self.idle_w + self.span_w * (1.0 - np.exp(-c / self.sat_concurrency))


@dataclass(frozen=True, slots=True)
class RequestTiming:
    """How long an LLM request stays in flight, as a function of the concurrency.

    A decode step advances every sequence in the batch by one token and costs
    ``base + per_concurrency·c`` (a fixed part: weights read once per step; a part per
    sequence: its KV cache and compute), so a request of a fixed number of new tokens lasts
    ``duration_s(c) = base_s + per_concurrency_s·c``.

    Defaults, from tests/data/h100_llm_decode.csv (256 prompt + 128 new tokens per
    request) and shared/facts/h100.md: at concurrency 1, 0.88 J/token at 132 W is
    150 tokens/s, so 128 tokens last 0.85 s; at 256, the first batch's prefill burst at
    t = 108.0 s is followed by the next one at 122.5 s, so a request lasts ≈ 14.5 s
    (256·128/14.5 ≈ 2260 tokens/s, the "about 15×" of concurrency 1). Through the two
    points: per_concurrency_s = (14.5 − 0.85)/255 ≈ 0.0535 s, base_s ≈ 0.8 s
    (≈ 4.2 s at 64, 7.6 s at 128).

    Attributes:
        base_s: Duration at vanishing concurrency.
        per_concurrency_s: Added duration per request in flight.
        tokens_per_request: New tokens a request decodes (the time per output token, TPOT,
            is the duration divided by this).
    """

    base_s: float = 0.8
    per_concurrency_s: float = 0.0535
    tokens_per_request: float = 128.0

    def tpot_s(self, concurrency: FloatArray | float) -> FloatArray:
        """Time per output token at a concurrency (vectorised)."""
        return self.duration_s(concurrency) / self.tokens_per_request

    def tokens_per_s(self, concurrency: FloatArray | float, tpot_slo_s: float | None = None) -> FloatArray:
        """Goodput of one GPU: tokens per second from requests that meet the TPOT SLO.

        At concurrency c every request in the batch decodes at ``tpot_s(c)``, so the GPU
        emits c / tpot_s(c) tokens per second; all of them miss the SLO when tpot_s(c) > SLO
        (DistServe's goodput, per-token latency).

        Args:
            concurrency: Requests in flight (vectorised).
            tpot_slo_s: The per-token latency SLO; None counts every token.

        Returns:
            Tokens per second.
        """
        c = np.maximum(np.asarray(concurrency, dtype=float), 0.0)
        tpot = self.tpot_s(c)
        out = c / tpot
        if tpot_slo_s is not None:
            out = np.where(tpot <= tpot_slo_s * (1.0 + 1e-9), out, 0.0)
        return np.asarray(out)

    def max_concurrency_for_slo(self, tpot_slo_s: float | None) -> float:
        """Largest concurrency whose TPOT meets the SLO (inf without one; 0 if none does)."""
        if tpot_slo_s is None:
            return math.inf
        if self.per_concurrency_s <= 0:
            return math.inf if self.base_s <= tpot_slo_s * self.tokens_per_request else 0.0
        return max((tpot_slo_s * self.tokens_per_request - self.base_s) / self.per_concurrency_s, 0.0)

    def duration_s(self, concurrency: FloatArray | float) -> FloatArray:
        """Mean request duration at a concurrency (vectorised)."""
        c = np.maximum(np.asarray(concurrency, dtype=float), 0.0)
        return np.maximum(self.base_s + self.per_concurrency_s * c, 1e-3)

    def drained(self, concurrency: FloatArray | float, elapsed_s: FloatArray | float) -> FloatArray:
        """Requests still in flight ``elapsed_s`` after admissions stopped (first-order drain).

        The gate admits nothing while in flight ≥ cap and never kills a request, so after a
        cut the in-flight count decays as requests complete: dn/dt = −n/duration(n0) (the
        completion rate of uniformly aged requests; exact for exponential durations). The
        duration is taken at the starting concurrency, which drains no faster than the
        true, shortening one.

        Args:
            concurrency: In flight now.
            elapsed_s: Time since.

        Returns:
            In flight then (broadcast shape).
        """
        c = np.maximum(np.asarray(concurrency, dtype=float), 0.0)
        return np.asarray(c * np.exp(-np.asarray(elapsed_s, dtype=float) / self.duration_s(c)))


# Safe prior until a GPU's curve is identified: power climbs to the 700 W cap within a few
# requests (the matmul trace's behaviour), so unknown workloads are assumed hot.
CONSERVATIVE_CURVE = PowerCurve(idle_w=100.0, span_w=600.0, sat_concurrency=4.0)

# Candidate saturation scales; for each, P is linear in (idle, span) and is fitted by RLS.
SAT_GRID = np.geomspace(1.0, 512.0, 19)


class OnlinePowerModel:
    """Per-GPU online fit of :class:`PowerCurve` from (concurrency, power) observations.

    For each candidate ``sat_concurrency`` on a log grid, (idle_w, span_w) are fitted by
    recursive least squares with exponential forgetting; the candidate with the lowest
    forgetting-weighted a-priori error is used. Parameters are clipped to [0, power max].
    The curve used for decisions is conservative:

    * until ``min_samples`` observations, :data:`CONSERVATIVE_CURVE` (or the max of both);
    * beyond ``explore_factor`` × the largest concurrency seen recently (+ ``explore_step``)
      power is assumed to be the maximum, so caps explore geometrically as load fills them;
    * half a residual standard deviation is added (power is bursty: prefill peaks).

    Args:
        n_gpus: GPUs on the node.
        power_max_w: Largest power one GPU can draw.
        forgetting: RLS forgetting factor per observation.
        min_samples: Observations before the fit is trusted.
        explore_factor: Trusted extrapolation factor over the largest concurrency seen.
        explore_step: Trusted extrapolation step over the largest concurrency seen.
    """

    def __init__(
        self,
        n_gpus: int,
        power_max_w: float,
        *,
        forgetting: float = 0.995,
        min_samples: int = 10,
        explore_factor: float = 1.25,
        explore_step: float = 4.0,
    ) -> None:
        self.explore_factor = explore_factor
        self.explore_step = explore_step
        self.n_gpus = n_gpus
        self.power_max_w = power_max_w
        self.forgetting = forgetting
        self.min_samples = min_samples
        k = len(SAT_GRID)
        self._theta = np.zeros((n_gpus, k, 2))
        self._theta[:, :, 0] = CONSERVATIVE_CURVE.idle_w
        self._theta[:, :, 1] = CONSERVATIVE_CURVE.span_w
        self._cov = np.tile(np.diag([1e4, 1e5]), (n_gpus, k, 1, 1))
        self._err2 = np.full((n_gpus, k), 1e4)
        self._var_w2 = np.full(n_gpus, 400.0)
        self.samples = np.zeros(n_gpus)
        self.seen_max_concurrency = np.zeros(n_gpus)
        self._decision_curve: tuple[Any, ...] | None = None
        self._grid_w: FloatArray | None = None  # conservative power at c = 0..m, see _grid
        self._grid_hi = -1
        self._rows = np.arange(n_gpus)

    def update(self, concurrency: FloatArray, power_w: FloatArray, valid: NDArray[np.bool_]) -> None:
        """Add one observation per GPU (GPUs with ``valid`` False are skipped).

        Args:
            concurrency: Requests in flight per GPU.
            power_w: Measured power per GPU.
            valid: Which GPUs have a usable reading.
        """
        if not np.any(valid):
            return
        self._decision_curve = None
        self._grid_w = None
        lam = self.forgetting
        c = np.maximum(concurrency, 0.0)
        phi = np.stack(
            [np.ones((self.n_gpus, len(SAT_GRID))), 1.0 - np.exp(-c[:, None] / SAT_GRID[None, :])], axis=-1
        )
        err = power_w[:, None] - np.einsum("gkj,gkj->gk", phi, self._theta)
        p_phi = np.einsum("gkij,gkj->gki", self._cov, phi)
        denom = lam + np.einsum("gkj,gkj->gk", phi, p_phi)
        gain = p_phi / denom[..., None]
        v = valid[:, None]
        new_theta = np.clip(self._theta + gain * err[..., None], 0.0, self.power_max_w)
        new_cov = (self._cov - np.einsum("gki,gkj->gkij", gain, p_phi)) / lam
        self._theta = np.where(v[..., None], new_theta, self._theta)
        self._cov = np.where(v[..., None, None], new_cov, self._cov)
        self._err2 = np.where(v, lam * self._err2 + (1 - lam) * err**2, self._err2)
        best = np.argmin(self._err2, axis=1)
        best_err = err[np.arange(self.n_gpus), best]
        self._var_w2 = np.where(valid, 0.98 * self._var_w2 + 0.02 * best_err**2, self._var_w2)
        self.samples = self.samples + valid
        # Recently seen concurrency decays slowly so that a workload change re-explores.
        self.seen_max_concurrency = np.where(
            valid, np.maximum(c, self.seen_max_concurrency * 0.999), self.seen_max_concurrency
        )

    def curves(self) -> list[PowerCurve]:
        """The best fitted curve per GPU (not yet made conservative)."""
        best = np.argmin(self._err2, axis=1)
        out = []
        for g in range(self.n_gpus):
            idle, span = self._theta[g, best[g]]
            out.append(PowerCurve(float(idle), float(span), float(SAT_GRID[best[g]])))
        return out

    def confidence(self) -> FloatArray:
        """Per-GPU confidence in [0, 1]: sample count and explored concurrency range."""
        count = np.minimum(self.samples / (3.0 * self.min_samples), 1.0)
        return count

    def node_noise_w(self) -> float:
        """Standard deviation of the node's summed power around the fits (GPUs independent)."""
        return float(np.sqrt(np.sum(self._var_w2)))

    def conservative_power_w(self, concurrency: FloatArray) -> FloatArray:
        """Power used for decisions at candidate concurrencies.

        Args:
            concurrency: Shape (n_gpus,) or (n_gpus, ...) candidate concurrencies (or a shape
                that broadcasts against them, e.g. (1, m)).

        Returns:
            Conservative power, broadcast shape, in [idle, power max].
        """
        c = np.asarray(concurrency, dtype=float)
        top, span, neg_inv_sat, explored_to, all_trusted, trusted = self._curve(c.ndim)
        fit = top - span * np.exp(c * neg_inv_sat)
        # Beyond the explored range (with a geometric step) nothing is known: assume max power.
        fit = np.where(c <= explored_to, fit, self.power_max_w)
        if not all_trusted:
            fit = np.where(trusted, fit, np.maximum(fit, CONSERVATIVE_CURVE.power_w(c)))
        return np.minimum(np.maximum(fit, 0.0), self.power_max_w)

    def _curve(self, ndim: int) -> tuple[Any, ...]:
        """The decision curve's per-GPU terms shaped (n_gpus, 1, ...) for ``ndim`` dimensions.

        Cached until the next :meth:`update`.
        """
        if self._decision_curve is None:
            best = np.argmin(self._err2, axis=1)
            th = self._theta[self._rows, best]
            self._decision_curve = (
                (
                    th[:, 0] + th[:, 1] + 0.5 * np.sqrt(self._var_w2),
                    th[:, 1],
                    -1.0 / SAT_GRID[best],
                    self.seen_max_concurrency * self.explore_factor + self.explore_step,
                ),
                bool(np.all(self.samples >= self.min_samples)),
                self.samples >= self.min_samples,
                {},
            )
        terms, all_trusted, trusted, shaped = self._decision_curve
        out = shaped.get(ndim)
        if out is None:
            shape = (self.n_gpus,) + (1,) * (ndim - 1)
            top, span, neg_inv_sat, explored_to = (t.reshape(shape) for t in terms)
            out = shaped[ndim] = (top, span, neg_inv_sat, explored_to, all_trusted, trusted.reshape(shape))
        return out

    def _grid(self, hi: int) -> FloatArray:
        """Conservative power at every integer concurrency 0..m, (n_gpus, m + 1).

        m = min(hi, the largest explored range): beyond every GPU's explored range the
        conservative power is the maximum, so the grid stops there. Cached until the next
        :meth:`update` (the curve changes with every observation).
        """
        if self._grid_w is None or self._grid_hi != hi:
            explored_to = self._curve(1)[3]
            m = max(0, min(hi, math.floor(float(np.max(explored_to)))))
            self._grid_w = self.conservative_power_w(np.arange(m + 1, dtype=float)[None, :])
            self._grid_hi = hi
        return self._grid_w

    def power_at_caps_w(self, caps: IntArray, hi: int) -> FloatArray:
        """:meth:`conservative_power_w` at integer caps in [0, hi], from the cached grid.

        Args:
            caps: (n_gpus,) integer caps in [0, hi].
            hi: The largest cap (the grid's extent; use the same for every call).

        Returns:
            Conservative power per GPU.
        """
        grid = self._grid(hi)
        m = grid.shape[1] - 1
        p = grid[self._rows, np.minimum(caps, m)]
        return np.where(caps > m, self.power_max_w, p)

    def max_concurrency(self, power_allowed_w: FloatArray, lo: int, hi: int) -> IntArray:
        """Largest integer concurrency in [lo, hi] whose conservative power fits (else lo).

        The conservative power is non-decreasing in concurrency, so the caps that fit are a
        prefix of [lo, hi]: counting them on the cached grid is the answer.

        Args:
            power_allowed_w: Allowed power per GPU.
            lo: Smallest concurrency returned.
            hi: Largest concurrency returned.

        Returns:
            Integer caps per GPU.
        """
        grid = self._grid(hi)
        m = grid.shape[1] - 1
        p = np.asarray(power_allowed_w, dtype=float)
        n_fit = np.count_nonzero(grid[:, lo:] <= p[:, None], axis=1) if lo <= m else 0
        # Above the grid every cap costs the maximum power.
        n_fit = n_fit + (hi - max(m, lo - 1)) * (self.power_max_w <= p)
        return np.where(n_fit > 0, lo + n_fit - 1, lo).astype(np.int64)
