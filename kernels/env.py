"""Environment switches of the kernels, readable without importing triton.

``fused_pg`` asks these questions before it decides to load any Triton code, so this module
must stay importable on machines without triton (it imports only ``os``).

* ``TRITON_INTERPRET=1``: Triton kernels run on CPU tensors under the interpreter (tests).
* ``FUSED_PG_AUTOTUNE=1``: search tile configs by timing instead of the documented defaults.
* ``FUSED_PG_GEMM``: which GEMM computes the backward's ``dh`` and ``dW`` products
  (``auto`` | ``triton`` | ``cublas`` | ``torch-fp32``; see ``kernels.gemm.gemm_impl``).
"""

from __future__ import annotations

import os

GEMM_CHOICES = ("auto", "triton", "cublas", "torch-fp32")


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def interpreting() -> bool:
    """True when kernels run under TRITON_INTERPRET=1 (CPU tensors, numpy semantics)."""
    return _flag("TRITON_INTERPRET")


def autotune_requested() -> bool:
    """Autotuning is opt-in (FUSED_PG_AUTOTUNE=1): the documented default configs are
    deterministic, and tuning by timing could pick different tiles from run to run. Never
    under the interpreter (it has no GPU timer)."""
    return _flag("FUSED_PG_AUTOTUNE") and not interpreting()


def gemm_requested() -> str:
    """The backward GEMM asked for with FUSED_PG_GEMM (default ``"auto"``)."""
    value = os.environ.get("FUSED_PG_GEMM", "auto") or "auto"
    if value not in GEMM_CHOICES:
        raise ValueError(f"FUSED_PG_GEMM must be one of {GEMM_CHOICES}, got {value!r}")
    return value
