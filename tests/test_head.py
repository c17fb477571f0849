"""fused_logprobs_entropy (the LM-head building block) against the fp64 oracle, and its invariants.

Random upstream gradients flow into BOTH outputs, ``(logp * u).sum() + (ent * w).sum()``, so
the backward sweep's two per-token scalars (g = dL/dlogp, e = dL/dH) are both exercised with
arbitrary signs and sizes, including at ignored positions (which must receive nothing).
"""

import math

import pytest
import torch

import fused_pg
from fused_pg.reference.head import logprobs_entropy_ref
from fused_pg.reference.head import logits_ref
from helpers import (BACKENDS, DTYPES, TOLS, HeadCase, assert_close, assert_grad_close, check_grads,
                     check_head_values, dlogits_dtype, grad_floors, head_cases, limits, make_head_inputs,
                     naive_logprobs_entropy, run_property)


def _upstream(case: HeadCase, gen: torch.Generator):
    pdt = torch.float64 if case.dtype == "fp64" else torch.float32
    return (torch.randn(case.lead, generator=gen, dtype=torch.float64).to(pdt),
            torch.randn(case.lead, generator=gen, dtype=torch.float64).to(pdt))


def _oracle(case, inp, u, w, backend=None):
    """fp64 oracle values and gradients, and the gradients' noise floors (helpers.grad_floors)."""
    h, W, b = inp.fp64_leaves()
    lp, ent = logprobs_entropy_ref(h, W, inp.targets, b, temperature=case.temperature, softcap=case.softcap,
                                   ignore_index=case.ignore_index, dtype=torch.float64)
    ((lp * u.double()).sum() + (ent * w.double()).sum()).backward()
    valid = inp.targets != case.ignore_index
    with torch.no_grad():
        z = logits_ref(h, W, b, temperature=case.temperature, softcap=case.softcap)
    floors = grad_floors(h, W, torch.where(valid, u.double(), 0.0), torch.where(valid, w.double(), 0.0),
                         ent.detach(), z, temperature=case.temperature, fp64=case.dtype == "fp64",
                         dlogits=dlogits_dtype(backend, case.dtype))
    grads = {"hidden": h.grad, "weight": W.grad, "bias": None if b is None else b.grad}
    return lp.detach(), ent.detach(), grads, floors


def check_head_case(case: HeadCase, backend: str) -> None:
    gen = torch.Generator().manual_seed(case.seed)
    inp = make_head_inputs(case, gen)
    u, w = _upstream(case, gen)
    ref_lp, ref_ent, ref_grads, floors = _oracle(case, inp, u, w, backend)

    h, W, b = inp.leaves()
    lp, ent = fused_pg.fused_logprobs_entropy(h, W, inp.targets, bias=b, **case.head_kwargs(backend))
    assert lp.shape == inp.targets.shape and ent.shape == inp.targets.shape
    assert lp.requires_grad and ent.requires_grad
    ((lp * u).sum() + (ent * w).sum()).backward()

    valid = inp.targets != case.ignore_index
    plain_lp = plain_ent = None
    if TOLS[case.dtype].fair and bool(valid.any()):
        flat_valid = valid.reshape(-1)
        plain_lp, plain_ent = naive_logprobs_entropy(
            inp.hidden.reshape(case.N, -1)[flat_valid], inp.weight, inp.targets.reshape(-1)[flat_valid], inp.bias,
            temperature=case.temperature, softcap=case.softcap)
    check_head_values("logprobs", case.dtype, ref_lp, lp.detach(), valid, plain_lp)
    check_head_values("entropy", case.dtype, ref_ent, ent.detach(), valid, plain_ent)
    grads = {"hidden": (ref_grads["hidden"], h.grad), "weight": (ref_grads["weight"], W.grad)}
    if b is not None:
        grads["bias"] = (ref_grads["bias"], b.grad)
    check_grads(grads, case.dtype, floors)


@pytest.mark.parametrize("backend", BACKENDS)
def test_head_matches_reference(backend):
    run_property(head_cases(backend), lambda case: check_head_case(case, backend), examples=80, backend=backend)


