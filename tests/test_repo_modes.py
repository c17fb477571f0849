"""REPO as the paper describes it (docs/repo.md): the per-state centre ``repo_center="state"``
(L = logp + H), REPO-R (``repo="relative"``), and the entropy monitor every loss reports.

* against the fp64 oracle (``fused_pg.reference``, its own per-token loops) on every backend,
  with the strategies restricted to the new modes: values, metrics, gradients; sign clamping,
  masked rows, packed sequences, GSPO and every other option drawn as usual;
* ``policy_loss_from_logprobs`` with and without entropies (the NaN convention of unmeasured
  metrics, and the oracle agreeing on it);
* gradient accumulation over uneven micro-batches and 2-rank data parallelism equal one batch;
* by hand: the REPO-R sign clamp, ``entropy_drive``, the clip and rollout metrics;
* the metrics over clipped tokens reduced over data-parallel ranks (weighted by their counts).
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import lru_cache

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, Phase, assume, given, seed, settings
from hypothesis import strategies as st

import fused_pg
from fused_pg import RepoStats, repo_statistics
from fused_pg.reference.loss import policy_loss_ref, repo_loss_ref
from helpers import (BACKENDS, ENTROPY_KEYS, ROLLOUT_KEYS, assert_close, assert_grad_close, check_loss_case,
                     check_metric_convention, check_metrics, check_per_token, count_example, loss_cases,
                     make_loss_inputs, n_examples, oracle_guards, run_oracle_loss, run_property)
from helpers.multiproc import run_group

NEW_MODES = dict(repos=("relative", "fixed", "decorrelate"), centers=("state", "state", "none", "batch"))
RELATIVE = dict(repos=("relative",), centers=("state", "none", "batch", True, False))


# ---------------------------------------------------------------------------------------------
# against the oracle
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("modes", [NEW_MODES, RELATIVE], ids=["state-centre", "relative"])
def test_new_modes_match_the_oracle(backend, modes):
    """Every option drawn as in the loss property test, REPO restricted to the new modes."""
    run_property(loss_cases(backend, **modes), lambda case: check_loss_case(case, backend),
                 examples=12, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_new_modes_packed_and_gspo(backend):
    """Packed sequences (empty ones included) with GSPO's sequence ratio likelier."""
    run_property(loss_cases(backend, layouts=("packed",), **RELATIVE),
                 lambda case: check_loss_case(case, backend), examples=8, backend=backend)


def _logprob_case(case, with_entropy: bool) -> None:
    """policy_loss_from_logprobs on the oracle's log-probs (and entropies, if given) against
    policy_loss_ref on the same values: loss, metrics (NaN where not measured), d/dlogp."""
    from helpers import logprob_case

    # what needs H is refused without it (tested below): logprob_case leaves it out
    case, inp, lp64, ent, mask, loss_opts = logprob_case(case, with_entropy)
    o = case.opts
    lp = lp64.requires_grad_()
    ref = policy_loss_ref(lp, inp.advantages, inp.old_logprobs, mask, entropy=ent, dtype=torch.float64,
                          **inp.tensors(), **loss_opts)
    oracle_guards(case, inp, ref)
    out = fused_pg.policy_loss_from_logprobs(lp, inp.advantages, inp.old_logprobs, mask, entropy=ent,
                                             **inp.tensors(), **loss_opts)
    assert_close("loss", ref.loss, out.loss, atol=1e-10, rtol=1e-10, key="fp64")
    check_metrics(ref.metrics, out.metrics, "fp64")
    check_per_token(ref, out, "fp64")
    state = o["repo_center"] == "state"  # (with repo="none" here when there are no entropies)
    check_metric_convention(out.metrics, o["repo"], cov_measured=with_entropy or not state)
    assert out.metrics["entropy_measured"] == float(with_entropy)
    if not with_entropy:
        assert all(math.isnan(float(out.metrics[k])) for k in ENTROPY_KEYS)
        assert torch.isnan(out.entropy).all()
    if ref.loss.requires_grad:
        (g_ref,) = torch.autograd.grad(ref.loss, [lp], retain_graph=True)
        (g,) = torch.autograd.grad(out.loss, [lp])
        assert_close("dL/dlogp", g_ref, g, atol=1e-12 * (1 + float(g_ref.abs().max())), rtol=1e-10)


