"""OpenRLHF: ``PolicyLoss``, a drop-in for ``openrlhf.models.loss.PolicyLoss`` (OpenRLHF 0.11).

Same constructor arguments, same ``forward`` signature, same five return values; the loss is
fused-pg's epilogue (:func:`fused_pg.policy_loss_from_logprobs`) with the REPO correction (and
optionally an ADAPO controller) on top. This module does not import OpenRLHF. Swap it in where
OpenRLHF builds its actor loss, in the actor process (``openrlhf.trainer.ray.ppo_actor`` imports
``PolicyLoss`` from ``openrlhf.models``)::

    import openrlhf.trainer.ray.ppo_actor as ppo_actor
    from fused_pg.integrations.openrlhf import PolicyLoss

    ppo_actor.PolicyLoss = PolicyLoss.with_options(repo="decorrelate")

OpenRLHF's semantics and defaults, reproduced exactly (with ``repo="none"`` the loss equals
OpenRLHF's, see ``tests/test_integration_openrlhf.py``): ``clip_eps_low`` / ``clip_eps_high``
(0.2 / 0.2), ``dual_clip`` (off by default), the +-20 clamp of the PPO log-ratio,
``token_level_loss`` (token-mean, else the mean over non-empty sequences of their token means;
forced off for GSPO), ``dp_size`` / ``batch_num_tokens`` / ``global_batch_size`` (normalisers
``batch_num_tokens / dp_size`` and ``global_batch_size / dp_size``), ``policy_loss_type``
"ppo" / "gspo" (GSPO's ratio against the rollout log-probs when a correction is on), and the
train / rollout mismatch correction ``is_correction_level`` / ``_mode`` / ``_gating`` /
``_threshold`` (its per-token coefficients become fused-pg's ``weights``).

Differences: an all-masked batch gives 0 where OpenRLHF gives NaN; GSPO uses fused-pg's
GSPO-token form, identical in value and gradient when advantages are constant over each
sequence's tokens (OpenRLHF's outcome-reward estimators; OpenRLHF differentiates through the
sequence mean, so token-varying advantages differ) and with the log-ratio clamped to +-20
(OpenRLHF does not clamp GSPO's).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from ..control import AdaptiveClip
from ..loss import policy_loss_from_logprobs
from ._common import ControllerStepper


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """OpenRLHF's ``masked_mean`` over all tokens, with a 0 (not NaN) for an empty mask."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def _row_mean(x: Tensor, mask: Tensor) -> Tensor:
    """OpenRLHF's per-sequence ``masked_mean``, [B, 1]: NaN for a sequence without tokens, which
    its gates then count as filtered (a coefficient of 0 on no token: the loss is unaffected)."""
    return ((x * mask).sum(dim=-1) / mask.sum(dim=-1)).unsqueeze(-1)


