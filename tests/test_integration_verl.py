"""fused_pg.integrations.verl against the installed verl.

* Agreement with verl's own functions (``verl.trainer.ppo.core_algos``: ``compute_policy_loss_vanilla``,
  ``compute_policy_loss_gspo``, ``kl_penalty``, ``agg_loss``), in fp64 so that any difference is a
  semantic one: loss, gradient w.r.t. the log-probs and metrics, for every ``loss_agg_mode``, with
  and without ``global_batch_info``, rollout importance weights and clip settings.
* verl's training loop as verl runs it: the real ``BaseEngine.train_batch`` (one optimiser step
  per mini-batch, wrapped by the drop-in), the real ``prepare_micro_batches``,
  ``left_right_2_no_padding`` and ``ppo_loss``, with a tiny CPU engine that implements
  ``forward_backward_batch`` as verl's FSDP engine does. With it: REPO's gradient is the same
  for 1, 2 and 4 micro-batches and for 2 data-parallel gloo ranks (every REPO mode); ADAPO steps
  once per optimiser step, is saved with each checkpoint and resumes on its trajectory.
* Loud failure: each verl internal the drop-in relies on, renamed, raises when it is set up;
  options are checked where they are given (verl config keys, register(), the environment).
* The recipe ``examples/verl_repo_grpo.sh``: every key exists in verl's configuration and
  fused-pg's section builds.

verl's engine modules import peft / uvicorn / fastapi at module level, which this CPU
environment does not install: they are imported with empty stand-ins for those packages only
(tests/helpers/stand_ins.py); verl's own code is the installed one.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import types
import zlib
from functools import partial
from pathlib import Path

import pytest
import torch

core_algos = pytest.importorskip(
    "verl.trainer.ppo.core_algos",
    reason="verl is not installed (pip install 'fused-pg[verl]'; see the module docstring of "
           "fused_pg.integrations.verl)")
from helpers import assert_close  # noqa: E402
from helpers.stand_ins import VERL_MISSING, import_with_stand_ins  # noqa: E402

engine_base = import_with_stand_ins("verl.workers.engine.base", VERL_MISSING)
engine_utils = import_with_stand_ins("verl.workers.engine.utils", VERL_MISSING)

from tensordict import TensorDict  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402
from verl.workers.utils.padding import left_right_2_no_padding  # noqa: E402

import fused_pg  # noqa: E402
from fused_pg.integrations import _common  # noqa: E402
from fused_pg.integrations import verl as fverl  # noqa: E402
from fused_pg.reference.loss import policy_loss_ref  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODES = fverl.LOSS_AGG_MODES
B, T = 5, 9


@pytest.fixture(autouse=True)
def default_registration(monkeypatch):
    """Documented defaults, the mini-batch hook installed, a fresh process state."""
    monkeypatch.delenv(fverl.ENV_OPTIONS, raising=False)
    monkeypatch.setattr(fverl, "_SESSION", fverl._Session())
    fverl.register()
    assert fverl.engine_hook_status() == "installed"
    yield
    monkeypatch.undo()  # a test's renamed internals are back before registering again
    fverl.register()


def actor_config(policy_loss=None, **kw) -> ActorConfig:
    info = kw.pop("global_batch_info", None)
    if policy_loss is not None:
        kw["policy_loss"] = policy_loss
    kw.setdefault("ppo_micro_batch_size_per_gpu", 2)
    cfg = ActorConfig(strategy="fsdp", rollout_n=1, **kw)
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


def behaviour_stats(old, adv, mask):
    """REPO statistics of the behaviour log-probs, written out (fp64)."""
    m = mask.bool()
    lp, a = old[m].double(), adv[m].double()
    n = torch.tensor(float(m.sum()), dtype=torch.float64)
    return types.SimpleNamespace(mean_logprob=lp.mean(), var_logprob=((lp - lp.mean()) ** 2).mean(),
                                 cov_adv_logprob=((a - a.mean()) * (lp - lp.mean())).mean(), count=n)


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


# ---------------------------------------------------------------------------------------------
# agreement with verl's own losses
# ---------------------------------------------------------------------------------------------

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
    assert "actor/fused_pg/repo_zeta" in got[2] and "actor/fused_pg/n_tokens" in got[2]
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
    """A call outside verl's engine is its own mini-batch: REPO's statistics are those of its
    behaviour log-probs; the loss (with verl's dual clip, weights, dp normaliser) is the oracle's."""
    fverl.register(repo="decorrelate", repo_coef=0.7)
    logp, old, adv, mask, w = batch(seed=11)
    cfg = actor_config(clip_ratio_low=0.2, clip_ratio_high=0.28, global_batch_info=INFOS["dp2"])
    loss, grad, metrics = run(core_algos.get_policy_loss_fn("repo"), logp, old, adv, mask, "token-mean", cfg, w)
    lp = logp.clone().requires_grad_()
    ref = policy_loss_ref(lp, adv, old, mask, weights=w, eps_low=0.2, eps_high=0.28, dual_clip=3.0,
                          repo="decorrelate", repo_coef=0.7, num_items_in_batch=57 / 2,
                          repo_stats=behaviour_stats(old, adv, mask))
    (g_ref,) = torch.autograd.grad(ref.loss, [lp])
    assert_close("REPO loss via verl", ref.loss, loss, atol=1e-12, rtol=1e-12)
    assert_close("REPO d/dlogp via verl", g_ref, grad, atol=1e-12, rtol=1e-12)
    assert metrics["actor/fused_pg/repo_zeta"] == pytest.approx(float(ref.metrics["repo_zeta"]), rel=1e-10)
    assert metrics["actor/fused_pg/repo_zeta"] != 0.0


def test_registered_under_verls_names():
    assert core_algos.get_policy_loss_fn("repo") is fverl.repo_policy_loss
    assert core_algos.get_policy_loss_fn("adapo") is fverl.adapo_policy_loss


# ---------------------------------------------------------------------------------------------
# verl's training loop: a tiny engine on verl's real BaseEngine.train_batch
# ---------------------------------------------------------------------------------------------

V, D = 50, 8


class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(V, D)
        self.head = torch.nn.Linear(D, V)

    def forward(self, ids):
        logp = torch.log_softmax(self.head(torch.tanh(self.embed(ids))).double(), -1)
        return logp, -(logp.exp() * logp).sum(-1)


class TinyEngine(engine_base.BaseEngine):
    """verl's ``BaseEngine`` (its real ``train_batch``: zero grads, ``forward_backward_batch``,
    ``optimizer_step``) with ``forward_backward_batch`` as verl 0.9.1's FSDP engine implements it:
    the global token count and dp size into the data, ``prepare_micro_batches``, then per
    micro-batch the model's log-probs (and entropies) as no-padding nested tensors, the loss
    function, backward."""

    def __init__(self, group=None, entropy=True, lr=0.0):
        self.model, self.group, self.entropy, self.lr = TinyLM(), group, entropy, lr
        self.grads, self.losses = [], []

    def get_data_parallel_group(self):
        return self.group

    def get_data_parallel_size(self):
        return 1 if self.group is None else torch.distributed.get_world_size(self.group)

    def optimizer_zero_grad(self):
        self.model.zero_grad(set_to_none=True)

    def optimizer_step(self):
        self.grads.append({n: p.grad.detach().clone() for n, p in self.model.named_parameters()})
        with torch.no_grad():
            for p in self.model.parameters():
                p -= self.lr * p.grad
        return torch.tensor(0.0)

    def is_mp_src_rank_with_outputs(self):
        return True

    def forward_backward_batch(self, data, loss_function, forward_only=False):
        n = data["loss_mask"].sum()
        if self.group is not None:
            torch.distributed.all_reduce(n, group=self.group)
        tu.assign_non_tensor(data, batch_num_tokens=n.item())
        tu.assign_non_tensor(data, dp_size=self.get_data_parallel_size())
        micro_batches, _ = engine_utils.prepare_micro_batches(data=data, dp_group=self.group,
                                                               same_micro_num_in_dp=True)
        for micro_batch in micro_batches:
            ids = micro_batch["input_ids"]
            logp_all, entropy = self.model(ids.values())
            logp = logp_all.gather(-1, torch.roll(ids.values(), -1)[:, None]).squeeze(-1)
            output = {"log_probs": torch.nested.nested_tensor_from_jagged(logp, offsets=ids.offsets())}
            if self.entropy:
                output["entropy"] = torch.nested.nested_tensor_from_jagged(entropy, offsets=ids.offsets())
            loss, _ = loss_function(model_output=output, data=micro_batch, dp_group=self.group)
            loss.backward()
            self.losses.append(float(loss))
        return {"metrics": {}}

    def save_checkpoint(self, local_path, hdfs_path=None, global_step=0, max_ckpt_to_keep=None, **kwargs):
        os.makedirs(local_path, exist_ok=True)
        torch.save(self.model.state_dict(), os.path.join(local_path, "model.pt"))

    def load_checkpoint(self, local_path, hdfs_path=None, del_local_after_load=True, **kwargs):
        self.model.load_state_dict(torch.load(os.path.join(local_path, "model.pt")))


ENGINE_DEVICE = engine_base.get_device_name()
if "fused_pg_test" not in engine_base.EngineRegistry._engines:
    engine_base.EngineRegistry.register(model_type="fused_pg_test", backend="tiny", device=ENGINE_DEVICE)(TinyEngine)


def rollout(n=8, seed=0, prompt=4, response=6):
    """A mini-batch as verl's trainer hands it to the actor: left-padded prompts, right-padded
    responses, behaviour log-probs and per-sequence advantages, converted to no-padding."""
    g = torch.Generator().manual_seed(seed)
    plen = torch.randint(2, prompt + 1, (n,), generator=g)
    rlen = torch.randint(1, response + 1, (n,), generator=g)
    prompts, responses = torch.zeros(n, prompt, dtype=torch.long), torch.zeros(n, response, dtype=torch.long)
    attention, response_mask = torch.zeros(n, prompt + response, dtype=torch.long), torch.zeros(n, response,
                                                                                                 dtype=torch.long)
    for i in range(n):
        prompts[i, prompt - plen[i]:] = torch.randint(1, V, (int(plen[i]),), generator=g)
        responses[i, :rlen[i]] = torch.randint(1, V, (int(rlen[i]),), generator=g)
        attention[i, prompt - plen[i]:prompt + rlen[i]] = 1
        response_mask[i, :rlen[i]] = 1
    with torch.no_grad():  # behaviour log-probs: the current model's, perturbed (an off-policy batch)
        ids = torch.cat([prompts, responses], 1)
        logp_all, _ = TinyLM()(ids)
        logp = logp_all[:, prompt - 1:-1].gather(-1, responses[..., None]).squeeze(-1)
    old = (logp + 0.3 * torch.randn(n, response, generator=g, dtype=torch.float64)).float()
    advantages = torch.randn(n, 1, generator=g).expand(n, response).contiguous()
    data = TensorDict(dict(prompts=prompts, responses=responses, input_ids=ids, attention_mask=attention,
                           response_mask=response_mask, position_ids=(attention.cumsum(1) - 1).clamp(min=0),
                           old_log_probs=old, advantages=advantages), batch_size=[n])
    data = left_right_2_no_padding(data)
    tu.assign_non_tensor(data, global_batch_size=n)
    return data


def train_step(engine, data, micro, policy_loss, loss_agg_mode="token-mean", **actor):
    """One optimiser step as verl's TrainingWorker.train_batch runs it."""
    config = actor_config(policy_loss, ppo_micro_batch_size_per_gpu=micro, loss_agg_mode=loss_agg_mode, **actor)
    tu.assign_non_tensor(data, use_dynamic_bsz=False, micro_batch_size_per_gpu=micro)
    engine.train_batch(data, partial(ppo_loss, config=config))
    return engine.grads[-1]


