"""Host-side entropy controllers: ADAPO's adaptive clip range and REPO's adaptive zeta.

A controller holds one scalar it adjusts once per optimiser step from the measured mean token
entropy (one device->host read of a scalar per step, nothing else)::

    error = target_entropy - smoothed_entropy
    value = clip(value + rate * error, *bounds)

so the value rises while entropy is below target and falls while above
(:class:`AdaptiveRepoCoef` also has a multiplicative law, REPO-R's).

Measurements and steps are separate, so that gradient accumulation works:

* ``observe(metrics)`` once per micro-batch (``metrics`` is a loss output's ``metrics`` dict, or
  pass ``entropy, n_tokens``) accumulates the token-weighted entropy sum without a host sync;
* ``update()`` once per optimiser step turns everything observed since the last step into one
  measurement, the token-weighted mean, and moves the value once.

``update(metrics)`` is ``observe(metrics)`` followed by ``update()``. A step with no valid
token (``n_tokens == 0``, e.g. an all-padding micro-batch) is not a measurement: it leaves the
controller exactly as it was.

What a controller refuses, so that it never steps on a number that is not a measurement:

* an entropy that was not measured: metrics with ``entropy_measured == 0`` (e.g.
  ``policy_loss_from_logprobs`` without ``entropy=``) raise ``ValueError`` in ``observe``;
* a non-finite entropy or a negative / non-finite token count: a float raises in ``observe``, a
  tensor (read only at the sync point) makes the next ``update`` raise; either way the step's
  observations are discarded and the value is unchanged;
* a step with nothing observed at all since the last one (over every rank of the
  ``process_group``) changes nothing and warns with :class:`NothingObservedWarning`: a
  controller that is never fed (``adapo_loss(..., controller=ctrl)`` does not observe for you)
  would otherwise stay where it started without a word. Turn it into an error with
  ``warnings.simplefilter("error", fused_pg.NothingObservedWarning)``.

Thread safety: ``observe``, ``update``, ``state_dict`` and ``load_state_dict`` hold the
controller's lock, so micro-batches may be observed from several threads (e.g. one per device)
without losing an observation; a step sees every observation that completed before it.

State is a dict of plain numbers (``state_dict``; JSON and ``torch.save`` friendly), pending
observations included, so a checkpoint taken mid-accumulation resumes exactly.
``load_state_dict`` validates everything the constructor validates, plus the controller class
and the keys, before it assigns anything; ``Controller.from_state_dict(state)`` rebuilds a
controller without its constructor arguments.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Mapping
from dataclasses import replace
from numbers import Real

import torch
from torch import Tensor

from . import comm
from .checks import real as _finite
from .config import LossConfig

_STATE_VERSION = 2  # 2: pending observation counts; AdaptiveRepoCoef's mode and factor


class NothingObservedWarning(RuntimeWarning):
    """A controller step with nothing observed since the last one: the value did not move."""


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


def _count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, Real) or value != int(value) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)


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
        self._lock = threading.RLock()
        self.target_entropy = _finite("target_entropy", target_entropy, lo=0.0)
        self.bounds = self._check_bounds("bounds", bounds)
        self.rate = _finite("rate", rate, lo=0.0, lo_open=True)
        self.smoothing = _finite("smoothing", smoothing, lo=0.0, hi=1.0, hi_open=True)
        self.value = self._check_value(_finite(self._value_name, value))
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

    def _check_value(self, v: float) -> float:
        lo, hi = self.bounds
        if not lo <= v <= hi:
            raise ValueError(f"{self._value_name}={v} must lie within bounds {self.bounds}")
        return v

    # the lock is no part of the state: copies and pickles get their own
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    # -- measurements ----------------------------------------------------------------------------

    def _reset_observations(self) -> None:
        self._entropy_sum: float | Tensor = 0.0  # sum over observations of entropy_mean * n_tokens
        self._tokens: float | Tensor = 0.0
        self._observations = 0                   # observe() calls since the last step
        self._bad_entropy: float | Tensor = 0.0  # of them with a non-finite entropy (tensors: read at update)
        self._bad_tokens: float | Tensor = 0.0   # ... with a negative or non-finite n_tokens

    def observe(self, entropy, n_tokens=None) -> None:
        """Record one micro-batch's mean entropy, weighted by its number of valid tokens.

        Args:
            entropy: a loss output's ``metrics`` dict (its ``entropy_mean`` and ``n_tokens`` are
                     used), or the mean token entropy as a float or one-element tensor.
            n_tokens: the number of valid tokens behind ``entropy`` (with a float/tensor
                     ``entropy``; default 1, i.e. every call weighs the same). 0 (an all-masked
                     micro-batch) is an observation that moves nothing.

        Raises ``ValueError`` for metrics whose entropy was not measured (``entropy_measured ==
        0``), and for a non-finite float entropy or a negative / non-finite float count.
        Tensors are accumulated as tensors, so no host sync happens here; they are read (and
        checked the same way) at the next :meth:`update`. Thread-safe.
        """
        if isinstance(entropy, Mapping):
            if n_tokens is not None:
                raise TypeError("n_tokens is taken from the metrics dict; do not pass n_tokens as well")
            if "entropy_mean" not in entropy:
                raise ValueError("the metrics dict has no 'entropy_mean' (pass a loss output's metrics)")
            measured = entropy.get("entropy_measured", 1.0)
            if isinstance(measured, Real) and not isinstance(measured, bool) and measured == 0:
                raise ValueError(
                    "these metrics carry no entropy measurement (entropy_measured == 0: the loss got no "
                    "per-token entropies, e.g. policy_loss_from_logprobs without entropy=), so a controller "
                    "cannot step on them: pass entropy= to the loss, or observe an entropy you measured")
            n_tokens = entropy.get("n_tokens", 1.0)
            entropy = entropy["entropy_mean"]
        h = _scalar("entropy", entropy)
        n = 1.0 if n_tokens is None else _scalar("n_tokens", n_tokens)
        if isinstance(h, float) and not math.isfinite(h):
            raise ValueError(f"entropy must be finite, got {h} (NaN means it was not measured)")
        if isinstance(n, float) and (not math.isfinite(n) or n < 0):
            raise ValueError(f"n_tokens must be a finite number >= 0, got {n}")
        if isinstance(h, float) and isinstance(n, float):
            contribution, bad_h, bad_n = h * n, 0.0, 0.0
        else:  # checked at the sync point; nothing invalid enters the sums
            ref = h if isinstance(h, Tensor) else n
            h_t = torch.as_tensor(h, dtype=ref.dtype, device=ref.device)
            n_t = torch.as_tensor(n, dtype=ref.dtype, device=ref.device)
            ok_h, ok_n = torch.isfinite(h_t), torch.isfinite(n_t) & (n_t >= 0)
            n = torch.where(ok_n, n_t, 0.0)
            contribution = torch.where(ok_h & (n > 0), h_t * n, 0.0)
            bad_h, bad_n = (~ok_h).to(ref.dtype), (~ok_n).to(ref.dtype)
        with self._lock:
            self._entropy_sum = self._entropy_sum + contribution
            self._tokens = self._tokens + n
            self._observations += 1
            self._bad_entropy = self._bad_entropy + bad_h
            self._bad_tokens = self._bad_tokens + bad_n

    def _take_observations(self, process_group=None) -> tuple[float, float, int]:
        """Read (entropy_sum, tokens, observations) -- the one host sync per step -- and clear them;
        with a ``process_group``, summed over its ranks first (one all-reduce). Raises for an
        invalid observation (the step's observations are then discarded)."""
        values = (self._entropy_sum, self._tokens, float(self._observations), self._bad_entropy, self._bad_tokens)
        self._reset_observations()
        device = next((t.device for t in values if isinstance(t, Tensor)), None)
        if process_group is not None or device is not None:
            pending = torch.stack([torch.as_tensor(x, dtype=torch.float64, device=device) for x in values])
            if process_group is not None:
                comm.all_reduce_sum(pending, process_group)
            values = pending.tolist()
        total, tokens, observations, bad_h, bad_n = (float(x) for x in values)
        if bad_h:
            raise ValueError(f"entropy must be finite, but {int(bad_h)} observation(s) of this step were NaN or "
                             "Inf (NaN means not measured); the observations of this step were discarded")
        if bad_n:
            raise ValueError(f"n_tokens must be finite and >= 0, but {int(bad_n)} observation(s) of this step "
                             "were not; the observations of this step were discarded")
        return total, tokens, int(observations)

    def update(self, entropy=None, n_tokens=None, *, process_group=None) -> float:
        """Close the optimiser step: one controller step from everything observed since the last.

        ``update(x, n_tokens)`` is ``observe(x, n_tokens)`` then ``update()``. With no valid
        token observed (``n_tokens == 0`` everywhere) nothing changes and 0.0 is returned; with
        nothing observed at all it also warns (:class:`NothingObservedWarning`). Returns the
        signed change applied to the value.

        ``process_group`` (a ``torch.distributed`` group): the observations of all its ranks
        make the step, so every rank's controller takes the same one (a rank that observed
        nothing steps with the others, without a warning). Every rank of the group must call
        ``update`` at the same step (observed tensors should live on the group's device, e.g.
        CUDA for NCCL).
        """
        if entropy is not None:
            self.observe(entropy, n_tokens)
        elif n_tokens is not None:
            raise TypeError("n_tokens given without entropy")
        with self._lock:
            total, tokens, observations = self._take_observations(process_group)
            if observations == 0:
                warnings.warn(
                    f"{type(self).__name__}.update(): nothing was observed since the last step, so "
                    f"{self._value_name} stays {self.value:.6g}; feed the controller with observe(out.metrics) "
                    "per micro-batch (adapo_loss(..., controller=) does not observe unless update_controller=True)",
                    NothingObservedWarning, stacklevel=2)
                return 0.0
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
        new = self._next_value(self.target_entropy - self.entropy_ema)
        change, self.value = new - self.value, new
        self.steps += 1
        return change

    def _next_value(self, error: float) -> float:
        """The value after one step at this (smoothed) entropy error: the additive law."""
        lo, hi = self.bounds
        return min(max(self.value + self.rate * error, lo), hi)

    # -- state -----------------------------------------------------------------------------------

    def _constructor_args(self) -> dict:
        """The constructor's arguments that rebuild this controller's configuration and value."""
        return {"target_entropy": self.target_entropy, self._value_name: self.value,
                "bounds": list(self.bounds), "rate": self.rate, "smoothing": self.smoothing}

    @classmethod
    def _from_constructor_args(cls, args: dict) -> "EntropyController":
        return cls(**args)

    def state_dict(self) -> dict:
        """Plain numbers: the configuration, the value, the history and pending observations
        (including how many of them were invalid, so a resumed controller raises at the same
        step the original would). Thread-safe."""
        with self._lock:
            args = self._constructor_args()
            value = args.pop(self._value_name)
            pending = {"pending_entropy_sum": float(self._entropy_sum), "pending_tokens": float(self._tokens),
                       "pending_observations": self._observations,
                       "pending_bad_entropy": int(self._bad_entropy), "pending_bad_tokens": int(self._bad_tokens)}
            return {"controller": type(self).__name__, "version": _STATE_VERSION, **args, "value": value,
                    "steps": self.steps, "entropy_ema": self.entropy_ema, **pending}

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
        if state.get("version") == 1:
            state = cls._upgrade_v1(dict(state))
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"state version {state.get('version')!r} is not supported "
                             f"(expected {_STATE_VERSION} or 1)")
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
        observations = _count("pending_observations", state["pending_observations"])
        bad_h = _count("pending_bad_entropy", state["pending_bad_entropy"])
        bad_n = _count("pending_bad_tokens", state["pending_bad_tokens"])
        if max(bad_h, bad_n) > observations:
            raise ValueError(f"pending_bad_entropy / pending_bad_tokens ({bad_h}, {bad_n}) cannot exceed "
                             f"pending_observations ({observations})")
        new._load_extra(state)
        new.steps, new.entropy_ema = int(steps), ema
        new._entropy_sum, new._tokens, new._observations = total, tokens, observations
        new._bad_entropy, new._bad_tokens = float(bad_h), float(bad_n)
        return new

    @classmethod
    def _upgrade_v1(cls, state: dict) -> dict:
        """A version-1 state (no pending counts) as version 2: its pending tokens were observed."""
        tokens = state.get("pending_tokens")
        observed = isinstance(tokens, Real) and not isinstance(tokens, bool) and tokens > 0
        state.update(version=2, pending_observations=int(observed), pending_bad_entropy=0, pending_bad_tokens=0)
        return state

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict`; validates all of it first, so a failed load changes nothing.
        Thread-safe."""
        new = type(self).from_state_dict(state)
        fresh = dict(new.__dict__)
        fresh.pop("_lock")
        with self._lock:
            self.__dict__.update(fresh)

    @classmethod
    def _constructor_keys(cls) -> tuple[str, ...]:
        return ("target_entropy", "bounds", "rate", "smoothing")

    @classmethod
    def _state_keys(cls) -> tuple[str, ...]:
        return ("controller", "version", *cls._constructor_keys(), "value", "steps", "entropy_ema",
                "pending_entropy_sum", "pending_tokens", "pending_observations", "pending_bad_entropy",
                "pending_bad_tokens")

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

    What it did in ``examples/entropy_dynamics.py --clip-map`` (a tiny MLP LM on a synthetic GRPO
    task, mu = 4 mini-batch updates per rollout, 400 optimizer steps, seeds 0-4, 2-core CPU;
    entropy change of the rollout policy, mean +- std over seeds). These are properties of that
    toy, not of the method: there 90-93% of the tokens have A = 0, 99% of the first-order
    entropy drive comes from negative-advantage tokens, and every answer position is a fork of
    24 rewarded tokens, so the few up-clipped tokens are mostly *above* the state's average
    probability (57-80% of them), the opposite of what clip-higher relies on:

    * A clip acts only on tokens whose ratio has left ``[1 - eps_low, 1 + eps_high]``. On-policy
      (one update per rollout) every ratio is 1 and the controller has no effect at all: ADAPO
      alone reproduced plain PG bit for bit. With one pass of 4 mini-batches per rollout the
      clip touched 0.1-1.4% of the tokens, with 4 passes (epochs) 1-8%.
    * In that toy the clip range had little authority over the entropy, and not the sign this
      law assumes. Fixed ranges from eps 0.2/0.05 to 0.2/2.0 and 0.0-0.9 on the low side all
      lost 65-76% of the entropy in one pass (plain PG: -72% +- 4) and 52-61% in 4 passes;
      *widening* eps_high lowered the entropy (0.2/0.28: -73%, 0.2/2.0: -76%; 4 passes: -52%
      vs -61%). Tightening eps_low was the one lever with the expected sign (eps_low 0: -65%).
    * So there, on its own (``repo="none"``), this controller drove eps_high to its upper bound
      within ~50 steps and the entropy followed plain PG: -72% to -75% for rates 0.05-1.0
      (eps_high only), -66% with ``adapt_low=True``, against a target of 0%.
      :attr:`saturated` reports the pinned state; when it persists, the clip cannot reach the
      target in that setup.
    * ``examples/entropy_transformer.py`` (a 2-layer transformer whose answers are 6 forced
      tokens and 2 forks, docs/entropy-transformer.md; mu = 4, seeds 0-2) asks the same where
      most tokens are near-deterministic. There too this controller alone pinned eps_high at
      its bound and the entropy fell like plain PG's (-90%): 74% of the tokens had A = 0, 95%
      of the entropy drive came from A < 0 tokens (which the high clip never gates), and the
      0.04% of tokens clipped high were likely ones (mean probability 0.41, 0% below their
      state's average). Adapting eps_low instead (``adapt_low=True`` with eps_high held) kept
      part of it there (-57%). Measured, not general: the clip's authority depends on which
      tokens reach it.
    * What held the entropy in both studies is the advantage correction: pair the controller
      with REPO (``adapo_loss`` defaults to ``repo="decorrelate"``) or steer REPO itself with
      :class:`AdaptiveRepoCoef`.

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

    Two laws, each moving the coefficient toward *more* entropy while the measured entropy is
    below ``target_entropy`` and toward less while above, once per optimiser step:

    * ``mode="additive"`` (default): ``repo_coef += rate * (target - entropy)`` within ``bounds``
      (>= 0). For "fixed" (zeta) and "decorrelate" (gamma): a stronger correction removes more
      of the advantage/log-prob covariance that collapses entropy.
    * ``mode="multiplicative"``: REPO-R's law for ``repo="relative"`` (docs/repo.md), where zeta
      may take either sign (zeta > 0 raises entropy, zeta < 0 lowers it). ``bounds = (zeta_min,
      zeta_max)`` bound ``|zeta|`` (``0 < zeta_min <= zeta_max``; default ``(1e-4, 1.0)``). Below
      target: ``zeta *= factor`` if zeta > 0 (at most ``zeta_max``), ``zeta /= factor`` if
      zeta < 0; above target the reverse. Where ``|zeta|`` would fall below ``zeta_min`` the sign
      flips (``zeta_min -> -zeta_min`` and back), so the same controller can also lower the
      entropy. ``rate`` is not used. The response is monotone: every step below target raises
      zeta (or leaves it at ``+zeta_max``), every step above lowers it (or leaves it at
      ``-zeta_max``).

    Example::

        ctrl = AdaptiveRepoCoef(target_entropy=0.6, repo_coef=0.01, mode="multiplicative")
        out = repo_loss(..., repo="relative", repo_center="state", repo_coef=ctrl.repo_coef)
        ctrl.update(out.metrics)   # once per optimiser step
    """

    _value_name = "repo_coef"
    MODES = ("additive", "multiplicative")

    def __init__(self, target_entropy: float, repo_coef: float = 0.5, *, mode: str = "additive",
                 factor: float = 2.0, bounds: tuple[float, float] | None = None, rate: float = 0.5,
                 smoothing: float = 0.0):
        if not isinstance(mode, str) or mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode
        self.factor = _finite("factor", factor, lo=1.0, lo_open=True)
        if bounds is None:
            bounds = (0.0, 1.0) if mode == "additive" else (1e-4, 1.0)
        super().__init__(target_entropy, repo_coef, bounds, rate, smoothing)

    def _check_value(self, v: float) -> float:
        lo, hi = self.bounds
        if self.mode == "additive":
            if lo < 0:
                raise ValueError(f"bounds must be >= 0 for repo_coef, got {self.bounds!r}")
            return super()._check_value(v)
        if lo <= 0:
            raise ValueError(f"bounds = (zeta_min, zeta_max) of |repo_coef| need zeta_min > 0 in the "
                             f"multiplicative mode, got {self.bounds!r}")
        if not lo <= abs(v) <= hi:
            raise ValueError(f"repo_coef={v} must have |repo_coef| within bounds {self.bounds} (zeta_min, zeta_max)")
        return v

    @property
    def repo_coef(self) -> float:
        return self.value

    def _next_value(self, error: float) -> float:
        if self.mode == "additive":
            return super()._next_value(error)
        lo, hi = self.bounds
        z, f = self.value, self.factor
        if error == 0:
            return z
        toward = 1.0 if error > 0 else -1.0  # the direction of more entropy is +zeta
        if z * toward > 0:  # already on that side: grow |zeta|
            return toward * min(abs(z) * f, hi)
        shrunk = abs(z) / f  # on the other side: shrink |zeta|, and cross over at zeta_min
        return -toward * shrunk if shrunk >= lo else toward * lo

    @property
    def saturated(self) -> bool:
        if self.mode == "additive" or self.entropy_ema is None:
            return super().saturated
        error = self.target_entropy - self.entropy_ema
        hi = self.bounds[1]
        return (error > 0 and self.value >= hi) or (error < 0 and self.value <= -hi)

    def _constructor_args(self) -> dict:
        return {**super()._constructor_args(), "mode": self.mode, "factor": self.factor}

    @classmethod
    def _constructor_keys(cls) -> tuple[str, ...]:
        return (*super()._constructor_keys(), "mode", "factor")

    @classmethod
    def _upgrade_v1(cls, state: dict) -> dict:
        return {**super()._upgrade_v1(state), "mode": "additive", "factor": 2.0}

    def __repr__(self) -> str:
        return (f"AdaptiveRepoCoef(target_entropy={self.target_entropy}, repo_coef={self.value:.4g}, "
                f"mode={self.mode!r}, bounds={self.bounds}"
                + (f", rate={self.rate})" if self.mode == "additive" else f", factor={self.factor})"))
