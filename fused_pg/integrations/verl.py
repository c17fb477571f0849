"""verl: the ``"repo"`` and ``"adapo"`` policy losses for verl's policy-loss registry.

verl computes per-token log-probs with its own (fused) head and hands them to a registered
policy loss; these two are fused-pg's epilogue (:func:`fused_pg.policy_loss_from_logprobs`)
behind verl's exact signature::

    loss_fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
            config=None, rollout_is_weights=None) -> (pg_loss, pg_metrics)

Use::

    import fused_pg.integrations.verl     # registers "repo" and "adapo" (REPO "decorrelate")
    # then: actor_rollout_ref.actor.policy_loss.loss_mode=repo

Import it in the process that trains (verl's actor workers run under Ray): e.g. Ray's
``runtime_env={"worker_process_setup_hook": "fused_pg.integrations.verl.register"}``, with
options in the environment variable ``FUSED_PG_VERL_OPTIONS`` (JSON, the keywords of
:func:`register`), or call :func:`register` in your own setup hook.

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
fused-pg metric as ``actor/fused_pg/<key>`` (0-dim tensors; verl's ``Metric`` reads them).

verl adds its entropy bonus and KL loss itself, outside the policy loss. For those terms in
fused-pg's own losses, :data:`KL_LOSS_TYPES` maps verl's ``kl_loss_type`` names (with
``preset="verl"``, which also applies verl's clamp of k3 to [-10, 10]).

``"adapo"``: the clip range comes from an :class:`fused_pg.AdaptiveClip` (``register(controller=...,
update_every=...)``) instead of ``clip_ratio_low`` / ``clip_ratio_high``. verl gives a policy loss
no entropies and no optimiser-step signal, so the controller is stepped every ``update_every``
calls (the micro-batches of one optimiser step on each rank) from the sampled tokens' mean
surprisal, an unbiased estimate of the behaviour policy's entropy (see
:class:`fused_pg.integrations._common.ControllerStepper`). Its state is not in verl's
checkpoints: save ``adapo_stepper().state_dict()`` yourself to resume exactly.
"""

from __future__ import annotations

import json
import os

import torch
from torch import Tensor

from ..control import AdaptiveClip
from ..epilogue import METRIC_KEYS
from ..loss import policy_loss_from_logprobs
from ._common import ControllerStepper, require

core_algos = require("verl.trainer.ppo.core_algos", package="verl", minimum="0.9", extra="verl")

ENV_OPTIONS = "FUSED_PG_VERL_OPTIONS"
LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_LOSS_TYPES = {
    "kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3",
    "kl+": "k1+", "k1+": "k1+", "abs+": "abs+", "mse+": "k2", "k2+": "k2", "low_var_kl+": "k3+", "k3+": "k3+",
}
"""verl's ``kl_loss_type`` -> fused-pg's ``kl_estimator`` (verl's "+" of k2 is k2 itself)."""

_options: dict = dict(repo="decorrelate", repo_coef=1.0, repo_center=True, importance_level="token", validate=None)
_stepper: ControllerStepper | None = None


def kl_options(kl_loss_type: str) -> dict:
    """fused-pg's ``kl_estimator`` and ``kl_clamp`` for verl's ``kl_loss_type`` (verl clamps the
    value of low_var_kl / k3 and of k3+ to [-10, 10], not the others)."""
    if kl_loss_type not in KL_LOSS_TYPES:
        raise ValueError(f"kl_loss_type must be one of {tuple(KL_LOSS_TYPES)}, got {kl_loss_type!r}")
    est = KL_LOSS_TYPES[kl_loss_type]
    return dict(kl_estimator=est, kl_clamp=10.0 if est in ("k3", "k3+") else None)


def register(*, repo: str | None = None, repo_coef: float | None = None, repo_center: bool | None = None,
             importance_level: str | None = None, validate: bool | None = None,
             controller: AdaptiveClip | dict | None = None, update_every: int | None = None) -> None:
    """Register (or re-register with new options) the ``"repo"`` and ``"adapo"`` policy losses.

    Options not passed come from the JSON object in ``$FUSED_PG_VERL_OPTIONS``, else the
    defaults (REPO "decorrelate", gamma 1, centred; token-level ratios).

    Args:
        repo, repo_coef, repo_center: the REPO correction (see :func:`fused_pg.repo_loss`).
        importance_level: "token" (verl's "vanilla") or "sequence" (verl's "gspo").
        validate:   fused-pg's value checks (default: on CPU tensors only).
        controller: for "adapo": an :class:`fused_pg.AdaptiveClip` or the keyword arguments of one.
        update_every: for "adapo": loss calls per optimiser step on each rank.
    """
    global _stepper
    env = json.loads(os.environ.get(ENV_OPTIONS, "{}") or "{}")
    if not isinstance(env, dict):
        raise ValueError(f"${ENV_OPTIONS} must hold a JSON object of register() keywords, got {env!r}")
    unknown = set(env) - {"repo", "repo_coef", "repo_center", "importance_level", "validate", "controller",
                          "update_every"}
    if unknown:
        raise ValueError(f"${ENV_OPTIONS} has unknown keys {sorted(unknown)}")
    given = dict(repo=repo, repo_coef=repo_coef, repo_center=repo_center, importance_level=importance_level,
                 validate=validate, controller=controller, update_every=update_every)
    merged = {**env, **{k: v for k, v in given.items() if v is not None}}
    options = dict(_options)
    options.update({k: merged[k] for k in ("repo", "repo_coef", "repo_center", "importance_level", "validate")
                    if k in merged})
    if options["importance_level"] not in ("token", "sequence"):
        raise ValueError(f"importance_level must be 'token' or 'sequence', got {options['importance_level']!r}")
    ctrl = merged.get("controller")
    if isinstance(ctrl, dict):
        ctrl = AdaptiveClip(**ctrl)
    if ctrl is not None:
        if merged.get("update_every") is None:
            raise ValueError("update_every (loss calls per optimiser step on each rank) is required with a "
                             "controller: verl's policy loss sees no optimiser-step boundary")
        _stepper = ControllerStepper(ctrl, merged["update_every"])
    _options.clear()
    _options.update(options)
    core_algos.register_policy_loss("repo")(repo_policy_loss)
    core_algos.register_policy_loss("adapo")(adapo_policy_loss)


