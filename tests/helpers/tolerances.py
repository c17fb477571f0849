"""Pass rules and named comparisons against the fp64 oracle.

Every comparison is against ``fused_pg.reference`` run in fp64 on the *same rounded inputs*,
i.e. the low-precision tensors upcast exactly to fp64 (``Tol``, ``TOLS``):

* fp64 inputs: everything (values, metrics, gradients) within ~1e-10 relative.
* fp32 inputs: logp / entropy ``|d| <= 1e-5 * (1 + |ref|)`` elementwise.
* bf16 / fp16 inputs (also bf16 hidden with an fp32 weight): logp / entropy
  ``|d| <= 2e-3`` elementwise (absolute) AND the *fair low-precision rule*:
  ``max|d| <= max|d_plain| + 1e-4 * (1 + max|ref|)``, where ``d_plain`` is the error of
  plain PyTorch on the same inputs, ``F.linear(h, W, b)`` in the input dtype followed by
  fp32 temperature / soft-cap / ``log_softmax`` (what a trainer does without a fused head).
* loss and every metric (all dtypes but fp64): ``|d| <= 2e-5 * (1 + |ref|)``; the sweeps and
  the epilogue compute in fp32 from the rounded inputs, so these are fp32-level errors.
* gradients: cosine similarity >= 0.9999 (fp64: >= 1 - 1e-12) and
  ``max|d| / max|ref| <=`` 1e-9 (fp64 grads), 1e-4 (fp32), 2e-3 (fp16), 1e-2 (bf16) --
  keyed on the dtype of the gradient tensor, which is the input's dtype (a bf16 gradient
  carries its own rounding of 2^-9 relative; fp16 subnormal spacing 2^-24 is allowed on top).
  Noise-floor fallback: a gradient failing that rule still passes when ``max|d|`` is below
  ``16 * eps * (1 + max|z|)`` times its natural (cancellation-free) scale, eps of fp32 (fp64
  for fp64 inputs); see ``grad_floors``. It fires for near-certain predictions whose whole
  gradient is O(1 - p), where ``1 - p`` cancels in every fixed-precision implementation.
  A backend that stores dL/dlogits in a 16-bit GEMM operand dtype (the Triton backend with
  bf16 / fp16 inputs, exactly as plain autograd does for a low-precision ``F.linear``) adds
  that dtype's unit roundoff times the natural scale: rounding each dL/dz_tv to u relative
  moves dW_v = sum_t dz_tv h_t by at most u sum_t |dz_tv| |h_t| <= u * natural scale
  (``DLOGITS_DTYPE``, ``dlogits_dtype``).

Each comparison records its worst error / allowed error in ``plugin.STATS`` (printed with -v).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from .backends import LOW_PRECISION
from .plugin import STATS

def assert_close(name: str, ref, got, *, atol: float = 0.0, rtol: float = 0.0, key: str = "",
                 where: Tensor | None = None) -> float:
    """Elementwise ``|got - ref| <= atol + rtol * |ref|`` (ref is the fp64 oracle).

    Prints (in the assertion message) the worst element, the max abs error and the allowed
    error; returns the max abs error. ``where`` restricts the comparison to a bool mask.
    """
    ref_t = torch.as_tensor(ref, dtype=torch.float64).detach().cpu()
    got_t = torch.as_tensor(got).detach().cpu().to(torch.float64)
    assert ref_t.shape == got_t.shape, f"{name}: shape {tuple(got_t.shape)} != reference {tuple(ref_t.shape)}"
    if where is not None:
        ref_t, got_t = ref_t[where], got_t[where]
    if ref_t.numel() == 0:
        return 0.0
    # NaN is a value of its own (not measured): where the reference is NaN the result must be too
    unmeasured = torch.isnan(ref_t)
    assert torch.equal(torch.isnan(got_t), unmeasured), (
        f"{name}: NaN in result where the reference has a number, or a number where it has NaN (not measured)"
        f"\n got={got_t}\n ref={ref_t}")
    ref_t, got_t = ref_t[~unmeasured], got_t[~unmeasured]
    if ref_t.numel() == 0:
        return 0.0
    same_inf = (ref_t == got_t) & torch.isinf(ref_t)
    err = torch.where(same_inf, 0.0, (got_t - ref_t).abs())
    allowed = atol + rtol * torch.where(torch.isinf(ref_t), 0.0, ref_t.abs())
    ratio = err / allowed.clamp_min(1e-300)
    worst = int(torch.argmax(torch.where(torch.isnan(ratio), math.inf, ratio)))
    max_err = float(err.max())
    STATS.record_worst(f"{name}[{key}]" if key else name, float(ratio.max()))
    if not bool((err <= allowed).all()):
        raise AssertionError(
            f"{name}: max abs error {max_err:.3e}; worst element #{worst}: got {float(got_t.flatten()[worst]):.10g} "
            f"ref {float(ref_t.flatten()[worst]):.10g} (|d| {float(err.flatten()[worst]):.3e} > "
            f"allowed {float(allowed.flatten()[worst]):.3e} = {atol:g} + {rtol:g}*|ref|)")
    return max_err


def assert_grad_close(name: str, ref: Tensor | None, got: Tensor | None, *, cos_min: float,
                      rel_max: float, key: str = "", floor: float = 0.0) -> None:
    """Gradient rule: cosine similarity >= cos_min and max|d| / max|ref| <= rel_max
    (``max|d|`` less the subnormal spacing of the gradient's dtype, 2^-24 for fp16);
    otherwise ``max|d| <= floor`` (the arithmetic noise floor, see :func:`grad_floors`).

    A zero reference gradient must be matched within the floor, i.e. exactly when no gradient
    flows at all (an all-masked batch has a zero floor).
    """
    assert got is not None, f"{name}: no gradient"
    if ref is None:
        ref = torch.zeros_like(got, dtype=torch.float64)
    r = ref.detach().double().flatten()
    g = got.detach().double().flatten()
    assert r.shape == g.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(g).all(), f"{name}: non-finite gradient entries: {g[~torch.isfinite(g)][:5]}"
    scale = float(r.abs().max()) if r.numel() else 0.0
    d = float((g - r).abs().max()) if r.numel() else 0.0
    if scale == 0.0:
        # exactly 0 where nothing flows (all masked: the floor is 0 too); a recomputing sweep
        # may leave rounding noise where p = 1 exactly in fp64 (one allowed token)
        assert d <= floor, f"{name}: reference gradient is exactly 0, got max |grad| {d:.3e} > floor {floor:.3e}"
        return
    cos = float(torch.dot(r, g) / (r.norm() * g.norm()).clamp_min(1e-300))
    # the gradient's own storage: fp16 gradients below 6e-5 are subnormal, spaced 2^-24 apart
    fi = torch.finfo(got.dtype)
    subnormal_step = fi.smallest_normal * fi.eps  # 0 when the CPU flushes fp64 denormals
    rel = max(d - subnormal_step, 0.0) / scale
    if d <= subnormal_step:
        # every element within one subnormal step of the fp64 truth: the best the gradient's
        # dtype can hold (a tiny fp16 gradient has a few bits left, so the cosine means nothing)
        STATS.record_worst(f"{name}-subnormal[{key}]", d / subnormal_step if subnormal_step else 0.0)
        return
    if cos >= cos_min and rel <= rel_max:
        STATS.record_worst(f"{name}-rel[{key}]", rel / rel_max)
        STATS.record_worst(f"{name}-(1-cos)[{key}]", (1 - cos) / max(1 - cos_min, 1e-300))
        return
    STATS.record_worst(f"{name}-floor[{key}]", d / max(floor, 1e-300))
    assert d <= floor, (
        f"{name}: cosine similarity {cos:.10f} (min {cos_min}), max|d|/max|ref| = {d:.3e}/{scale:.3e} "
        f"= {rel:.3e} (max {rel_max:g}); above the arithmetic noise floor {floor:.3e} too")


def dlogits_dtype(backend: str, dtype_name: str) -> torch.dtype | None:
    """16-bit dtype a backend stores dL/dlogits in for its gradient GEMMs (None: fp32/fp64)."""
    return DLOGITS_DTYPE.get(backend, {}).get(dtype_name)


DLOGITS_DTYPE = {"triton": {"bf16": torch.bfloat16, "fp16": torch.float16}}


def grad_floors(h64: Tensor, W64: Tensor, g: Tensor, e: Tensor, H: Tensor, z: Tensor, *, temperature: float,
                fp64: bool, dlogits: torch.dtype | None = None) -> dict:
    """Noise floor of each gradient: ``16 * eps * (1 + max|z|) * natural scale``.

    The natural scale is the cancellation-free size of the gradient: per token,
    ``dL/dz_v = g (1[v=y] - p_v) - e p_v (log p_v + H)`` (g = dL/dlogp, e = dL/dH, taken from the
    fp64 oracle) sums in absolute value to at most ``2|g| + 2|e| H``; the entropy term's
    ``log p_v + H`` is computed from logits with an absolute error ~``eps |z|`` whatever H is,
    hence ``s_t = (2|g_t| + |e_t| (2 H_t + 1)) / temperature`` and ``|dh| <= max_t s_t max|W|``,
    ``|dW| <= sum_t s_t max|h_t|``, ``|db| <= sum_t s_t``. When the predictions are near-certain
    the actual gradient is O(1 - p) (or O(H)) times smaller and cancels in any fixed-precision
    implementation: a fused sweep recomputes ``p = exp(z - lse)`` from the saved ``lse``, so its
    absolute error is ~``eps * |lse|`` of the natural scale (plain ``log_softmax`` backward does
    a little better, subtracting the max exactly). Real bugs are O(natural scale); this floor is 1e-6 .. 1e-5 of
    it in fp32 and 1e-14 in fp64. ``eps``: fp32's (fp64's for fp64 inputs).
    """
    eps = torch.finfo(torch.float64 if fp64 else torch.float32).eps
    s = (2 * g.abs() + e.abs() * (2 * H.abs() + 1)).reshape(-1) / temperature  # [N]
    h = h64.detach().reshape(s.numel(), -1)
    zmax = float(z[torch.isfinite(z)].abs().max()) if torch.isfinite(z).any() else 0.0
    c = 16 * eps * (1 + zmax)
    if dlogits is not None:  # dL/dz rounded to the 16-bit GEMM operand dtype: half an ulp,
        # a whole one under the Triton interpreter, which truncates fp32 -> 16-bit on store
        c += torch.finfo(dlogits).eps / (1 if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else 2)
    return {
        "hidden": c * float(s.max()) * float(W64.detach().abs().max()),
        "weight": c * float((s * h.abs().amax(1)).sum()),
        "bias": c * float(s.sum()),
    }


@dataclass(frozen=True)
class Tol:
    """Pass rule of one input-dtype configuration (see the module docstring)."""

    head: float               # logp / entropy: |d| <= head * (1 + |ref|) (absolute when head_rel is False)
    head_rel: bool
    fair: bool                # also apply the fair low-precision rule
    value: float              # loss and metrics: |d| <= value * (1 + |ref|)
    cos_min: float
    grad_rel: dict = field(default_factory=dict)  # grad dtype -> max|d| / max|ref|


GRAD_REL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}
TOLS = {
    "fp64": Tol(head=1e-10, head_rel=True, fair=False, value=1e-10, cos_min=1 - 1e-12, grad_rel=GRAD_REL),
    "fp32": Tol(head=1e-5, head_rel=True, fair=False, value=2e-5, cos_min=0.9999, grad_rel=GRAD_REL),
    **{k: Tol(head=2e-3, head_rel=False, fair=True, value=2e-5, cos_min=0.9999, grad_rel=GRAD_REL)
       for k in LOW_PRECISION},
}
FAIR_MARGIN = 1e-4

# The GPU checks (test_cuda.py) run the real compiler at trainer shapes (up to 16k tokens,
# D = 8192, V = 262400) against fp64, without the fair rule's plain-PyTorch baseline (it would
# materialise the [N, V] logits) and without the noise-floor fallback. Their rows are the ones
# above where the rule is the same, and differ where it does not:
# * 16-bit gradients: max|d| / max|ref| <= 3e-2 (bf16), 1e-2 (fp16). At these shapes their error
#   is dominated by the 16-bit dlogits operand of the gradient GEMMs (``DLOGITS_DTYPE``) summed
#   over thousands of tokens, which the CPU rule's noise floor accounts for and these checks do not;
# * the loss with 16-bit inputs: ``|d| <= 2e-3 * (1 + |ref|)``;
# * bf16 hidden with an fp32 weight: fp32 logp / entropy at "native" / "ieee" precision;
#   ``precision="tf32"`` (fp32 operands rounded to tf32's 10-bit mantissa): logp / entropy and
#   loss ``|d| <= 2e-3 * (1 + |ref|)``, fp32 gradients max|d| / max|ref| <= 1e-2.
GPU_GRAD_REL = {**GRAD_REL, torch.bfloat16: 3 * GRAD_REL[torch.bfloat16], torch.float16: 5 * GRAD_REL[torch.float16]}
GPU_TOLS = {
    "fp32": TOLS["fp32"],
    **{k: replace(TOLS[k], value=2e-3, grad_rel=GPU_GRAD_REL) for k in ("bf16", "fp16")},
    "bf16+fp32": replace(TOLS["fp32"], grad_rel=GPU_GRAD_REL),
    "tf32": Tol(head=2e-3, head_rel=True, fair=False, value=2e-3, cos_min=0.9999,
                grad_rel={**GPU_GRAD_REL, torch.float32: 1e-2}),
}


def plain_logprobs_entropy(h: Tensor, W: Tensor, b: Tensor | None, targets: Tensor, *,
                           temperature: float, softcap: float | None) -> tuple[Tensor, Tensor]:
    """Plain PyTorch head in the inputs' dtype: ``F.linear`` in low precision, then fp32.

    This is the baseline of the fair low-precision rule (flat inputs; targets all valid).
    """
    dt = torch.promote_types(h.dtype, W.dtype)
    z = F.linear(h.to(dt), W.to(dt), b.to(dt) if b is not None else None).float()
    z = z / temperature
    if softcap is not None:  # a -inf bias excludes its token, soft-cap or not
        z = torch.where(torch.isneginf(z), z, softcap * torch.tanh(z / softcap))
    logp_all = torch.log_softmax(z, dim=-1)
    p = logp_all.exp()
    ent = -(p * torch.where(p > 0, logp_all, 0.0)).sum(-1)
    return logp_all.gather(-1, targets[:, None]).squeeze(-1), ent


def check_head_values(name: str, dtype_name: str, ref: Tensor, got: Tensor, valid: Tensor,
                      plain: Tensor | None = None) -> None:
    """logp / entropy rule; ``plain`` (values at the valid positions) enables the fair rule."""
    tol = TOLS[dtype_name]
    assert got.dtype == (torch.float64 if dtype_name == "fp64" else torch.float32), f"{name}: dtype {got.dtype}"
    # masked / ignored positions must be exactly 0
    zero = torch.zeros_like(ref, dtype=torch.float64)
    assert_close(f"{name} (masked positions)", zero[~valid], got[~valid], key=dtype_name)
    if tol.head_rel:
        assert_close(name, ref, got, atol=tol.head, rtol=tol.head, key=dtype_name, where=valid)
    else:
        assert_close(name, ref, got, atol=tol.head, key=dtype_name, where=valid)
    if tol.fair and plain is not None and bool(valid.any()):
        r = ref[valid].double()
        err = float((got[valid].double() - r).abs().max())
        fin = torch.isfinite(r)
        err_plain = float((plain.double() - r)[fin].abs().max())
        allowed = err_plain + FAIR_MARGIN * (1 + float(r[fin].abs().max()))
        STATS.record_worst(f"{name}-fair[{dtype_name}]", err / allowed)
        assert err <= allowed, (f"{name}: error vs fp64 {err:.3e} is worse than plain {dtype_name} "
                                f"PyTorch's {err_plain:.3e} + margin (allowed {allowed:.3e})")


def same_number(a, b) -> bool:
    """Bitwise-equal metric values, NaN (not measured) equal to NaN."""
    a, b = float(a), float(b)
    return a == b or (math.isnan(a) and math.isnan(b))


ENTROPY_KEYS = ("entropy_mean", "entropy_loss", "entropy_drive", "entropy_drive_pos", "entropy_drive_neg",
                "clip_low_below_avg", "clip_high_below_avg")
ROLLOUT_KEYS = ("rollout_mismatch_abs_mean", "rollout_phantom_clip_frac")


def check_metric_convention(metrics: dict, repo: str = "decorrelate", cov_measured: bool = True) -> None:
    """The metrics' NaN convention (fused_pg.epilogue.METRICS): every key present; a value is NaN
    exactly where it could not be measured, as its flag says -- ``entropy_measured``,
    ``rollout_measured``, ``n_clip_low`` / ``n_clip_high`` -- and the REPO covariances where the
    statistics cannot give them ("relative" after the correction; ``cov_measured=False``: the
    per-state centre with statistics lacking the moments of logp + H). Finite everywhere else."""
    import fused_pg

    assert set(metrics) == set(fused_pg.METRIC_KEYS), sorted(set(metrics) ^ set(fused_pg.METRIC_KEYS))
    unmeasured = set()
    if metrics["entropy_measured"] == 0.0:
        unmeasured.update(ENTROPY_KEYS)
    if metrics["rollout_measured"] == 0.0:
        unmeasured.update(ROLLOUT_KEYS)
    for side in ("low", "high"):
        if float(metrics[f"n_clip_{side}"]) == 0:
            unmeasured.update((f"clip_{side}_p_mean", f"clip_{side}_below_avg"))
    if not cov_measured:
        unmeasured.update(("adv_logp_cov_before", "adv_logp_cov_after"))
    if repo == "relative":
        unmeasured.add("adv_logp_cov_after")
    for k, v in metrics.items():
        x = float(v)
        if k in unmeasured:
            assert math.isnan(x), f"metric {k} = {x}, but it was not measured: NaN expected"
        else:
            assert math.isfinite(x), f"metric {k} = {x}, but it was measured: a finite number expected"


def check_metrics(ref_metrics: dict, got_metrics: dict, dtype_name: str) -> None:
    assert set(got_metrics) == set(ref_metrics), (
        f"metric keys differ: only in fused_pg {sorted(set(got_metrics) - set(ref_metrics))}, "
        f"only in reference {sorted(set(ref_metrics) - set(got_metrics))}")
    tol = TOLS[dtype_name].value
    for k, rv in ref_metrics.items():
        gv = got_metrics[k]
        if isinstance(rv, float):
            assert isinstance(gv, float) and gv == rv, f"metric {k}: {gv!r} != {rv!r}"
            continue
        assert isinstance(gv, Tensor) and gv.dim() == 0, f"metric {k} must be a 0-dim tensor, got {gv!r}"
        assert not gv.requires_grad, f"metric {k} must be detached"
        if math.isnan(float(rv)):  # not measured (the oracle's own reason): NaN there too
            assert math.isnan(float(gv)), f"metric {k}: {float(gv)!r}, but the oracle says not measured (NaN)"
            continue
        assert_close(f"metric {k}", rv, gv, atol=tol, rtol=tol, key=dtype_name)


def check_per_token(ref, out, dtype_name: str) -> None:
    """The per-token advantages (REPO-corrected) and importance ratios the loss used."""
    tol = TOLS[dtype_name].value
    for name in ("advantages", "ratio"):
        got = getattr(out, name)
        assert got is not None and not got.requires_grad and got.shape == ref.logprobs.shape, name
        assert_close(f"per-token {name}", getattr(ref, name), got, atol=tol, rtol=tol, key=dtype_name)


def check_grads(pairs: dict, dtype_name: str, floors: dict | None = None) -> None:
    """``pairs``: name -> (reference fp64 grad, fused grad); the fused grad's dtype picks the rule.

    ``floors``: name -> arithmetic noise floor (:func:`grad_floors`), the fallback for
    ill-conditioned (near-certain) examples.
    """
    tol = TOLS[dtype_name]
    for name, (ref_g, got_g) in pairs.items():
        assert got_g is not None, f"{name}: no gradient"
        assert_grad_close(f"grad {name}", ref_g, got_g, cos_min=tol.cos_min,
                          rel_max=tol.grad_rel[got_g.dtype], key=str(got_g.dtype).replace("torch.", ""),
                          floor=(floors or {}).get(name, 0.0))
