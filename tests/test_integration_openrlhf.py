"""fused_pg.integrations.openrlhf against the installed OpenRLHF.

* ``PolicyLoss`` against OpenRLHF's own ``PolicyLoss``, in fp64: every policy_loss_type,
  token_level_loss, dual clip, data-parallel normalisers and every valid train / rollout
  correction (level x mode x gating); REPO against the oracle.
* OpenRLHF's training loop as it runs: the real ``ActorPPOTrainer`` (its ``__init__``,
  ``ppo_train`` and ``training_step``, its replay buffer and ``iter_grad_accum_global_norm``)
  after :func:`install`, with a tiny CPU actor and a stand-in for the DeepSpeed strategy (backward
  scaled by 1 / gradient-accumulation steps as DeepSpeed does, the optimiser step recorded). With
  it: REPO's gradient is the same for 1, 2 and 4 micro-batches per optimiser step and on 2
  data-parallel gloo ranks; ADAPO steps once per optimiser step; its state goes into the actor's
  DeepSpeed checkpoint through OpenRLHF's real ``save_ckpt`` / ``load_ckpt`` and a resume
  continues its trajectory.
* Loud failure: each OpenRLHF internal install() relies on, renamed, raises; the launcher's
  options are checked; OpenRLHF's CLI parses the recipe ``examples/openrlhf_repo.sh`` and calls
  ``ray.init`` with fused-pg's worker setup hook.

OpenRLHF's Ray actor and CLI modules import deepspeed, vLLM, flash-attn, ... at module level:
they are imported with empty stand-ins for the packages this CPU environment lacks
(tests/helpers/stand_ins.py); OpenRLHF's own code is the installed one.

Loading OpenRLHF's loss module: ``openrlhf/models/__init__.py`` imports the actor, which needs
flash-attn (CUDA only), so the real ``models/loss.py`` and ``models/utils.py`` are loaded as a
private package without that ``__init__``. ``models/utils.py`` imports deepspeed at the top and
never uses it in the functions under test (``masked_mean``); without deepspeed installed, an empty
module stands in for that one import and is removed again right after loading.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import types
from pathlib import Path

import pytest
import torch

import fused_pg
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
    m = mask.bool()  # a call of its own is its own mini-batch: the statistics of its behaviour log-probs
    lp_old, a = old[m], adv[m]
    stats = types.SimpleNamespace(mean_logprob=lp_old.mean(), var_logprob=((lp_old - lp_old.mean()) ** 2).mean(),
                                  cov_adv_logprob=((a - a.mean()) * (lp_old - lp_old.mean())).mean())
    ref = policy_loss_ref(lp, adv, old, mask, eps_low=0.2, eps_high=0.28, dual_clip=3.0, repo="decorrelate",
                          repo_coef=0.5, num_items_in_batch=20.0, repo_stats=stats)
    (g_ref,) = torch.autograd.grad(ref.loss, [lp])
    assert_close("REPO loss via OpenRLHF's signature", ref.loss, loss, atol=1e-12, rtol=1e-12)
    assert_close("REPO d/dlogp", g_ref, grad, atol=1e-12, rtol=1e-12)
    assert float(module.metrics["repo_zeta"]) != 0.0


def test_adapo_controller_sets_the_clip_range_and_steps_when_told():
    """Outside OpenRLHF's loop: training calls observe the surprisal, update_controller() steps."""
    ctrl = AdaptiveClip(target_entropy=4.0, eps_low=0.2, eps_high=0.28, rate=0.02)
    module = PolicyLoss(repo="none", controller=ctrl)
    windows = []
    for i in range(6):
        logp, old, rollout, adv, mask = batch(seed=30 + i)
        eps = ctrl.eps_high
        run(module, logp, old, adv, mask, None)
        assert float(module.metrics["eps_high"]) == eps
        windows.append(((-old * mask).sum().item(), mask.sum().item()))
        if i % 3 == 2:
            module.update_controller()
    expected = 0.28
    for w in (windows[:3], windows[3:]):
        expected += 0.02 * (4.0 - sum(a for a, _ in w) / sum(b for _, b in w))
    assert ctrl.steps == 2 and ctrl.eps_high == pytest.approx(expected, rel=1e-12)
    built = PolicyLoss(controller=lambda low, high: AdaptiveClip(target_entropy=1.0, eps_low=low, eps_high=high),
                       clip_eps_high=0.3)
    assert built.controller.eps_high == 0.3


