"""Online identification of the thermal gain and offset per GPU.

The nominal RC model (:mod:`rackguard.controllers.thermal`) is simulated from the measured power
and flow; its rise over supply ``r`` is the regressor. Per GPU the measured rise obeys::

    T_meas − T_supply = gain·r + offset + noise

``gain`` absorbs a plant hotter or cooler per watt than the model, ``offset`` absorbs
unseen disturbances (a wrong supply reading, heat from neighbours). Both are tracked by
recursive least squares with random-walk (Kalman) forgetting: unlike exponential
forgetting the covariance stays bounded without excitation, and the offset keeps
tracking, which makes the predictor offset-free (no drift). ``gain`` is clipped to
[gain_min, gain_max], and the offset moved so that the estimate at the current regressor
is kept (a projection; clipping the gain alone corrupts the estimate).
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np
from numpy.typing import NDArray

from rackguard.controllers.thermal import ThermalParams, discretize

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]


class GainOffsetTracker:
    """Vectorised 2-parameter (gain, offset) Kalman/RLS tracker, one per GPU.

    Args:
        n_gpus: Number of independent trackers.
        gain_std_prior: Prior standard deviation of the gain (1.0 = nominal model).
        offset_std_prior_k: Prior standard deviation of the offset.
        noise_std_k: Measurement noise (integer °C readings + power bursts).
        gain_drift_per_s: Random-walk variance rate of the gain.
        offset_drift_k2_per_s: Random-walk variance rate of the offset.
        gain_min: Lower bound of the gain.
        gain_max: Upper bound of the gain.
    """

    def __init__(
        self,
        n_gpus: int,
        *,
        gain_std_prior: float = 0.3,
        offset_std_prior_k: float = 5.0,
        noise_std_k: float = 0.8,
        gain_drift_per_s: float = 2e-5,
        offset_drift_k2_per_s: float = 0.02,
        gain_min: float = 0.5,
        gain_max: float = 2.5,
    ) -> None:
        self.gain = np.ones(n_gpus)
        self.offset_k = np.zeros(n_gpus)
        self._cov = np.tile(np.diag([gain_std_prior**2, offset_std_prior_k**2]), (n_gpus, 1, 1))
        self._prior_gain_var = gain_std_prior**2
        self._noise_var = noise_std_k**2
        self._q = np.array([gain_drift_per_s, offset_drift_k2_per_s])
        self.gain_min = gain_min
        self.gain_max = gain_max

    def update(
        self, rise_model_k: FloatArray, rise_meas_k: FloatArray, valid: BoolArray, dt_s: float
    ) -> None:
        """One Kalman update per GPU.

        Args:
            rise_model_k: Nominal model rise over supply (the regressor).
            rise_meas_k: Measured rise over supply.
            valid: Which GPUs have a usable measurement.
            dt_s: Time since the previous update (drives the random walk).
        """
        cov = self._cov.copy()
        cov[:, 0, 0] += self._q[0] * dt_s
        cov[:, 1, 1] += self._q[1] * dt_s
        phi = np.stack([rise_model_k, np.ones_like(rise_model_k)], axis=-1)
        pred = self.gain * rise_model_k + self.offset_k
        err = np.where(valid, rise_meas_k - pred, 0.0)
        p_phi = np.einsum("gij,gj->gi", cov, phi)
        s = np.einsum("gi,gi->g", phi, p_phi) + self._noise_var
        k = p_phi / s[:, None]
        v = valid[:, None]
        gain = self.gain + np.where(valid, k[:, 0] * err, 0.0)
        offset = self.offset_k + np.where(valid, k[:, 1] * err, 0.0)
        # Clipping the gain alone would leave the offset fitted to the unclipped gain: with
        # a model much faster than the plant (HBM τ 1 s vs 20 s) the unclipped gain runs
        # negative, the offset climbs tens of K, and the clipped estimate predicted an HBM
        # far hotter than measured. Project instead: keep the estimate at this regressor.
        clipped = np.clip(gain, self.gain_min, self.gain_max)
        self.offset_k = offset + (gain - clipped) * rise_model_k
        self.gain = clipped
        upd = cov - np.einsum("gi,gj->gij", k, p_phi)
        self._cov = np.where(v[..., None], upd, cov)

    @property
    def gain_std(self) -> FloatArray:
        """Posterior standard deviation of the gain."""
        return np.sqrt(np.maximum(self._cov[:, 0, 0], 0.0))

    def confidence(self) -> FloatArray:
        """Per-GPU confidence in [0, 1]: 1 − posterior/prior gain standard deviation."""
        return np.clip(1.0 - self.gain_std / np.sqrt(self._prior_gain_var), 0.0, 1.0)

    def estimate_k(self, rise_model_k: FloatArray) -> FloatArray:
        """Estimated rise over supply for a model rise."""
        return self.gain * rise_model_k + self.offset_k


class AheadError:
    """Rolling error of the model's h-ahead die predictions, per GPU (how well it predicts now).

    The model is simulated from the measured power and flow; the prediction of T(t+h)
    made at t is ``T_meas(t) + x(t+h) − x(t)`` (the model's response anchored on the
    measurement: the same figure as ``rmse_10s_c`` of ``rackguard model fit``).

    Args:
        params: The model in force.
        n_gpus: GPUs on the node.
        horizon_s: Prediction horizon.
        window: Errors kept per GPU for the rolling RMSE.
    """

    def __init__(
        self, params: ThermalParams, n_gpus: int, *, horizon_s: float = 10.0, window: int = 60
    ) -> None:
        self.params = params
        self.horizon_s = horizon_s
        self._x: FloatArray | None = None
        self._t_s: float | None = None
        self._hist: deque[tuple[float, FloatArray, FloatArray]] = deque()
        self._errors = [deque[float](maxlen=window) for _ in range(n_gpus)]

    def update(self, t_s: float, power_w: FloatArray, temp_c: FloatArray, flow_lpm: float | None) -> None:
        """Add one sample (NaN power or temperature: that GPU is skipped this time).

        Args:
            t_s: Sample time (monotonic within the run).
            power_w: Measured power per GPU.
            temp_c: Measured die temperature per GPU.
            flow_lpm: Node flow, or None (reference flow).
        """
        power = np.nan_to_num(np.asarray(power_w, dtype=float), nan=0.0)
        if self._x is None or self._t_s is None or t_s <= self._t_s:
            self._x = np.array([self.params.steady_rise_k(float(p), flow_lpm) for p in power])
            self._hist.clear()
        else:
            ad, bd = discretize(self.params, min(t_s - self._t_s, 60.0), flow_lpm)
            self._x = self._x @ ad.T + power[:, None] * bd[None, :]
        self._t_s = t_s
        x_die = self._x[:, 0].copy()
        temp = np.asarray(temp_c, dtype=float).copy()
        temp[~np.isfinite(np.asarray(power_w, dtype=float))] = np.nan
        self._hist.append((t_s, temp, x_die))
        # The newest sample at least horizon_s old is the prediction's start.
        start = None
        while self._hist and t_s - self._hist[0][0] >= self.horizon_s:
            start = self._hist.popleft()
        if start is None:
            return
        self._hist.appendleft(start)
        if t_s - start[0] > 1.5 * self.horizon_s:  # a stall: no prediction of that age
            return
        err = start[1] + x_die - start[2] - temp
        for g, e in enumerate(err):
            if math.isfinite(e):
                self._errors[g].append(float(e))

    def rmse_c(self) -> list[float | None]:
        """Per GPU: RMSE of the errors in the window (None before the first)."""
        return [math.sqrt(sum(e * e for e in d) / len(d)) if d else None for d in self._errors]

    def samples(self) -> list[int]:
        """Per GPU: errors in the window."""
        return [len(d) for d in self._errors]
