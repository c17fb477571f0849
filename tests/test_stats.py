"""REPO statistics shared across micro-batches: ``repo_statistics`` / ``RepoStats`` merge
exactly, and gradient accumulation with the whole batch's statistics reproduces one big batch
for every REPO variant (with per-micro-batch statistics it does not)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fused_pg
from fused_pg import RepoStats, repo_statistics
from fused_pg.reference.loss import repo_loss_ref
from helpers import BACKENDS, assert_close, assert_grad_close, count_example


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 40), cuts=st.lists(st.integers(0, 40), max_size=4), seed=st.integers(0, 2**31 - 1))
def test_merged_statistics_equal_the_whole_batch(n, cuts, seed):
    count_example()
    g = torch.Generator().manual_seed(seed)
    lp = -5 * torch.rand(n, generator=g, dtype=torch.float64) - 10
    adv = torch.randn(n, generator=g, dtype=torch.float64) + 0.3 * lp
    mask = torch.rand(n, generator=g) > 0.3
    bounds = sorted({0, n, *[min(c, n) for c in cuts]})
    parts = [repo_statistics(lp[a:b], adv[a:b], mask[a:b]) for a, b in zip(bounds[:-1], bounds[1:])] or \
        [repo_statistics(lp, adv, mask)]
    merged = RepoStats.merge_all(parts)
    whole = repo_statistics(lp, adv, mask)
    v = lp[mask]
    a = adv[mask]
    assert float(merged.count) == float(whole.count) == int(mask.sum())
    for name in ("mean_logprob", "mean_advantage", "var_logprob", "cov_adv_logprob"):
        assert_close(f"merged {name}", getattr(whole, name), getattr(merged, name), atol=1e-12, rtol=1e-10)
    if v.numel():  # against the textbook population moments
        assert_close("var", ((v - v.mean()) ** 2).mean(), whole.var_logprob, atol=1e-12, rtol=1e-10)
        assert_close("cov", ((a - a.mean()) * (v - v.mean())).mean(), whole.cov_adv_logprob, atol=1e-12, rtol=1e-10)
    # a round trip through the flat tensor form (what travels between ranks)
    back = RepoStats.from_tensor(merged.as_tensor())
    assert torch.equal(back.as_tensor(), merged.as_tensor())


def test_per_sequence_advantages_and_packed_inputs():
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(3, 4, generator=g, dtype=torch.float64)
    adv = torch.randn(3, generator=g, dtype=torch.float64)
    dense = repo_statistics(lp, adv)
    packed = repo_statistics(lp.reshape(-1), adv, cu_seqlens=torch.tensor([0, 4, 8, 12]))
    per_token = repo_statistics(lp, adv[:, None].expand(3, 4))
    for s in (packed, per_token):
        assert torch.allclose(dense.as_tensor(), s.as_tensor(), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="advantages"):
        repo_statistics(lp, torch.randn(5))
    with pytest.raises(TypeError, match="repo_stats"):
        fused_pg.policy_loss_from_logprobs(lp, adv, repo_stats={"mean_logprob": 0.0})


def _batch(B=4, T=9, D=10, V=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g)
    W = torch.randn(V, D, generator=g) * 0.6
    y = torch.randint(0, V, (B, T), generator=g)
    adv = torch.randn(B, generator=g)
    old = -3 * torch.rand(B, T, generator=g) - 0.5
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[2] = False  # an empty sequence
    return h, W, y, adv, old, mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("repo,center", [("fixed", True), ("fixed", False), ("decorrelate", True),
                                         ("decorrelate", False), ("none", True)])
@pytest.mark.parametrize("n_micro", [2, 4])
def test_accumulation_with_global_statistics_equals_one_batch(backend, repo, center, n_micro):
    """Split the batch into micro-batches; first pass: their log-probs (no grad) give the
    merged statistics; second pass: each micro-batch's loss with repo_stats and the global
    token count. The summed gradient equals the one-batch gradient (and the oracle's)."""
    h, W, y, adv, old, mask = _batch()
    B = y.shape[0]
    kw = dict(repo=repo, repo_coef=0.7 if repo == "decorrelate" else 0.4, repo_center=center,
              entropy_coef=0.01, dual_clip=3.0, backend=backend)
    W1 = W.clone().requires_grad_()
    one = fused_pg.repo_loss(h, W1, y, adv, old, mask, **kw)
    one.loss.backward()

    chunks = [slice(i * B // n_micro, (i + 1) * B // n_micro) for i in range(n_micro)]
    with torch.no_grad():
        parts = []
        for sl in chunks:
            lp, _ = fused_pg.fused_logprobs_entropy(h[sl], W, torch.where(mask[sl], y[sl], -100), backend=backend)
            parts.append(repo_statistics(lp, adv[sl], mask[sl]))
    stats = RepoStats.merge_all(parts)
    n_tokens = one.metrics["n_tokens"]
    W2 = W.clone().requires_grad_()
    total = 0.0
    for sl in chunks:
        out = fused_pg.repo_loss(h[sl], W2, y[sl], adv[sl], old[sl], mask[sl], repo_stats=stats,
                                 num_items_in_batch=n_tokens, **kw)
        out.loss.backward()
        total = total + out.loss.detach()
        assert_close("global zeta", one.metrics["repo_zeta"], out.metrics["repo_zeta"], atol=1e-6, rtol=1e-5)
    assert_close("accumulated loss", one.loss, total, atol=1e-6, rtol=1e-5)
    assert_grad_close("accumulated grad weight", W1.grad.double(), W2.grad, cos_min=1 - 1e-9, rel_max=1e-5)

    # the oracle agrees on the one batch, and on a micro-batch given the same statistics
    W3 = W.double().requires_grad_()
    ref_kw = {k: v for k, v in kw.items() if k != "backend"}
    ref = repo_loss_ref(h.double(), W3, y, adv, old, mask, **ref_kw)
    ref.loss.backward()
    assert_grad_close("grad weight vs oracle", W3.grad, W2.grad, cos_min=0.9999, rel_max=1e-4)
    sl = chunks[0]
    part_ref = repo_loss_ref(h[sl].double(), W.double(), y[sl], adv[sl], old[sl], mask[sl], repo_stats=stats,
                             num_items_in_batch=float(n_tokens), **ref_kw)
    part = fused_pg.repo_loss(h[sl], W, y[sl], adv[sl], old[sl], mask[sl], repo_stats=stats,
                              num_items_in_batch=n_tokens, **kw)
    assert_close("micro-batch loss with global stats vs oracle", part_ref.loss, part.loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("repo", ["fixed", "decorrelate"])
def test_per_micro_batch_statistics_do_not_accumulate_to_one_batch(repo):
    """The defect the global statistics fix: without them the centred REPO modes differ."""
    h, W, y, adv, old, mask = _batch()
    kw = dict(repo=repo, repo_coef=0.7 if repo == "decorrelate" else 0.4, backend="torch")
    W1 = W.clone().requires_grad_()
    one = fused_pg.repo_loss(h, W1, y, adv, old, mask, **kw)
    one.loss.backward()
    W2 = W.clone().requires_grad_()
    for sl in (slice(0, 2), slice(2, 4)):
        fused_pg.repo_loss(h[sl], W2, y[sl], adv[sl], old[sl], mask[sl], num_items_in_batch=one.metrics["n_tokens"],
                           **kw).loss.backward()
    rel = float((W1.grad - W2.grad).abs().max() / W1.grad.abs().max())
    assert rel > 1e-3, rel


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 40), cuts=st.lists(st.integers(0, 40), max_size=4), seed=st.integers(0, 2**31 - 1))
def test_moments_of_logp_plus_entropy_merge_exactly(n, cuts, seed):
    """With entropies, the statistics also hold the moments of L = logp + H (the per-state
    centre): merged over micro-batches and through the tensor form, they equal the whole batch's
    and the textbook population moments."""
    count_example()
    g = torch.Generator().manual_seed(seed)
    lp = -5 * torch.rand(n, generator=g, dtype=torch.float64)
    ent = 3 * torch.rand(n, generator=g, dtype=torch.float64)
    adv = torch.randn(n, generator=g, dtype=torch.float64) - 0.4 * lp
    mask = torch.rand(n, generator=g) > 0.3
    bounds = sorted({0, n, *[min(c, n) for c in cuts]})
    parts = [repo_statistics(lp[a:b], adv[a:b], mask[a:b], entropy=ent[a:b]) for a, b in zip(bounds[:-1], bounds[1:])] \
        or [repo_statistics(lp, adv, mask, entropy=ent)]
    merged = RepoStats.from_tensor(RepoStats.merge_all(parts).as_tensor())
    whole = repo_statistics(lp, adv, mask, entropy=ent)
    assert merged.has_state and whole.as_tensor().shape == (8,)
    for name in ("var_state", "cov_adv_state", "mean_state", "var_logprob", "cov_adv_logprob"):
        assert_close(f"merged {name}", getattr(whole, name), getattr(merged, name), atol=1e-12, rtol=1e-10)
    s, a = (lp + ent)[mask], adv[mask]
    if s.numel():
        assert_close("var of logp + H", ((s - s.mean()) ** 2).mean(), whole.var_state, atol=1e-12, rtol=1e-10)
        assert_close("cov of A and logp + H", ((a - a.mean()) * (s - s.mean())).mean(), whole.cov_adv_state,
                     atol=1e-12, rtol=1e-10)


def test_statistics_with_and_without_entropies_do_not_mix():
    lp, adv = -torch.rand(2, 3, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    with_h = repo_statistics(lp, adv, entropy=torch.rand(2, 3, dtype=torch.float64))
    without = repo_statistics(lp, adv)
    assert with_h.has_state and not without.has_state and without.var_state is None
    with pytest.raises(ValueError, match="with entropies and without"):
        with_h.merge(without)
    with pytest.raises(ValueError, match="5 or 8 values"):
        RepoStats.from_tensor(torch.zeros(6, dtype=torch.float64))
    with pytest.raises(ValueError, match="entropy"):
        repo_statistics(lp, adv, entropy=torch.rand(3, 2, dtype=torch.float64))
    # the logp moments are the same either way
    assert torch.equal(with_h.as_tensor()[:5], without.as_tensor())