def rel_diff(a: dict, b: dict) -> float:
    num = math.sqrt(sum(float((a[n] - b[n]).norm()) ** 2 for n in b))
    return num / math.sqrt(sum(float(b[n].norm()) ** 2 for n in b))


REPO_MODES = {
    "none": dict(repo="none"),
    "relative": dict(repo="relative", repo_coef=0.5),
    "relative-negative-state": dict(repo="relative", repo_coef=-0.5, repo_center="state"),
    "fixed-state": dict(repo="fixed", repo_coef=0.5, repo_center="state"),
    "decorrelate-uncentred": dict(repo="decorrelate", repo_center="none"),
    "fixed": dict(repo="fixed", repo_coef=0.5),
    "fixed-uncentred": dict(repo="fixed", repo_coef=0.5, repo_center=False),
    "decorrelate": dict(repo="decorrelate"),
    "decorrelate-0.6-uncentred": dict(repo="decorrelate", repo_coef=0.6, repo_center=False),
    "decorrelate-gspo": dict(repo="decorrelate", importance_level="sequence"),
}


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("repo", list(REPO_MODES))
def test_repo_gradient_does_not_depend_on_the_micro_batching(repo, agg):
    """One mini-batch of 8 sequences in 1, 2 and 4 micro-batches: the same gradient (1e-6
    relative; the engine runs in fp64 up to verl's fp32 behaviour log-probs)."""
    policy_loss = fverl.PolicyLossConfig(loss_mode="repo", **REPO_MODES[repo])
    grads = [train_step(TinyEngine(), rollout(), micro, policy_loss, agg) for micro in (8, 4, 2)]
    for micro, g in zip((4, 2), grads[1:]):
        assert rel_diff(g, grads[0]) <= 1e-6, f"{repo}/{agg}: {8 // micro} micro-batches move the gradient by " \
                                              f"{rel_diff(g, grads[0]):.2e}"
    if repo != "none":  # REPO acted: the gradient is not REPO-off's
        off = train_step(TinyEngine(), rollout(), 8, fverl.PolicyLossConfig(loss_mode="repo", repo="none"), agg)
        assert rel_diff(grads[0], off) > 1e-3


