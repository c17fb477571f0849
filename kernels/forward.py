"""Forward vocabulary sweep: log-sum-exp, entropy and target logit per token.

Memory: the kernel keeps one [BLOCK_N, BLOCK_V] tile of logits in registers and four fp32
running statistics per token; global memory holds only [SPLITS, N] partial states and the
[N] outputs. Nothing of size N x V exists at any point.

Online softmax state of a token over the tiles seen so far (t relative to the running max,
so the entropy never cancels against m)::

    m = max z,    s = sum e^(z - m),    t = sum e^(z - m) (z - m)
    rescale to m' >= m:   s' = a s,   t' = a (t + s (m - m')),   a = e^(m - m')
    lse = m + log s,    H = log s - t / s,    logp = z_y - lse

Grid: (token blocks, vocabulary splits). Small token counts also split the vocabulary so
the GPU fills up; a second tiny kernel merges the splits in a fixed order (deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import autotune_requested, interpreting, logits_tile

# ---------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------


@triton.jit
def _fwd_split_kernel(
    # pointers
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr,
    max_ptr, sumexp_ptr, sumexpz_ptr, target_logit_ptr,  # [SPLITS, N] fp32 partial states
    # sizes
    N, V, D, SPLITS,
    # strides
    stride_hn, stride_hd, stride_wv, stride_wd,
    # scalars
    inv_temperature, softcap,
    # meta
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Partial (m, s, t, z_y) of BLOCK_N tokens over one vocabulary split."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    y = tl.load(targets_ptr + offs_n, mask=mask_n, other=-1)

    # this split's vocabulary range, a whole number of tiles
    tiles_per_split = tl.cdiv(tl.cdiv(V, BLOCK_V), SPLITS)
    v_lo = pid_s * tiles_per_split * BLOCK_V
    v_hi = tl.minimum(v_lo + tiles_per_split * BLOCK_V, V)

    m_i = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s_i = tl.zeros((BLOCK_N,), tl.float32)
    t_i = tl.zeros((BLOCK_N,), tl.float32)
    z_y = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        # ---- 1. logits tile (fp32) --------------------------------------------------------
        z = logits_tile(hidden_ptr, weight_ptr, bias_ptr, offs_n, offs_v, N, V, D,
                        stride_hn, stride_hd, stride_wv, stride_wd, inv_temperature, softcap,
                        HAS_BIAS, HAS_SOFTCAP, DOT_FP32, INPUT_PRECISION,
                        BLOCK_N, BLOCK_V, BLOCK_D)  # [BLOCK_N, BLOCK_V]
        # ---- 2. online softmax statistics ---------------------------------------------------
        m_new = tl.maximum(m_i, tl.max(z, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: shift by 0
        alpha = tl.exp(m_i - m_ref)                           # 0 while the state is empty
        e = tl.exp(z - m_ref[:, None])                        # 0 for -inf logits
        z_rel = tl.where(e > 0, z - m_ref[:, None], 0.0)      # avoid 0 * -inf
        t_i = alpha * (t_i + s_i * tl.where(s_i > 0, m_i - m_ref, 0.0)) + tl.sum(e * z_rel, 1)
        s_i = alpha * s_i + tl.sum(e, 1)
        m_i = m_new
        # ---- 3. target logit, if it lives in this tile --------------------------------------
        z_y += tl.sum(tl.where(offs_v[None, :] == y[:, None], z, 0.0), 1)

    offs = pid_s * N + offs_n
    tl.store(max_ptr + offs, m_i, mask=mask_n)
    tl.store(sumexp_ptr + offs, s_i, mask=mask_n)
    tl.store(sumexpz_ptr + offs, t_i, mask=mask_n)
    tl.store(target_logit_ptr + offs, z_y, mask=mask_n)


@triton.jit
def _fwd_combine_kernel(
    # pointers
    max_ptr, sumexp_ptr, sumexpz_ptr, target_logit_ptr, targets_ptr,
    logprobs_ptr, entropy_ptr, lse_ptr,
    # sizes
    N, SPLITS,
    # meta
    BLOCK_N: tl.constexpr,
):
    """Merge the SPLITS partial states of each token, in split order; 0 for ignored tokens."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    for k in range(0, SPLITS):
        m = tl.maximum(m, tl.load(max_ptr + k * N + offs_n, mask=mask_n, other=float("-inf")))
    m = tl.where(m == float("-inf"), 0.0, m)
    s = tl.zeros((BLOCK_N,), tl.float32)
    t = tl.zeros((BLOCK_N,), tl.float32)
    z_y = tl.zeros((BLOCK_N,), tl.float32)
    for k in range(0, SPLITS):
        m_k = tl.load(max_ptr + k * N + offs_n, mask=mask_n, other=0.0)
        s_k = tl.load(sumexp_ptr + k * N + offs_n, mask=mask_n, other=0.0)
        t_k = tl.load(sumexpz_ptr + k * N + offs_n, mask=mask_n, other=0.0)
        shift = tl.where(s_k > 0, m_k - m, 0.0)  # empty splits (s_k = 0) contribute nothing
        scale = tl.where(s_k > 0, tl.exp(shift), 0.0)
        s += scale * s_k
        t += scale * (t_k + s_k * shift)
        z_y += tl.load(target_logit_ptr + k * N + offs_n, mask=mask_n, other=0.0)
    log_s = tl.log(tl.where(mask_n, s, 1.0))
    lse = m + log_s
    entropy = log_s - t / tl.where(mask_n, s, 1.0)
    valid = tl.load(targets_ptr + offs_n, mask=mask_n, other=-1) >= 0
    tl.store(logprobs_ptr + offs_n, tl.where(valid, z_y - lse, 0.0), mask=mask_n)
    tl.store(entropy_ptr + offs_n, tl.where(valid, entropy, 0.0), mask=mask_n)
    tl.store(lse_ptr + offs_n, lse, mask=mask_n)


