"""Pieces the trainer integrations share.

* :func:`require`: import a trainer package inside the tested version range, or raise naming
  the install command and the versions.
* :func:`check_internal` / :func:`check_uses`: a drop-in that patches or calls a trainer's
  internals checks, when it is set up, that each of them still exists with the parameters it
  relies on (and that the trainer still calls it), and raises :class:`TrainerChanged` naming the
  internal and the trainer's version otherwise -- never a silent fall-back to stock behaviour.
* :func:`behaviour_repo_stats`: REPO statistics of a whole mini-batch (every micro-batch, every
  data-parallel rank) from the behaviour log-probs a trainer has before the first micro-batch.
* :func:`observe_entropy`: feed a controller the exact entropy when the trainer computed it, else
  the surprisal estimate from the behaviour log-probs.
* :func:`save_controller` / :func:`load_controller`: a controller's state in a JSON file inside a
  trainer's checkpoint folder, written atomically, and a resume that refuses to go on without it.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import LossConfig
from ..control import AdaptiveClip, AdaptiveRepoCoef, EntropyController
from ..stats import RepoStats

CONTROLLER_FILE = "fused_pg_controller.json"
"""Name of the controller's state file in a trainer's checkpoint folder."""


class TrainerChanged(RuntimeError):
    """A trainer internal a drop-in relies on is missing or has another signature."""


def _version(package: str, module) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        top = importlib.import_module(module.__name__.split(".")[0])
        return getattr(top, "__version__", None)


def require(module: str, *, package: str, minimum: str, below: str, extra: str):
    """Import ``module`` of a trainer package whose version is in ``[minimum, below)`` (the
    releases the drop-in is tested with), or raise ImportError naming the versions and the
    install command."""
    install = f"pip install 'fused-pg[{extra}]'"
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"fused_pg.integrations.{extra} needs {package}>={minimum},<{below}: {install} "
                          f"({type(e).__name__}: {e})") from e
    from packaging.version import Version

    version = _version(package, mod)
    if version is None:
        raise ImportError(f"fused_pg.integrations.{extra}: cannot tell which {package} is installed (no "
                          f"distribution metadata, no {package}.__version__); it needs {package}>={minimum},<{below}")
    v = Version(version)
    if not Version(minimum) <= v < Version(below):
        raise ImportError(f"fused_pg.integrations.{extra} is tested with {package}>={minimum},<{below} (it relies on "
                          f"{package}'s internals), found {package} {version}: {install}")
    return mod


def trainer_version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def check_internal(owner, attr: str, params: Sequence[str], *, package: str, where: str):
    """``getattr(owner, attr)``, checked: it exists, is callable and takes the parameters
    ``params`` (by name, in this order, possibly among others). Returns it.

    Raises :class:`TrainerChanged` naming ``where.attr`` and the installed version of
    ``package`` otherwise.
    """
    name = f"{where}.{attr}"
    fn = getattr(owner, attr, None)
    if fn is None or not callable(fn):
        raise TrainerChanged(f"{package} {trainer_version(package)} has no {name}, which the fused-pg drop-in "
                             "relies on: this version of the trainer is not supported")
    try:
        signature = inspect.signature(inspect.unwrap(fn))
    except (TypeError, ValueError) as e:
        raise TrainerChanged(f"{package} {trainer_version(package)}: cannot read the signature of {name} ({e})") from e
    names = [p for p in signature.parameters if p not in ("self", "cls")]
    at = 0
    for p in params:
        if p not in names[at:]:
            raise TrainerChanged(f"{package} {trainer_version(package)}: {name} has parameters {tuple(names)}; the "
                                 f"fused-pg drop-in relies on {tuple(params)} (in this order): this version of the "
                                 "trainer is not supported")
        at = names.index(p, at) + 1
    return fn


def check_uses(fn, name: str, *, package: str, where: str) -> None:
    """Check that the source of ``fn`` (a trainer function) still refers to ``name``: the
    drop-in replaces ``name`` and relies on ``fn`` reaching the replacement."""
    try:
        source = inspect.getsource(inspect.unwrap(fn))
    except (OSError, TypeError) as e:
        raise TrainerChanged(f"{package} {trainer_version(package)}: cannot read the source of {where} ({e})") from e
    if name not in source:
        raise TrainerChanged(f"{package} {trainer_version(package)}: {where} no longer uses {name}, which the fused-pg "
                             "drop-in replaces: this version of the trainer is not supported")


def distributed_group(group):
    """``group``, or the default group when torch.distributed runs with more than one process and
    ``group`` is None; None for a single process."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    if group is None:
        group = torch.distributed.group.WORLD
    return group if torch.distributed.get_world_size(group) > 1 else None


