"""``backend="reference"``: full ``[N, V]`` logits and autograd, in fp32 or fp64.

It is the naive baseline (what a trainer does without a fused head) and a second, independent
check of the hand-written backward sweeps: its gradients come from autograd. Memory grows
with ``N x V``: use it for tests and small problems only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import HeadConfig
from .torch_chunked import _compute_dtype, _logits


def logprobs_entropy(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                     cfg: HeadConfig) -> tuple[Tensor, Tensor]:
    """(logprobs, entropy), [N] each, differentiable; 0 where ``targets < 0``."""
    cdt = _compute_dtype(hidden, weight)
    z = _logits(hidden.to(cdt), weight.to(cdt), bias.to(cdt) if bias is not None else None, cfg)
    log_p = torch.log_softmax(z, dim=-1)
    p = log_p.exp()
    entropy = -(p * torch.where(p > 0, log_p, 0.0)).sum(-1)
    valid = targets >= 0
    logprobs = log_p.gather(1, torch.where(valid, targets, 0)[:, None]).squeeze(1)
    return torch.where(valid, logprobs, 0.0), torch.where(valid, entropy, 0.0)
