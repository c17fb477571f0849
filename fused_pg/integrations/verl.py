"""verl: the ``"repo"`` and ``"adapo"`` policy losses for verl's policy-loss registry.

verl computes per-token log-probs with its own head and hands each micro-batch to a registered
policy loss; these two are fused-pg's epilogue (:func:`fused_pg.policy_loss_from_logprobs`)
behind verl's exact signature::

    loss_fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
            config=None, rollout_is_weights=None) -> (pg_loss, pg_metrics)

Use (verl's own configuration keys; the recipe: ``examples/verl_repo.sh``)::

    python -m verl.trainer.main_ppo ... \\
        actor_rollout_ref.actor.policy_loss.loss_mode=repo \\
        actor_rollout_ref.actor.policy_loss._target_=fused_pg.integrations.verl.PolicyLossConfig \\
        +actor_rollout_ref.actor.policy_loss.repo=decorrelate

The ``_target_`` makes verl build its ``policy_loss`` section as :class:`PolicyLossConfig`, verl's
own class plus fused-pg's keys; building it imports this module in each worker, which registers
the losses and the mini-batch hook there (no Ray setup hook is needed). Every key is checked
when verl builds the config, naming the key.

fused-pg's keys (``+actor_rollout_ref.actor.policy_loss.<key>=...``):

* ``repo``, ``repo_coef``, ``repo_center``: the :class:`fused_pg.LossConfig` fields of the same
  names (``loss_mode=repo`` defaults to "decorrelate"; "relative" is REPO-R, whose ``repo_coef``
  may be negative; ``repo_center`` "batch", "state" -- which needs verl's entropies,
  ``actor_rollout_ref.actor.calculate_entropy=True`` -- or "none". "decorrelate" with the
  "state" centre is refused: it needs the whole mini-batch's entropies up front, which verl does
  not keep).
* ``importance_level``: "token" (verl's "vanilla" loss, dual clip ``clip_ratio_c``) or
  "sequence" (verl's "gspo").
* ``validate``: fused-pg's value checks (default: on CPU tensors only).
* ``adapo_target_entropy`` (required for ``loss_mode=adapo``), ``adapo_rate``, ``adapo_bounds``,
  ``adapo_smoothing``, ``adapo_adapt_low``, ``adapo_low_ratio``, ``adapo_low_bounds``: the
  arguments of :class:`fused_pg.AdaptiveClip` without the ``adapo_`` prefix; its initial
  ``eps_low`` / ``eps_high`` are verl's ``clip_ratio_low`` / ``clip_ratio_high``.
* ``repo_control_target_entropy`` (with ``loss_mode=repo``), ``repo_control_mode``,
  ``repo_control_factor``, ``repo_control_rate``, ``repo_control_bounds``,
  ``repo_control_smoothing``: a REPO controller, :class:`fused_pg.AdaptiveRepoCoef` (e.g. the
  multiplicative law of REPO-R), starting at ``repo_coef``.
* ``controller_fresh_start``: resume from a checkpoint without the controller's state,
  restarting the controller (by default such a resume raises).

Keys left unset take the process defaults: :func:`register` (called on import) with the JSON
object in ``$FUSED_PG_VERL_OPTIONS`` (same keys; checked on import, naming the variable).

**Whole-mini-batch REPO statistics.** verl runs one optimiser step per mini-batch
(``BaseEngine.train_batch``), splitting it into micro-batches (``ppo_micro_batch_size_per_gpu``
or dynamic sizes) over data-parallel ranks. The drop-in wraps ``train_batch``: the REPO
statistics (``zeta``, the centre ``mu``) are those of the whole mini-batch on every rank, from
the behaviour log-probs (``old_log_probs``, known before the first micro-batch; one all-gather
of five numbers per mini-batch), so the gradient does not depend on the micro-batching or the
number of ranks. On the first mini-batch after a rollout these are the current policy's
log-probs; later ones keep the behaviour policy's. A direct call outside verl's engine is its
own mini-batch.

**Controllers.** ADAPO (``loss_mode=adapo``: the clip range comes from a
:class:`fused_pg.AdaptiveClip`) or a REPO controller (``loss_mode=repo``: ``repo_coef`` from a
:class:`fused_pg.AdaptiveRepoCoef`) is stepped once per optimiser step (after each
``train_batch``) from the whole mini-batch of every rank. What it observes: the current policy's
exact token entropies when verl computes them (``actor_rollout_ref.actor.calculate_entropy=True``,
or an entropy bonus), else the sampled tokens' mean surprisal ``-log pi_old(y)``, an unbiased
estimate of the behaviour policy's entropy only when sampling did not truncate the distribution
(top-p / top-k bias it low). Its state is saved in each actor checkpoint folder as
``fused_pg_controller.json`` and restored on resume; a resume from a checkpoint without it
raises (``controller_fresh_start=true`` restarts the controller on purpose).

verl's options and defaults, reproduced exactly (``repo="none"`` gives verl's "vanilla" loss):
``clip_ratio_low`` / ``clip_ratio_high`` (each falling back to ``clip_ratio``), ``clip_ratio_c``
(dual clip, 3.0 by default: verl always applies it in "vanilla"), the log-ratio clamped to +-20,
``rollout_is_weights`` (multiplied into the per-token policy loss), and ``loss_agg_mode`` with
``config.global_batch_info`` (``dp_size``, ``batch_num_tokens``, ``global_batch_size``,
``loss_scale_factor``) as verl's ``agg_loss`` uses them:

=========================  =====================================================================
loss_agg_mode              fused-pg
=========================  =====================================================================
token-mean                 token-mean, normaliser batch_num_tokens / dp_size (else this batch's)
token-sum                  token-sum, normaliser 1 / dp_size
seq-mean-token-mean        seq-mean-token-mean, normaliser global_batch_size / dp_size
seq-mean-token-sum         seq-mean-token-sum, normaliser global_batch_size / dp_size
seq-mean-token-sum-norm    seq-mean-token-sum-norm, normaliser global_batch_size / dp_size (else
                           this batch's non-empty sequences), length loss_scale_factor (else T)
=========================  =====================================================================

The only differences: verl divides a sequence's token sum by ``n + 1e-8`` in
seq-mean-token-mean (fused-pg by ``n``: 1e-8 / n relative), and an empty batch gives verl NaN,
fused-pg 0. With ``importance_level="sequence"`` the losses are verl's "gspo" mode instead (no
dual clip; verl clamps the GSPO log-ratio at +10 from above, fused-pg at +-20).

Metrics: verl's ``actor/pg_clipfrac``, ``actor/ppo_kl``, ``actor/pg_clipfrac_lower`` and every
fused-pg metric as ``actor/fused_pg/<key>`` (0-dim tensors; verl's ``Metric`` reads them; those
that need entropies are NaN, with ``entropy_measured`` 0, unless verl computes them).

verl adds its entropy bonus and KL loss itself, outside the policy loss. For those terms in
fused-pg's own losses, :data:`KL_LOSS_TYPES` maps verl's ``kl_loss_type`` names (with
``preset="verl"``, which also applies verl's clamp of k3 to [-10, 10]).

Tested with verl 0.9.1 (the drop-in refuses other minor versions: it relies on verl's internals,
each checked when it is set up).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import LossConfig
from ..control import EntropyController
from ..epilogue import METRIC_KEYS
from ..loss import policy_loss_from_logprobs
from ..stats import RepoStats
from ._common import (Options, TrainerChanged, behaviour_repo_stats, check_internal, check_uses, distributed_group,
                      env_options, missing_controller_error, needs_batch_stats, observe_entropy, option_keys,
                      read_controller, require, resolve_options, save_controller)

core_algos = require("verl.trainer.ppo.core_algos", package="verl", minimum="0.9", below="0.10", extra="verl")
from verl.workers.config import PolicyLossConfig as _VerlPolicyLossConfig  # noqa: E402

ENV_OPTIONS = "FUSED_PG_VERL_OPTIONS"
LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_LOSS_TYPES = {
    "kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3",
    "kl+": "k1+", "k1+": "k1+", "abs+": "abs+", "mse+": "k2", "k2+": "k2", "low_var_kl+": "k3+", "k3+": "k3+",
}
"""verl's ``kl_loss_type`` -> fused-pg's ``kl_estimator`` (verl's "+" of k2 is k2 itself)."""

OPTION_KEYS = option_keys(("repo", "repo_coef", "repo_center", "importance_level"))
"""fused-pg's keys: those of :func:`register`, ``$FUSED_PG_VERL_OPTIONS`` and :class:`PolicyLossConfig`."""


def _resolve(values: dict, where) -> Options:
    options = resolve_options(values, OPTION_KEYS, where)
    if options.loss.repo == "decorrelate" and options.loss.repo_center == "state":
        raise ValueError(f"{where('repo_center')}: repo='decorrelate' with repo_center='state' needs the entropies of "
                         "the whole mini-batch before its first micro-batch, which verl does not keep (use 'batch' or "
                         "'none' with 'decorrelate', or 'state' with 'fixed' / 'relative')")
    return options


def kl_options(kl_loss_type: str) -> dict:
    """fused-pg's ``kl_estimator`` and ``kl_clamp`` for verl's ``kl_loss_type`` (verl clamps the
    value of low_var_kl / k3 and of k3+ to [-10, 10], not the others)."""
    if kl_loss_type not in KL_LOSS_TYPES:
        raise ValueError(f"kl_loss_type must be one of {tuple(KL_LOSS_TYPES)}, got {kl_loss_type!r}")
    est = KL_LOSS_TYPES[kl_loss_type]
    return dict(kl_estimator=est, kl_clamp=10.0 if est in ("k3", "k3+") else None)


# ---------------------------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------------------------

def _env_values() -> dict:
    return env_options(ENV_OPTIONS, OPTION_KEYS)


_defaults: dict = {}          # the process defaults' values (register())
_default_options: Options     # ... resolved


@dataclass
class PolicyLossConfig(_VerlPolicyLossConfig):
    """verl's ``PolicyLossConfig`` with fused-pg's keys (see the module docstring); selected with
    ``actor_rollout_ref.actor.policy_loss._target_=fused_pg.integrations.verl.PolicyLossConfig``.
    Keys left ``None`` take the process defaults (:func:`register`). Checked when built."""

    repo: str | None = None
    repo_coef: float | None = None
    repo_center: str | None = None
    importance_level: str | None = None
    validate: bool | None = None
    adapo_target_entropy: float | None = None
    adapo_rate: float | None = None
    adapo_bounds: list | None = None
    adapo_smoothing: float | None = None
    adapo_adapt_low: bool | None = None
    adapo_low_ratio: float | None = None
    adapo_low_bounds: list | None = None
    repo_control_target_entropy: float | None = None
    repo_control_mode: str | None = None
    repo_control_factor: float | None = None
    repo_control_rate: float | None = None
    repo_control_bounds: list | None = None
    repo_control_smoothing: float | None = None
    controller_fresh_start: bool | None = None

    def __post_init__(self):
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        options = self.fused_pg_options()
        _check_loss_mode(self.loss_mode, options, "actor_rollout_ref.actor.policy_loss.")
        if options.controller_kind is not None and self.loss_mode in ("repo", "adapo"):
            _SESSION.expect_controller(options)

    def fused_pg_options(self) -> Options:
        """These keys over the process defaults, checked."""
        given = {k: getattr(self, k) for k in OPTION_KEYS if getattr(self, k) is not None}
        return _resolve({**_defaults, **given}, lambda k: f"actor_rollout_ref.actor.policy_loss.{k}")


def _check_loss_mode(loss_mode: str, options: Options, prefix: str) -> None:
    """``adapo`` runs the ADAPO controller; ``repo`` no controller or the REPO controller."""
    if loss_mode == "adapo" and options.controller_kind != "adapo":
        raise ValueError(f"{prefix}loss_mode=adapo needs +{prefix}adapo_target_entropy=<nats> (the ADAPO controller's "
                         "target entropy)" + (", not the REPO controller" if options.controller_kind else ""))
    if loss_mode == "repo" and options.controller_kind == "adapo":
        raise ValueError(f"{prefix}adapo_target_entropy is set with loss_mode=repo: ADAPO is loss_mode=adapo")


# ---------------------------------------------------------------------------------------------
# the mini-batch hook: whole-mini-batch statistics, controller steps, controller checkpoints
# ---------------------------------------------------------------------------------------------

class _MiniBatch:
    """One ``train_batch`` call (one optimiser step) of an engine: its data and what the losses
    of its micro-batches share."""

    def __init__(self, engine, data):
        self.engine = engine
        self.data = data
        self.micro_batch = None       # the micro-batch the engine is computing the loss of
        self.entropy = None           # its per-token entropies, when verl computed them
        self._stats: RepoStats | None = None
        self.controller: EntropyController | None = None  # observed by this mini-batch's losses

    def repo_stats(self) -> RepoStats:
        """The statistics of the whole mini-batch, over the engine's data-parallel group (computed
        at the first micro-batch's loss: every rank reaches it, in the same order)."""
        if self._stats is None:
            keys = ("old_log_probs", "advantages", "response_mask")
            missing = [k for k in keys if k not in self.data.keys()]
            if missing:
                raise TrainerChanged(f"verl's mini-batch has no {missing} (the fields fused-pg's REPO statistics are "
                                     f"computed from; keys: {sorted(self.data.keys())}): this verl is not supported")
            old, adv, mask = (_padded(self.data[k]) for k in keys)
            self._stats = behaviour_repo_stats([(old, adv, mask)], self.engine.get_data_parallel_group())
        return self._stats


def _padded(t: Tensor) -> Tensor:
    return t.to_padded_tensor(0.0) if t.is_nested else t


class _Session:
    """What one worker process holds: the mini-batch being trained, the ADAPO controller and a
    controller state read from a checkpoint before the controller existed."""

    def __init__(self):
        self.current: _MiniBatch | None = None
        self.controller: EntropyController | None = None
        self.expected: Options | None = None   # a config with a controller was built in this process
        self.pending_state: dict | None = None

    def expect_controller(self, options: Options) -> None:
        self.expected = options

    def controller_for(self, options: Options, config) -> EntropyController:
        if self.controller is None:
            ctrl = options.controller(*_clip_range(config))
            if self.pending_state is not None:
                ctrl.load_state_dict(self.pending_state)
                self.pending_state = None
            self.controller = ctrl
        return self.controller

    # -- checkpoints -----------------------------------------------------------------------------

    def save(self, folder: str) -> None:
        if self.controller is not None:
            save_controller(folder, self.controller)

    def load(self, folder: str) -> None:
        options = self.expected if self.expected is not None else (
            _default_options if _default_options.controller_kind is not None else None)
        if options is None and self.controller is None:
            return  # no controller in this process
        state = read_controller(folder)
        if state is None:
            fresh = options.fresh_start if options is not None else False
            if not fresh:
                raise missing_controller_error(
                    folder, "set +actor_rollout_ref.actor.policy_loss.controller_fresh_start=true")
            return
        if self.controller is not None:
            self.controller.load_state_dict(state)
        else:
            EntropyController.from_state_dict(state)  # checked now, applied when the controller is built
            self.pending_state = state


_SESSION = _Session()


def current_controller() -> EntropyController | None:
    """The controller of this worker process (None before its first loss call)."""
    return _SESSION.controller


_hook = {"installed": False, "reason": "not attempted"}


def _install_engine_hook() -> None:
    """Wrap verl's ``BaseEngine.train_batch`` (one optimiser step per mini-batch) and the
    checkpoint methods of each engine ``EngineRegistry.new`` builds, after checking them."""
    if _hook["installed"]:
        return
    try:
        base = importlib.import_module("verl.workers.engine.base")
    except ModuleNotFoundError as e:
        if e.name is not None and e.name.split(".")[0] == "verl":
            raise TrainerChanged(f"verl has no module {e.name}, which the fused-pg drop-in relies on: this verl is "
                                 "not supported") from e
        _warn_no_engine(e)
        return
    except ImportError as e:  # a dependency of verl's training engines is missing: verl cannot train here
        _warn_no_engine(e)
        return
    padding = importlib.import_module("verl.workers.utils.padding")
    train_batch, new = _engine_internals(base, padding)
    engine_cls = base.BaseEngine

    def train_batch_hooked(self, data, loss_function):
        batch = _MiniBatch(self, data)

        def loss_function_hooked(*args, model_output=None, data=None, **kwargs):
            batch.micro_batch = data
            entropy = model_output.get("entropy") if model_output is not None else None
            batch.entropy = padding.no_padding_2_padding(entropy, data) if entropy is not None else None
            return loss_function(*args, model_output=model_output, data=data, **kwargs)

        outer, _SESSION.current = _SESSION.current, batch
        try:
            out = train_batch(self, data, loss_function_hooked if loss_function is not None else None)
        finally:
            _SESSION.current = outer
        if batch.controller is not None:  # the optimiser step is done: one controller step
            batch.controller.update(process_group=distributed_group(self.get_data_parallel_group()))
        return out

    def new_hooked(cls, *args, **kwargs):
        engine = new(cls, *args, **kwargs)
        _hook_checkpoints(engine)
        return engine

    train_batch_hooked.__wrapped__ = train_batch
    new_hooked.__wrapped__ = new
    engine_cls.train_batch = train_batch_hooked
    base.EngineRegistry.new = classmethod(new_hooked)
    _hook.update(installed=True, reason="installed")


def _engine_internals(base, padding):
    """Check what the mini-batch hook relies on in verl's engine module (``base``) and padding
    utilities; return the unwrapped ``BaseEngine.train_batch`` and ``EngineRegistry.new``
    (functions)."""
    where = "verl.workers.engine.base.BaseEngine"
    engine_cls = base.BaseEngine
    train_batch = check_internal(engine_cls, "train_batch", ("data", "loss_function"), package="verl", where=where)
    train_batch = inspect.unwrap(train_batch)
    check_uses(train_batch, "forward_backward_batch", package="verl", where=f"{where}.train_batch")
    check_uses(train_batch, "optimizer_step", package="verl", where=f"{where}.train_batch")
    check_internal(engine_cls, "get_data_parallel_group", (), package="verl", where=where)
    check_internal(engine_cls, "save_checkpoint", ("local_path", "hdfs_path", "global_step", "max_ckpt_to_keep"),
                   package="verl", where=where)
    check_internal(engine_cls, "load_checkpoint", ("local_path", "hdfs_path", "del_local_after_load"),
                   package="verl", where=where)
    new = check_internal(getattr(base, "EngineRegistry", None), "new", ("model_type", "backend"), package="verl",
                         where="verl.workers.engine.base.EngineRegistry")
    new = inspect.unwrap(getattr(new, "__func__", new))
    check_internal(padding, "no_padding_2_padding", ("tensor", "data"), package="verl",
                   where="verl.workers.utils.padding")
    return train_batch, new


def _warn_no_engine(error: ImportError) -> None:
    _hook["reason"] = f"verl's training engines cannot be imported here ({error})"
    warnings.warn(f"fused_pg.integrations.verl: {_hook['reason']}. The losses are registered, but not the mini-batch "
                  "hook (whole-mini-batch REPO statistics, ADAPO steps and checkpoints): verl cannot train in this "
                  "process", stacklevel=3)


def _hook_checkpoints(engine) -> None:
    """Save / restore the controller with each checkpoint of ``engine`` (an instance: every
    engine class implements its own save_checkpoint / load_checkpoint)."""
    save, load = engine.save_checkpoint, engine.load_checkpoint

    def save_checkpoint(local_path, *args, **kwargs):
        out = save(local_path, *args, **kwargs)
        _SESSION.save(local_path)
        return out

    def load_checkpoint(local_path, *args, **kwargs):
        _SESSION.load(local_path)  # before: the engine may delete its local copy after loading
        return load(local_path, *args, **kwargs)

    engine.save_checkpoint, engine.load_checkpoint = save_checkpoint, load_checkpoint


def engine_hook_status() -> str:
    """Whether the mini-batch hook is installed in this process, and if not, why."""
    return _hook["reason"]


# ---------------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------------

def register(**options) -> None:
    """Register the ``"repo"`` and ``"adapo"`` policy losses (and, where verl's engines import,
    the mini-batch hook), with process defaults for fused-pg's options.

    The defaults are reset on every call: the documented ones (those of :class:`fused_pg.LossConfig`:
    REPO "decorrelate", gamma 1, centred; token-level ratios; no controller), then the JSON object
    in ``$FUSED_PG_VERL_OPTIONS``, then ``options`` (the keys of :data:`OPTION_KEYS`, checked now).
    Keys set in verl's ``policy_loss`` config (:class:`PolicyLossConfig`) override them.
    """
    global _defaults, _default_options
    env = _env_values()
    values = {**env, **{k: v for k, v in options.items() if v is not None}}
    resolved = _resolve(values, lambda k: f"register({k}=...)" if k in options else f"${ENV_OPTIONS}[{k!r}]")
    _defaults, _default_options = values, resolved
    _option_cache.clear()
    check_internal(core_algos, "register_policy_loss", ("name",), package="verl", where="verl.trainer.ppo.core_algos")
    check_internal(core_algos, "get_policy_loss_fn", ("name",), package="verl", where="verl.trainer.ppo.core_algos")
    core_algos.register_policy_loss("repo")(repo_policy_loss)
    core_algos.register_policy_loss("adapo")(adapo_policy_loss)
    _install_engine_hook()


# ---------------------------------------------------------------------------------------------
# the losses
# ---------------------------------------------------------------------------------------------

_option_cache: dict = {}  # id(actor config) -> (actor config, Options, {loss_agg_mode: LossConfig})


def _configs(config, loss_agg_mode: str) -> tuple[Options, LossConfig]:
    """fused-pg's options for this actor config and its LossConfig for ``loss_agg_mode``, built
    once per actor config (verl keeps one for the whole run)."""
    entry = _option_cache.get(id(config))
    if entry is None or entry[0] is not config:
        policy_loss = config.get("policy_loss", None)
        options = (policy_loss.fused_pg_options() if isinstance(policy_loss, PolicyLossConfig)
                   else _default_options)
        entry = (config, options, {})
        _option_cache[id(config)] = entry
    _, options, by_mode = entry
    cfg = by_mode.get(loss_agg_mode)
    if cfg is None:
        if loss_agg_mode not in LOSS_AGG_MODES:
            raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {loss_agg_mode!r}")
        low, high = _clip_range(config)
        seq = options.loss.importance_level == "sequence"
        dual_clip = None
        if not seq:  # verl's "vanilla" always applies the dual clip (clip_ratio_c, default 3.0)
            dual_clip = config.get("clip_ratio_c", 3.0)
            if not dual_clip > 1.0:
                raise ValueError(f"clip_ratio_c must be > 1.0 (dual-clip PPO), got {dual_clip}")
        cfg = dataclasses.replace(options.loss, eps_low=low, eps_high=high, dual_clip=dual_clip, delta=None,
                                  aggregation=loss_agg_mode)
        by_mode[loss_agg_mode] = cfg
    return options, cfg


def _normalisers(loss_agg_mode: str, mask: Tensor, config) -> dict:
    """verl's ``agg_loss`` normalisers for this micro-batch."""
    info = getattr(config, "global_batch_info", None) or {}
    dp_size = info.get("dp_size", 1) or 1
    batch_num_tokens, global_batch_size = info.get("batch_num_tokens"), info.get("global_batch_size")
    out = {}
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None and dp_size > 1:
            raise ValueError("config.global_batch_info['batch_num_tokens'] is required when dp_size > 1")
        if batch_num_tokens is not None:
            out["num_items_in_batch"] = torch.as_tensor(batch_num_tokens, dtype=torch.float64) / dp_size
        return out
    if loss_agg_mode == "token-sum":
        if dp_size != 1:
            out["num_items_in_batch"] = 1.0 / dp_size
        return out
    if global_batch_size is None and dp_size > 1:
        raise ValueError("config.global_batch_info['global_batch_size'] is required when dp_size > 1")
    if global_batch_size is not None:
        out["num_items_in_batch"] = torch.as_tensor(global_batch_size, dtype=torch.float64) / dp_size
    if loss_agg_mode == "seq-mean-token-sum-norm":
        if global_batch_size is None:  # verl counts the non-empty sequences, not all rows
            out["num_items_in_batch"] = (mask.sum(-1) > 0).sum().clamp(min=1).to(torch.float64)
        scale = info.get("loss_scale_factor")
        out["max_length"] = int(scale) if scale is not None else mask.shape[-1]
    return out


def _clip_range(config) -> tuple[float, float]:
    low = config.clip_ratio_low if config.clip_ratio_low is not None else config.clip_ratio
    high = config.clip_ratio_high if config.clip_ratio_high is not None else config.clip_ratio
    return low, high


def _policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights,
                 adapo: bool):
    if config is None:
        raise ValueError("config (verl's ActorConfig) is required by the fused-pg policy losses")
    options, cfg = _configs(config, loss_agg_mode)
    batch = _SESSION.current
    training = torch.is_grad_enabled()
    _check_loss_mode("adapo" if adapo else "repo", options, "")
    controller = None
    if options.controller_kind is not None:
        if training and batch is None:
            raise ValueError("the controller steps once per optimiser step of verl's engine (BaseEngine.train_batch); "
                             f"this call came from outside it ({engine_hook_status()})")
        controller = _SESSION.controller_for(options, config)
        cfg = controller.apply(cfg)
    entropy = batch.entropy if batch is not None and batch.entropy is not None else None
    if entropy is not None and entropy.shape != log_prob.shape:
        entropy = None
    repo_stats = None
    if cfg.repo != "none" and cfg.repo_center == "state":
        if entropy is None:  # L = logp + H needs this micro-batch's entropies; no batch statistics
            raise ValueError("repo_center='state' needs the current policy's token entropies: set "
                             "actor_rollout_ref.actor.calculate_entropy=True (verl's engine then computes them)")
    elif needs_batch_stats(cfg):
        # the whole mini-batch's statistics (a call outside verl's engine is its own mini-batch)
        repo_stats = batch.repo_stats() if batch is not None else behaviour_repo_stats(
            [(old_log_prob, advantages, response_mask)])
    norm = _normalisers(loss_agg_mode, response_mask, config)
    max_length = norm.pop("max_length", None)
    if max_length is not None:
        cfg = dataclasses.replace(cfg, max_length=max_length)
    out = policy_loss_from_logprobs(
        log_prob, advantages, old_log_prob, response_mask, weights=rollout_is_weights, repo_stats=repo_stats,
        entropy=entropy.detach() if entropy is not None else None, config=cfg, validate=options.validate, **norm)
    if controller is not None and training:
        observe_entropy(controller, response_mask, entropy=entropy, old_logprobs=old_log_prob)
        batch.controller = controller
    m = out.metrics
    metrics = {
        # verl: mean of (clipped term > unclipped term), i.e. clipped above or below
        "actor/pg_clipfrac": m["clip_frac_low"] + m["clip_frac_high"],
        "actor/ppo_kl": m["approx_kl"],
        "actor/pg_clipfrac_lower": m["clip_frac_dual"],
    }
    metrics.update({f"actor/fused_pg/{k}": m[k] for k in METRIC_KEYS if m.get(k) is not None})
    return out.loss, metrics


def repo_policy_loss(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                     loss_agg_mode: str = "token-mean", config=None, rollout_is_weights: Tensor | None = None):
    """verl policy loss ``"repo"``: verl's clipped (dual-clip) PPO loss on REPO-corrected advantages.

    Arguments and return value are those of verl's ``compute_policy_loss_vanilla``; see the module
    docstring for the mapping and the options.
    """
    return _policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                        rollout_is_weights, adapo=False)


def adapo_policy_loss(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                      loss_agg_mode: str = "token-mean", config=None, rollout_is_weights: Tensor | None = None):
    """verl policy loss ``"adapo"``: ``"repo"`` with the clip range from the ADAPO controller."""
    return _policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                        rollout_is_weights, adapo=True)


register()
