"""The flat token batch the loss epilogue works on, and its sequence layout.

Callers pass ``[B, T]``-shaped tensors (one row per sequence) or packed ``[N]`` tensors with
``cu_seqlens``; both become flat ``[N]`` tensors plus a :class:`SeqLayout` that knows how to
reduce per sequence and broadcast back, without host synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import checks
from .config import LossConfig, _finite


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
    """Flat per-token inputs of the epilogue (all [N]; float tensors in fp32 or fp64)."""

    valid: Tensor                     # bool: mask & (targets != ignore_index)
    head_targets: Tensor              # int64: target id, -1 where not valid
    advantages: Tensor
    old_logprobs: Tensor
    ref_logprobs: Tensor | None
    rollout_logprobs: Tensor | None
    layout: SeqLayout | None          # None: packed without cu_seqlens (token-level only)
    num_items_in_batch: Tensor | float | None
    max_length: int | None            # Dr.GRPO's constant length (resolved)


def make_token_batch(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    advantages: Tensor,
    old_logprobs: Tensor,
    mask: Tensor | None,
    *,
    bias: Tensor | None,
    ref_logprobs: Tensor | None,
    rollout_logprobs: Tensor | None,
    cu_seqlens: Tensor | None,
    num_items_in_batch,
    ignore_index: int,
    cfg: LossConfig,
    validate: bool,
) -> TokenBatch:
    """Check the per-token arguments of :func:`fused_pg.repo_loss` and flatten them."""
    dev = hidden.device
    lead = tuple(hidden.shape[:-1])
    what = "the leading shape of hidden"
    N = targets.numel()
    # epilogue arithmetic: fp64 when the head runs in fp64 (gradcheck), else fp32
    edt = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32

    checks.tensor("advantages", advantages, floating=True, device=dev)
    checks.tensor("old_logprobs", old_logprobs, floating=True, device=dev)
    checks.shape("old_logprobs", old_logprobs, lead, what)
    optional = {"ref_logprobs": ref_logprobs, "rollout_logprobs": rollout_logprobs}
    for name, x in optional.items():
        if x is not None:
            checks.tensor(name, x, floating=True, device=dev)
            checks.shape(name, x, lead, what)
    if mask is not None:
        checks.tensor("mask", mask, device=dev)
        checks.shape("mask", mask, lead, what)
        if mask.dtype.is_complex:
            raise TypeError(f"mask must be bool, integer or float, got {mask.dtype}")

    # --- sequence layout -------------------------------------------------------------------
    layout = None
    if hidden.dim() == 3:
        if cu_seqlens is not None:
            raise ValueError("cu_seqlens is only for packed [N, D] hidden states; hidden is [B, T, D]")
        B, T = lead
        layout = SeqLayout(num_seqs=B, num_tokens=N, seq_len=T)
    elif cu_seqlens is not None:
        checks.tensor("cu_seqlens", cu_seqlens, dims=(1,), integer=True, device=dev)
        if cu_seqlens.numel() < 2:
            raise ValueError("cu_seqlens must hold at least two offsets [0, ..., N]")
        if validate:
            checks.cu_seqlens_values(cu_seqlens, N)
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        layout = SeqLayout(num_seqs=cu_seqlens.numel() - 1, num_tokens=N, lengths=lengths)
    elif cfg.needs_sequences:
        raise ValueError(
            f"cu_seqlens is required for packed [N, D] inputs with aggregation={cfg.aggregation!r}, "
            f"importance_level={cfg.importance_level!r}, tis_level={cfg.tis_level!r}")

    # --- advantages: per token, or per sequence -------------------------------------------
    if tuple(advantages.shape) == lead:
        adv = advantages.reshape(-1)
    elif layout is not None and tuple(advantages.shape) == (layout.num_seqs,):
        adv = layout.broadcast(advantages)  # checked below on the tokens that count
    else:
        per_seq = f" or ({layout.num_seqs},) (one per sequence)" if layout is not None else ""
        raise ValueError(f"advantages must have shape {lead} (one per token){per_seq}, "
                         f"got {tuple(advantages.shape)}")

    # --- hyper-parameters that depend on the inputs --------------------------------------
    if (ref_logprobs is None) and cfg.kl_coef > 0:
        raise ValueError("kl_coef > 0 needs ref_logprobs")
    if (cfg.tis_cap is None) != (rollout_logprobs is None):
        raise ValueError("tis_cap and rollout_logprobs go together: pass both or neither")
    max_length = cfg.max_length
    if cfg.aggregation == "seq-mean-token-sum-norm" and max_length is None:
        if hidden.dim() != 3:
            raise ValueError("aggregation='seq-mean-token-sum-norm' with packed inputs needs max_length")
        max_length = lead[1]
    if cfg.max_length is not None and cfg.aggregation != "seq-mean-token-sum-norm":
        raise ValueError("max_length is only used by aggregation='seq-mean-token-sum-norm'")
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            if num_items_in_batch.numel() != 1:
                raise ValueError("num_items_in_batch must be a scalar")
            if validate and not float(num_items_in_batch) > 0:
                raise ValueError("num_items_in_batch must be > 0")
            num_items_in_batch = num_items_in_batch.to(device=dev, dtype=edt).reshape(())
        else:
            num_items_in_batch = _finite("num_items_in_batch", num_items_in_batch, lo=0.0, lo_open=True)

    # --- validity and value checks -----------------------------------------------------------
    flat_targets = targets.reshape(-1)
    valid = flat_targets != ignore_index
    if mask is not None:
        flat_mask = mask.reshape(-1)
        if validate:
            checks.binary_mask(flat_mask)
        valid = valid & flat_mask.bool()
    if validate:
        checks.target_ids(flat_targets, valid, weight.shape[0], ignore_index, bias)
    # Padding positions may hold anything (NaN included): values are checked where valid
    # and replaced by 0 elsewhere, so nothing from a masked token can reach the loss.
    def flat(name: str, x: Tensor | None) -> Tensor | None:
        if x is None:
            return None
        x = x.reshape(-1)
        if validate:
            checks.finite(name, x[valid])
        return torch.where(valid, x.to(edt), 0.0)

    return TokenBatch(
        valid=valid,
        head_targets=torch.where(valid, flat_targets, -1).long(),
        advantages=flat("advantages", adv),
        old_logprobs=flat("old_logprobs", old_logprobs),
        ref_logprobs=flat("ref_logprobs", ref_logprobs),
        rollout_logprobs=flat("rollout_logprobs", rollout_logprobs),
        layout=layout,
        num_items_in_batch=num_items_in_batch,
        max_length=max_length,
    )
