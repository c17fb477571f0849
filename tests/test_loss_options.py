"""Loss options beyond the property tests (which draw them all against the oracle): options as
values (LossConfig / HeadConfig, keyword overrides checked by name, RepoLoss), presets (an
explicit value always wins, None included), verl's k3-only KL clamp, the preset Dr.GRPO length,
per-term normalisers by hand, per-token weights, errors that name the argument, and
``import fused_pg`` needing no trainer package.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import fused_pg
from fused_pg.config import PRESETS, LossConfig
from fused_pg.reference.loss import policy_loss_ref
from helpers import assert_close


def _inputs(seed=0, B=3, T=6):
    g = torch.Generator().manual_seed(seed)
    lp = (-3 * torch.rand(B, T, generator=g, dtype=torch.float64)).requires_grad_()
    old = (lp.detach() + 0.6 * (2 * torch.rand(B, T, generator=g, dtype=torch.float64) - 1)).clamp(max=0)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) < 0.8
    return lp, old, adv, mask


# ---------------------------------------------------------------------------------------------
# presets
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_sets_the_trainer_defaults_and_explicit_values_win(preset):
    cfg = LossConfig.preset(preset)
    for name, value in PRESETS[preset].items():
        want = value(dict(kl_estimator=cfg.kl_estimator)) if callable(value) else value
        if name == "max_length" and "seq-mean-token-sum-norm" not in cfg.modes:
            want = None
        assert getattr(cfg, name) == want, (preset, name)
    assert cfg.repo == "decorrelate"  # presets never touch REPO
    explicit = LossConfig.preset(preset, eps_high=0.33, dual_clip=None, aggregation="token-sum")
    assert explicit.eps_high == 0.33 and explicit.dual_clip is None and explicit.aggregation == "token-sum"


def test_presets_by_hand():
    verl = LossConfig.preset("verl")
    assert (verl.eps_low, verl.eps_high, verl.dual_clip, verl.aggregation, verl.kl_estimator, verl.kl_clamp) == \
        (0.2, 0.2, 3.0, "token-mean", "k3", 10.0)
    assert LossConfig.preset("verl", kl_estimator="k1").kl_clamp is None  # verl clamps k3 only
    assert LossConfig.preset("verl", kl_estimator="k3+").kl_clamp == 10.0
    dr = LossConfig.preset("trl-dr-grpo")
    assert (dr.aggregation, dr.max_length, dr.eps_high) == ("seq-mean-token-sum-norm", 512, 0.2)
    assert LossConfig.preset("trl-dr-grpo", aggregation="token-mean").max_length is None
    assert LossConfig.preset("trl-luspo").importance_level == "sequence"
    o = LossConfig.preset("openrlhf")
    assert (o.dual_clip, o.kl_estimator, o.kl_clamp) == (None, "k1", 10.0)
    assert LossConfig().eps_high == 0.28  # the library default without a preset


def test_preset_through_the_loss_matches_the_oracle_and_the_explicit_options():
    lp, old, adv, mask = _inputs()
    ref_lp = (lp.detach() - 25 * torch.rand(lp.shape, generator=torch.Generator().manual_seed(2),
                                            dtype=torch.float64)).clamp(max=0)
    kw = dict(ref_logprobs=ref_lp, kl_coef=0.1, repo="none", validate=False)
    a = fused_pg.policy_loss_from_logprobs(lp, adv, old, mask, preset="verl", **kw)
    b = fused_pg.policy_loss_from_logprobs(lp, adv, old, mask, eps_low=0.2, eps_high=0.2, dual_clip=3.0,
                                           kl_estimator="k3", kl_clamp=10.0, **kw)
    c = policy_loss_ref(lp, adv, old, mask, preset="verl", **{k: v for k, v in kw.items() if k != "validate"})
    assert torch.equal(a.loss, b.loss)
    assert_close("preset verl vs oracle", c.loss, a.loss, atol=1e-12, rtol=1e-12)
    assert float(a.metrics["kl_mean"]) < float(fused_pg.policy_loss_from_logprobs(
        lp, adv, old, mask, preset="verl", kl_clamp=None, **kw).metrics["kl_mean"])  # the clamp bit


def test_unknown_preset_is_named():
    lp, old, adv, mask = _inputs()
    with pytest.raises(ValueError, match="preset"):
        fused_pg.policy_loss_from_logprobs(lp, adv, old, mask, preset="trl")


# ---------------------------------------------------------------------------------------------
# options as values: configs, keyword overrides, RepoLoss
# ---------------------------------------------------------------------------------------------

def _head_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(30, 8, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 30, (2, 5), generator=g)
    adv = torch.randn(2, generator=g, dtype=torch.float64)
    old = -torch.rand(2, 5, generator=g, dtype=torch.float64) - 1.0
    return h, W, y, adv, old


def test_config_values_and_keyword_overrides_are_the_same_call():
    from fused_pg import HeadConfig

    h, W, y, adv, old = _head_batch()
    kw = fused_pg.repo_loss(h, W, y, adv, old, eps_high=0.4, repo="fixed", repo_coef=0.3, temperature=0.7,
                            vocab_chunk=7)
    cfg = fused_pg.repo_loss(h, W, y, adv, old, config=LossConfig(eps_high=0.4, repo="fixed", repo_coef=0.3),
                             head=HeadConfig(temperature=0.7, vocab_chunk=7))
    mixed = fused_pg.repo_loss(h, W, y, adv, old, config=LossConfig(repo="fixed", repo_coef=0.3), eps_high=0.4,
                               head=HeadConfig(vocab_chunk=7), temperature=0.7)
    assert torch.equal(kw.loss, cfg.loss) and torch.equal(kw.loss, mixed.loss)
    default = fused_pg.repo_loss(h, W, y, adv, old, repo="fixed", repo_coef=0.3)
    assert not torch.equal(default.loss, kw.loss)  # the overrides did reach the loss


@pytest.mark.parametrize("fn,bad,near", [
    ("repo_loss", "eps_hihg", "eps_high"), ("repo_loss", "temprature", "temperature"),
    ("repo_loss", "kl_coeff", "kl_coef"), ("policy_loss_from_logprobs", "aggregaton", "aggregation"),
    ("policy_loss_from_logprobs", "temperature", None), ("fused_logprobs_entropy", "soft_cap", "softcap"),
])
def test_unknown_keywords_name_themselves_and_the_nearest_option(fn, bad, near):
    h, W, y, adv, old = _head_batch()
    call = {"repo_loss": lambda **k: fused_pg.repo_loss(h, W, y, adv, old, **k),
            "policy_loss_from_logprobs": lambda **k: fused_pg.policy_loss_from_logprobs(old, adv, **k),
            "fused_logprobs_entropy": lambda **k: fused_pg.fused_logprobs_entropy(h, W, y, **k)}[fn]
    with pytest.raises(TypeError, match=f"unexpected keyword argument '{bad}'") as err:
        call(**{bad: 1.0})
    if near is not None:
        assert f"did you mean '{near}'" in str(err.value)


def test_config_and_preset_together_are_refused():
    h, W, y, adv, old = _head_batch()
    with pytest.raises(TypeError, match="either config= or preset="):
        fused_pg.repo_loss(h, W, y, adv, old, config=LossConfig(), preset="verl")
    with pytest.raises(TypeError, match="config must be a fused_pg.LossConfig"):
        fused_pg.repo_loss(h, W, y, adv, old, config={"eps_high": 0.3})


def test_preset_keyword_equals_the_preset_value():
    h, W, y, adv, old = _head_batch()
    a = fused_pg.repo_loss(h, W, y, adv, old, preset="verl", kl_estimator="k1", repo="none")
    b = fused_pg.repo_loss(h, W, y, adv, old, config=LossConfig.preset("verl", kl_estimator="k1", repo="none"))
    assert torch.equal(a.loss, b.loss)
    with pytest.raises(TypeError, match="did you mean 'eps_high'"):
        LossConfig.preset("verl", eps_hgh=0.3)


def test_repo_loss_module_holds_options_and_checkpoints_its_controller():
    from fused_pg import AdaptiveClip, HeadConfig, RepoLoss

    h, W, y, adv, old = _head_batch()
    ctrl = AdaptiveClip(target_entropy=9.0, eps_low=0.1, eps_high=0.3)
    module = RepoLoss(LossConfig.preset("trl-dapo", repo="none"), HeadConfig(temperature=0.9), controller=ctrl)
    out = module(h, W, y, adv, old)
    want = fused_pg.repo_loss(h, W, y, adv, old, config=LossConfig.preset("trl-dapo", repo="none", eps_low=0.1,
                                                                            eps_high=0.3), temperature=0.9)
    assert torch.equal(out.loss, want.loss)
    assert module.update_controller() > 0  # entropy far below the target: eps_high rises
    state = module.state_dict()
    restored = RepoLoss(LossConfig.preset("trl-dapo", repo="none"), controller=AdaptiveClip(target_entropy=9.0))
    restored.load_state_dict(state)
    assert restored.controller.state_dict() == ctrl.state_dict()
    with pytest.raises(TypeError, match="takes \\['eps_high'\\] from the controller"):
        RepoLoss(controller=AdaptiveClip(target_entropy=1.0), eps_high=0.3)
    with pytest.raises(ValueError, match="disagree on whether there is a controller"):
        RepoLoss().load_state_dict(state)
    # in eval mode the module observes nothing
    module.eval()
    module(h, W, y, adv, old)
    with pytest.warns(fused_pg.NothingObservedWarning):
        assert module.update_controller() == 0.0


def test_options_tables_are_generated_from_the_fields():
    """The README's option and metric tables are the generated ones (each option documented once)."""
    from pathlib import Path

    from fused_pg.config import HeadConfig, options_markdown
    from fused_pg.epilogue import metrics_markdown

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for text in (options_markdown(LossConfig), options_markdown(HeadConfig), metrics_markdown()):
        assert text in readme, "README table out of date: paste the generated one\n" + text