def adapo_stepper() -> ControllerStepper | None:
    """The registered "adapo" controller and its call counter (``state_dict`` to checkpoint it)."""
    return _stepper


def _aggregation(loss_agg_mode: str, mask: Tensor, config) -> dict:
    """verl's ``agg_loss`` normalisers as fused-pg aggregation options."""
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {loss_agg_mode!r}")
    info = getattr(config, "global_batch_info", None) or {}
    dp_size = info.get("dp_size", 1) or 1
    batch_num_tokens, global_batch_size = info.get("batch_num_tokens"), info.get("global_batch_size")
    out = dict(aggregation=loss_agg_mode)
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


def _policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights,
                 eps_low: float, eps_high: float):
    if config is None:
        raise ValueError("config (verl's ActorConfig) is required by the fused-pg policy losses")
    seq = _options["importance_level"] == "sequence"
    dual_clip = None
    if not seq:  # verl's "vanilla" always applies the dual clip (clip_ratio_c, default 3.0)
        dual_clip = config.get("clip_ratio_c", 3.0)
        if not dual_clip > 1.0:
            raise ValueError(f"clip_ratio_c must be > 1.0 (dual-clip PPO), got {dual_clip}")
    out = policy_loss_from_logprobs(
        log_prob, advantages, old_log_prob, response_mask, weights=rollout_is_weights,
        eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip, delta=None,
        importance_level=_options["importance_level"], repo=_options["repo"], repo_coef=_options["repo_coef"],
        repo_center=_options["repo_center"], validate=_options["validate"],
        **_aggregation(loss_agg_mode, response_mask, config))
    m = out.metrics
    metrics = {
        # verl: mean of (clipped term > unclipped term), i.e. clipped above or below
        "actor/pg_clipfrac": m["clip_frac_low"] + m["clip_frac_high"],
        "actor/ppo_kl": m["approx_kl"],
        "actor/pg_clipfrac_lower": m["clip_frac_dual"],
    }
    metrics.update({f"actor/fused_pg/{k}": m[k] for k in METRIC_KEYS})
    return out.loss, metrics


def _clip_range(config) -> tuple[float, float]:
    if config is None:
        raise ValueError("config (verl's ActorConfig) is required by the fused-pg policy losses")
    low = config.clip_ratio_low if config.clip_ratio_low is not None else config.clip_ratio
    high = config.clip_ratio_high if config.clip_ratio_high is not None else config.clip_ratio
    return low, high


def repo_policy_loss(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                     loss_agg_mode: str = "token-mean", config=None, rollout_is_weights: Tensor | None = None):
    """verl policy loss ``"repo"``: verl's clipped (dual-clip) PPO loss on REPO-corrected advantages.

    Arguments and return value are those of verl's ``compute_policy_loss_vanilla``; see the module
    docstring for the mapping and the options (:func:`register`).
    """
    low, high = _clip_range(config)
    return _policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                        rollout_is_weights, low, high)


def adapo_policy_loss(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                      loss_agg_mode: str = "token-mean", config=None, rollout_is_weights: Tensor | None = None):
    """verl policy loss ``"adapo"``: ``"repo"`` with the clip range from the registered ADAPO controller."""
    if _stepper is None:
        raise ValueError("loss_mode 'adapo' needs a controller: fused_pg.integrations.verl.register("
                         "controller=AdaptiveClip(...), update_every=...) (or $FUSED_PG_VERL_OPTIONS)")
    ctrl = _stepper.controller
    loss, metrics = _policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                                 rollout_is_weights, ctrl.eps_low, ctrl.eps_high)
    if torch.is_grad_enabled():  # a training call: count it towards the optimiser step
        _stepper.observe(old_log_prob, response_mask)
    return loss, metrics


register()