# ---------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------

# Documented default (used unless FUSED_PG_AUTOTUNE=1): 128 x 128 logits tile, K step 64.
DEFAULT_CONFIG = dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3)
# Under the interpreter cost scales with program count x loop trips: few, large tiles.
INTERPRETER_CONFIG = dict(BLOCK_N=32, BLOCK_V=64, BLOCK_D=32, num_warps=4, num_stages=1)


def get_fwd_configs() -> list[triton.Config]:
    """Search space of FUSED_PG_AUTOTUNE=1 (Hopper/Ampere-sized GEMM tiles)."""
    return [
        triton.Config(dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd), num_warps=w, num_stages=s)
        for bn, bv, bd, w, s in [
            (128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3),
            (256, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
            (128, 128, 128, 8, 2), (64, 256, 64, 8, 3),
        ]
    ]


# Autotuned twin of the split kernel (FUSED_PG_AUTOTUNE=1). It overwrites its outputs, so
# benchmarking configs needs no reset. Keyed on the shapes that change the best tile.
_fwd_split_kernel_tuned = triton.autotune(configs=get_fwd_configs(), key=["V", "D", "SPLITS"])(
    _fwd_split_kernel)


# ---------------------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------------------


def num_vocab_splits(N: int, V: int, block_n: int, block_v: int, device: torch.device) -> int:
    """Vocabulary splits so that (token blocks x splits) gives ~2 waves of programs."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = 4  # interpreter: still exercise the split-and-merge path on tiny problems
    token_blocks = triton.cdiv(N, block_n)
    return max(1, min(triton.cdiv(2 * sms, token_blocks), triton.cdiv(V, block_v)))


def logprobs_entropy_fwd(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, *,
    inv_temperature: float, softcap: float | None, dot_fp32: bool, input_precision: str,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward sweep: check, allocate, launch.

    hidden [N, D], weight [V, D], bias [V] or None, targets [N] int64 (-1: ignored).
    Returns (logprobs, entropy, lse), fp32 [N]; logprobs and entropy are 0 at ignored tokens.
    """
    N, D = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    tune = autotune_requested() and not deterministic
    config = INTERPRETER_CONFIG if interpreting() else DEFAULT_CONFIG
    # splits depend only on the default tile, so the partial buffers are known before tuning
    splits = num_vocab_splits(N, V, config["BLOCK_N"], config["BLOCK_V"], dev)
    partial = torch.empty(4, splits, N, dtype=torch.float32, device=dev)
    args = dict(
        hidden_ptr=hidden, weight_ptr=weight, bias_ptr=bias if bias is not None else hidden,
        targets_ptr=targets,
        max_ptr=partial[0], sumexp_ptr=partial[1], sumexpz_ptr=partial[2], target_logit_ptr=partial[3],
        N=N, V=V, D=D, SPLITS=splits,
        stride_hn=hidden.stride(0), stride_hd=hidden.stride(1),
        stride_wv=weight.stride(0), stride_wd=weight.stride(1),
        inv_temperature=inv_temperature, softcap=softcap if softcap is not None else 1.0,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
        DOT_FP32=dot_fp32, INPUT_PRECISION=input_precision,
    )
    if tune:
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), splits)  # noqa: E731
        _fwd_split_kernel_tuned[grid](**args)
    else:
        grid = (triton.cdiv(N, config["BLOCK_N"]), splits)
        _fwd_split_kernel[grid](**args, **config)

    logprobs = torch.empty(N, dtype=torch.float32, device=dev)
    entropy = torch.empty_like(logprobs)
    lse = torch.empty_like(logprobs)
    block = 128 if not interpreting() else 64
    _fwd_combine_kernel[(triton.cdiv(N, block),)](
        max_ptr=partial[0], sumexp_ptr=partial[1], sumexpz_ptr=partial[2],
        target_logit_ptr=partial[3], targets_ptr=targets,
        logprobs_ptr=logprobs, entropy_ptr=entropy, lse_ptr=lse,
        N=N, SPLITS=splits, BLOCK_N=block,
    )
    return logprobs, entropy, lse