# ---------------------------------------------------------------------------------------------
# per-term normalisers and weights, by hand
# ---------------------------------------------------------------------------------------------

def test_three_terms_with_their_own_normalisers_by_hand():
    """L = sum(pg) / 10 + kl_coef * sum(kl) / 7 - entropy_coef * sum(H) / 4, on-policy with r = 1."""
    lp = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64, requires_grad=True)
    ent = torch.tensor([[0.5, 1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, -0.5]], dtype=torch.float64)
    adv = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    out = fused_pg.policy_loss_from_logprobs(
        lp, adv, None, entropy=ent, ref_logprobs=ref, repo="none", kl_coef=0.3, kl_estimator="k1",
        entropy_coef=0.2, aggregation="token-sum", num_items_in_batch=10.0, kl_aggregation="token-sum",
        kl_num_items_in_batch=7.0, entropy_aggregation="token-sum", entropy_num_items_in_batch=4.0)
    pg = -(1.0 - 2.0 + 0.5)
    kl = (-1.0 + 1.5) + (-2.0 + 1.0) + 0.0
    want = pg / 10 + 0.3 * kl / 7 - 0.2 * 3.5 / 4
    assert_close("three terms", torch.tensor(want, dtype=torch.float64), out.loss, atol=1e-15)
    g_lp, g_ent = torch.autograd.grad(out.loss, [lp, ent])
    assert_close("d/dlogp", -adv / 10 + 0.3 / 7, g_lp, atol=1e-15)
    assert_close("d/dH", torch.full_like(ent, -0.2 / 4), g_ent, atol=1e-15)
    assert_close("kl_loss metric", torch.tensor(kl / 7, dtype=torch.float64), out.metrics["kl_loss"], atol=1e-15)
    assert_close("entropy_loss metric", torch.tensor(3.5 / 4, dtype=torch.float64), out.metrics["entropy_loss"],
                 atol=1e-15)