def test_errors_name_the_option():
    with pytest.raises(ValueError, match="policy_loss_type"):
        PolicyLoss(policy_loss_type="cispo")
    with pytest.raises(ValueError, match="dual_clip"):
        PolicyLoss(dual_clip=0.5)
    with pytest.raises(ValueError, match="is_correction_mode=clip"):
        PolicyLoss(is_correction_level="seq", is_correction_mode="clip")
    with pytest.raises(ValueError, match="eps_low"):  # the clip range is checked at construction
        PolicyLoss(clip_eps_low=1.0)
    with pytest.raises(ValueError, match="repo_coef"):
        PolicyLoss(repo="decorrelate", repo_coef=2.0)
    with pytest.raises(TypeError, match="controller"):
        PolicyLoss(controller="adapo")
    for threshold in ((), (1.0, 2.0, 3.0), (2.0, 1.0), ("a",), (-1.0, 2.0)):
        with pytest.raises(ValueError, match="is_correction_threshold"):
            PolicyLoss(is_correction_level="token", is_correction_threshold=threshold)
    logp, old, rollout, adv, mask = batch()
    with pytest.raises(ValueError, match="rollout_log_probs"):
        PolicyLoss(is_correction_level="token")(logp, old, adv, mask)
    for dp_size in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="dp_size"):
            PolicyLoss()(logp, old, adv, mask, dp_size=dp_size, batch_num_tokens=10.0)


def test_a_single_correction_threshold_is_an_upper_bound():
    """One value, as OpenRLHF's CLI reads --algo.advantage.is_correction_threshold HIGH: [0, HIGH]."""
    logp, old, rollout, adv, mask = batch(seed=9)
    kw = dict(is_correction_level="token", is_correction_gating="tv")
    one = run(PolicyLoss(**kw, is_correction_threshold=[0.05]), logp, old, adv, mask, rollout)
    ref = run(openrlhf_loss.PolicyLoss(**kw, is_correction_threshold=[0.0, 0.05]), logp, old, adv, mask, rollout)
    assert_close("loss with a single threshold", ref[0], one[0], atol=1e-12, rtol=1e-12)


