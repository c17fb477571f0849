"""repo_loss against the fp64 oracle (fused_pg.reference), and the loss-level invariants.

The property test draws every option of ``repo_loss`` at once (see helpers.loss_cases):
dense [B, T] and packed [N] (+ cu_seqlens, empty sequences included) layouts, fp64 / fp32 /
bf16 / fp16 / bf16-hidden-with-fp32-weight inputs, masks (random, empty rows, all masked),
ignore_index targets, bias with -inf entries, temperature, soft-cap, REPO none / fixed /
decorrelate (+ repo_coef, repo_center), asymmetric clip, dual clip, delta, KL k1/k2/k3/k3+,
entropy bonus, the four aggregations with and without num_items_in_batch and max_length,
token / sequence importance ratios, TIS at token / sequence level, small token and vocabulary
chunks (V not a multiple of the chunk). Compared: loss, logprobs, entropy, every metric (same
keys), gradients of hidden, weight and bias; rules in helpers/tolerances.py.
"""

import math

import pytest
import torch

import fused_pg
from fused_pg.reference.loss import repo_loss_ref
from helpers import (AGGREGATIONS, BACKENDS, FP64_BACKENDS, LossCase, assert_close, assert_grad_close,
                     check_loss_case, check_metric_convention, loss_cases, make_loss_inputs, run_property,
                     same_number)