@pytest.mark.parametrize("with_entropy", [True, False])
def test_from_logprobs_with_and_without_entropy_matches_the_oracle(with_entropy):
    run_property(loss_cases("reference", dtypes=("fp64",), **(NEW_MODES if with_entropy else RELATIVE)),
                 lambda case: _logprob_case(case, with_entropy), examples=40)


# ---------------------------------------------------------------------------------------------
# by hand
# ---------------------------------------------------------------------------------------------

F64 = torch.float64
LP = torch.tensor([[-0.5, -2.0, -1.0, -3.0, -0.7]], dtype=F64)
H = torch.tensor([[1.0, 0.5, 2.0, 0.2, 0.9]], dtype=F64)       # L = logp + H = 0.5, -1.5, 1.0, -2.8, 0.2
A = torch.tensor([[1.0, 2.0, -1.0, -0.5, 0.0]], dtype=F64)


@pytest.mark.parametrize("zeta,center,want", [
    # A > 0: A (1 - zeta L) clamped >= 0;  A < 0: A (1 + zeta L) clamped <= 0;  A = 0: 0
    (1.0, "state", [0.5, 5.0, -2.0, 0.0, 0.0]),      # -0.5 (1 - 2.8) = 0.9 > 0: clamped to 0
    (-1.0, "state", [1.5, 0.0, 0.0, -1.9, 0.0]),     # 2 (1 - 1.5) = -1 < 0: clamped to 0
    (1.0, "none", [1.5, 6.0, 0.0, 0.0, 0.0]),        # L = logp (SkyRL's form)
    (0.0, "state", [1.0, 2.0, -1.0, -0.5, 0.0]),     # zeta = 0: plain advantages
])
def test_repo_r_sign_clamp_by_hand(zeta, center, want):
    lp = LP.clone().requires_grad_()
    out = fused_pg.policy_loss_from_logprobs(lp, A, None, entropy=H, repo="relative", repo_coef=zeta,
                                             repo_center=center)
    want = torch.tensor([want], dtype=F64)
    assert_close("A' by hand", want, out.advantages, atol=1e-15)
    # on-policy: ratio 1, so the token-mean loss is -mean(A') and d loss / d logp = -A' / n
    assert_close("loss", -want.sum() / 5, out.loss, atol=1e-15)
    (g,) = torch.autograd.grad(out.loss, [lp])
    assert_close("d loss / d logp", -want / 5, g, atol=1e-15)
    ref = policy_loss_ref(LP, A, None, entropy=H, repo="relative", repo_coef=zeta, repo_center=center)
    assert_close("oracle A'", want, ref.advantages, atol=1e-15)
    assert math.isnan(float(out.metrics["adv_logp_cov_after"]))  # no function of the batch moments


def test_repo_r_batch_centre_by_hand():
    """repo_center="batch": L = logp - mean(logp) over the counted tokens (mean -1.44 here)."""
    out = fused_pg.policy_loss_from_logprobs(LP, A, None, entropy=H, repo="relative", repo_coef=0.5)
    L = [0.94, -0.56, 0.44, -1.56, 0.74]
    want = [max(1.0 * (1 - 0.5 * L[0]), 0), max(2.0 * (1 - 0.5 * L[1]), 0), min(-1.0 * (1 + 0.5 * L[2]), 0),
            min(-0.5 * (1 + 0.5 * L[3]), 0), 0.0]
    assert_close("A' (batch centre)", torch.tensor([want], dtype=F64), out.advantages, atol=1e-14)


def test_entropy_drive_by_hand():
    """-mean of A' (logp + H): with zeta = 1, state centre, A' = (0.5, 5, -2, 0, 0) and L = (0.5,
    -1.5, 1, -2.8, 0.2): -A' L = (-0.25, 7.5, 2, 0, 0)."""
    out = fused_pg.policy_loss_from_logprobs(LP, A, None, entropy=H, repo="relative", repo_coef=1.0,
                                             repo_center="state")
    m = out.metrics
    assert_close("entropy_drive", torch.tensor(9.25 / 5, dtype=F64), m["entropy_drive"], atol=1e-15)
    assert_close("entropy_drive_pos", torch.tensor(7.25 / 5, dtype=F64), m["entropy_drive_pos"], atol=1e-15)
    assert_close("entropy_drive_neg", torch.tensor(2.0 / 5, dtype=F64), m["entropy_drive_neg"], atol=1e-15)
    plain = fused_pg.policy_loss_from_logprobs(LP, A, None, entropy=H, repo="none")
    # without the correction the drive is -mean(A L) = -(0.5 - 3 - 1 + 1.4 + 0) / 5 = 0.42
    assert_close("entropy_drive, repo none", torch.tensor(0.42, dtype=F64), plain.metrics["entropy_drive"],
                 atol=1e-15)