def test_the_import_swap_alone_is_openrlhfs_loss():
    """Without fused-pg options the drop-in is OpenRLHF's loss (REPO off, no controller)."""
    logp, old, rollout, adv, mask = batch(seed=12)
    ref = run(openrlhf_loss.PolicyLoss(), logp, old, adv, mask, None)
    got = run(PolicyLoss(), logp, old, adv, mask, None)
    assert_close("default loss", ref[0], got[0], atol=1e-12, rtol=1e-12)
    assert_close("default d/dlogp", ref[1], got[1], atol=1e-12, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# OpenRLHF's training loop: the real ActorPPOTrainer after install()
# ---------------------------------------------------------------------------------------------

from helpers.stand_ins import OPENRLHF_MISSING, import_with_stand_ins, stand_ins  # noqa: E402

import fused_pg.integrations.openrlhf as fo  # noqa: E402
from fused_pg.integrations import _common  # noqa: E402

ppo_actor = import_with_stand_ins("openrlhf.trainer.ray.ppo_actor", OPENRLHF_MISSING)
strategy_module = import_with_stand_ins("openrlhf.utils.deepspeed", OPENRLHF_MISSING)
loss_utils = sys.modules["openrlhf.utils.loss_utils"]
strategy_impl = sys.modules["openrlhf.utils.deepspeed.deepspeed"]  # where DeepspeedStrategy is defined
from openrlhf.trainer.ppo_utils.experience import Experience  # noqa: E402

V = 40


@pytest.fixture
def installed(monkeypatch):
    """install() with its patches undone after the test; CUDA-only calls of OpenRLHF's loop on CPU."""
    for owner, name in ((ppo_actor, "PolicyLoss"), (ppo_actor, "iter_grad_accum_global_norm"),
                        (ppo_actor.ActorPPOTrainer, "__init__"), (strategy_module.DeepspeedStrategy, "save_ckpt"),
                        (strategy_module.DeepspeedStrategy, "load_ckpt")):
        monkeypatch.setattr(owner, name, getattr(owner, name))
    monkeypatch.setitem(fo._INSTALLED, "options", None)
    monkeypatch.setattr(fo, "_ACTOR_LOSSES", {})
    monkeypatch.setattr(fo, "_LOADED", {})
    # OpenRLHF synchronises CUDA at construction and moves experiences to the current CUDA device
    monkeypatch.setattr(ppo_actor, "torch_dist_barrier_and_cuda_sync", lambda: None)
    monkeypatch.setattr(strategy_impl, "torch_dist_barrier_and_cuda_sync", lambda: None)
    return fo.install


class Engine(torch.nn.Module, strategy_impl.deepspeed.DeepSpeedEngine):
    """The actor's model as DeepSpeed wraps it: a tiny LM with DeepSpeed's checkpoint methods."""

    def __init__(self):
        torch.nn.Module.__init__(self)
        torch.manual_seed(0)
        self.embed, self.head = torch.nn.Embedding(V, 8), torch.nn.Linear(8, V)

    def forward(self, ids):
        return self.head(torch.tanh(self.embed(ids)))

    def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest=True):
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        torch.save({"model": self.state_dict(), "client": client_state}, os.path.join(save_dir, tag, "ckpt.pt"))

    def load_checkpoint(self, load_dir, tag=None, **kwargs):
        path = os.path.join(load_dir, tag, "ckpt.pt")
        saved = torch.load(path, weights_only=False)
        self.load_state_dict(saved["model"])
        return path, saved["client"]


class Actor(torch.nn.Module):
    """OpenRLHF's Actor interface: (action log-probs, output) for the last A tokens."""

    def __init__(self):
        super().__init__()
        self.model = Engine()

    def forward(self, sequences, action_mask, attention_mask=None, return_output=False, **kwargs):
        logp = torch.log_softmax(self.model(sequences).double(), -1)[:, :-1]
        logp = logp.gather(-1, sequences[:, 1:, None]).squeeze(-1)[:, -action_mask.shape[1]:]
        return logp, types.SimpleNamespace(entropy=None)


def ns(**kw):
    return types.SimpleNamespace(**kw)


class Strategy:
    """What ActorPPOTrainer uses of OpenRLHF's DeepspeedStrategy: its args, DeepSpeed's 1 / gas
    scaling of each backward, one optimiser step per gas micro-batches (recorded)."""

    def __init__(self, gas, loss_type="ppo", token_level=True):
        self.accumulated_gradient, self.ring_attn_group, self.ds_device_mesh = gas, None, None
        self.args = ns(
            train=ns(max_epochs=1, dynamic_batch_enable=False, colocate_all=False, async_enable=False),
            actor=ns(eps_clip_low_high=(0.2, 0.28), dual_clip=None, policy_loss_type=loss_type, aux_loss_coef=0.0,
                     loss_agg_mode="token-mean" if token_level else "seq-mean-token-mean", entropy_coef=None),
            algo=ns(advantage=ns(is_correction_level="off", is_correction_mode="mask", is_correction_gating="ratio",
                                 is_correction_threshold=[0.5, 5.0]), kl=ns(use_loss=False)),
            ds=ns(packing_samples=False, tensor_parallel_size=1), vllm=ns(sync_backend="nccl"))
        self.grads, self.calls = [], 0

    def backward(self, loss, model, optimizer):
        (loss / self.accumulated_gradient).backward()

    def optimizer_step(self, optimizer, model, scheduler, name=None):
        self.calls += 1
        if self.calls % self.accumulated_gradient == 0:
            self.grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
            model.zero_grad()

    def all_reduce(self, data):
        return data

    def is_rank_0(self):
        return True

    def get_grad_norm(self, model):
        return 0.0

    def print(self, *args):
        pass


