"""Forward vocabulary sweep: log-sum-exp, entropy and target logit per token.

Memory: each program keeps one [BLOCK_N, BLOCK_V] tile of logits in registers and four fp32
running statistics per token; global memory holds only [SPLITS, N] partial states and the
[N] outputs. Nothing of size N x V exists at any point.

Online softmax state of a token over the tiles seen so far (t relative to the running max,
so the entropy never cancels against m)::

    m = max z,    s = sum e^(z - m),    t = sum e^(z - m) (z - m)
    rescale to m' >= m:   s' = a s,   t' = a (t + s (m - m')),   a = e^(m - m')
    lse = m + log s,    H = log s - t / s,    logp = z_y - lse

Launch: a 1-D grid of (token block, vocabulary split) programs in the grouped order of
``utils.grouped_tile``: GROUP_N token blocks x all splits per group, token block fastest.
Each program sweeps its split's vocabulary tiles; a second tiny kernel merges the splits in
a fixed order (deterministic). How many splits: see ``num_vocab_splits``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import default_config, operand_kind
from .env import interpreting
from .launch import Tunable, launch
from .utils import grouped_tile, logits_tile

# ---------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------


@triton.heuristics({
    "HAS_BIAS": lambda args: args["bias_ptr"] is not None,
    "HAS_SOFTCAP": lambda args: args["softcap"] is not None,
})
@triton.jit
def _fwd_split_kernel(
    # pointers
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr,
    max_ptr, sumexp_ptr, sumexpz_ptr, target_logit_ptr,  # [SPLITS, N] fp32 partial states
    # sizes
    N, V, D, SPLITS,
    # strides
    stride_hn, stride_hd, stride_wv, stride_wd, stride_b,
    # scalars
    inv_temperature, softcap, inv_softcap,
    # meta
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    UPCAST_OPERANDS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
):
    """Partial (m, s, t, z_y) of BLOCK_N tokens over one vocabulary split.

    hidden [N, D], weight [V, D], bias [V] (any strides); targets [N] contiguous int64.
    """
    pid_n, pid_s = grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), SPLITS, GROUP_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    # int32 target ids (compared with every column of every tile); -1 for ignored tokens and
    # for ids >= V (another rank's vocabulary slice), which match no column
    y = tl.load(targets_ptr + offs_n, mask=mask_n, other=-1)
    y = tl.where((y >= 0) & (y < V), y, -1).to(tl.int32)

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
                        stride_hn, stride_hd, stride_wv, stride_wd, stride_b, inv_temperature, softcap, inv_softcap,
                        HAS_BIAS, HAS_SOFTCAP, UPCAST_OPERANDS, INPUT_PRECISION,
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

    # ---- 4. partial state of this (token block, split) ----------------------------------------
    offs = pid_s.to(tl.int64) * N + offs_n  # SPLITS * N may pass 2^31 for very long batches
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
    # ---- 1. the common maximum -------------------------------------------------------------
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    for k in range(0, SPLITS):
        offs = tl.cast(k, tl.int64) * N + offs_n  # SPLITS * N may pass 2^31 (k: a Python int when interpreted)
        m = tl.maximum(m, tl.load(max_ptr + offs, mask=mask_n, other=float("-inf")))
    m = tl.where(m == float("-inf"), 0.0, m)
    # ---- 2. rescale and sum the splits:  s = sum_k e^(m_k - m) s_k,  t likewise ----------------
    s = tl.zeros((BLOCK_N,), tl.float32)
    t = tl.zeros((BLOCK_N,), tl.float32)
    z_y = tl.zeros((BLOCK_N,), tl.float32)
    for k in range(0, SPLITS):
        offs = tl.cast(k, tl.int64) * N + offs_n  # SPLITS * N may pass 2^31 (k: a Python int when interpreted)
        m_k = tl.load(max_ptr + offs, mask=mask_n, other=0.0)
        s_k = tl.load(sumexp_ptr + offs, mask=mask_n, other=0.0)
        t_k = tl.load(sumexpz_ptr + offs, mask=mask_n, other=0.0)
        shift = tl.where(s_k > 0, m_k - m, 0.0)  # empty splits (s_k = 0) contribute nothing
        scale = tl.where(s_k > 0, tl.exp(shift), 0.0)
        s += scale * s_k
        t += scale * (t_k + s_k * shift)
        z_y += tl.load(target_logit_ptr + offs, mask=mask_n, other=0.0)
    # ---- 3. lse = m + log s,  H = log s - t / s,  logp = z_y - lse ----------------------------
    log_s = tl.log(tl.where(mask_n, s, 1.0))
    lse = m + log_s
    entropy = log_s - t / tl.where(mask_n, s, 1.0)
    valid = tl.load(targets_ptr + offs_n, mask=mask_n, other=-1) >= 0
    tl.store(logprobs_ptr + offs_n, tl.where(valid, z_y - lse, 0.0), mask=mask_n)
    tl.store(entropy_ptr + offs_n, tl.where(valid, entropy, 0.0), mask=mask_n)
    tl.store(lse_ptr + offs_n, lse, mask=mask_n)


# Autotuned on request (FUSED_PG_AUTOTUNE=1): it overwrites its outputs, so trials need no
# reset. Keyed on the shapes that change the best tile.
FWD_SPLIT = Tunable(_fwd_split_kernel, kind="fwd", key=("V", "D", "SPLITS"))
FWD_COMBINE = Tunable(_fwd_combine_kernel)
COMBINE_BLOCK = 128
INTERPRETER_COMBINE_BLOCK = 64


# ---------------------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------------------


def resident_programs(device: torch.device) -> int:
    """Programs of the sweep's tile that run at the same time: one per SM (a 128 x 256 tile
    with 4 stages takes most of an SM's shared memory). The interpreter pretends 4 SMs so
    that small problems still take the split-and-merge path."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def num_vocab_splits(N: int, V: int, config: dict, programs: int) -> int:
    """Vocabulary splits of the forward grid: L2 reuse first, then whole waves of programs.

    L2 (lower bound). Per vocabulary tile a program reads its [BLOCK_N, D] hidden tile (1 MiB
    at BLOCK_N=128, D=4096, bf16) and one [BLOCK_V, D] weight tile. In the grouped order the
    ``programs`` resident programs cover GROUP_N token blocks x (programs / GROUP_N) splits,
    provided a group holds that many, i.e. SPLITS >= programs / GROUP_N. Then the resident
    programs share GROUP_N hidden tiles, each read by programs / GROUP_N of them and kept in L2
    for their whole sweep, and programs / GROUP_N weight tiles per step, each read by GROUP_N
    of them (H100: 8 + 17 x 2 MiB, inside its 50 MB L2; ~1000 flop per byte from memory where
    the tensor cores need ~210). With fewer splits the resident set spreads over
    programs / SPLITS token blocks, whose hidden tiles no longer fit L2 and are streamed again
    for every vocabulary tile -- the token-block-fastest grid measured at 2.4x a GEMM. Short
    batches also need two waves at least: SPLITS >= 2 * programs / token_blocks.

    Waves (the choice above that bound). ``programs`` programs run at a time (one per SM);
    the grid of token_blocks x SPLITS programs therefore runs in cdiv(token_blocks x SPLITS,
    programs) waves, and a wave lasts as long as its longest program, cdiv(tiles, SPLITS)
    vocabulary tiles. Modelled time, in tile-times::

        T(SPLITS) = cdiv(token_blocks * SPLITS, programs) * cdiv(vocab_tiles, SPLITS)

    against the ideal token_blocks * vocab_tiles / programs. The split count is the smallest
    minimiser of T between the lower bound and four times it (more splits only add partial
    states and shorter programs). H100 (132 SMs), 128 x 256 tiles, GROUP_N 8, V = 151936
    (594 tiles): 17 splits run N = 4096 in 5 waves of 35 tiles where 4.12 are needed (82%);
    33 splits make 8 whole waves of 18 tiles (100%), as at N = 8192 and 16384.
    At most one split per vocabulary tile.
    """
    token_blocks = triton.cdiv(N, config["BLOCK_N"])
    vocab_tiles = triton.cdiv(V, config["BLOCK_V"])
    lower = max(triton.cdiv(2 * programs, token_blocks), triton.cdiv(programs, config["GROUP_N"]))
    lower = max(1, min(lower, vocab_tiles))
    upper = min(4 * lower, vocab_tiles)
    # split counts whose last splits would hold no tile (tiles_per_split * (SPLITS - 1) >= tiles)
    # launch idle programs: not candidates (SPLITS = lower is kept whatever it is)
    candidates = [s for s in range(lower, upper + 1)
                  if s == lower or triton.cdiv(vocab_tiles, s) * (s - 1) < vocab_tiles]
    return min(candidates, key=lambda s: (split_time(token_blocks, vocab_tiles, s, programs), s))


