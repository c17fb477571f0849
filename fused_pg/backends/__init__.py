"""Vocabulary-sweep backends behind one small protocol, and the one place that picks them.

A backend turns flat LM-head inputs into per-token log-probabilities and entropies::

    hidden [N, D], weight [V, D], bias [V] | None, targets [N] int64 (-1: not counted)
        -> logprobs [N], entropy [N]   (0 where targets < 0)

A target ``>= V`` means "the row counts, its target logit is not in this weight" (one rank's
slice of a vocabulary-parallel head, :data:`fused_pg.parallel.OFF_SHARD`): entropy and
log-sum-exp are those of this weight's rows, the log-prob is ``-lse``, and the backward sweep
has no one-hot term for the row.

Two kinds exist:

* **sweep backends** (``"torch"``, ``"triton"``) provide ``forward_sweep`` (online
  log-sum-exp, entropy and target logit, tile by tile) and ``backward_sweep`` (logits
  recomputed tile by tile, given the per-token ``g = dL/dlogp`` and ``e = dL/dH``);
  :class:`fused_pg.backends.sweep.Sweep` wires them into autograd.
* **autograd backends** (``"reference"``) return differentiable outputs themselves.

Capabilities (``fp64``, ``tf32``, the devices a backend runs on) are declared here, next to
the registry, so argument checks read them instead of chains of special cases.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

import torch

from .. import checks
from ..config import BACKENDS
from ..kernels.env import interpreting  # triton-free: decides before any Triton code loads
from . import materialized, torch_chunked


@dataclass(frozen=True)
class Backend:
    """One backend: its module and what it can do.

    module:   ``fused_pg.backends.<module>``; a sweep backend defines ``forward_sweep`` and
              ``backward_sweep``, an autograd backend ``logprobs_entropy``.
    sweeps:   True for a sweep backend (wrapped by :class:`~fused_pg.backends.sweep.Sweep`).
    fp64:     accepts float64 inputs.
    tf32:     implements ``precision="tf32"``.
    skips_invalid_rows: rows with ``targets < 0`` never enter a product inside the backend
              (so NaN padding rows cannot leak); otherwise the caller zeroes them first.
    """

    name: str
    module: str
    sweeps: bool
    fp64: bool
    tf32: bool
    skips_invalid_rows: bool = False

    def load(self) -> ModuleType:
        """The implementation module. Every one is imported with this package where it can be
        (``torch.compile`` cannot trace an import inside a compiled region); the Triton one
        only where triton imports (it stays an optional dependency), else on first use, which
        then raises the error that names the package."""
        module = _LOADED.get(self.module)
        if module is None:
            try:
                module = importlib.import_module(f"{__name__}.{self.module}")
            except ImportError as err:
                if err.name is None or err.name.split(".")[0] != "triton":
                    raise
                raise ImportError(
                    f"backend={self.name!r} needs the triton package, which is not importable here "
                    f"({err}); install it with `pip install triton` (Linux), or use backend='torch'"
                ) from err
            _LOADED[self.module] = module
        return module

    def check(self, device: torch.device, dtypes: tuple[torch.dtype, ...], precision: str) -> None:
        """Refuse, by name, inputs or options this backend cannot honour."""
        if self.module.startswith("triton") and device.type != "cuda" and not interpreting():
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run the "
                             "kernels on CPU, for tests); use backend='torch' on CPU")
        if not self.fp64 and torch.float64 in dtypes:
            raise TypeError(f"backend={self.name!r} supports float16, bfloat16 and float32 inputs; "
                            "use backend='torch' or 'reference' for float64")
        if precision == "tf32" and not self.tf32:
            raise ValueError(f"precision='tf32' is only implemented by backend='triton', "
                             f"not backend={self.name!r}")


_LOADED: dict[str, ModuleType] = {"torch_chunked": torch_chunked, "materialized": materialized}

REGISTRY: dict[str, Backend] = {
    "torch": Backend("torch", "torch_chunked", sweeps=True, fp64=True, tf32=False, skips_invalid_rows=True),
    "triton": Backend("triton", "triton_fused", sweeps=True, fp64=False, tf32=True),
    "reference": Backend("reference", "materialized", sweeps=False, fp64=True, tf32=False),
}
# backend="auto" on CUDA: the Triton sweeps, on the torch backend where a kernel cannot be
# compiled or launched on the device (one warning; see ``triton_fused``)
AUTO_CUDA = Backend("auto", "triton_failsafe", sweeps=True, fp64=False, tf32=True)


def resolve(backend: str, device: torch.device) -> Backend:
    """The backend for a ``backend=`` argument: ``"auto"`` is the fail-safe Triton backend on
    CUDA (``AUTO_CUDA``), torch otherwise."""
    checks.choice("backend", backend, BACKENDS)
    if backend == "auto":
        return AUTO_CUDA if device.type == "cuda" else REGISTRY["torch"]
    return REGISTRY[backend]


def _preload_triton() -> None:
    """Import the Triton backend with this package when triton is importable, so that a first
    use of backend="triton" or "auto" inside ``torch.compile`` finds it loaded."""
    try:
        REGISTRY["triton"].load()
    except Exception:  # noqa: BLE001  (no usable triton: backend="triton" raises it when asked for)
        pass


_preload_triton()