def experiences(n=8, seed=0, prompt=3, actions=5):
    """A rollout: sequences of prompt + actions, behaviour log-probs (the actor's, perturbed: an
    off-policy batch), per-sequence advantages."""
    g = torch.Generator().manual_seed(seed)
    sequences = torch.randint(1, V, (n, prompt + actions), generator=g)
    mask = torch.zeros(n, actions, dtype=torch.bool)
    for i in range(n):
        mask[i, :int(torch.randint(1, actions + 1, (1,), generator=g))] = True
    with torch.no_grad():
        logp, _ = Actor()(sequences, mask)
    return Experience(sequences=sequences, attention_mask=torch.ones_like(sequences), action_mask=mask,
                      action_log_probs=logp + 0.3 * torch.randn(n, actions, generator=g, dtype=torch.float64),
                      advantages=torch.randn(n, 1, generator=g, dtype=torch.float64).expand(n, actions).contiguous(),
                      info={})


def trainer(strategy, micro, actor=None):
    """OpenRLHF's ActorPPOTrainer as PolicyModelActor builds it (the CUDA device id is only read)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "current_device", lambda: 0)
        return ppo_actor.ActorPPOTrainer(strategy, actor or Actor(), None, None, ns(get_last_lr=lambda: [0.0]),
                                         micro_train_batch_size=micro)


def ppo_train(t, data):
    t.replay_buffer.append(data)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "current_device", lambda: "cpu")
        torch.manual_seed(0)  # the replay buffer's shuffle
        t.ppo_train(0.0)
    t.replay_buffer.clear()


def rel_diff(a: dict, b: dict) -> float:
    return math.sqrt(sum(float((a[n] - b[n]).norm()) ** 2 for n in b)) / math.sqrt(
        sum(float(b[n].norm()) ** 2 for n in b))


REPO_MODES = {
    "relative": dict(repo="relative", repo_coef=0.5),
    "relative-negative-uncentred": dict(repo="relative", repo_coef=-0.5, repo_center="none"),
    "decorrelate-uncentred": dict(repo="decorrelate", repo_center="none"),
    "fixed": dict(repo="fixed", repo_coef=0.5),
    "fixed-uncentred": dict(repo="fixed", repo_coef=0.5, repo_center=False),
    "decorrelate": dict(repo="decorrelate"),
    "decorrelate-0.6-uncentred": dict(repo="decorrelate", repo_coef=0.6, repo_center=False),
}


@pytest.mark.parametrize("loss_type,token_level", [("ppo", True), ("ppo", False), ("gspo", False)])
@pytest.mark.parametrize("repo", list(REPO_MODES))
def test_repo_gradient_does_not_depend_on_the_micro_batch_size(repo, loss_type, token_level, installed):
    """One optimiser step over 8 sequences with --train.micro_batch_size 8, 4, 2 (1, 2, 4
    micro-batches): the same gradient (1e-6 relative)."""
    installed(**REPO_MODES[repo])
    grads = []
    for micro in (8, 4, 2):
        strategy = Strategy(8 // micro, loss_type, token_level)
        ppo_train(trainer(strategy, micro), experiences())
        assert len(strategy.grads) == 1
        grads.append(strategy.grads[0])
    for micro, g in zip((4, 2), grads[1:]):
        assert rel_diff(g, grads[0]) <= 1e-6, f"{repo}: micro-batches of {micro} move the gradient by " \
                                              f"{rel_diff(g, grads[0]):.2e}"
    fo.install(repo="none")
    strategy = Strategy(1, loss_type, token_level)
    ppo_train(trainer(strategy, 8), experiences())
    assert rel_diff(grads[0], strategy.grads[0]) > 1e-3  # REPO acted


def _dp_job(repo):
    def job(rank, world):
        fo.install(**REPO_MODES[repo])
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ppo_actor, "torch_dist_barrier_and_cuda_sync", lambda: None)
            data = experiences()
            half = 8 // world
            part = Experience(**{k: (v[rank * half:(rank + 1) * half] if torch.is_tensor(v) else v)
                                 for k, v in vars(data).items()})
            strategy = Strategy(2)
            ppo_train(trainer(strategy, 2), part)
        return strategy.grads[0]
    return job


def test_repo_gradient_is_the_same_on_two_data_parallel_ranks(installed):
    """Two gloo ranks with 4 sequences each (2 micro-batches each): the mean of their gradients
    (DeepSpeed averages over ranks) is one process's gradient on all 8."""
    from helpers.multiproc import run_group

    repos = ["fixed", "decorrelate", "decorrelate-0.6-uncentred"]
    results = run_group(2, [(r, _dp_job(r)) for r in repos])
    for repo in repos:
        installed(**REPO_MODES[repo])
        strategy = Strategy(2)
        ppo_train(trainer(strategy, 4), experiences())
        mean = {n: (results[0][repo][n] + results[1][repo][n]) / 2 for n in strategy.grads[0]}
        assert rel_diff(mean, strategy.grads[0]) <= 1e-6, repo


