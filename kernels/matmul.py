"""``C (+)= A @ B`` with fp32 accumulation, for the backward sweep's two gradient GEMMs.

    dh[n, :]  += dlogits[n, v] @ W[v, :]        (A = dlogits,   accumulate into fp32 dh)
    dW[v, :]  (+)= dlogits[n, v]^T @ h[n, :]    (A = dlogits^T: same buffer, swapped strides)

Why not ``torch.mm``: PyTorch has no bf16 x bf16 -> fp32 GEMM that accumulates into an
existing fp32 tensor on every device, and rounding each vocabulary chunk's partial ``dh`` to
bf16 before summing is exactly the bf16 accumulation the design forbids. No split-K: each C
tile is owned by one program, so results are deterministic.

Memory: one [BLOCK_M, BLOCK_N] fp32 accumulator per program, nothing else.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import autotune_requested, interpreting


@triton.jit
def _matmul_kernel(
    # pointers
    a_ptr, b_ptr, c_ptr,
    # sizes
    M, N, K,
    # strides
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    # meta
    ACCUMULATE: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of C = A @ B (+ C if ACCUMULATE), fp32 accumulator."""
    # grouped ordering: GROUP_M row-blocks share B tiles in L2
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % group_m
    pid_n = (pid % group_size) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # int64 row offsets: M * stride_am can pass 2^31 (e.g. V x D weight gradients)
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
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    mask_c = mask_m[:, None] & mask_n[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=mask_c, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_c)


DEFAULT_CONFIG = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
INTERPRETER_CONFIG = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=1)


def get_matmul_configs() -> list[triton.Config]:
    """Search space of FUSED_PG_AUTOTUNE=1 (as in the Triton matmul tutorial)."""
    return [
        triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
            (128, 128, 64, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
        ]
    ]


# ACCUMULATE reads C, so every config trial must start from the same C: restore_value.
_matmul_kernel_tuned = triton.autotune(
    configs=get_matmul_configs(), key=["M", "N", "K", "ACCUMULATE"], restore_value=["c_ptr"],
)(_matmul_kernel)


def matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *, accumulate: bool,
           dot_fp32: bool, input_precision: str, deterministic: bool) -> torch.Tensor:
    """``out (+)= a @ b`` in place, fp32 accumulation; a [M, K], b [K, N], out [M, N] (any strides).

    With ``accumulate`` the existing ``out`` is added (keep ``out`` fp32 for an fp32 sum).
    """
    M, K = a.shape
    N = b.shape[1]
    if b.shape[0] != K or tuple(out.shape) != (M, N):
        raise ValueError(f"matmul shapes: a {tuple(a.shape)}, b {tuple(b.shape)}, out {tuple(out.shape)}")
    args = dict(
        a_ptr=a, b_ptr=b, c_ptr=out, M=M, N=N, K=K,
        stride_am=a.stride(0), stride_ak=a.stride(1), stride_bk=b.stride(0), stride_bn=b.stride(1),
        stride_cm=out.stride(0), stride_cn=out.stride(1),
        ACCUMULATE=accumulate, DOT_FP32=dot_fp32, INPUT_PRECISION=input_precision,
    )
    if autotune_requested() and not deterministic:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        _matmul_kernel_tuned[grid](**args)
    else:
        cfg = INTERPRETER_CONFIG if interpreting() else DEFAULT_CONFIG
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
        _matmul_kernel[grid](**args, **cfg)
    return out
