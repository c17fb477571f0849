"""The LM-head building block: per-token log-probability and entropy, fused.

One ``torch.autograd.Function`` serves every sweep backend: its forward calls the backend's
``forward_sweep`` (online log-sum-exp, entropy, target logit) and its backward the backend's
``backward_sweep`` (logits recomputed tile by tile). Between them, autograd runs whatever
the caller does with the two outputs, e.g. the policy-loss epilogue.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import checks
from .config import BACKENDS, HeadConfig, _choice


class FusedHead(torch.autograd.Function):
    """(hidden [N, D], weight [V, D], bias [V] | None, targets [N]) -> (logprobs, entropy).

    Saves the inputs plus ``lse`` and ``entropy`` ([N] each) for backward: O(N) extra memory.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, sweeps: ModuleType, cfg: HeadConfig):
        logprobs, entropy, lse = sweeps.forward_sweep(hidden, weight, bias, targets, cfg)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.sweeps, ctx.cfg = sweeps, cfg
        return logprobs, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        # ignored tokens output constants: their upstream gradients must not flow back
        valid = targets >= 0
        g = torch.where(valid, grad_logprobs, 0.0)
        e = torch.where(valid, grad_entropy, 0.0)
        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
        d_hidden, d_weight, d_bias = ctx.sweeps.backward_sweep(
            hidden, weight, bias, targets, lse, entropy, g, e, ctx.cfg,
            needs=(need_dh, need_dw, need_db and bias is not None))
        return (
            d_hidden.to(hidden.dtype) if need_dh else None,
            d_weight.to(weight.dtype) if need_dw else None,
            d_bias.to(bias.dtype) if need_db and bias is not None else None,
            None, None, None,
        )


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, device: torch.device) -> str:
    _choice("backend", backend, BACKENDS)
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and not interpreting():
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run the "
                         "kernels on CPU, for tests); use backend='torch' on CPU")
    return backend


def check_head_args(hidden, weight, targets, bias, ignore_index, validate) -> tuple[int, int, bool]:
    """Check the LM-head arguments; returns (N, V, validate).

    Target ids are checked by the callers, which know which tokens count.
    """
    checks.tensor("hidden", hidden, dims=(2, 3), floating=True)
    dev = hidden.device
    checks.tensor("weight", weight, dims=(2,), floating=True, device=dev)
    checks.tensor("targets", targets, integer=True, device=dev)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must have shape (V, {hidden.shape[-1]}) to match hidden's last "
                         f"dimension, got {tuple(weight.shape)}")
    checks.shape("targets", targets, hidden.shape[:-1], "the leading shape of hidden")
    V = weight.shape[0]
    if bias is not None:
        checks.tensor("bias", bias, dims=(1,), floating=True, device=dev)
        checks.shape("bias", bias, (V,), "one entry per vocabulary row of weight")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if hidden.numel() == 0 or V == 0:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be non-empty")
    validate = checks.resolve_validate(validate, dev)
    if validate:
        checks.finite("hidden", hidden)
        checks.finite("weight", weight)
        if bias is not None:
            checks.bias_values(bias)
    return targets.numel(), V, validate


def run_head(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
             cfg: HeadConfig, backend: str) -> tuple[Tensor, Tensor]:
    """Dispatch the sweep on flat inputs: hidden [N, D], targets [N] (-1 = ignored)."""
    if backend == "reference":
        if cfg.precision == "tf32":
            raise ValueError("precision='tf32' is only implemented by backend='triton'")
        from .backends import materialized
        return materialized.logprobs_entropy(hidden, weight, bias, targets, cfg)
    if backend == "torch":
        if cfg.precision == "tf32":
            raise ValueError("precision='tf32' is only implemented by backend='triton'")
        from .backends import torch_chunked as sweeps
    else:
        if torch.float64 in (hidden.dtype, weight.dtype) or (bias is not None and bias.dtype == torch.float64):
            raise TypeError("backend='triton' supports float16, bfloat16 and float32 inputs; "
                            "use backend='torch' or 'reference' for float64")
        from .backends import triton_fused as sweeps
    return FusedHead.apply(hidden, weight, bias, targets, sweeps, cfg)


def fused_logprobs_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    backend: str = "auto",
    precision: str = "native",
    deterministic: bool = False,
    token_chunk: int | None = None,
    vocab_chunk: int | None = None,
    validate: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Log-probability of the sampled tokens and entropy of the next-token distribution.

    Computes, without materialising the ``N x V`` logits (backends "triton" and "torch")::

        z_v  = softcap((hidden . weight_v + bias_v) / temperature)
        logp = z_y - logsumexp(z)             H = logsumexp(z) - sum_v softmax(z)_v z_v

    Args:
        hidden:  [B, T, D] or [N, D], float16 / bfloat16 / float32 (float64: torch, reference).
        weight:  [V, D] LM-head (unembedding) matrix; may differ in dtype from hidden.
        targets: integer, hidden's leading shape; ``ignore_index`` marks tokens to skip.
        bias:    optional [V]; ``-inf`` entries exclude tokens (e.g. a padded vocabulary).
        temperature, softcap: see the formula; softcap is applied after the temperature.
        backend: "triton" (CUDA), "torch" (chunked PyTorch), "reference" (materialised),
                 "auto" (triton on CUDA, torch otherwise).
        precision: "native" | "tf32" | "ieee", dot-product precision (see HeadConfig).
        deterministic: bitwise reproducible kernels (fixed configs, no autotuning).
        token_chunk, vocab_chunk: logits tile of the chunked sweeps (None: default).
        validate: check values (NaN/Inf, target ids); default True on CPU, False on GPU
                  (value checks synchronise with the device).

    Returns:
        ``(logprobs, entropy)``, fp32 (fp64 for fp64 inputs), shaped like ``targets``, 0 at
        ignored tokens, differentiable w.r.t. hidden, weight and bias through both outputs.

    Example:
        >>> logp, ent = fused_logprobs_entropy(h, lm_head.weight, input_ids[:, 1:])
    """
    _, V, validate = check_head_args(hidden, weight, targets, bias, ignore_index, validate)
    if validate:
        checks.target_ids(targets, targets != ignore_index, V, ignore_index, bias)
    cfg = HeadConfig(temperature=temperature, softcap=softcap, precision=precision,
                     deterministic=deterministic, token_chunk=token_chunk, vocab_chunk=vocab_chunk)
    backend = resolve_backend(backend, hidden.device)
    flat_targets = targets.reshape(-1)
    flat_targets = torch.where(flat_targets == ignore_index, -1, flat_targets).long()
    logprobs, entropy = run_head(hidden.reshape(-1, hidden.shape[-1]), weight, bias, flat_targets, cfg, backend)
    return logprobs.view(targets.shape), entropy.view(targets.shape)
