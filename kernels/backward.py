"""Backward vocabulary sweep: gradients of hidden, weight and bias.

For each [token chunk x vocabulary chunk] slab, three launches:

1. ``_dlogits_kernel`` recomputes the logits tile by tile (same GEMM as the forward) and
   writes dL/dlogit for the slab, formed in fp32 and stored in the GEMM operand dtype::

       dL/dz_v = g (1[v = y] - p_v) - e p_v (log p_v + H)      p_v = exp(z_v - lse)
       softcap:      dz/du = 1 - (z / c)^2
       temperature:  du/dlogit = 1 / tau

   with per-token ``g = dL/dlogp`` and ``e = dL/dH`` from the loss epilogue.
2. ``dh[chunk] += dlogits @ W[chunk]``       (fp32 accumulator across vocabulary chunks)
3. ``dW[chunk] (+)= dlogits^T @ h[chunk]``   (fp32 across token chunks; K = tokens inside)

Four GEMM-sized passes in all with the forward (the "4-GEMM floor"), no atomics anywhere:
every output tile has one owner, so results are bitwise reproducible for a fixed config.

Memory beyond inputs and gradients: one dlogits slab of ``token_chunk x vocab_chunk``
(default: all tokens x as many columns as fit ``DLOGITS_BUDGET`` elements), the fp32 ``dh``
accumulator [N, D] when hidden is 16-bit, and an fp32 [vocab_chunk, D] ``dW`` accumulator when
the weight is 16-bit and tokens are split into several chunks. Never N x V.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .matmul import matmul
from .utils import autotune_requested, interpreting, logits_tile

DLOGITS_BUDGET = 1 << 26  # elements of the dlogits slab (128 MiB in bf16)


@triton.jit
def _dlogits_kernel(
    # pointers
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr,
    lse_ptr, entropy_ptr, grad_logprobs_ptr, grad_entropy_ptr,
    dlogits_ptr,
    # sizes (of this slab) and the slab's first vocabulary id
    N, V, D, v_start,
    # strides
    stride_hn, stride_hd, stride_wv, stride_wd, stride_dn, stride_dv,
    # scalars
    inv_temperature, softcap,
    # meta
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dL/dlogits for one [BLOCK_N, BLOCK_V] tile of the slab (pointers pre-offset to it)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_n = offs_n < N
    mask_v = offs_v < V

    # ---- 1. recompute the logits tile ------------------------------------------------------
    z = logits_tile(hidden_ptr, weight_ptr, bias_ptr, offs_n, offs_v, N, V, D,
                    stride_hn, stride_hd, stride_wv, stride_wd, inv_temperature, softcap,
                    HAS_BIAS, HAS_SOFTCAP, DOT_FP32, INPUT_PRECISION,
                    BLOCK_N, BLOCK_V, BLOCK_D)  # [BLOCK_N, BLOCK_V] fp32

    # ---- 2. dL/dz in fp32 -------------------------------------------------------------------
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    H = tl.load(entropy_ptr + offs_n, mask=mask_n, other=0.0)
    g = tl.load(grad_logprobs_ptr + offs_n, mask=mask_n, other=0.0)
    e = tl.load(grad_entropy_ptr + offs_n, mask=mask_n, other=0.0)
    y = tl.load(targets_ptr + offs_n, mask=mask_n, other=-1)
    log_p = z - lse[:, None]
    p = tl.exp(log_p)
    # dlogp/dz = onehot - p;   dH/dz = -p (log p + H), with p log p -> 0 where p = 0
    dz = -p * (g[:, None] + e[:, None] * (tl.where(p > 0, log_p, 0.0) + H[:, None]))
    dz += tl.where((v_start + offs_v)[None, :] == y[:, None], g[:, None], 0.0)

    # ---- 3. chain rule through the soft-cap and the temperature ----------------------------
    if HAS_SOFTCAP:
        z_over_c = z / softcap  # = tanh(u / c); -inf for excluded tokens and columns v >= V
        dz *= tl.where(z > float("-inf"), 1.0 - z_over_c * z_over_c, 0.0)
    dz *= inv_temperature

    d_ptrs = dlogits_ptr + offs_n.to(tl.int64)[:, None] * stride_dn + offs_v[None, :] * stride_dv
    tl.store(d_ptrs, dz.to(dlogits_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_v[None, :])


DEFAULT_CONFIG = dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3)
INTERPRETER_CONFIG = dict(BLOCK_N=32, BLOCK_V=64, BLOCK_D=32, num_warps=4, num_stages=1)


def get_dlogits_configs() -> list[triton.Config]:
    """Search space of FUSED_PG_AUTOTUNE=1."""
    return [
        triton.Config(dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd), num_warps=w, num_stages=s)
        for bn, bv, bd, w, s in [
            (128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3),
            (256, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 128, 128, 8, 2),
        ]
    ]


_dlogits_kernel_tuned = triton.autotune(configs=get_dlogits_configs(), key=["V", "D"])(_dlogits_kernel)


def default_chunks(N: int, V: int, token_chunk: int | None, vocab_chunk: int | None) -> tuple[int, int]:
    """Slab shape: all tokens (when possible) x the widest vocabulary chunk in the budget.

    Both are capped so that token_chunk x vocab_chunk <= DLOGITS_BUDGET; vocabulary chunks
    of 256 columns or more are rounded down to a multiple of 256 (whole tiles).
    """
    n = min(token_chunk or max(1, DLOGITS_BUDGET // 1024), N)
    if vocab_chunk is None:
        vocab_chunk = max(1, DLOGITS_BUDGET // n)
        if vocab_chunk >= 256:
            vocab_chunk -= vocab_chunk % 256
    return n, min(vocab_chunk, V)


def logprobs_entropy_bwd(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
    lse: torch.Tensor, entropy: torch.Tensor, grad_logprobs: torch.Tensor, grad_entropy: torch.Tensor, *,
    inv_temperature: float, softcap: float | None, dot_fp32: bool, input_precision: str,
    operand_dtype: torch.dtype, deterministic: bool, needs: tuple[bool, bool, bool],
    token_chunk: int | None = None, vocab_chunk: int | None = None,
):
    """Backward sweep: check, allocate, launch. Returns (d_hidden, d_weight, d_bias) or Nones.

    hidden [N, D], weight [V, D], bias [V] | None, targets [N] int64 (-1: ignored),
    lse / entropy / grad_* [N] fp32 (grads already 0 at ignored tokens).
    d_hidden is fp32 (or None), d_weight is fp32 or weight's dtype, d_bias fp32.
    ``operand_dtype`` is the dtype the dlogits slab is stored in (the GEMM operand dtype).
    """
    N, D = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    need_dh, need_dw, need_db = needs
    n_chunk, v_chunk = default_chunks(N, V, token_chunk, vocab_chunk)
    tune = autotune_requested() and not deterministic
    config = INTERPRETER_CONFIG if interpreting() else DEFAULT_CONFIG
    gemm = dict(dot_fp32=dot_fp32, input_precision=input_precision, deterministic=deterministic)

    d_hidden = torch.zeros(N, D, dtype=torch.float32, device=dev) if need_dh else None
    d_bias = torch.zeros(V, dtype=torch.float32, device=dev) if need_db else None
    d_weight = dw_acc = None
    if need_dw:
        if weight.dtype == torch.float32:
            d_weight = torch.zeros(V, D, dtype=torch.float32, device=dev)
        else:
            d_weight = torch.empty(V, D, dtype=weight.dtype, device=dev)
            if n_chunk < N:  # K = tokens is split: sum the chunks in fp32, cast once
                dw_acc = torch.empty(v_chunk, D, dtype=torch.float32, device=dev)
    dlogits_buf = torch.empty(n_chunk * v_chunk, dtype=operand_dtype, device=dev)

    for v0 in range(0, V, v_chunk):
        v1 = min(v0 + v_chunk, V)
        w = weight[v0:v1]
        for n0 in range(0, N, n_chunk):
            n1 = min(n0 + n_chunk, N)
            h = hidden[n0:n1]
            dlogits = dlogits_buf[: (n1 - n0) * (v1 - v0)].view(n1 - n0, v1 - v0)
            args = dict(
                hidden_ptr=h, weight_ptr=w, bias_ptr=bias[v0:v1] if bias is not None else h,
                targets_ptr=targets[n0:n1], lse_ptr=lse[n0:n1], entropy_ptr=entropy[n0:n1],
                grad_logprobs_ptr=grad_logprobs[n0:n1], grad_entropy_ptr=grad_entropy[n0:n1],
                dlogits_ptr=dlogits,
                N=n1 - n0, V=v1 - v0, D=D, v_start=v0,
                stride_hn=h.stride(0), stride_hd=h.stride(1),
                stride_wv=w.stride(0), stride_wd=w.stride(1),
                stride_dn=dlogits.stride(0), stride_dv=dlogits.stride(1),
                inv_temperature=inv_temperature, softcap=softcap if softcap is not None else 1.0,
                HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
                DOT_FP32=dot_fp32, INPUT_PRECISION=input_precision,
            )
            if tune:
                grid = lambda meta: (triton.cdiv(n1 - n0, meta["BLOCK_N"]),  # noqa: E731
                                     triton.cdiv(v1 - v0, meta["BLOCK_V"]))
                _dlogits_kernel_tuned[grid](**args)
            else:
                grid = (triton.cdiv(n1 - n0, config["BLOCK_N"]), triton.cdiv(v1 - v0, config["BLOCK_V"]))
                _dlogits_kernel[grid](**args, **config)

            if need_dh:  # dh[n] += dlogits @ W[v]
                matmul(dlogits, w, d_hidden[n0:n1], accumulate=True, **gemm)
            if need_dw:  # dW[v] (+)= dlogits^T @ h[n]
                if dw_acc is not None:
                    matmul(dlogits.T, h, dw_acc[: v1 - v0], accumulate=n0 > 0, **gemm)
                else:
                    matmul(dlogits.T, h, d_weight[v0:v1],
                           accumulate=weight.dtype == torch.float32, **gemm)
            if need_db:
                d_bias[v0:v1] += dlogits.sum(0, dtype=torch.float32)
        if dw_acc is not None:
            d_weight[v0:v1] = dw_acc[: v1 - v0]
    return d_hidden, d_weight, d_bias
