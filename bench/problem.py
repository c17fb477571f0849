"""The benchmark batch every implementation receives (``realistic`` or ``flat`` data, see
docs/benchmark.md), what one forward returns, and the loss epilogue for implementations that
produce only per-token log-probs (so that all compute the same loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

import fused_pg
from fused_pg import LossConfig

from .config import CALIBRATION_TOKENS, DEFAULT_TARGET_ENTROPY, Shape

LOGIT_STD = 3.0            # background logit standard deviation (both kinds of data)
GAP_SPREAD = 3.0           # std of the per-token logit gap, nats (realistic data)
LOGPROB_NOISE = 0.05


@dataclass
class StepOutput:
    """What one forward pass returns: the loss, and per-token outputs where exposed."""

    loss: Tensor
    logprobs: Tensor | None = None   # hidden's leading shape (or [N]), any value where masked
    entropy: Tensor | None = None
    rows: int | None = None          # hidden rows the LM head swept, when fewer than N


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
    data: str = "flat"
    mean_entropy: float = float("nan")  # nats, over valid tokens, on the rounded inputs

    def grad_inputs(self) -> list[Tensor]:
        """The tensors whose gradients every implementation computes."""
        return [self.hidden, self.weight]

    def info(self) -> dict:
        """The batch as the report records it."""
        return {"n": self.shape.n, "d": self.shape.d, "v": self.shape.v, "seqs": self.hidden.shape[0],
                "seq_len": self.hidden.shape[1], "valid_tokens": int(self.mask.sum()), "data": self.data,
                "mean_entropy": self.mean_entropy}


def max_realistic_entropy(v: int) -> float:
    """About the highest mean entropy realistic data reaches at vocabulary ``v``: 90% of the
    background's (Gaussian logits of std 3 have about ``log V - 4.5`` nats)."""
    return 0.9 * max(math.log(v) - LOGIT_STD ** 2 / 2, 0.0)


def layout(n: int, seq_len: int) -> tuple[int, int]:
    """(B, T) with ``B * T == n`` exactly: T is the largest divisor of ``n`` not above ``seq_len``.

    ``layout(4096, 1024) == (4, 1024)``; ``layout(1500, 1024) == (2, 750)``;
    ``layout(512, 1024) == (1, 512)``. A prime ``n`` above ``seq_len`` gives ``(n, 1)``.
    """
    if n <= 0 or seq_len <= 0:
        raise ValueError(f"N and the sequence length must be positive, got N={n}, seq_len={seq_len}")
    t = min(seq_len, n)
    while n % t:
        t -= 1
    return n // t, t


def describe_layout(n: int, seq_len: int) -> str | None:
    """A note when ``n`` does not split into sequences of ``seq_len`` tokens; None when it does."""
    b, t = layout(n, seq_len)
    if t == seq_len:
        return None
    if t == n:
        return f"N={n}: 1 sequence of {n} tokens (fewer than --seq-len {seq_len})"
    return f"N={n}: {b} sequences of {t} tokens (--seq-len {seq_len} does not divide {n})"


@torch.no_grad()
def _solve_gap_offset(weight: Tensor, direction: Tensor, background: Tensor, base: float, target: float) -> float:
    """``mu`` such that tokens with gaps ``base + mu + GAP_SPREAD * eps`` have mean entropy ``target``,
    by bisection (the entropy falls as ``mu`` grows). ``direction``/``background``: a subsample of
    tokens, their ``eps`` the normal quantiles at ``(i + 1/2) / s``. Logits are linear in the gap,
    ``z = a (u . W) + (g . W)``: both products are formed once."""
    s = direction.shape[0]
    eps = math.sqrt(2.0) * torch.erfinv(2 * (torch.arange(s, device=weight.device) + 0.5) / s - 1)
    c1, c2 = direction @ weight.T, background @ weight.T

    def excess(mu: float) -> float:
        logp = torch.log_softmax((base + mu + GAP_SPREAD * eps)[:, None] * c1 + c2, dim=-1)
        return float(-(logp.exp() * logp).sum(-1).mean()) - target
    lo, hi = -20.0, 40.0
    if excess(lo) < 0:
        raise ValueError(f"--target-entropy {target:g} nats is more than this vocabulary reaches with "
                         f"realistic data (at most about {excess(lo) + target:.2f}); lower it or use --data flat")
    for _ in range(40):
        mu = (lo + hi) / 2
        f = excess(mu)
        if abs(f) <= 1e-3 * target:
            break
        lo, hi = (mu, hi) if f > 0 else (lo, mu)
    return mu


