"""The flat token batch the loss epilogue works on, and its sequence layout.

Callers pass ``[B, T]``-shaped tensors (one row per sequence) or packed ``[N]`` tensors with
``cu_seqlens``; both become flat ``[N]`` tensors plus a :class:`SeqLayout` that knows how to
reduce per sequence and broadcast back, without host synchronisation. This module owns every
check of the per-token arguments (shapes, dtypes, mask values, plausibility of log-probs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import checks
from .config import LossConfig
from .stats import RepoStats

# log-probabilities are <= 0; a little slack above 0 absorbs rounding in other frameworks,
# while probabilities passed by mistake (values in (0, 1]) are refused
LOGPROB_SLACK = 1e-2


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
    max_length: int | None            # Dr.GRPO's constant length (resolved)
    repo_stats: RepoStats | None      # whole-batch REPO statistics (None: this batch's own)
    weights: Tensor | None = None     # per-token weights of the policy term
    kl_num_items_in_batch: Tensor | float | None = None       # the KL term's own normaliser, if given
    entropy_num_items_in_batch: Tensor | float | None = None  # the entropy term's own normaliser, if given


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
        if mask.dtype.is_complex:
            raise TypeError(f"mask must be bool, integer or float, got {mask.dtype}")
    if repo_stats is not None and not isinstance(repo_stats, RepoStats):
        raise TypeError(f"repo_stats must be a RepoStats (see fused_pg.repo_statistics), "
                        f"got {type(repo_stats).__name__}")

    # --- sequence layout -------------------------------------------------------------------
    layout = None
    if len(lead) == 2:
        if cu_seqlens is not None:
            raise ValueError(f"cu_seqlens is only for packed inputs; {what} is [B, T] = {lead}")
        B, T = lead
        layout = SeqLayout(num_seqs=B, num_tokens=N, seq_len=T)
    elif cu_seqlens is not None:
        checks.tensor("cu_seqlens", cu_seqlens, dims=(1,), integer=True, device=device, like=like)
        if cu_seqlens.numel() < 2:
            raise ValueError("cu_seqlens must hold at least two offsets [0, ..., N]")
        if validate:
            checks.cu_seqlens_values(cu_seqlens, N)
        # sync-free guard for unchecked offsets: clamp into [0, N], keep them monotone and pin
        # the ends (first offset 0, last N), so the lengths are >= 0 and sum to N whatever the
        # values, and the broadcast can never index past the N tokens
        inner = torch.cummax(cu_seqlens[1:-1].long().clamp(0, N), dim=0).values
        zero = torch.zeros(1, dtype=torch.long, device=device)
        cu = torch.cat([zero, inner, zero + N])
        lengths = cu[1:] - cu[:-1]
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
        max_length = max(lead[1], 1)
    if cfg.max_length is not None and not uses_length:
        raise ValueError("max_length is only used by aggregation='seq-mean-token-sum-norm'")

    def normaliser(name: str, value):
        if value is None:
            return None
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise ValueError(f"{name} must be a scalar")
            if validate and not float(value) > 0:
                raise ValueError(f"{name} must be > 0")
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
                checks.logprob_values(name, counted_values, LOGPROB_SLACK)
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