def _dp_job(repo, agg):
    def job(rank, world):
        part = tu.chunk_tensordict(rollout(), world)[rank]  # as verl dispatches a batch to its dp ranks
        engine = TinyEngine(group=torch.distributed.group.WORLD)
        grads = train_step(engine, part, 2, fverl.PolicyLossConfig(loss_mode="repo", **REPO_MODES[repo]), agg)
        return {n: g for n, g in grads.items()}
    return job


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum-norm"])
def test_repo_gradient_is_the_same_on_two_data_parallel_ranks(agg):
    """Two gloo ranks with half the mini-batch each (2 micro-batches each): the mean of their
    gradients (what FSDP / DDP apply) is one process's gradient on the whole mini-batch."""
    from helpers.multiproc import run_group

    repos = ["fixed", "decorrelate", "decorrelate-0.6-uncentred", "relative", "fixed-state"]
    results = run_group(2, [(r, _dp_job(r, agg)) for r in repos])
    for repo in repos:
        one = train_step(TinyEngine(), rollout(), 4,
                         fverl.PolicyLossConfig(loss_mode="repo", **REPO_MODES[repo]), agg)
        mean = {n: (results[0][repo][n] + results[1][repo][n]) / 2 for n in one}
        assert rel_diff(mean, one) <= 1e-6, f"{repo}/{agg}: 2 ranks differ from 1 by {rel_diff(mean, one):.2e}"


