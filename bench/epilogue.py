"""The policy-loss epilogue for implementations that only produce per-token log-probs.

Baselines (naive, ``torch.compile``) and Cut Cross-Entropy compute ``logp`` (and maybe the
entropy) by their own means; the O(N) loss on top is fused-pg's own, through the public
:func:`fused_pg.policy_loss_from_logprobs`, so that every implementation computes *the
same loss* and only the LM-head part differs (the benchmark adds no copy of the loss math).
"""

from __future__ import annotations

from torch import Tensor

import fused_pg

from .config import LossSpec
from .problem import Problem


def loss_from_logprobs(problem: Problem, spec: LossSpec, logprobs: Tensor, entropy: Tensor | None) -> Tensor:
    """Scalar loss from differentiable per-token ``logprobs`` (and ``entropy``), any shape of N.

    ``entropy=None`` (an implementation that cannot compute it) is only valid for a spec with
    ``entropy_coef == 0``.
    """
    lead = problem.targets.shape
    if entropy is None and spec.entropy_coef != 0:
        raise ValueError("this implementation computes no entropy: entropy_coef must be 0")
    out = fused_pg.policy_loss_from_logprobs(
        logprobs.reshape(lead), problem.advantages, problem.old_logprobs, problem.mask,
        entropy=None if entropy is None else entropy.reshape(lead),
        ref_logprobs=problem.ref_logprobs, eps_low=spec.eps_low, eps_high=spec.eps_high,
        repo=spec.repo, repo_coef=spec.repo_coef, kl_coef=spec.kl_coef, kl_estimator="k3",
        entropy_coef=spec.entropy_coef, aggregation="token-mean", validate=False)
    return out.loss