class PolicyLoss(nn.Module):
    """OpenRLHF's ``PolicyLoss`` computed by fused-pg (see the module docstring).

    Args:
        clip_eps_low, clip_eps_high, dual_clip, token_level_loss, policy_loss_type,
        is_correction_level, is_correction_mode, is_correction_gating, is_correction_threshold:
            OpenRLHF's, same defaults and checks.
        repo, repo_coef, repo_center: fused-pg's REPO correction (``repo="none"``: OpenRLHF's loss).
        controller, update_every: optional ADAPO: an :class:`fused_pg.AdaptiveClip` whose clip
            range replaces ``clip_eps_low`` / ``clip_eps_high``, stepped every ``update_every``
            training calls (the micro-batches of one optimiser step) from the sampled tokens'
            surprisal (:class:`fused_pg.integrations._common.ControllerStepper`).
        validate: fused-pg's value checks (default: on CPU tensors only).
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
        repo: str = "decorrelate",
        repo_coef: float = 1.0,
        repo_center: bool = True,
        controller: AdaptiveClip | None = None,
        update_every: int | None = None,
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
        if is_correction_gating != "ratio" and is_correction_level != "off" and is_correction_threshold[0] > 0:
            raise ValueError(f"is_correction_gating={is_correction_gating} takes an upper bound only (a single delta)")
        if (controller is None) != (update_every is None):
            raise ValueError("controller and update_every go together (ADAPO: the clip range from the "
                             "controller, stepped every update_every training calls)")
        self.clip_eps_low, self.clip_eps_high = clip_eps_low, clip_eps_high
        self.dual_clip = dual_clip
        self.policy_loss_type = policy_loss_type
        self.token_level_loss = token_level_loss and policy_loss_type != "gspo"  # GSPO: per-sample mean
        self.is_correction_level = is_correction_level
        self.is_correction_mode = is_correction_mode
        self.is_correction_gating = is_correction_gating
        self.is_correction_threshold = is_correction_threshold
        self.repo, self.repo_coef, self.repo_center = repo, repo_coef, repo_center
        self.stepper = ControllerStepper(controller, update_every) if controller is not None else None
        self.validate = validate
        self.metrics: dict = {}  # fused-pg's metrics of the last call

    @classmethod
    def with_options(cls, **fused_pg_options):
        """A constructor taking OpenRLHF's arguments, with fused-pg's options bound (to replace
        ``PolicyLoss`` where OpenRLHF builds it)."""
        return functools.partial(cls, **fused_pg_options)

    def _correction(self, old_log_probs: Tensor, rollout_log_probs: Tensor, action_mask: Tensor):
        """OpenRLHF's train / rollout correction: per-token coefficients (detached), the filtered
        fraction and the rollout-vs-train KL."""
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
        mask = action_mask if action_mask is not None else torch.ones_like(log_probs, dtype=torch.bool)
        correcting = self.is_correction_level != "off"
        if correcting and rollout_log_probs is None:
            raise ValueError("rollout_log_probs is required with is_correction_level != 'off'")
        weights = vllm_kl = is_filter_ratio = None
        behaviour = old_log_probs
        if self.policy_loss_type == "gspo":
            level = "sequence"
            if correcting:  # OpenRLHF's GSPO: the ratio against the rollout policy, no IS weight
                behaviour = rollout_log_probs
        else:
            level = "token"
            if correcting:
                weights, is_filter_ratio, vllm_kl = self._correction(old_log_probs, rollout_log_probs, mask)
        if self.token_level_loss:
            agg = dict(aggregation="token-mean")
            if batch_num_tokens is not None:
                agg["num_items_in_batch"] = torch.as_tensor(batch_num_tokens, dtype=torch.float64) / dp_size
        else:
            agg = dict(aggregation="seq-mean-token-mean")
            if global_batch_size is not None:
                agg["num_items_in_batch"] = torch.as_tensor(global_batch_size, dtype=torch.float64) / dp_size
        if self.stepper is not None:
            eps_low, eps_high = self.stepper.controller.eps_low, self.stepper.controller.eps_high
        else:
            eps_low, eps_high = self.clip_eps_low, self.clip_eps_high
        out = policy_loss_from_logprobs(
            log_probs, advantages, behaviour, mask, weights=weights, eps_low=eps_low, eps_high=eps_high,
            dual_clip=self.dual_clip, importance_level=level, repo=self.repo, repo_coef=self.repo_coef,
            repo_center=self.repo_center, validate=self.validate, **agg)
        self.metrics = out.metrics
        # OpenRLHF: mean of (clipped surrogate < unclipped), i.e. clipped above or below
        clip_ratio = out.metrics["clip_frac_low"] + out.metrics["clip_frac_high"]
        ppo_kl = _masked_mean(old_log_probs - log_probs.detach(), mask)
        if self.stepper is not None and torch.is_grad_enabled():
            self.stepper.observe(old_log_probs, mask)
        return out.loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio
