"""Input builders: the tensors of a head case or a loss case, reproducible from the case's seed.

Loss inputs keep every importance ratio, TIS weight and KL clamp point at least
``BOUNDARY_GAP`` (in log space) away from the boundaries where a clip decision flips, so fp32
and fp64 take the same branch; behaviour, reference and rollout log-probs are log-probabilities
(<= 0) where they count and arbitrary padding elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fused_pg.reference.head import logprobs_entropy_ref

from .backends import DTYPES
from .strategies import HeadCase, LossCase

@dataclass
class HeadInputs:
    hidden: Tensor      # rounded to the case's dtype
    weight: Tensor
    bias: Tensor | None
    targets: Tensor     # lead shape, int64, ignore_index at ignored positions
    allowed: Tensor     # [V] bool: vocabulary entries with a finite bias

    def fp64_leaves(self):
        """Exact fp64 copies of the rounded inputs, as fresh leaves requiring grad."""
        up = lambda x: None if x is None else x.detach().double().requires_grad_()  # noqa: E731
        return up(self.hidden), up(self.weight), up(self.bias)

    def leaves(self):
        """Fresh leaves in the case's dtypes (for the backend under test)."""
        cp = lambda x: None if x is None else x.detach().clone().requires_grad_()  # noqa: E731
        return cp(self.hidden), cp(self.weight), cp(self.bias)


def make_head_inputs(case: HeadCase, gen: torch.Generator) -> HeadInputs:
    hdt, wdt = DTYPES[case.dtype]
    f64 = torch.float64
    hidden = torch.randn(*case.lead, case.D, generator=gen, dtype=f64).to(hdt)
    weight = (torch.randn(case.V, case.D, generator=gen, dtype=f64) * (case.logit_scale / math.sqrt(case.D))).to(wdt)
    allowed = torch.ones(case.V, dtype=torch.bool)
    bias = None
    if case.bias != "none":
        b = 0.5 * torch.randn(case.V, generator=gen, dtype=f64)
        if case.bias == "neg_inf":
            # exclude ~30% of the vocabulary (a padded vocabulary), never all of it
            allowed = torch.rand(case.V, generator=gen) > 0.3
            allowed[int(torch.randint(0, case.V, (1,), generator=gen))] = True
            b = torch.where(allowed, b, -math.inf)
        bias = b.to(wdt)
    # targets only among allowed entries: a -inf-bias target has logp = -inf
    ids = allowed.nonzero().squeeze(1)
    targets = ids[torch.randint(0, ids.numel(), case.lead, generator=gen)]
    if case.ignore_frac > 0:
        targets = torch.where(torch.rand(case.lead, generator=gen) < case.ignore_frac, case.ignore_index, targets)
    return HeadInputs(hidden, weight, bias, targets, allowed)


def kl_clamp_points(estimator: str, clamp: float) -> list[float]:
    """Log-ratios x = logp - ref at which the clamped KL estimate switches (value = +-clamp)."""
    base = estimator.rstrip("+")
    if base in ("k1", "abs"):
        return [-clamp, clamp]
    if base == "k2":
        return [-math.sqrt(2 * clamp), math.sqrt(2 * clamp)]
    # k3(x) = exp(-x) - 1 + x = clamp has one root on each side of 0 (bisection)
    pts = []
    for lo, hi in ((-clamp - 1.0, 0.0), (0.0, clamp + 2.0)):
        f = lambda x: math.exp(-x) - 1 + x - clamp  # noqa: E731
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if (f(lo) > 0) == (f(mid) > 0):
                lo = mid
            else:
                hi = mid
        pts.append(0.5 * (lo + hi))
    return pts


# clip decisions flip between fp32 and fp64 when a ratio sits within rounding of a boundary:
# generated log-ratios keep at least this distance (in log space) from every boundary.
BOUNDARY_GAP = 2e-3
MAX_LOG_RATIO = 0.7  # |log r| <= 0.7: ratios 0.5 .. 2, so clipping happens on both sides


def _push_away(x: Tensor, points: list[float], gap: float = BOUNDARY_GAP) -> Tensor:
    for _ in range(4):
        for p in points:
            d = x - p
            x = torch.where(d.abs() < gap, p + torch.where(d >= 0, gap, -gap), x)
    return x


def seq_index(case: LossCase) -> list[list[int]] | None:
    if case.layout == "packed-nocu":
        return None
    out, start = [], 0
    for L in case.lengths:
        out.append(list(range(start, start + L)))
        start += L
    return out


@dataclass
class LossInputs:
    head: HeadInputs
    advantages: Tensor
    old_logprobs: Tensor
    mask: Tensor | None
    ref_logprobs: Tensor | None
    rollout_logprobs: Tensor | None
    cu_seqlens: Tensor | None
    valid: Tensor       # flat [N] bool
    lp64: Tensor        # flat [N] fp64 oracle log-probs (0 where not valid)
    weights: Tensor | None = None

    def tensors(self) -> dict:
        """Per-token keyword tensors shared by fused_pg.repo_loss and the oracle."""
        kw = dict(ref_logprobs=self.ref_logprobs, rollout_logprobs=self.rollout_logprobs, weights=self.weights)
        if self.cu_seqlens is not None:
            kw["cu_seqlens"] = self.cu_seqlens
        return kw