ADAPO = dict(repo="none", adapo_target_entropy=4.0, adapo_rate=0.02)


def surprisal_steps(batches, eps_high=0.28):
    out = []
    for data in batches:
        m = data.action_mask
        eps_high += 0.02 * (4.0 - float((-data.action_log_probs[m]).mean()))
        out.append(eps_high)
    return out


class CkptStrategy(strategy_module.DeepspeedStrategy):
    """OpenRLHF's DeepspeedStrategy for its real save_ckpt / load_ckpt, on one process."""

    def __init__(self):
        pass

    def is_rank_0(self):
        return True

    def print(self, *args):
        pass


def test_adapo_steps_once_per_optimiser_step_and_resumes_from_the_deepspeed_checkpoint(installed, tmp_path):
    installed(**ADAPO)
    batches = [experiences(seed=s) for s in (1, 2, 3)]
    expected = surprisal_steps(batches)
    t = trainer(Strategy(4), 2)  # 4 micro-batches per optimiser step
    trajectory = []
    for i, data in enumerate(batches):
        ppo_train(t, data)
        trajectory.append(t.actor_loss_fn.controller.eps_high)
        if i == 0:
            CkptStrategy().save_ckpt(t.actor.model, str(tmp_path), "global_step1", client_state={"consumed": 8})
    assert t.actor_loss_fn.controller.steps == 3
    assert trajectory == pytest.approx(expected, rel=1e-12)
    saved = torch.load(tmp_path / "global_step1" / "ckpt.pt", weights_only=False)["client"]
    assert saved["consumed"] == 8 and saved[fo.CLIENT_STATE_KEY]["steps"] == 1

    # a new actor process resumes: load_ckpt, then the trainer is built (as PolicyModelActor does)
    installed(**ADAPO)
    actor = Actor()
    CkptStrategy().load_ckpt(actor.model, str(tmp_path), "global_step1")
    t = trainer(Strategy(4), 2, actor)
    resumed = []
    for data in batches[1:]:
        ppo_train(t, data)
        resumed.append(t.actor_loss_fn.controller.eps_high)
    assert resumed == trajectory[1:]

    # a checkpoint without the controller's state is refused, unless restarting it is asked for
    torch.save({"model": actor.model.state_dict(), "client": {"consumed": 8}},
               tmp_path / "global_step1" / "ckpt.pt")
    for fresh in (False, True):
        installed(**ADAPO, controller_fresh_start=fresh)
        actor = Actor()
        CkptStrategy().load_ckpt(actor.model, str(tmp_path), "global_step1")
        if fresh:
            assert trainer(Strategy(4), 2, actor).actor_loss_fn.controller.steps == 0
        else:
            with pytest.raises(ValueError, match="controller_fresh_start"):
                trainer(Strategy(4), 2, actor)


