"""The benchmark batch every implementation receives, what one forward returns, and the
shared loss epilogue for implementations that only produce per-token log-probs.

The batch is ``B`` sequences of ``T`` tokens (``N = B * T`` exactly, see :func:`layout`), laid
out ``[B, T, D]`` as trainers hand it over. Two kinds of data (``--data``):

* ``realistic`` (default): logits with the token entropy of an RL policy. Each token has a
  most-likely next token ``k_t`` and a logit gap ``a_t`` above a Gaussian background (std 3):
  ``h_t = a_t * u_t + 3 * g_t`` with ``W ~ N(0, 1/D)``, ``u_t = W_k / |W_k|``, ``g_t ~ N(0, I)``
  projected orthogonal to ``u_t``, and ``a_t = log V + 4.5 + mu + 3 * eps_t``. ``mu`` is solved (regula falsi on a 512-token
  subsample) so that the mean entropy hits ``--target-entropy`` (default 1 nat): most tokens
  are nearly deterministic, a tail of "forking" tokens carries several nats. Targets are
  *sampled from the policy*, as in a rollout.
* ``flat``: i.i.d. logits ``h . W_v`` with std 3 (about ``log V - 4.5`` nats of entropy) and
  uniformly random targets.

In both, each sequence has a valid completion length between ``T/2`` and ``T`` (the rest is
padding, masked out); advantages are one per sequence (GRPO style); behaviour log-probs are
the current policy's plus noise of 0.05 nats, so importance ratios sit around 1 and a few
percent of tokens are clipped; reference log-probs (only with a KL term) likewise. The mean
entropy over valid tokens is measured on the rounded inputs and reported.

Implementations that compute log-probs (and entropies) by their own means get the loss on top
from :func:`loss_from_logprobs`: fused-pg's public :func:`fused_pg.policy_loss_from_logprobs`,
so every implementation computes *the same loss* and only the LM-head part differs.
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


# --- synthetic data --------------------------------------------------------------------------------

def _entropy(logits: Tensor) -> Tensor:
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


@torch.no_grad()
def _solve_gap_offset(weight: Tensor, direction: Tensor, background: Tensor, base: float, target: float) -> float:
    """``mu`` such that tokens with gaps ``base + mu + GAP_SPREAD * eps`` have mean entropy ``target``.

    ``direction``/``background`` are a subsample of tokens; their ``eps`` are the normal
    quantiles at ``(i + 1/2) / s`` (stratified: less sampling noise than random draws). Logits
    are linear in the gap, ``z = a * (u . W) + (bg . W)``: both products are formed once and
    the root finding only re-evaluates the softmax.
    """
    s = direction.shape[0]
    q = (torch.arange(s, device=weight.device, dtype=torch.float32) + 0.5) / s
    eps = math.sqrt(2.0) * torch.erfinv(2 * q - 1)
    c1, c2 = direction @ weight.T, background @ weight.T

    def mean_entropy(mu: float) -> float:
        a = base + mu + GAP_SPREAD * eps
        return float(_entropy(a[:, None] * c1 + c2).mean())
    # regula falsi (Illinois variant) on f(mu) = H(mu) - target, decreasing in mu over [lo, hi]
    lo, hi = -20.0, 40.0
    f_lo, f_hi = mean_entropy(lo) - target, mean_entropy(hi) - target
    if f_lo < 0:
        raise ValueError(f"--target-entropy {target:g} nats is more than this vocabulary reaches with "
                         f"realistic data (at most about {f_lo + target:.2f}); lower it or use --data flat")
    mu, side = hi, 0
    for _ in range(40):
        mu = (lo * f_hi - hi * f_lo) / (f_hi - f_lo) if f_hi != f_lo else 0.5 * (lo + hi)
        f = mean_entropy(mu) - target
        if abs(f) <= 1e-3 * target or hi - lo < 1e-4:
            break
        if f > 0:
            lo, f_lo = mu, f
            if side == 1:
                f_hi /= 2
            side = 1
        else:
            hi, f_hi = mu, f
            if side == -1:
                f_lo /= 2
            side = -1
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
    return Problem(
        shape=shape,
        hidden=hidden.requires_grad_(True),
        weight=weight.requires_grad_(True),
        targets=targets,
        mask=mask,
        advantages=advantages,
        old_logprobs=old.float(),
        ref_logprobs=ref.float() if ref is not None else None,
        data=data,
        mean_entropy=float(ent[mask].mean()),
    )


# --- the shared loss epilogue ----------------------------------------------------------------------

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
