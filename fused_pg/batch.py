"""The flat token batch the loss epilogue works on, and its sequence layout.

Callers pass ``[B, T]``-shaped tensors (one row per sequence) or packed ``[N]`` tensors with
``cu_seqlens``; both become flat ``[N]`` tensors plus a :class:`SeqLayout` that knows how to
reduce per sequence and broadcast back, without host synchronisation. This module owns every
check of the per-token arguments (shapes, dtypes, mask values, plausibility of log-probs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from . import checks
from .config import LossConfig
from .stats import RepoStats


@dataclass(frozen=True)
class SeqLayout:
    """How ``num_tokens`` flat tokens split into ``num_seqs`` sequences.

    Dense layout (``seq_len`` set): sequence ``i`` is tokens ``[i*T, (i+1)*T)``.
    Packed layout (``lengths`` set): consecutive runs of ``lengths[i]`` tokens.
    """

    num_seqs: int
    num_tokens: int
    seq_len: int | None = None
    lengths: Tensor | None = None

    def seq_sum(self, x: Tensor) -> Tensor:
        """[N] -> [S]: sum of each sequence's tokens (deterministic, no atomics)."""
        if self.seq_len is not None:
            return x.view(self.num_seqs, self.seq_len).sum(-1)
        return torch.segment_reduce(x, "sum", lengths=self.lengths, unsafe=True)

    def broadcast(self, x: Tensor) -> Tensor:
        """[S] -> [N]: each sequence's value repeated over its tokens."""
        if self.seq_len is not None:
            return x[:, None].expand(self.num_seqs, self.seq_len).reshape(-1)
        return torch.repeat_interleave(x, self.lengths, output_size=self.num_tokens)


@dataclass(frozen=True)
class TokenBatch:
    """Flat per-token inputs of the epilogue (all [N]; float tensors in fp32 or fp64, detached,
    0 where not valid)."""

    valid: Tensor                     # bool: the token counts
    advantages: Tensor
    old_logprobs: Tensor | None       # None: on-policy (the ratio is 1 with the gradient of logp)
    ref_logprobs: Tensor | None
    rollout_logprobs: Tensor | None
    layout: SeqLayout | None          # None: packed without cu_seqlens (token-level only)
    num_items_in_batch: Tensor | float | None
    max_length: int | Tensor | None   # Dr.GRPO's constant length (resolved; the group's under data parallelism)
    repo_stats: RepoStats | None      # whole-batch REPO statistics (None: this batch's own)
    weights: Tensor | None = None     # per-token weights of the policy term
    kl_num_items_in_batch: Tensor | float | None = None       # the KL term's own normaliser, if given
    entropy_num_items_in_batch: Tensor | float | None = None  # the entropy term's own normaliser, if given

    def restrict(self, valid: Tensor) -> "TokenBatch":
        """The batch with fewer tokens that count (``valid`` implies ``self.valid``): the
        per-token values of the others become 0, as for any token that does not count."""
        def zero(x):
            return None if x is None else torch.where(valid, x, 0.0)

        return replace(self, valid=valid, advantages=zero(self.advantages), old_logprobs=zero(self.old_logprobs),
                       ref_logprobs=zero(self.ref_logprobs), rollout_logprobs=zero(self.rollout_logprobs),
                       weights=zero(self.weights))


def check_repo_stats(stats: RepoStats) -> None:
    """The values of a ``repo_stats`` argument (``validate``): every moment finite, a count and
    a sum of squares that are not negative, a mean log-probability that is one (<= 0)."""
    for f in fields(stats):
        if getattr(stats, f.name) is not None:  # (the moments of logp + H are optional)
            checks.finite(f"repo_stats.{f.name}", torch.as_tensor(getattr(stats, f.name)))
    for name in ("count", "m2_logprob", "m2_state"):
        if getattr(stats, name) is None:
            continue
        value = float(getattr(stats, name))
        if value < 0:
            raise ValueError(f"repo_stats.{name} must be >= 0, got {value:.6g}")
    checks.logprob_values("repo_stats.mean_logprob", torch.as_tensor(stats.mean_logprob).reshape(1))


