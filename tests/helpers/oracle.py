"""The fp64 oracle run of a loss case, the guards that skip ill-conditioned examples, and the
full equality check of one loss example (loss, logp, entropy, metrics, per-token outputs and
gradients) against it.

Ill-conditioned examples are skipped with ``assume`` rather than by loosening the rules (see
``oracle_guards``): REPO "decorrelate" with Var(L) < 1e-3, clip / TIS / REPO-R clamp boundaries;
and (``zeta_conditioning_guard``) a "decorrelate" zeta that the backend's measured error of L
can move by more than the value tolerance.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch
from hypothesis import assume, note

from fused_pg.reference.head import logprobs_entropy_ref
from fused_pg.reference.loss import policy_loss_ref
from fused_pg.reference.head import logits_ref

from .inputs import LossInputs, make_loss_inputs
from .strategies import LossCase
from .tolerances import (TOLS, assert_close, check_grads, check_head_values, check_metrics, check_per_token,
                         dlogits_dtype, grad_floors, naive_logprobs_entropy)

HEAD_OPTIONS = ("temperature", "softcap", "ignore_index")


class LogprobCase(NamedTuple):
    """A drawn loss case for ``policy_loss_from_logprobs``: the oracle's fp64 log-probs (and
    entropies, or None), shaped like the targets, with the loss options that are not head options."""
    case: LossCase
    inp: LossInputs
    logprobs: torch.Tensor
    entropy: torch.Tensor | None
    mask: torch.Tensor
    loss_opts: dict


def logprob_case(case: LossCase, with_entropy: bool) -> LogprobCase:
    """The fp64 log-probs (and entropies) of ``case`` from the head oracle. Without entropies,
    what needs them is left out of the options (no entropy bonus, no per-state centre)."""
    if not with_entropy:
        opts = dict(case.opts, entropy_coef=0.0)
        if opts["repo_center"] == "state":
            opts["repo_center"] = "none"
        case = replace(case, opts=opts)
    o = case.opts
    inp = make_loss_inputs(case)
    N, lead = case.head.N, tuple(inp.head.targets.shape)
    h64, w64, b64 = inp.head.fp64_leaves()
    y = torch.where(inp.valid, inp.head.targets.reshape(-1), o["ignore_index"])
    with torch.no_grad():
        lp, ent = logprobs_entropy_ref(h64.reshape(N, -1), w64, y, b64, temperature=o["temperature"],
                                       softcap=o["softcap"], ignore_index=o["ignore_index"])
    return LogprobCase(case, inp, lp.view(lead), ent.view(lead) if with_entropy else None, inp.valid.view(lead),
                       {k: v for k, v in o.items() if k not in HEAD_OPTIONS})


def run_oracle_loss(case: LossCase, inp: LossInputs, backend: str | None = None):
    """The fp64 oracle on exact fp64 copies of the rounded inputs: the materialised head
    (``logprobs_entropy_ref``) on the tokens that count, then ``policy_loss_ref``.

    Returns (output, grads dict, floors dict); the per-token g = dL/dlogp and e = dL/dH that
    :func:`grad_floors` needs come from ``torch.autograd.grad`` through the oracle's loss.
    """
    h64, w64, b64 = inp.head.fp64_leaves()
    o = case.opts
    lead = tuple(inp.head.targets.shape)
    N = case.head.N
    y = torch.where(inp.valid, inp.head.targets.reshape(-1), o["ignore_index"])
    lp, ent = logprobs_entropy_ref(h64.reshape(N, -1), w64, y, b64, temperature=o["temperature"],
                                   softcap=o["softcap"], ignore_index=o["ignore_index"], dtype=torch.float64)
    loss_opts = {k: v for k, v in o.items() if k not in HEAD_OPTIONS}
    ref = policy_loss_ref(lp.view(lead), inp.advantages, inp.old_logprobs, inp.valid.view(lead),
                          entropy=ent.view(lead), dtype=torch.float64, **inp.tensors(), **loss_opts)
    g, e = torch.autograd.grad(ref.loss, [lp, ent], retain_graph=True, allow_unused=True)
    ref.loss.backward()
    grads = {"hidden": h64.grad, "weight": w64.grad, "bias": None if b64 is None else b64.grad}
    zero = torch.zeros_like(lp)
    g = g if g is not None else zero
    e = e if e is not None else zero
    with torch.no_grad():
        z = logits_ref(h64, w64, b64, temperature=case.head.temperature, softcap=case.head.softcap)
    floors = grad_floors(h64, w64, g, e, ent.detach(), z, temperature=case.head.temperature,
                         fp64=case.dtype == "fp64", dlogits=dlogits_dtype(backend, case.dtype))
    return ref, grads, floors


def _centre(o: dict) -> str:
    c = o.get("repo_center", "batch")
    return {True: "batch", False: "none"}.get(c, c)


def oracle_guards(case: LossCase, inp: LossInputs, ref) -> None:
    """``assume`` away examples whose comparison is ill-conditioned (not a tolerance change).

    * REPO "decorrelate" divides by Var(L) over the valid tokens (L = logp, or logp + H for the
      per-state centre). Below Var = 1e-3 (1e-6 in fp64) fp32 rounding of L (~1e-6) moves
      zeta = gamma Cov/Var by more than the fp32 tolerance, so such examples are skipped;
      Var == 0 exactly (<= 1 valid token) is kept.
    * The clip indicators (clip_frac_*, dual clip) and the TIS cap switch at exact boundaries.
      Generated log-ratios already avoid them (``make_loss_inputs``), and the signs of the
      REPO-corrected advantages must not be within 1e-4 of zero -- for REPO-R ("relative"), whose
      clamp makes A' exactly 0, the factor ``1 -+ zeta L`` must not be within 1e-4 of zero.
    * The clip metrics count clipped tokens with logp + H < 0, and the rollout metrics ratios
      outside [1 - eps_low, 1 + eps_high]: neither may sit within rounding of its boundary.
    """
    valid = inp.valid
    n = int(valid.sum())
    o = case.opts
    if n == 0:
        return
    eff = case.effective
    centre = _centre(o)
    lp_all = ref.logprobs.detach().double().reshape(-1)
    H_all = ref.entropy.detach().double().reshape(-1)
    lp, H = lp_all[valid], H_all[valid]
    L = lp + H if centre == "state" else lp
    var = float(((L - L.mean()) ** 2).mean())
    if o["repo"] == "decorrelate" and o["repo_coef"] > 0 and n > 1:
        assume(var >= (1e-6 if case.dtype == "fp64" else 1e-3))
    A = inp.advantages.double()
    if case.adv_per_seq:
        A = torch.cat([A[i].expand(L_) for i, L_ in enumerate(case.lengths)])
    A = A.reshape(-1)[valid]
    zeta = float(ref.metrics["repo_zeta"])
    if o["repo"] == "relative":
        Lc = L - L.mean() if centre == "batch" else L
        factor = 1 - zeta * torch.sign(A) * Lc
        assume(bool((A.abs() > 1e-4).all()) and bool((factor.abs() > 1e-4).all()))
    else:
        A_corr = ref.advantages.detach().double().reshape(-1)[valid]
        assume(bool((A_corr.abs() > 1e-4).all()))
    A_corr = ref.advantages.detach().double().reshape(-1)[valid]
    r = ref.ratio.detach().double().reshape(-1)[valid]
    clipped = ((r > 1 + eff["eps_high"]) & (A_corr > 0)) | ((r < 1 - eff["eps_low"]) & (A_corr < 0))
    assume(bool(((lp + H)[clipped].abs() > 1e-4 * (1 + lp[clipped].abs())).all()))
    if inp.rollout_logprobs is not None:
        engine = torch.exp(inp.old_logprobs.double().reshape(-1) - inp.rollout_logprobs.double().reshape(-1))[valid]
        for bound in (1 - eff["eps_low"], 1 + eff["eps_high"]):
            assume(bool(((engine - bound).abs() > 1e-5).all()))
    note(f"valid tokens {n}, Var(L) {var:.3e}, zeta {zeta:.4g}")


def zeta_conditioning_guard(case: LossCase, inp: LossInputs, ref, out) -> None:
    """``assume`` away a REPO "decorrelate" example whose zeta the measured error of L (the
    log-prob, or log-prob + entropy for the per-state centre) can move by more than the value
    tolerance (``oracle_guards`` can only bound Var(L) before the run; this uses the backend's
    actual error, itself within the head's tolerance).

    zeta = gamma C / V with C = mean((A - mean A)(l - mean l)) and V = mean((l - mean l)^2); an
    error d of l moves it by at most gamma (max|A - mean A| + 2 |C / V| max|l - mean l|)
    max|d| / V (first order).
    """
    o = case.opts
    valid = inp.valid
    n = int(valid.sum())
    if o["repo"] != "decorrelate" or o["repo_coef"] == 0 or n < 2 or case.dtype == "fp64":
        return
    state = _centre(o) == "state"
    lp = ref.logprobs.detach().double().reshape(-1)[valid]
    got = out.logprobs.detach().double().reshape(-1)[valid]
    if state:
        lp = lp + ref.entropy.detach().double().reshape(-1)[valid]
        got = got + out.entropy.detach().double().reshape(-1)[valid]
    A = inp.advantages.double()
    if case.adv_per_seq:
        A = torch.cat([A[i].expand(L) for i, L in enumerate(case.lengths)])
    A = A.reshape(-1)[valid]
    var = float(((lp - lp.mean()) ** 2).mean())
    if var == 0.0:
        return
    zeta_over_gamma = float(ref.metrics["repo_zeta"]) / o["repo_coef"]
    d = float((got - lp).abs().max())
    moved = o["repo_coef"] * (float((A - A.mean()).abs().max())
                              + 2 * abs(zeta_over_gamma) * float((lp - lp.mean()).abs().max())) * d / var
    allowed = TOLS[case.dtype].value * (1 + abs(float(ref.metrics["repo_zeta"])))
    note(f"zeta sensitivity to the measured error of L {d:.2e}: {moved:.2e} (tolerance {allowed:.2e})")
    assume(moved <= allowed)


def check_loss_case(case: LossCase, backend: str) -> None:
    """The full equality check of one example: loss, logp, entropy, metrics, gradients."""
    import fused_pg

    note(f"case: {case}")
    inp = make_loss_inputs(case)
    ref, ref_grads, floors = run_oracle_loss(case, inp, backend)
    oracle_guards(case, inp, ref)

    h, w, b = inp.head.leaves()
    out = fused_pg.repo_loss(h, w, inp.head.targets, inp.advantages, inp.old_logprobs, inp.mask,
                             bias=b, **inp.tensors(), **case.fused_kwargs(backend))
    out.loss.backward()
    tol = TOLS[case.dtype]
    zeta_conditioning_guard(case, inp, ref, out)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert_close("loss", ref.loss, out.loss, atol=tol.value, rtol=tol.value, key=case.dtype)
    assert out.logprobs.shape == inp.head.targets.shape and out.entropy.shape == inp.head.targets.shape
    assert not out.logprobs.requires_grad and not out.entropy.requires_grad
    valid = inp.valid.view(inp.head.targets.shape)
    plain_lp = plain_ent = None
    if tol.fair and bool(valid.any()):
        hh, ww = inp.head.hidden.reshape(case.head.N, -1)[inp.valid], inp.head.weight
        plain_lp, plain_ent = naive_logprobs_entropy(
            hh, ww, inp.head.targets.reshape(-1)[inp.valid], inp.head.bias,
            temperature=case.head.temperature, softcap=case.head.softcap)
    check_head_values("logprobs", case.dtype, ref.logprobs, out.logprobs, valid, plain_lp)
    check_head_values("entropy", case.dtype, ref.entropy, out.entropy, valid, plain_ent)
    check_metrics(ref.metrics, out.metrics, case.dtype)
    check_per_token(ref, out, case.dtype)
    grads = {"hidden": (ref_grads["hidden"], h.grad), "weight": (ref_grads["weight"], w.grad)}
    if b is not None:
        grads["bias"] = (ref_grads["bias"], b.grad)
    check_grads(grads, case.dtype, floors)
    if int(inp.valid.sum()) == 0:
        assert out.loss.item() == 0.0 and out.metrics["empty_batch"].item() == 1.0
