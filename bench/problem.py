"""Synthetic RL batches: the inputs every implementation receives (identical tensors).

The batch is ``B`` sequences of ``T`` tokens (``N = B * T``), laid out ``[B, T, D]`` as
trainers hand it over. Values are chosen so that the loss exercises its real code paths:

* logits ``h . W_v`` have a standard deviation of about 3 (peaked, not uniform, softmax);
* each sequence has a valid completion length between ``T/2`` and ``T`` (the rest is
  padding, masked out);
* advantages are one per sequence (GRPO style);
* behaviour log-probs are the current policy's plus noise of 0.05 nats, so importance
  ratios sit around 1 and a few percent of tokens are clipped;
* reference log-probs (only when a KL term is requested) likewise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .config import LossSpec, Shape

LOGIT_STD = 3.0
LOGPROB_NOISE = 0.05


@dataclass
class Problem:
    """One benchmark batch. ``hidden`` and ``weight`` are leaves that require grad."""

    shape: Shape
    hidden: Tensor              # [B, T, D]
    weight: Tensor              # [V, D]
    targets: Tensor             # [B, T] int64
    mask: Tensor                # [B, T] bool
    advantages: Tensor          # [B] fp32
    old_logprobs: Tensor        # [B, T] fp32
    ref_logprobs: Tensor | None  # [B, T] fp32, or None without KL

    @property
    def num_seqs(self) -> int:
        return self.hidden.shape[0]

    def grad_inputs(self) -> list[Tensor]:
        """The tensors whose gradients every implementation computes."""
        return [self.hidden, self.weight]


def split_tokens(n: int, seq_len: int) -> tuple[int, int]:
    """(B, T) with ``B * T == n``; ``T = min(seq_len, n)``. Raises if it does not divide."""
    t = min(seq_len, n)
    if n % t:
        raise ValueError(f"N={n} is not a multiple of the sequence length {t} (--seq-len)")
    return n // t, t


@torch.no_grad()
def current_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int = 4096) -> Tensor:
    """log pi(target) under the current weights, fp32, in token chunks of materialised logits."""
    h = hidden.reshape(-1, hidden.shape[-1])
    y = targets.reshape(-1)
    out = torch.empty(y.shape, dtype=torch.float32, device=h.device)
    for i in range(0, h.shape[0], chunk):
        logits = (h[i:i + chunk] @ weight.T).float()
        out[i:i + chunk] = logits.gather(1, y[i:i + chunk, None]).squeeze(1) - logits.logsumexp(1)
    return out.view(targets.shape)


def make_problem(shape: Shape, dtype: torch.dtype, device: torch.device | str, loss: LossSpec,
                 *, seq_len: int, seed: int = 0) -> Problem:
    """Build a reproducible batch on ``device`` (one no-grad forward pass included)."""
    device = torch.device(device)
    B, T = split_tokens(shape.n, seq_len)
    # drawn on the device itself (fast for GPU-sized weights); same seed, same values per device
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*size: int) -> Tensor:
        return torch.randn(*size, generator=gen, device=device)

    hidden = randn(B, T, shape.d).to(dtype)
    weight = (randn(shape.v, shape.d) * (LOGIT_STD / shape.d ** 0.5)).to(dtype)
    targets = torch.randint(0, shape.v, (B, T), generator=gen, device=device)
    lengths = torch.randint(max(T // 2, 1), T + 1, (B,), generator=gen, device=device)
    mask = torch.arange(T, device=device)[None, :] < lengths[:, None]
    advantages = randn(B)
    logp = current_logprobs(hidden, weight, targets)
    old = (logp + LOGPROB_NOISE * randn(B, T)).clamp(max=0.0)
    ref = (logp + LOGPROB_NOISE * randn(B, T)).clamp(max=0.0) if loss.kl_coef > 0 else None
    return Problem(
        shape=shape,
        hidden=hidden.requires_grad_(True),
        weight=weight.requires_grad_(True),
        targets=targets,
        mask=mask,
        advantages=advantages,
        old_logprobs=old.float(),
        ref_logprobs=ref.float() if ref is not None else None,
    )
