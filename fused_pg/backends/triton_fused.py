"""``backend="triton"``: the fused Triton sweeps of :mod:`fused_pg.kernels`.

This module maps a :class:`HeadConfig` and the input dtypes onto kernel arguments; the
kernels, their launchers and autotune configs live in ``kernels/``. Three things live here:

* **Dot precision** (``dot_mode``): what the kernels' ``tl.dot`` multiplies, and how exactly.
* **Custom operators.** Each sweep is one ``torch.library`` operator
  (``fused_pg::triton_forward_sweep`` / ``fused_pg::triton_backward_sweep``) with a shape-only
  fake implementation: ``torch.compile`` treats it as opaque instead of tracing the kernel
  launches and the backward's cuBLAS calls (``addmm(..., out_dtype=, out=)`` trips a
  fake-tensor decomposition bug of ``aten.addmm.dtype_out`` in torch 2.8 to 2.12).
* **Fail-safe dispatch** (``backend="auto"`` on CUDA): a kernel that cannot be compiled or
  launched on this GPU (e.g. out of shared memory on a smaller part) makes the sweep run on the
  torch backend instead, with one warning naming the reason, and every later sweep of that
  configuration (device, dtypes, bias, soft-cap, precision, D, V) goes there directly.
  ``backend="triton"`` raises the error instead.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from ..config import HeadConfig
from ..kernels.backward import logprobs_entropy_bwd
from ..kernels.env import interpreting
from ..kernels.forward import logprobs_entropy_fwd
from ..kernels.launch import KERNEL_ERRORS
from . import torch_chunked

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_NATIVE_FP32 = "tf32x3"


def dot_mode(hidden: Tensor, weight: Tensor, cfg: HeadConfig) -> tuple[bool, str, torch.dtype]:
    """(upcast_operands, input_precision, operand_dtype) of the head's GEMMs.

    native: 16-bit operands stay 16-bit when hidden and weight agree (tensor cores, fp32
            accumulation). fp32 operands (fp32 inputs, or mixed dtypes promoted to fp32) are
            multiplied as 3xTF32 on tensor cores (``tl.dot(input_precision="tf32x3")``):
            a = a_hi + a_lo with a_hi = tf32(a), likewise b, and
            a b ~ a_hi b_hi + a_hi b_lo + a_lo b_hi, each product on tensor cores, fp32 sums.
            Precision contract: each product within 2^-20 |a b| (the dropped a_lo b_lo and the
            tensor cores' truncation of the low parts to tf32), against 2^-24 for an IEEE fp32
            product; a bf16 or fp16 operand is exact in tf32 (a_lo = 0), so with mixed dtypes
            the bound is 2^-21 |a b|. Accumulation in fp32, as for IEEE.
    tf32:   fp32 operands, one TF32 product (10-bit mantissas: ~2^-11 relative per product).
    ieee:   fp32 operands, IEEE fp32 products on CUDA cores: no tensor-core instruction
            computes them, so these sweeps run an order of magnitude slower on a GPU (a
            warning says so once per process).
    Under the Triton interpreter, bf16 ``tl.dot`` is broken (it multiplies raw bit patterns):
    the kernels then convert bf16 operands to fp32 before the dot, which is exact (a bf16 x
    bf16 product fits in fp32), so the interpreter computes what the GPU's bf16 MMA computes.
    The ``operand_dtype`` (dtype of the stored dlogits) is unaffected by that workaround. The
    interpreter multiplies fp32 operands exactly whatever the precision.
    """
    same_16bit = hidden.dtype == weight.dtype and hidden.dtype in _LOW_PRECISION
    if cfg.precision == "native" and same_16bit:
        return interpreting() and hidden.dtype == torch.bfloat16, "ieee", hidden.dtype
    precision = {"native": _NATIVE_FP32, "tf32": "tf32", "ieee": "ieee"}[cfg.precision]
    return True, precision, torch.float32


_WARNED_IEEE = False


def _warn_ieee(device: torch.device) -> None:
    global _WARNED_IEEE
    if device.type == "cuda" and not interpreting() and not _WARNED_IEEE:
        _WARNED_IEEE = True
        warnings.warn("precision='ieee' multiplies fp32 on CUDA cores (no tensor-core instruction computes "
                      "IEEE fp32 products): the Triton sweeps run an order of magnitude slower than with "
                      "precision='native', whose 3xTF32 products are within 2^-20 relative of exact ones",
                      stacklevel=4)


# ---------------------------------------------------------------------------------------------
# fail-safe dispatch
# ---------------------------------------------------------------------------------------------

_FAILED: dict[tuple, str] = {}  # configuration -> reason the Triton kernels failed there


def _configuration(hidden: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None,
                   precision: str) -> tuple:
    return (str(hidden.device), hidden.dtype, weight.dtype, None if bias is None else bias.dtype,
            softcap is not None, precision, hidden.shape[1], weight.shape[0])


def _failed_over(key: tuple, err: Exception) -> None:
    """Record that the Triton kernels failed for ``key``; warn once (the first time)."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        raise err  # the device is out of memory, not the kernel out of resources
    reason = f"{type(err).__name__}: {err}".strip()
    _FAILED[key] = reason
    device, h_dtype, w_dtype, b_dtype, has_softcap, precision, D, V = key
    warnings.warn(
        f"fused-pg: the Triton kernels failed on {device} ({reason.splitlines()[0][:300]}); backend='auto' "
        f"uses the torch backend for this configuration from now on (hidden {h_dtype}, weight {w_dtype}, "
        f"bias {b_dtype}, softcap {has_softcap}, precision {precision!r}, D={D}, V={V}). "
        "Pass backend='triton' to raise the error instead.", RuntimeWarning, stacklevel=2)


def _torch_cfg(temperature: float, softcap: Optional[float], token_chunk: Optional[int],
               vocab_chunk: Optional[int]) -> HeadConfig:
    # the torch backend multiplies exactly in fp32 whatever the requested precision
    return HeadConfig(temperature=temperature, softcap=softcap, token_chunk=token_chunk, vocab_chunk=vocab_chunk)


# ---------------------------------------------------------------------------------------------
# the two sweeps as custom operators
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("fused_pg::triton_forward_sweep", mutates_args=())
def _forward_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, temperature: float,
                softcap: Optional[float], precision: str, deterministic: bool, token_chunk: Optional[int],
                vocab_chunk: Optional[int], fallback: bool) -> tuple[Tensor, Tensor, Tensor]:
    cfg = HeadConfig(temperature=temperature, softcap=softcap, precision=precision, deterministic=deterministic,
                     token_chunk=token_chunk, vocab_chunk=vocab_chunk)
    key = _configuration(hidden, weight, bias, softcap, precision)
    if fallback and key in _FAILED:
        return torch_chunked.forward_sweep(hidden, weight, bias, targets, _torch_cfg(
            temperature, softcap, token_chunk, vocab_chunk))
    upcast_operands, input_precision, _ = dot_mode(hidden, weight, cfg)
    if precision == "ieee":
        _warn_ieee(hidden.device)
    try:
        return logprobs_entropy_fwd(
            hidden, weight, bias, targets, upcast_operands=upcast_operands, input_precision=input_precision,
            deterministic=deterministic, inv_temperature=1.0 / temperature, softcap=softcap)
    except KERNEL_ERRORS as err:
        if not fallback:
            raise
        _failed_over(key, err)
    return torch_chunked.forward_sweep(hidden, weight, bias, targets, _torch_cfg(
        temperature, softcap, token_chunk, vocab_chunk))


