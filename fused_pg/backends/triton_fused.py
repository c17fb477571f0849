"""``backend="triton"``: the fused Triton sweeps of :mod:`fused_pg.kernels`.

This module only maps a :class:`HeadConfig` and the input dtypes onto kernel arguments; the
kernels, their launchers and autotune configs live in ``kernels/``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import HeadConfig
from ..kernels.backward import logprobs_entropy_bwd
from ..kernels.forward import logprobs_entropy_fwd
from ..kernels.env import interpreting

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def dot_mode(hidden: Tensor, weight: Tensor, cfg: HeadConfig) -> tuple[bool, str, torch.dtype]:
    """(upcast_operands, input_precision, operand_dtype) of the head's GEMMs.

    native: 16-bit operands stay 16-bit when hidden and weight agree (tensor cores, fp32
            accumulation); otherwise both are promoted to fp32 and multiplied as IEEE fp32.
    tf32:   fp32 operands, TF32 products.      ieee: fp32 operands, IEEE fp32 products.
    Under the Triton interpreter, bf16 ``tl.dot`` is broken (it multiplies raw bit patterns):
    the kernels then convert bf16 operands to fp32 before the dot, which is exact (a bf16 x
    bf16 product fits in fp32), so the interpreter computes what the GPU's bf16 MMA computes.
    The ``operand_dtype`` (dtype of the stored dlogits) is unaffected by that workaround.
    """
    same_16bit = hidden.dtype == weight.dtype and hidden.dtype in _LOW_PRECISION
    if cfg.precision == "native" and same_16bit:
        return interpreting() and hidden.dtype == torch.bfloat16, "ieee", hidden.dtype
    return True, "tf32" if cfg.precision == "tf32" else "ieee", torch.float32


def _scalars(cfg: HeadConfig) -> dict:
    return dict(inv_temperature=1.0 / cfg.temperature, softcap=cfg.softcap)


def forward_sweep(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                  cfg: HeadConfig) -> tuple[Tensor, Tensor, Tensor]:
    upcast_operands, input_precision, _ = dot_mode(hidden, weight, cfg)
    return logprobs_entropy_fwd(
        hidden, weight, bias, targets, upcast_operands=upcast_operands, input_precision=input_precision,
        deterministic=cfg.deterministic, **_scalars(cfg))


def backward_sweep(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                   lse: Tensor, entropy: Tensor, grad_logprobs: Tensor, grad_entropy: Tensor,
                   cfg: HeadConfig, needs: tuple[bool, bool, bool]):
    upcast_operands, input_precision, operand_dtype = dot_mode(hidden, weight, cfg)
    return logprobs_entropy_bwd(
        hidden, weight, bias, targets, lse, entropy,
        grad_logprobs.float().contiguous(), grad_entropy.float().contiguous(),
        upcast_operands=upcast_operands, input_precision=input_precision, operand_dtype=operand_dtype,
        deterministic=cfg.deterministic, needs=needs,
        token_chunk=cfg.token_chunk, vocab_chunk=cfg.vocab_chunk, **_scalars(cfg))
