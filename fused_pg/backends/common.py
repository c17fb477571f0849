"""Helpers shared by the PyTorch backends (chunked and materialised): compute dtype and logits."""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import HeadConfig


def compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """fp64 when hidden or weight is fp64, else fp32 (16-bit inputs are upcast exactly)."""
    return torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32


def logits(h: Tensor, w: Tensor, b: Tensor | None, cfg: HeadConfig) -> Tensor:
    """z = softcap((h @ w.T + b) / temperature) for one tile; h, w, b already in compute dtype.

    -inf logits (tokens excluded by a -inf bias) stay -inf through the soft-cap.
    """
    z = h @ w.T
    if b is not None:
        z = z + b
    if cfg.temperature != 1.0:
        z = z / cfg.temperature
    if cfg.softcap is not None:
        z = torch.where(torch.isneginf(z), z, cfg.softcap * torch.tanh(z / cfg.softcap))
    return z
