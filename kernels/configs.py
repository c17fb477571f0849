"""Tile configs of the Triton kernels: the default table per GPU family, the interpreter's
configs and the autotune search spaces. Pure Python (no triton import): readable and testable
anywhere.

A config is one dict of meta-parameters plus ``num_warps`` / ``num_stages``:

    fwd, dlogits:  BLOCK_N (tokens) x BLOCK_V (vocabulary) logits tile, BLOCK_D (hidden) step,
                   GROUP_N token blocks per launch group (see ``utils.grouped_tile``)
    matmul:        BLOCK_M x BLOCK_N output tile, BLOCK_K step, GROUP_M row blocks per group

``TABLE`` holds one ``Row`` per measured point: GPU family, kernel, GEMM operand kind, the
sweep's epilogue and the (D, V) shape it was measured at. ``lookup`` takes the family's rows of
that kernel, operand kind and epilogue (the family's plain-epilogue rows when it has no
soft-cap row; the ``fallback`` family's when it has neither) and returns the config of the
row nearest in (log2 D, log2 V). New rows come from ``kernels.tuning.sweep`` (``format_row``
prints them in this format). Where nothing was measured a row says so and why it was chosen.

Operand kinds (``OPERANDS``): how the kernel multiplies, not only what it loads:

    "bf16", "fp16"  16-bit operands on tensor cores (wgmma on sm90, mma.sync on sm80)
    "tf32"          fp32 operands on tensor cores: precision "tf32" (one TF32 product) and
                    "tf32x3" (3xTF32, see ``fused_pg.backends.triton_fused.dot_mode``)
    "fp32"          IEEE fp32 products (precision "ieee"): CUDA-core FMAs, no tensor cores

Every config must compile for its family's GPUs with real launch specialisation, fit their
shared memory and keep the K loop free of register spills: ``tests/test_kernel_compile.py``
checks each row without a GPU (sm90: 227 KiB per block, sm80: 163 KiB).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

KINDS = ("fwd", "dlogits", "matmul")
FAMILIES = ("sm90", "sm80", "fallback")
OPERANDS = ("bf16", "fp16", "tf32", "fp32")
EPILOGUES = ("plain", "softcap")  # the sweeps' per-logit work after the dot (matmul: plain only)
LAUNCH_KEYS = ("num_warps", "num_stages")
META_KEYS = {
    "fwd": ("BLOCK_N", "BLOCK_V", "BLOCK_D", "GROUP_N"),
    "dlogits": ("BLOCK_N", "BLOCK_V", "BLOCK_D", "GROUP_N"),
    "matmul": ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"),
}


@dataclass(frozen=True)
class Row:
    """One measured (or explicitly unmeasured) default: where it applies and where it is from."""

    family: str     # "sm90" (Hopper), "sm80" (A100), "fallback" (every other device)
    kind: str       # "fwd" | "dlogits" | "matmul"
    dtype: str      # operand kind (``OPERANDS``): "bf16" | "fp16" | "tf32" | "fp32"
    D: int          # head shape the row was measured at (nearest row wins); the matmul is
    V: int          # looked up with D = its output width and V = its reduction length
    config: dict
    source: str = ""
    epilogue: str = "plain"  # "softcap": the sweep's soft-cap epilogue (tanh per logit)


def sweep_config(bn, bv, bd, group, warps, stages) -> dict:
    return dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, GROUP_N=group, num_warps=warps, num_stages=stages)


def matmul_config(bm, bn, bk, group, warps, stages) -> dict:
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group, num_warps=warps, num_stages=stages)


# The generic 128x128 tile, for what the measured rows do not cover (on an H100 at N=16384,
# D=4096, V=151936, bf16, ungrouped: forward 68.2 ms and dlogits 68.2 ms, 2.44x a GEMM).
_GENERIC_SWEEP = sweep_config(128, 128, 64, 8, 8, 3)
_GENERIC_MATMUL = matmul_config(128, 128, 64, 8, 8, 3)
# H100 tile sweep, bf16, N=16384, D=4096, V=151936 (torch 2.11, triton 3.6, token-block-fastest
# launch order): forward 128x256x64/w8/s4 38.3 ms (s3 39.7, 256x128x64/w8/s3 47.1, default 68.2);
# dlogits 128x256x64/w8/s4 40.6 ms (256x128x64/w8/s4 41.8, default 68.2). GROUP_N=8 is the
# grouping that took dlogits from 2.44x to 1.44x a GEMM at the 128x128 tile; the combination of
# this tile with the grouped order is not measured yet.
_H100_SWEEP = sweep_config(128, 256, 64, 8, 8, 4)

_UNMEASURED = "not measured: the tile used before this table existed"
_H100_D, _H100_V = 4096, 151936

# Tiles chosen without a GPU, by compiling for the target (tests/test_kernel_compile.py): the
# smallest change from the measured tile that fits the target's shared memory and keeps every
# register spill out of the K loop. Their speed is not measured.
# * soft-cap epilogue: tanh per logit needs more registers than the 128 x 256 / 8-warp tile
#   leaves (its 128 fp32 accumulators per thread already take half of the 255): ptxas spilled
#   0.5-1.1 KB per thread in the epilogue of every vocabulary tile. A 128 x 128 tile holds 64.
_SOFTCAP_SWEEP = sweep_config(128, 128, 64, 8, 8, 4)
# * tf32 / 3xTF32 (fp32 operands on tensor cores): 4-byte operands double the shared memory of
#   a stage, so BLOCK_D halves (128 x 128 x 32: 32 KiB per stage). On sm80 the mma.sync operands
#   live in registers, and 3xTF32 splits each into two: BLOCK_D 32 spilled 0.4-0.6 KB per
#   thread inside the K loop there, BLOCK_D 16 none.
_TF32_SWEEP = sweep_config(128, 128, 32, 8, 8, 4)
_TF32_SWEEP_MMA_SYNC = sweep_config(128, 128, 16, 8, 8, 4)
_TF32_MATMUL = matmul_config(128, 128, 32, 8, 8, 4)
# * IEEE fp32 (CUDA-core FMAs): the dot's operands live in registers, BLOCK_D x (BLOCK_N +
#   BLOCK_V) of them per K step; the 128 x 128 x 64 tile spilled ~5.8 KB per thread inside
#   the K loop.
_FP32_SWEEP = sweep_config(64, 64, 16, 8, 4, 3)
_FP32_MATMUL = matmul_config(64, 64, 16, 8, 4, 3)
_COMPILED = "not measured: chosen by compiling for the target (no spill in the K loop)"

TABLE: list[Row] = [
    # ---- sm90 (H100 80GB HBM3), measured at N=16384 -----------------------------------------
    Row("sm90", "fwd", "bf16", _H100_D, _H100_V, _H100_SWEEP,
        "H100 tile sweep: 38.3 ms vs 68.2 ms for 128x128x64/w8/s3"),
    Row("sm90", "dlogits", "bf16", _H100_D, _H100_V, _H100_SWEEP,
        "H100 tile sweep: 40.6 ms vs 68.2 ms for 128x128x64/w8/s3"),
    Row("sm90", "fwd", "fp16", _H100_D, _H100_V, _H100_SWEEP,
        "not measured: bf16's row (same tile footprint and tensor-core rate)"),
    Row("sm90", "dlogits", "fp16", _H100_D, _H100_V, _H100_SWEEP,
        "not measured: bf16's row (same tile footprint and tensor-core rate)"),
    Row("sm90", "matmul", "bf16", _H100_D, _H100_V, _GENERIC_MATMUL,
        "H100 profile: dh + dW 91.8 ms in all at N=16384 (cuBLAS ~56 ms: used instead where available)"),
    *[Row("sm90", kind, dtype, _H100_D, _H100_V, _SOFTCAP_SWEEP, _COMPILED, epilogue="softcap")
      for kind in ("fwd", "dlogits") for dtype in ("bf16", "fp16")],
    *[Row("sm90", kind, "tf32", _H100_D, _H100_V, _TF32_MATMUL if kind == "matmul" else _TF32_SWEEP, _COMPILED)
      for kind in KINDS],
    *[Row("sm90", kind, "fp32", _H100_D, _H100_V, _FP32_MATMUL if kind == "matmul" else _FP32_SWEEP, _COMPILED)
      for kind in KINDS],
    # ---- sm80 (A100): no rows yet, lookup uses the fallback rows -----------------------------
    # ---- fallback: every other device, and every kernel / operand kind not listed above ------
    *[Row("fallback", kind, dtype, _H100_D, _H100_V,
          _GENERIC_MATMUL if kind == "matmul" else _GENERIC_SWEEP, _UNMEASURED)
      for kind in KINDS for dtype in ("bf16", "fp16")],
    *[Row("fallback", kind, "tf32", _H100_D, _H100_V, _TF32_MATMUL if kind == "matmul" else _TF32_SWEEP_MMA_SYNC,
          _COMPILED) for kind in KINDS],
    *[Row("fallback", kind, "fp32", _H100_D, _H100_V, _FP32_MATMUL if kind == "matmul" else _FP32_SWEEP, _COMPILED)
      for kind in KINDS],
]

# Under TRITON_INTERPRET=1 the cost is (program instances) x (loop trips) of numpy work: few,
# large tiles. GROUP 2 keeps the grouped order non-trivial on the tests' small shapes.
INTERPRETER: dict[str, dict] = {
    "fwd": sweep_config(32, 64, 32, 2, 4, 1),
    "dlogits": sweep_config(32, 64, 32, 2, 4, 1),
    "matmul": matmul_config(64, 64, 64, 2, 4, 1),
}


def operand_kind(dtype: torch.dtype, input_precision: str) -> str:
    """Table key of how a kernel multiplies (``OPERANDS``): the dtype of its dot operands
    (after any upcast) and, for fp32 operands, the product precision."""
    if dtype in (torch.bfloat16, torch.float16):
        return "bf16" if dtype == torch.bfloat16 else "fp16"
    return "fp32" if input_precision == "ieee" else "tf32"


def gpu_family(device: torch.device) -> str:
    """"sm90" for Hopper (H100/H200), "sm80" for A100, "fallback" for anything else."""
    if device.type != "cuda" or getattr(torch.version, "hip", None):
        return "fallback"
    major, minor = torch.cuda.get_device_capability(device)
    if major == 9:
        return "sm90"
    if (major, minor) == (8, 0):
        return "sm80"
    return "fallback"


def lookup(kind: str, family: str, dtype: str, D: int, V: int, epilogue: str = "plain") -> dict:
    """Config of the table row nearest to (D, V) in log2 distance, for this family, kernel,
    operand kind and epilogue. Without such rows: the family's plain-epilogue rows, then the
    ``fallback`` family's rows (same order). A fresh dict."""
    if kind not in KINDS or dtype not in OPERANDS or epilogue not in EPILOGUES:
        raise ValueError(f"no configs for kernel {kind!r} / operands {dtype!r} / epilogue {epilogue!r}")
    rows = []
    for fam in (family, "fallback"):
        for epi in dict.fromkeys((epilogue, "plain")):
            rows = rows or [r for r in TABLE
                            if (r.family, r.kind, r.dtype, r.epilogue) == (fam, kind, dtype, epi)]
    dist = lambda r: abs(math.log2(max(D, 1) / r.D)) + abs(math.log2(max(V, 1) / r.V))  # noqa: E731
    return dict(min(rows, key=dist).config)