def behaviour_repo_stats(parts: Sequence[tuple], group=None) -> RepoStats:
    """REPO statistics of a whole mini-batch from log-probs known before its first micro-batch.

    ``parts``: ``(logprobs, advantages, mask)`` or ``(logprobs, advantages, mask, entropy)`` of
    each of this rank's micro-batches (any matching shapes; advantages may also be one per row of
    ``[B, T]`` log-probs; with entropies the statistics also hold the moments of ``logp + H``).
    ``group``: the data-parallel group whose ranks together hold the mini-batch (None: this
    process only). Masked positions may hold anything (-inf included).

    verl and OpenRLHF pass the behaviour log-probs (known for the whole mini-batch up front): the
    statistics (and with them REPO's ``zeta`` and centre ``mu``) are then the same whatever the
    micro-batching and the number of ranks. On the first update after a rollout they are the
    current policy's log-probs; on later ones (PPO epochs, further mini-batches) they stay those
    of the policy that sampled the batch. TRL passes the current policy's, from a no-grad pass at
    the optimiser step's first micro-batch.
    """
    stats = []
    for old, adv, mask, *entropy in parts:
        valid = mask.bool() if mask is not None else torch.ones_like(old, dtype=torch.bool)
        if adv.shape != old.shape:
            adv = adv.reshape(adv.shape[0], *([1] * (old.dim() - 1))).expand_as(old)
        ent = entropy[0].detach().reshape(-1) if entropy and entropy[0] is not None else None
        stats.append(RepoStats.of(old.detach().reshape(-1), adv.detach().reshape(-1), valid.reshape(-1), ent))
    merged = RepoStats.merge_all(stats)
    group = distributed_group(group)
    return merged.all_reduce(group) if group is not None else merged


def needs_batch_stats(cfg: LossConfig) -> bool:
    """Whether REPO with ``cfg`` uses statistics of the batch: the batch centre's mean, or
    "decorrelate"'s covariance and variance ("fixed" / "relative" with the "state" or "none"
    centre use none)."""
    return cfg.repo != "none" and (cfg.repo_center == "batch" or cfg.repo == "decorrelate")


def surprisal_mean(old_logprobs: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(mean -log pi_old(y_t), n_tokens)`` over the counted tokens (float64, no host sync).

    For tokens sampled from the behaviour policy ``E_{y ~ pi}[-log pi(y)] = H(pi)``: an unbiased
    estimate of its mean token entropy -- of the distribution the tokens were sampled from, so
    only when the behaviour log-probs are those of the sampling distribution (temperature
    included) and sampling did not truncate it (top-p / top-k / min-p make it biased low).
    """
    counted = mask.detach().bool()
    n_tokens = counted.sum().to(torch.float64)
    total = torch.where(counted, -old_logprobs.detach().to(torch.float64), 0.0).sum()
    return total / n_tokens.clamp_min(1.0), n_tokens


def observe_entropy(controller: EntropyController, mask: Tensor, *, entropy: Tensor | None = None,
                    old_logprobs: Tensor | None = None) -> str:
    """One micro-batch's observation for ``controller``: the mean of ``entropy`` (the current
    policy's exact token entropies) when given, else the surprisal estimate from
    ``old_logprobs`` (:func:`surprisal_mean`). Returns which one ("exact" or "surprisal")."""
    if entropy is not None:
        counted = mask.detach().bool()
        n_tokens = counted.sum().to(torch.float64)
        mean = torch.where(counted, entropy.detach().to(torch.float64), 0.0).sum() / n_tokens.clamp_min(1.0)
        controller.observe(mean, n_tokens)
        return "exact"
    if old_logprobs is None:
        raise ValueError("observe_entropy needs entropy or old_logprobs")
    controller.observe(*surprisal_mean(old_logprobs, mask))
    return "surprisal"


def save_controller(folder: str, controller: EntropyController) -> str:
    """Write ``controller``'s state to ``folder/fused_pg_controller.json`` (atomically: a reader
    never sees half a file). Returns the path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, CONTROLLER_FILE)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(controller.state_dict(), f)
    os.replace(tmp, path)
    return path


