"""REPO's batch statistics as a mergeable object, so micro-batches and ranks can share them.

REPO "decorrelate" uses ``zeta = gamma * Cov(A, L) / Var(L)`` and the batch-centred modes use
``mu = mean(logp)``, all over the tokens that count (``L = logp``, or ``L = logp + H`` for the
per-state centre, whose moments are kept when the entropies are given). Computed per micro-batch, these differ
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
    """Moments of ``(A, logp)`` (and of ``(A, logp + H)``) over ``count`` tokens, 0-dim float64 tensors.

    count:          number of tokens that count
    mean_logprob:   mean of logp;      mean_advantage: mean of A
    m2_logprob:     sum (logp - mean_logprob)^2
    co_moment:      sum (A - mean_advantage) (logp - mean_logprob)
    mean_state, m2_state, co_moment_state: the same moments of ``s = logp + H`` (the log-prob
                    centred per state, ``repo_center="state"``); None when the statistics were
                    computed without entropies (:attr:`has_state` is then False)
    """

    count: Tensor
    mean_logprob: Tensor
    mean_advantage: Tensor
    m2_logprob: Tensor
    co_moment: Tensor
    mean_state: Tensor | None = None
    m2_state: Tensor | None = None
    co_moment_state: Tensor | None = None

    def __post_init__(self):
        given = [x is not None for x in (self.mean_state, self.m2_state, self.co_moment_state)]
        if any(given) and not all(given):
            raise ValueError("RepoStats: mean_state, m2_state and co_moment_state go together (all or none)")

    @property
    def has_state(self) -> bool:
        """Whether the moments of ``logp + H`` are present (the statistics saw the entropies)."""
        return self.mean_state is not None

    @property
    def var_logprob(self) -> Tensor:
        """Population variance of logp (0 for an empty batch)."""
        return self.m2_logprob / self.count.clamp_min(1.0)

    @property
    def cov_adv_logprob(self) -> Tensor:
        """Population covariance of A and logp (0 for an empty batch)."""
        return self.co_moment / self.count.clamp_min(1.0)

    @property
    def var_state(self) -> Tensor | None:
        """Population variance of ``logp + H`` (None without the entropy moments)."""
        return None if self.m2_state is None else self.m2_state / self.count.clamp_min(1.0)

    @property
    def cov_adv_state(self) -> Tensor | None:
        """Population covariance of A and ``logp + H`` (None without the entropy moments)."""
        return None if self.co_moment_state is None else self.co_moment_state / self.count.clamp_min(1.0)

    @staticmethod
    def of(logprobs: Tensor, advantages: Tensor, valid: Tensor, entropy: Tensor | None = None) -> "RepoStats":
        """Two-pass moments of flat [N] tensors over ``valid`` (values elsewhere are ignored);
        with ``entropy`` ([N]) also those of ``logp + H``."""
        f64 = torch.float64
        m = valid.to(f64)
        lp = torch.where(valid, logprobs.detach().to(f64), 0.0)
        a = torch.where(valid, advantages.detach().to(f64), 0.0)
        count = m.sum()
        inv = 1.0 / count.clamp_min(1.0)
        mean_a = a.sum() * inv
        d_a = (a - mean_a) * m

        def moments(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            mean = x.sum() * inv
            d = (x - mean) * m
            return mean, (d * d).sum(), (d_a * d).sum()

        mean_lp, m2_lp, c_lp = moments(lp)
        state = (None, None, None)
        if entropy is not None:
            state = moments(lp + torch.where(valid, entropy.detach().to(f64), 0.0))
        return RepoStats(count, mean_lp, mean_a, m2_lp, c_lp, *state)

    def merge(self, other: "RepoStats") -> "RepoStats":
        """Statistics of the union of the two token sets (exact up to rounding).

        n = n_a + n_b, d = mean_b - mean_a:  mean = mean_a + d n_b / n,
        M2 = M2_a + M2_b + d_lp^2 n_a n_b / n,  C = C_a + C_b + d_lp d_A n_a n_b / n
        (the same for the moments of ``logp + H``, which both or neither must hold).
        """
        if self.has_state != other.has_state:
            raise ValueError("cannot merge REPO statistics computed with entropies and without: pass entropy= "
                             "to repo_statistics for every micro-batch, or for none")
        n_a, n_b = self.count, other.count
        n = n_a + n_b
        inv = 1.0 / n.clamp_min(1.0)
        d_a = other.mean_advantage - self.mean_advantage
        cross = n_a * n_b * inv

        def merged(mean_a: Tensor, m2_a: Tensor, c_a: Tensor, mean_b: Tensor, m2_b: Tensor, c_b: Tensor):
            d = mean_b - mean_a
            return mean_a + d * n_b * inv, m2_a + m2_b + d * d * cross, c_a + c_b + d * d_a * cross

        mean_lp, m2_lp, c_lp = merged(self.mean_logprob, self.m2_logprob, self.co_moment,
                                      other.mean_logprob, other.m2_logprob, other.co_moment)
        state = (None, None, None)
        if self.has_state:
            state = merged(self.mean_state, self.m2_state, self.co_moment_state,
                           other.mean_state, other.m2_state, other.co_moment_state)
        return RepoStats(n, mean_lp, self.mean_advantage + d_a * n_b * inv, m2_lp, c_lp, *state)

    def __add__(self, other: "RepoStats") -> "RepoStats":
        return self.merge(other)

    def as_tensor(self) -> Tensor:
        """[5] float64: (count, mean_logprob, mean_advantage, m2_logprob, co_moment), then
        (mean_state, m2_state, co_moment_state) when present ([8])."""
        parts = [self.count, self.mean_logprob, self.mean_advantage, self.m2_logprob, self.co_moment]
        if self.has_state:
            parts += [self.mean_state, self.m2_state, self.co_moment_state]
        return torch.stack(parts)

    @staticmethod
    def from_tensor(x: Tensor) -> "RepoStats":
        """The inverse of :meth:`as_tensor` ([5] or [8] values)."""
        if x.dim() != 1 or x.numel() not in (5, 8):
            raise ValueError(f"a RepoStats tensor holds 5 or 8 values, got shape {tuple(x.shape)}")
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
        group), identical on every rank: one all-gather of the [5] (or [8]) float64 vectors, merged in
        rank order (Chan's pairwise update is not a sum, and a fixed order keeps the result bitwise
        reproducible). Every rank must hold the same kind (with or without the entropy moments)."""
        comm.check_group("process_group", process_group)
        parts = comm.all_gather(self.as_tensor(), process_group)
        return RepoStats.merge_all([RepoStats.from_tensor(p) for p in parts.unbind(0)])


