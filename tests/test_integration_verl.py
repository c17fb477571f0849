"""fused_pg.integrations.verl against the installed verl's own functions (``verl.trainer.ppo.
core_algos``: ``compute_policy_loss_vanilla``, ``compute_policy_loss_gspo``, ``kl_penalty``,
``agg_loss``), in fp64 so that any difference is a semantic one: loss, gradient w.r.t. the
log-probs and metrics, for every ``loss_agg_mode``, with and without ``global_batch_info``
(data parallelism, constant Dr.GRPO length), rollout importance weights and clip settings;
verl's KL estimators; REPO through the registered loss against the oracle; ADAPO's stepping.
"""

from __future__ import annotations

import json
import math
import zlib

import pytest
import torch

core_algos = pytest.importorskip(
    "verl.trainer.ppo.core_algos",
    reason="verl is not installed (pip install 'fused-pg[verl]'; see the module docstring of "
           "fused_pg.integrations.verl)")
from verl.workers.config import ActorConfig  # noqa: E402

import fused_pg  # noqa: E402
from fused_pg.integrations import verl as fverl  # noqa: E402
from fused_pg.reference.loss import policy_loss_ref  # noqa: E402
from helpers import assert_close  # noqa: E402

MODES = fverl.LOSS_AGG_MODES
B, T = 5, 9


@pytest.fixture(autouse=True)
def default_registration(monkeypatch):
    monkeypatch.delenv(fverl.ENV_OPTIONS, raising=False)
    fverl.register(repo="decorrelate", repo_coef=1.0, repo_center=True, importance_level="token")
    yield
    fverl.register(repo="decorrelate", repo_coef=1.0, repo_center=True, importance_level="token")


def actor_config(**kw) -> ActorConfig:
    info = kw.pop("global_batch_info", None)
    cfg = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=2, **kw)
    if info:
        cfg.global_batch_info.update(info)
    return cfg


