"""Host-side entropy controllers: ADAPO's adaptive clip range and REPO's adaptive zeta.

A controller holds one scalar it adjusts once per optimiser step from the measured mean token
entropy (one device->host read of a scalar per step, nothing else)::

    error = target_entropy - smoothed_entropy
    value = clip(value + rate * error, *bounds)

so the value rises while entropy is below target and falls while above. State is a dict of
plain numbers (``state_dict`` / ``load_state_dict``) so training can resume exactly.
"""

from __future__ import annotations

import math

from torch import Tensor

from .checks import real as _finite


class EntropyController:
    """Proportional controller of one value toward a target entropy (see module doc).

    Args:
        target_entropy: desired mean token entropy (nats), >= 0.
        value:   initial value of the controlled quantity.
        bounds:  (low, high) the value never leaves.
        rate:    step size per unit of entropy error, > 0.
        smoothing: exponential moving average of the measured entropy, in [0, 1)
                   (0: use the latest measurement as is).
    """

    _value_name = "value"

    def __init__(self, target_entropy: float, value: float, bounds: tuple[float, float],
                 rate: float, smoothing: float = 0.0):
        self.target_entropy = _finite("target_entropy", target_entropy, lo=0.0)
        lo, hi = self._check_bounds("bounds", bounds)
        self.bounds = (lo, hi)
        self.rate = _finite("rate", rate, lo=0.0, lo_open=True)
        self.smoothing = _finite("smoothing", smoothing, lo=0.0, hi=1.0, hi_open=True)
        v = _finite(self._value_name, value)
        if not lo <= v <= hi:
            raise ValueError(f"{self._value_name}={v} must lie within bounds {self.bounds}")
        self.value = v
        self.steps = 0
        self.entropy_ema: float | None = None

    @staticmethod
    def _check_bounds(name: str, bounds) -> tuple[float, float]:
        if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
            raise ValueError(f"{name} must be a (low, high) pair, got {bounds!r}")
        lo, hi = (_finite(name, b) for b in bounds)
        if lo > hi:
            raise ValueError(f"{name} must satisfy low <= high, got {bounds!r}")
        return lo, hi

    def update(self, entropy: float | Tensor) -> float:
        """Feed the step's measured mean entropy; returns the signed change applied."""
        h = float(entropy)  # one scalar device->host copy
        if not math.isfinite(h):
            raise ValueError(f"entropy must be finite, got {h}")
        a = self.smoothing
        self.entropy_ema = h if self.entropy_ema is None else a * self.entropy_ema + (1 - a) * h
        lo, hi = self.bounds
        new = min(max(self.value + self.rate * (self.target_entropy - self.entropy_ema), lo), hi)
        change, self.value = new - self.value, new
        self.steps += 1
        return change

    def state_dict(self) -> dict:
        return {
            "target_entropy": self.target_entropy, "value": self.value, "bounds": list(self.bounds),
            "rate": self.rate, "smoothing": self.smoothing, "steps": self.steps,
            "entropy_ema": self.entropy_ema,
        }

    def load_state_dict(self, state: dict) -> None:
        self.target_entropy = _finite("target_entropy", state["target_entropy"], lo=0.0)
        self.bounds = self._check_bounds("bounds", state["bounds"])
        self.rate = _finite("rate", state["rate"], lo=0.0, lo_open=True)
        self.smoothing = _finite("smoothing", state["smoothing"], lo=0.0, hi=1.0, hi_open=True)
        self.value = _finite(self._value_name, state["value"])
        self.steps = int(state["steps"])
        self.entropy_ema = None if state["entropy_ema"] is None else float(state["entropy_ema"])

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(target_entropy={self.target_entropy}, "
                f"{self._value_name}={self.value:.4g}, bounds={self.bounds}, rate={self.rate})")