def test_kl_and_entropy_share_the_policy_normaliser_unless_given_their_own():
    lp, old, adv, mask = _inputs(1)
    ent = torch.rand(lp.shape, dtype=torch.float64)
    kw = dict(entropy=ent, ref_logprobs=old, kl_coef=0.2, entropy_coef=0.1, repo="none", num_items_in_batch=50.0)
    shared = fused_pg.policy_loss_from_logprobs(lp, adv, old, mask, **kw)
    same = fused_pg.policy_loss_from_logprobs(lp, adv, old, mask, kl_num_items_in_batch=50.0,
                                              entropy_num_items_in_batch=50.0, **kw)
    own = fused_pg.policy_loss_from_logprobs(lp, adv, old, mask, kl_aggregation="token-mean",
                                             entropy_aggregation="token-mean", **kw)  # local count
    n = int(mask.sum())
    assert_close("shared", same.loss, shared.loss, atol=1e-14)
    assert_close("kl_loss, local count", shared.metrics["kl_loss"] * 50 / n, own.metrics["kl_loss"], atol=1e-14)


def test_weights_multiply_the_policy_term_only():
    lp, old, adv, mask = _inputs(2)
    w = torch.rand(lp.shape, dtype=torch.float64)
    kw = dict(ref_logprobs=old, kl_coef=0.5, repo="none")
    a = fused_pg.policy_loss_from_logprobs(lp, adv, old, mask, weights=w, **kw)
    b = fused_pg.policy_loss_from_logprobs(lp, adv, old, mask, weights=2 * w, **kw)
    # the policy term doubles, the KL term does not
    assert_close("pg doubles", 2 * a.metrics["pg_loss"], b.metrics["pg_loss"], atol=1e-14)
    assert_close("kl unchanged", a.metrics["kl_loss"], b.metrics["kl_loss"], atol=0)
    per_seq = fused_pg.policy_loss_from_logprobs(lp, adv, old, mask, weights=w[:, 0], **kw)
    per_tok = fused_pg.policy_loss_from_logprobs(lp, adv, old, mask, weights=w[:, :1].expand_as(w), **kw)
    assert_close("per-sequence weights", per_tok.loss, per_seq.loss, atol=1e-14)


