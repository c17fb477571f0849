"""The policy-loss epilogue for implementations that only produce per-token log-probs.

Baselines (naive, ``torch.compile``) and Cut Cross-Entropy compute ``logp`` (and maybe the
entropy) by their own means; the O(N) loss on top is fused-pg's own epilogue, called
through :mod:`fused_pg.epilogue`, so that every implementation computes *the same loss*
and only the LM-head part differs. (SPEC section 4: loss math lives in exactly two places,
fused-pg's epilogue and the reference oracle; the benchmark adds no third copy.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from fused_pg.batch import make_token_batch
from fused_pg.config import LossConfig
from fused_pg.epilogue import policy_loss

from .config import LossSpec
from .problem import Problem


def loss_config(spec: LossSpec) -> LossConfig:
    """fused-pg's option object for the benchmark loss."""
    return LossConfig(eps_low=spec.eps_low, eps_high=spec.eps_high, repo=spec.repo,
                      repo_coef=spec.repo_coef, kl_coef=spec.kl_coef, kl_estimator="k3",
                      entropy_coef=spec.entropy_coef, aggregation="token-mean")


def loss_from_logprobs(problem: Problem, spec: LossSpec, logprobs: Tensor, entropy: Tensor | None) -> Tensor:
    """Scalar loss from differentiable per-token ``logprobs`` (and ``entropy``), any shape of N.

    ``entropy=None`` (an implementation that cannot compute it) uses zeros: only valid for a
    spec with ``entropy_coef == 0``.
    """
    cfg = loss_config(spec)
    batch = make_token_batch(
        problem.hidden, problem.weight, problem.targets, problem.advantages, problem.old_logprobs,
        problem.mask, bias=None, ref_logprobs=problem.ref_logprobs, rollout_logprobs=None, cu_seqlens=None,
        num_items_in_batch=None, ignore_index=-100, cfg=cfg, validate=False)
    valid = batch.valid
    logprobs = torch.where(valid, logprobs.reshape(-1).float(), 0.0)
    if entropy is None:
        if spec.entropy_coef != 0:
            raise ValueError("this implementation computes no entropy: entropy_coef must be 0")
        entropy = torch.zeros_like(logprobs)
    else:
        entropy = torch.where(valid, entropy.reshape(-1).float(), 0.0)
    loss, _ = policy_loss(logprobs, entropy, batch, cfg)
    return loss