class AdaptiveClip(EntropyController):
    """ADAPO: adapts the PPO clip range ``[1 - eps_low, 1 + eps_high]`` to an entropy target.

    ``eps_high`` is the controlled value: raised while entropy is below ``target_entropy``
    (less "clip-high", which lets low-probability tokens grow) and lowered while above.
    With ``adapt_low=True`` ``eps_low`` moves the opposite way by ``low_ratio`` times the
    same step, within ``low_bounds`` (tighter "clip-low" raises entropy), so the range
    shifts as a whole.

    Measured limitation (``examples/entropy_dynamics.py``): on its own (``repo="none"``) the
    controller pinned ``eps_high`` at its upper bound and entropy still collapsed like plain
    PG's; clipping only removes gradient terms. Pair it with a REPO advantage correction
    (``adapo_loss`` defaults to ``repo="decorrelate"``).

    Example::

        ctrl = AdaptiveClip(target_entropy=0.6, eps_low=0.2, eps_high=0.28)
        out = adapo_loss(h, W, y, adv, old_logp, mask, controller=ctrl)
        out.loss.backward(); opt.step()
        ctrl.update(out.metrics["entropy_mean"])
    """

    _value_name = "eps_high"

    def __init__(self, target_entropy: float, eps_low: float = 0.2, eps_high: float = 0.28, *,
                 bounds: tuple[float, float] = (0.1, 0.5), rate: float = 0.05,
                 smoothing: float = 0.0, adapt_low: bool = False, low_ratio: float = 1.0,
                 low_bounds: tuple[float, float] = (0.05, 0.3)):
        super().__init__(target_entropy, eps_high, bounds, rate, smoothing)
        if bounds[0] < 0:
            raise ValueError(f"bounds must be >= 0 for eps_high, got {bounds!r}")
        self.eps_low = _finite("eps_low", eps_low, lo=0.0, hi=1.0, hi_open=True)
        self.adapt_low = bool(adapt_low)
        self.low_ratio = _finite("low_ratio", low_ratio, lo=0.0)
        self.low_bounds = self._check_bounds("low_bounds", low_bounds)
        if self.low_bounds[0] < 0 or self.low_bounds[1] >= 1:
            raise ValueError(f"low_bounds must lie in [0, 1), got {low_bounds!r}")
        if self.adapt_low and not self.low_bounds[0] <= self.eps_low <= self.low_bounds[1]:
            raise ValueError(f"eps_low={self.eps_low} must lie within low_bounds {self.low_bounds}")

    @property
    def eps_high(self) -> float:
        return self.value

    def update(self, entropy: float | Tensor) -> float:
        change = super().update(entropy)
        if self.adapt_low:
            lo, hi = self.low_bounds
            self.eps_low = min(max(self.eps_low - self.low_ratio * change, lo), hi)
        return change

    def state_dict(self) -> dict:
        return {**super().state_dict(), "eps_low": self.eps_low, "adapt_low": self.adapt_low,
                "low_ratio": self.low_ratio, "low_bounds": list(self.low_bounds)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.eps_low = _finite("eps_low", state["eps_low"], lo=0.0, hi=1.0, hi_open=True)
        self.adapt_low = bool(state["adapt_low"])
        self.low_ratio = _finite("low_ratio", state["low_ratio"], lo=0.0)
        self.low_bounds = self._check_bounds("low_bounds", state["low_bounds"])


class AdaptiveRepoCoef(EntropyController):
    """Entropy-targeting REPO: drives ``repo_coef`` (zeta, or gamma for "decorrelate").

    The coefficient grows while entropy is below target (a stronger correction removes more
    of the advantage/log-prob covariance that collapses entropy) and shrinks while above.

    Example::

        ctrl = AdaptiveRepoCoef(target_entropy=0.6, repo_coef=0.5, bounds=(0.0, 1.0))
        out = repo_loss(..., repo="decorrelate", repo_coef=ctrl.repo_coef)
        ctrl.update(out.metrics["entropy_mean"])
    """

    _value_name = "repo_coef"

    def __init__(self, target_entropy: float, repo_coef: float = 0.5, *,
                 bounds: tuple[float, float] = (0.0, 1.0), rate: float = 0.5,
                 smoothing: float = 0.0):
        super().__init__(target_entropy, repo_coef, bounds, rate, smoothing)
        if bounds[0] < 0:
            raise ValueError(f"bounds must be >= 0 for repo_coef, got {bounds!r}")

    @property
    def repo_coef(self) -> float:
        return self.value