def test_what_verl_cannot_serve_is_refused():
    """decorrelate with the per-state centre needs the whole mini-batch's entropies up front, which
    verl does not keep (refused when the config is built); the per-state centre needs verl's
    entropies (refused at the first loss without them)."""
    with pytest.raises(ValueError, match="policy_loss.repo_center.*'decorrelate' with repo_center='state'"):
        fverl.PolicyLossConfig(loss_mode="repo", repo="decorrelate", repo_center="state")
    with pytest.raises(ValueError, match="calculate_entropy=True"):
        train_step(TinyEngine(entropy=False), rollout(), 4,
                   fverl.PolicyLossConfig(loss_mode="repo", repo="fixed", repo_center="state"))


def test_the_new_metrics_are_logged():
    engine = TinyEngine()
    config = actor_config(fverl.PolicyLossConfig(loss_mode="repo", repo="relative", repo_coef=0.3,
                                                 repo_center="state"), ppo_micro_batch_size_per_gpu=8)
    seen = []

    def loss_function(**kwargs):
        loss, metrics = ppo_loss(config=config, **kwargs)
        seen.append(metrics)
        return loss, metrics

    data = rollout()
    tu.assign_non_tensor(data, use_dynamic_bsz=False, micro_batch_size_per_gpu=8)
    engine.train_batch(data, loss_function)
    keys = {k.removeprefix("actor/fused_pg/") for k in seen[0] if k.startswith("actor/fused_pg/")}
    assert {"entropy_drive", "entropy_drive_pos", "entropy_drive_neg", "clip_high_p_mean", "clip_low_p_mean",
            "clip_high_below_avg", "clip_low_below_avg", "rollout_mismatch_abs_mean",
            "rollout_phantom_clip_frac"} <= keys
    assert seen[0]["actor/fused_pg/entropy_measured"].values == [1.0]  # verl's entropies reached the loss
    assert seen[0]["actor/fused_pg/repo_zeta"].values == [pytest.approx(0.3)]


