"""The entropy gradient term is skipped when the entropy carries no gradient, on every backend.

dL/dz_v = g (1[v = y] - p_v) - e p_v (log p_v + H): when the entropy is only logged (the
losses with ``entropy_coef = 0``) nothing reaches it, its upstream gradient arrives as None
(the head's ``Function`` does not materialise it as zeros), and the sweeps do not form the
second term for any logit (a constexpr flag in the Triton kernel). Checked: the gradients are
bitwise those of a zero entropy gradient and match the fp64 oracle; the term is really not
evaluated (a NaN entropy cannot reach the gradients, the Triton kernel is launched without
the entropy pointer, the materialised backend differentiates the log-probs alone); the loss
entry points pass None exactly when ``entropy_coef == 0``.
"""

import math

import pytest
import torch

import fused_pg
import fused_pg.kernels.backward as backward_mod
from fused_pg.backends import REGISTRY
from fused_pg.config import HeadConfig
from fused_pg.reference.head import logprobs_entropy_ref
from helpers import BACKENDS, assert_close, assert_grad_close

N, D, V = 13, 7, 45  # odd: exercises the masks


def _inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g).to(dtype)
    W = (2 * torch.randn(V, D, generator=g) / math.sqrt(D)).to(dtype)
    b = (0.5 * torch.randn(V, generator=g)).to(dtype)
    y = torch.randint(0, V, (N,), generator=g)
    y[::5] = -100
    u = torch.randn(N, generator=g)
    return h, W, b, y, u


def _grads(backend, h, W, b, y, u, entropy_weight):
    """Gradients of (logp * u).sum() [+ entropy_weight * entropy.sum()] (None: entropy unused)."""
    leaves = [x.clone().requires_grad_() for x in (h, W, b)]
    lp, ent = fused_pg.fused_logprobs_entropy(leaves[0], leaves[1], y, bias=leaves[2], backend=backend,
                                              softcap=20.0, vocab_chunk=16, token_chunk=8)
    loss = (lp * u).sum()
    if entropy_weight is not None:
        loss = loss + entropy_weight * ent.sum()
    loss.backward()
    return [x.grad for x in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_unchanged_when_the_entropy_is_only_logged(backend, dtype):
    h, W, b, y, u = _inputs(dtype)
    skipped = _grads(backend, h, W, b, y, u, None)     # entropy only logged: no gradient reaches it
    zero = _grads(backend, h, W, b, y, u, 0.0)         # a zero upstream gradient: the term x 0
    for a, c in zip(skipped, zero):
        assert torch.equal(a, c)
    # and the fp64 oracle of the log-probs alone
    ref = [x.double().requires_grad_() for x in (h, W, b)]
    lp, _ = logprobs_entropy_ref(ref[0], ref[1], y, ref[2], softcap=20.0)
    (lp * u.double()).sum().backward()
    rel = 1e-4 if dtype == torch.float32 else 2e-2
    for name, r, got in zip(("hidden", "weight", "bias"), ref, skipped):
        assert_grad_close(f"d{name}", r.grad, got, cos_min=0.9999, rel_max=rel)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sweeps_do_not_evaluate_the_term(backend):
    """The term reads H (the saved entropy): with grad_entropy None a NaN entropy cannot reach
    the gradients, while with a zero grad_entropy it does (0 * NaN)."""
    h, W, b, y, u = _inputs()
    targets = torch.where(y >= 0, y, -1)
    cfg = HeadConfig(softcap=20.0, vocab_chunk=16, token_chunk=8)
    sweeps = REGISTRY[backend].load()
    _, entropy, lse = sweeps.forward_sweep(h, W, b, targets, cfg)
    g = torch.where(targets >= 0, u, 0.0)
    needs = (True, True, True)
    reference = sweeps.backward_sweep(h, W, b, targets, lse, entropy, g, None, cfg, needs)
    nan_entropy = torch.full_like(entropy, math.nan)
    skipped = sweeps.backward_sweep(h, W, b, targets, lse, nan_entropy, g, None, cfg, needs)
    formed = sweeps.backward_sweep(h, W, b, targets, lse, nan_entropy, g, torch.zeros_like(g), cfg, needs)
    for a, c, f in zip(reference, skipped, formed):
        assert torch.equal(a, c)
        assert torch.isnan(f).any()


def test_triton_kernel_is_specialised_without_the_entropy_term(monkeypatch):
    launched = []
    real = backward_mod.launch

    def spy(kernel, grid, args, **kw):
        if kernel is backward_mod.DLOGITS:
            launched.append(args["grad_entropy_ptr"] is None)
        return real(kernel, grid, args, **kw)

    monkeypatch.setattr(backward_mod, "launch", spy)
    h, W, b, y, u = _inputs()
    _grads("triton", h, W, b, y, u, None)
    assert launched and all(launched)  # HAS_ENTROPY_GRAD = False in every launch
    launched.clear()
    _grads("triton", h, W, b, y, u, 1.0)
    assert launched and not any(launched)


def test_materialised_backend_differentiates_the_logprobs_alone(monkeypatch):
    outputs = []
    real = torch.autograd.grad

    def spy(outs, inputs, grad_outputs=None, **kw):
        outputs.append(len(outs))
        return real(outs, inputs, grad_outputs, **kw)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    h, W, b, y, u = _inputs()
    _grads("reference", h, W, b, y, u, None)
    assert outputs == [1]
    outputs.clear()
    _grads("reference", h, W, b, y, u, 1.0)
    assert outputs == [2]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entropy_coef", [0.0, 0.01])
def test_losses_skip_the_term_exactly_when_entropy_coef_is_0(backend, entropy_coef, monkeypatch):
    seen = []
    for name in ("torch", "triton"):
        sweeps = REGISTRY[name].load()
        real = sweeps.backward_sweep

        def spy(*args, _real=real, **kw):
            seen.append(args[7] is None)  # grad_entropy
            return _real(*args, **kw)

        monkeypatch.setattr(sweeps, "backward_sweep", spy)
    g = torch.Generator().manual_seed(0)
    B, T = 2, 6
    h = torch.randn(B, T, D, generator=g, requires_grad=True)
    W = torch.randn(V, D, generator=g, requires_grad=True)
    y = torch.randint(0, V, (B, T), generator=g)
    out = fused_pg.repo_loss(h, W, y, torch.randn(B, generator=g), -torch.rand(B, T, generator=g) - 0.5,
                             backend=backend, entropy_coef=entropy_coef)
    out.loss.backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(W.grad).all()
    if backend != "reference":
        assert seen == [entropy_coef == 0.0]
    # the entropy is still reported
    assert_close("entropy_mean", out.entropy[out.entropy != 0].mean(), out.metrics["entropy_mean"], rtol=1e-5)