def split_time(token_blocks: int, vocab_tiles: int, splits: int, programs: int) -> int:
    """Modelled time of the forward grid in tile-times (see ``num_vocab_splits``)."""
    return triton.cdiv(token_blocks * splits, programs) * triton.cdiv(vocab_tiles, splits)


def logprobs_entropy_fwd(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, *,
    inv_temperature: float, softcap: float | None, upcast_operands: bool, input_precision: str,
    deterministic: bool, config: dict | None = None, splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward sweep: check, allocate, launch.

    Args:
        hidden [N, D], weight [V, D], bias [V] or None: any strides (expanded and offset
            views included); targets [N] integer (-1: ignored), made contiguous here (O(N)).
        upcast_operands: multiply as fp32 (mixed dtypes, fp32, bf16 under the interpreter).
        input_precision: ``tl.dot``'s: "ieee", "tf32" or "tf32x3" (fp32 operands only).
        config: pins the tile config (default: ``kernels.configs`` table, or autotuned when
            FUSED_PG_AUTOTUNE=1); splits: pins the vocabulary split count.
    Returns:
        (logprobs, entropy, lse), fp32 [N]; logprobs and entropy are 0 at ignored tokens.
    """
    N, D = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    targets = targets.contiguous()
    pinned = config is not None
    if config is None:
        operands = operand_kind(torch.float32 if upcast_operands else hidden.dtype, input_precision)
        config = default_config("fwd", dev, operands, D, V, interpreting(),
                                epilogue="plain" if softcap is None else "softcap")
    # the split count follows the default (or pinned) config even when autotuning picks the
    # tile, so that the partial buffers are allocated before the launch
    if splits is None:
        splits = num_vocab_splits(N, V, config, resident_programs(dev))
    partial = torch.empty(4, splits, N, dtype=torch.float32, device=dev)
    args = dict(
        hidden_ptr=hidden, weight_ptr=weight, bias_ptr=bias, targets_ptr=targets,
        max_ptr=partial[0], sumexp_ptr=partial[1], sumexpz_ptr=partial[2], target_logit_ptr=partial[3],
        N=N, V=V, D=D, SPLITS=splits,
        stride_hn=hidden.stride(0), stride_hd=hidden.stride(1),
        stride_wv=weight.stride(0), stride_wd=weight.stride(1),
        stride_b=bias.stride(0) if bias is not None else 0,
        inv_temperature=inv_temperature, softcap=softcap,
        inv_softcap=None if softcap is None else 1.0 / softcap,
        UPCAST_OPERANDS=upcast_operands, INPUT_PRECISION=input_precision,
    )
    launch(FWD_SPLIT, lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * splits,), args,
           config=config, deterministic=deterministic, pinned=pinned)

    logprobs = torch.empty(N, dtype=torch.float32, device=dev)
    entropy = torch.empty_like(logprobs)
    lse = torch.empty_like(logprobs)
    block = INTERPRETER_COMBINE_BLOCK if interpreting() else COMBINE_BLOCK
    launch(FWD_COMBINE, lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),), dict(
        max_ptr=partial[0], sumexp_ptr=partial[1], sumexpz_ptr=partial[2],
        target_logit_ptr=partial[3], targets_ptr=targets,
        logprobs_ptr=logprobs, entropy_ptr=entropy, lse_ptr=lse, N=N, SPLITS=splits,
    ), config=dict(BLOCK_N=block, num_warps=4, num_stages=1), deterministic=True)
    return logprobs, entropy, lse
