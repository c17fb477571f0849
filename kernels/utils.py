"""Shared ``@triton.jit`` helpers of the vocabulary sweeps (used by forward, backward and matmul).

Memory: nothing beyond registers; ``logits_tile`` keeps one [BLOCK_N, BLOCK_V] fp32 tile.
"""

import triton
import triton.language as tl



@triton.jit
def tanh(x):
    """tanh(x) in fp32 to a few ulp relative over the whole real line; NaN only for NaN.

    One formula loses accuracy somewhere: 1 - 2 / (e^(2x) + 1) cancels for small |x| (it
    returns 0 for |x| < 3e-8, so a soft-cap c = 1e8 maps every logit to 0). With x clamped to
    [-9, 9] (tanh(9) rounds to 1 in fp32; nothing overflows; NaN stays NaN), two branches:

    * x^2 < 1/16: the Taylor series, truncated after x^9; the first omitted term,
      1382 x^11 / 155925, is below 8.5e-9 |x| (a seventh of fp32's half-ulp):
          tanh x = x - x^3/3 + 2x^5/15 - 17x^7/315 + 62x^9/2835
    * elsewhere: (E - 1) / (E + 1), E = e^(2x). E - 1 is exact in fp32 for these E, and a
      relative error d of E moves the quotient by d / sinh(2x) <= 1.9 d relative (|x| >= 1/4).
      Measured with an exact exp (the interpreter's): within 4 ulp; a GPU's ex2.approx adds
      its own ~2 ulp to d.
    """
    x = tl.minimum(tl.maximum(x, -9.0, propagate_nan=tl.PropagateNan.ALL), 9.0,
                   propagate_nan=tl.PropagateNan.ALL)
    s = x * x
    small = x + x * s * (-1.0 / 3.0 + s * (2.0 / 15.0 + s * (-17.0 / 315.0 + s * (62.0 / 2835.0))))
    e = tl.exp(2.0 * x)
    big = (e - 1.0) / (e + 1.0)
    return tl.where(s < 0.0625, small, big)


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
    inv_temperature, softcap, inv_softcap,
    # meta
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    UPCAST_OPERANDS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One [BLOCK_N, BLOCK_V] tile of logits in fp32; -inf in columns v >= V.

    z = (hidden[offs_n] @ weight[offs_v].T + bias[offs_v]) * inv_temperature,
    then z = softcap * tanh(z * inv_softcap) if HAS_SOFTCAP. A -inf bias excludes its token:
    its column is set to -inf at the end, with the columns v >= V (one [BLOCK_V] mask, so the
    soft-cap needs no select over the tile). The dot accumulates in fp32 over D in BLOCK_D steps;
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
        b = tl.load(bias_ptr + offs_v.to(tl.int64) * stride_b, mask=mask_v, other=0.0).to(tl.float32)  # [BLOCK_V]
        acc += b[None, :]
        mask_v = mask_v & (b > float("-inf"))
    z = acc * inv_temperature
    if HAS_SOFTCAP:
        z = softcap * tanh(z * inv_softcap)
    return tl.where(mask_v[None, :], z, float("-inf"))
