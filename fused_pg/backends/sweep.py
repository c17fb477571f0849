"""The one ``torch.autograd.Function`` of the vocabulary sweeps, for every sweep backend and
every vocabulary layout.

Forward: the backend's ``forward_sweep`` (online log-sum-exp, entropy, target logit), then the
``hooks``' ``merge_forward`` (the identity for one process; the merge of the shards' statistics
for a vocabulary split over ranks). Backward: the backend's ``backward_sweep`` (logits
recomputed tile by tile) with the saved, merged ``lse`` and ``entropy``, then the hooks'
``reduce_d_hidden`` (nothing, or the sum of ``d_hidden`` over the ranks). Between the two,
autograd runs whatever the caller does with the outputs, e.g. the policy-loss epilogue.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..config import HeadConfig


class LocalHooks:
    """The hooks of a head that holds the whole vocabulary: nothing to merge, nothing to reduce."""

    def merge_forward(self, logprobs: Tensor, entropy: Tensor, lse: Tensor, targets: Tensor,
                      vocab_rows: int) -> tuple[Tensor, Tensor, Tensor]:
        return logprobs, entropy, lse

    def reduce_d_hidden(self, d_hidden: Tensor) -> None:
        pass


LOCAL_HOOKS = LocalHooks()


def upstream_grads(targets: Tensor, lse: Tensor, grad_logprobs: Tensor | None,
                   grad_entropy: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """(g, e) for a backward sweep, 0 at rows that do not count (their outputs are constants).

    A None upstream gradient (the ``Function`` does not materialise them) means that output
    reaches no loss: g is then 0, and e stays None, which tells the sweep to skip the entropy
    term ``e p (log p + H)`` of every logit instead of multiplying it by 0.
    """
    valid = targets >= 0
    g = torch.where(valid, grad_logprobs, 0.0) if grad_logprobs is not None else torch.zeros_like(lse)
    e = torch.where(valid, grad_entropy, 0.0) if grad_entropy is not None else None
    return g, e


class Sweep(torch.autograd.Function):
    """(hidden [N, D], weight [V, D], bias [V] | None, targets [N] int64) -> (logprobs, entropy) [N].

    ``targets``: -1 for rows that do not count (outputs 0, no gradient), ``>= V`` for rows whose
    target lives in another rank's slice of the vocabulary. Saves the inputs plus the merged
    ``lse`` and ``entropy`` ([N] each): O(N) memory beyond the inputs. Both sweeps run with
    autocast disabled, on the inputs' own dtypes, so forward and backward see the same logits
    whatever autocast region the caller is in.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, sweeps: ModuleType, cfg: HeadConfig, hooks):
        with torch.autocast(hidden.device.type, enabled=False):
            logprobs, entropy, lse = sweeps.forward_sweep(hidden, weight, bias, targets, cfg)
            logprobs, entropy, lse = hooks.merge_forward(logprobs, entropy, lse, targets, weight.shape[0])
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.sweeps, ctx.cfg, ctx.hooks = sweeps, cfg, hooks
        # an output that gets no gradient (the entropy, when only logged) arrives as None,
        # not as zeros: the backward sweep then skips its term (see upstream_grads)
        ctx.set_materialize_grads(False)
        return logprobs, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        g, e = upstream_grads(targets, lse, grad_logprobs, grad_entropy)
        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
        need_db = need_db and bias is not None
        with torch.autocast(hidden.device.type, enabled=False):
            d_hidden, d_weight, d_bias = ctx.sweeps.backward_sweep(
                hidden, weight, bias, targets, lse, entropy, g, e, ctx.cfg, needs=(need_dh, need_dw, need_db))
        if need_dh:
            ctx.hooks.reduce_d_hidden(d_hidden)
        return (
            d_hidden.to(hidden.dtype) if need_dh else None,
            d_weight.to(weight.dtype) if need_dw else None,
            d_bias.to(bias.dtype) if need_db else None,
            None, None, None, None,
        )
