"""Shared test machinery: the backend list, hypothesis strategies, input builders, the fp64
oracle runs and the pass rules below.

Adding a backend to the property tests is one line in ``BACKENDS`` (plus, for a slow one, a
``LIMITS`` entry that caps shapes, dtypes and the number of examples), e.g.::

    BACKENDS = ["torch", "reference", "triton"]
    LIMITS["triton"] = BackendLimits(dtypes=("fp32", "bf16", "fp16", "bf16+fp32"),
                                     max_tokens=24, max_vocab=80, max_dim=24, example_scale=0.25,
                                     accumulation_size=256)

Pass rules (``Tol`` below; every comparison is against ``fused_pg.reference`` run in fp64 on
the *same rounded inputs*, i.e. the low-precision tensors upcast exactly to fp64):

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

Ill-conditioned examples are skipped with ``assume`` rather than by loosening the rules (see
``oracle_guards``): REPO "decorrelate" with Var(logp) < 1e-3, and clip / TIS boundaries; and
(``zeta_conditioning_guard``) a "decorrelate" zeta that the backend's measured log-prob error
can move by more than the value tolerance.
"""

from __future__ import annotations

import math
import os
import random
from collections import Counter
from dataclasses import dataclass, field

import hypothesis.strategies as st
import torch
import torch.nn.functional as F
from hypothesis import assume, given, note, settings
from torch import Tensor

from fused_pg.reference import logprobs_entropy_ref, policy_loss_ref, repo_loss_ref
from fused_pg.reference.head import logits_ref

# ---------------------------------------------------------------------------------------------
# backends and their per-backend limits
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# hypothesis budget: per-test example counts scaled by profile and backend
# ---------------------------------------------------------------------------------------------

# Per-test ``settings(max_examples=...)`` overrides a profile's value, so the scaling is
# explicit: the profile's own max_examples relative to hypothesis' default of 100
# ("ci": x1, "dev": x4 as registered in conftest.py).
EXAMPLES_RUN = [0]  # examples that passed every assume() and ran to completion (summary in conftest)
EXAMPLES_TRIED = [0]  # examples started (the difference was rejected by assume())
COVERAGE: Counter = Counter()  # "option=value" -> completed loss examples that had it (conftest, -v)


def count_example() -> None:
    """For a plain ``@given`` test: count one completed example in the session summary."""
    EXAMPLES_TRIED[0] += 1
    EXAMPLES_RUN[0] += 1


def n_examples(base: int, backend: str | None = None) -> int:
    scale = settings.default.max_examples / 100
    if backend is not None:
        scale *= limits(backend).example_scale
    return max(1, round(base * scale))


def run_property(strategy, check, *, examples: int, backend: str | None = None) -> None:
    """Run ``check(case)`` over hypothesis examples drawn from ``strategy``.

    Runs inside the calling test so that one ``pytest.mark.parametrize("backend", BACKENDS)``
    can give each backend its own example budget. The inner test has no example database
    (the "ci" profile is derandomized; a failure prints the falsifying case).
    """

    @settings(max_examples=n_examples(examples, backend), database=None)
    @given(case=strategy)
    def run(case):
        EXAMPLES_TRIED[0] += 1
        check(case)
        EXAMPLES_RUN[0] += 1
        if isinstance(case, LossCase):
            COVERAGE.update(case.features())

    run()


# ---------------------------------------------------------------------------------------------
# named comparisons
# ---------------------------------------------------------------------------------------------

WORST: dict[str, float] = {}  # "name[dtype]" -> worst (error / allowed) seen; printed by conftest


def _record(key: str, ratio: float) -> None:
    WORST[key] = max(WORST.get(key, 0.0), ratio)


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
    assert not torch.isnan(got_t).any(), f"{name}: NaN in result\n got={got_t}"
    same_inf = (ref_t == got_t) & torch.isinf(ref_t)
    err = torch.where(same_inf, 0.0, (got_t - ref_t).abs())
    allowed = atol + rtol * torch.where(torch.isinf(ref_t), 0.0, ref_t.abs())
    ratio = err / allowed.clamp_min(1e-300)
    worst = int(torch.argmax(torch.where(torch.isnan(ratio), math.inf, ratio)))
    max_err = float(err.max())
    _record(f"{name}[{key}]" if key else name, float(ratio.max()))
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
        _record(f"{name}-subnormal[{key}]", d / subnormal_step if subnormal_step else 0.0)
        return
    if cos >= cos_min and rel <= rel_max:
        _record(f"{name}-rel[{key}]", rel / rel_max)
        _record(f"{name}-(1-cos)[{key}]", (1 - cos) / max(1 - cos_min, 1e-300))
        return
    _record(f"{name}-floor[{key}]", d / max(floor, 1e-300))
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
        _record(f"{name}-fair[{dtype_name}]", err / allowed)
        assert err <= allowed, (f"{name}: error vs fp64 {err:.3e} is worse than plain {dtype_name} "
                                f"PyTorch's {err_plain:.3e} + margin (allowed {allowed:.3e})")


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


