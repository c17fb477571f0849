"""OpenRLHF: ``PolicyLoss``, a drop-in for ``openrlhf.models.loss.PolicyLoss``, and the launcher
that puts it into OpenRLHF's Ray actors.

Run OpenRLHF's PPO trainer through fused-pg's launcher, with fused-pg's options next to
OpenRLHF's (the recipe: ``examples/openrlhf_repo.sh``)::

    python -m fused_pg.integrations.openrlhf --fused_pg.repo decorrelate \\
        <the arguments of python -m openrlhf.cli.train_ppo_ray>

The launcher checks fused-pg's options (each ``--fused_pg.<option>`` flag, named on error),
then runs ``openrlhf.cli.train_ppo_ray`` as ``__main__`` with OpenRLHF's arguments; the
``ray.init`` that OpenRLHF's CLI makes gets a ``worker_process_setup_hook`` that calls
:func:`install` in every Ray worker process, with the options in ``$FUSED_PG_OPENRLHF_OPTIONS``.
Without ``--fused_pg.*`` flags the loss is OpenRLHF's own (REPO off, no controller): only the
implementation changes.

fused-pg's options (``--fused_pg.<name>``, or the keywords of :func:`install`): ``repo``,
``repo_coef``, ``repo_center`` (the :class:`fused_pg.LossConfig` fields of the same names;
"relative" is REPO-R; the "state" centre needs entropies, which OpenRLHF does not give its
loss, and is refused), ``validate``; ``adapo_target_entropy`` (an ADAPO controller, its clip
range starting at OpenRLHF's ``--actor.eps_clip_low_high``) with ``adapo_rate``,
``adapo_bounds``, ... (:class:`fused_pg.AdaptiveClip`'s arguments), or
``repo_control_target_entropy`` (a REPO controller starting at ``repo_coef``) with
``repo_control_mode``, ``repo_control_factor``, ... (:class:`fused_pg.AdaptiveRepoCoef`'s);
``controller_fresh_start``.

What :func:`install` changes in OpenRLHF (each internal checked first; a missing or changed one
raises :class:`~fused_pg.integrations._common.TrainerChanged` naming it and OpenRLHF's version):

* ``openrlhf.trainer.ray.ppo_actor.PolicyLoss``: this class, with the options bound.
* ``ppo_actor.iter_grad_accum_global_norm``, which groups the micro-batches of one optimiser step
  (``--train.micro_batch_size`` per micro-batch, DeepSpeed's gradient accumulation): for each
  such window, the REPO statistics of the whole window on every data-parallel rank, from the
  behaviour log-probs (``action_log_probs``), before its first micro-batch; and after its last
  one (the optimiser step), one step of the ADAPO controller from the whole window of every
  rank. The gradient therefore does not depend on ``--train.micro_batch_size`` or the number of
  ranks. OpenRLHF's dynamic batching (``--train.dynamic_batch_enable``) bypasses these windows:
  with REPO statistics or a controller it raises. fused-pg's metrics of the last call are the
  loss's ``metrics`` (those that need entropies are NaN, with ``entropy_measured`` 0).
* ``DeepspeedStrategy.save_ckpt`` / ``load_ckpt`` and ``ActorPPOTrainer.__init__``: the
  controller's state is saved in the actor's DeepSpeed checkpoint (its ``client_state``, key
  ``fused_pg_controller``) and restored on resume (``--ckpt.load_enable``); a checkpoint without
  it raises unless ``--fused_pg.controller_fresh_start`` restarts the controller on purpose.

The controllers' entropy: OpenRLHF gives its policy loss no entropies, so they observe the
sampled tokens' mean surprisal ``-log pi_old(y)``, an unbiased estimate of the behaviour
policy's token entropy when sampling did not truncate the distribution (top-p / top-k bias it
low). For the exact entropy use fused-pg's head in your own loop
(:func:`fused_pg.fused_logprobs_entropy`) or the TRL drop-in.

OpenRLHF's semantics and defaults, reproduced exactly (with ``repo="none"`` the loss equals
OpenRLHF's, see ``tests/test_integration_openrlhf.py``): ``clip_eps_low`` / ``clip_eps_high``
(0.2 / 0.2), ``dual_clip`` (off by default), the +-20 clamp of the PPO log-ratio,
``token_level_loss`` (token-mean, else the mean over non-empty sequences of their token means;
forced off for GSPO), ``dp_size`` / ``batch_num_tokens`` / ``global_batch_size`` (normalisers
``batch_num_tokens / dp_size`` and ``global_batch_size / dp_size``), ``policy_loss_type``
"ppo" / "gspo" (GSPO's ratio against the rollout log-probs when a correction is on), and the
train / rollout mismatch correction ``is_correction_level`` / ``_mode`` / ``_gating`` /
``_threshold`` (its per-token coefficients become fused-pg's ``weights``; a single threshold
value is an upper bound, as OpenRLHF's CLI reads it).

Differences: an all-masked batch gives 0 where OpenRLHF gives NaN; GSPO uses fused-pg's
GSPO-token form, identical in value and gradient when advantages are constant over each
sequence's tokens (OpenRLHF's outcome-reward estimators; OpenRLHF differentiates through the
sequence mean, so token-varying advantages differ) and with the log-ratio clamped to +-20
(OpenRLHF does not clamp GSPO's). ``PolicyLoss`` itself imports nothing from OpenRLHF.

Tested with OpenRLHF 0.11.2 (:func:`install` refuses other minor versions).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import json
import sys
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..config import LossConfig
from ..control import EntropyController
from ..loss import policy_loss_from_logprobs
from ..stats import RepoStats
from ._common import (TrainerChanged, behaviour_repo_stats, check_internal, check_uses, distributed_group,
                      env_options, needs_batch_stats, observe_entropy, option_keys, require, resolve_options)

ENV_OPTIONS = "FUSED_PG_OPENRLHF_OPTIONS"
OPTION_KEYS = option_keys(("repo", "repo_coef", "repo_center"))
"""fused-pg's options: ``--fused_pg.<name>`` flags, :func:`install` keywords, ``$FUSED_PG_OPENRLHF_OPTIONS``."""
CLIENT_STATE_KEY = "fused_pg_controller"


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """OpenRLHF's ``masked_mean`` over all tokens, with a 0 (not NaN) for an empty mask."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def _row_mean(x: Tensor, mask: Tensor) -> Tensor:
    """OpenRLHF's per-sequence ``masked_mean``, [B, 1]: NaN for a sequence without tokens, which
    its gates then count as filtered (a coefficient of 0 on no token: the loss is unaffected)."""
    return ((x * mask).sum(dim=-1) / mask.sum(dim=-1)).unsqueeze(-1)


def _threshold(value) -> tuple[float, float]:
    """``is_correction_threshold``: ``(low, high)``, or a single ``high`` (low 0), as OpenRLHF's CLI."""
    values = [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"is_correction_threshold must be HIGH or (LOW, HIGH) numbers, got {value!r}") from None
    if len(values) == 1:
        values = [0.0, values[0]]
    if len(values) != 2 or not 0.0 <= values[0] <= values[1] or values[1] != values[1]:
        raise ValueError(f"is_correction_threshold must be HIGH or (LOW, HIGH) with 0 <= LOW <= HIGH, got {value!r}")
    return values[0], values[1]


