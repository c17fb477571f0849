"""Backward vocabulary sweep: gradients of hidden, weight and bias.

For each [token chunk x vocabulary chunk] slab (shape: ``default_chunks``):

1. ``_dlogits_kernel`` recomputes the logits tile by tile (same GEMM as the forward, same
   grouped launch order) and writes dL/dlogit for the slab, formed in fp32 and stored in the
   GEMM operand dtype::

       dL/dz_v = g (1[v = y] - p_v) - e p_v (log p_v + H)      p_v = exp(z_v - lse)
       softcap:      dz/du = 1 - (z / c)^2
       temperature:  du/dlogit = 1 / tau

   with per-token ``g = dL/dlogp`` and ``e = dL/dH`` from the loss epilogue (``e = None``: the
   entropy carries no gradient, e.g. it is only logged, and its term is not formed at all);
   fp16 slabs are stored times one power of two (``dlogits_scale``) so that small entries do
   not flush to 0.
2. ``dh[n] (+)= dlogits @ W[v]``     (fp32; the first vocabulary chunk writes, the others add)
3. ``dW[v] (+)= dlogits^T @ h[n]``   (K = all the chunk's tokens in one product; summed in fp32
   over token chunks)

Steps 2 and 3 run on cuBLAS or the Triton matmul (``kernels.gemm``). Four GEMM-sized passes
in all with the forward (the "4-GEMM floor"), no atomics anywhere: every output tile has one
owner, so results are bitwise reproducible for a fixed config (and cuBLAS under its own
conditions, see ``kernels.gemm``).

dW of a 16-bit weight: with one token chunk (and unscaled dlogits) each vocabulary chunk's dW
is one product over all tokens, written straight into the weight's dtype (one rounding of an
fp32-accumulated sum). With several token chunks, or fp16 dlogits to unscale, it is summed in
an fp32 [vocab_chunk, D] scratch first and rounded once per chunk.

Memory beyond inputs and gradients: the dlogits slab and the dW scratch (when there is one),
together at most ``SLAB_BYTES``; the fp32 ``dh`` [N, D]. Never N x V.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .configs import default_config, operand_kind
from .env import interpreting
from .gemm import gemm, gemm_impl
from .launch import Tunable, launch
from .utils import grouped_tile, logits_tile

SLAB_BYTES = 1 << 27  # the dlogits slab plus the dW scratch: 128 MiB
# fp16 dlogits are scaled so that their largest possible magnitude is at most this: 4x below
# fp16's largest value (65504), and 2^28 above its smallest normal (6.1e-5).
FP16_DLOGITS_MAX = 2.0 ** 14


@triton.heuristics({
    "HAS_BIAS": lambda args: args["bias_ptr"] is not None,
    "HAS_SOFTCAP": lambda args: args["softcap"] is not None,
    "HAS_SCALE": lambda args: args["dlogits_scale_ptr"] is not None,
    "HAS_ENTROPY_GRAD": lambda args: args["grad_entropy_ptr"] is not None,
})
@triton.jit
def _dlogits_kernel(
    # pointers
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr,
    lse_ptr, entropy_ptr, grad_logprobs_ptr, grad_entropy_ptr, dlogits_scale_ptr,
    dlogits_ptr,
    # sizes (of this slab) and the slab's first vocabulary id
    N, V, D, v_start,
    # strides
    stride_hn, stride_hd, stride_wv, stride_wd, stride_b, stride_dn, stride_dv,
    # scalars
    inv_temperature, softcap, inv_softcap,
    # meta
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_ENTROPY_GRAD: tl.constexpr, UPCAST_OPERANDS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
):
    """dL/dlogits for one [BLOCK_N, BLOCK_V] tile of the slab (pointers pre-offset to it).

    hidden [N, D], weight [V, D], bias [V], dlogits [N, V] (any strides); targets, lse,
    entropy, grad_* [N] contiguous; dlogits_scale [1] fp32 (fp16 slabs only); grad_entropy
    None: the entropy carries no gradient, and its term is not formed.
    """
    pid_n, pid_v = grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(V, BLOCK_V), GROUP_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_n = offs_n < N
    mask_v = offs_v < V

    # ---- 1. recompute the logits tile ------------------------------------------------------
    z = logits_tile(hidden_ptr, weight_ptr, bias_ptr, offs_n, offs_v, N, V, D,
                    stride_hn, stride_hd, stride_wv, stride_wd, stride_b, inv_temperature, softcap, inv_softcap,
                    HAS_BIAS, HAS_SOFTCAP, UPCAST_OPERANDS, INPUT_PRECISION,
                    BLOCK_N, BLOCK_V, BLOCK_D)  # [BLOCK_N, BLOCK_V] fp32

    # ---- 2. dL/dz in fp32 -------------------------------------------------------------------
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    g = tl.load(grad_logprobs_ptr + offs_n, mask=mask_n, other=0.0)
    # the target's column in this slab as int32 (compared with every column of the tile); -1
    # when it is in another slab, ignored (-1) or in another rank's vocabulary slice (>= V)
    y = tl.load(targets_ptr + offs_n, mask=mask_n, other=-1) - v_start
    y = tl.where((y >= 0) & (y < V), y, -1).to(tl.int32)
    log_p = z - lse[:, None]
    p = tl.exp(log_p)
    # dlogp/dz = onehot - p;   dH/dz = -p (log p + H), with p log p -> 0 where p = 0
    if HAS_ENTROPY_GRAD:
        H = tl.load(entropy_ptr + offs_n, mask=mask_n, other=0.0)
        e = tl.load(grad_entropy_ptr + offs_n, mask=mask_n, other=0.0)
        dz = -p * (g[:, None] + e[:, None] * (tl.where(p > 0, log_p, 0.0) + H[:, None]))
    else:
        dz = -p * g[:, None]
    dz += tl.where(offs_v[None, :] == y[:, None], g[:, None], 0.0)

    # ---- 3. chain rule through the soft-cap and the temperature ----------------------------
    if HAS_SOFTCAP:
        # dz/du = 1 - tanh^2 = 1 - (z / c)^2; z / c = -inf in excluded columns, where
        # min(., 1) makes the factor 0 (and dz there is already 0: p = 0)
        t = z * inv_softcap
        dz *= 1.0 - tl.minimum(t * t, 1.0)
    dz *= inv_temperature

    # ---- 4. store (fp16: times 2^k, undone exactly on the fp32 results) ---------------------
    if HAS_SCALE:
        dz *= tl.load(dlogits_scale_ptr)
    # int64: N * stride_dn passes 2^31 for a slab of more than 2^31 elements
    d_ptrs = dlogits_ptr + offs_n.to(tl.int64)[:, None] * stride_dn + offs_v.to(tl.int64)[None, :] * stride_dv
    tl.store(d_ptrs, dz.to(dlogits_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_v[None, :])


# Autotuned on request (FUSED_PG_AUTOTUNE=1); it overwrites its output, so trials need no reset.
DLOGITS = Tunable(_dlogits_kernel, kind="dlogits", key=("V", "D"))


def dlogits_scale(grad_logprobs: torch.Tensor, grad_entropy: torch.Tensor | None, entropy: torch.Tensor,
                  inv_temperature: float) -> torch.Tensor:
    """[1] fp32 power of two 2^k for fp16 dlogits, computed on the device (no host sync).

    Why: with a large loss normaliser (num_items_in_batch = 65536) g and e are ~1e-5 per token
    and p_v ~1e-5 over most of the vocabulary, so dL/dz_v ~1e-10 is below fp16's smallest
    subnormal (6e-8) and stored as 0: dh lost ~2% (H100). bf16 storage would not underflow but
    the fp16 GEMM needs fp16 operands (converting W to bf16 rounds it to 8 bits), and per-token
    scales cannot be undone on dW = sum_t dz_t h_t; one scale for the whole sweep can, exactly.

    Bound per token (|1[v=y] - p_v| <= 1, p |log p| <= 1/e, 0 <= p_v H <= H; soft-cap slope <= 1)::

        |dL/dz_v| <= (|g| + |e| (1/e + H)) / tau          (no e term when grad_entropy is None)

    k is the largest integer with 2^k * max_t bound_t <= FP16_DLOGITS_MAX, clamped to
    [-126, 126] (a normal fp32 scale and inverse); 2^0 when there is no gradient at all.
    """
    bound = grad_logprobs.abs()
    if grad_entropy is not None:
        bound = bound + grad_entropy.abs() * (math.exp(-1.0) + entropy.abs())
    k = torch.floor(torch.log2(FP16_DLOGITS_MAX / (bound * inv_temperature).amax()))  # +inf when bound == 0
    k = torch.where(torch.isfinite(k), k, 0.0).clamp(-126.0, 126.0)
    return torch.exp2(k).reshape(1).float()


def slab_traffic(N: int, V: int, D: int, n_chunk: int, v_chunk: int, *, weight_bytes: int,
                 dw_scratch: bool) -> int:
    """Bytes of memory traffic the slab shape adds to the two backward GEMMs' operand reads:

        dh   N D 4 (2 cdiv(V, v_chunk) - 1)     fp32, written by the first vocabulary chunk,
                                                read and written again by every other one
        dW   V D 4 (2 cdiv(N, n_chunk) - 1)     fp32 (an fp32 weight, or the scratch of a 16-bit
             + V D (4 + weight_bytes)           one, then copied to the weight's dtype)
             V D weight_bytes                   16-bit, one product per vocabulary chunk
                                                written straight into the weight's dtype

    The GEMMs' own traffic (dlogits, W and h read once per slab) does not depend on the shape
    beyond what the 4-GEMM floor already counts.
    """
    dh = N * D * 4 * (2 * triton.cdiv(V, v_chunk) - 1)
    if weight_bytes == 4 or dw_scratch:
        dw = V * D * 4 * (2 * triton.cdiv(N, n_chunk) - 1) + (V * D * (4 + weight_bytes) if dw_scratch else 0)
    else:
        dw = V * D * weight_bytes
    return dh + dw


def default_chunks(N: int, V: int, D: int, token_chunk: int | None = None, vocab_chunk: int | None = None, *,
                   operand_bytes: int = 2, weight_bytes: int = 2, unscale_dw: bool = False) -> tuple[int, int]:
    """Slab shape (token_chunk, vocab_chunk) of the backward: least ``slab_traffic`` within
    ``SLAB_BYTES`` of working memory.

    Working memory: the dlogits slab, token_chunk x vocab_chunk x operand_bytes, plus the fp32
    [vocab_chunk, D] dW scratch of a 16-bit weight when there are several token chunks (or
    ``unscale_dw``: fp16 dlogits carry a scale to undo). Candidates: vocab_chunk = V or a
    power-of-two multiple of 256 below it (whole tiles), each with the most tokens that fit.

    Why not all tokens x whatever columns fit (the shape before): the dh update of each
    vocabulary chunk is a GEMM with K = vocab_chunk that reads and writes the whole fp32 dh. At
    N = 32768, V = 151936, D = 4096 the 2048-column chunks made 75 read-modify-writes of 512 MiB:
    80 GB, ~24 ms at 3.35 TB/s beside a ~58 ms dh GEMM at 700 TFLOP/s. This picks 8192 tokens x
    4096 columns there (38 chunks, K = 4096) and sums dW over four token chunks instead: 61 GB
    in all. At N <= 16384 all tokens fit at >= 4096 columns, and dW needs no scratch.
    An explicit token_chunk / vocab_chunk is kept (clamped to N / V).
    """
    if token_chunk is not None and vocab_chunk is not None:
        return min(token_chunk, N), min(vocab_chunk, V)

    def memory(n: int, v: int) -> tuple[int, bool]:  # (bytes, whether dW needs the scratch)
        scratch = weight_bytes < 4 and (n < N or unscale_dw)
        return n * v * operand_bytes + (v * D * 4 if scratch else 0), scratch

    widths = [min(vocab_chunk, V)] if vocab_chunk is not None else \
        [V] + [256 << i for i in range(V.bit_length()) if (256 << i) < V]
    best = None
    for v in widths:
        if token_chunk is not None:
            n = min(token_chunk, N)
        elif memory(N, v)[0] <= SLAB_BYTES:
            n = N
        else:  # several token chunks: a 16-bit weight's dW goes through the scratch
            n = min(N, (SLAB_BYTES - (v * D * 4 if weight_bytes < 4 else 0)) // (v * operand_bytes))
        mem, scratch = memory(max(n, 1), v)
        if n < 1 or (mem > SLAB_BYTES and vocab_chunk is None):
            continue
        key = (slab_traffic(N, V, D, n, v, weight_bytes=weight_bytes, dw_scratch=scratch), mem)
        if best is None or key < best[0]:
            best = (key, n, v)
    if best is None:  # nothing fits the budget (a huge D): the narrowest slab of one tile
        return min(token_chunk or 1, N), min(vocab_chunk or 256, V)
    return best[1], best[2]


def logprobs_entropy_bwd(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
    lse: torch.Tensor, entropy: torch.Tensor, grad_logprobs: torch.Tensor, grad_entropy: torch.Tensor | None, *,
    inv_temperature: float, softcap: float | None, upcast_operands: bool, input_precision: str,
    operand_dtype: torch.dtype, deterministic: bool, needs: tuple[bool, bool, bool],
    token_chunk: int | None = None, vocab_chunk: int | None = None, gemm_choice: str | None = None,
    dlogits_config: dict | None = None, matmul_config: dict | None = None,
):
    """Backward sweep: check, allocate, launch. Returns (d_hidden, d_weight, d_bias) or Nones.

    Args:
        hidden [N, D], weight [V, D], bias [V] | None: any strides (expanded, offset views).
        targets [N] int64 (-1: ignored), lse / entropy / grad_* [N] fp32 (grads already 0 at
            ignored tokens): made contiguous here (O(N)). grad_entropy None: the entropy
            carries no gradient; its term e p (log p + H) is skipped (a constexpr flag).
        operand_dtype: dtype of the stored dlogits slab (the GEMM operand dtype).
        gemm_choice: "cublas" | "torch-fp32" | "triton" (default: ``kernels.gemm.gemm_impl``).
        dlogits_config, matmul_config: pin the Triton tile configs (default: the table).
    Returns:
        d_hidden fp32 [N, D] (or None), d_weight fp32 or weight's dtype [V, D], d_bias fp32 [V].
    """
    N, D = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    need_dh, need_dw, need_db = needs
    # the kernel indexes the per-token vectors as ptr + n
    targets, lse, entropy, grad_logprobs = (x.contiguous() for x in (targets, lse, entropy, grad_logprobs))
    grad_entropy = grad_entropy.contiguous() if grad_entropy is not None else None
    impl = gemm_choice or gemm_impl(operand_dtype, dev, deterministic)
    scale = dlogits_scale(grad_logprobs, grad_entropy, entropy, inv_temperature) \
        if operand_dtype == torch.float16 else None
    n_chunk, v_chunk = default_chunks(N, V, D, token_chunk, vocab_chunk, operand_bytes=operand_dtype.itemsize,
                                      weight_bytes=weight.element_size(), unscale_dw=scale is not None)
    # dW is summed in an fp32 scratch and rounded once to a 16-bit weight's dtype when the
    # token sum is split or must be unscaled; otherwise one product writes it directly
    dw_scratch = need_dw and weight.dtype != torch.float32 and (n_chunk < N or scale is not None)
    pinned = dlogits_config is not None
    config = dlogits_config or default_config(
        "dlogits", dev, operand_kind(torch.float32 if upcast_operands else operand_dtype, input_precision),
        D, V, interpreting(), epilogue="plain" if softcap is None else "softcap")
    products = dict(impl=impl, upcast_operands=upcast_operands, input_precision=input_precision,
                    deterministic=deterministic, config=matmul_config)

    d_hidden = torch.empty(N, D, dtype=torch.float32, device=dev) if need_dh else None
    d_bias = torch.zeros(V, dtype=torch.float32, device=dev) if need_db else None
    d_weight = dw_acc = None
    if need_dw:
        d_weight = torch.empty(V, D, dtype=torch.float32 if weight.dtype == torch.float32 else weight.dtype,
                               device=dev)
        if dw_scratch:
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
                hidden_ptr=h, weight_ptr=w, bias_ptr=bias[v0:v1] if bias is not None else None,
                targets_ptr=targets[n0:n1], lse_ptr=lse[n0:n1], entropy_ptr=entropy[n0:n1],
                grad_logprobs_ptr=grad_logprobs[n0:n1],
                grad_entropy_ptr=grad_entropy[n0:n1] if grad_entropy is not None else None,
                dlogits_scale_ptr=scale, dlogits_ptr=dlogits,
                N=n1 - n0, V=v1 - v0, D=D, v_start=v0,
                stride_hn=h.stride(0), stride_hd=h.stride(1),
                stride_wv=w.stride(0), stride_wd=w.stride(1),
                stride_b=bias.stride(0) if bias is not None else 0,
                stride_dn=dlogits.stride(0), stride_dv=dlogits.stride(1),
                inv_temperature=inv_temperature, softcap=softcap,
                inv_softcap=None if softcap is None else 1.0 / softcap,
                UPCAST_OPERANDS=upcast_operands, INPUT_PRECISION=input_precision,
            )
            grid = lambda meta: (triton.cdiv(meta["N"], meta["BLOCK_N"]) * triton.cdiv(meta["V"], meta["BLOCK_V"]),)  # noqa: E731
            launch(DLOGITS, grid, args, config=config, deterministic=deterministic, pinned=pinned)

            if need_dh:  # dh[n] (+)= dlogits @ W[v]
                gemm(dlogits, w, d_hidden[n0:n1], accumulate=v0 > 0, **products)
            if need_dw:  # dW[v] (+)= dlogits^T @ h[n]
                target = dw_acc[: v1 - v0] if dw_acc is not None else d_weight[v0:v1]
                gemm(dlogits.T, h, target, accumulate=n0 > 0, **products)
            if need_db:
                d_bias[v0:v1] += dlogits.sum(0, dtype=torch.float32)
        if dw_acc is not None:  # one rounding to the weight's dtype; unscaling by 2^-k is exact
            acc = dw_acc[: v1 - v0]
            if scale is not None:
                torch.mul(acc, scale.reciprocal(), out=d_weight[v0:v1])
            else:
                d_weight[v0:v1].copy_(acc)
    if scale is not None:
        inv_scale = scale.reciprocal()
        for grad in (d_hidden, d_bias):  # (d_weight was unscaled above: fp16 dW always has dw_acc)
            if grad is not None:
                grad.mul_(inv_scale)
    return d_hidden, d_weight, d_bias