# six counted tokens and a masked one; eps 0.2 / 0.28: the ratio leaves [0.8, 1.28] on tokens 0 (r = e^0.5,
# A > 0: clipped high), 1 and 4 (r = e^-0.5, e^-0.6, A < 0: clipped low), and 2 (r = e^0.4 but A < 0: not clipped)
CLIP_LP = torch.tensor([[-1.0, -1.0, -2.0, -0.5, -3.0, -1.5, -0.1]], dtype=F64)
CLIP_D = torch.tensor([[0.5, -0.5, 0.4, 0.0, -0.6, 0.05, 3.0]], dtype=F64)     # logp - old
CLIP_A = torch.tensor([[1.0, -1.0, -1.0, 1.0, -2.0, 1.0, 5.0]], dtype=F64)
CLIP_H = torch.tensor([[0.7, 1.2, 0.1, 0.3, 2.0, 0.4, 0.0]], dtype=F64)      # L = -0.3, 0.2, -1.9, -0.2, -1.0, -1.1
CLIP_GAP = torch.tensor([[0.01, -0.3, 0.25, 0.0, 0.1, -0.25, 9.0]], dtype=F64)  # old - rollout
CLIP_MASK = torch.tensor([[True] * 6 + [False]])


def _clip_example(**kw):
    old = CLIP_LP - CLIP_D
    return fused_pg.policy_loss_from_logprobs(CLIP_LP, CLIP_A, old, CLIP_MASK, entropy=CLIP_H,
                                              rollout_logprobs=old - CLIP_GAP, repo="none", eps_low=0.2,
                                              eps_high=0.28, **kw)


def test_clip_and_rollout_metrics_by_hand():
    m = _clip_example().metrics
    by_hand = dict(
        n_clip_high=1.0, n_clip_low=2.0, clip_frac_high=1 / 6, clip_frac_low=2 / 6,
        clip_high_p_mean=math.exp(-1.5),                          # old = logp - 0.5 = -1.5
        clip_low_p_mean=(math.exp(-0.5) + math.exp(-2.4)) / 2,    # old = -0.5, -2.4
        clip_high_below_avg=1.0,                                  # L = -0.3
        clip_low_below_avg=0.5,                                   # L = 0.2, -1.0
        rollout_mismatch_abs_mean=(0.01 + 0.3 + 0.25 + 0.0 + 0.1 + 0.25) / 6,
        # exp(old - rollout) outside [0.8, 1.28]: e^-0.3 = 0.74, e^0.25 = 1.284, e^-0.25 = 0.78
        rollout_phantom_clip_frac=3 / 6,
    )
    for k, v in by_hand.items():
        assert_close(k, torch.tensor(v, dtype=F64), m[k], atol=1e-14)
    assert m["rollout_measured"] == 1.0 and m["entropy_measured"] == 1.0
    check_metric_convention(m, "none")


def test_unmeasured_values_are_nan_with_their_flag():
    """No clipped token, no rollout log-probs, no entropies: NaN, and the flag that says why."""
    lp = -torch.rand(2, 5, dtype=F64) - 0.2
    out = fused_pg.policy_loss_from_logprobs(lp, torch.randn(2, dtype=F64), None, repo="none")  # on-policy: r = 1
    m = out.metrics
    assert float(m["n_clip_high"]) == float(m["n_clip_low"]) == 0.0
    assert m["entropy_measured"] == 0.0 and m["rollout_measured"] == 0.0
    for k in (*ENTROPY_KEYS, *ROLLOUT_KEYS, "clip_high_p_mean", "clip_low_p_mean"):
        assert math.isnan(float(m[k])), k
    check_metric_convention(m, "none")
    # the same call with what was missing: every flagged value becomes a number
    full = _clip_example()
    check_metric_convention(full.metrics, "none")
    assert all(math.isfinite(float(full.metrics[k])) for k in (*ENTROPY_KEYS, *ROLLOUT_KEYS))