class PolicyLoss(nn.Module):
    """OpenRLHF's ``PolicyLoss`` computed by fused-pg (see the module docstring).

    Args:
        clip_eps_low, clip_eps_high, dual_clip, token_level_loss, policy_loss_type,
        is_correction_level, is_correction_mode, is_correction_gating, is_correction_threshold:
            OpenRLHF's, same defaults and checks (all made here, at construction).
        repo, repo_coef, repo_center: the :class:`fused_pg.LossConfig` fields (default: REPO off,
            OpenRLHF's loss; "relative" is REPO-R; the "state" centre needs entropies, which
            OpenRLHF does not give its loss).
        controller: a fused-pg controller: :class:`fused_pg.AdaptiveClip` (ADAPO, whose clip range
            replaces ``clip_eps_low`` / ``clip_eps_high``) or :class:`fused_pg.AdaptiveRepoCoef`
            (``repo_coef``), or a function ``(clip_eps_low, clip_eps_high) -> controller``.
            Training calls observe the sampled tokens' surprisal; :meth:`update_controller` steps
            it (once per optimiser step: :func:`install` does it at the end of each of OpenRLHF's
            accumulation windows).
        validate: fused-pg's value checks (default: on CPU tensors only).

    The loss options are one :class:`fused_pg.LossConfig`, built (and checked) here.
    """

    def __init__(
        self,
        clip_eps_low: float = 0.2,
        clip_eps_high: float = 0.2,
        dual_clip: float | None = None,
        token_level_loss: bool = True,
        policy_loss_type: str = "ppo",
        is_correction_level: str = "off",
        is_correction_mode: str = "mask",
        is_correction_gating: str = "ratio",
        is_correction_threshold=(0.5, 5.0),
        *,
        repo: str = "none",
        repo_coef: float = 1.0,
        repo_center: str | bool = "batch",
        controller: EntropyController | Callable[[float, float], EntropyController] | None = None,
        validate: bool | None = None,
    ) -> None:
        super().__init__()
        if policy_loss_type not in ("ppo", "gspo"):
            raise ValueError(f"policy_loss_type must be ppo or gspo, got {policy_loss_type!r}")
        if dual_clip is not None and not dual_clip > 1.0:
            raise ValueError(f"dual_clip must be > 1.0, got {dual_clip}")
        if is_correction_level not in {"off", "token", "seq"}:
            raise ValueError(f"is_correction_level must be off/token/seq, got {is_correction_level}")
        if is_correction_mode not in {"mask", "clip"}:
            raise ValueError(f"is_correction_mode must be mask/clip, got {is_correction_mode}")
        if is_correction_gating not in {"ratio", "binary_kl", "tv"}:
            raise ValueError(f"is_correction_gating must be ratio/binary_kl/tv, got {is_correction_gating}")
        if is_correction_mode == "clip" and (is_correction_level == "seq" or is_correction_gating != "ratio"):
            raise ValueError("is_correction_mode=clip requires is_correction_level=token and "
                             "is_correction_gating=ratio")
        threshold = _threshold(is_correction_threshold)
        if is_correction_gating != "ratio" and is_correction_level != "off" and threshold[0] > 0:
            raise ValueError(f"is_correction_gating={is_correction_gating} takes an upper bound only (a single delta)")
        self.token_level_loss = token_level_loss and policy_loss_type != "gspo"  # GSPO: per-sample mean
        self.policy_loss_type = policy_loss_type
        self.is_correction_level = is_correction_level
        self.is_correction_mode = is_correction_mode
        self.is_correction_gating = is_correction_gating
        self.is_correction_threshold = threshold
        self.config = LossConfig(
            eps_low=clip_eps_low, eps_high=clip_eps_high, dual_clip=dual_clip, delta=None, repo=repo,
            repo_coef=repo_coef, repo_center=repo_center,
            aggregation="token-mean" if self.token_level_loss else "seq-mean-token-mean",
            importance_level="sequence" if policy_loss_type == "gspo" else "token")
        if self.config.repo != "none" and self.config.repo_center == "state":
            raise ValueError("repo_center='state' centres logp by the token's entropy, and OpenRLHF gives its policy "
                             "loss no entropies: use repo_center='batch' or 'none'")
        if callable(controller) and not isinstance(controller, EntropyController):
            controller = controller(clip_eps_low, clip_eps_high)
        if controller is not None and not isinstance(controller, EntropyController):
            raise TypeError("controller must be a fused_pg controller (AdaptiveClip, AdaptiveRepoCoef) or a function "
                            f"(eps_low, eps_high) -> controller, got {type(controller).__name__}")
        self.controller = controller
        self.validate = validate
        self.metrics: dict = {}  # fused-pg's metrics of the last call

    @classmethod
    def with_options(cls, **fused_pg_options):
        """A constructor taking OpenRLHF's arguments, with fused-pg's options bound (to replace
        ``PolicyLoss`` where OpenRLHF builds it). A controller given as keywords is built anew
        for every loss."""
        return functools.partial(cls, **fused_pg_options)

    # -- OpenRLHF's train / rollout correction -----------------------------------------------------

    def _correction(self, old_log_probs: Tensor, rollout_log_probs: Tensor, action_mask: Tensor):
        """Per-token coefficients (detached), the filtered fraction and the rollout-vs-train KL."""
        low, high = self.is_correction_threshold
        seq_level = self.is_correction_level == "seq"
        is_log_ratio = (old_log_probs - rollout_log_probs).detach()
        token_is = is_log_ratio.exp()
        if self.is_correction_gating == "ratio":
            stat = _row_mean(is_log_ratio, action_mask) if seq_level else is_log_ratio
            stat = stat.exp()
        else:
            p = rollout_log_probs.exp().clamp(1e-6, 1 - 1e-6)
            q = old_log_probs.exp().clamp(1e-6, 1 - 1e-6)
            if self.is_correction_gating == "binary_kl":
                stat = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
            else:
                stat = (p - q).abs()
            if seq_level:
                stat = _row_mean(stat, action_mask)
        if self.is_correction_mode == "clip":
            coef = stat.clamp(min=low, max=high)
            filtered = (stat < low) | (stat > high)
        else:
            keep = (stat >= low) & (stat <= high)
            coef = torch.where(keep, token_is, 0.0)
            filtered = ~keep
        ratio = filtered.float().mean() if seq_level else _masked_mean(filtered.float(), action_mask)
        vllm_kl = _masked_mean(rollout_log_probs - old_log_probs, action_mask)
        return coef.expand_as(action_mask).detach(), ratio, vllm_kl

    # -- the loss ------------------------------------------------------------------------------------

    def forward(
        self,
        log_probs: Tensor,
        old_log_probs: Tensor,
        advantages: Tensor,
        action_mask: Tensor | None = None,
        rollout_log_probs: Tensor | None = None,
        dp_size: int = 1,
        batch_num_tokens: float | Tensor | None = None,
        global_batch_size: float | Tensor | None = None,
    ):
        """OpenRLHF's signature; returns ``(loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)``
        (the last two None without a correction). fused-pg's metrics: ``self.metrics``."""
        if isinstance(dp_size, bool) or not isinstance(dp_size, int) or dp_size < 1:
            raise ValueError(f"dp_size must be an int >= 1 (the data-parallel world size), got {dp_size!r}")
        mask = action_mask if action_mask is not None else torch.ones_like(log_probs, dtype=torch.bool)
        correcting = self.is_correction_level != "off"
        if correcting and rollout_log_probs is None:
            raise ValueError("rollout_log_probs is required with is_correction_level != 'off'")
        weights = vllm_kl = is_filter_ratio = None
        behaviour = old_log_probs
        if self.policy_loss_type == "gspo":
            if correcting:  # OpenRLHF's GSPO: the ratio against the rollout policy, no IS weight
                behaviour = rollout_log_probs
        elif correcting:
            weights, is_filter_ratio, vllm_kl = self._correction(old_log_probs, rollout_log_probs, mask)
        normaliser = batch_num_tokens if self.token_level_loss else global_batch_size
        norm = {} if normaliser is None else {
            "num_items_in_batch": torch.as_tensor(normaliser, dtype=torch.float64) / dp_size}
        training = torch.is_grad_enabled()
        window = _WINDOW.current
        cfg = self.controller.apply(self.config) if self.controller is not None else self.config
        repo_stats = None
        if needs_batch_stats(cfg):
            if window is not None:
                repo_stats = window.repo_stats
            elif training and _INSTALLED["options"] is not None:
                raise _no_window_error("REPO's whole-mini-batch statistics")
            else:  # a call of its own is its own mini-batch
                repo_stats = behaviour_repo_stats([(old_log_probs, advantages, mask)])
        if self.controller is not None and training:
            if window is None and _INSTALLED["options"] is not None:
                raise _no_window_error("the controller's optimiser steps")
            observe_entropy(self.controller, mask, old_logprobs=old_log_probs)
            if window is not None:
                window.controllers.append(self.controller)
        out = policy_loss_from_logprobs(log_probs, advantages, behaviour, mask, weights=weights, config=cfg,
                                        repo_stats=repo_stats, validate=self.validate, **norm)
        self.metrics = out.metrics
        # OpenRLHF: mean of (clipped surrogate < unclipped), i.e. clipped above or below
        clip_ratio = out.metrics["clip_frac_low"] + out.metrics["clip_frac_high"]
        ppo_kl = _masked_mean(old_log_probs - log_probs.detach(), mask)
        return out.loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio

    def update_controller(self, *, process_group=None) -> float:
        """One controller step from the training calls since the last (0.0 without a controller)."""
        return self.controller.update(process_group=process_group) if self.controller is not None else 0.0


