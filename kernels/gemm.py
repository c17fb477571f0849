"""The backward's two GEMM-sized products: which implementation, and the call for each.

Per [token chunk x vocabulary chunk] slab of dL/dlogits ``dz`` (16-bit or fp32)::

    dh[n] (+)= dz @ W[v]          fp32 accumulator across vocabulary chunks
    dW[v] (+)= dz^T @ h[n]        K = all tokens of the chunk in one product: fp32, or written
                                  straight into a 16-bit weight's dtype (one token chunk)

Implementations (``gemm_impl`` picks one; ``FUSED_PG_GEMM`` overrides it):

* ``"cublas"``: ``torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)`` and
  ``torch.mm(a, b, out_dtype=torch.float32, out=acc)`` (torch >= 2.8, CUDA only, bf16/fp16
  operands). cuBLAS multiplies the 16-bit operands with fp32 accumulation and writes fp32, so
  neither the running ``dh`` nor a split-K partial is ever rounded to 16 bits. A dW that is
  one product is written in the weight's dtype by ``torch.mm(a, b, out=dW)`` with split-K
  reductions held in fp32 (``fp32_reductions``): no fp32 scratch and no copy. Measured on an
  H100 per 16384 x 4096 x 4096 slab: dh 0.77-0.83 ms vs 1.40 ms for the Triton matmul, dW
  0.69-0.76 ms vs 1.08-1.33 ms, same error.
* ``"torch-fp32"``: the same products with both operands upcast to fp32 (exact products, fp32
  sums) on any device. The CPU stand-in that lets CI run the cuBLAS path's orchestration
  (single-K dW, fp32 scratch, unscaling); never chosen automatically.
* ``"triton"``: ``kernels.matmul`` (fp32 accumulator, one owner per output tile). Used for fp32
  operands (precision "tf32"/"ieee" and mixed dtypes: the kernel states the product precision,
  where cuBLAS would follow a global torch flag), under the interpreter, where ``out_dtype`` is
  missing (torch < 2.8, ROCm, CPU), and for ``deterministic=True`` when cuBLAS cannot promise it.

Reproducibility of cuBLAS (cuBLAS documentation, "Results reproducibility"): by design every
cuBLAS routine gives bitwise-identical results from run to run for a given toolkit version on
GPUs of the same architecture and SM count, but only while a single CUDA stream is active; with
concurrent streams it may pick different internal implementations, unless
``CUBLAS_WORKSPACE_CONFIG`` is ``:16:8`` or ``:4096:8`` (set before CUDA initialises, as
PyTorch's ``torch.use_deterministic_algorithms`` also requires). A library cannot know which
streams its caller runs (data-parallel communication, prefetching), so ``deterministic=True``
takes cuBLAS only with one of those settings and the Triton matmul otherwise.

Memory: none of its own; "torch-fp32" makes fp32 copies of its operands.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from .env import gemm_requested, interpreting
from .matmul import matmul

DETERMINISTIC_WORKSPACE_CONFIGS = (":16:8", ":4096:8")


@functools.lru_cache(maxsize=None)
def cublas_fp32_output(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch can accumulate a 16-bit product into an fp32 tensor with cuBLAS:
    ``addmm.dtype_out`` with an fp32 ``self``/``out`` (torch 2.8 had the overload but
    required ``self`` in the operands' dtype) and ``mm.dtype_out``. Probed once per device and
    dtype on 16 x 16 zeros; the checks that fail are argument checks on the host."""
    if device.type != "cuda" or getattr(torch.version, "hip", None):
        return False
    try:
        a = torch.zeros(16, 16, dtype=dtype, device=device)
        c = torch.zeros(16, 16, dtype=torch.float32, device=device)
        torch.addmm(c, a, a, out_dtype=torch.float32, out=c)
        torch.mm(a, a, out_dtype=torch.float32, out=c)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return True


def cublas_reproducible() -> bool:
    """cuBLAS promises bitwise reproducibility with concurrent streams (see module docstring)."""
    return os.environ.get("CUBLAS_WORKSPACE_CONFIG", "") in DETERMINISTIC_WORKSPACE_CONFIGS


def gemm_impl(operand_dtype: torch.dtype, device: torch.device, deterministic: bool) -> str:
    """``"cublas"`` | ``"torch-fp32"`` | ``"triton"``: who computes dh and dW (module docstring).

    ``operand_dtype`` is the dtype of the stored dlogits (= the GEMM operands). FUSED_PG_GEMM
    forces a choice for 16-bit operands ("cublas" must then be available); fp32 operands always
    take the Triton matmul.
    """
    if operand_dtype not in (torch.bfloat16, torch.float16):
        return "triton"
    requested = gemm_requested()
    if requested == "cublas" and not cublas_fp32_output(device, operand_dtype):
        raise ValueError("FUSED_PG_GEMM=cublas needs CUDA and torch >= 2.8 (mm/addmm with out_dtype)")
    if requested != "auto":
        return requested
    if interpreting() or not cublas_fp32_output(device, operand_dtype):
        return "triton"
    if deterministic and not cublas_reproducible():
        return "triton"
    return "cublas"


@contextlib.contextmanager
def fp32_reductions(dtype: torch.dtype):
    """cuBLAS sums split-K partial products in fp32 for GEMMs with ``dtype`` outputs while
    active. PyTorch lets cuBLAS reduce them in the output dtype by default
    (``torch.backends.cuda.matmul.allow_{bf16,fp16}_reduced_precision_reduction``): a dW
    written straight into bf16 could then carry several roundings to 8 bits instead of one.
    The flag is process-wide; it is restored on exit."""
    matmul_flags = torch.backends.cuda.matmul
    name = {torch.bfloat16: "allow_bf16_reduced_precision_reduction",
            torch.float16: "allow_fp16_reduced_precision_reduction"}.get(dtype)
    if name is None:
        yield
        return
    before = getattr(matmul_flags, name)
    setattr(matmul_flags, name, False)
    try:
        yield
    finally:
        setattr(matmul_flags, name, before)


def gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *, accumulate: bool, impl: str,
         upcast_operands: bool, input_precision: str, deterministic: bool,
         config: dict | None = None) -> None:
    """``out (+)= a @ b`` with fp32 accumulation, by ``impl``; a [M, K], b [K, N], out [M, N].

    ``out`` is fp32, or 16-bit without ``accumulate``: one rounding of the fp32-accumulated
    product (cuBLAS with fp32 split-K reductions, see ``fp32_reductions``).
    ``upcast_operands``, ``input_precision`` and ``config`` concern the Triton matmul only.
    """
    if out.dtype != torch.float32 and accumulate:
        raise ValueError(f"gemm accumulates into fp32 only, got out {out.dtype} with accumulate=True")
    if impl == "triton":
        matmul(a, b, out, accumulate=accumulate, upcast_operands=upcast_operands,
               input_precision=input_precision, deterministic=deterministic, config=config)
        return
    if out.dtype != torch.float32:  # one product written in out's dtype
        if impl == "cublas":
            with fp32_reductions(out.dtype):
                torch.mm(a, b, out=out)
        elif impl == "torch-fp32":
            out.copy_(torch.mm(a.float(), b.float()))
        else:
            raise ValueError(f"unknown gemm implementation {impl!r}")
        return
    if impl == "cublas":
        if accumulate:  # out += a @ b, fp32 accumulation inside cuBLAS, fp32 result
            torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
        else:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
    elif impl == "torch-fp32":
        if accumulate:
            out.addmm_(a.float(), b.float())
        else:
            torch.mm(a.float(), b.float(), out=out)
    else:
        raise ValueError(f"unknown gemm implementation {impl!r}")
