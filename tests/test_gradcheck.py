"""``torch.autograd.gradcheck`` in fp64: the oracle (fused_pg.reference) and the fused backends.

gradcheck compares autograd with finite differences, so only losses whose gradient IS the
derivative of their value are checked: REPO "none" (the other modes use a detached log-prob
statistic by design), token-level ratios (GSPO's sequence ratio has a straight-through
gradient), no "k3+" (k3 value, k2 gradient). Those surrogate gradients are checked against
the oracle's autograd in test_loss.py instead. Log-ratios are placed away from every clip
boundary so that the finite differences never straddle a kink.
"""

import math

import pytest
import torch
from torch.autograd import gradcheck

import fused_pg
from fused_pg.reference.head import logprobs_entropy_ref
from fused_pg.reference.loss import repo_loss_ref
from helpers import FP64_BACKENDS

B, T, D, V = 2, 3, 3, 7  # N = 6 tokens, odd D and V


def _leaves(seed=0, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g, dtype=torch.float64).requires_grad_()
    W = (scale * torch.randn(V, D, generator=g, dtype=torch.float64)).requires_grad_()
    b = (0.3 * torch.randn(V, generator=g, dtype=torch.float64)).requires_grad_()
    y = torch.randint(0, V, (B, T), generator=g)
    y[1, 2] = -100  # an ignored token
    return h, W, b, y, g


HEAD_OPTS = [
    dict(),
    dict(temperature=0.7),
    dict(softcap=2.0),
    dict(temperature=1.3, softcap=4.0),
]


@pytest.mark.parametrize("opts", HEAD_OPTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_gradcheck_reference_head(opts):
    h, W, b, y, _ = _leaves()
    assert gradcheck(lambda h, W, b: logprobs_entropy_ref(h, W, y, b, **opts), (h, W, b))


@pytest.mark.parametrize("backend", FP64_BACKENDS)
@pytest.mark.parametrize("opts", HEAD_OPTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_gradcheck_fused_head(backend, opts):
    h, W, b, y, _ = _leaves()
    f = lambda h, W, b: fused_pg.fused_logprobs_entropy(  # noqa: E731
        h, W, y, bias=b, backend=backend, token_chunk=4, vocab_chunk=3, **opts)
    assert gradcheck(f, (h, W, b))


def test_gradcheck_reference_head_with_excluded_words():
    """-inf bias entries: finite gradients everywhere (the -inf entries themselves are constants)."""
    h, W, b, y, _ = _leaves()
    b_fixed = b.detach().clone()
    b_fixed[[1, 4]] = -math.inf
    y = torch.where((y == 1) | (y == 4), 0, y)
    assert gradcheck(lambda h, W: logprobs_entropy_ref(h, W, y, b_fixed), (h, W))
    for backend in FP64_BACKENDS:
        assert gradcheck(lambda h, W: fused_pg.fused_logprobs_entropy(  # noqa: E731
            h, W, y, bias=b_fixed, backend=backend, vocab_chunk=2), (h, W))


# per-token log-ratios log(r) = logp - old, away from log(1 - eps_low), log(1 + eps_high),
# log(dual_clip), log(delta) for the options below: both clipped and unclipped tokens
LOG_RATIOS = torch.tensor([[0.5, -0.05, -0.6], [0.1, -0.35, 0.9]], dtype=torch.float64)

LOSS_OPTS = [
    dict(),
    dict(eps_low=0.1, eps_high=0.4, entropy_coef=0.05),
    dict(dual_clip=1.5, aggregation="seq-mean-token-mean"),
    dict(delta=1.3, aggregation="seq-mean-token-sum", temperature=0.8),
    dict(kl_coef=0.3, kl_estimator="k1", softcap=3.0, aggregation="seq-mean-token-sum-norm"),
    dict(kl_coef=0.3, kl_estimator="k2", num_items_in_batch=11.0),
    dict(kl_coef=0.3, kl_estimator="k3", entropy_coef=-0.02, tis_cap=1.2),
]


def _loss_inputs(h, W, b, y, g, opts):
    with torch.no_grad():
        lp, _ = logprobs_entropy_ref(h, W, y, b, temperature=opts.get("temperature", 1.0),
                                     softcap=opts.get("softcap"))
    old = lp - LOG_RATIOS
    adv = torch.tensor([[1.0, -0.7, 0.4], [-1.2, 0.3, 0.8]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    extra = {}
    if opts.get("kl_coef"):
        extra["ref_logprobs"] = lp + 0.2 * torch.randn(lp.shape, generator=g, dtype=torch.float64)
    if "tis_cap" in opts:
        extra["rollout_logprobs"] = old + torch.tensor([[0.3, -0.3, 0.0], [0.6, -0.1, 0.1]], dtype=torch.float64)
    return adv, old, mask, extra


def _ids(o):
    return ",".join(f"{k}={v}" for k, v in o.items()) or "defaults"


@pytest.mark.parametrize("opts", LOSS_OPTS, ids=_ids)
def test_gradcheck_reference_loss(opts):
    h, W, b, y, g = _leaves()
    adv, old, mask, extra = _loss_inputs(h, W, b, y, g, opts)
    f = lambda h, W, b: repo_loss_ref(h, W, y, adv, old, mask, bias=b, repo="none", **extra, **opts).loss  # noqa: E731
    assert gradcheck(f, (h, W, b))


@pytest.mark.parametrize("backend", FP64_BACKENDS)
@pytest.mark.parametrize("opts", LOSS_OPTS, ids=_ids)
def test_gradcheck_fused_loss(backend, opts):
    h, W, b, y, g = _leaves()
    adv, old, mask, extra = _loss_inputs(h, W, b, y, g, opts)
    f = lambda h, W, b: fused_pg.repo_loss(  # noqa: E731
        h, W, y, adv, old, mask, bias=b, repo="none", backend=backend, token_chunk=4, vocab_chunk=3,
        **extra, **opts).loss
    assert gradcheck(f, (h, W, b))


@pytest.mark.parametrize("backend", FP64_BACKENDS)
def test_gradcheck_fused_loss_packed(backend):
    h, W, b, y, g = _leaves()
    adv, old, mask, extra = _loss_inputs(h, W, b, y, g, {})
    flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731
    cu = torch.tensor([0, 2, 2, 6])  # an empty sequence in the middle
    f = lambda h, W, b: fused_pg.repo_loss(  # noqa: E731
        flat(h), W, flat(y), torch.tensor([0.5, 0.1, -0.8], dtype=torch.float64), flat(old), flat(mask), bias=b,
        cu_seqlens=cu, repo="none", aggregation="seq-mean-token-mean", backend=backend, vocab_chunk=4).loss
    assert gradcheck(f, (h, W, b))