# ---------------------------------------------------------------------------------------------
# strategies: the head
# ---------------------------------------------------------------------------------------------

TEMPERATURES = [1.0, 0.7, 1.3]
SOFTCAPS = [None, None, 4.0, 30.0]
LOGIT_SCALES = [0.5, 2.0, 6.0]  # std of the logits: flat, typical, peaky distributions


@dataclass
class HeadCase:
    dtype: str
    lead: tuple[int, ...]          # (B, T) or (N,)
    D: int
    V: int
    token_chunk: int | None
    vocab_chunk: int | None
    bias: str                      # "none" | "finite" | "neg_inf" (some entries -inf)
    temperature: float
    softcap: float | None
    ignore_index: int
    ignore_frac: float
    logit_scale: float
    precision: str
    seed: int
    compact_rows: bool | None = None   # None: the default (on CPU)

    @property
    def N(self) -> int:
        return math.prod(self.lead)

    def head_kwargs(self, backend: str) -> dict:
        return dict(temperature=self.temperature, softcap=self.softcap, ignore_index=self.ignore_index,
                    backend=backend, precision=self.precision, token_chunk=self.token_chunk,
                    vocab_chunk=self.vocab_chunk, compact_rows=self.compact_rows)


def _odd_biased(lo: int, hi: int):
    """Integers in [lo, hi], half of them odd by construction."""
    return st.one_of(st.integers(lo, hi), st.integers(lo // 2, (hi - 1) // 2).map(lambda k: 2 * k + 1)) \
        .filter(lambda x: lo <= x <= hi)


def option_rng(draw, *structure) -> random.Random:
    """A ``random.Random`` for the option choices of one example.

    Hypothesis biases ``sampled_from`` toward the first element (its "simplest" value): with
    ~100 examples that left options like ``repo="decorrelate"`` or ``kl_estimator="k3+"`` with
    a handful of examples. Options are therefore picked uniformly from a drawn seed, while
    shapes stay hypothesis-drawn (it finds the 1-token / V=2 / D=1 edges). The seed mixes the
    drawn integer with the drawn shapes (``structure``): hypothesis often repeats an integer
    across examples, and a repeated seed alone would repeat the whole option set. Every
    example's full case is printed on failure, so nothing is lost for reproduction.
    """
    return random.Random(f"{draw(st.integers(0, 2**32 - 1))}|{structure}")


@st.composite
def head_fields(draw, backend: str, lead: tuple[int, ...] | None = None, dtypes=None) -> dict:
    lim = limits(backend)
    if lead is None:
        if draw(st.booleans()):
            B = draw(st.integers(1, 4))
            lead = (B, draw(st.integers(1, max(1, lim.max_tokens // B))))
        else:
            lead = (draw(_odd_biased(1, lim.max_tokens)),)
    N = math.prod(lead)
    V = draw(_odd_biased(2, lim.max_vocab))
    D = draw(_odd_biased(1, lim.max_dim))
    rng = option_rng(draw, lead, V, D)
    dtype = rng.choice([d for d in (dtypes or DTYPES) if d in lim.dtypes])
    return dict(
        dtype=dtype, lead=lead, D=D, V=V,
        token_chunk=rng.randint(1, N) if rng.random() < 0.6 else None,
        # mostly several vocabulary chunks, V mostly not a multiple of the chunk
        vocab_chunk=rng.randint(1, max(1, V - 1)) if rng.random() < 0.75 else None,
        bias=rng.choice(["none", "finite", "neg_inf"]),
        temperature=rng.choice(TEMPERATURES),
        softcap=rng.choice(SOFTCAPS),
        ignore_index=rng.choice([-100, -1]),
        ignore_frac=rng.choice([0.0, 0.25]),
        logit_scale=rng.choice(LOGIT_SCALES),
        precision=rng.choice(["native", "ieee"]),
        seed=rng.getrandbits(31),
        compact_rows=rng.choice([None, False]),  # None: compacted on CPU; False: rows zeroed
    )


def head_cases(backend: str, **kw):
    return head_fields(backend, **kw).map(lambda f: HeadCase(**f))


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


# ---------------------------------------------------------------------------------------------
# strategies: the loss
# ---------------------------------------------------------------------------------------------

AGGREGATIONS = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
TOKEN_AGGREGATIONS = ("token-mean", "token-sum")
KL_ESTIMATORS = ("k1", "k2", "k3", "abs", "k1+", "k3+", "abs+")
PRESETS = (None, "verl", "verl-gspo", "trl-grpo", "trl-gspo", "trl-dapo", "trl-bnpo", "trl-dr-grpo", "trl-luspo",
           "openrlhf")
PRESET_OPTIONS = ("eps_low", "eps_high", "dual_clip", "delta", "aggregation", "importance_level",
                  "kl_estimator", "kl_clamp", "max_length")
LIBRARY_DEFAULTS = dict(eps_low=0.2, eps_high=0.28, dual_clip=None, delta=None, aggregation="token-mean",
                        importance_level="token", kl_estimator="k3", kl_clamp=None, max_length=None)
MASKS = ("none", "random", "random", "empty_rows", "empty_rows", "all_masked")  # repeats weight the pick


@dataclass
class LossCase:
    head: HeadCase
    layout: str                    # "dense" [B, T] | "packed" [N] + cu_seqlens | "packed-nocu"
    lengths: tuple[int, ...]       # sequence lengths (dense: B x T; packed-nocu: one run)
    mask: str
    mask_dtype: torch.dtype
    adv_per_seq: bool
    with_ref: bool
    with_rollout: bool
    opts: dict                     # keyword arguments shared by fused_pg.repo_loss and the oracle
    deterministic: bool
    weights: str = "none"          # "none" | "token" | "sequence" (per-token weights of the policy term)

    @property
    def dtype(self) -> str:
        return self.head.dtype

    @property
    def effective(self) -> dict:
        """``opts`` with the options left to the preset (or the library default) filled in,
        from the oracle's own preset table."""
        return effective_options(self.opts)

    def features(self) -> list[str]:
        """Option values of this example, for the coverage summary."""
        o, h = self.effective, self.head
        f = [f"dtype={h.dtype}", f"layout={self.layout}", f"mask={self.mask}", f"repo={o['repo']}",
             f"aggregation={o['aggregation']}", f"importance={o['importance_level']}", f"bias={h.bias}",
             f"softcap={h.softcap is not None}", f"temperature!=1={h.temperature != 1}",
             f"dual_clip={o['dual_clip'] is not None}", f"delta={o['delta'] is not None}",
             f"num_items={'num_items_in_batch' in o}", f"max_length={o['max_length'] is not None}",
             f"adv_per_seq={self.adv_per_seq}", f"entropy_coef!=0={o['entropy_coef'] != 0}",
             f"ignore_frac>0={h.ignore_frac > 0}", f"multi_vocab_chunks={(h.vocab_chunk or h.V) < h.V}",
             f"multi_token_chunks={(h.token_chunk or h.N) < h.N}", f"compact_rows={h.compact_rows}"]
        f += [f"preset={o.get('preset')}", f"weights={self.weights}",
              f"kl_aggregation={o.get('kl_aggregation')}", f"entropy_aggregation={o.get('entropy_aggregation')}"]
        if self.with_ref:
            f.append(f"kl={o['kl_estimator']},coef>0={o['kl_coef'] > 0}")
            f.append(f"kl_clamp={o['kl_clamp']},ratio_weight={o.get('kl_ratio_weight', False)}")
        if self.with_rollout:
            f.append(f"tis_level={o['tis_level']}")
        if self.layout == "packed":
            f.append(f"empty_sequence={0 in self.lengths}")
        return f

    def fused_kwargs(self, backend: str) -> dict:
        h = self.head
        return dict(self.opts, backend=backend, precision=h.precision, deterministic=self.deterministic,
                    token_chunk=h.token_chunk, vocab_chunk=h.vocab_chunk, compact_rows=h.compact_rows)


@st.composite
def loss_cases(draw, backend: str, layouts=("dense", "packed", "packed-nocu"), masks=MASKS,
               dtypes=None) -> LossCase:
    lim = limits(backend)
    layout = draw(st.sampled_from(layouts))
    if layout == "dense":
        B = draw(st.integers(1, 4))
        T = draw(_odd_biased(1, max(1, lim.max_tokens // B)))
        lengths, lead = (T,) * B, (B, T)
    elif layout == "packed":
        # sequences of any length, empty ones included, at least one token overall
        lengths = tuple(draw(st.lists(st.integers(0, 9), min_size=1, max_size=6)
                             .filter(lambda ls: 0 < sum(ls) <= lim.max_tokens)))
        lead = (sum(lengths),)
    else:
        N = draw(_odd_biased(1, lim.max_tokens))
        lengths, lead = (N,), (N,)
    head = HeadCase(**draw(head_fields(backend, lead=lead, dtypes=dtypes)))

    seqs = layout != "packed-nocu"
    rng = option_rng(draw, head)
    pick = rng.choice
    opts: dict = dict(temperature=head.temperature, softcap=head.softcap, ignore_index=head.ignore_index)
    opts["repo"] = repo = pick(["none", "fixed", "decorrelate"])
    if repo == "fixed":
        opts["repo_coef"] = pick([0.0, 0.1, 0.5, 2.0])
    elif repo == "decorrelate":
        opts["repo_coef"] = pick([0.3, 1.0, 1.0])
    opts["repo_center"] = pick([True, False])
    opts["eps_low"] = pick([0.0, 0.1, 0.2, 0.35])
    opts["eps_high"] = pick([0.0, 0.2, 0.28, 0.5])
    opts["dual_clip"] = pick([None, 1.5, 3.0])
    opts["delta"] = pick([None, 1.2, 1.6])
    with_ref = pick([True, False])
    opts["kl_coef"] = pick([0.0, 0.05, 0.5]) if with_ref else 0.0
    opts["kl_estimator"] = pick(KL_ESTIMATORS)
    opts["kl_clamp"] = pick([None, None, 10.0, 0.3, 0.05])  # |KL| <= ~1 here: 0.3 and 0.05 do clamp
    if pick([True, False, False]):
        opts["kl_ratio_weight"] = True
    opts["entropy_coef"] = pick([0.0, 0.01, -0.1])
    aggs = AGGREGATIONS if seqs else TOKEN_AGGREGATIONS
    opts["aggregation"] = agg = pick(aggs)
    opts["importance_level"] = pick(["token", "sequence"] if seqs else ["token"])
    for term in ("kl", "entropy"):  # separate normalisers of the KL and entropy terms
        if pick([True, False]):
            opts[f"{term}_aggregation"] = pick(aggs)
        if pick([True, False]):
            opts[f"{term}_num_items_in_batch"] = float(rng.randint(1, 3 * head.N))
    with_rollout = pick([True, False])
    if with_rollout:
        opts["tis_cap"] = pick([0.5, 1.5, 4.0])
        opts["tis_level"] = pick(["token", "sequence"] if seqs else ["token"])
    if pick([True, False]):
        opts["num_items_in_batch"] = float(rng.randint(1, 3 * head.N))
    modes = (agg, opts.get("kl_aggregation") or agg, opts.get("entropy_aggregation") or agg)
    if "seq-mean-token-sum-norm" in modes and (layout == "packed" or pick([True, False])):
        opts["max_length"] = max(lengths) + rng.randint(0, 5)
    # a preset: some of the options it sets are left out (the preset decides), the rest win
    preset = pick(PRESETS[:1] * 9 + PRESETS[1:])
    if preset is not None:
        opts["preset"] = preset
        for name in PRESET_OPTIONS:
            if pick([True, False]):
                opts.pop(name, None)
        eff = effective_options(opts)
        if not seqs:  # packed without cu_seqlens: only token-level options can apply
            for name in ("aggregation", "importance_level"):
                if name not in opts:
                    opts[name] = "token-mean" if name == "aggregation" else "token"
            eff = effective_options(opts)
        modes = (eff["aggregation"], opts.get("kl_aggregation") or eff["aggregation"],
                 opts.get("entropy_aggregation") or eff["aggregation"])
        if "seq-mean-token-sum-norm" not in modes:
            opts.pop("max_length", None)  # (a preset's Dr.GRPO length is then unused)
        elif layout == "packed" and effective_options(opts)["max_length"] is None:
            opts["max_length"] = max(lengths) + rng.randint(0, 5)
    weights = pick(["none", "token", "sequence"] if seqs else ["none", "token"])
    return LossCase(
        head=head, layout=layout, lengths=lengths, mask=pick(masks),
        mask_dtype=pick([torch.bool, torch.int64, torch.float32]),
        adv_per_seq=seqs and pick([True, False]), with_ref=with_ref, with_rollout=with_rollout,
        opts=opts, deterministic=pick([True, False]), weights=weights)


def effective_options(opts: dict) -> dict:
    """The values the oracle uses for the preset-able options (from its own preset table)."""
    from fused_pg.reference.loss import Default, _preset_values

    table = _preset_values(opts.get("preset"), opts.get("kl_estimator", Default("k3")))
    out = dict(opts)
    for name in PRESET_OPTIONS:
        if name not in opts:
            out[name] = table.get(name, LIBRARY_DEFAULTS[name])
    return out


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
        cap = [math.log(o["tis_cap"])]
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


HEAD_OPTIONS = ("temperature", "softcap", "ignore_index")


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


def oracle_guards(case: LossCase, inp: LossInputs, ref) -> None:
    """``assume`` away examples whose comparison is ill-conditioned (not a tolerance change).

    * REPO "decorrelate" divides by Var(logp) over the valid tokens. Below Var = 1e-3 (1e-6 in
      fp64) fp32 rounding of logp (~1e-6) moves zeta = gamma Cov/Var by more than the fp32
      tolerance, so such examples are skipped; Var == 0 exactly (<= 1 valid token) is kept.
    * The clip indicators (clip_frac_*, dual clip) and the TIS cap switch at exact boundaries.
      Generated log-ratios already avoid them (``make_loss_inputs``), and the signs of the
      REPO-corrected advantages must not be within 1e-4 of zero.
    """
    valid = inp.valid
    n = int(valid.sum())
    o = case.opts
    if n == 0:
        return
    lp = inp.lp64[valid]
    var = float(((lp - lp.mean()) ** 2).mean())
    if o["repo"] == "decorrelate" and o["repo_coef"] > 0 and n > 1:
        assume(var >= (1e-6 if case.dtype == "fp64" else 1e-3))
    A = inp.advantages.double()
    if case.adv_per_seq:
        A = torch.cat([A[i].expand(L) for i, L in enumerate(case.lengths)])
    A = A.reshape(-1)
    zeta = float(ref.metrics["repo_zeta"])
    mu = float(lp.mean()) if o["repo_center"] else 0.0
    A_corr = A - zeta * (inp.lp64 - mu) if o["repo"] != "none" else A
    assume(bool((A_corr[valid].abs() > 1e-4).all()))
    note(f"valid tokens {n}, Var(logp) {var:.3e}, zeta {zeta:.4g}")


def zeta_conditioning_guard(case: LossCase, inp: LossInputs, ref, out) -> None:
    """``assume`` away a REPO "decorrelate" example whose zeta the measured log-prob error can
    move by more than the value tolerance (``oracle_guards`` can only bound Var(logp) before the
    run; this uses the backend's actual error, itself within the head's tolerance).

    zeta = gamma C / V with C = mean((A - mean A)(l - mean l)) and V = mean((l - mean l)^2); a
    log-prob error d moves it by at most gamma (max|A - mean A| + 2 |C / V| max|l - mean l|)
    max|d| / V (first order).
    """
    o = case.opts
    valid = inp.valid
    n = int(valid.sum())
    if o["repo"] != "decorrelate" or o["repo_coef"] == 0 or n < 2 or case.dtype == "fp64":
        return
    lp = inp.lp64[valid]
    A = inp.advantages.double()
    if case.adv_per_seq:
        A = torch.cat([A[i].expand(L) for i, L in enumerate(case.lengths)])
    A = A.reshape(-1)[valid]
    var = float(((lp - lp.mean()) ** 2).mean())
    if var == 0.0:
        return
    zeta_over_gamma = float(ref.metrics["repo_zeta"]) / o["repo_coef"]
    d = float((out.logprobs.detach().double().reshape(-1)[valid] - lp).abs().max())
    moved = o["repo_coef"] * (float((A - A.mean()).abs().max())
                              + 2 * abs(zeta_over_gamma) * float((lp - lp.mean()).abs().max())) * d / var
    allowed = TOLS[case.dtype].value * (1 + abs(float(ref.metrics["repo_zeta"])))
    note(f"zeta sensitivity to the measured log-prob error {d:.2e}: {moved:.2e} (tolerance {allowed:.2e})")
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
        plain_lp, plain_ent = plain_logprobs_entropy(
            hh, ww, inp.head.bias, inp.head.targets.reshape(-1)[inp.valid],
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