def _make_mask(case: LossCase, gen: torch.Generator, lead) -> Tensor | None:
    N = math.prod(lead)
    if case.mask == "none":
        return None
    if case.mask == "all_masked":
        m = torch.zeros(N, dtype=torch.bool)
    else:
        m = torch.rand(N, generator=gen) < 0.75
        if case.mask == "empty_rows":
            seqs = seq_index(case) or [list(range(N))]
            for idx in seqs:  # every other sequence fully masked (an empty row)
                if idx and bool(torch.rand((), generator=gen) < 0.5):
                    m[idx] = False
    return m.view(lead).to(case.mask_dtype)


def make_loss_inputs(case: LossCase) -> LossInputs:
    """Inputs of one loss example, with ratios and TIS weights kept off their clip boundaries."""
    gen = torch.Generator().manual_seed(case.head.seed)
    hi = make_head_inputs(case.head, gen)
    lead = tuple(hi.targets.shape)
    N = case.head.N
    pdt = torch.float64 if case.dtype == "fp64" else torch.float32
    f64 = torch.float64
    mask = _make_mask(case, gen, lead)
    y = hi.targets.reshape(-1)
    valid = y != case.head.ignore_index
    if mask is not None:
        valid = valid & mask.reshape(-1).bool()
    seqs = seq_index(case)
    o = case.effective

    # oracle log-probs of the rounded inputs, to place old_logprobs relative to them
    h64, w64, b64 = hi.fp64_leaves()
    with torch.no_grad():
        lp64, _ = logprobs_entropy_ref(
            h64.reshape(N, -1), w64, torch.where(valid, y, case.head.ignore_index), b64,
            temperature=o["temperature"], softcap=o["softcap"], ignore_index=case.head.ignore_index)

    bounds = [math.log(1 - o["eps_low"]) if o["eps_low"] < 1 else -math.inf, math.log(1 + o["eps_high"])]
    bounds += [math.log(c) for c in (o.get("dual_clip"), o.get("delta")) if c is not None]
    # log r = logp - old with old <= 0 (old is a log-probability): log r >= logp
    lr_lo = torch.clamp(lp64, min=-MAX_LOG_RATIO)
    lr = lr_lo + (MAX_LOG_RATIO - lr_lo) * torch.rand(N, generator=gen, dtype=f64)
    if o["importance_level"] == "token":
        lr = _push_away(lr, bounds)
    else:  # the clip acts on each sequence's mean log-ratio over its valid tokens
        for idx in seqs:
            v = [t for t in idx if valid[t]]
            if v:
                mean = lr[v].mean()
                lr[idx] += _push_away(mean.reshape(1), bounds)[0] - mean
    garbage = lambda: -3.0 * torch.rand(N, generator=gen, dtype=f64) - 40 * torch.rand(N, generator=gen, dtype=f64)  # noqa: E731
    old = torch.where(valid, lp64 - lr, garbage())

    ref = None
    if case.with_ref:
        # x = logp - ref with ref <= 0: x >= logp; x in [max(logp, -1), 1]
        x_lo = torch.clamp(lp64, min=-1.0)
        x = x_lo + (1.0 - x_lo) * torch.rand(N, generator=gen, dtype=f64)
        points = []
        if o["kl_clamp"] is not None:  # the clamp switches the gradient off: keep away from it
            points += kl_clamp_points(o["kl_estimator"], o["kl_clamp"])
        if o["kl_estimator"].startswith("abs"):  # |x| changes its gradient's sign at 0
            points.append(0.0)
        x = _push_away(x, points)
        ref = torch.where(valid, lp64 - x, garbage()).to(pdt).view(lead)
    rollout = None
    if case.with_rollout:
        # log w = old - rollout with rollout <= 0: log w >= old
        w_lo = torch.clamp(old, min=-1.0)
        log_w = w_lo + (1.0 - w_lo) * torch.rand(N, generator=gen, dtype=f64)
        cap = [math.log(o["tis_cap"])] if o["tis_cap"] is not None else []
        if o["tis_level"] == "token":
            log_w = _push_away(log_w, cap)
        else:
            for idx in seqs:
                v = [t for t in idx if valid[t]]
                if v:
                    s = log_w[v].sum()
                    log_w[v] += (_push_away(s.reshape(1), cap)[0] - s) / len(v)
        rollout = torch.where(valid, old - log_w, garbage()).to(pdt).view(lead)

    old = old.to(pdt).view(lead)
    if case.adv_per_seq:
        advantages = torch.randn(len(case.lengths), generator=gen, dtype=f64).to(pdt)
    else:
        advantages = torch.randn(N, generator=gen, dtype=f64).to(pdt).view(lead)
    cu = None
    if case.layout == "packed":
        cu = torch.tensor([0, *torch.tensor(case.lengths).cumsum(0).tolist()], dtype=torch.int32)
    weights = None
    if case.weights == "token":  # importance-weight-like values, exact zeros (a mask) among them
        w = 2 * torch.rand(N, generator=gen, dtype=f64)
        w = torch.where(torch.rand(N, generator=gen) < 0.2, 0.0, w)
        weights = torch.where(valid, w, garbage()).to(pdt).view(lead)
    elif case.weights == "sequence":
        weights = (2 * torch.rand(len(case.lengths), generator=gen, dtype=f64)).to(pdt)
    return LossInputs(hi, advantages, old, mask, ref, rollout, cu, valid, torch.where(valid, lp64, 0.0),
                      weights)
