"""Host-side entropy controllers: ADAPO's adaptive clip range and REPO's adaptive zeta.

A controller holds one scalar it adjusts once per optimiser step from the measured mean token
entropy (one device->host read of a scalar per step, nothing else)::

    error = target_entropy - smoothed_entropy
    value = clip(value + rate * error, *bounds)

so the value rises while entropy is below target and falls while above.

Measurements and steps are separate, so that gradient accumulation works:

* ``observe(metrics)`` once per micro-batch (``metrics`` is a loss output's ``metrics`` dict, or
  pass ``entropy, n_tokens``) accumulates the token-weighted entropy sum without a host sync;
* ``update()`` once per optimiser step turns everything observed since the last step into one
  measurement, the token-weighted mean, and moves the value once.

``update(metrics)`` is ``observe(metrics)`` followed by ``update()``. A step with no valid
token (``n_tokens == 0``, e.g. an all-padding micro-batch) is not a measurement: it leaves the
controller exactly as it was.

State is a dict of plain numbers (``state_dict``; JSON and ``torch.save`` friendly).
``load_state_dict`` validates everything the constructor validates, plus the controller class
and the keys, before it assigns anything; ``Controller.from_state_dict(state)`` rebuilds a
controller without its constructor arguments.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from numbers import Real

import torch
from torch import Tensor

from . import comm
from .checks import real as _finite
from .config import LossConfig

_STATE_VERSION = 1


def _scalar(name: str, x) -> float | Tensor:
    """A measurement as given: a real number, or a one-element tensor (kept, not read)."""
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(x.shape)}")
        # fp64 sums, except where the device has no fp64 (MPS)
        return x.detach().reshape(()).to(torch.float32 if x.device.type == "mps" else torch.float64)
    if isinstance(x, bool) or not isinstance(x, Real):
        raise TypeError(f"{name} must be a real number or a one-element tensor, got {type(x).__name__}")
    return float(x)


class EntropyController:
    """Integral controller of one value toward a target entropy (see the module doc).

    Args:
        target_entropy: desired mean token entropy (nats), >= 0.
        value:   initial value of the controlled quantity.
        bounds:  (low, high) the value never leaves.
        rate:    step size per unit of entropy error (nats), > 0.
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
        self._reset_observations()

    @staticmethod
    def _check_bounds(name: str, bounds) -> tuple[float, float]:
        if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
            raise ValueError(f"{name} must be a (low, high) pair, got {bounds!r}")
        lo, hi = (_finite(name, b) for b in bounds)
        if lo > hi:
            raise ValueError(f"{name} must satisfy low <= high, got {bounds!r}")
        return lo, hi

    # -- measurements ----------------------------------------------------------------------------

    def _reset_observations(self) -> None:
        self._entropy_sum: float | Tensor = 0.0  # sum over observations of entropy_mean * n_tokens
        self._tokens: float | Tensor = 0.0

    def observe(self, entropy, n_tokens=None) -> None:
        """Record one micro-batch's mean entropy, weighted by its number of valid tokens.

        Args:
            entropy: a loss output's ``metrics`` dict (its ``entropy_mean`` and ``n_tokens`` are
                     used), or the mean token entropy as a float or one-element tensor.
            n_tokens: the number of valid tokens behind ``entropy`` (with a float/tensor
                     ``entropy``; default 1, i.e. every call weighs the same). 0 (an all-masked
                     micro-batch) records nothing.

        Tensors are accumulated as tensors, so no host sync happens here; they are read (and
        checked for NaN/Inf) at the next :meth:`update`.
        """
        if isinstance(entropy, Mapping):
            if n_tokens is not None:
                raise TypeError("n_tokens is taken from the metrics dict; do not pass n_tokens as well")
            if "entropy_mean" not in entropy:
                raise ValueError("the metrics dict has no 'entropy_mean' (pass a loss output's metrics)")
            n_tokens = entropy.get("n_tokens", 1.0)
            entropy = entropy["entropy_mean"]
        h = _scalar("entropy", entropy)
        n = 1.0 if n_tokens is None else _scalar("n_tokens", n_tokens)
        if isinstance(h, float) and not math.isfinite(h):
            raise ValueError(f"entropy must be finite, got {h}")
        if isinstance(n, float):
            if not math.isfinite(n) or n < 0:
                raise ValueError(f"n_tokens must be a finite number >= 0, got {n}")
            if n == 0:
                return  # an empty micro-batch is no measurement
            contribution = h * n
        else:  # 0 tokens contribute nothing even if their entropy_mean were not finite
            contribution = torch.where(n > 0, torch.as_tensor(h, dtype=n.dtype, device=n.device) * n,
                                       torch.zeros((), dtype=n.dtype, device=n.device))
        self._entropy_sum = self._entropy_sum + contribution
        self._tokens = self._tokens + n

    def _take_observations(self, process_group=None) -> tuple[float, float]:
        """Read (entropy_sum, tokens) -- the one host sync per step -- and clear them; with a
        ``process_group``, summed over its ranks first (one all-reduce)."""
        total, tokens = self._entropy_sum, self._tokens
        self._reset_observations()
        if process_group is not None:
            device = next((t.device for t in (total, tokens) if isinstance(t, Tensor)), torch.device("cpu"))
            pending = torch.stack([torch.as_tensor(x, dtype=torch.float64, device=device) for x in (total, tokens)])
            comm.all_reduce_sum(pending, process_group)
            total, tokens = pending.tolist()
        total, tokens = float(total), float(tokens)
        if not math.isfinite(tokens) or tokens < 0:
            raise ValueError(f"n_tokens must be finite and >= 0, got a total of {tokens}; the "
                             "observations of this step were discarded")
        if not math.isfinite(total):
            raise ValueError(f"entropy must be finite, got a token-weighted sum of {total}; the "
                             "observations of this step were discarded")
        return total, tokens

    def update(self, entropy=None, n_tokens=None, *, process_group=None) -> float:
        """Close the optimiser step: one controller step from everything observed since the last.

        ``update(x, n_tokens)`` is ``observe(x, n_tokens)`` then ``update()``. With no valid
        token observed (``n_tokens == 0`` everywhere, or nothing observed) nothing changes and
        0.0 is returned. Returns the signed change applied to the value.

        ``process_group`` (a ``torch.distributed`` group): the observations of all its ranks
        make the step, so every rank's controller takes the same one. Every rank of the group
        must call ``update`` at the same step (observed tensors should live on the group's
        device, e.g. CUDA for NCCL).
        """
        if entropy is not None:
            self.observe(entropy, n_tokens)
        elif n_tokens is not None:
            raise TypeError("n_tokens given without entropy")
        total, tokens = self._take_observations(process_group)
        if tokens == 0:
            return 0.0
        return self._step(total / tokens)

    def controlled(self) -> dict[str, float]:
        """The loss options this controller sets: ``{field of LossConfig: value}``."""
        return {self._value_name: self.value}

    def apply(self, config: LossConfig) -> LossConfig:
        """``config`` with the controlled options set to their current values."""
        return replace(config, **self.controlled())

    @property
    def saturated(self) -> bool:
        """True when the value sits at the bound the entropy error pushes it toward.

        The controller then has no range left to move the entropy toward the target. If it
        stays saturated for many steps, its actuator has no authority over the entropy in this
        training setup (see ``AdaptiveClip``'s measured limits); log it with the entropy.
        """
        if self.entropy_ema is None:
            return False
        error = self.target_entropy - self.entropy_ema
        lo, hi = self.bounds
        return (error > 0 and self.value >= hi) or (error < 0 and self.value <= lo)

    def _step(self, h: float) -> float:
        a = self.smoothing
        self.entropy_ema = h if self.entropy_ema is None else a * self.entropy_ema + (1 - a) * h
        lo, hi = self.bounds
        new = min(max(self.value + self.rate * (self.target_entropy - self.entropy_ema), lo), hi)
        change, self.value = new - self.value, new
        self.steps += 1
        return change

    # -- state -----------------------------------------------------------------------------------

    def _constructor_args(self) -> dict:
        """The constructor's arguments that rebuild this controller's configuration and value."""
        return {"target_entropy": self.target_entropy, self._value_name: self.value,
                "bounds": list(self.bounds), "rate": self.rate, "smoothing": self.smoothing}

    @classmethod
    def _from_constructor_args(cls, args: dict) -> "EntropyController":
        return cls(**args)

    def state_dict(self) -> dict:
        """Plain numbers: the configuration, the value, the history and pending observations."""
        args = self._constructor_args()
        value = args.pop(self._value_name)
        total, tokens = float(self._entropy_sum), float(self._tokens)
        return {"controller": type(self).__name__, "version": _STATE_VERSION, **args, "value": value,
                "steps": self.steps, "entropy_ema": self.entropy_ema,
                "pending_entropy_sum": total, "pending_tokens": tokens}

    @classmethod
    def from_state_dict(cls, state: Mapping) -> "EntropyController":
        """A controller rebuilt from :meth:`state_dict` alone (no constructor arguments needed).

        Called on :class:`EntropyController` itself, the class is taken from the state.
        Raises ``ValueError``/``TypeError`` naming the key for anything the constructor would
        refuse, for unknown or missing keys, and for another controller class's state.
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping (a state_dict()), got {type(state).__name__}")
        name = state.get("controller")
        if name is None:
            raise ValueError("state has no 'controller' key: it is not a state_dict() of a controller")
        if cls is EntropyController:
            classes = {c.__name__: c for c in _all_subclasses(EntropyController)}
            if name not in classes:
                raise ValueError(f"state is from an unknown controller {name!r}")
            cls = classes[name]
        elif name != cls.__name__:
            raise ValueError(f"state is from a {name}, not a {cls.__name__}: cannot load it")
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"state version {state.get('version')!r} is not supported "
                             f"(expected {_STATE_VERSION})")
        expected = set(cls._state_keys())
        missing, unknown = expected - set(state), set(state) - expected
        if missing or unknown:
            raise ValueError(f"{cls.__name__} state: missing keys {sorted(missing)}, "
                             f"unknown keys {sorted(unknown)}")
        args = {k: state[k] for k in cls._constructor_keys()}
        args[cls._value_name] = state["value"]
        for k, v in args.items():  # JSON turns tuples into lists; the constructor wants pairs
            if isinstance(v, list):
                args[k] = tuple(v)
        new = cls._from_constructor_args(args)  # every check the constructor makes
        steps = state["steps"]
        if isinstance(steps, bool) or not isinstance(steps, Real) or steps != int(steps) or steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
        ema = state["entropy_ema"]
        if ema is not None:
            ema = _finite("entropy_ema", ema)
        total = _finite("pending_entropy_sum", state["pending_entropy_sum"])
        tokens = _finite("pending_tokens", state["pending_tokens"], lo=0.0)
        new._load_extra(state)
        new.steps, new.entropy_ema = int(steps), ema
        new._entropy_sum, new._tokens = total, tokens
        return new

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict`; validates all of it first, so a failed load changes nothing."""
        new = type(self).from_state_dict(state)
        self.__dict__.update(new.__dict__)

    @classmethod
    def _constructor_keys(cls) -> tuple[str, ...]:
        return ("target_entropy", "bounds", "rate", "smoothing")

    @classmethod
    def _state_keys(cls) -> tuple[str, ...]:
        return ("controller", "version", *cls._constructor_keys(), "value", "steps", "entropy_ema",
                "pending_entropy_sum", "pending_tokens")

    def _load_extra(self, state: Mapping) -> None:
        """Subclasses: validate and set dynamic state beyond the constructor's (none here)."""

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(target_entropy={self.target_entropy}, "
                f"{self._value_name}={self.value:.4g}, bounds={self.bounds}, rate={self.rate})")