def test_the_repo_controller_steps_repo_coef_once_per_optimiser_step(installed):
    """REPO-R with the multiplicative REPO controller: below its target, zeta doubles at each
    optimiser step (whatever the number of micro-batches); the loss used the value before."""
    installed(repo="relative", repo_coef=0.01, repo_control_target_entropy=9.0, repo_control_mode="multiplicative")
    t = trainer(Strategy(4), 2)
    zetas = []
    for seed in (1, 2):
        ppo_train(t, experiences(seed=seed))
        zetas.append(float(t.actor_loss_fn.metrics["repo_zeta"]))
    ctrl = t.actor_loss_fn.controller
    assert isinstance(ctrl, fused_pg.AdaptiveRepoCoef) and ctrl.steps == 2
    assert zetas == pytest.approx([0.01, 0.02]) and ctrl.repo_coef == pytest.approx(0.04)
    assert {"entropy_drive", "clip_high_p_mean", "rollout_phantom_clip_frac"} <= set(t.actor_loss_fn.metrics)


def test_options_openrlhf_cannot_serve_are_refused(installed):
    """The per-state centre needs entropies, which OpenRLHF does not give its loss. (And without
    options install() gives OpenRLHF's own loss.)"""
    installed()
    assert ppo_actor.PolicyLoss().config.repo == "none" and ppo_actor.PolicyLoss().controller is None
    with pytest.raises(ValueError, match="repo_center='state'"):
        PolicyLoss(repo="fixed", repo_center="state")
    with pytest.raises(ValueError, match="repo_center='state'"):
        installed(repo="relative", repo_center="state")
    with pytest.raises(ValueError, match="one controller at a time"):
        installed(repo="fixed", adapo_target_entropy=1.0, repo_control_target_entropy=1.0)
    with pytest.raises(ValueError, match="repo_control_target_entropy.*repo != 'none'"):
        installed(repo_control_target_entropy=1.0)


def test_dynamic_batching_is_refused_with_repo_statistics(installed):
    installed(repo="decorrelate")
    strategy = Strategy(1)
    strategy.args.train.dynamic_batch_enable = True
    t = trainer(strategy, 8)
    logp, old, _, adv, mask = batch(seed=3)
    with pytest.raises(ValueError, match="dynamic_batch_enable"):
        t.actor_loss_fn(logp.clone().requires_grad_(), old, adv, action_mask=mask)


# ---------------------------------------------------------------------------------------------
# loud failure when OpenRLHF changes; options; the launcher and the recipe
# ---------------------------------------------------------------------------------------------

RENAMES = {
    "ppo_actor.PolicyLoss": (ppo_actor, "PolicyLoss"),
    "ppo_actor.iter_grad_accum_global_norm": (ppo_actor, "iter_grad_accum_global_norm"),
    "ActorPPOTrainer.ppo_train": (ppo_actor.ActorPPOTrainer, "ppo_train"),
    "ActorPPOTrainer": (ppo_actor, "ActorPPOTrainer"),
    "DeepspeedStrategy.save_ckpt": (strategy_module.DeepspeedStrategy, "save_ckpt"),
    "DeepspeedStrategy.load_ckpt": (strategy_module.DeepspeedStrategy, "load_ckpt"),
    "loss_utils._get_dp_group": (loss_utils, "_get_dp_group"),
}


@pytest.mark.parametrize("internal", list(RENAMES))
def test_a_renamed_openrlhf_internal_fails_at_install(internal, installed, monkeypatch):
    owner, attr = RENAMES[internal]
    monkeypatch.delattr(owner, attr)
    with pytest.raises(_common.TrainerChanged, match=rf"openrlhf.*{attr}"):
        installed(repo="decorrelate")
    assert fo._INSTALLED["options"] is None


