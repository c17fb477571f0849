"""Max error of each implementation against the fp64 reference, on one small shape.

The inputs are those of a normal benchmark batch, in the benchmark dtype and on the
benchmark device; the oracle (:func:`fused_pg.reference.repo_loss_ref`) runs on the *same
rounded values* in float64 on the CPU, with autograd for the gradients. Reported per
implementation, for the loss it actually computes (see :meth:`bench.impls.Impl.effective_loss`):

* ``loss_abs``:              ``|L - L_ref|``
* ``logprobs_max_abs``:      ``max_t |logp_t - logp_ref_t|`` over valid tokens (if exposed)
* ``entropy_max_abs``:       same for the entropy (if exposed)
* ``grad_hidden_max_rel``:   ``max |dh - dh_ref| / max |dh_ref|``
* ``grad_weight_max_rel``:   same for ``dW``
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fused_pg.reference import repo_loss_ref

from .config import LossSpec, Shape
from .impls import Impl
from .problem import Problem, make_problem

# odd V: not a multiple of any tile size, exercises the masked tails
ACCURACY_SHAPE = Shape(n=256, d=64, v=1531)
ACCURACY_SEQ_LEN = 64


@dataclass(frozen=True)
class RefOutputs:
    loss: float
    logprobs: Tensor      # [B, T] fp64, CPU
    entropy: Tensor
    grad_hidden: Tensor   # [B, T, D]
    grad_weight: Tensor   # [V, D]


def reference_outputs(problem: Problem, spec: LossSpec) -> RefOutputs:
    """fp64 oracle on the problem's (rounded) inputs, on the CPU."""
    cpu = lambda t: None if t is None else t.detach().cpu()  # noqa: E731
    h = problem.hidden.detach().cpu().double().requires_grad_(True)
    w = problem.weight.detach().cpu().double().requires_grad_(True)
    out = repo_loss_ref(
        h, w, cpu(problem.targets), cpu(problem.advantages), cpu(problem.old_logprobs), cpu(problem.mask),
        ref_logprobs=cpu(problem.ref_logprobs), eps_low=spec.eps_low, eps_high=spec.eps_high,
        repo=spec.repo, repo_coef=spec.repo_coef, kl_coef=spec.kl_coef, kl_estimator="k3",
        entropy_coef=spec.entropy_coef, aggregation="token-mean", dtype=torch.float64)
    gh, gw = torch.autograd.grad(out.loss, [h, w])
    return RefOutputs(float(out.loss.detach()), out.logprobs.detach(), out.entropy.detach(), gh, gw)


def _max_rel(got: Tensor, ref: Tensor) -> float:
    return float((got.detach().cpu().double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _max_abs_valid(got: Tensor | None, ref: Tensor, valid: Tensor) -> float | None:
    if got is None:
        return None
    diff = (got.detach().cpu().double().reshape(ref.shape) - ref).abs()
    return float(diff[valid].max())


def impl_errors(impl: Impl, problem: Problem, spec: LossSpec, ref: RefOutputs) -> dict:
    """Errors of one implementation (``spec`` is already its effective loss)."""
    out = impl.make(problem, spec)()
    gh, gw = torch.autograd.grad(out.loss, problem.grad_inputs())
    valid = problem.mask.cpu()
    return {
        "loss_abs": abs(float(out.loss.detach()) - ref.loss),
        "logprobs_max_abs": _max_abs_valid(out.logprobs, ref.logprobs, valid),
        "entropy_max_abs": _max_abs_valid(out.entropy, ref.entropy, valid),
        "grad_hidden_max_rel": _max_rel(gh, ref.grad_hidden),
        "grad_weight_max_rel": _max_rel(gw, ref.grad_weight),
    }


def accuracy_problem(dtype: torch.dtype, device: torch.device, spec: LossSpec, seed: int) -> Problem:
    return make_problem(ACCURACY_SHAPE, dtype, device, spec, seq_len=ACCURACY_SEQ_LEN, seed=seed + 1)
