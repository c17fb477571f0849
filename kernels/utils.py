"""Shared ``@triton.jit`` helpers of the vocabulary sweeps (used by forward and backward)."""

import triton
import triton.language as tl


@triton.jit
def tanh(x):
    # tanh(x) = 1 - 2 / (e^(2x) + 1): exact limits -1 and +1, never NaN for large |x|
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def logits_tile(
    # pointers
    hidden_ptr, weight_ptr, bias_ptr,
    # tile coordinates and sizes
    offs_n, offs_v, N, V, D,
    # strides
    stride_hn, stride_hd, stride_wv, stride_wd,
    # scalars
    inv_temperature, softcap,
    # meta
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One [BLOCK_N, BLOCK_V] tile of logits in fp32; -inf in columns v >= V.

    z = (hidden[offs_n] @ weight[offs_v].T + bias[offs_v]) * inv_temperature,
    then z = softcap * tanh(z / softcap) if HAS_SOFTCAP (a -inf logit, from a -inf bias that
    excludes its token, stays -inf). The dot accumulates in fp32 over
    D in BLOCK_D steps; with DOT_FP32 both operands are converted to fp32 first (mixed
    input dtypes, precision "tf32"/"ieee", or bf16 under the interpreter).
    """
    mask_n = offs_n < N
    mask_v = offs_v < V
    # int64 row offsets: N * stride_hn or V * stride_wv can pass 2^31 at real sizes
    h_ptrs = hidden_ptr + offs_n.to(tl.int64)[:, None] * stride_hn
    w_ptrs = weight_ptr + offs_v.to(tl.int64)[None, :] * stride_wv
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        h = tl.load(h_ptrs + offs_d[None, :] * stride_hd,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        w = tl.load(w_ptrs + offs_d[:, None] * stride_wd,
                    mask=mask_d[:, None] & mask_v[None, :], other=0.0)  # [BLOCK_D, BLOCK_V]
        if DOT_FP32:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    z = acc * inv_temperature
    if HAS_SOFTCAP:
        z = tl.where(z == float("-inf"), z, softcap * tanh(z / softcap))
    return tl.where(mask_v[None, :], z, float("-inf"))


def interpreting() -> bool:
    """True when kernels run under TRITON_INTERPRET=1 (CPU tensors, numpy semantics)."""
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune_requested() -> bool:
    """Autotuning is opt-in (FUSED_PG_AUTOTUNE=1): the documented default configs are
    deterministic, and tuning by timing could pick different tiles from run to run."""
    import os

    return os.environ.get("FUSED_PG_AUTOTUNE", "0") not in ("", "0") and not interpreting()