# ---------------------------------------------------------------------------------------------
# controllers
# ---------------------------------------------------------------------------------------------

def test_the_repo_controller_steps_repo_coef_once_per_optimiser_step():
    """REPO-R with the multiplicative REPO controller (loss_mode=repo): below its target, zeta
    doubles at each optimiser step, whatever the number of micro-batches."""
    engine = TinyEngine()
    policy = fverl.PolicyLossConfig(loss_mode="repo", repo="relative", repo_coef=0.01, repo_center="state",
                                    repo_control_target_entropy=9.0, repo_control_mode="multiplicative")
    for seed in (1, 2):
        train_step(engine, rollout(seed=seed), 2, policy)
    ctrl = fverl.current_controller()
    assert isinstance(ctrl, fused_pg.AdaptiveRepoCoef) and ctrl.steps == 2 and ctrl.repo_coef == pytest.approx(0.04)
    with pytest.raises(ValueError, match="ADAPO is loss_mode=adapo"):
        fverl.PolicyLossConfig(loss_mode="repo", adapo_target_entropy=1.0)
    with pytest.raises(ValueError, match="not the REPO controller"):
        fverl.PolicyLossConfig(loss_mode="adapo", repo_control_target_entropy=1.0)

def adapo_loss_config(**kw):
    return fverl.PolicyLossConfig(loss_mode="adapo", repo="none", adapo_target_entropy=5.0, adapo_rate=0.01, **kw)


def expected_steps(batches, entropy: bool, eps_high=0.28):
    """eps_high after each mini-batch: + rate * (target - H), H the token-weighted mean of the
    exact entropies of the model that trains (lr 0: the same model), or of the surprisal."""
    out = []
    for data in batches:
        old, mask = data["old_log_probs"].double(), data["response_mask"].bool()
        if entropy:
            ids = data["input_ids"]
            _, ent = TinyLM()(ids.values())
            rows = [e for e in torch.nested.nested_tensor_from_jagged(ent, offsets=ids.offsets()).unbind()]
            lengths = mask.sum(1)
            h = torch.cat([row[-int(n) - 1:-1] for row, n in zip(rows, lengths)]).mean()
        else:
            h = (-old[mask]).mean()
        eps_high += 0.01 * (5.0 - float(h))
        out.append(eps_high)
    return out