def check_head_invariants(case: HeadCase, backend: str) -> None:
    gen = torch.Generator().manual_seed(case.seed)
    inp = make_head_inputs(case, gen)
    h, W, b = inp.leaves()
    lp, ent = fused_pg.fused_logprobs_entropy(h, W, inp.targets, bias=b, **case.head_kwargs(backend))
    u, w = _upstream(case, gen)
    ((lp * u).sum() + (ent * w).sum()).backward()
    ignored = inp.targets == case.ignore_index
    assert lp.dtype == ent.dtype == (torch.float64 if case.dtype == "fp64" else torch.float32)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    assert (lp <= 0).all(), f"positive log-prob {lp.max()}"
    assert (ent >= 0).all(), f"negative entropy {ent.min()}"
    slack = 1e-12 if case.dtype == "fp64" else 1e-5
    assert (ent <= math.log(case.V) * (1 + slack) + slack).all(), f"entropy {ent.max()} > log V = {math.log(case.V)}"
    if case.bias == "neg_inf":  # excluded words do not count (with or without soft-cap)
        n_allowed = int(inp.allowed.sum())
        assert (ent <= math.log(n_allowed) * (1 + slack) + slack).all()
    assert (lp[ignored] == 0).all() and (ent[ignored] == 0).all()
    for t in (h, W, b):
        if t is not None:
            assert torch.isfinite(t.grad).all()
    # ignored tokens receive no gradient, whatever the upstream gradient there
    assert (h.grad[ignored] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_head_invariants(backend):
    run_property(head_cases(backend), lambda case: check_head_invariants(case, backend), examples=30,
                 backend=backend)


# ---------------------------------------------------------------------------------------------
# deterministic edge cases
# ---------------------------------------------------------------------------------------------

def _inputs(N=13, D=7, V=45, dtype=torch.float32, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g).to(dtype)
    W = (torch.randn(V, D, generator=g) * scale / math.sqrt(D)).to(dtype)
    b = (0.5 * torch.randn(V, generator=g)).to(dtype)
    y = torch.randint(0, V, (N,), generator=g)
    return h, W, b, y


def _compare_with_oracle(h, W, b, y, backend, *, upstream=(True, True), rtol=1e-5, **kw):
    """fp32 run vs the fp64 oracle on the same inputs (values, and gradients by the fp32 rule of
    helpers.check_grads with its noise floor; random upstream gradients)."""
    hh, ww = h.clone().requires_grad_(), W.clone().requires_grad_()
    bb = None if b is None else b.clone().requires_grad_()
    lp, ent = fused_pg.fused_logprobs_entropy(hh, ww, y, bias=bb, backend=backend, **kw)
    h2, w2 = h.double().requires_grad_(), W.double().requires_grad_()
    b2 = None if b is None else b.double().requires_grad_()
    kw_ref = {k: v for k, v in kw.items() if k in ("temperature", "softcap", "ignore_index")}
    lp2, ent2 = logprobs_entropy_ref(h2, w2, y, b2, **kw_ref)
    assert_close("logprobs", lp2, lp, atol=rtol, rtol=rtol)
    assert_close("entropy", ent2, ent, atol=rtol, rtol=rtol)
    g = torch.Generator().manual_seed(7)
    u, w = torch.randn(y.shape, generator=g) * upstream[0], torch.randn(y.shape, generator=g) * upstream[1]
    ((lp * u).sum() + (ent * w).sum()).backward()
    ((lp2 * u.double()).sum() + (ent2 * w.double()).sum()).backward()
    valid = y != kw.get("ignore_index", -100)
    with torch.no_grad():
        z = logits_ref(h2, w2, b2, temperature=kw.get("temperature", 1.0), softcap=kw.get("softcap"))
    floors = grad_floors(h2, w2, torch.where(valid, u.double(), 0.0), torch.where(valid, w.double(), 0.0),
                         ent2.detach(), z, temperature=kw.get("temperature", 1.0), fp64=False)
    check_grads({name: (a.grad, c.grad) for name, a, c in (("hidden", h2, hh), ("weight", w2, ww), ("bias", b2, bb))
                 if a is not None}, "fp32", floors)
    return lp, ent


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("upstream", [(True, False), (False, True)])
def test_gradient_through_one_output_only(backend, upstream):
    h, W, b, y = _inputs()
    if upstream == (True, False):
        hh = h.clone().requires_grad_()
        lp, _ = fused_pg.fused_logprobs_entropy(hh, W, y, bias=b, backend=backend)
        lp.sum().backward()
        h2 = h.double().requires_grad_()
        logprobs_entropy_ref(h2, W.double(), y, b.double())[0].sum().backward()
    else:
        hh = h.clone().requires_grad_()
        _, ent = fused_pg.fused_logprobs_entropy(hh, W, y, bias=b, backend=backend)
        ent.sum().backward()
        h2 = h.double().requires_grad_()
        logprobs_entropy_ref(h2, W.double(), y, b.double())[1].sum().backward()
    assert_grad_close("grad hidden", h2.grad, hh.grad, cos_min=0.9999, rel_max=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["hidden", "weight", "bias"])
def test_only_some_inputs_require_grad(backend, which):
    h, W, b, y = _inputs()
    leaves = {"hidden": h.clone(), "weight": W.clone(), "bias": b.clone()}
    leaves[which].requires_grad_()
    lp, ent = fused_pg.fused_logprobs_entropy(leaves["hidden"], leaves["weight"], y, bias=leaves["bias"],
                                              backend=backend)
    (lp.sum() + 0.3 * ent.sum()).backward()
    ref = {"hidden": h.double(), "weight": W.double(), "bias": b.double()}
    ref[which].requires_grad_()
    lp2, ent2 = logprobs_entropy_ref(ref["hidden"], ref["weight"], y, ref["bias"])
    (lp2.sum() + 0.3 * ent2.sum()).backward()
    assert_grad_close(f"grad {which}", ref[which].grad, leaves[which].grad, cos_min=0.9999, rel_max=1e-4)
    for other in set(leaves) - {which}:
        assert leaves[other].grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_excluded_vocabulary_chunks(backend):
    """-inf bias over whole vocabulary chunks (first, middle, last): an empty chunk must merge
    as nothing in the online softmax; no NaN anywhere."""
    h, W, b, y = _inputs(V=40)
    b = b.clone()
    b[:8] = -math.inf     # chunk 0 (vocab_chunk=8) entirely excluded
    b[16:24] = -math.inf  # chunk 2
    b[32:] = -math.inf    # the last chunk
    allowed = torch.isfinite(b).nonzero().squeeze(1)
    y = allowed[torch.randint(0, allowed.numel(), y.shape, generator=torch.Generator().manual_seed(3))]
    lp, ent = _compare_with_oracle(h, W, b, y, backend, vocab_chunk=8, token_chunk=5)
    assert (ent <= math.log(allowed.numel()) + 1e-5).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits_stay_finite(backend):
    """Logits of +-1e4 (fp32): online rescaling, p log p at p = 0, no overflow or NaN."""
    h, W, b, y = _inputs(scale=3e4)
    _compare_with_oracle(h, W, b, y, backend, vocab_chunk=7, token_chunk=4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_targets_ignored(backend):
    h, W, b, y = _inputs()
    y = torch.full_like(y, -100)
    hh, ww = h.clone().requires_grad_(), W.clone().requires_grad_()
    lp, ent = fused_pg.fused_logprobs_entropy(hh, ww, y, bias=b, backend=backend)
    assert (lp == 0).all() and (ent == 0).all()
    (lp.sum() + ent.sum()).backward()
    assert (hh.grad == 0).all() and (ww.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index(backend):
    h, W, b, y = _inputs()
    y = y.clone()
    y[::3] = 7  # ignore_index=7 is also a valid word id: those tokens must be skipped
    lp, ent = _compare_with_oracle(h, W, b, y, backend, ignore_index=7)
    assert (lp[::3] == 0).all() and (ent[::3] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    """A transposed hidden view and a column-sliced (tied-embedding-like) weight."""
    g = torch.Generator().manual_seed(0)
    h_tb = torch.randn(5, 3, 7, generator=g)
    h = h_tb.transpose(0, 1)  # [B=3, T=5, D=7], non-contiguous
    W_big = torch.randn(45, 20, generator=g)
    W = W_big[:, 3:10]        # [V, D] with row stride 20
    assert not h.is_contiguous() and not W.is_contiguous()
    y = torch.randint(0, 45, (3, 5), generator=g)
    _compare_with_oracle(h, W, None, y, backend, token_chunk=4, vocab_chunk=10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature,softcap", [(0.5, None), (1.0, 2.0), (2.0, 5.0)])
def test_temperature_and_softcap(backend, temperature, softcap):
    h, W, b, y = _inputs(scale=6.0)
    _compare_with_oracle(h, W, b, y, backend, temperature=temperature, softcap=softcap, vocab_chunk=16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_precision_native_and_ieee_agree(backend):
    h, W, b, y = _inputs(dtype=torch.bfloat16)
    a = fused_pg.fused_logprobs_entropy(h, W, y, bias=b, backend=backend, precision="native")
    c = fused_pg.fused_logprobs_entropy(h, W, y, bias=b, backend=backend, precision="ieee")
    assert_close("logprobs native vs ieee", a[0].double(), c[0], atol=1e-5, rtol=1e-5)
    assert_close("entropy native vs ieee", a[1].double(), c[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_mode_is_bitwise_reproducible(backend):
    h, W, b, y = _inputs(N=37, V=301)
    runs = []
    for _ in range(2):
        hh, ww, bb = (x.clone().requires_grad_() for x in (h, W, b))
        lp, ent = fused_pg.fused_logprobs_entropy(hh, ww, y, bias=bb, backend=backend, deterministic=True,
                                                  token_chunk=8, vocab_chunk=64)
        (lp.sum() - 0.5 * ent.sum()).backward()
        runs.append((lp, ent, hh.grad, ww.grad, bb.grad))
    for a, c in zip(*runs):
        assert torch.equal(a, c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_chunks_equal_small_chunks(backend):
    h, W, b, y = _inputs(N=29, V=103)
    a = fused_pg.fused_logprobs_entropy(h, W, y, bias=b, backend=backend)
    c = fused_pg.fused_logprobs_entropy(h, W, y, bias=b, backend=backend, token_chunk=3, vocab_chunk=10)
    assert_close("logprobs default vs small chunks", a[0].double(), c[0], atol=1e-6, rtol=1e-6)
    assert_close("entropy default vs small chunks", a[1].double(), c[1], atol=1e-6, rtol=1e-6)


def test_dtype_table_is_complete():
    """Every input dtype configuration has a pass rule."""
    assert set(DTYPES) == set(TOLS)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", ["many-token-chunks", "many-vocab-chunks"])
def test_low_precision_gradients_accumulate_in_fp32(backend, dtype, shape):
    """dW / db sum over all tokens and dh over all vocabulary chunks: with same-signed
    contributions (identical tokens, one target) a bf16/fp16 accumulator loses a relative
    ~2^-9 per addition and drifts by far more than one final rounding (hence: accumulate in fp32)."""
    big = limits(backend).accumulation_size
    N, D, V = (big, 16, 64) if shape == "many-token-chunks" else (16, 16, 2 * big)
    g = torch.Generator().manual_seed(0)
    row = torch.randn(1, D, generator=g)
    h = (row + 0.01 * torch.randn(N, D, generator=g)).to(dtype)
    W = (torch.randn(V, D, generator=g) / math.sqrt(D)).to(dtype)
    b = (0.1 * torch.randn(V, generator=g)).to(dtype)
    y = torch.full((N,), 3)
    hh, ww, bb = (x.clone().requires_grad_() for x in (h, W, b))
    lp, ent = fused_pg.fused_logprobs_entropy(hh, ww, y, bias=bb, backend=backend, token_chunk=8, vocab_chunk=16)
    (lp.sum() + 0.5 * ent.sum()).backward()
    h2, w2, b2 = (x.double().requires_grad_() for x in (h, W, b))
    lp2, ent2 = logprobs_entropy_ref(h2, w2, y, b2)
    (lp2.sum() + 0.5 * ent2.sum()).backward()
    name = "bf16" if dtype == torch.bfloat16 else "fp16"
    check_grads({"hidden": (h2.grad, hh.grad), "weight": (w2.grad, ww.grad), "bias": (b2.grad, bb.grad)}, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap", [None, 1.0])
def test_neg_inf_bias_excludes_tokens_through_the_softcap(backend, softcap):
    # logits (0, 0, -inf): two equally likely tokens, whatever the soft-cap does to finite ones
    b = torch.tensor([0.0, 0.0, -math.inf])
    h = torch.zeros(2, 4, requires_grad=True)
    W = torch.zeros(3, 4, requires_grad=True)
    lp, ent = fused_pg.fused_logprobs_entropy(h, W, torch.tensor([1, 0]), bias=b, softcap=softcap,
                                              backend=backend)
    assert_close("logprobs", torch.full((2,), -math.log(2)), lp.detach(), atol=1e-6)
    assert_close("entropy", torch.full((2,), math.log(2)), ent.detach(), atol=1e-6)
    (lp.sum() + ent.sum()).backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(W.grad).all()