# ---------------------------------------------------------------------------------------------
# install(): OpenRLHF's optimiser-step windows, checkpoints
# ---------------------------------------------------------------------------------------------

class _Window:
    """One optimiser step of OpenRLHF's actor: the REPO statistics of its micro-batches on every
    rank, and the controllers its losses fed."""

    def __init__(self, repo_stats: RepoStats | None):
        self.repo_stats = repo_stats
        self.controllers: list[EntropyController] = []


class _WindowState:
    current: _Window | None = None


_WINDOW = _WindowState()
_INSTALLED: dict = {"options": None}
_ACTOR_LOSSES: dict = {}   # id(actor's DeepSpeed engine) -> its PolicyLoss
_LOADED: dict = {}         # id(DeepSpeed engine) -> (load_path, client states) of its last load_ckpt


def _no_window_error(what: str) -> ValueError:
    return ValueError(f"{what} need OpenRLHF's optimiser-step windows (iter_grad_accum_global_norm); this training "
                      "call came from outside one, e.g. with --train.dynamic_batch_enable, which fused-pg does not "
                      "support with REPO statistics or a controller")


def _internals(ppo_actor, strategy_module, loss_utils, experience_module) -> dict:
    """Check every OpenRLHF internal :func:`install` relies on; return the originals."""
    where = "openrlhf.trainer.ray.ppo_actor"
    trainer = getattr(ppo_actor, "ActorPPOTrainer", None)
    if not isinstance(trainer, type):
        raise TrainerChanged(f"openrlhf has no {where}.ActorPPOTrainer, which the fused-pg drop-in relies on")
    current = getattr(ppo_actor, "PolicyLoss", None)
    if not (isinstance(current, type) or getattr(current, "func", None) is PolicyLoss):  # (installed before)
        raise TrainerChanged(f"openrlhf has no {where}.PolicyLoss, which the fused-pg drop-in replaces")
    init = check_internal(trainer, "__init__", ("strategy", "actor"), package="openrlhf",
                          where=f"{where}.ActorPPOTrainer")
    init = inspect.unwrap(init)
    check_uses(init, "PolicyLoss(", package="openrlhf", where=f"{where}.ActorPPOTrainer.__init__")
    check_uses(init, "actor_loss_fn", package="openrlhf", where=f"{where}.ActorPPOTrainer.__init__")
    ppo_train = check_internal(trainer, "ppo_train", ("kl_ctl",), package="openrlhf", where=f"{where}.ActorPPOTrainer")
    check_uses(ppo_train, "iter_grad_accum_global_norm", package="openrlhf", where=f"{where}.ActorPPOTrainer.ppo_train")
    iterate = check_internal(ppo_actor, "iter_grad_accum_global_norm",
                             ("data_iter", "strategy", "accumulated_gradient", "mask_fn"), package="openrlhf",
                             where=where)
    strategy = getattr(strategy_module, "DeepspeedStrategy", None)
    swhere = "openrlhf.utils.deepspeed.DeepspeedStrategy"
    save = check_internal(strategy, "save_ckpt", ("model", "save_dir", "tag", "max_num", "max_mem", "client_state"),
                          package="openrlhf", where=swhere)
    load = check_internal(strategy, "load_ckpt", ("model", "load_dir", "tag"), package="openrlhf", where=swhere)
    dp_group = check_internal(loss_utils, "_get_dp_group", ("strategy",), package="openrlhf",
                              where="openrlhf.utils.loss_utils")
    fields = getattr(getattr(experience_module, "Experience", None), "__dataclass_fields__", {})
    for name in ("action_log_probs", "advantages", "action_mask"):
        if name not in fields:
            raise TrainerChanged(f"openrlhf's Experience has no field {name!r}, which the fused-pg drop-in reads")
    return dict(trainer=trainer, init=init, iterate=inspect.unwrap(iterate), save=inspect.unwrap(save),
                load=inspect.unwrap(load), dp_group=dp_group)