# ---------------------------------------------------------------------------------------------
# equality with the oracle
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_matches_reference(backend):
    run_property(loss_cases(backend), lambda case: check_loss_case(case, backend),
                 examples=150, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_matches_reference_packed_sequences(backend):
    """Packed layouts only, sequence-level options likelier (empty sequences, per-seq stats)."""
    run_property(loss_cases(backend, layouts=("packed",)), lambda case: check_loss_case(case, backend),
                 examples=50, backend=backend)


# ---------------------------------------------------------------------------------------------
# invariants on the same random cases
# ---------------------------------------------------------------------------------------------

def _check_invariants(case: LossCase, backend: str) -> None:
    inp = make_loss_inputs(case)
    h, w, b = inp.head.leaves()
    out = fused_pg.repo_loss(h, w, inp.head.targets, inp.advantages, inp.old_logprobs, inp.mask,
                             bias=b, **inp.tensors(), **case.fused_kwargs(backend))
    out.loss.backward()
    valid = inp.valid.view(inp.head.targets.shape)
    V = case.head.V
    assert torch.isfinite(out.loss)
    assert (out.logprobs <= 0).all(), f"positive log-probs: {out.logprobs.max()}"
    assert (out.entropy >= 0).all(), f"negative entropy: {out.entropy.min()}"
    slack = 1e-12 if case.dtype == "fp64" else 1e-5
    assert (out.entropy <= math.log(V) * (1 + slack) + slack).all(), f"entropy {out.entropy.max()} > log V"
    assert (out.logprobs[~valid] == 0).all() and (out.entropy[~valid] == 0).all()
    check_metric_convention(out.metrics, case.opts["repo"])
    for name, t in (("hidden", h), ("weight", w), ("bias", b)):
        if t is not None:
            assert t.grad is not None and torch.isfinite(t.grad).all(), f"grad {name} not finite"
    if not bool(inp.valid.any()):
        assert out.loss.item() == 0.0 and out.metrics["empty_batch"].item() == 1.0
        for t in (h, w, b):
            if t is not None:
                assert (t.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_invariants(backend):
    run_property(loss_cases(backend), lambda case: _check_invariants(case, backend),
                 examples=30, backend=backend)


# ---------------------------------------------------------------------------------------------
# deterministic edge cases
# ---------------------------------------------------------------------------------------------

def _small_batch(dtype=torch.float32, B=3, T=7, D=11, V=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g).to(dtype)
    W = (torch.randn(V, D, generator=g) / math.sqrt(D) * 2).to(dtype)
    b = (0.5 * torch.randn(V, generator=g)).to(dtype)
    y = torch.randint(0, V, (B, T), generator=g)
    adv = torch.randn(B, T, generator=g)
    old = -torch.rand(B, T, generator=g) * 4 - 0.5
    ref = (old + 0.3 * torch.randn(B, T, generator=g)).clamp(max=0.0)
    mask = torch.rand(B, T, generator=g) < 0.8
    return h, W, b, y, adv, old, ref, mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("layout", ["dense", "packed"])
def test_all_masked_batch_gives_zero_loss_and_zero_grads(backend, aggregation, layout):
    h, W, b, y, adv, old, ref, _ = _small_batch()
    mask = torch.zeros_like(y, dtype=torch.bool)
    kw = dict(ref_logprobs=ref, kl_coef=0.1, entropy_coef=0.01, aggregation=aggregation, dual_clip=3.0,
              tis_cap=2.0, rollout_logprobs=old - 0.1, repo="decorrelate", backend=backend)
    if layout == "packed":
        h, y, adv, old, mask, kw["ref_logprobs"], kw["rollout_logprobs"] = (
            x.reshape(-1, *x.shape[2:]) for x in (h, y, adv, old, mask, kw["ref_logprobs"], kw["rollout_logprobs"]))
        kw["cu_seqlens"] = torch.tensor([0, 7, 7, 21])
        kw["max_length"] = 7 if aggregation == "seq-mean-token-sum-norm" else None
    h.requires_grad_(); W.requires_grad_(); b.requires_grad_()
    out = fused_pg.repo_loss(h, W, y, adv, old, mask, bias=b, **kw)
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert float(out.metrics["empty_batch"]) == 1.0 and float(out.metrics["n_tokens"]) == 0.0
    check_metric_convention(out.metrics)  # means over no token are 0; over no clipped token NaN
    for t in (h, W, b):
        assert t.grad is not None and (t.grad == 0).all()
    assert (out.logprobs == 0).all() and (out.entropy == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead", [(0, 5), (3, 0), (0,)], ids=["B=0", "T=0", "packed-N=0"])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_empty_micro_batch_gives_the_all_masked_result(backend, lead, aggregation):
    """No token at all (an empty micro-batch is normal in packed training): loss 0, zero
    gradients, every metric finite, empty_batch = 1 -- not an error."""
    D, V = 6, 13
    h = torch.randn(*lead, D, requires_grad=True)
    W = torch.randn(V, D, requires_grad=True)
    b = torch.zeros(V, requires_grad=True)
    kw = dict(bias=b, entropy_coef=0.01, aggregation=aggregation, backend=backend)
    if len(lead) == 1:
        kw["cu_seqlens"] = torch.tensor([0, 0])
        kw["max_length"] = 4 if aggregation == "seq-mean-token-sum-norm" else None
    elif aggregation == "seq-mean-token-sum-norm" and lead[1] == 0:
        kw["max_length"] = 4  # T = 0 gives no default length
    out = fused_pg.repo_loss(h, W, torch.zeros(lead, dtype=torch.long), torch.randn(lead),
                             -torch.rand(lead), **kw)
    out.loss.backward()
    assert out.loss.item() == 0.0 and float(out.metrics["empty_batch"]) == 1.0
    check_metric_convention(out.metrics)
    for t in (h, W, b):
        assert t.grad is not None and (t.grad == 0).all()
    assert out.logprobs.shape == lead and out.entropy.shape == lead


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_padding_is_ignored(backend):
    """NaN/Inf at masked positions of the per-token inputs neither raises nor leaks."""
    h, W, b, y, adv, old, ref, mask = _small_batch()
    roll = old - 0.2
    mask[1] = False  # an empty row, too
    kw = dict(bias=b, kl_coef=0.1, entropy_coef=0.01, tis_cap=2.0, dual_clip=3.0,
              aggregation="seq-mean-token-mean", importance_level="sequence", backend=backend)

    def run(pad):
        hh, ww, bb = (x.clone().requires_grad_() for x in (h, W, b))
        a, o, r, ro = (torch.where(mask, x, pad) for x in (adv, old, ref, roll))
        out = fused_pg.repo_loss(hh, ww, y, a, o, mask, **{**kw, "bias": bb}, ref_logprobs=r, rollout_logprobs=ro)
        out.loss.backward()
        return out, (hh.grad, ww.grad, bb.grad)

    clean, clean_g = run(0.0)
    for pad in (math.nan, math.inf, -math.inf):
        dirty, dirty_g = run(pad)
        assert torch.equal(dirty.loss, clean.loss), (pad, dirty.loss, clean.loss)
        for a, c in zip(dirty_g, clean_g):
            assert torch.equal(a, c)
        for k in clean.metrics:
            assert same_number(dirty.metrics[k], clean.metrics[k]), k
    # and the clean run agrees with the oracle
    hh, ww, bb = (x.double().requires_grad_() for x in (h, W, b))
    o = repo_loss_ref(hh, ww, y, adv, old, mask, bias=bb, ref_logprobs=ref, rollout_logprobs=roll,
                      **{k: v for k, v in kw.items() if k not in ("bias", "backend")})
    assert_close("loss", o.loss, clean.loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", FP64_BACKENDS)
def test_log_ratio_clamp_matches_reference(backend):
    """Log-ratios beyond +-20 are clamped before exp (verl): finite loss, oracle agreement."""
    h, W, b, y, adv, old, ref, mask = _small_batch(torch.float64)
    far = torch.where(torch.rand(old.shape, generator=torch.Generator().manual_seed(1)) < 0.5, -60.0, 60.0)
    old_far = old + far
    ref_far = ref - far
    kw = dict(bias=b, ref_logprobs=ref_far, kl_coef=0.2, kl_estimator="k3", repo="none", dual_clip=2.0)
    hh, ww = h.clone().requires_grad_(), W.clone().requires_grad_()
    # old + 60 is no log-probability (it is > 0): only the clamp's arithmetic is under test here,
    # so the plausibility check of validate=True is off
    out = fused_pg.repo_loss(hh, ww, y, adv, old_far, mask, backend=backend, validate=False, **kw)
    out.loss.backward()
    h2, w2 = h.clone().requires_grad_(), W.clone().requires_grad_()
    o = repo_loss_ref(h2, w2, y, adv, old_far, mask, **kw)
    o.loss.backward()
    assert torch.isfinite(out.loss)
    assert_close("loss (clamped ratios)", o.loss, out.loss, atol=1e-10, rtol=1e-10)
    assert_close("ratio_max", o.metrics["ratio_max"], out.metrics["ratio_max"], rtol=1e-10)
    assert_grad_close("grad hidden", h2.grad, hh.grad, cos_min=1 - 1e-12, rel_max=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_equals_packed_with_cu_seqlens(backend):
    """[B, T] inputs and the same tokens packed with cu_seqlens of equal lengths agree."""
    h, W, b, y, adv, old, ref, mask = _small_batch()
    B, T = y.shape
    for opts in (dict(aggregation="seq-mean-token-mean", importance_level="sequence"),
                 dict(aggregation="seq-mean-token-sum", tis_cap=1.5, tis_level="sequence"),
                 dict(aggregation="seq-mean-token-sum-norm", max_length=T, repo="fixed", repo_coef=0.3)):
        if "tis_cap" in opts:
            opts["rollout_logprobs"] = old + 0.1
        dense = fused_pg.repo_loss(h, W, y, adv[:, 0], old, mask, bias=b, backend=backend, **opts)
        flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731
        if "rollout_logprobs" in opts:
            opts["rollout_logprobs"] = flat(opts["rollout_logprobs"])
        packed = fused_pg.repo_loss(flat(h), W, flat(y), adv[:, 0], flat(old), flat(mask), bias=b,
                                    cu_seqlens=torch.arange(B + 1) * T, backend=backend, **opts)
        assert_close(f"loss {opts['aggregation']}", dense.loss, packed.loss, atol=1e-6, rtol=1e-6)
        for k in dense.metrics:
            assert_close(f"metric {k}", dense.metrics[k], packed.metrics[k], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sequence_advantages_equal_broadcast(backend):
    h, W, b, y, adv, old, ref, mask = _small_batch()
    per_seq = adv[:, 0]
    a = fused_pg.repo_loss(h, W, y, per_seq, old, mask, backend=backend)
    c = fused_pg.repo_loss(h, W, y, per_seq[:, None].expand_as(old), old, mask, backend=backend)
    assert torch.equal(a.loss, c.loss)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_num_items_in_batch_makes_micro_batches_add_up(backend, aggregation):
    """Gradient accumulation: micro-batch losses with the global normaliser sum to the
    full-batch loss (REPO statistics are per micro-batch by design, so repo="none")."""
    h, W, b, y, adv, old, ref, mask = _small_batch(B=4)
    mask[2] = False  # an empty sequence does not count for the seq-mean modes
    kw = dict(bias=b, repo="none", aggregation=aggregation, entropy_coef=0.01, backend=backend,
              ref_logprobs=ref, kl_coef=0.1, dual_clip=3.0)
    W1 = W.clone().requires_grad_()
    full = fused_pg.repo_loss(h, W1, y, adv, old, mask, **kw)
    full.loss.backward()
    n_items = full.metrics["n_tokens"] if aggregation == "token-mean" else full.metrics["n_seqs"]
    W2 = W.clone().requires_grad_()
    total = 0.0
    for sl in (slice(0, 1), slice(1, 4)):
        part = fused_pg.repo_loss(h[sl], W2, y[sl], adv[sl], old[sl], mask[sl],
                                  **{**kw, "ref_logprobs": ref[sl]}, num_items_in_batch=n_items)
        part.loss.backward()
        total = total + part.loss.detach()
    assert_close("accumulated loss", full.loss, total, atol=1e-6, rtol=1e-6)
    assert_grad_close("accumulated grad weight", W1.grad, W2.grad, cos_min=0.9999999, rel_max=1e-5)
    # a float normaliser and a 0-dim tensor one are the same thing
    f = fused_pg.repo_loss(h, W, y, adv, old, mask, **kw, num_items_in_batch=float(n_items) + 3)
    t = fused_pg.repo_loss(h, W, y, adv, old, mask, **kw, num_items_in_batch=n_items + 3)
    assert_close("num_items float vs tensor", f.loss, t.loss, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("backend", FP64_BACKENDS)
def test_decorrelate_removes_the_batch_covariance(backend):
    h, W, b, y, adv, old, ref, mask = _small_batch(torch.float64)
    out = fused_pg.repo_loss(h, W, y, adv + 0.8 * (old - old.mean()), old, mask, bias=b, repo="decorrelate",
                             repo_coef=1.0, backend=backend)
    assert abs(float(out.metrics["adv_logp_cov_before"])) > 1e-3
    assert abs(float(out.metrics["adv_logp_cov_after"])) < 1e-12
    half = fused_pg.repo_loss(h, W, y, adv, old, mask, bias=b, repo="decorrelate", repo_coef=0.5, backend=backend)
    assert_close("cov after gamma=0.5", 0.5 * half.metrics["adv_logp_cov_before"],
                 half.metrics["adv_logp_cov_after"], atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("backend", FP64_BACKENDS)
def test_decorrelate_without_logprob_spread_applies_no_correction(backend):
    """All tokens with the same log-prob: Var = 0 < 1e-8, zeta = 0, finite everything."""
    D, V = 5, 9
    h = torch.randn(1, 6, D).expand(2, 6, D).contiguous()
    h[:] = h[0, 0]
    W = torch.randn(V, D).requires_grad_()
    y = torch.full((2, 6), 3)
    adv, old = torch.randn(2, 6), torch.full((2, 6), -2.0)
    for dtype in (torch.float32, torch.float64):
        out = fused_pg.repo_loss(h.to(dtype), W.to(dtype), y, adv, old, backend=backend, repo="decorrelate")
        assert float(out.metrics["repo_zeta"]) == 0.0 and torch.isfinite(out.loss)
        none = fused_pg.repo_loss(h.to(dtype), W.to(dtype), y, adv, old, backend=backend, repo="none")
        assert_close("loss decorrelate == none when Var(logp) = 0", none.loss, out.loss, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_validate_false_gives_the_same_result(backend):
    h, W, b, y, adv, old, ref, mask = _small_batch()
    a = fused_pg.repo_loss(h, W, y, adv, old, mask, bias=b, backend=backend, validate=True)
    c = fused_pg.repo_loss(h, W, y, adv, old, mask, bias=b, backend=backend, validate=False)
    assert torch.equal(a.loss, c.loss) and torch.equal(a.logprobs, c.logprobs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_mode_is_bitwise_reproducible(backend):
    h, W, b, y, adv, old, ref, mask = _small_batch(B=2, T=33, V=301)
    results = []
    for _ in range(2):
        hh, ww, bb = (x.clone().requires_grad_() for x in (h, W, b))
        out = fused_pg.repo_loss(hh, ww, y, adv, old, mask, bias=bb, entropy_coef=0.01, backend=backend,
                                 deterministic=True, token_chunk=16, vocab_chunk=64)
        out.loss.backward()
        results.append((out.loss, out.logprobs, out.entropy, hh.grad, ww.grad, bb.grad))
    for a, c in zip(*results):
        assert torch.equal(a, c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_are_not_modified(backend):
    h, W, b, y, adv, old, ref, mask = _small_batch()
    args = [h, W, y, adv, old, mask, b, ref]
    before = [x.clone() for x in args]
    hh, ww = h.requires_grad_(), W.requires_grad_()
    out = fused_pg.repo_loss(hh, ww, y, adv, old, mask, bias=b, ref_logprobs=ref, kl_coef=0.1, backend=backend)
    out.loss.backward()
    for x, x0 in zip(args, before):
        assert torch.equal(x.detach(), x0)


def test_reference_oracle_loss_of_a_hand_computed_case():
    """The oracle itself on a 2-token, 2-word case computed by hand (no fused_pg involved)."""
    h = torch.tensor([[[1.0], [0.0]]], dtype=torch.float64)  # B=1, T=2, D=1
    W = torch.tensor([[1.0], [0.0]], dtype=torch.float64)      # z = (h, 0)
    y = torch.tensor([[0, 1]])
    lp = torch.tensor([1 - math.log(math.e + 1), -math.log(2)], dtype=torch.float64)
    old = lp - torch.tensor([0.5, -0.5], dtype=torch.float64)  # ratios e^0.5 (1.65), e^-0.5 (0.61)
    adv = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    out = repo_loss_ref(h, W, y, adv, old[None], repo="none", eps_low=0.2, eps_high=0.28)
    # token 1: A>0, r=1.65 -> clipped at 1.28: -1.28; token 2: A<0, r=0.61 -> max(0.61, 0.8) = 0.8
    assert_close("hand loss", torch.tensor((-1.28 + 0.8) / 2, dtype=torch.float64), out.loss, atol=1e-12)
    assert_close("hand logprobs", lp[None], out.logprobs, atol=1e-12)
    H = torch.tensor([math.log(math.e + 1) - math.e / (math.e + 1), math.log(2)], dtype=torch.float64)
    assert_close("hand entropy", H[None], out.entropy, atol=1e-12)
    assert float(out.metrics["clip_frac_high"]) == 0.5 and float(out.metrics["clip_frac_low"]) == 0.5