@_forward_op.register_fake
def _(hidden, weight, bias, targets, temperature, softcap, precision, deterministic, token_chunk, vocab_chunk,
      fallback):
    out = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
    return out, torch.empty_like(out), torch.empty_like(out)


def _grad_dtypes(weight: Tensor) -> tuple[torch.dtype, torch.dtype, torch.dtype]:
    """dtypes of (d_hidden, d_weight, d_bias) as the backward operator returns them."""
    return torch.float32, torch.float32 if weight.dtype == torch.float32 else weight.dtype, torch.float32


@torch.library.custom_op("fused_pg::triton_backward_sweep", mutates_args=())
def _backward_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, lse: Tensor,
                 entropy: Tensor, grad_logprobs: Tensor, grad_entropy: Optional[Tensor], temperature: float,
                 softcap: Optional[float], precision: str, deterministic: bool, token_chunk: Optional[int],
                 vocab_chunk: Optional[int], need_dh: bool, need_dw: bool, need_db: bool,
                 fallback: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(d_hidden, d_weight, d_bias); an empty tensor where a gradient is not needed."""
    cfg = HeadConfig(temperature=temperature, softcap=softcap, precision=precision, deterministic=deterministic,
                     token_chunk=token_chunk, vocab_chunk=vocab_chunk)
    key = _configuration(hidden, weight, bias, softcap, precision)
    needs = (need_dh, need_dw, need_db)
    grads = None
    if not (fallback and key in _FAILED):
        upcast_operands, input_precision, operand_dtype = dot_mode(hidden, weight, cfg)
        try:
            grads = logprobs_entropy_bwd(
                hidden, weight, bias, targets, lse, entropy, grad_logprobs.float(),
                grad_entropy.float() if grad_entropy is not None else None,
                upcast_operands=upcast_operands, input_precision=input_precision, operand_dtype=operand_dtype,
                deterministic=deterministic, needs=needs, token_chunk=token_chunk, vocab_chunk=vocab_chunk,
                inv_temperature=1.0 / temperature, softcap=softcap)
        except KERNEL_ERRORS as err:
            if not fallback:
                raise
            _failed_over(key, err)
    if grads is None:
        grads = torch_chunked.backward_sweep(hidden, weight, bias, targets, lse, entropy, grad_logprobs,
                                             grad_entropy, _torch_cfg(temperature, softcap, token_chunk, vocab_chunk),
                                             needs)
    return tuple(g.to(dt) if g is not None else hidden.new_empty(0, dtype=dt)
                 for g, dt in zip(grads, _grad_dtypes(weight)))


@_backward_op.register_fake
def _(hidden, weight, bias, targets, lse, entropy, grad_logprobs, grad_entropy, temperature, softcap, precision,
      deterministic, token_chunk, vocab_chunk, need_dh, need_dw, need_db, fallback):
    dh, dw, db = _grad_dtypes(weight)
    return (hidden.new_empty(hidden.shape if need_dh else (0,), dtype=dh),
            hidden.new_empty(weight.shape if need_dw else (0,), dtype=dw),
            hidden.new_empty((weight.shape[0],) if need_db else (0,), dtype=db))


# ---------------------------------------------------------------------------------------------
# the sweep-backend protocol (fused_pg.backends)
# ---------------------------------------------------------------------------------------------


def _options(cfg: HeadConfig) -> dict:
    return dict(temperature=cfg.temperature, softcap=cfg.softcap, precision=cfg.precision,
                deterministic=cfg.deterministic, token_chunk=cfg.token_chunk, vocab_chunk=cfg.vocab_chunk)


def forward_sweep(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                  cfg: HeadConfig, *, fallback: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(logprobs, entropy, lse), fp32 [N] (see ``fused_pg.backends``); ``fallback``: fail-safe."""
    return _forward_op(hidden, weight, bias, targets, **_options(cfg), fallback=fallback)


def backward_sweep(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                   lse: Tensor, entropy: Tensor, grad_logprobs: Tensor, grad_entropy: Tensor | None,
                   cfg: HeadConfig, needs: tuple[bool, bool, bool], *, fallback: bool = False):
    """(d_hidden, d_weight, d_bias) or None where not needed; ``grad_entropy`` None: the
    entropy carries no gradient and its term is skipped."""
    grads = _backward_op(hidden, weight, bias, targets, lse, entropy, grad_logprobs, grad_entropy,
                         **_options(cfg), need_dh=needs[0], need_dw=needs[1], need_db=needs[2], fallback=fallback)
    return tuple(g if need else None for g, need in zip(grads, needs))
