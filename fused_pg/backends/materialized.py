"""``backend="reference"``: full ``[N, V]`` logits and autograd, in fp32 or fp64.

It is the naive baseline (what a trainer does without a fused head) and a second, independent
check of the hand-written backward sweeps: its gradients come from autograd. Memory grows
with ``N x V``: use it for tests and small problems only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import HeadConfig
from .common import compute_dtype, logits


def _materialised(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                  cfg: HeadConfig) -> tuple[Tensor, Tensor]:
    cdt = compute_dtype(hidden, weight)
    z = logits(hidden.to(cdt), weight.to(cdt), bias.to(cdt) if bias is not None else None, cfg)
    log_p = torch.log_softmax(z, dim=-1)
    p = log_p.exp()
    entropy = -(p * torch.where(p > 0, log_p, 0.0)).sum(-1)
    valid = targets >= 0
    logprobs = log_p.gather(1, torch.where(valid, targets, 0)[:, None]).squeeze(1)
    return torch.where(valid, logprobs, 0.0), torch.where(valid, entropy, 0.0)


class _WithoutAutocast(torch.autograd.Function):
    """Runs the materialised head and its autograd backward with autocast disabled.

    Autocast also applies to the backward ops of a graph (a backward inside an autocast region
    recomputes ``dL/dh = dz @ W`` in bf16): the graph is built and differentiated here, in the
    inputs' own dtypes, wherever the caller's autocast regions are. An output without an
    upstream gradient (the entropy, when it is only logged) is left out of the backward: its
    part of the graph is not differentiated at all.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, cfg):
        leaves = [x.detach().requires_grad_(x.requires_grad) if x is not None else None
                  for x in (hidden, weight, bias)]
        with torch.enable_grad(), torch.autocast(hidden.device.type, enabled=False):
            outputs = _materialised(*leaves, targets, cfg)
        ctx.leaves, ctx.outputs = leaves, outputs
        ctx.set_materialize_grads(False)
        return tuple(o.detach() for o in outputs)

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        wanted = [x for x in ctx.leaves if x is not None and x.requires_grad]
        flowing = [(o, g) for o, g in zip(ctx.outputs, (grad_logprobs, grad_entropy)) if g is not None]
        grads = iter(())
        if wanted and flowing:
            with torch.autocast(flowing[0][1].device.type, enabled=False):
                # retain_graph: the outer graph may be differentiated again (gradcheck does)
                grads = iter(torch.autograd.grad([o for o, _ in flowing], wanted, [g for _, g in flowing],
                                                 allow_unused=True, retain_graph=True))
        out = [next(grads, None) if x is not None and x.requires_grad else None for x in ctx.leaves]
        return (*out, None, None)


def logprobs_entropy(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                     cfg: HeadConfig) -> tuple[Tensor, Tensor]:
    """(logprobs, entropy), [N] each, differentiable; 0 where ``targets < 0``.

    Runs with autocast disabled, forward and backward (on the inputs' own dtypes, upcast to
    the compute dtype).
    """
    if not torch.is_grad_enabled() or not any(x is not None and x.requires_grad for x in (hidden, weight, bias)):
        with torch.autocast(hidden.device.type, enabled=False):
            return _materialised(hidden, weight, bias, targets, cfg)
    return _WithoutAutocast.apply(hidden, weight, bias, targets, cfg)