def make_token_batch(
    lead: tuple[int, ...],
    device: torch.device,
    dtype: torch.dtype,
    *,
    counted: Tensor | None,
    advantages: Tensor,
    old_logprobs: Tensor | None,
    mask: Tensor | None,
    ref_logprobs: Tensor | None,
    rollout_logprobs: Tensor | None,
    cu_seqlens: Tensor | None,
    num_items_in_batch,
    repo_stats: RepoStats | None,
    cfg: LossConfig,
    validate: bool,
    what: str,
    like: str = "hidden",
    weights: Tensor | None = None,
    kl_num_items_in_batch=None,
    entropy_num_items_in_batch=None,
) -> TokenBatch:
    """Check the per-token arguments of the loss functions and flatten them.

    lead:    the leading shape all per-token tensors share ([B, T] dense, [N] packed).
    counted: flat [N] bool, tokens eligible before the mask (e.g. target != ignore_index),
             or None (all).
    dtype:   epilogue arithmetic dtype (fp64 when the head runs in fp64, else fp32).
    what:    how error messages name ``lead`` ("the leading shape of hidden", ...).
    like:    the argument whose device every tensor must share ("hidden", "logprobs").
    """
    N = 1
    for s in lead:
        N *= s
    checks.tensor("advantages", advantages, floating=True, device=device, like=like)
    if old_logprobs is not None:
        checks.tensor("old_logprobs", old_logprobs, floating=True, device=device, like=like)
        checks.shape("old_logprobs", old_logprobs, lead, what)
    optional = {"ref_logprobs": ref_logprobs, "rollout_logprobs": rollout_logprobs}
    for name, x in optional.items():
        if x is not None:
            checks.tensor(name, x, floating=True, device=device, like=like)
            checks.shape(name, x, lead, what)
    if mask is not None:
        checks.tensor("mask", mask, device=device, like=like)
        checks.shape("mask", mask, lead, what)
        checks.mask_dtype(mask)
    if repo_stats is not None and not isinstance(repo_stats, RepoStats):
        raise TypeError(f"repo_stats must be a RepoStats (see fused_pg.repo_statistics), "
                        f"got {type(repo_stats).__name__}")
    if repo_stats is not None and validate:
        check_repo_stats(repo_stats)

    # --- sequence layout -------------------------------------------------------------------
    layout = None
    if len(lead) == 2:
        if cu_seqlens is not None:
            raise ValueError(f"cu_seqlens is only for packed inputs; {what} is [B, T] = {lead}")
        B, T = lead
        layout = SeqLayout(num_seqs=B, num_tokens=N, seq_len=T)
    elif cu_seqlens is not None:
        checks.tensor("cu_seqlens", cu_seqlens, dims=(1,), integer=True, device=device, like=like)
        lengths = checks.sequence_lengths(cu_seqlens, N, validate)
        layout = SeqLayout(num_seqs=cu_seqlens.numel() - 1, num_tokens=N, lengths=lengths)
    elif cfg.needs_sequences:
        raise ValueError(
            f"cu_seqlens is required for packed [N] inputs with aggregation={cfg.aggregation!r}, "
            f"kl_aggregation={cfg.kl_mode!r}, entropy_aggregation={cfg.entropy_mode!r}, "
            f"importance_level={cfg.importance_level!r}, tis_level={cfg.tis_level!r}")

    # --- advantages and weights: per token, or per sequence --------------------------------
    def per_token(name: str, x: Tensor) -> Tensor:
        if tuple(x.shape) == lead:
            return x.reshape(-1)
        if layout is not None and tuple(x.shape) == (layout.num_seqs,):
            return layout.broadcast(x)  # checked below on the tokens that count
        per_seq = f" or ({layout.num_seqs},) (one per sequence)" if layout is not None else ""
        raise ValueError(f"{name} must have shape {lead} (one per token){per_seq}, got {tuple(x.shape)}")

    adv = per_token("advantages", advantages)
    if weights is not None:
        checks.tensor("weights", weights, floating=True, device=device, like=like)
        weights = per_token("weights", weights)

    # --- hyper-parameters that depend on the inputs --------------------------------------
    if (ref_logprobs is None) and cfg.kl_coef > 0:
        raise ValueError("kl_coef > 0 needs ref_logprobs")
    if cfg.tis_cap is not None and rollout_logprobs is None:  # (without tis_cap they are only monitored)
        raise ValueError("tis_cap needs rollout_logprobs (the inference engine's log-probs)")
    max_length = cfg.max_length
    uses_length = "seq-mean-token-sum-norm" in cfg.modes
    if uses_length and max_length is None:
        if len(lead) != 2:
            raise ValueError("aggregation='seq-mean-token-sum-norm' with packed inputs needs max_length")
        # A given normaliser means this batch is part of a larger one (gradient accumulation,
        # or a normaliser summed over ranks): the divisor's length must then be the larger
        # batch's too, which this batch's T (the default) is not when parts are padded to
        # different lengths. (Data-parallel ranks without a given normaliser agree on theirs.)
        def term_items(own, own_aggregation):  # as the epilogue picks each term's normaliser
            return own if own is not None else (num_items_in_batch if own_aggregation is None else None)

        terms = ((cfg.aggregation, "num_items_in_batch", num_items_in_batch),
                 (cfg.kl_mode, "kl_num_items_in_batch", term_items(kl_num_items_in_batch, cfg.kl_aggregation)),
                 (cfg.entropy_mode, "entropy_num_items_in_batch",
                  term_items(entropy_num_items_in_batch, cfg.entropy_aggregation)))
        for mode, name, value in terms:
            if mode == "seq-mean-token-sum-norm" and value is not None:
                raise ValueError(
                    f"{name} with aggregation 'seq-mean-token-sum-norm' (Dr.GRPO) needs max_length=: "
                    "the divisor num_seqs * max_length must use the whole batch's length, and the "
                    f"default, this batch's T = {lead[1]}, differs between micro-batches (or ranks) "
                    "padded to different lengths")
        max_length = max(lead[1], 1)
    if cfg.max_length is not None and not uses_length:
        raise ValueError("max_length is only used by aggregation='seq-mean-token-sum-norm'")

    def normaliser(name: str, value):
        if value is None:
            return None
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise ValueError(f"{name} must be a scalar")
            if validate and not (math.isfinite(float(value)) and float(value) > 0):
                raise ValueError(f"{name} must be finite and > 0, got {float(value)}")
            return value.detach().to(device=device, dtype=dtype).reshape(())
        return checks.real(name, value, lo=0.0, lo_open=True)

    num_items_in_batch = normaliser("num_items_in_batch", num_items_in_batch)
    kl_num_items_in_batch = normaliser("kl_num_items_in_batch", kl_num_items_in_batch)
    entropy_num_items_in_batch = normaliser("entropy_num_items_in_batch", entropy_num_items_in_batch)

    # --- validity and value checks -----------------------------------------------------------
    valid = torch.ones(N, dtype=torch.bool, device=device) if counted is None else counted.reshape(-1)
    if mask is not None:
        flat_mask = mask.reshape(-1)
        if validate:
            checks.binary_mask(flat_mask)
        valid = valid & flat_mask.bool()

    # Padding positions may hold anything (NaN included): values are checked where valid and
    # replaced by 0 elsewhere, so nothing from a masked token can reach the loss. Behaviour,
    # reference and rollout log-probs are constants by definition: detached here.
    def flat(name: str, x: Tensor | None, logprob: bool = False) -> Tensor | None:
        if x is None:
            return None
        x = x.detach().reshape(-1)
        if validate:
            counted_values = x[valid]
            checks.finite(name, counted_values)
            if logprob:
                checks.logprob_values(name, counted_values)
        return torch.where(valid, x.to(dtype), 0.0)

    return TokenBatch(
        valid=valid,
        advantages=flat("advantages", adv),
        old_logprobs=flat("old_logprobs", old_logprobs, logprob=True),
        ref_logprobs=flat("ref_logprobs", ref_logprobs, logprob=True),
        rollout_logprobs=flat("rollout_logprobs", rollout_logprobs, logprob=True),
        layout=layout,
        num_items_in_batch=num_items_in_batch,
        max_length=max_length,
        repo_stats=None if repo_stats is None else repo_stats.to(device),
        weights=flat("weights", weights),
        kl_num_items_in_batch=kl_num_items_in_batch,
        entropy_num_items_in_batch=entropy_num_items_in_batch,
    )
