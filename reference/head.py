"""Materialised LM-head oracle: full logits, ``log_softmax``, exact entropy."""

from __future__ import annotations

import torch
from torch import Tensor


def logits_ref(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """``z = (hidden @ weight.T + bias) / temperature``, then ``softcap * tanh(z / softcap)``.

    A ``-inf`` bias entry excludes its token: its logit stays ``-inf`` through the soft-cap.

    hidden [..., D], weight [V, D], bias [V] -> logits [..., V] in ``dtype``
    (default: the promoted dtype of hidden and weight).
    """
    if dtype is None:
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
    z = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        z = z + bias.to(dtype)
    z = z / temperature
    if softcap is not None:
        z = torch.where(torch.isneginf(z), z, softcap * torch.tanh(z / softcap))
    return z


def logprobs_entropy_ref(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Log-probability of ``targets`` and entropy of the next-token distribution.

    Returns ``(logprobs, entropy)`` with the shape of ``targets``; both are 0 where
    ``targets == ignore_index``. Differentiable w.r.t. hidden, weight and bias.
    """
    z = logits_ref(hidden, weight, bias, temperature=temperature, softcap=softcap, dtype=dtype)
    logp_all = torch.log_softmax(z, dim=-1)
    p = logp_all.exp()
    # H = -sum_v p_v log p_v, with 0 * log 0 = 0 (a -inf logit contributes nothing)
    entropy = -(p * torch.where(p > 0, logp_all, 0.0)).sum(-1)

    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, 0)
    logprobs = logp_all.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, logprobs, 0.0), torch.where(valid, entropy, 0.0)
