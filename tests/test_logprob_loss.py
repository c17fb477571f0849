"""``policy_loss_from_logprobs`` (the loss for callers that already have log-probs) against
its fp64 oracle ``policy_loss_ref``; ``repo_loss`` is exactly the head plus this epilogue;
``old_logprobs=None`` is on-policy; behaviour log-probs are constants even when attached.
"""

import inspect
import math

import pytest
import torch

import fused_pg
from fused_pg.config import PRESET_OPTIONS, PRESETS
from fused_pg.reference.head import logprobs_entropy_ref
from fused_pg.reference.loss import policy_loss_ref, repo_loss_ref
from helpers import (BACKENDS, HEAD_OPTIONS, TOLS, assert_close, assert_grad_close, check_metrics, check_per_token,
                     loss_cases, make_loss_inputs, oracle_guards, run_property, same_number)


def check_logprob_case(case) -> None:
    """fp32 (or fp64) log-probs and entropies in, loss, metrics and d/dlogp, d/dH against fp64."""
    inp = make_loss_inputs(case)
    o = case.opts
    N = case.head.N
    lead = tuple(inp.head.targets.shape)
    h64, w64, b64 = inp.head.fp64_leaves()
    y = torch.where(inp.valid, inp.head.targets.reshape(-1), o["ignore_index"])
    with torch.no_grad():
        lp64, ent64 = logprobs_entropy_ref(h64.reshape(N, -1), w64, y, b64, temperature=o["temperature"],
                                           softcap=o["softcap"], ignore_index=o["ignore_index"])
    pdt = torch.float64 if case.dtype == "fp64" else torch.float32
    # the log-probs under test are the oracle's, rounded to the working precision: both sides
    # then see identical inputs
    lp = lp64.to(pdt).view(lead).requires_grad_()
    ent = ent64.to(pdt).view(lead).requires_grad_()
    loss_opts = {k: v for k, v in o.items() if k not in HEAD_OPTIONS}
    mask = inp.valid.view(lead)
    lp_ref = lp.detach().double().requires_grad_()
    ent_ref = ent.detach().double().requires_grad_()
    ref = policy_loss_ref(lp_ref, inp.advantages, inp.old_logprobs, mask, entropy=ent_ref,
                          dtype=torch.float64, **inp.tensors(), **loss_opts)
    oracle_guards(case, inp, ref)
    out = fused_pg.policy_loss_from_logprobs(lp, inp.advantages, inp.old_logprobs, mask, entropy=ent,
                                             **inp.tensors(), **loss_opts)
    tol = TOLS[case.dtype]
    assert_close("loss", ref.loss, out.loss, atol=tol.value, rtol=tol.value, key=case.dtype)
    check_metrics(ref.metrics, out.metrics, case.dtype)
    check_per_token(ref, out, case.dtype)
    assert set(out.metrics) == set(fused_pg.METRIC_KEYS)
    if ref.loss.requires_grad:
        g_ref, e_ref = torch.autograd.grad(ref.loss, [lp_ref, ent_ref], allow_unused=True)
    else:
        g_ref = e_ref = None
    g, e = torch.autograd.grad(out.loss, [lp, ent], allow_unused=True)
    zeros = torch.zeros(lead, dtype=torch.float64)
    g_ref = zeros if g_ref is None else g_ref
    e_ref = zeros if e_ref is None else e_ref
    g = zeros.to(pdt) if g is None else g
    e = zeros.to(pdt) if e is None else e
    # the epilogue computes in the log-probs' precision: per-token gradients to fp32 accuracy
    atol = 1e-12 if case.dtype == "fp64" else 2e-5
    assert_close("dL/dlogp", g_ref, g, atol=atol * float(g_ref.abs().max() + 1), rtol=tol.value, key=case.dtype)
    assert_close("dL/dH", e_ref, e, atol=atol * float(e_ref.abs().max() + 1), rtol=tol.value, key=case.dtype)


def test_policy_loss_from_logprobs_matches_reference():
    run_property(loss_cases("reference", dtypes=("fp32", "fp64")), check_logprob_case, examples=60)


