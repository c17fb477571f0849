"""REPO's batch statistics as a mergeable object, so micro-batches and ranks can share them.

REPO "decorrelate" uses ``zeta = gamma * Cov(A, logp) / Var(logp)`` and centred modes use
``mu = mean(logp)``, all over the tokens that count. Computed per micro-batch, these differ
from the statistics of the whole batch, so gradient accumulation and data parallelism would
not reproduce one big batch. :class:`RepoStats` holds the moments in a form that merges
exactly (Chan et al.'s pairwise update), so the whole batch's statistics can be computed
first and handed to every micro-batch's loss (``repo_loss(..., repo_stats=stats)``).

All moments are kept in float64 (they are O(1) numbers per batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import checks, comm


@dataclass(frozen=True)
class RepoStats:
    """Moments of ``(A, logp)`` over ``count`` tokens, 0-dim float64 tensors.

    count:          number of tokens that count
    mean_logprob:   mean of logp;      mean_advantage: mean of A
    m2_logprob:     sum (logp - mean_logprob)^2
    co_moment:      sum (A - mean_advantage) (logp - mean_logprob)
    """

    count: Tensor
    mean_logprob: Tensor
    mean_advantage: Tensor
    m2_logprob: Tensor
    co_moment: Tensor

    @property
    def var_logprob(self) -> Tensor:
        """Population variance of logp (0 for an empty batch)."""
        return self.m2_logprob / self.count.clamp_min(1.0)

    @property
    def cov_adv_logprob(self) -> Tensor:
        """Population covariance of A and logp (0 for an empty batch)."""
        return self.co_moment / self.count.clamp_min(1.0)

    @staticmethod
    def of(logprobs: Tensor, advantages: Tensor, valid: Tensor) -> "RepoStats":
        """Two-pass moments of flat [N] tensors over ``valid`` (values elsewhere are ignored)."""
        f64 = torch.float64
        m = valid.to(f64)
        lp = torch.where(valid, logprobs.detach().to(f64), 0.0)
        a = torch.where(valid, advantages.detach().to(f64), 0.0)
        count = m.sum()
        inv = 1.0 / count.clamp_min(1.0)
        mean_lp, mean_a = lp.sum() * inv, a.sum() * inv
        d_lp = (lp - mean_lp) * m
        return RepoStats(count, mean_lp, mean_a, (d_lp * d_lp).sum(), ((a - mean_a) * d_lp).sum())

    def merge(self, other: "RepoStats") -> "RepoStats":
        """Statistics of the union of the two token sets (exact up to rounding).

        n = n_a + n_b, d = mean_b - mean_a:  mean = mean_a + d n_b / n,
        M2 = M2_a + M2_b + d_lp^2 n_a n_b / n,  C = C_a + C_b + d_lp d_A n_a n_b / n.
        """
        n_a, n_b = self.count, other.count
        n = n_a + n_b
        inv = 1.0 / n.clamp_min(1.0)
        d_lp = other.mean_logprob - self.mean_logprob
        d_a = other.mean_advantage - self.mean_advantage
        cross = n_a * n_b * inv
        return RepoStats(
            count=n,
            mean_logprob=self.mean_logprob + d_lp * n_b * inv,
            mean_advantage=self.mean_advantage + d_a * n_b * inv,
            m2_logprob=self.m2_logprob + other.m2_logprob + d_lp * d_lp * cross,
            co_moment=self.co_moment + other.co_moment + d_lp * d_a * cross,
        )

    def __add__(self, other: "RepoStats") -> "RepoStats":
        return self.merge(other)

    def as_tensor(self) -> Tensor:
        """[5] float64: (count, mean_logprob, mean_advantage, m2_logprob, co_moment)."""
        return torch.stack([self.count, self.mean_logprob, self.mean_advantage, self.m2_logprob,
                            self.co_moment])

    @staticmethod
    def from_tensor(x: Tensor) -> "RepoStats":
        return RepoStats(*x.to(torch.float64).unbind(0))

    @staticmethod
    def merge_all(parts: "list[RepoStats]") -> "RepoStats":
        """Merge in list order (a fixed order gives bitwise reproducible results)."""
        if not parts:
            raise ValueError("merge_all needs at least one RepoStats")
        out = parts[0]
        for p in parts[1:]:
            out = out.merge(p)
        return out

    def to(self, device) -> "RepoStats":
        return RepoStats.from_tensor(self.as_tensor().to(device))

    def all_reduce(self, process_group) -> "RepoStats":
        """Statistics of the union of every rank's tokens in ``process_group`` (a data-parallel
        group), identical on every rank: one all-gather of the [5] float64 vectors, merged in rank
        order (Chan's pairwise update is not a sum, and a fixed order keeps the result bitwise
        reproducible)."""
        comm.check_group("process_group", process_group)
        parts = comm.all_gather(self.as_tensor(), process_group)
        return RepoStats.merge_all([RepoStats.from_tensor(p) for p in parts.unbind(0)])


def repo_statistics(logprobs: Tensor, advantages: Tensor, mask: Tensor | None = None, *,
                    cu_seqlens: Tensor | None = None, process_group=None) -> RepoStats:
    """REPO statistics of one (micro-)batch, to merge and pass as ``repo_stats=``.

    Args:
        logprobs:   [B, T] or packed [N] per-token log-probs of the *current* policy (detached
                    here). On the first update after a rollout they equal the behaviour
                    log-probs; later, compute them with :func:`fused_pg.fused_logprobs_entropy`
                    under ``torch.no_grad()``.
        advantages: the same shape, or one per sequence ([B], or [S] with ``cu_seqlens``).
        mask:       1/True for tokens that count (the same mask the loss gets; tokens whose
                    target is the loss's ``ignore_index`` must be masked out here too).
        process_group: a data-parallel group: the statistics of every rank's tokens together
                    (:meth:`RepoStats.all_reduce`), the same on every rank.

    Example (gradient accumulation over micro-batches that together form one batch)::

        stats = RepoStats.merge_all([repo_statistics(lp_i, adv_i, mask_i) for ...])
        for i in micro_batches:
            repo_loss(..., repo_stats=stats, num_items_in_batch=n_tokens_total).loss.backward()
    """
    checks.tensor("logprobs", logprobs, dims=(1, 2), floating=True)
    checks.tensor("advantages", advantages, floating=True, device=logprobs.device)
    lead = tuple(logprobs.shape)
    if tuple(advantages.shape) == lead:
        adv = advantages.reshape(-1)
    elif logprobs.dim() == 2 and tuple(advantages.shape) == (lead[0],):
        adv = advantages[:, None].expand(lead).reshape(-1)
    elif logprobs.dim() == 1 and cu_seqlens is not None and advantages.dim() == 1 \
            and advantages.numel() == cu_seqlens.numel() - 1:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        adv = torch.repeat_interleave(advantages, lengths, output_size=lead[0])
    else:
        raise ValueError(f"advantages must have shape {lead} (one per token) or one per sequence, "
                         f"got {tuple(advantages.shape)}")
    valid = torch.ones(lead, dtype=torch.bool, device=logprobs.device)
    if mask is not None:
        checks.tensor("mask", mask, device=logprobs.device)
        checks.shape("mask", mask, lead, "the shape of logprobs")
        valid = mask.bool()
    stats = RepoStats.of(logprobs.reshape(-1), adv, valid.reshape(-1))
    return stats if process_group is None else stats.all_reduce(process_group)
