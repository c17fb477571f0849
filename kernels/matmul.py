"""``C (+)= A @ B`` with fp32 accumulation: the Triton choice of the backward's two GEMMs.

    dh[n, :]  += dlogits[n, v] @ W[v, :]        (A = dlogits,   accumulate into fp32 dh)
    dW[v, :]  (+)= dlogits[n, v]^T @ h[n, :]    (A = dlogits^T: same buffer, swapped strides)

Used where cuBLAS cannot take these products (``kernels.gemm.gemm_impl`` decides): rounding
each vocabulary chunk's partial ``dh`` to bf16 before summing is exactly the bf16
accumulation the design forbids, and without ``out_dtype`` (old torch, the CPU) PyTorch has
no bf16 x bf16 -> fp32 GEMM. No split-K: each C tile is owned by one program, so results are
deterministic for a fixed config.

Memory: one [BLOCK_M, BLOCK_N] fp32 accumulator per program, nothing else.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import default_config, operand_kind
from .env import interpreting
from .launch import Tunable, launch
from .utils import grouped_tile


@triton.jit
def _matmul_kernel(
    # pointers
    a_ptr, b_ptr, c_ptr,
    # sizes
    M, N, K,
    # strides
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    # meta
    ACCUMULATE: tl.constexpr, UPCAST_OPERANDS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of C = A @ B (+ C if ACCUMULATE), fp32 accumulator."""
    # grouped order: GROUP_M row blocks share the B tiles in L2
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # int64 offsets: M * stride_am, K * stride_ak (A = dlogits^T) and N * stride_bn can pass 2^31
    a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
    b_ptrs = b_ptr + offs_n.to(tl.int64)[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(a_ptrs + offs_k.to(tl.int64)[None, :] * stride_ak,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        b = tl.load(b_ptrs + offs_k.to(tl.int64)[:, None] * stride_bk,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
        if UPCAST_OPERANDS:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    # int64: M * stride_cm passes 2^31 for dW = [V, D] (and N * stride_cn for a transposed C)
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n.to(tl.int64)[None, :] * stride_cn
    mask_c = mask_m[:, None] & mask_n[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=mask_c, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_c)


# ACCUMULATE reads C, so every autotune trial must start from the same C: restore_value.
MATMUL = Tunable(_matmul_kernel, kind="matmul", key=("M", "N", "K", "ACCUMULATE"), restore_value=("c_ptr",))


def matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *, accumulate: bool,
           upcast_operands: bool, input_precision: str, deterministic: bool,
           config: dict | None = None) -> torch.Tensor:
    """``out (+)= a @ b`` in place, fp32 accumulation; a [M, K], b [K, N], out [M, N] (any strides).

    With ``accumulate`` the existing ``out`` is added (keep ``out`` fp32 for an fp32 sum).
    ``config`` pins the tile config (default: the ``kernels.configs`` table).
    """
    M, K = a.shape
    N = b.shape[1]
    if b.shape[0] != K or tuple(out.shape) != (M, N):
        raise ValueError(f"matmul shapes: a {tuple(a.shape)}, b {tuple(b.shape)}, out {tuple(out.shape)}")
    pinned = config is not None
    if config is None:
        operands = operand_kind(torch.float32 if upcast_operands else a.dtype, input_precision)
        config = default_config("matmul", a.device, operands, N, K, interpreting())
    args = dict(
        a_ptr=a, b_ptr=b, c_ptr=out, M=M, N=N, K=K,
        stride_am=a.stride(0), stride_ak=a.stride(1), stride_bk=b.stride(0), stride_bn=b.stride(1),
        stride_cm=out.stride(0), stride_cn=out.stride(1),
        ACCUMULATE=accumulate, UPCAST_OPERANDS=upcast_operands, INPUT_PRECISION=input_precision,
    )
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    launch(MATMUL, grid, args, config=config, deterministic=deterministic, pinned=pinned)
    return out