def test_rollout_logprobs_without_tis_cap_are_monitored_only():
    """rollout_logprobs alone feed the rollout metrics; the loss and its gradient are unchanged."""
    lp = CLIP_LP.clone().requires_grad_()
    old = CLIP_LP - CLIP_D
    plain = fused_pg.policy_loss_from_logprobs(lp, CLIP_A, old, CLIP_MASK, repo="none")
    watched = fused_pg.policy_loss_from_logprobs(lp, CLIP_A, old, CLIP_MASK, repo="none",
                                                 rollout_logprobs=old - CLIP_GAP)
    assert torch.equal(plain.loss, watched.loss)
    assert float(plain.metrics["tis_weight_mean"]) == float(watched.metrics["tis_weight_mean"]) == 0.0
    assert math.isnan(float(plain.metrics["rollout_phantom_clip_frac"]))
    assert float(watched.metrics["rollout_phantom_clip_frac"]) == 0.5
    with pytest.raises(ValueError, match="tis_cap needs rollout_logprobs"):
        fused_pg.policy_loss_from_logprobs(lp, CLIP_A, old, CLIP_MASK, tis_cap=2.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_drive_is_minus_mean_of_the_used_advantages_times_logp_plus_h(backend):
    """entropy_drive from repo_loss against -mean(A' (logp + H)) of its own per-token outputs, to
    fp32 rounding; pos + neg = total."""
    g = torch.Generator().manual_seed(5)
    h, W = torch.randn(3, 8, 12, generator=g), torch.randn(50, 12, generator=g) / 2
    y = torch.randint(0, 50, (3, 8), generator=g)
    adv, old = torch.randn(3, generator=g), -2 * torch.rand(3, 8, generator=g) - 0.5
    mask = torch.rand(3, 8, generator=g) > 0.25
    for repo, center, coef in (("relative", "state", 2.0), ("decorrelate", "state", 1.0), ("none", "batch", 0.0)):
        out = fused_pg.repo_loss(h, W, y, adv, old, mask, repo=repo, repo_center=center, repo_coef=coef,
                                 backend=backend)
        counted = mask
        drive = -(out.advantages.double() * (out.logprobs.double() + out.entropy.double()))[counted]
        m = out.metrics
        n = int(counted.sum())
        assert_close(f"entropy_drive {repo}", drive.sum() / n, m["entropy_drive"], atol=1e-6, rtol=1e-6)
        pos = drive[out.advantages[counted] > 0].sum() / n
        assert_close(f"entropy_drive_pos {repo}", pos, m["entropy_drive_pos"], atol=1e-6, rtol=1e-6)
        assert_close("pos + neg", m["entropy_drive"], m["entropy_drive_pos"] + m["entropy_drive_neg"], atol=1e-7)


def test_repo_r_at_zeta_above_zero_raises_the_drive_and_below_lowers_it():
    """zeta > 0 adds zeta |A| L^2 >= 0 to -A L before the clamp: the drive never falls; zeta < 0
    never rises (the direction AdaptiveRepoCoef relies on)."""
    g = torch.Generator().manual_seed(1)
    lp = -3 * torch.rand(4, 16, generator=g, dtype=F64)
    H = 2 * torch.rand(4, 16, generator=g, dtype=F64)
    A = torch.randn(4, 16, generator=g, dtype=F64)
    drive = lambda z: float(fused_pg.policy_loss_from_logprobs(  # noqa: E731
        lp, A, None, entropy=H, repo="relative", repo_center="state", repo_coef=z).metrics["entropy_drive"])
    zs = [-4.0, -1.0, -0.25, 0.0, 0.25, 1.0, 4.0]
    drives = [drive(z) for z in zs]
    assert all(b >= a for a, b in zip(drives, drives[1:])), drives
    assert drives[-1] > drives[3] > drives[0]


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------

def test_state_centre_needs_entropies():
    lp = -torch.rand(2, 4, dtype=F64)
    with pytest.raises(ValueError, match="repo_center='state'.*entropy="):
        fused_pg.policy_loss_from_logprobs(lp, torch.randn(2, dtype=F64), repo="relative", repo_center="state")
    stats = repo_statistics(lp, torch.randn(2, dtype=F64))  # no entropy: no moments of logp + H
    assert not stats.has_state
    with pytest.raises(ValueError, match="repo_statistics\\(\\.\\.\\., entropy=\\.\\.\\.\\)"):
        fused_pg.policy_loss_from_logprobs(lp, torch.randn(2, dtype=F64), entropy=torch.rand(2, 4, dtype=F64),
                                           repo="decorrelate", repo_center="state", repo_stats=stats)
    # "fixed" / "relative" need no statistics: such stats only leave the covariance metrics unmeasured
    out = fused_pg.policy_loss_from_logprobs(lp, torch.randn(2, dtype=F64), entropy=torch.rand(2, 4, dtype=F64),
                                             repo="relative", repo_center="state", repo_stats=stats)
    check_metric_convention(out.metrics, "relative", cov_measured=False)


@pytest.mark.parametrize("kw,error,match", [
    (dict(repo="fixed", repo_coef=-0.1), ValueError, "repo_coef must be >= 0 for repo='fixed'"),
    (dict(repo="decorrelate", repo_coef=-0.1), ValueError, "repo_coef"),
    (dict(repo="decorrelate", repo_coef=1.5), ValueError, "repo_coef"),
    (dict(repo="relative", repo_coef=math.inf), ValueError, "repo_coef"),
    (dict(repo="relative", repo_center="mean"), ValueError, "repo_center"),
    (dict(repo="relative", repo_center=None), TypeError, "repo_center"),
    (dict(repo="repo-r"), ValueError, "repo"),
])
def test_bad_repo_options_are_named(kw, error, match):
    with pytest.raises(error, match=match):
        fused_pg.LossConfig(**kw)


def test_config_spellings():
    assert fused_pg.LossConfig(repo_center=True).repo_center == "batch"
    assert fused_pg.LossConfig(repo_center=False).repo_center == "none"
    assert fused_pg.LossConfig().repo_center == "batch"
    assert fused_pg.LossConfig(repo="relative", repo_coef=-3.0).repo_coef == -3.0
    lp, adv = -torch.rand(2, 4, dtype=F64), torch.randn(2, dtype=F64)
    assert torch.equal(fused_pg.policy_loss_from_logprobs(lp, adv, repo="fixed", repo_center=True).loss,
                       fused_pg.policy_loss_from_logprobs(lp, adv, repo="fixed", repo_center="batch").loss)


# ---------------------------------------------------------------------------------------------
# gradient accumulation over uneven micro-batches
# ---------------------------------------------------------------------------------------------

MODES = [("relative", "state", 1.5), ("relative", "none", -0.7), ("relative", "batch", 0.8),
         ("decorrelate", "state", 1.0), ("fixed", "state", 0.4), ("none", "state", 0.0)]


@settings(max_examples=n_examples(30), deadline=None)
@given(mode=st.sampled_from(MODES), cuts=st.lists(st.integers(0, 6), max_size=4),
       aggregation=st.sampled_from(["token-mean", "token-sum"]), seed_=st.integers(0, 2**31 - 1))
def test_accumulation_over_uneven_micro_batches_equals_one_batch(mode, cuts, aggregation, seed_):
    """Pass 1 (no graph): each micro-batch's log-probs and entropies give its statistics, merged;
    pass 2: each micro-batch's loss with them and the global token count. The sums of losses and
    gradients equal one batch (fp64, ~1e-13) and the oracle."""
    count_example()
    repo, center, coef = mode
    g = torch.Generator().manual_seed(seed_)
    B, T, D, V = 6, 5, 7, 23
    h = torch.randn(B, T, D, generator=g, dtype=F64)
    W = torch.randn(V, D, generator=g, dtype=F64) / 2
    y = torch.randint(0, V, (B, T), generator=g)
    adv = torch.randn(B, generator=g, dtype=F64)
    old = -2 * torch.rand(B, T, generator=g, dtype=F64) - 0.3
    mask = torch.rand(B, T, generator=g) > 0.3
    kw = dict(repo=repo, repo_center=center, repo_coef=coef, aggregation=aggregation, entropy_coef=0.01,
              backend="torch")
    W1 = W.clone().requires_grad_()
    one = fused_pg.repo_loss(h, W1, y, adv, old, mask, **kw)
    one.loss.backward()
    bounds = sorted({0, B, *cuts})
    parts = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    with torch.no_grad():
        parts_stats = []
        for p in parts:
            lp, ent = fused_pg.fused_logprobs_entropy(h[p], W, torch.where(mask[p], y[p], -100))
            parts_stats.append(repo_statistics(lp, adv[p], mask[p], entropy=ent))
        stats = RepoStats.merge_all(parts_stats)
    n_tokens = one.metrics["n_tokens"] if aggregation == "token-mean" else None
    W2 = W.clone().requires_grad_()
    total = 0.0
    for p in parts:
        out = fused_pg.repo_loss(h[p], W2, y[p], adv[p], old[p], mask[p], repo_stats=stats,
                                 num_items_in_batch=n_tokens, **kw)
        out.loss.backward()
        total = total + out.loss.detach()
        assert_close("zeta", one.metrics["repo_zeta"], out.metrics["repo_zeta"], atol=1e-13)
    assert_close("accumulated loss", one.loss, total, atol=1e-12, rtol=1e-12)
    assert_grad_close("accumulated grad", W1.grad, W2.grad, cos_min=1 - 1e-12, rel_max=1e-10)
    W3 = W.clone().requires_grad_()
    ref = repo_loss_ref(h, W3, y, adv, old, mask, **{k: v for k, v in kw.items() if k != "backend"})
    ref.loss.backward()
    assert_close("one batch vs oracle", ref.loss, one.loss, atol=1e-12, rtol=1e-12)
    assert_grad_close("grad vs oracle", W3.grad, W2.grad, cos_min=1 - 1e-12, rel_max=1e-10)


def test_repo_r_needs_no_statistics_under_accumulation():
    """REPO-R with the "state" / "none" centre: micro-batches without repo_stats already sum to
    one batch (the correction is per token)."""
    g = torch.Generator().manual_seed(2)
    lp = -3 * torch.rand(5, 6, generator=g, dtype=F64)
    H, A = 2 * torch.rand(5, 6, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)
    for center in ("state", "none"):
        kw = dict(repo="relative", repo_center=center, repo_coef=1.3, aggregation="token-sum", entropy=None)
        one = fused_pg.policy_loss_from_logprobs(lp, A, None, **{**kw, "entropy": H})
        parts = sum(fused_pg.policy_loss_from_logprobs(lp[s], A[s], None, **{**kw, "entropy": H[s]}).loss
                    for s in (slice(0, 1), slice(1, 4), slice(4, 5)))
        assert_close(f"REPO-R {center}: micro-batches without statistics", one.loss, parts, atol=1e-13)


# ---------------------------------------------------------------------------------------------
# 2-rank data parallelism (gloo), with tests/test_parallel.py's splitting and checks
# ---------------------------------------------------------------------------------------------

DP_MODES = [("relative", "state", 1.5), ("relative", "none", -0.8), ("relative", "batch", 0.6),
            ("decorrelate", "state", 0.9), ("fixed", "state", 0.4)]


def _draw_dp_case(layout: str, dtype: str, mode: tuple, salt: int):
    """The first drawn example with this REPO mode that the oracle accepts."""
    found = []
    repo, center, coef = mode

    @seed(salt)
    @settings(max_examples=40, database=None, derandomize=False, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(case=loss_cases("torch", layouts=(layout,), dtypes=(dtype,), masks=("random", "empty_rows")))
    def draw(case):
        if found:
            return
        assume(layout != "packed" or len(case.lengths) >= 2)  # a sequence for each rank
        case = replace(case, opts=dict(case.opts, repo=repo, repo_center=center, repo_coef=coef))
        inp = make_loss_inputs(case)
        assume(int(inp.valid.sum()) > 1)
        ref, grads, floors = run_oracle_loss(case, inp, "torch")
        oracle_guards(case, inp, ref)
        found.append((case, inp, ref, grads, floors))

    draw()
    assert found, f"no usable example for {layout}/{dtype}/{mode}"
    return found[0]


@lru_cache(maxsize=None)
def dp_cases() -> list[tuple]:
    out = []
    for i, layout in enumerate(("dense", "packed")):
        for j, mode in enumerate(DP_MODES):
            out.append((f"{layout}/fp32/{mode}", *_draw_dp_case(layout, "fp32", mode, 1000 + 10 * i + j)))
    out.append(("dense/fp64/relative-state", *_draw_dp_case("dense", "fp64", DP_MODES[0], 1999)))
    return out


def _clip_split_job(rank, world):
    """The hand example's six counted tokens split 4 / 3 (rank 1: no token clipped high):
    policy_loss_from_logprobs with DataParallel, metrics reduced over both ranks."""
    old = CLIP_LP - CLIP_D
    cols = [slice(0, 4), slice(4, 7)][rank]
    out = fused_pg.policy_loss_from_logprobs(
        CLIP_LP[:, cols], CLIP_A[:, cols], old[:, cols], CLIP_MASK[:, cols], entropy=CLIP_H[:, cols],
        rollout_logprobs=(old - CLIP_GAP)[:, cols], repo="none", parallel=fused_pg.DataParallel(dist.group.WORLD))
    local = fused_pg.policy_loss_from_logprobs(
        CLIP_LP[:, cols], CLIP_A[:, cols], old[:, cols], CLIP_MASK[:, cols], entropy=CLIP_H[:, cols], repo="none")
    unclipped = fused_pg.policy_loss_from_logprobs(  # no token of either rank clipped high
        CLIP_LP[:, cols], CLIP_A[:, cols], old[:, cols], CLIP_MASK[:, cols], entropy=CLIP_H[:, cols], repo="none",
        eps_high=5.0, parallel=fused_pg.DataParallel(dist.group.WORLD))
    return dict(metrics=out.metrics, local=local.metrics, unclipped=unclipped.metrics)


@lru_cache(maxsize=None)
def dp_results() -> list[dict]:
    from test_parallel import _dp_job, dp_split

    jobs, meta = [("clip_split", _clip_split_job)], {}
    for name, case, inp, *_ in dp_cases():
        parts = dp_split(case, inp, 2)
        meta[name] = parts
        if parts is not None:
            jobs.append((name, _dp_job(case, inp, parts)))
    return [run_group(2, jobs), meta]


def test_data_parallel_new_modes_match_one_process_and_the_oracle():
    from test_parallel import _check_against, _dp_combined, _one_process

    per_rank, meta = dp_results()
    checked = 0
    for name, case, inp, ref, ref_grads, floors in dp_cases():
        parts = meta[name]
        if parts is None:
            continue
        ranks = [r[name] for r in per_rank]
        got, grads = _dp_combined(name, case, inp, ranks, parts)
        _check_against(name, case, inp, ref, ref_grads, floors, got, grads, key="oracle")
        one, one_grads = _one_process(case, inp)
        _check_against(name, case, inp, one, one_grads, floors, got, grads, key="one process")
        checked += 1
    assert checked == len(dp_cases())


def test_metrics_over_clipped_tokens_reduce_over_ranks_by_their_counts():
    """Means over clipped tokens are weighted by each rank's count of them (n_clip_low /
    n_clip_high): the group's value is the one-process value; a rank without any (NaN locally)
    adds nothing; a group without any reports NaN."""
    per_rank, _ = dp_results()
    whole = _clip_example().metrics
    for r in per_rank:
        got = dict(r["clip_split"]["metrics"])
        got["n_seqs"] = whole["n_seqs"]  # (the one row is split between the ranks: each counts it)
        check_metrics(whole, got, "fp64")
    local1 = per_rank[1]["clip_split"]["local"]
    assert float(local1["n_clip_high"]) == 0 and math.isnan(float(local1["clip_high_p_mean"]))
    assert float(per_rank[0]["clip_split"]["local"]["n_clip_high"]) == 1
    # a plain token-weighted mean of the ranks' clip_low_p_mean would differ from the true one
    l0, l1 = per_rank[0]["clip_split"]["local"], local1
    n0, n1 = float(l0["n_tokens"]), float(l1["n_tokens"])
    naive = (float(l0["clip_low_p_mean"]) * n0 + float(l1["clip_low_p_mean"]) * n1) / (n0 + n1)
    assert abs(naive - float(whole["clip_low_p_mean"])) > 1e-3
    for r in per_rank:
        u = r["clip_split"]["unclipped"]
        assert float(u["n_clip_high"]) == 0.0
        assert math.isnan(float(u["clip_high_p_mean"])) and math.isnan(float(u["clip_high_below_avg"]))
        assert_close("clip_low_p_mean, eps_high 5", whole["clip_low_p_mean"], u["clip_low_p_mean"], atol=1e-14)


def test_the_docs_example_runs_as_written(capsys):
    """The Python block of docs/repo.md (REPO-R with the multiplicative controller under
    gradient accumulation, and its checkpoint) runs as written."""
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "repo.md").read_text()
    blocks = re.findall(r"```python\n(.*?)\n```", doc, flags=re.S)
    assert len(blocks) == 1
    namespace: dict = {}
    exec(compile(blocks[0], "docs/repo.md", "exec"), namespace)
    ctrl = namespace["ctrl"]
    assert ctrl.steps == 3 and ctrl.repo_coef != 0.01
    assert len(capsys.readouterr().out.splitlines()) == 3