@pytest.mark.parametrize("exact", [True, False], ids=["exact-entropy", "surprisal"])
def test_adapo_steps_once_per_optimiser_step(exact):
    """One controller step per mini-batch (after verl's optimiser step), whatever the number of
    micro-batches, from the whole mini-batch: verl's entropies when it computes them, else the
    behaviour log-probs' surprisal."""
    engine = TinyEngine(entropy=exact)
    batches = [rollout(seed=s) for s in (1, 2)]
    for data in batches:
        train_step(engine, data, 2, adapo_loss_config(), clip_ratio_low=0.2, clip_ratio_high=0.28)
    ctrl = fverl.current_controller()
    assert ctrl.steps == 2
    assert ctrl.eps_high == pytest.approx(expected_steps(batches, exact)[-1], rel=1e-9)


def test_adapo_controller_is_checkpointed_and_a_resume_continues_its_trajectory(tmp_path, monkeypatch):
    batches = [rollout(seed=s) for s in (1, 2, 3)]
    ckpt = tmp_path / "global_step_1" / "actor"

    def build():
        return engine_base.EngineRegistry.new(model_type="fused_pg_test", backend="tiny")

    engine = build()
    policy = adapo_loss_config()
    trajectory = []
    for i, data in enumerate(batches):
        train_step(engine, data, 4, policy, clip_ratio_low=0.2, clip_ratio_high=0.28)
        trajectory.append(fverl.current_controller().eps_high)
        if i == 0:
            engine.save_checkpoint(str(ckpt), None, 1, None)
    saved = json.loads((ckpt / _common.CONTROLLER_FILE).read_text())
    assert saved["steps"] == 1 and saved["value"] == trajectory[0]

    # a new worker process resumes from global_step_1
    monkeypatch.setattr(fverl, "_SESSION", fverl._Session())
    policy = adapo_loss_config()
    engine = build()
    engine.load_checkpoint(str(ckpt), None, False)
    resumed = []
    for data in batches[1:]:
        train_step(engine, data, 4, policy, clip_ratio_low=0.2, clip_ratio_high=0.28)
        resumed.append(fverl.current_controller().eps_high)
    assert resumed == trajectory[1:]

    # a checkpoint without the controller's state: refused, unless restarting it is asked for
    (ckpt / _common.CONTROLLER_FILE).unlink()
    monkeypatch.setattr(fverl, "_SESSION", fverl._Session())
    adapo_loss_config()
    with pytest.raises(ValueError, match="controller_fresh_start"):
        build().load_checkpoint(str(ckpt), None, False)
    monkeypatch.setattr(fverl, "_SESSION", fverl._Session())
    adapo_loss_config(controller_fresh_start=True)
    build().load_checkpoint(str(ckpt), None, False)


# ---------------------------------------------------------------------------------------------
# options: verl config keys, register(), the environment
# ---------------------------------------------------------------------------------------------

def test_options_from_verls_policy_loss_config():
    """fused-pg's keys in verl's policy_loss section reach the loss; keys left unset take the
    process defaults."""
    fverl.register(repo="decorrelate", repo_coef=0.9)
    logp, old, adv, mask, _ = batch(seed=5)
    cfg = actor_config(fverl.PolicyLossConfig(loss_mode="repo", repo="fixed", repo_coef=0.3))
    loss, _, _ = run(core_algos.get_policy_loss_fn("repo"), logp, old, adv, mask, "token-mean", cfg, None)
    ref = policy_loss_ref(logp, adv, old, mask, eps_low=0.2, eps_high=0.2, dual_clip=3.0, repo="fixed",
                          repo_coef=0.3, repo_stats=behaviour_stats(old, adv, mask))
    assert_close("loss with verl config keys", ref.loss, loss, atol=1e-12, rtol=1e-12)
    assert fverl.PolicyLossConfig(loss_mode="repo").fused_pg_options().loss.repo_coef == 0.9


BAD_KEYS = [
    (dict(repo="decorelate"), "policy_loss.repo"),
    (dict(repo_coef=1.5), "policy_loss.repo_coef"),
    (dict(repo_center="yes"), "policy_loss.repo_center"),
    (dict(importance_level="seq"), "policy_loss.importance_level"),
    (dict(validate="no"), "policy_loss.validate"),
    (dict(adapo_target_entropy=-1.0), "policy_loss.adapo_target_entropy"),
    (dict(adapo_target_entropy=1.0, adapo_rate=0.0), "policy_loss.adapo_rate"),
    (dict(adapo_rate=0.1), "policy_loss.adapo_rate"),
    (dict(loss_mode="adapo"), "adapo_target_entropy"),
]