def install(**options) -> None:
    """Put fused-pg's ``PolicyLoss`` into OpenRLHF's actor (in the process that trains: a Ray
    worker; the launcher does it with a ``worker_process_setup_hook``). ``options``: fused-pg's
    options (:data:`OPTION_KEYS`), checked now. Calling it again replaces the options."""
    # OpenRLHF's own loss unless asked: REPO off by default (LossConfig's default is "decorrelate")
    resolved = resolve_options({"repo": "none", **options}, OPTION_KEYS, lambda k: f"install({k}=...)")
    require("openrlhf", package="openrlhf", minimum="0.11", below="0.12", extra="openrlhf")
    ppo_actor = importlib.import_module("openrlhf.trainer.ray.ppo_actor")
    strategy_module = importlib.import_module("openrlhf.utils.deepspeed")
    loss_utils = importlib.import_module("openrlhf.utils.loss_utils")
    experience_module = importlib.import_module("openrlhf.trainer.ppo_utils.experience")
    found = _internals(ppo_actor, strategy_module, loss_utils, experience_module)

    loss_kw = dict(repo=resolved.loss.repo, repo_coef=resolved.loss.repo_coef, repo_center=resolved.loss.repo_center,
                   validate=resolved.validate)
    if resolved.controller_kind is not None:
        loss_kw["controller"] = resolved.controller  # a new one for each loss, from its clip range
    PolicyLoss(**loss_kw)  # every check, now
    ppo_actor.PolicyLoss = PolicyLoss.with_options(**loss_kw)

    iterate, dp_group_of = found["iterate"], found["dp_group"]

    def iter_grad_accum_global_norm(data_iter, strategy, accumulated_gradient, mask_fn):
        """OpenRLHF's windows of ``accumulated_gradient`` micro-batches (one optimiser step), each
        with the whole window's REPO statistics on every rank; one controller step after each."""
        group = distributed_group(dp_group_of(strategy))
        gas = max(int(accumulated_gradient), 1)
        items = iter(data_iter)
        while True:
            window = []
            for item in items:
                window.append(item)
                if len(window) == gas:
                    break
            if not window:
                return
            parts = [(it.action_log_probs, it.advantages, it.action_mask) for it in window]
            state = _Window(behaviour_repo_stats(parts, group) if needs_batch_stats(resolved.loss) else None)
            for item, info in iterate(iter(window), strategy, accumulated_gradient, mask_fn):
                outer, _WINDOW.current = _WINDOW.current, state
                try:
                    yield item, info
                finally:
                    _WINDOW.current = outer
            for ctrl in dict.fromkeys(state.controllers):  # the optimiser step is done
                ctrl.update(process_group=group)
            if len(window) < gas:
                return

    iter_grad_accum_global_norm.__wrapped__ = iterate
    ppo_actor.iter_grad_accum_global_norm = iter_grad_accum_global_norm

    trainer_init, save, load = found["init"], found["save"], found["load"]

    @functools.wraps(trainer_init)
    def __init__(self, strategy, actor, *args, **kwargs):
        trainer_init(self, strategy, actor, *args, **kwargs)
        engine = getattr(actor, "model", actor)
        loss = self.actor_loss_fn
        _ACTOR_LOSSES[id(engine)] = loss
        loaded = _LOADED.pop(id(engine), None)
        controller = getattr(loss, "controller", None)
        if loaded is not None and loaded[0] is not None and controller is not None:
            state = (loaded[1] or {}).get(CLIENT_STATE_KEY)
            if state is None:
                if not resolved.fresh_start:
                    raise ValueError(
                        f"resuming from {loaded[0]}, whose client state has no {CLIENT_STATE_KEY!r}: the ADAPO "
                        "controller's state was not saved with this checkpoint, so resuming would silently restart "
                        "it. To restart it on purpose, pass --fused_pg.controller_fresh_start")
            else:
                controller.load_state_dict(state)

    @functools.wraps(save)
    def save_ckpt(self, model, save_dir, tag=None, max_num=3, max_mem=1000, client_state=None, *args, **kwargs):
        loss = _ACTOR_LOSSES.get(id(model))
        if loss is not None and getattr(loss, "controller", None) is not None:
            client_state = {**(client_state or {}), CLIENT_STATE_KEY: loss.controller.state_dict()}
        return save(self, model, save_dir, tag, max_num, max_mem, client_state, *args, **kwargs)

    @functools.wraps(load)
    def load_ckpt(self, model, load_dir, tag=None, *args, **kwargs):
        load_path, states = load(self, model, load_dir, tag, *args, **kwargs)
        _LOADED[id(model)] = (load_path, states)
        return load_path, states

    found["trainer"].__init__ = __init__
    strategy_module.DeepspeedStrategy.save_ckpt = save_ckpt
    strategy_module.DeepspeedStrategy.load_ckpt = load_ckpt
    _INSTALLED["options"] = resolved


