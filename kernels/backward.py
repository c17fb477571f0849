"""Backward vocabulary sweep: gradients of hidden, weight and bias.

For each [token chunk x vocabulary chunk] slab (default: all tokens x a vocabulary chunk):

1. ``_dlogits_kernel`` recomputes the logits tile by tile (same GEMM as the forward, same
   grouped launch order) and writes dL/dlogit for the slab, formed in fp32 and stored in the
   GEMM operand dtype::

       dL/dz_v = g (1[v = y] - p_v) - e p_v (log p_v + H)      p_v = exp(z_v - lse)
       softcap:      dz/du = 1 - (z / c)^2
       temperature:  du/dlogit = 1 / tau

   with per-token ``g = dL/dlogp`` and ``e = dL/dH`` from the loss epilogue; fp16 slabs are
   stored times one power of two (``dlogits_scale``) so that small entries do not flush to 0.
2. ``dh[chunk] += dlogits @ W[chunk]``       (fp32 accumulator across vocabulary chunks)
3. ``dW[chunk] (+)= dlogits^T @ h[chunk]``   (fp32; K = all the chunk's tokens in one product)

Steps 2 and 3 run on cuBLAS or the Triton matmul (``kernels.gemm``). Four GEMM-sized passes
in all with the forward (the "4-GEMM floor"), no atomics anywhere: every output tile has one
owner, so results are bitwise reproducible for a fixed config (and cuBLAS under its own
conditions, see ``kernels.gemm``).

Memory beyond inputs and gradients: one dlogits slab of ``token_chunk x vocab_chunk``
(default: all tokens x as many columns as fit ``DLOGITS_BUDGET`` elements), the fp32 ``dh``
accumulator [N, D], and, for a 16-bit weight whose dW is summed in fp32 first (several token
chunks, scaled fp16 dlogits, or the cuBLAS path), an fp32 [vocab_chunk, D] scratch (the default
vocabulary chunk is then capped so that it also fits ``DLOGITS_BUDGET`` elements). Never N x V.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .configs import default_config
from .env import interpreting
from .gemm import gemm, gemm_impl
from .launch import Tunable, launch
from .utils import grouped_tile, logits_tile

DLOGITS_BUDGET = 1 << 26  # elements of the dlogits slab (128 MiB in bf16)
# fp16 dlogits are scaled so that their largest possible magnitude is at most this: 4x below
# fp16's largest value (65504), and 2^28 above its smallest normal (6.1e-5).
FP16_DLOGITS_MAX = 2.0 ** 14


@triton.heuristics({
    "HAS_BIAS": lambda args: args["bias_ptr"] is not None,
    "HAS_SOFTCAP": lambda args: args["softcap"] is not None,
    "HAS_SCALE": lambda args: args["dlogits_scale_ptr"] is not None,
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
    inv_temperature, softcap,
    # meta
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SCALE: tl.constexpr,
    UPCAST_OPERANDS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
):
    """dL/dlogits for one [BLOCK_N, BLOCK_V] tile of the slab (pointers pre-offset to it).

    hidden [N, D], weight [V, D], bias [V], dlogits [N, V] (any strides); targets, lse,
    entropy, grad_* [N] contiguous; dlogits_scale [1] fp32 (fp16 slabs only).
    """
    pid_n, pid_v = grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(V, BLOCK_V), GROUP_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_n = offs_n < N
    mask_v = offs_v < V

    # ---- 1. recompute the logits tile ------------------------------------------------------
    z = logits_tile(hidden_ptr, weight_ptr, bias_ptr, offs_n, offs_v, N, V, D,
                    stride_hn, stride_hd, stride_wv, stride_wd, stride_b, inv_temperature, softcap,
                    HAS_BIAS, HAS_SOFTCAP, UPCAST_OPERANDS, INPUT_PRECISION,
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

    # ---- 4. store (fp16: times 2^k, undone exactly on the fp32 results) ---------------------
    if HAS_SCALE:
        dz *= tl.load(dlogits_scale_ptr)
    # int64: N * stride_dn passes 2^31 for a slab of more than 2^31 elements
    d_ptrs = dlogits_ptr + offs_n.to(tl.int64)[:, None] * stride_dn + offs_v.to(tl.int64)[None, :] * stride_dv
    tl.store(d_ptrs, dz.to(dlogits_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_v[None, :])


# Autotuned on request (FUSED_PG_AUTOTUNE=1); it overwrites its output, so trials need no reset.
DLOGITS = Tunable(_dlogits_kernel, kind="dlogits", key=("V", "D"))


def dlogits_scale(grad_logprobs: torch.Tensor, grad_entropy: torch.Tensor, entropy: torch.Tensor,
                  inv_temperature: float) -> torch.Tensor:
    """[1] fp32 power of two 2^k for fp16 dlogits, computed on the device (no host sync).

    Why: with a large loss normaliser (num_items_in_batch = 65536) g and e are ~1e-5 per token
    and p_v ~1e-5 over most of the vocabulary, so dL/dz_v ~1e-10 is below fp16's smallest
    subnormal (6e-8) and stored as 0: dh lost ~2% (H100). bf16 storage would not underflow but
    the fp16 GEMM needs fp16 operands (converting W to bf16 rounds it to 8 bits), and per-token
    scales cannot be undone on dW = sum_t dz_t h_t; one scale for the whole sweep can, exactly.

    Bound per token (|1[v=y] - p_v| <= 1, p |log p| <= 1/e, 0 <= p_v H <= H; soft-cap slope <= 1)::

        |dL/dz_v| <= (|g| + |e| (1/e + H)) / tau

    k is the largest integer with 2^k * max_t bound_t <= FP16_DLOGITS_MAX, clamped to
    [-126, 126] (a normal fp32 scale and inverse); 2^0 when there is no gradient at all.
    """
    bound = (grad_logprobs.abs() + grad_entropy.abs() * (math.exp(-1.0) + entropy.abs())) * inv_temperature
    k = torch.floor(torch.log2(FP16_DLOGITS_MAX / bound.amax()))  # +inf when bound == 0
    k = torch.where(torch.isfinite(k), k, 0.0).clamp(-126.0, 126.0)
    return torch.exp2(k).reshape(1).float()


def default_chunks(N: int, V: int, D: int, token_chunk: int | None, vocab_chunk: int | None,
                   dw_scratch: bool) -> tuple[int, int]:
    """Slab shape: all tokens (when possible) x the widest vocabulary chunk in the budget.

    token_chunk x vocab_chunk <= DLOGITS_BUDGET (and vocab_chunk x D <= DLOGITS_BUDGET when dW
    goes through an fp32 [vocab_chunk, D] scratch); a default vocabulary chunk of 256 columns
    or more is rounded down to a multiple of 256 (whole tiles). Explicit chunks are kept.
    """
    n = min(token_chunk or max(1, DLOGITS_BUDGET // 1024), N)
    if vocab_chunk is None:
        vocab_chunk = max(1, DLOGITS_BUDGET // n)
        if dw_scratch:
            vocab_chunk = min(vocab_chunk, max(1, DLOGITS_BUDGET // max(D, 1)))
        if vocab_chunk >= 256:
            vocab_chunk -= vocab_chunk % 256
    return n, min(vocab_chunk, V)


def logprobs_entropy_bwd(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
    lse: torch.Tensor, entropy: torch.Tensor, grad_logprobs: torch.Tensor, grad_entropy: torch.Tensor, *,
    inv_temperature: float, softcap: float | None, upcast_operands: bool, input_precision: str,
    operand_dtype: torch.dtype, deterministic: bool, needs: tuple[bool, bool, bool],
    token_chunk: int | None = None, vocab_chunk: int | None = None, gemm_choice: str | None = None,
    dlogits_config: dict | None = None, matmul_config: dict | None = None,
):
    """Backward sweep: check, allocate, launch. Returns (d_hidden, d_weight, d_bias) or Nones.

    Args:
        hidden [N, D], weight [V, D], bias [V] | None: any strides (expanded, offset views).
        targets [N] int64 (-1: ignored), lse / entropy / grad_* [N] fp32 (grads already 0 at
            ignored tokens): made contiguous here (O(N)).
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
    targets, lse, entropy, grad_logprobs, grad_entropy = (
        x.contiguous() for x in (targets, lse, entropy, grad_logprobs, grad_entropy))
    impl = gemm_choice or gemm_impl(operand_dtype, dev, deterministic)
    scale = dlogits_scale(grad_logprobs, grad_entropy, entropy, inv_temperature) \
        if operand_dtype == torch.float16 else None
    n_chunk = min(token_chunk or max(1, DLOGITS_BUDGET // 1024), N)
    # dW is summed in an fp32 scratch and rounded once to a 16-bit weight's dtype when the
    # token sum is split, when it must be unscaled, or when cuBLAS writes it (fp32 out_dtype)
    dw_scratch = need_dw and weight.dtype != torch.float32 and (n_chunk < N or scale is not None or impl != "triton")
    n_chunk, v_chunk = default_chunks(N, V, D, n_chunk, vocab_chunk, dw_scratch)
    pinned = dlogits_config is not None
    config = dlogits_config or default_config("dlogits", dev, torch.float32 if upcast_operands else operand_dtype,
                                              D, V, interpreting())
    products = dict(impl=impl, upcast_operands=upcast_operands, input_precision=input_precision,
                    deterministic=deterministic, config=matmul_config)

    d_hidden = torch.zeros(N, D, dtype=torch.float32, device=dev) if need_dh else None
    d_bias = torch.zeros(V, dtype=torch.float32, device=dev) if need_db else None
    d_weight = dw_acc = None
    if need_dw:
        if weight.dtype == torch.float32:
            d_weight = torch.zeros(V, D, dtype=torch.float32, device=dev)
        else:
            d_weight = torch.empty(V, D, dtype=weight.dtype, device=dev)
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
                grad_logprobs_ptr=grad_logprobs[n0:n1], grad_entropy_ptr=grad_entropy[n0:n1],
                dlogits_scale_ptr=scale, dlogits_ptr=dlogits,
                N=n1 - n0, V=v1 - v0, D=D, v_start=v0,
                stride_hn=h.stride(0), stride_hd=h.stride(1),
                stride_wv=w.stride(0), stride_wd=w.stride(1),
                stride_b=bias.stride(0) if bias is not None else 0,
                stride_dn=dlogits.stride(0), stride_dv=dlogits.stride(1),
                inv_temperature=inv_temperature, softcap=softcap,
                UPCAST_OPERANDS=upcast_operands, INPUT_PRECISION=input_precision,
            )
            grid = lambda meta: (triton.cdiv(meta["N"], meta["BLOCK_N"]) * triton.cdiv(meta["V"], meta["BLOCK_V"]),)  # noqa: E731
            launch(DLOGITS, grid, args, config=config, deterministic=deterministic, pinned=pinned)

            if need_dh:  # dh[n] += dlogits @ W[v]
                gemm(dlogits, w, d_hidden[n0:n1], accumulate=True, **products)
            if need_dw:  # dW[v] (+)= dlogits^T @ h[n]
                if dw_acc is not None:
                    gemm(dlogits.T, h, dw_acc[: v1 - v0], accumulate=n0 > 0, **products)
                else:
                    gemm(dlogits.T, h, d_weight[v0:v1], accumulate=weight.dtype == torch.float32, **products)
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