@pytest.mark.parametrize("keys,named", BAD_KEYS, ids=[n for _, n in BAD_KEYS])
def test_bad_config_keys_fail_when_verl_builds_the_config(keys, named):
    with pytest.raises((ValueError, TypeError), match=re.escape(named)):
        fverl.PolicyLossConfig(**{"loss_mode": "repo", **keys})


def test_options_from_the_environment(monkeypatch):
    monkeypatch.setenv(fverl.ENV_OPTIONS, json.dumps({"repo": "fixed", "repo_coef": 0.3}))
    fverl.register()
    logp, old, adv, mask, _ = batch(seed=5)
    loss, _, _ = run(core_algos.get_policy_loss_fn("repo"), logp, old, adv, mask, "token-mean", actor_config(), None)
    ref = policy_loss_ref(logp, adv, old, mask, eps_low=0.2, eps_high=0.2, dual_clip=3.0, repo="fixed", repo_coef=0.3,
                          repo_stats=behaviour_stats(old, adv, mask))
    assert_close("loss with options from the environment", ref.loss, loss, atol=1e-12, rtol=1e-12)
    for raw, named in ((json.dumps({"repo_cof": 0.3}), "repo_cof"), (json.dumps({"repo_coef": -1}), "repo_coef"),
                       ("{repo: fixed}", "not valid JSON"), ("[1, 2]", "JSON object")):
        monkeypatch.setenv(fverl.ENV_OPTIONS, raw)
        with pytest.raises(ValueError, match=f"FUSED_PG_VERL_OPTIONS.*{re.escape(named)}"):
            fverl.register()


def test_register_resets_to_the_documented_defaults():
    fverl.register(repo="fixed", repo_coef=0.3, adapo_target_entropy=2.0)
    fverl.register()
    options = fverl._default_options
    assert options.loss == fused_pg.LossConfig() and options.controller_kind is None and options.validate is None
    with pytest.raises(ValueError, match=r"register\(repo_coef=...\)"):
        fverl.register(repo_coef=2.0)


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
    with pytest.raises(ValueError, match="adapo_target_entropy"):
        run(core_algos.get_policy_loss_fn("adapo"), logp, old, adv, mask, "token-mean", actor_config(), None)
    with pytest.raises(ValueError, match="train_batch"):  # ADAPO needs verl's optimiser steps
        run(core_algos.get_policy_loss_fn("adapo"), logp, old, adv, mask, "token-mean",
            actor_config(adapo_loss_config()), None)


# ---------------------------------------------------------------------------------------------
# loud failure when verl changes
# ---------------------------------------------------------------------------------------------

padding_module = sys.modules["verl.workers.utils.padding"]
RENAMES = {
    "BaseEngine.train_batch": (engine_base.BaseEngine, "train_batch"),
    "BaseEngine.get_data_parallel_group": (engine_base.BaseEngine, "get_data_parallel_group"),
    "BaseEngine.save_checkpoint": (engine_base.BaseEngine, "save_checkpoint"),
    "BaseEngine.load_checkpoint": (engine_base.BaseEngine, "load_checkpoint"),
    "EngineRegistry.new": (engine_base.EngineRegistry, "new"),
    "no_padding_2_padding": (padding_module, "no_padding_2_padding"),
    "register_policy_loss": (core_algos, "register_policy_loss"),
    "get_policy_loss_fn": (core_algos, "get_policy_loss_fn"),
}


@pytest.mark.parametrize("internal", list(RENAMES))
def test_a_renamed_verl_internal_fails_at_set_up(internal, monkeypatch):
    owner, attr = RENAMES[internal]
    monkeypatch.delattr(owner, attr)
    if isinstance(owner, type):  # a subclass still defining it is not enough: the base class's is used
        pass
    monkeypatch.setitem(fverl._hook, "installed", False)
    with pytest.raises(_common.TrainerChanged, match=rf"verl {re.escape(_common.trainer_version('verl'))}.*{attr}"):
        fverl.register()


