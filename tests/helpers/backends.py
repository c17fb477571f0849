"""The backends the tests run and what each may draw: dtypes, largest shapes, example budget.

Adding a backend to the property tests is one line in ``BACKENDS`` (plus, for a slow one, a
``LIMITS`` entry that caps shapes, dtypes and the number of examples).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BACKENDS = ["torch", "reference", "triton"]

DTYPES = {  # name -> (hidden dtype, weight/bias dtype)
    "fp64": (torch.float64, torch.float64),
    "fp32": (torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "fp16": (torch.float16, torch.float16),
    "bf16+fp32": (torch.bfloat16, torch.float32),  # bf16 activations, fp32 master weight
}
LOW_PRECISION = ("bf16", "fp16", "bf16+fp32")


@dataclass(frozen=True)
class BackendLimits:
    """What a backend's property tests may draw: dtypes, largest shapes, example budget."""

    dtypes: tuple[str, ...] = tuple(DTYPES)
    max_tokens: int = 40
    max_vocab: int = 97
    max_dim: int = 40
    example_scale: float = 1.0
    accumulation_size: int = 1024  # N (resp. V) of the fp32-accumulation tests in test_head.py


LIMITS: dict[str, BackendLimits] = {
    # Triton under TRITON_INTERPRET=1: slow, no fp64. Shapes still span several 32 x 64
    # interpreter tiles (and vocabulary splits) so masks, splits and chunk seams are exercised.
    "triton": BackendLimits(dtypes=("fp32", "bf16", "fp16", "bf16+fp32"), max_tokens=40,
                            max_vocab=160, max_dim=40, example_scale=0.75, accumulation_size=256),
}


def limits(backend: str) -> BackendLimits:
    return LIMITS.get(backend, BackendLimits())


FP64_BACKENDS = [b for b in BACKENDS if "fp64" in limits(b).dtypes]  # gradcheck, fp64 edge cases
TF32_BACKENDS = ["triton"]  # precision="tf32" is an error on every other backend
