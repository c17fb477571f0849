"""fused_pg.integrations.openrlhf.PolicyLoss against the installed OpenRLHF's own ``PolicyLoss``,
in fp64: every policy_loss_type, token_level_loss, dual clip, data-parallel normalisers and every
valid train / rollout correction (level x mode x gating); REPO against the oracle; ADAPO's stepping.

Loading OpenRLHF's loss module: ``openrlhf/models/__init__.py`` imports the actor, which needs
flash-attn (CUDA only), so the real ``models/loss.py`` and ``models/utils.py`` are loaded as a
private package without that ``__init__``. ``models/utils.py`` imports deepspeed at the top and
never uses it in the functions under test (``masked_mean``); without deepspeed installed, an empty
module stands in for that one import and is removed again right after loading.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import types

import pytest
import torch

from fused_pg import AdaptiveClip
from fused_pg.integrations.openrlhf import PolicyLoss
from fused_pg.reference.loss import policy_loss_ref
from helpers import assert_close


def _load_openrlhf_loss():
    spec = importlib.util.find_spec("openrlhf")
    if spec is None:
        pytest.skip("openrlhf is not installed (pip install --no-deps openrlhf==0.11.2)", allow_module_level=True)
    models = os.path.join(os.path.dirname(spec.origin), "models")
    name = "_openrlhf_models_under_test"
    pkg = types.ModuleType(name)
    pkg.__path__ = [models]
    sys.modules[name] = pkg
    placeholder = importlib.util.find_spec("deepspeed") is None
    if placeholder:
        sys.modules["deepspeed"] = types.ModuleType("deepspeed")
    try:
        for sub in ("utils", "loss"):
            s = importlib.util.spec_from_file_location(f"{name}.{sub}", os.path.join(models, f"{sub}.py"))
            mod = importlib.util.module_from_spec(s)
            sys.modules[f"{name}.{sub}"] = mod
            s.loader.exec_module(mod)
    finally:
        if placeholder:
            del sys.modules["deepspeed"]
    return sys.modules[f"{name}.loss"]


openrlhf_loss = _load_openrlhf_loss()
B, T = 6, 8

CORRECTIONS = [("off", "mask", "ratio", (0.5, 5.0))] + [
    (level, mode, gating, thr)
    for level in ("token", "seq")
    for mode, gating, thr in (("mask", "ratio", (0.8, 1.25)), ("clip", "ratio", (0.8, 1.25)),
                              ("mask", "binary_kl", (0.0, 0.02)), ("mask", "tv", (0.0, 0.05)))
    if not (mode == "clip" and level == "seq")
]


def batch(seed=0, per_seq_adv=False):
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    logp = -3 * torch.rand(B, T, generator=g, dtype=f64)
    old = (logp + 0.5 * (2 * torch.rand(B, T, generator=g, dtype=f64) - 1)).clamp(max=0)
    rollout = (old + 0.3 * (2 * torch.rand(B, T, generator=g, dtype=f64) - 1)).clamp(max=0)
    adv = torch.randn(B, 1 if per_seq_adv else T, generator=g, dtype=f64).expand(B, T).contiguous()
    mask = torch.rand(B, T, generator=g) < 0.75
    mask[2] = False  # an empty row
    mask[0, 0] = True
    return logp, old, rollout, adv, mask.to(f64)


def run(module, logp, old, adv, mask, rollout, **info):
    lp = logp.clone().requires_grad_()
    out = module(lp, old, adv, action_mask=mask, rollout_log_probs=rollout, **info)
    (grad,) = torch.autograd.grad(out[0], [lp])
    return (out[0].detach(), grad, *[None if x is None else float(x) for x in out[1:]])


INFOS = {"local": {}, "dp2": dict(dp_size=2, batch_num_tokens=71.0, global_batch_size=9.0)}


@pytest.mark.parametrize("correction", CORRECTIONS, ids=lambda c: "-".join(map(str, c[:3])))
@pytest.mark.parametrize("loss_type", ["ppo", "gspo"])
@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("dual_clip", [None, 2.0])
@pytest.mark.parametrize("info", list(INFOS))
def test_repo_none_is_openrlhfs_policy_loss(correction, loss_type, token_level_loss, dual_clip, info):
    level, mode, gating, thr = correction
    kw = dict(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=dual_clip, token_level_loss=token_level_loss,
              policy_loss_type=loss_type, is_correction_level=level, is_correction_mode=mode,
              is_correction_gating=gating, is_correction_threshold=list(thr))
    # GSPO: advantages constant over each sequence (where fused-pg's GSPO-token form is GSPO)
    logp, old, rollout, adv, mask = batch(seed=len(str(correction)) + 3 * token_level_loss,
                                          per_seq_adv=loss_type == "gspo")
    ref = run(openrlhf_loss.PolicyLoss(**kw), logp, old, adv, mask, rollout, **INFOS[info])
    got = run(PolicyLoss(**kw, repo="none"), logp, old, adv, mask, rollout, **INFOS[info])
    # OpenRLHF's per-sample mean divides by n + 1e-8: a relative difference of ~1e-8 / n
    tol = 1e-12 if token_level_loss and loss_type == "ppo" else 1e-8
    assert_close("loss", ref[0], got[0], atol=tol, rtol=tol)
    assert_close("d/dlogp", ref[1], got[1], atol=tol * float(ref[1].abs().max()), rtol=tol)
    for name, a, b in zip(("clip_ratio", "ppo_kl", "vllm_kl", "is_filter_ratio"), ref[2:], got[2:]):
        assert (a is None) == (b is None), name
        if a is not None:
            assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9), (name, a, b)  # OpenRLHF: fp32 indicators
    if level != "off" and loss_type == "ppo":
        assert 0 < ref[5] < 1, "the correction filtered some but not all tokens"


def test_defaults_are_openrlhfs():
    import inspect

    ours = inspect.signature(PolicyLoss.__init__).parameters
    theirs = inspect.signature(openrlhf_loss.PolicyLoss.__init__).parameters
    for name, p in theirs.items():
        assert name in ours and ours[name].default == p.default, name
    assert list(inspect.signature(PolicyLoss.forward).parameters) == \
        list(inspect.signature(openrlhf_loss.PolicyLoss.forward).parameters)


def test_repo_matches_the_oracle():
    logp, old, rollout, adv, mask = batch(seed=4)
    module = PolicyLoss.with_options(repo="decorrelate", repo_coef=0.5)(clip_eps_low=0.2, clip_eps_high=0.28,
                                                                      dual_clip=3.0)
    loss, grad, *_ = run(module, logp, old, adv, mask, None, dp_size=2, batch_num_tokens=40.0)
    lp = logp.clone().requires_grad_()
    ref = policy_loss_ref(lp, adv, old, mask, eps_low=0.2, eps_high=0.28, dual_clip=3.0, repo="decorrelate",
                          repo_coef=0.5, num_items_in_batch=20.0)
    (g_ref,) = torch.autograd.grad(ref.loss, [lp])
    assert_close("REPO loss via OpenRLHF's signature", ref.loss, loss, atol=1e-12, rtol=1e-12)
    assert_close("REPO d/dlogp", g_ref, grad, atol=1e-12, rtol=1e-12)
    assert float(module.metrics["repo_zeta"]) != 0.0


def test_adapo_controller_sets_the_clip_range_and_steps():
    ctrl = AdaptiveClip(target_entropy=4.0, eps_low=0.2, eps_high=0.28, rate=0.02)
    module = PolicyLoss(repo="none", controller=ctrl, update_every=3)
    windows = []
    for i in range(6):
        logp, old, rollout, adv, mask = batch(seed=30 + i)
        eps = ctrl.eps_high
        run(module, logp, old, adv, mask, None)
        assert float(module.metrics["eps_high"]) == eps
        windows.append(((-old * mask).sum().item(), mask.sum().item()))
    expected = 0.28
    for w in (windows[:3], windows[3:]):
        expected += 0.02 * (4.0 - sum(a for a, _ in w) / sum(b for _, b in w))
    assert ctrl.steps == 2 and ctrl.eps_high == pytest.approx(expected, rel=1e-12)


def test_errors_name_the_option():
    with pytest.raises(ValueError, match="policy_loss_type"):
        PolicyLoss(policy_loss_type="cispo")
    with pytest.raises(ValueError, match="dual_clip"):
        PolicyLoss(dual_clip=0.5)
    with pytest.raises(ValueError, match="is_correction_mode=clip"):
        PolicyLoss(is_correction_level="seq", is_correction_mode="clip")
    with pytest.raises(ValueError, match="update_every"):
        PolicyLoss(controller=AdaptiveClip(target_entropy=1.0))
    logp, old, rollout, adv, mask = batch()
    with pytest.raises(ValueError, match="rollout_log_probs"):
        PolicyLoss(is_correction_level="token")(logp, old, adv, mask)
