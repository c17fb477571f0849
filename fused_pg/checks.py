"""Argument checks with errors that name the argument.

Shape, dtype and device checks are free (host metadata) and always run. Checks that read
tensor values (NaN/Inf, id ranges, cu_seqlens) synchronise with the device, so they run
only when ``validate`` is true: by default on CPU tensors, on request on GPU.
"""

from __future__ import annotations

import math
import sys
from numbers import Real

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# log-probabilities are <= 0 (entropies >= 0); a little slack absorbs rounding in other
# frameworks, while probabilities passed by mistake (values in (0, 1]) are refused
LOGPROB_SLACK = 1e-2


# ---------------------------------------------------------------------------------------------
# scalar options
# ---------------------------------------------------------------------------------------------

def real(name: str, value, *, lo: float | None = None, hi: float | None = None,
         lo_open: bool = False, hi_open: bool = False) -> float:
    """Check that ``value`` is a finite real in the given range; return it as float."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and (value >= hi if hi_open else value > hi):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {value}")
    return value


def choice(name: str, value, choices: tuple[str, ...]) -> str:
    """Check that ``value`` is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def boolean(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


# ---------------------------------------------------------------------------------------------
# tensors
# ---------------------------------------------------------------------------------------------


def resolve_validate(validate: bool | None, device: torch.device) -> bool:
    if validate is None:
        return device.type == "cpu"
    if not isinstance(validate, bool):
        raise TypeError(f"validate must be a bool or None, got {type(validate).__name__}")
    return validate


def tensor(name: str, x, *, dims: tuple[int, ...] | None = None, floating: bool = False,
           integer: bool = False, device: torch.device | None = None, like: str = "hidden") -> Tensor:
    """Check type, rank, dtype family and device of one argument (``device``: that of the
    argument named ``like``, which every tensor argument must share)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if dims is not None and x.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dimensions, got shape {tuple(x.shape)}")
    if floating and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if integer and (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} is on {x.device} but {like} is on {device}")
    return x


def shape(name: str, x: Tensor, expected: tuple[int, ...], what: str) -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} ({what}), got {tuple(x.shape)}")


def finite(name: str, x: Tensor) -> None:
    if not bool(torch.isfinite(x).all()):
        bad = "NaN" if bool(torch.isnan(x).any()) else "Inf"
        raise ValueError(f"{name} contains {bad} values")


def bias_values(bias: Tensor) -> None:
    """-inf entries exclude vocabulary items (padded vocabularies); NaN and +inf are errors."""
    if bool(torch.isnan(bias).any()) or bool((bias == float("inf")).any()):
        raise ValueError("bias contains NaN or +Inf values (only -inf is allowed, to exclude tokens)")
    if not bool(torch.isfinite(bias).any()):
        raise ValueError("bias excludes every vocabulary entry (all -inf)")


def target_ids(targets: Tensor, valid: Tensor, vocab_size: int, ignore_index: int,
               bias: Tensor | None = None) -> None:
    """Every counted target is a vocabulary id, and not one a -inf bias excludes."""
    outside = valid & ((targets < 0) | (targets >= vocab_size))
    if bool(outside.any()):
        bad = targets[outside][0].item()
        raise ValueError(
            f"targets contains id {bad} outside [0, {vocab_size}) that is not ignore_index={ignore_index}")
    if bias is not None:
        excluded = valid & torch.isneginf(bias)[targets.clamp(0, vocab_size - 1)]
        if bool(excluded.any()):
            bad = targets[excluded][0].item()
            raise ValueError(f"targets contains id {bad} whose bias is -inf (an excluded token): "
                             "its log-probability would be -inf")


def logprob_values(name: str, x: Tensor, slack: float = LOGPROB_SLACK) -> None:
    """Log-probabilities are <= 0: values above ``slack`` are probabilities or logits by mistake."""
    if x.numel() and bool((x > slack).any()):
        raise ValueError(f"{name} must hold log-probabilities (<= 0), got a maximum of {float(x.max()):.4g}: "
                         "were probabilities or logits passed instead?")


def entropy_values(name: str, x: Tensor, slack: float = LOGPROB_SLACK) -> None:
    """Entropies are >= 0: values below ``-slack`` are something else (a negated entropy?)."""
    if x.numel() and bool((x < -slack).any()):
        raise ValueError(f"{name} must hold entropies (>= 0), got a minimum of {float(x.min()):.4g}")


def binary_mask(mask: Tensor, name: str = "mask") -> None:
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} must hold only 0 and 1 (or be a bool tensor)")


def mask_dtype(mask: Tensor, name: str = "mask") -> None:
    if mask.dtype.is_complex:
        raise TypeError(f"{name} must be bool, integer or float, got {mask.dtype}")


def sequence_lengths(cu_seqlens: Tensor, num_tokens: int, validate: bool) -> Tensor:
    """Lengths [S] (int64) of the packed sequences ``cu_seqlens`` [S + 1] describes over
    ``num_tokens`` tokens. The offsets are checked when ``validate``; either way they are
    clamped into [0, N], kept monotone and pinned at both ends (first 0, last N), a guard
    without a host sync: the lengths are >= 0 and sum to N whatever the values, so nothing
    indexes past the N tokens."""
    if cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must hold at least two offsets [0, ..., N]")
    if validate:
        cu_seqlens_values(cu_seqlens, num_tokens)
    inner = torch.cummax(cu_seqlens[1:-1].long().clamp(0, num_tokens), dim=0).values
    zero = torch.zeros(1, dtype=torch.long, device=cu_seqlens.device)
    cu = torch.cat([zero, inner, zero + num_tokens])
    return cu[1:] - cu[:-1]


def cu_seqlens_values(cu_seqlens: Tensor, num_tokens: int) -> None:
    if cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must hold at least two offsets [0, ..., N]")
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != num_tokens:
        raise ValueError(f"cu_seqlens must start at 0 and end at the number of tokens {num_tokens}, "
                         f"got {int(cu_seqlens[0])} ... {int(cu_seqlens[-1])}")
    if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
        raise ValueError("cu_seqlens must be non-decreasing")


# ---------------------------------------------------------------------------------------------
# the LM head's arguments
# ---------------------------------------------------------------------------------------------


def not_dtensor(name: str, x) -> None:
    """A ``DTensor`` (FSDP2's sharded parameter, or a tensor-parallel tensor) is refused by name:
    the sweeps work on local tensors, and a sharded weight used outside its module's forward
    would get neither FSDP2's all-gather nor its gradient reduce-scatter."""
    if x is None or "torch.distributed.tensor" not in sys.modules:
        return  # no DTensor can exist before that module is imported
    from torch.distributed.tensor import DTensor

    if isinstance(x, DTensor):
        raise TypeError(
            f"{name} is a DTensor (placements {tuple(x.placements)}); fused_pg needs local tensors. "
            "With FSDP2 (fully_shard), compute the loss inside the forward of the module that owns the "
            "LM-head weight: FSDP2 then gathers the full weight for the sweep and reduce-scatters its "
            "gradient (see docs/distributed.md). For a vocabulary split over ranks, pass the local "
            f"shard ({name}.to_local()) with parallel=VocabParallel(group).")


def head_args(hidden, weight, targets, bias, ignore_index) -> None:
    """Types and shapes of the LM-head arguments (host metadata only, no value reads)."""
    for name, x in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        not_dtensor(name, x)
    tensor("hidden", hidden, dims=(2, 3), floating=True)
    dev = hidden.device
    tensor("weight", weight, dims=(2,), floating=True, device=dev)
    tensor("targets", targets, integer=True, device=dev)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must have shape (V, {hidden.shape[-1]}) to match hidden's last "
                         f"dimension, got {tuple(weight.shape)}")
    shape("targets", targets, hidden.shape[:-1], "the leading shape of hidden")
    if bias is not None:
        tensor("bias", bias, dims=(1,), floating=True, device=dev)
        shape("bias", bias, (weight.shape[0],), "one entry per vocabulary row of weight")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if hidden.shape[-1] == 0 or weight.shape[0] == 0:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must have "
                         "a non-empty hidden size and vocabulary")


def head_values(hidden: Tensor, weight: Tensor, bias: Tensor | None, valid: Tensor) -> None:
    """Value checks (they read tensors): finite weight and bias, finite hidden rows that count."""
    finite("hidden", hidden.reshape(valid.numel(), hidden.shape[-1])[valid.reshape(-1)])
    finite("weight", weight)
    if bias is not None:
        bias_values(bias)
