"""The GEMM floor: the time of the matrix products any exact LM-head loss must do.

Measured in the same run, on the same device and dtype, with plain ``torch.matmul``:

* ``logits``:      ``h [N, D] @ W.T``      -> ``[N, V]``   (forward sweep; recomputed in backward)
* ``grad_hidden``: ``dZ [N, V] @ W``       -> ``[N, D]``
* ``grad_weight``: ``dZ.T [V, N] @ h``     -> ``[V, D]``

Each is ``2 N D V`` FLOPs. Floors: forward = 1 GEMM (``logits``); backward with
recomputation = 3 GEMMs (``logits + grad_hidden + grad_weight``); forward+backward =
4 GEMMs. An implementation's *floor ratio* is its time over the floor (1.0 = as fast as
the GEMMs alone); its *TFLOP/s* is the floor's FLOP count (``2NDV`` forward, ``6NDV``
backward, ``8NDV`` both) over its time, whatever it actually executes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .config import Shape
from .timing import Stats, time_op


def flops(shape: Shape) -> dict[str, float]:
    """FLOP counts of the floor model for ``fwd``, ``bwd`` and ``fwd_bwd``."""
    gemm = 2.0 * shape.n * shape.d * shape.v
    return {"fwd": gemm, "bwd": 3 * gemm, "fwd_bwd": 4 * gemm}


@dataclass(frozen=True)
class Floor:
    shape: Shape
    logits: Stats
    grad_hidden: Stats
    grad_weight: Stats

    @property
    def ms(self) -> dict[str, float]:
        fwd = self.logits.median
        bwd = self.logits.median + self.grad_hidden.median + self.grad_weight.median
        return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}

    def tflops(self) -> float:
        """Achieved TFLOP/s of the 4 GEMMs."""
        return flops(self.shape)["fwd_bwd"] / (self.ms["fwd_bwd"] * 1e-3) / 1e12

    def as_dict(self) -> dict:
        return {
            "n": self.shape.n, "d": self.shape.d, "v": self.shape.v,
            "gemm_ms": {"logits": self.logits.as_dict(), "grad_hidden": self.grad_hidden.as_dict(),
                        "grad_weight": self.grad_weight.as_dict()},
            "floor_ms": self.ms,
            "tflops": self.tflops(),
        }


def measure_floor(hidden: Tensor, weight: Tensor, *, warmup: int, repeats: int) -> Floor:
    """Time the three GEMM shapes on the benchmark's own operands (hidden [.., D], weight [V, D]).

    Allocates one ``[N, V]`` product in the input dtype, freed afterwards.
    """
    h = hidden.detach().reshape(-1, hidden.shape[-1])
    w = weight.detach()
    shape = Shape(h.shape[0], h.shape[1], w.shape[0])
    device = h.device
    z = torch.empty(shape.n, shape.v, device=device, dtype=h.dtype)
    with torch.no_grad():
        t_logits = time_op(lambda: torch.matmul(h, w.T, out=z), device, warmup, repeats)
        t_dh = time_op(lambda: z @ w, device, warmup, repeats)
        t_dw = time_op(lambda: z.T @ h, device, warmup, repeats)
    del z
    return Floor(shape, t_logits, t_dh, t_dw)