def _all_subclasses(cls) -> list[type]:
    out = [cls]
    for sub in cls.__subclasses__():
        out += _all_subclasses(sub)
    return out


class AdaptiveClip(EntropyController):
    """ADAPO: adapts the PPO clip range ``[1 - eps_low, 1 + eps_high]`` to an entropy target.

    ``eps_high`` is the controlled value: raised while entropy is below ``target_entropy``
    (less "clip-high", which lets low-probability tokens grow) and lowered while above.
    With ``adapt_low=True`` ``eps_low`` moves the opposite way by ``low_ratio`` times the
    same step, within ``low_bounds`` (tighter "clip-low" raises entropy), so the range
    shifts as a whole.

    What it can and cannot do (measured with ``examples/entropy_dynamics.py --clip-map``: a tiny
    LM on a synthetic GRPO task, mu = 4 mini-batch updates per rollout, 400 optimizer steps,
    seeds 0-4, 2-core CPU; entropy change of the rollout policy, mean +- std over seeds):

    * A clip acts only on tokens whose ratio has left ``[1 - eps_low, 1 + eps_high]``. On-policy
      (one update per rollout) every ratio is 1 and the controller has no effect at all: ADAPO
      alone reproduced plain PG bit for bit. With one pass of 4 mini-batches per rollout the
      clip touched 0.1-1.4% of the tokens, with 4 passes (epochs) 1-8%.
    * The clip range has little authority over the entropy, and not the sign this law assumes.
      Fixed ranges from eps 0.2/0.05 to 0.2/2.0 and 0.0-0.9 on the low side all lost 65-76% of
      the entropy in one pass (plain PG: -72% +- 4) and 52-61% in 4 passes; *widening*
      eps_high lowered the entropy (0.2/0.28: -73%, 0.2/2.0: -76%; 4 passes: -52% vs -61%):
      a wider range mostly lets the bulk of the update (which sharpens) go further. Tightening
      eps_low is the one lever with the expected sign (eps_low 0: -65% vs -73%).
    * So on its own (``repo="none"``) this controller drives eps_high to its upper bound within
      ~50 steps and the entropy follows plain PG: -72% to -75% for rates 0.05-1.0 (eps_high
      only), -66% with ``adapt_low=True`` (eps_low -> 0), against a target of 0%. No setting
      of the clip range came within 30% of the target in this task. :attr:`saturated` reports
      the pinned state; when it persists, the clip cannot reach the target in that setup.
    * What holds the entropy is the advantage correction: pair the controller with REPO
      (``adapo_loss`` defaults to ``repo="decorrelate"``; there ADAPO + REPO kept -16% at mu = 4,
      reward 0.02 below PG's) or steer REPO itself with :class:`AdaptiveRepoCoef`.

    Example::

        ctrl = AdaptiveClip(target_entropy=0.6, eps_low=0.2, eps_high=0.28)
        out = adapo_loss(h, W, y, adv, old_logp, mask, controller=ctrl)
        out.loss.backward(); opt.step()
        ctrl.update(out.metrics)
    """

    _value_name = "eps_high"

    def __init__(self, target_entropy: float, eps_low: float = 0.2, eps_high: float = 0.28, *,
                 bounds: tuple[float, float] = (0.1, 0.5), rate: float = 0.05,
                 smoothing: float = 0.0, adapt_low: bool = False, low_ratio: float = 1.0,
                 low_bounds: tuple[float, float] = (0.05, 0.3)):
        super().__init__(target_entropy, eps_high, bounds, rate, smoothing)
        if self.bounds[0] < 0:
            raise ValueError(f"bounds must be >= 0 for eps_high, got {bounds!r}")
        self.eps_low = _finite("eps_low", eps_low, lo=0.0, hi=1.0, hi_open=True)
        if not isinstance(adapt_low, bool):
            raise TypeError(f"adapt_low must be a bool, got {type(adapt_low).__name__}")
        self.adapt_low = adapt_low
        self.low_ratio = _finite("low_ratio", low_ratio, lo=0.0)
        self.low_bounds = self._check_bounds("low_bounds", low_bounds)
        if self.low_bounds[0] < 0 or self.low_bounds[1] >= 1:
            raise ValueError(f"low_bounds must lie in [0, 1), got {low_bounds!r}")
        if self.adapt_low and not self.low_bounds[0] <= self.eps_low <= self.low_bounds[1]:
            raise ValueError(f"eps_low={self.eps_low} must lie within low_bounds {self.low_bounds}")

    @property
    def eps_high(self) -> float:
        return self.value

    def controlled(self) -> dict[str, float]:
        return {"eps_low": self.eps_low, "eps_high": self.value}

    def _step(self, h: float) -> float:
        change = super()._step(h)
        if self.adapt_low:
            lo, hi = self.low_bounds
            self.eps_low = min(max(self.eps_low - self.low_ratio * change, lo), hi)
        return change

    def _constructor_args(self) -> dict:
        return {**super()._constructor_args(), "eps_low": self.eps_low, "adapt_low": self.adapt_low,
                "low_ratio": self.low_ratio, "low_bounds": list(self.low_bounds)}

    @classmethod
    def _constructor_keys(cls) -> tuple[str, ...]:
        return (*super()._constructor_keys(), "eps_low", "adapt_low", "low_ratio", "low_bounds")


class AdaptiveRepoCoef(EntropyController):
    """Entropy-targeting REPO: drives ``repo_coef`` (zeta, or gamma for "decorrelate").

    The coefficient grows while entropy is below target (a stronger correction removes more
    of the advantage/log-prob covariance that collapses entropy) and shrinks while above.

    Example::

        ctrl = AdaptiveRepoCoef(target_entropy=0.6, repo_coef=0.5, bounds=(0.0, 1.0))
        out = repo_loss(..., repo="decorrelate", repo_coef=ctrl.repo_coef)
        ctrl.update(out.metrics)
    """

    _value_name = "repo_coef"

    def __init__(self, target_entropy: float, repo_coef: float = 0.5, *,
                 bounds: tuple[float, float] = (0.0, 1.0), rate: float = 0.5,
                 smoothing: float = 0.0):
        super().__init__(target_entropy, repo_coef, bounds, rate, smoothing)
        if self.bounds[0] < 0:
            raise ValueError(f"bounds must be >= 0 for repo_coef, got {bounds!r}")

    @property
    def repo_coef(self) -> float:
        return self.value