@pytest.mark.parametrize("backend", BACKENDS)
def test_repo_loss_is_the_head_plus_the_logprob_loss(backend):
    """Same inputs: repo_loss and fused_logprobs_entropy + policy_loss_from_logprobs agree
    bitwise in loss, metrics and gradients (one epilogue, written once)."""
    g = torch.Generator().manual_seed(3)
    B, T, D, V = 3, 9, 10, 41
    h = torch.randn(B, T, D, generator=g)
    W = torch.randn(V, D, generator=g) / 2
    y = torch.randint(0, V, (B, T), generator=g)
    adv, old = torch.randn(B, generator=g), -3 * torch.rand(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2
    kw = dict(entropy_coef=0.02, aggregation="seq-mean-token-mean", dual_clip=3.0, importance_level="sequence")
    h1, W1 = h.clone().requires_grad_(), W.clone().requires_grad_()
    a = fused_pg.repo_loss(h1, W1, y, adv, old, mask, backend=backend, **kw)
    a.loss.backward()
    h2, W2 = h.clone().requires_grad_(), W.clone().requires_grad_()
    lp, ent = fused_pg.fused_logprobs_entropy(h2, W2, torch.where(mask, y, -100), backend=backend)
    b = fused_pg.policy_loss_from_logprobs(lp, adv, old, mask, entropy=ent, **kw)
    b.loss.backward()
    assert torch.equal(a.loss, b.loss)
    for k in a.metrics:
        assert same_number(a.metrics[k], b.metrics[k]), k
    assert torch.equal(h1.grad, h2.grad) and torch.equal(W1.grad, W2.grad)


def _batch(seed=0, B=3, T=8, D=12, V=29):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g)
    W = torch.randn(V, D, generator=g) / 2
    y = torch.randint(0, V, (B, T), generator=g)
    adv = torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2
    return h, W, y, adv, mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("repo", ["none", "fixed", "decorrelate"])