def default_config(kind: str, device: torch.device, operands: str, D: int, V: int,
                   interpreter: bool, epilogue: str = "plain") -> dict:
    """The config a kernel launches with unless the caller passes one (or autotuning is on);
    ``operands`` is an ``operand_kind``."""
    if interpreter:
        return dict(INTERPRETER[kind])
    return lookup(kind, gpu_family(device), operands, D, V, epilogue)


# ---------------------------------------------------------------------------------------
# search spaces (FUSED_PG_AUTOTUNE=1 and kernels.tuning.sweep)
# ---------------------------------------------------------------------------------------

_SWEEP_TILES = [  # BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages
    (128, 256, 64, 8, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 4), (256, 128, 64, 8, 3),
    (128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4), (128, 128, 128, 8, 2),
    (64, 256, 64, 8, 3),
]
_MATMUL_TILES = [  # BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages
    (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (256, 128, 64, 8, 3),
    (128, 128, 64, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
]


def pathological(kind: str, config: dict) -> bool:
    """Configs measured to be an order of magnitude slow: fewer than 8 warps on a tile with a
    256-wide side (H100, bf16, the sweeps: 275-316 ms vs 38-41 ms; the 128 x 256 fp32
    accumulator no longer fits the registers of 4 warps)."""
    a, b = (config["BLOCK_M"], config["BLOCK_N"]) if kind == "matmul" else (config["BLOCK_N"], config["BLOCK_V"])
    return config["num_warps"] < 8 and max(a, b) >= 256


def search_space(kind: str, groups: tuple[int, ...] = (8,)) -> list[dict]:
    """Candidate configs of a kernel (GROUP values as given); ``pathological`` ones are
    filtered out, so a tile added to the lists above cannot bring them back."""
    if kind == "matmul":
        space = [matmul_config(bm, bn, bk, g, w, s) for bm, bn, bk, w, s in _MATMUL_TILES for g in groups]
    elif kind in ("fwd", "dlogits"):
        space = [sweep_config(bn, bv, bd, g, w, s) for bn, bv, bd, w, s in _SWEEP_TILES for g in groups]
    else:
        raise ValueError(f"unknown kernel kind {kind!r}; expected one of {KINDS}")
    return [c for c in space if not pathological(kind, c)]