def batch(seed=0, spread=0.6, per_seq_adv=False, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logp = -3 * torch.rand(B, T, generator=g, dtype=dtype)
    old = (logp + spread * (2 * torch.rand(B, T, generator=g, dtype=dtype) - 1)).clamp(max=0)
    adv = torch.randn(B, 1 if per_seq_adv else T, generator=g, dtype=dtype).expand(B, T).contiguous()
    mask = torch.rand(B, T, generator=g) < 0.75
    mask[1] = False  # an empty row
    mask[0, 0] = True
    w = 2 * torch.rand(B, T, generator=g, dtype=dtype)
    return logp, old, adv, mask, w


def run(fn, logp, old, adv, mask, mode, cfg, weights):
    lp = logp.clone().requires_grad_()
    loss, metrics = fn(old_log_prob=old, log_prob=lp, advantages=adv, response_mask=mask, loss_agg_mode=mode,
                       config=cfg, rollout_is_weights=weights)
    (grad,) = torch.autograd.grad(loss, [lp])
    return loss.detach(), grad, {k: float(v) for k, v in metrics.items()}


INFOS = {
    "local": None,
    "dp2": dict(dp_size=2, batch_num_tokens=57, global_batch_size=11),
    "dp1-global": dict(dp_size=1, batch_num_tokens=40, global_batch_size=7, loss_scale_factor=16),
}
CLIPS = {
    "verl-defaults": dict(),
    "asymmetric": dict(clip_ratio=0.2, clip_ratio_low=0.1, clip_ratio_high=0.28, clip_ratio_c=2.0),
    "fallback-to-clip_ratio": dict(clip_ratio=0.15, clip_ratio_low=None, clip_ratio_high=None, clip_ratio_c=10.0),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("info", list(INFOS))
@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("with_weights", [False, True], ids=["no-weights", "rollout_is_weights"])
def test_repo_none_is_verls_vanilla_loss(mode, info, clip, with_weights):
    """``loss_mode=repo`` with REPO off is verl's ``compute_policy_loss_vanilla``: loss, d/dlogp,
    metrics (fp64, 1e-12), dual clip at clip_ratio_c included."""
    fverl.register(repo="none")
    logp, old, adv, mask, w = batch(seed=zlib.crc32(f"{mode}|{info}|{clip}".encode()) % 1000)
    cfg = actor_config(global_batch_info=INFOS[info], **CLIPS[clip])
    weights = w if with_weights else None
    ref = run(core_algos.compute_policy_loss_vanilla, logp, old, adv, mask, mode, cfg, weights)
    got = run(core_algos.get_policy_loss_fn("repo"), logp, old, adv, mask, mode, cfg, weights)
    # verl's seq-mean-token-mean divides by n + 1e-8: a relative difference of ~1e-8 / n
    tol = 1e-8 if mode == "seq-mean-token-mean" else 1e-12
    assert_close(f"loss {mode}", ref[0], got[0], atol=tol, rtol=tol)
    assert_close(f"d/dlogp {mode}", ref[1], got[1], atol=tol * float(ref[1].abs().max()), rtol=tol)
    for k in ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"):
        # verl averages the indicators in fp32
        assert math.isclose(got[2][k], ref[2][k], rel_tol=1e-6, abs_tol=1e-7), (k, got[2][k], ref[2][k])
    assert {f"actor/fused_pg/{k}" for k in fused_pg.METRIC_KEYS} <= set(got[2])
    # the comparison exercised the clipping and the dual clip
    assert ref[2]["actor/pg_clipfrac"] > 0


@pytest.mark.parametrize("mode", MODES)
def test_sequence_level_is_verls_gspo_loss(mode):
    fverl.register(repo="none", importance_level="sequence")
    logp, old, adv, mask, w = batch(seed=7, spread=0.3)
    cfg = actor_config(clip_ratio_low=0.05, clip_ratio_high=0.06, global_batch_info=INFOS["dp2"])
    ref = run(core_algos.compute_policy_loss_gspo, logp, old, adv, mask, mode, cfg, w)
    got = run(core_algos.get_policy_loss_fn("repo"), logp, old, adv, mask, mode, cfg, w)
    tol = 1e-8 if mode == "seq-mean-token-mean" else 1e-12
    assert_close(f"gspo loss {mode}", ref[0], got[0], atol=tol, rtol=tol)
    assert_close(f"gspo d/dlogp {mode}", ref[1], got[1], atol=tol * float(ref[1].abs().max()), rtol=tol)
    assert math.isclose(got[2]["actor/pg_clipfrac"], ref[2]["actor/pg_clipfrac"], rel_tol=1e-6, abs_tol=1e-7)
    assert ref[2]["actor/pg_clipfrac"] > 0


@pytest.mark.parametrize("kl_loss_type", list(fverl.KL_LOSS_TYPES))
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum-norm"])
def test_kl_loss_types_match_verls_kl_penalty(kl_loss_type, mode):
    """fused-pg's KL term with :func:`kl_options` (or ``preset="verl"``) is verl's
    ``agg_loss(kl_penalty(...))``, value and gradient, log-ratios up to 15 (k3's clamp at 10 active)."""
    g = torch.Generator().manual_seed(3)
    logp = -5 * torch.rand(B, T, generator=g, dtype=torch.float64)
    ref_lp = logp - 15 * (2 * torch.rand(B, T, generator=g, dtype=torch.float64) - 1)
    mask = torch.rand(B, T, generator=g) < 0.8
    lp_v = logp.clone().requires_grad_()
    kl = core_algos.kl_penalty(lp_v, ref_lp, kl_loss_type)
    ref = core_algos.agg_loss(loss_mat=kl, loss_mask=mask, loss_agg_mode=mode)
    (g_ref,) = torch.autograd.grad(ref, [lp_v])
    for how in ("kl_options", "preset"):
        opts = fverl.kl_options(kl_loss_type)
        if how == "preset":
            opts = dict(preset="verl", kl_estimator=opts["kl_estimator"])
        lp = logp.clone().requires_grad_()
        out = fused_pg.policy_loss_from_logprobs(
            lp, torch.zeros(B, T, dtype=torch.float64), None, mask, ref_logprobs=ref_lp, kl_coef=1.0, repo="none",
            aggregation=mode, validate=False, **opts)  # ref log-probs 15 above logp exceed 0 on purpose
        (g_got,) = torch.autograd.grad(out.loss, [lp])
        assert_close(f"KL {kl_loss_type} ({how})", ref, out.loss, atol=1e-12, rtol=1e-12)
        assert_close(f"dKL/dlogp {kl_loss_type} ({how})", g_ref, g_got, atol=1e-12, rtol=1e-12)
    assert fverl.kl_options(kl_loss_type)["kl_clamp"] == (10.0 if "low_var" in kl_loss_type or "k3" in kl_loss_type
                                                           else None)


def test_repo_through_verl_matches_the_oracle():
    """The registered loss applies REPO (and verl's dual clip, weights, dp normaliser) exactly as
    fused-pg's oracle does."""
    fverl.register(repo="decorrelate", repo_coef=0.7)
    logp, old, adv, mask, w = batch(seed=11)
    cfg = actor_config(clip_ratio_low=0.2, clip_ratio_high=0.28, global_batch_info=INFOS["dp2"])
    loss, grad, metrics = run(core_algos.get_policy_loss_fn("repo"), logp, old, adv, mask, "token-mean", cfg, w)
    lp = logp.clone().requires_grad_()
    ref = policy_loss_ref(lp, adv, old, mask, weights=w, eps_low=0.2, eps_high=0.28, dual_clip=3.0,
                          repo="decorrelate", repo_coef=0.7, num_items_in_batch=57 / 2)
    (g_ref,) = torch.autograd.grad(ref.loss, [lp])
    assert_close("REPO loss via verl", ref.loss, loss, atol=1e-12, rtol=1e-12)
    assert_close("REPO d/dlogp via verl", g_ref, grad, atol=1e-12, rtol=1e-12)
    assert metrics["actor/fused_pg/repo_zeta"] == pytest.approx(float(ref.metrics["repo_zeta"]), rel=1e-10)
    assert metrics["actor/fused_pg/repo_zeta"] != 0.0


def test_adapo_steps_its_controller_every_update_every_calls():
    fverl.register(repo="none", controller=dict(target_entropy=5.0, eps_low=0.2, eps_high=0.28, rate=0.01),
                   update_every=2)
    stepper = fverl.adapo_stepper()
    ctrl = stepper.controller
    fn = core_algos.get_policy_loss_fn("adapo")
    cfg = actor_config()
    seen = []
    for i in range(4):
        logp, old, adv, mask, _ = batch(seed=20 + i)
        eps_before = ctrl.eps_high
        loss, _, metrics = run(fn, logp, old, adv, mask, "token-mean", cfg, None)
        assert metrics["actor/fused_pg/eps_high"] == eps_before  # the loss used the controller's range
        seen.append(((-old * mask).sum().item(), mask.sum().item()))
    with torch.no_grad():  # not a training call: not counted
        fn(old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask, config=cfg)
    assert ctrl.steps == 2 and stepper.calls == 4
    expected = 0.28
    for a, b in (seen[0:2], seen[2:4]):
        surprisal = (a[0] + b[0]) / (a[1] + b[1])  # the window's mean -log pi_old of the sampled tokens
        expected += 0.01 * (5.0 - surprisal)
    assert ctrl.eps_high == pytest.approx(expected, rel=1e-12)
    state = stepper.state_dict()
    assert json.loads(json.dumps(state)) == state


def test_options_from_the_environment(monkeypatch):
    monkeypatch.setenv(fverl.ENV_OPTIONS, json.dumps({"repo": "fixed", "repo_coef": 0.3}))
    fverl.register()
    logp, old, adv, mask, _ = batch(seed=5)
    cfg = actor_config()
    loss, _, _ = run(core_algos.get_policy_loss_fn("repo"), logp, old, adv, mask, "token-mean", cfg, None)
    ref = policy_loss_ref(logp, adv, old, mask, eps_low=0.2, eps_high=0.2, dual_clip=3.0, repo="fixed", repo_coef=0.3)
    assert_close("loss with options from the environment", ref.loss, loss, atol=1e-12, rtol=1e-12)
    monkeypatch.setenv(fverl.ENV_OPTIONS, json.dumps({"repo_cof": 0.3}))
    with pytest.raises(ValueError, match="repo_cof"):
        fverl.register()
    monkeypatch.delenv(fverl.ENV_OPTIONS)


def test_errors_name_the_option():
    logp, old, adv, mask, _ = batch()
    fn = core_algos.get_policy_loss_fn("repo")
    with pytest.raises(ValueError, match="batch_num_tokens"):
        run(fn, logp, old, adv, mask, "token-mean", actor_config(global_batch_info=dict(dp_size=2)), None)
    with pytest.raises(ValueError, match="global_batch_size"):
        run(fn, logp, old, adv, mask, "seq-mean-token-mean", actor_config(global_batch_info=dict(dp_size=2)), None)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        run(fn, logp, old, adv, mask, "seq-sum", actor_config(), None)
    with pytest.raises(ValueError, match="config"):
        run(fn, logp, old, adv, mask, "token-mean", None, None)
    with pytest.raises(ValueError, match="kl_loss_type"):
        fverl.kl_options("k4")
    with pytest.raises(ValueError, match="update_every"):
        fverl.register(controller=dict(target_entropy=1.0))
    with pytest.raises(ValueError, match="importance_level"):
        fverl.register(importance_level="seq")
    fverl._stepper = None
    with pytest.raises(ValueError, match="controller"):
        run(core_algos.get_policy_loss_fn("adapo"), logp, old, adv, mask, "token-mean", actor_config(), None)


def test_registered_under_verls_names():
    assert core_algos.get_policy_loss_fn("repo") is fverl.repo_policy_loss
    assert core_algos.get_policy_loss_fn("adapo") is fverl.adapo_policy_loss