def read_controller(folder: str) -> dict | None:
    """The state saved by :func:`save_controller` in ``folder``, or None if there is none."""
    path = os.path.join(folder, CONTROLLER_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def missing_controller_error(folder: str, how_to_start_fresh: str) -> ValueError:
    return ValueError(
        f"resuming from {folder}, which has no {CONTROLLER_FILE}: the controller's state (its clip "
        "range or REPO coefficient, and entropy estimate) was not saved with this checkpoint (e.g. it was "
        "written without the controller), so resuming would silently restart the controller. To restart it on purpose, "
        f"{how_to_start_fresh}")


def load_controller(folder: str, controller: EntropyController, *, fresh_ok: bool, how_to_start_fresh: str) -> bool:
    """Restore ``controller`` from ``folder``; returns whether a state was found. A checkpoint
    without one raises (naming ``how_to_start_fresh``) unless ``fresh_ok``."""
    state = read_controller(folder)
    if state is None:
        if not fresh_ok:
            raise missing_controller_error(folder, how_to_start_fresh)
        return False
    controller.load_state_dict(state)
    return True


# ---------------------------------------------------------------------------------------------
# fused-pg's options of a drop-in, as a trainer's configuration gives them
# ---------------------------------------------------------------------------------------------

CONTROLLERS = {
    "adapo": (AdaptiveClip, ("rate", "bounds", "smoothing", "adapt_low", "low_ratio", "low_bounds")),
    "repo_control": (AdaptiveRepoCoef, ("mode", "factor", "rate", "bounds", "smoothing")),
}
"""The controllers a drop-in runs, by option prefix: ``<prefix>_target_entropy`` turns one on and
``<prefix>_<argument>`` sets an argument of its class. ``adapo``: :class:`fused_pg.AdaptiveClip`,
whose clip range starts at the trainer's; ``repo_control``: :class:`fused_pg.AdaptiveRepoCoef`,
whose coefficient starts at ``repo_coef``."""


def option_keys(loss_fields: Sequence[str]) -> tuple[str, ...]:
    """A drop-in's option names: the :class:`fused_pg.LossConfig` fields it exposes (same names),
    ``validate``, the controllers' (:data:`CONTROLLERS`) and ``controller_fresh_start``."""
    keys = [*loss_fields, "validate"]
    for prefix, (_, args) in CONTROLLERS.items():
        keys += [f"{prefix}_target_entropy", *(f"{prefix}_{a}" for a in args)]
    return (*keys, "controller_fresh_start")


@dataclass(frozen=True)
class Options:
    """A drop-in's fused-pg options, checked: the loss part as a :class:`fused_pg.LossConfig` (the
    trainer's clip range and aggregation are added where the trainer gives them), the value
    checks, and the controller (``controller_kind``: a key of :data:`CONTROLLERS` or None; its
    arguments)."""

    loss: LossConfig
    validate: bool | None
    controller_kind: str | None
    controller_args: dict | None
    fresh_start: bool

    def controller(self, eps_low: float, eps_high: float) -> EntropyController | None:
        """A new controller (None without one): ADAPO starting from the trainer's clip range, the
        REPO controller from ``repo_coef``."""
        if self.controller_kind is None:
            return None
        if self.controller_kind == "adapo":
            return AdaptiveClip(eps_low=eps_low, eps_high=eps_high, **self.controller_args)
        return AdaptiveRepoCoef(repo_coef=self.loss.repo_coef, **self.controller_args)


def _named(error: Exception, names: dict[str, str], where: Callable[[str], str], fallback: str) -> Exception:
    """``error`` prefixed with where the option it names was given (``names``: the name in the
    message -> the option's name)."""
    bad = next((names[k] for k in sorted(names, key=len, reverse=True) if k in str(error)), fallback)
    return type(error)(f"{where(bad)}: {error}")


def resolve_options(values: dict, keys: Sequence[str], where: Callable[[str], str]) -> Options:
    """Check ``values`` (names from ``keys``, see :func:`option_keys`) and build the options.
    ``where(name)`` says where a name was given (a trainer config key, a keyword, an environment
    variable) in the error messages."""
    unknown = sorted(set(values) - set(keys))
    if unknown:
        raise ValueError(f"{where(unknown[0])}: unknown fused-pg option (the options: {', '.join(keys)})")
    loss_keys = [k for k in keys if k in LossConfig.__dataclass_fields__]
    loss_values = {k: values[k] for k in loss_keys if values.get(k) is not None}
    try:
        loss = LossConfig(**loss_values)
    except (TypeError, ValueError) as e:
        raise _named(e, {k: k for k in loss_keys}, where, loss_keys[0]) from e
    validate = values.get("validate")
    if validate is not None and not isinstance(validate, bool):
        raise TypeError(f"{where('validate')}: must be true, false or null, got {validate!r}")
    kind = args = None
    for prefix, (cls, names) in CONTROLLERS.items():
        given = {a: values[f"{prefix}_{a}"] for a in names if values.get(f"{prefix}_{a}") is not None}
        if values.get(f"{prefix}_target_entropy") is None:
            if given:
                raise ValueError(f"{where(f'{prefix}_{next(iter(given))}')} is set without {prefix}_target_entropy "
                                 "(the controller's target entropy, which turns it on)")
            continue
        if kind is not None:
            raise ValueError(f"{where(f'{prefix}_target_entropy')}: one controller at a time ({kind}_target_entropy "
                             "is set too)")
        kind, args = prefix, {"target_entropy": values[f"{prefix}_target_entropy"], **given}
        args = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
        try:  # every check the controller makes, now
            if prefix == "adapo":
                cls(**args)
            else:
                if loss.repo == "none":
                    raise ValueError("the REPO controller adapts repo_coef: it needs repo != 'none'")
                cls(repo_coef=loss.repo_coef, **args)
        except (TypeError, ValueError) as e:
            raise _named(e, {k: f"{prefix}_{k}" for k in args}, where, f"{prefix}_target_entropy") from e
    fresh = values.get("controller_fresh_start")
    if fresh is not None and not isinstance(fresh, bool):
        raise TypeError(f"{where('controller_fresh_start')}: must be true or false, got {fresh!r}")
    return Options(loss=loss, validate=validate, controller_kind=kind, controller_args=args, fresh_start=bool(fresh))


def env_options(variable: str, keys: Sequence[str]) -> dict:
    """The JSON object of options in ``$variable`` (``{}`` when unset), checked, naming the variable."""
    raw = os.environ.get(variable, "")
    if not raw.strip():
        return {}
    try:
        values = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"${variable} is not valid JSON ({e}): it must hold a JSON object of fused-pg's options, "
                         f"e.g. '{{\"repo\": \"decorrelate\"}}'") from e
    if not isinstance(values, dict):
        raise ValueError(f"${variable} must hold a JSON object of fused-pg's options, got {raw!r}")
    resolve_options(values, keys, lambda k: f"${variable}[{k!r}]")
    return values
