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
        return logprobs, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        # rows that do not count output constants: their upstream gradients must not flow back
        valid = targets >= 0
        g = torch.where(valid, grad_logprobs, 0.0)
        e = torch.where(valid, grad_entropy, 0.0)
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