def test_old_logprobs_none_is_on_policy(backend, repo):
    """old_logprobs=None equals passing the detached current log-probs: ratio 1, its
    gradient that of logp, approx_kl 0 -- and no second sweep is needed."""
    h, W, y, adv, mask = _batch()
    kw = dict(repo=repo, repo_coef=0.5 if repo != "decorrelate" else 1.0, entropy_coef=0.01, backend=backend)
    W1 = W.clone().requires_grad_()
    on = fused_pg.repo_loss(h, W1, y, adv, None, mask, **kw)
    on.loss.backward()
    W2 = W.clone().requires_grad_()
    with torch.no_grad():
        cur, _ = fused_pg.fused_logprobs_entropy(h, W, y, backend=backend)
    off = fused_pg.repo_loss(h, W2, y, adv, cur, mask, **kw)
    off.loss.backward()
    assert_close("on-policy loss", off.loss, on.loss, atol=1e-6, rtol=1e-6)
    assert_grad_close("on-policy grad weight", W2.grad.double(), W1.grad, cos_min=1 - 1e-9, rel_max=1e-5)
    assert float(on.metrics["ratio_mean"]) == 1.0 and float(on.metrics["approx_kl"]) == 0.0
    # and the oracle's reading of None is the same
    W3 = W.double().requires_grad_()
    ref = repo_loss_ref(h.double(), W3, y, adv, None, mask, **{k: v for k, v in kw.items() if k != "backend"})
    ref.loss.backward()
    assert_close("on-policy loss vs oracle", ref.loss, on.loss, atol=1e-5, rtol=1e-5)
    assert_grad_close("on-policy grad vs oracle", W3.grad, W1.grad, cos_min=0.9999, rel_max=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attached_behaviour_logprobs_are_treated_as_constants(backend):
    """old/ref/rollout log-probs computed in the same graph (no no_grad, no detach) would make
    exp(logp - logp) = 1 with zero gradient and silently stop training; they are detached
    inside, so attached and detached inputs give identical gradients."""
    h, W, y, adv, mask = _batch(1)
    results = []
    for detach in (True, False):
        Wl = W.clone().requires_grad_()
        lp, _ = fused_pg.fused_logprobs_entropy(h, Wl, y, backend=backend)
        old = lp.detach() - 0.1 if detach else lp - 0.1
        ref = lp.detach() - 0.3 if detach else lp - 0.3
        out = fused_pg.repo_loss(h, Wl, y, adv, old, mask, ref_logprobs=ref, kl_coef=0.1, backend=backend,
                                 rollout_logprobs=ref, tis_cap=2.0)
        out.loss.backward()
        results.append((out.loss.detach(), Wl.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    assert results[1][1].abs().max() > 0


def test_logprob_loss_needs_entropy_for_an_entropy_bonus():
    lp = -torch.rand(2, 5, requires_grad=True)
    with pytest.raises(ValueError, match="entropy_coef"):
        fused_pg.policy_loss_from_logprobs(lp, torch.randn(2), None, entropy_coef=0.1)
    out = fused_pg.policy_loss_from_logprobs(lp, torch.randn(2), None)
    # always present; not measured: NaN with the flag at 0, never a number a controller could use
    assert math.isnan(float(out.metrics["entropy_mean"])) and out.metrics["entropy_measured"] == 0.0
    assert torch.isnan(out.entropy).all()


@pytest.mark.parametrize("name", ["logprobs", "old_logprobs", "ref_logprobs", "rollout_logprobs"])
def test_probabilities_passed_as_logprobs_are_refused(name):
    """Values > 0 cannot be log-probabilities (a small slack absorbs foreign rounding)."""
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(2, 6, generator=g) - 0.5
    args = dict(logprobs=lp.clone().requires_grad_(), old_logprobs=lp - 0.1, ref_logprobs=lp - 0.2,
                rollout_logprobs=lp - 0.05)
    probs = args[name].detach().exp()
    bad = dict(args, **{name: probs})
    with pytest.raises(ValueError, match=name):
        fused_pg.policy_loss_from_logprobs(bad.pop("logprobs"), torch.randn(2), bad.pop("old_logprobs"),
                                           kl_coef=0.1, tis_cap=2.0, **bad)
    ok = dict(args, **{name: (args[name].detach() * 0 + 5e-3)})  # within the slack
    fused_pg.policy_loss_from_logprobs(ok.pop("logprobs"), torch.randn(2), ok.pop("old_logprobs"),
                                       kl_coef=0.1, tis_cap=2.0, **ok)


def test_missing_gradient_is_explained_by_name():
    """Nothing requires grad: backward names the inputs instead of PyTorch's generic error;
    under no_grad the loss is just a value."""
    h, W, y, adv, mask = _batch()
    out = fused_pg.repo_loss(h, W, y, adv, None, mask)
    with pytest.raises(RuntimeError, match="none of hidden, weight requires grad"):
        out.loss.backward()
    lp = -torch.rand(3, 8)
    out = fused_pg.policy_loss_from_logprobs(lp, torch.randn(3), None)
    with pytest.raises(RuntimeError, match="logprobs"):
        out.loss.backward()
    with torch.no_grad():
        v = fused_pg.repo_loss(h, W, y, adv, None, mask).loss
    assert not v.requires_grad and torch.isfinite(v)


def test_metric_keys_are_stable():
    """Every option off or on, the same metric keys (0 where an option is off)."""
    h, W, y, adv, mask = _batch()
    old = -torch.rand(y.shape) - 0.5
    plain = fused_pg.repo_loss(h, W, y, adv, old, mask)
    full = fused_pg.repo_loss(h, W, y, adv, old, mask, dual_clip=3.0, ref_logprobs=old - 0.1, kl_coef=0.1,
                              rollout_logprobs=old - 0.2, tis_cap=2.0)
    assert set(plain.metrics) == set(full.metrics) == set(fused_pg.METRIC_KEYS)
    for k in ("clip_frac_dual", "kl_mean", "tis_weight_mean"):
        assert float(plain.metrics[k]) == 0.0
    assert float(full.metrics["tis_weight_mean"]) > 0
    packed = fused_pg.repo_loss(h.reshape(-1, h.shape[-1]), W, y.reshape(-1), adv.reshape(-1), old.reshape(-1),
                                mask.reshape(-1))
    assert set(packed.metrics) == set(fused_pg.METRIC_KEYS) and float(packed.metrics["n_seqs"]) == 0.0


def test_signatures_of_the_api_and_the_oracle_stay_in_step():
    """policy_loss_from_logprobs and its oracle take the same per-call arguments, and the oracle
    knows every loss option with the same default; repo_loss takes those (minus the log-prob
    inputs) plus the head's; presets only set preset-able options."""
    from dataclasses import fields

    from fused_pg.config import HeadConfig, LossConfig
    from fused_pg.reference.loss import OPTION_DEFAULTS

    api = inspect.signature(fused_pg.policy_loss_from_logprobs).parameters
    ref = inspect.signature(policy_loss_ref).parameters
    values = {"config", "parallel", "validate", "overrides"}  # option values and scale-out: the API's
    normalisers = {"kl_num_items_in_batch", "entropy_num_items_in_batch"}  # keywords in the API
    assert set(api) - values == set(ref) - {"dtype", "options"} - normalisers
    assert {f.name: f.default for f in fields(LossConfig)} == OPTION_DEFAULTS
    assert set(PRESET_OPTIONS) <= set(OPTION_DEFAULTS)
    for name, table in PRESETS.items():
        assert set(table) <= set(PRESET_OPTIONS), f"preset {name} sets an option that is not preset-able"
    head_only = {"hidden", "weight", "targets", "bias", "head"}
    repo = set(inspect.signature(fused_pg.repo_loss).parameters)
    assert repo == (set(api) - {"logprobs", "entropy"}) | head_only
    ref_head = set(inspect.signature(repo_loss_ref).parameters)
    assert {"hidden", "weight", "targets", "bias", "temperature", "softcap", "ignore_index", "advantages",
            "old_logprobs", "mask", "dtype", "loss_options"} == ref_head
    assert {"temperature", "softcap", "ignore_index"} <= {f.name for f in fields(HeadConfig)}


def test_reference_on_policy_gradient_by_hand():
    """The oracle's on-policy loss on two tokens by hand: ratio 1, d loss / d logp = -A' / n."""
    lp = torch.tensor([[-0.5, -2.0]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    out = policy_loss_ref(lp, adv, None, repo="none")
    (g,) = torch.autograd.grad(out.loss, [lp])
    assert_close("on-policy loss by hand", torch.tensor(0.0, dtype=torch.float64), out.loss, atol=1e-15)
    assert_close("on-policy grad by hand", torch.tensor([[-0.5, 0.5]], dtype=torch.float64), g, atol=1e-15)
    assert math.isclose(float(out.metrics["ratio_mean"]), 1.0)