def test_a_changed_openrlhf_signature_or_body_fails_at_install(installed, monkeypatch):
    monkeypatch.setattr(ppo_actor, "iter_grad_accum_global_norm", lambda items, strategy, gas, mask_fn: None)
    with pytest.raises(_common.TrainerChanged, match="iter_grad_accum_global_norm has parameters"):
        installed()
    monkeypatch.undo()
    monkeypatch.setattr(ppo_actor.ActorPPOTrainer, "ppo_train", lambda self, kl_ctl: None)
    with pytest.raises(_common.TrainerChanged, match="no longer uses iter_grad_accum_global_norm"):
        installed()


def test_options_are_checked_where_given(monkeypatch):
    with pytest.raises(ValueError, match=r"--fused_pg\.repo_coef"):
        fo.parse_args(["--fused_pg.repo", "decorrelate", "--fused_pg.repo_coef", "1.5"])
    with pytest.raises(ValueError, match=r"--fused_pg\.adapo_rate"):
        fo.parse_args(["--fused_pg.adapo_target_entropy", "1.0", "--fused_pg.adapo_rate", "-1"])
    with pytest.raises(SystemExit, match="--fused_pg.repo_cof"):
        fo.parse_args(["--fused_pg.repo_cof", "0.3"])
    with pytest.raises(ValueError, match=r"install\(repo=...\)"):
        fo.install(repo="decorelate")
    monkeypatch.setenv(fo.ENV_OPTIONS, "{repo: 1}")
    with pytest.raises(ValueError, match="FUSED_PG_OPENRLHF_OPTIONS is not valid JSON"):
        fo.setup_worker()
    options, rest = fo.parse_args(["--actor.eps_clip", "0.2", "--fused_pg.repo", "fixed", "--fused_pg.repo_coef",
                                   "0.3", "--fused_pg.controller_fresh_start"])
    assert options == dict(repo="fixed", repo_coef=0.3, controller_fresh_start=True)
    assert rest == ["--actor.eps_clip", "0.2"]


RECIPE = Path(__file__).resolve().parents[1] / "examples" / "openrlhf_repo.sh"


def test_the_openrlhf_recipe_runs_up_to_ray_init(monkeypatch):
    """The recipe's command line through fused-pg's launcher: fused-pg's flags are checked and
    removed, OpenRLHF's real CLI parses and validates the rest, and its ray.init gets fused-pg's
    worker setup hook and options (where this test stops: the run itself needs GPUs)."""
    import runpy
    import shlex

    import ray

    text = RECIPE.read_text()
    line = next(x for x in text.splitlines() if x.startswith("python3 -m fused_pg.integrations.openrlhf"))
    argv = [a.replace("$MODEL", "Qwen/Qwen2.5-0.5B-Instruct").replace("$DATA", "prompts.jsonl")
            .replace("$REWARD_URL", "http://127.0.0.1:5000/get_reward").replace("$CKPT", "/tmp/ckpt")
            for a in shlex.split(line)[3:] if a != "$@"]
    calls = []

    class Stop(Exception):
        pass

    def ray_init(*args, **kwargs):
        calls.append(kwargs)
        raise Stop

    monkeypatch.setattr(ray, "init", ray_init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    real_run_module = runpy.run_module

    def run_module(name, **kwargs):  # OpenRLHF's CLI imports deepspeed, vLLM, ...: stand-ins here
        with stand_ins(OPENRLHF_MISSING):
            return real_run_module(name, **kwargs)

    monkeypatch.setattr(runpy, "run_module", run_module)
    with pytest.raises(Stop):
        fo.main(argv)
    (kwargs,) = calls
    env = kwargs["runtime_env"]
    assert env["worker_process_setup_hook"] == "fused_pg.integrations.openrlhf.setup_worker"
    assert json.loads(env["env_vars"][fo.ENV_OPTIONS]) == {"repo": "decorrelate", "repo_coef": 1.0}
    assert "TOKENIZERS_PARALLELISM" in env["env_vars"]  # OpenRLHF's own runtime_env is kept
    assert sys.argv[1:] == [a for a in argv if not a.startswith("--fused_pg") and a not in ("decorrelate", "1.0")]