def test_errors_name_the_argument():
    lp, old, adv, mask = _inputs()
    call = lambda **kw: fused_pg.policy_loss_from_logprobs(lp, adv, old, mask, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="weights"):
        call(weights=torch.ones(5))
    with pytest.raises(ValueError, match="weights"):
        call(weights=torch.full(lp.shape, float("nan")))
    with pytest.raises(TypeError, match="weights"):
        call(weights=torch.ones(lp.shape, dtype=torch.long))
    with pytest.raises(ValueError, match="kl_num_items_in_batch"):
        call(kl_num_items_in_batch=0.0)
    with pytest.raises(ValueError, match="entropy_num_items_in_batch"):
        call(entropy_num_items_in_batch=torch.tensor(-1.0))
    with pytest.raises(ValueError, match="kl_clamp"):
        call(kl_clamp=0.0)
    with pytest.raises(ValueError, match="kl_estimator"):
        call(kl_estimator="k2+")
    with pytest.raises(ValueError, match="entropy_aggregation"):
        call(entropy_aggregation="mean")
    with pytest.raises(ValueError, match="kl_aggregation"):
        call(kl_aggregation="seq-sum")
    with pytest.raises(TypeError, match="kl_ratio_weight"):
        call(kl_ratio_weight=1)
    with pytest.raises(ValueError, match="cu_seqlens"):
        fused_pg.policy_loss_from_logprobs(lp.reshape(-1), adv.reshape(-1), old.reshape(-1),
                                           entropy_aggregation="seq-mean-token-mean")
    with pytest.raises(ValueError, match="max_length"):
        call(max_length=8)  # only for seq-mean-token-sum-norm


# ---------------------------------------------------------------------------------------------
# the trainer packages stay optional
# ---------------------------------------------------------------------------------------------

def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def test_import_fused_pg_needs_no_trainer_package():
    r = _python("""
        import sys
        import fused_pg
        loaded = sorted(m for m in ("trl", "transformers", "verl", "openrlhf", "ray", "accelerate") if m in sys.modules)
        assert not loaded, loaded
    """)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("module,package", [("trl", "trl"), ("verl", "verl")])
def test_missing_trainer_package_is_named_with_its_install_command(module, package):
    r = _python(f"""
        import sys
        sys.modules[{package!r}] = None  # as if not installed
        try:
            import fused_pg.integrations.{module}
        except ImportError as e:
            print(e)
        else:
            raise SystemExit("imported without {package}")
    """)
    assert r.returncode == 0, r.stderr
    assert f"pip install 'fused-pg[{module}]'" in r.stdout and package in r.stdout