@torch.no_grad()
def _policy_pass(hidden: Tensor, weight: Tensor, targets: Tensor | None,
                 gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """One pass over chunks of materialised fp32 logits: (targets, logp, entropy), all [N].

    ``targets=None`` samples them from the policy. Chunks hold at most 2^24 logits.
    """
    n, v = hidden.shape[0], weight.shape[0]
    chunk = max(1, min(n, 2**24 // v))
    sampled = torch.empty(n, dtype=torch.long, device=hidden.device) if targets is None else targets
    logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
    ent = torch.empty(n, dtype=torch.float32, device=hidden.device)
    for i in range(0, n, chunk):
        lsm = torch.log_softmax((hidden[i:i + chunk] @ weight.T).float(), dim=-1)
        probs = lsm.exp()
        if targets is None:  # inverse-CDF sampling (torch.multinomial is several times slower on CPU)
            cdf = probs.cumsum(-1)
            u = torch.rand(cdf.shape[0], 1, generator=gen, device=cdf.device) * cdf[:, -1:]
            sampled[i:i + chunk] = torch.searchsorted(cdf, u).squeeze(1).clamp_(max=v - 1)
        logp[i:i + chunk] = lsm.gather(1, sampled[i:i + chunk, None]).squeeze(1)
        ent[i:i + chunk] = -(probs * lsm).sum(-1)
    return sampled, logp, ent


def make_problem(shape: Shape, dtype: torch.dtype, device: torch.device | str, loss: LossConfig,
                 *, seq_len: int, seed: int = 0, data: str = "realistic",
                 target_entropy: float = DEFAULT_TARGET_ENTROPY) -> Problem:
    """Build a reproducible batch on ``device`` (one no-grad pass over the logits included)."""
    if data not in ("realistic", "flat"):
        raise ValueError(f"data must be 'realistic' or 'flat', got {data!r}")
    device = torch.device(device)
    B, T = layout(shape.n, seq_len)
    N, D, V = shape.n, shape.d, shape.v
    # drawn on the device itself (fast for GPU-sized weights); same seed, same values per device
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*size: int) -> Tensor:
        return torch.randn(*size, generator=gen, device=device)

    if data == "flat":
        hidden = randn(B, T, D).to(dtype)
        weight = (randn(V, D) * (LOGIT_STD / D ** 0.5)).to(dtype)
        targets = torch.randint(0, V, (B, T), generator=gen, device=device)
    else:
        w = randn(V, D) / D ** 0.5
        modes = torch.randint(0, V, (N,), generator=gen, device=device)
        direction = w[modes] / w[modes].norm(dim=1, keepdim=True)
        background = LOGIT_STD * randn(N, D)
        # no background along the mode's direction: the mode's logit is exactly a_t * |W_k|
        background -= (background * direction).sum(1, keepdim=True) * direction
        eps = randn(N)
        base = math.log(V) + LOGIT_STD ** 2 / 2
        s = min(CALIBRATION_TOKENS, N)
        mu = _solve_gap_offset(w, direction[:s], background[:s], base, target_entropy)
        h = (base + mu + GAP_SPREAD * eps)[:, None] * direction + background
        hidden, weight, targets = h.view(B, T, D).to(dtype), w.to(dtype), None
        del w, direction, background, h
    lengths = torch.randint(max(T // 2, 1), T + 1, (B,), generator=gen, device=device)
    mask = torch.arange(T, device=device)[None, :] < lengths[:, None]
    advantages = randn(B)
    flat_targets = None if targets is None else targets.reshape(-1)
    sampled, logp, ent = _policy_pass(hidden.reshape(N, D), weight, flat_targets, gen)
    targets, logp, ent = sampled.view(B, T), logp.view(B, T), ent.view(B, T)
    old = (logp + LOGPROB_NOISE * randn(B, T)).clamp(max=0.0)
    ref = (logp + LOGPROB_NOISE * randn(B, T)).clamp(max=0.0) if loss.kl_coef > 0 else None
    return Problem(shape, hidden.requires_grad_(True), weight.requires_grad_(True), targets, mask, advantages,
                   old.float(), None if ref is None else ref.float(), data, float(ent[mask].mean()))


def loss_from_logprobs(problem: Problem, loss: LossConfig, logprobs: Tensor, entropy: Tensor | None) -> Tensor:
    """Scalar loss from differentiable per-token ``logprobs`` (and ``entropy``), any shape of N;
    ``entropy=None`` (an implementation that computes none) needs ``loss.entropy_coef == 0``."""
    if entropy is None and loss.entropy_coef != 0:
        raise ValueError("this implementation computes no entropy: entropy_coef must be 0")
    lead = problem.targets.shape
    out = fused_pg.policy_loss_from_logprobs(
        logprobs.reshape(lead), problem.advantages, problem.old_logprobs, problem.mask,
        entropy=None if entropy is None else entropy.reshape(lead),
        ref_logprobs=problem.ref_logprobs, config=loss, validate=False)
    return out.loss