def test_a_changed_verl_signature_or_body_fails_at_set_up(monkeypatch):
    monkeypatch.setitem(fverl._hook, "installed", False)
    monkeypatch.setattr(engine_base.BaseEngine, "train_batch", lambda self, batch, loss_fn: None)
    with pytest.raises(_common.TrainerChanged, match=r"train_batch has parameters \('batch', 'loss_fn'\)"):
        fverl.register()
    monkeypatch.setattr(engine_base.BaseEngine, "train_batch", lambda self, data, loss_function: None)
    with pytest.raises(_common.TrainerChanged, match="no longer uses forward_backward_batch"):
        fverl.register()


def test_the_version_guard_and_the_environment_are_checked_on_import():
    """An untested verl version and malformed options in the environment fail the import, naming
    the version / the variable (one fresh interpreter, two imports)."""
    code = f"""
import importlib.metadata as m, os
real = m.version
m.version = lambda p: "0.10.0" if p == "verl" else real(p)
try:
    import fused_pg.integrations.verl
except ImportError as e:
    print("VERSION", e)
m.version = real
os.environ["{fverl.ENV_OPTIONS}"] = "{{'repo': 'fixed'}}"
try:
    import fused_pg.integrations.verl
except ValueError as e:
    print("ENV", e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT),
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.startswith(("VERSION", "ENV")))
    assert "verl>=0.9,<0.10" in lines.get("VERSION", "") and "found verl 0.10.0" in lines["VERSION"], out
    assert "$FUSED_PG_VERL_OPTIONS is not valid JSON" in lines.get("ENV", ""), out


# ---------------------------------------------------------------------------------------------
# the recipe
# ---------------------------------------------------------------------------------------------

RECIPE = ROOT / "examples" / "verl_repo_grpo.sh"


def recipe_overrides() -> dict[str, str]:
    text = RECIPE.read_text()
    command = text[text.index("python3 -m verl.trainer.main_ppo"):]
    return dict(re.findall(r"^\s+(\+?[\w.]+)=(\S+?)\s*\\?$", command, flags=re.M))


def test_the_verl_recipe_uses_verls_keys_and_builds_fused_pgs_section():
    """Every override of the recipe names a key of verl's own trainer configuration (``+`` keys:
    fused-pg's, which verl's config does not have); its policy_loss section, built the way hydra
    builds it (import ``_target_``, call it with the other keys), is fused-pg's config with the
    recipe's options, and verl's ActorConfig takes it."""
    from omegaconf import OmegaConf

    overrides = recipe_overrides()
    assert len(overrides) > 20
    verl_config = OmegaConf.load(Path(core_algos.__file__).parents[1] / "config" / "_generated_ppo_trainer.yaml")
    section = dict(OmegaConf.to_container(verl_config.actor_rollout_ref.actor.policy_loss, resolve=True))
    for key, value in overrides.items():
        if key.startswith("+"):
            assert key.startswith("+actor_rollout_ref.actor.policy_loss."), key
            name = key.rsplit(".", 1)[1]
            assert name in fverl.OPTION_KEYS and name not in section, key
            section[name] = value
        else:
            parent, _, last = key.rpartition(".")
            assert last in OmegaConf.select(verl_config, parent).keys(), f"verl has no key {key}"
            if key.startswith("actor_rollout_ref.actor.policy_loss."):
                section[key.rsplit(".", 1)[1]] = value
    target = section.pop("_target_")
    module, _, name = target.rpartition(".")
    cls = getattr(__import__(module, fromlist=[name]), name)
    section.pop("rollout_correction", None)
    typed = {k: (float(v) if k == "repo_coef" else v) for k, v in section.items()}
    built = cls(**typed)
    assert isinstance(built, fverl.PolicyLossConfig) and built.loss_mode == "repo"
    assert built.fused_pg_options().loss.repo == "decorrelate"
    assert actor_config(built).policy_loss is built