def setup_worker() -> None:
    """Ray's ``worker_process_setup_hook``: :func:`install` with the options in
    ``$FUSED_PG_OPENRLHF_OPTIONS`` (set by the launcher)."""
    install(**env_options(ENV_OPTIONS, OPTION_KEYS))


# ---------------------------------------------------------------------------------------------
# the launcher: python -m fused_pg.integrations.openrlhf [--fused_pg.<option> ...] <OpenRLHF args>
# ---------------------------------------------------------------------------------------------

def _boolean(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() == "true"


def _pair(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


_FLAG_TYPES = {"repo": str, "repo_center": str, "validate": _boolean, "adapo_adapt_low": _boolean,
               "adapo_bounds": _pair, "adapo_low_bounds": _pair, "repo_control_mode": str,
               "repo_control_bounds": _pair}


def parse_args(argv: list[str]) -> tuple[dict, list[str]]:
    """Split ``argv`` into fused-pg's options (``--fused_pg.<name> VALUE``, checked; flags naming
    the option on error) and the rest (OpenRLHF's arguments)."""
    parser = argparse.ArgumentParser(prog="python -m fused_pg.integrations.openrlhf", add_help=False,
                                     allow_abbrev=False)
    for name in OPTION_KEYS:
        if name == "controller_fresh_start":
            parser.add_argument(f"--fused_pg.{name}", dest=name, action="store_true", default=None)
        else:
            parser.add_argument(f"--fused_pg.{name}", dest=name, type=_FLAG_TYPES.get(name, float), default=None)
    known, rest = parser.parse_known_args(argv)
    stray = [a for a in rest if a.startswith("--fused_pg")]
    if stray:
        raise SystemExit(f"unknown fused-pg option {stray[0]} (the options: "
                         f"{', '.join('--fused_pg.' + k for k in OPTION_KEYS)})")
    options = {k: v for k, v in vars(known).items() if v is not None}
    resolve_options({"repo": "none", **options}, OPTION_KEYS, lambda k: f"--fused_pg.{k}")
    return options, rest


def _hooked_ray_init(ray_init, options: dict):
    """``ray.init`` that adds fused-pg's worker setup hook and options to the runtime_env."""

    @functools.wraps(ray_init)
    def init(*args, runtime_env=None, **kwargs):
        env = dict(runtime_env or {})
        if env.get("worker_process_setup_hook") not in (None, f"{__name__}.setup_worker"):
            raise ValueError("OpenRLHF's ray.init already sets a worker_process_setup_hook; fused-pg cannot add "
                             "its own")
        env["worker_process_setup_hook"] = f"{__name__}.setup_worker"
        env["env_vars"] = {**env.get("env_vars", {}), ENV_OPTIONS: json.dumps(options)}
        return ray_init(*args, runtime_env=env, **kwargs)

    return init


def main(argv: list[str] | None = None) -> None:
    """The launcher: fused-pg's options checked, then OpenRLHF's PPO CLI with them in every worker."""
    import runpy

    import ray

    argv = list(sys.argv[1:] if argv is None else argv)
    options, rest = parse_args(argv)
    require("openrlhf", package="openrlhf", minimum="0.11", below="0.12", extra="openrlhf")
    ray.init = _hooked_ray_init(ray.init, options)
    sys.argv = ["openrlhf.cli.train_ppo_ray", *rest]
    runpy.run_module("openrlhf.cli.train_ppo_ray", run_name="__main__", alter_sys=True)



if __name__ == "__main__":
    main()