def repo_statistics(logprobs: Tensor, advantages: Tensor, mask: Tensor | None = None, *,
                    entropy: Tensor | None = None, cu_seqlens: Tensor | None = None,
                    process_group=None) -> RepoStats:
    """REPO statistics of one (micro-)batch, to merge and pass as ``repo_stats=``.

    Args:
        logprobs:   [B, T] or packed [N] per-token log-probs of the *current* policy (detached
                    here). On the first update after a rollout they equal the behaviour
                    log-probs; later, compute them with :func:`fused_pg.fused_logprobs_entropy`
                    under ``torch.no_grad()``.
        advantages: the same shape, or one per sequence ([B], or [S] with ``cu_seqlens``).
        mask:       1/True for tokens that count (the same mask the loss gets; tokens whose
                    target is the loss's ``ignore_index`` must be masked out here too).
        entropy:    the per-token entropies of the same policy (the second output of
                    :func:`fused_pg.fused_logprobs_entropy`), the shape of ``logprobs``: the
                    statistics then also hold the moments of ``logp + H``, which
                    ``repo="decorrelate"`` with ``repo_center="state"`` needs.
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
    if entropy is not None:
        checks.tensor("entropy", entropy, floating=True, device=logprobs.device, like="logprobs")
        checks.shape("entropy", entropy, lead, "the shape of logprobs")
        entropy = entropy.reshape(-1)
    stats = RepoStats.of(logprobs.reshape(-1), adv, valid.reshape(-1), entropy)
    return stats if process_group is None else stats.all_reduce(process_group)
