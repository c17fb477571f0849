"""Shared ``@triton.jit`` helpers of the vocabulary sweeps (used by forward, backward and matmul).

Memory: nothing beyond registers; ``logits_tile`` keeps one [BLOCK_N, BLOCK_V] fp32 tile.
"""

import triton
import triton.language as tl



@triton.jit
def tanh(x):
    # tanh(x) = 1 - 2 / (e^(2x) + 1): exact limits -1 and +1, never NaN for large |x|
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid`` in the grouped ("swizzled") launch order.

    Programs are numbered group by group; a group is GROUP_M consecutive row blocks x all
    num_pid_n column blocks, walked row block fastest (the last group may have fewer rows):

        pid = g * GROUP_M * num_pid_n  +  pid_n * group_rows  +  (pid_m - g * GROUP_M)

    Programs resident at the same time (consecutive pids) therefore cover a
    GROUP_M x (resident / GROUP_M) rectangle of tiles: each row block's operand tile is
    read by resident / GROUP_M programs and each column block's by GROUP_M programs, so both
    stay in L2 instead of one of them being streamed from memory by every program.
    """
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % group_rows
    pid_n = (pid % group_size) // group_rows
    return pid_m, pid_n


@triton.jit
def logits_tile(
    # pointers
    hidden_ptr, weight_ptr, bias_ptr,
    # tile coordinates and sizes
    offs_n, offs_v, N, V, D,
    # strides
    stride_hn, stride_hd, stride_wv, stride_wd, stride_b,
    # scalars
    inv_temperature, softcap,
    # meta
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    UPCAST_OPERANDS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One [BLOCK_N, BLOCK_V] tile of logits in fp32; -inf in columns v >= V.

    z = (hidden[offs_n] @ weight[offs_v].T + bias[offs_v]) * inv_temperature,
    then z = softcap * tanh(z / softcap) if HAS_SOFTCAP (a -inf logit, from a -inf bias that
    excludes its token, stays -inf). The dot accumulates in fp32 over D in BLOCK_D steps;
    with UPCAST_OPERANDS both operands are converted to fp32 before the dot (mixed input
    dtypes, precision "tf32"/"ieee", or bf16 under the interpreter).
    """
    mask_n = offs_n < N
    mask_v = offs_v < V
    # Every offset is an int64 index times its stride: a row index (N * stride_hn,
    # V * stride_wv) and a column index alike (D * stride_hd of a column-major hidden,
    # D * stride_wd of a column-major weight W.T.contiguous().T, V * stride_b) can pass 2^31.
    h_ptrs = hidden_ptr + offs_n.to(tl.int64)[:, None] * stride_hn
    w_ptrs = weight_ptr + offs_v.to(tl.int64)[None, :] * stride_wv
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        offs_d64 = offs_d.to(tl.int64)
        h = tl.load(h_ptrs + offs_d64[None, :] * stride_hd,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        w = tl.load(w_ptrs + offs_d64[:, None] * stride_wd,
                    mask=mask_d[:, None] & mask_v[None, :], other=0.0)  # [BLOCK_D, BLOCK_V]
        if UPCAST_OPERANDS:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_v.to(tl.int64) * stride_b, mask=mask_v, other=0.0)  # [BLOCK_V]
        acc += b.to(tl.float32)[None, :]
    z = acc * inv_temperature
    if HAS_SOFTCAP:
        z = tl.where(z == float("-inf"), z, softcap * tanh(z / softcap))
    return tl.where(mask_v[None, :], z, float("-inf"))
