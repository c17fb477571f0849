"""ADAPO / entropy-targeting controllers: update direction, bounds, smoothing, serialisation,
bad arguments, and their use through adapo_loss."""

import copy
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fused_pg
from fused_pg.reference.loss import repo_loss_ref
from fused_pg import AdaptiveClip, AdaptiveRepoCoef, adapo_loss, repo_loss
from helpers import BACKENDS, FP64_BACKENDS, assert_close, count_example, n_examples


def test_eps_high_rises_below_target_and_falls_above():
    c = AdaptiveClip(target_entropy=1.0, eps_low=0.2, eps_high=0.28, rate=0.05)
    change = c.update(0.5)  # entropy below target: open the upper clip
    assert change > 0 and c.eps_high == pytest.approx(0.28 + 0.05 * 0.5)
    before = c.eps_high
    change = c.update(1.6)  # above target: tighten
    assert change < 0 and c.eps_high == pytest.approx(before - 0.05 * 0.6)
    before = c.eps_high
    assert c.update(1.0) == 0.0 and c.eps_high == before  # on target: no change
    assert c.eps_low == 0.2  # adapt_low=False: eps_low never moves
    assert c.steps == 3


def test_eps_high_stays_within_bounds():
    c = AdaptiveClip(target_entropy=2.0, eps_high=0.3, bounds=(0.1, 0.4), rate=0.5)
    for _ in range(20):
        c.update(0.0)
    assert c.eps_high == 0.4
    for _ in range(20):
        c.update(10.0)
    assert c.eps_high == 0.1


def test_adapt_low_moves_eps_low_the_opposite_way():
    c = AdaptiveClip(target_entropy=1.0, eps_low=0.2, eps_high=0.28, rate=0.1, adapt_low=True,
                     low_ratio=0.5, low_bounds=(0.05, 0.3))
    change = c.update(0.6)  # below target: eps_high up, eps_low down (tighter clip-low)
    assert change > 0 and c.eps_low == pytest.approx(0.2 - 0.5 * change)
    change = c.update(1.8)
    assert change < 0 and c.eps_low > 0.2 - 0.5 * 0.04
    # eps_low follows eps_high's *applied* step: it moves until eps_high saturates, and never
    # leaves low_bounds
    for _ in range(50):
        c.update(5.0)
    assert c.eps_high == c.bounds[0] and 0.2 < c.eps_low <= 0.3
    saturated = c.eps_low
    c.update(5.0)
    assert c.eps_low == saturated
    for _ in range(50):
        c.update(0.0)
    assert c.eps_high == c.bounds[1] and 0.05 <= c.eps_low < 0.2
    wide = AdaptiveClip(target_entropy=1.0, eps_low=0.2, eps_high=0.3, rate=0.1, adapt_low=True, low_ratio=3.0,
                        bounds=(0.0, 0.9), low_bounds=(0.1, 0.25))
    for _ in range(10):
        wide.update(0.0)
    assert wide.eps_low == 0.1  # clamped at the lower low_bound


def test_smoothing_averages_the_measurements():
    c = AdaptiveClip(target_entropy=1.0, eps_high=0.3, rate=0.1, smoothing=0.75, bounds=(0.0, 1.0))
    c.update(0.2)  # the first measurement initialises the average
    assert c.entropy_ema == pytest.approx(0.2)
    c.update(1.0)
    assert c.entropy_ema == pytest.approx(0.75 * 0.2 + 0.25 * 1.0)
    raw = AdaptiveClip(target_entropy=1.0, eps_high=0.3, rate=0.1, bounds=(0.0, 1.0))
    raw.update(0.2), raw.update(1.0)
    assert c.eps_high > raw.eps_high  # the smoothed entropy still reads below target


def test_update_accepts_a_tensor_and_rejects_non_finite():
    c = AdaptiveClip(target_entropy=1.0)
    c.update(torch.tensor(0.5))
    assert isinstance(c.eps_high, float)
    for bad in (math.nan, math.inf, torch.tensor(math.nan)):
        with pytest.raises(ValueError, match="entropy"):
            c.update(bad)


@pytest.mark.parametrize("make", [
    lambda: AdaptiveClip(target_entropy=0.8, eps_low=0.2, eps_high=0.3, rate=0.07, smoothing=0.5,
                         adapt_low=True, low_ratio=0.7),
    lambda: AdaptiveRepoCoef(target_entropy=0.8, repo_coef=0.4, rate=0.3, smoothing=0.2),
    lambda: AdaptiveRepoCoef(target_entropy=0.8, repo_coef=0.03, mode="multiplicative", bounds=(0.01, 0.2)),
], ids=["AdaptiveClip", "AdaptiveRepoCoef", "AdaptiveRepoCoef-multiplicative"])
def test_state_dict_round_trip_gives_identical_trajectories(make):
    measurements = [0.3, 1.2, 0.7, 0.75, 2.0, 0.1, 0.9]
    a = make()
    for m in measurements[:3]:
        a.update(m)
    state = json.loads(json.dumps(a.state_dict()))  # plain numbers: JSON / torch.save friendly
    b = make()
    b.update(5.0)  # a different history, overwritten by the load
    b.load_state_dict(state)
    assert b.state_dict() == a.state_dict()
    ta, tb = [], []
    for m in measurements[3:]:
        ta.append((a.update(m), a.value, getattr(a, "eps_low", None)))
        tb.append((b.update(m), b.value, getattr(b, "eps_low", None)))
    assert ta == tb
    c = copy.deepcopy(a)
    assert c.update(0.5) == a.update(0.5)


def test_repo_coef_controller_direction_and_bounds():
    c = AdaptiveRepoCoef(target_entropy=1.0, repo_coef=0.5, rate=0.5, bounds=(0.0, 1.0))
    assert c.update(0.6) > 0 and c.repo_coef == pytest.approx(0.7)
    assert c.update(1.5) < 0 and c.repo_coef == pytest.approx(0.45)
    for _ in range(20):
        c.update(0.0)
    assert c.repo_coef == 1.0


@settings(max_examples=n_examples(30))
@given(target=st.floats(0, 5), eps=st.floats(0.1, 0.5), rate=st.floats(1e-3, 1.0),
       smoothing=st.floats(0, 0.99), hs=st.lists(st.floats(0, 10), min_size=1, max_size=20))
def test_controller_properties(target, eps, rate, smoothing, hs):
    """Bounds always hold; every step moves eps_high toward the side that corrects the
    (smoothed) entropy error, or not at all when a bound is hit."""
    c = AdaptiveClip(target_entropy=target, eps_high=eps, rate=rate, smoothing=smoothing, bounds=(0.1, 0.5))
    for h in hs:
        before = c.eps_high
        change = c.update(h)
        lo, hi = c.bounds
        assert lo <= c.eps_high <= hi
        assert change == pytest.approx(c.eps_high - before)
        err = target - c.entropy_ema
        assert change * err >= 0  # same sign as the entropy error (or zero)
    count_example()


CTRL_BAD = [
    (dict(target_entropy=-0.1), ValueError, "target_entropy"),
    (dict(target_entropy=math.nan), ValueError, "target_entropy"),
    (dict(target_entropy="1"), TypeError, "target_entropy"),
    (dict(target_entropy=1.0, eps_low=1.0), ValueError, "eps_low"),
    (dict(target_entropy=1.0, eps_low=-0.1), ValueError, "eps_low"),
    (dict(target_entropy=1.0, eps_high=0.9), ValueError, "eps_high"),  # outside bounds (0.1, 0.5)
    (dict(target_entropy=1.0, bounds=(0.5, 0.1)), ValueError, "bounds"),
    (dict(target_entropy=1.0, bounds=(-0.1, 0.5), eps_high=0.2), ValueError, "bounds"),
    (dict(target_entropy=1.0, bounds=(0.1,)), ValueError, "bounds"),
    (dict(target_entropy=1.0, rate=0.0), ValueError, "rate"),
    (dict(target_entropy=1.0, rate=-1.0), ValueError, "rate"),
    (dict(target_entropy=1.0, smoothing=1.0), ValueError, "smoothing"),
    (dict(target_entropy=1.0, smoothing=-0.5), ValueError, "smoothing"),
    (dict(target_entropy=1.0, low_ratio=-1.0), ValueError, "low_ratio"),
    (dict(target_entropy=1.0, low_bounds=(0.1, 1.0)), ValueError, "low_bounds"),
    (dict(target_entropy=1.0, adapt_low=True, eps_low=0.4, low_bounds=(0.05, 0.3)), ValueError, "eps_low"),
]


@pytest.mark.parametrize("kw,error,match", CTRL_BAD, ids=[c[2] + str(i) for i, c in enumerate(CTRL_BAD)])
def test_adaptive_clip_bad_arguments(kw, error, match):
    with pytest.raises(error, match=match):
        AdaptiveClip(**kw)


def test_adaptive_repo_coef_bad_arguments():
    with pytest.raises(ValueError, match="repo_coef"):
        AdaptiveRepoCoef(target_entropy=1.0, repo_coef=2.0)  # outside bounds (0, 1)
    with pytest.raises(ValueError, match="bounds"):
        AdaptiveRepoCoef(target_entropy=1.0, repo_coef=0.0, bounds=(-1.0, 1.0))


def test_load_state_dict_validates():
    c = AdaptiveClip(target_entropy=1.0)
    state = c.state_dict()
    with pytest.raises(ValueError, match="rate"):
        c.load_state_dict({**state, "rate": -1.0})
    with pytest.raises(ValueError, match="eps_low"):
        c.load_state_dict({**state, "eps_low": 1.5})


# --- through adapo_loss --------------------------------------------------------------------------

def _batch(seed=0, B=3, T=9, D=8, V=40):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g)
    W = torch.randn(V, D, generator=g) / math.sqrt(D) * 2
    y = torch.randint(0, V, (B, T), generator=g)
    adv = torch.randn(B, generator=g)
    old = -torch.rand(B, T, generator=g) * 3 - 1
    mask = torch.rand(B, T, generator=g) < 0.8
    return h, W, y, adv, old, mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("adapt_low", [False, True])
def test_adapo_loss_uses_the_controller_eps(backend, adapt_low):
    h, W, y, adv, old, mask = _batch()
    ctrl = AdaptiveClip(target_entropy=1.0, eps_low=0.15, eps_high=0.33, adapt_low=adapt_low)
    ctrl.update(0.2)  # move away from the constructor values first
    W1, W2 = W.clone().requires_grad_(), W.clone().requires_grad_()
    a = adapo_loss(h, W1, y, adv, old, mask, controller=ctrl, repo="none", backend=backend)
    r = repo_loss(h, W2, y, adv, old, mask, eps_low=ctrl.eps_low, eps_high=ctrl.eps_high, repo="none",
                  backend=backend)
    a.loss.backward(), r.loss.backward()
    assert torch.equal(a.loss, r.loss) and torch.equal(W1.grad, W2.grad)
    assert a.metrics["eps_high"] == ctrl.eps_high and a.metrics["eps_low"] == ctrl.eps_low
    # with other eps values the loss differs (the test can tell them apart)
    other = repo_loss(h, W, y, adv, old, mask, eps_low=0.2, eps_high=0.28, repo="none", backend=backend)
    assert not torch.equal(other.loss, a.loss)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adapo_loss_update_controller(backend):
    h, W, y, adv, old, mask = _batch()
    ctrl = AdaptiveClip(target_entropy=10.0, eps_high=0.28, rate=0.05, bounds=(0.1, 0.9))
    untouched = copy.deepcopy(ctrl)
    out = adapo_loss(h, W, y, adv, old, mask, controller=ctrl, backend=backend)  # default: no update
    assert ctrl.state_dict() == untouched.state_dict()
    out = adapo_loss(h, W, y, adv, old, mask, controller=ctrl, update_controller=True, backend=backend)
    H = float(out.metrics["entropy_mean"])
    assert H < 10.0 and ctrl.steps == 1
    assert ctrl.eps_high == pytest.approx(0.28 + 0.05 * (10.0 - H))
    assert out.metrics["eps_high"] == 0.28  # the step itself used the value before the update
    untouched.update(out.metrics["entropy_mean"])
    assert untouched.state_dict() == ctrl.state_dict()  # same as calling update() by hand


@pytest.mark.parametrize("backend", FP64_BACKENDS)
def test_adapo_loss_matches_the_oracle(backend):
    h, W, y, adv, old, mask = _batch(seed=3)
    ctrl = AdaptiveClip(target_entropy=1.0, eps_low=0.1, eps_high=0.4)
    out = adapo_loss(h.double(), W.double(), y, adv.double(), old.double(), mask, controller=ctrl,
                     entropy_coef=0.01, backend=backend)
    ref = repo_loss_ref(h.double(), W.double(), y, adv.double(), old.double(), mask,
                        eps_low=0.1, eps_high=0.4, entropy_coef=0.01)
    assert_close("adapo loss", ref.loss, out.loss, atol=1e-10, rtol=1e-10)


def test_controller_closes_the_loop_on_a_toy_policy():
    """A few real optimiser steps: with entropy far below target, eps_high climbs step after
    step until its bound; the controller only ever sees the reported entropy_mean."""
    torch.manual_seed(0)
    h, W, y, adv, old, mask = _batch(seed=5)
    W = (W * 4).requires_grad_()
    ctrl = AdaptiveClip(target_entropy=3.0, eps_high=0.2, rate=0.05, bounds=(0.1, 0.4))
    opt = torch.optim.SGD([W], lr=0.1)
    seen = []
    for _ in range(6):
        out = adapo_loss(h, W, y, adv, old, mask, controller=ctrl, update_controller=True, repo="none")
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        seen.append(ctrl.eps_high)
    assert all(b >= a for a, b in zip(seen, seen[1:])) and seen[-1] == 0.4


# --- empty micro-batches, gradient accumulation ---------------------------------------------------

CONTROLLERS = [
    lambda: AdaptiveClip(target_entropy=0.8, eps_low=0.2, eps_high=0.28, rate=0.07, smoothing=0.5,
                         adapt_low=True, low_ratio=0.7),
    lambda: AdaptiveRepoCoef(target_entropy=0.8, repo_coef=0.4, rate=0.3, smoothing=0.2),
    lambda: AdaptiveRepoCoef(target_entropy=0.8, repo_coef=-0.02, mode="multiplicative", factor=1.5,
                             bounds=(0.01, 0.5), smoothing=0.3),
]
CONTROLLER_IDS = ["AdaptiveClip", "AdaptiveRepoCoef", "AdaptiveRepoCoef-multiplicative"]


def _empty_metrics():
    h, W, y, adv, old, mask = _batch(seed=1)
    return repo_loss(h, W, y, adv, old, torch.zeros_like(mask), repo="none").metrics


@pytest.mark.parametrize("make", CONTROLLERS, ids=CONTROLLER_IDS)
def test_an_empty_batch_leaves_the_controller_unchanged(make):
    """An all-masked micro-batch reports entropy_mean 0 with n_tokens 0: feeding it must not
    count as a measurement of zero entropy (it used to move eps_high 0.28 -> 0.31)."""
    metrics = _empty_metrics()
    assert float(metrics["n_tokens"]) == 0
    c = make()
    c.update(1.1)  # some history first, so an unchanged smoothed entropy is visible too
    before = c.state_dict()
    assert c.update(metrics) == 0.0
    assert c.update(0.0, n_tokens=0) == 0.0
    assert c.update(torch.tensor(0.0), n_tokens=torch.tensor(0.0)) == 0.0
    c.observe(metrics)
    assert c.update() == 0.0
    with pytest.warns(fused_pg.NothingObservedWarning, match="nothing was observed"):
        assert c.update() == 0.0  # nothing observed at all: no step either, and it says so
    assert c.state_dict() == before


def test_adapo_loss_update_controller_skips_an_empty_batch():
    h, W, y, adv, old, mask = _batch(seed=2)
    ctrl = AdaptiveClip(target_entropy=5.0, eps_high=0.28, rate=0.05, bounds=(0.1, 0.9))
    before = ctrl.state_dict()
    out = adapo_loss(h, W, y, adv, old, torch.zeros_like(mask), controller=ctrl, update_controller=True,
                     repo="none")
    assert float(out.metrics["n_tokens"]) == 0 and float(out.loss.detach()) == 0.0
    assert ctrl.state_dict() == before and ctrl.eps_high == 0.28


@pytest.mark.parametrize("make", CONTROLLERS, ids=CONTROLLER_IDS)
def test_observe_per_micro_batch_update_per_step_is_token_weighted(make):
    """Gradient accumulation: observe() every micro-batch, update() once per optimizer step.
    The controller then sees the token-weighted mean entropy of the whole step's batch, the
    same number one big batch reports, and makes exactly one step."""
    h, W, y, adv, old, mask = _batch(seed=4, B=6, T=9)
    mask[4:] = False  # the last micro-batch is all padding
    mask[2, 3:] = False  # micro-batches of unequal token counts
    whole = repo_loss(h, W, y, adv, old, mask, repo="none").metrics
    accumulated, one_batch, by_hand = make(), make(), make()
    entropies, counts = [], []
    for sl in (slice(0, 1), slice(1, 4), slice(4, 6)):
        m = repo_loss(h[sl], W, y[sl], adv[sl], old[sl], mask[sl], repo="none").metrics
        accumulated.observe(m)  # tensors are kept as they are: no host sync per micro-batch
        entropies.append(float(m["entropy_mean"]))
        counts.append(float(m["n_tokens"]))
    assert accumulated.steps == 0  # observing alone never moves the controller
    change = accumulated.update()
    assert accumulated.steps == 1 and change != 0.0
    one_batch.update(whole)
    weighted = sum(e * n for e, n in zip(entropies, counts)) / sum(counts)
    by_hand.update(weighted)
    assert weighted == pytest.approx(float(whole["entropy_mean"]), rel=1e-6)
    assert accumulated.value == pytest.approx(one_batch.value, rel=1e-6)
    assert accumulated.value == pytest.approx(by_hand.value, rel=1e-12)
    assert accumulated.entropy_ema == pytest.approx(by_hand.entropy_ema, rel=1e-12)
    # the observations were consumed: the next update() without new ones does nothing (and warns)
    with pytest.warns(fused_pg.NothingObservedWarning):
        assert accumulated.update() == 0.0 and accumulated.steps == 1


def test_update_with_a_value_closes_the_step_over_pending_observations():
    a = AdaptiveClip(target_entropy=1.0, rate=0.1)
    b = AdaptiveClip(target_entropy=1.0, rate=0.1)
    a.observe(0.4, n_tokens=30)
    a.update(1.0, n_tokens=10)  # = observe(1.0, 10) then update()
    b.update((0.4 * 30 + 1.0 * 10) / 40)
    assert a.eps_high == pytest.approx(b.eps_high) and a.steps == b.steps == 1


@pytest.mark.parametrize("bad,error,match", [
    (dict(entropy=math.nan), ValueError, "entropy"),
    (dict(entropy=0.5, n_tokens=-1), ValueError, "n_tokens"),
    (dict(entropy=0.5, n_tokens=math.inf), ValueError, "n_tokens"),
    (dict(entropy={"n_tokens": 3}), ValueError, "entropy_mean"),
    (dict(entropy="0.5"), TypeError, "entropy"),
    (dict(entropy={"entropy_mean": 0.5, "n_tokens": 3}, n_tokens=3), TypeError, "n_tokens"),
])
def test_observe_rejects_bad_measurements(bad, error, match):
    c = AdaptiveClip(target_entropy=1.0)
    before = c.state_dict()
    with pytest.raises(error, match=match):
        c.observe(**bad)
        c.update()
    assert c.state_dict() == before
    with pytest.warns(fused_pg.NothingObservedWarning):  # the bad measurement was not recorded
        assert c.update() == 0.0


def test_a_non_finite_tensor_observation_fails_at_update_and_is_dropped():
    c = AdaptiveClip(target_entropy=1.0)
    before = c.state_dict()
    c.observe(torch.tensor(math.nan), n_tokens=torch.tensor(5.0))  # checked at the sync point
    with pytest.raises(ValueError, match="entropy"):
        c.update()
    assert c.state_dict() == before  # nothing assigned; the bad observations are discarded
    with pytest.warns(fused_pg.NothingObservedWarning):
        assert c.update() == 0.0


# --- state_dict / load_state_dict / from_state_dict -----------------------------------------------

@pytest.mark.parametrize("make", CONTROLLERS, ids=CONTROLLER_IDS)
def test_from_state_dict_needs_no_constructor_arguments(make):
    a = make()
    for h in (0.3, 1.2, 0.7):
        a.update(h)
    a.observe(0.9, n_tokens=12)  # a checkpoint taken mid-accumulation keeps its observations
    state = json.loads(json.dumps(a.state_dict()))
    b = type(a).from_state_dict(state)
    assert type(b) is type(a) and b.state_dict() == a.state_dict()
    c = fused_pg.EntropyController.from_state_dict(state)  # the base class picks the class
    assert type(c) is type(a) and c.state_dict() == a.state_dict()
    for h in (0.1, 2.0):
        assert a.update(h) == b.update(h) == c.update(h)


def _clip_state():
    c = AdaptiveClip(target_entropy=0.8, eps_low=0.2, eps_high=0.3, rate=0.07, adapt_low=True,
                     bounds=(0.1, 0.5), low_bounds=(0.05, 0.3))
    c.update(0.5)
    return c.state_dict()


BAD_STATES = [
    ("missing key", lambda s: {k: v for k, v in s.items() if k != "entropy_ema"}, ValueError, "missing.*entropy_ema"),
    ("missing late key", lambda s: {k: v for k, v in s.items() if k != "low_bounds"}, ValueError, "low_bounds"),
    ("unknown key", lambda s: {**s, "eps_hihg": 0.3}, ValueError, "unknown.*eps_hihg"),
    ("eps_high above bounds", lambda s: {**s, "value": 0.9}, ValueError, "eps_high"),
    ("eps_high below bounds", lambda s: {**s, "value": 0.01}, ValueError, "eps_high"),
    ("eps_low outside low_bounds", lambda s: {**s, "eps_low": 0.35}, ValueError, "eps_low"),
    ("eps_low >= 1", lambda s: {**s, "eps_low": 1.0, "adapt_low": False}, ValueError, "eps_low"),
    ("NaN entropy_ema", lambda s: {**s, "entropy_ema": math.nan}, ValueError, "entropy_ema"),
    ("inf entropy_ema", lambda s: {**s, "entropy_ema": math.inf}, ValueError, "entropy_ema"),
    ("string entropy_ema", lambda s: {**s, "entropy_ema": "0.5"}, TypeError, "entropy_ema"),
    ("NaN target", lambda s: {**s, "target_entropy": math.nan}, ValueError, "target_entropy"),
    ("negative rate", lambda s: {**s, "rate": -0.1}, ValueError, "rate"),
    ("bad bounds", lambda s: {**s, "bounds": [0.5, 0.1]}, ValueError, "bounds"),
    ("negative steps", lambda s: {**s, "steps": -1}, ValueError, "steps"),
    ("fractional steps", lambda s: {**s, "steps": 1.5}, ValueError, "steps"),
    ("string adapt_low", lambda s: {**s, "adapt_low": "false"}, TypeError, "adapt_low"),
    ("negative pending tokens", lambda s: {**s, "pending_tokens": -2.0}, ValueError, "pending_tokens"),
    ("NaN pending sum", lambda s: {**s, "pending_entropy_sum": math.nan}, ValueError, "pending_entropy_sum"),
    ("another controller", lambda s: {**s, "controller": "AdaptiveRepoCoef"}, ValueError, "AdaptiveRepoCoef"),
    ("no controller name", lambda s: {k: v for k, v in s.items() if k != "controller"}, ValueError, "controller"),
    ("not a mapping", lambda s: list(s.items()), TypeError, "state"),
]


@pytest.mark.parametrize("name,corrupt,error,match", BAD_STATES, ids=[b[0] for b in BAD_STATES])
def test_load_state_dict_validates_everything_before_assigning_anything(name, corrupt, error, match):
    target = AdaptiveClip(target_entropy=2.0, eps_low=0.1, eps_high=0.4, rate=0.01, adapt_low=True,
                          bounds=(0.1, 0.5), low_bounds=(0.05, 0.3))
    target.update(1.0)
    before = target.state_dict()
    with pytest.raises(error, match=match):
        target.load_state_dict(corrupt(_clip_state()))
    assert target.state_dict() == before  # atomic: a failed load changes nothing
    with pytest.raises(error, match=match):
        AdaptiveClip.from_state_dict(corrupt(_clip_state()))


def test_loading_another_controllers_state_fails_both_ways():
    clip, coef = AdaptiveClip(target_entropy=1.0), AdaptiveRepoCoef(target_entropy=1.0, repo_coef=0.5)
    clip_before, coef_before = clip.state_dict(), coef.state_dict()
    with pytest.raises(ValueError, match="AdaptiveRepoCoef"):
        clip.load_state_dict(coef.state_dict())
    with pytest.raises(ValueError, match="AdaptiveClip"):
        coef.load_state_dict(clip.state_dict())
    assert clip.state_dict() == clip_before and coef.state_dict() == coef_before


def test_repo_coef_state_outside_bounds_is_rejected():
    c = AdaptiveRepoCoef(target_entropy=1.0, repo_coef=0.5)
    state = {**c.state_dict(), "value": 1.5}
    with pytest.raises(ValueError, match="repo_coef"):
        c.load_state_dict(state)
    assert c.repo_coef == 0.5


def test_adapt_low_must_be_a_bool():
    with pytest.raises(TypeError, match="adapt_low"):
        AdaptiveClip(target_entropy=1.0, adapt_low="no")


def test_saturated_says_when_the_value_is_pinned_at_the_bound_the_error_pushes_toward():
    c = AdaptiveClip(target_entropy=1.0, eps_high=0.3, bounds=(0.1, 0.4), rate=0.5)
    assert not c.saturated  # no measurement yet
    c.update(0.5)  # below target: eps_high rises to its upper bound
    assert c.eps_high == 0.4 and c.saturated
    c.update(1.5)  # above target: it comes down, off the bound
    assert c.eps_high < 0.4 and not c.saturated
    for _ in range(5):
        c.update(3.0)
    assert c.eps_high == 0.1 and c.saturated
    c.update(0.9)  # off the lower bound again: the error now pushes up
    assert 0.1 < c.eps_high < 0.4 and not c.saturated


def test_the_adapo_in_practice_example_runs_as_written(capsys):
    """The "ADAPO in practice" code block of docs/entropy-dynamics.md: gradient accumulation
    with observe/update, and a resume through from_state_dict."""
    from pathlib import Path
    import re

    doc = (Path(__file__).resolve().parents[1] / "docs" / "entropy-dynamics.md").read_text()
    section = doc.split("## ADAPO in practice")[1].split("\n## ")[0]
    blocks = re.findall(r"```python\n(.*?)\n```", section, flags=re.S)
    assert len(blocks) == 1
    namespace: dict = {}
    exec(compile(blocks[0], "docs/entropy-dynamics.md (ADAPO in practice)", "exec"), namespace)
    ctrl = namespace["ctrl"]
    assert isinstance(ctrl, AdaptiveClip) and ctrl.steps == 3
    assert ctrl.state_dict() == namespace["checkpoint"]["adapo"]
    assert len(capsys.readouterr().out.splitlines()) == 3


# --- one step from the observations of every rank ------------------------------------------------

def _controller_step_over_ranks(rank: int, world: int) -> dict:
    import torch.distributed as dist

    ctrl = AdaptiveClip(target_entropy=1.0, eps_high=0.28, rate=0.1)
    # rank r: two micro-batches of different sizes and entropies (one empty)
    ctrl.observe(torch.tensor(0.5 + rank), torch.tensor(10.0 * (rank + 1)))
    ctrl.observe(torch.tensor(7.0), torch.tensor(0.0))
    ctrl.observe({"entropy_mean": torch.tensor(2.0 - rank), "n_tokens": torch.tensor(5.0)})
    change = ctrl.update(process_group=dist.group.WORLD)
    return {"eps_high": ctrl.eps_high, "change": change, "ema": ctrl.entropy_ema}


@pytest.mark.parametrize("world", [2, 3])
def test_update_over_a_process_group_steps_every_rank_alike(world):
    """update(process_group=...) takes one step from the token-weighted observations of all
    ranks: every rank ends with the same value, that of one controller fed them all."""
    from helpers.multiproc import run_group

    per_rank = run_group(world, [("step", _controller_step_over_ranks)])
    one = AdaptiveClip(target_entropy=1.0, eps_high=0.28, rate=0.1)
    for rank in range(world):
        one.observe(0.5 + rank, 10.0 * (rank + 1))
        one.observe(2.0 - rank, 5.0)
    expected = one.update()
    for result in per_rank:
        r = result["step"]
        assert math.isclose(r["change"], expected, rel_tol=1e-12, abs_tol=1e-15)
        assert math.isclose(r["eps_high"], one.eps_high, rel_tol=1e-12)
        assert math.isclose(r["ema"], one.entropy_ema, rel_tol=1e-12)


# --- REPO-R's multiplicative law ------------------------------------------------------------------

def test_multiplicative_law_doubles_halves_and_flips_the_sign_at_zeta_min():
    c = AdaptiveRepoCoef(target_entropy=1.0, repo_coef=0.1, mode="multiplicative", bounds=(0.05, 0.4))
    trajectory = []
    for h in (0.5, 0.5, 0.5, 0.5):  # below target: more entropy, |zeta| doubles up to zeta_max
        c.update(h)
        trajectory.append(c.repo_coef)
    assert trajectory == [0.2, 0.4, 0.4, 0.4] and c.saturated
    assert c.controlled() == {"repo_coef": 0.4}
    trajectory = []
    for h in (2.0,) * 7:  # above target: halve, cross to -zeta_min, then grow the negative side
        c.update(h)
        trajectory.append(c.repo_coef)
    assert trajectory == [0.2, 0.1, 0.05, -0.05, -0.1, -0.2, -0.4] and c.saturated
    c.update(1.0)  # on target: no change
    assert c.repo_coef == -0.4
    c.update(0.0)  # below again: the negative zeta shrinks toward the flip
    assert c.repo_coef == -0.2 and not c.saturated
    assert c.steps == 13


@settings(max_examples=n_examples(40))
@given(target=st.floats(0, 5), start=st.floats(-1.0, 1.0).filter(lambda z: abs(z) >= 1e-3),
       factor=st.floats(1.05, 4.0), smoothing=st.floats(0, 0.9), hs=st.lists(st.floats(0, 10), min_size=1, max_size=30))
def test_multiplicative_law_is_monotone_and_bounded(target, start, factor, smoothing, hs):
    """Every step moves zeta toward more entropy (up) while the smoothed entropy is below target
    and toward less (down) while above, never leaves |zeta| in [zeta_min, zeta_max], never 0."""
    lo, hi = 1e-3, 1.0
    c = AdaptiveRepoCoef(target_entropy=target, repo_coef=start, mode="multiplicative", factor=factor,
                         bounds=(lo, hi), smoothing=smoothing)
    for h in hs:
        before = c.repo_coef
        change = c.update(h)
        assert lo <= abs(c.repo_coef) <= hi
        assert change == c.repo_coef - before
        err = target - c.entropy_ema
        if err > 0:
            assert c.repo_coef >= before and (c.repo_coef > before or before == hi)
        elif err < 0:
            assert c.repo_coef <= before and (c.repo_coef < before or before == -hi)
        else:
            assert c.repo_coef == before
    count_example()


def test_multiplicative_controller_drives_repo_r_through_its_config():
    from fused_pg import LossConfig

    c = AdaptiveRepoCoef(target_entropy=1.0, repo_coef=0.01, mode="multiplicative")
    for _ in range(3):
        c.update(3.0)  # above target: 0.01 -> 0.005 -> 0.0025 -> 0.00125
    for _ in range(6):
        c.update(3.0)  # ... past zeta_min = 1e-4: the sign flips
    assert c.repo_coef < 0
    cfg = c.apply(LossConfig(repo="relative", repo_center="state"))
    assert cfg.repo_coef == c.repo_coef
    with pytest.raises(ValueError, match="repo_coef must be >= 0 for repo='decorrelate'"):
        c.apply(LossConfig(repo="decorrelate"))  # a negative zeta belongs to REPO-R only


@pytest.mark.parametrize("kw,error,match", [
    (dict(mode="exponential"), ValueError, "mode"),
    (dict(mode="multiplicative", factor=1.0), ValueError, "factor"),
    (dict(mode="multiplicative", factor=math.nan), ValueError, "factor"),
    (dict(mode="multiplicative", bounds=(0.0, 1.0)), ValueError, "zeta_min > 0"),
    (dict(mode="multiplicative", repo_coef=0.0), ValueError, "repo_coef"),
    (dict(mode="multiplicative", repo_coef=-2.0), ValueError, "repo_coef"),
    (dict(mode="multiplicative", repo_coef=1e-5), ValueError, "repo_coef"),
    (dict(mode="additive", repo_coef=-0.1), ValueError, "repo_coef"),
])
def test_multiplicative_bad_arguments(kw, error, match):
    with pytest.raises(error, match=match):
        AdaptiveRepoCoef(target_entropy=1.0, **{"repo_coef": 0.5, **kw})


def test_repo_r_closes_the_loop_on_a_toy_policy():
    """A few optimiser steps of REPO-R with the multiplicative controller: the entropy is far
    below the target, so zeta doubles every step (it only ever sees the reported entropy_mean)."""
    torch.manual_seed(0)
    h, W, y, adv, old, mask = _batch(seed=5)
    W = (W * 4).requires_grad_()
    ctrl = AdaptiveRepoCoef(target_entropy=10.0, repo_coef=0.01, mode="multiplicative")
    opt = torch.optim.SGD([W], lr=0.1)
    seen = []
    for _ in range(4):
        out = repo_loss(h, W, y, adv, old, mask, repo="relative", repo_center="state", repo_coef=ctrl.repo_coef)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        ctrl.update(out.metrics)
        seen.append(ctrl.repo_coef)
    assert seen == [0.02, 0.04, 0.08, 0.16]


# --- what a controller refuses: unmeasured entropies, empty steps, bad tensors --------------------

@pytest.mark.parametrize("make", CONTROLLERS, ids=CONTROLLER_IDS)
def test_a_controller_refuses_an_entropy_that_was_not_measured(make):
    """policy_loss_from_logprobs without entropy= reports entropy_mean NaN with entropy_measured
    0: observing it raises (it used to be read as 0 nats and drive eps_high to its bound)."""
    lp = -torch.rand(2, 6) - 0.1
    metrics = fused_pg.policy_loss_from_logprobs(lp, torch.randn(2), None, repo="none").metrics
    c = make()
    c.update(0.7)
    before = c.state_dict()
    for call in (lambda: c.observe(metrics), lambda: c.update(metrics)):
        with pytest.raises(ValueError, match="entropy_measured == 0"):
            call()
    assert c.state_dict() == before
    # the NaN itself, observed as a tensor without the flag, fails at the step
    c.observe(metrics["entropy_mean"], metrics["n_tokens"])
    with pytest.raises(ValueError, match="NaN means not measured"):
        c.update()
    assert c.state_dict() == before


def test_repo_loss_module_refuses_to_observe_an_unmeasured_entropy():
    from fused_pg import RepoLoss

    module = RepoLoss(repo="none", controller=AdaptiveClip(target_entropy=1.0))
    lp = -torch.rand(2, 6, requires_grad=True)
    with pytest.raises(ValueError, match="entropy_measured == 0"):
        module.from_logprobs(lp, torch.randn(2))
    out = module.from_logprobs(lp, torch.randn(2), entropy=torch.rand(2, 6))
    assert out.metrics["entropy_measured"] == 1.0 and module.update_controller() != 0.0


def test_adapo_loss_without_observing_warns_at_the_step():
    """adapo_loss(..., controller=) does not observe: the step that follows says so."""
    h, W, y, adv, old, mask = _batch()
    ctrl = AdaptiveClip(target_entropy=5.0)
    adapo_loss(h, W, y, adv, old, mask, controller=ctrl)
    with pytest.warns(fused_pg.NothingObservedWarning, match="adapo_loss"):
        assert ctrl.update() == 0.0
    assert ctrl.steps == 0 and ctrl.eps_high == 0.28


@pytest.mark.parametrize("entropy,n_tokens", [
    (torch.tensor(0.5), torch.tensor(-2.0)),              # a negative count, even if the window's total is >= 0
    (torch.tensor(math.nan), torch.tensor(0.0)),          # NaN is refused whatever the count (as a float is)
    (torch.tensor(0.5), torch.tensor(math.inf)),
])
def test_invalid_tensor_observations_fail_the_step_whatever_the_window(entropy, n_tokens):
    c = AdaptiveClip(target_entropy=1.0)
    c.observe(torch.tensor(0.7), torch.tensor(10.0))
    c.observe(entropy, n_tokens)
    before = c.state_dict()
    assert before["pending_bad_entropy"] + before["pending_bad_tokens"] == 1
    with pytest.raises(ValueError, match="entropy must be finite|n_tokens must be finite"):
        c.update()
    assert c.steps == 0 and c.eps_high == 0.28
    with pytest.raises(ValueError, match="entropy"):
        c.observe(math.nan, 0)  # the float form raises at once, also with no tokens


def test_a_state_dict_taken_after_an_invalid_observation_loads_and_fails_the_same_step():
    a = AdaptiveClip(target_entropy=1.0, rate=0.1)
    a.observe(torch.tensor(0.4), torch.tensor(3.0))
    a.observe(torch.tensor(math.nan), torch.tensor(5.0))
    state = json.loads(json.dumps(a.state_dict()))  # plain, finite numbers
    b = AdaptiveClip.from_state_dict(state)
    for c in (a, b):
        with pytest.raises(ValueError, match="1 observation"):
            c.update()
    assert a.state_dict() == b.state_dict()


def test_version_1_states_still_load():
    c = AdaptiveRepoCoef(target_entropy=1.0, repo_coef=0.3)
    c.observe(0.5, n_tokens=4)
    v2 = c.state_dict()
    v1 = {k: v for k, v in v2.items() if k not in ("pending_observations", "pending_bad_entropy",
                                                    "pending_bad_tokens", "mode", "factor")}
    v1["version"] = 1
    d = AdaptiveRepoCoef.from_state_dict(v1)
    assert d.state_dict() == v2 and d.mode == "additive"
    assert d.update() == c.update()


def test_update_over_a_process_group_warns_only_when_no_rank_observed():
    from helpers.multiproc import run_group

    def job(rank, world):
        import warnings

        import torch.distributed as dist

        ctrl = AdaptiveClip(target_entropy=1.0, eps_high=0.28, rate=0.1)
        if rank == 0:
            ctrl.observe(torch.tensor(0.5), torch.tensor(8.0))
        with warnings.catch_warnings(record=True) as first:
            warnings.simplefilter("always")
            change = ctrl.update(process_group=dist.group.WORLD)  # rank 1 observed nothing itself
        with warnings.catch_warnings(record=True) as second:
            warnings.simplefilter("always")
            ctrl.update(process_group=dist.group.WORLD)  # nobody observed anything
        return dict(change=change, first=len(first), second=[str(w.category.__name__) for w in second])

    for r in run_group(2, [("step", job)]):
        r = r["step"]
        assert r["change"] == pytest.approx(0.05) and r["first"] == 0
        assert r["second"] == ["NothingObservedWarning"]


@pytest.mark.parametrize("as_tensor", [False, True])
def test_observe_from_many_threads_loses_nothing(as_tensor):
    """observe() holds the controller's lock: 8 threads x 500 observations all arrive."""
    import threading

    c = AdaptiveClip(target_entropy=1.0, rate=0.01)
    value = (lambda: torch.tensor(0.5)) if as_tensor else (lambda: 0.5)

    def feed():
        for _ in range(500):
            c.observe(value(), n_tokens=torch.tensor(1.0) if as_tensor else 1)

    import sys

    threads = [threading.Thread(target=feed) for _ in range(8)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show up, if any
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    state = c.state_dict()
    assert state["pending_observations"] == 4000 and state["pending_tokens"] == 4000.0
    assert state["pending_entropy_sum"] == 2000.0
    assert c.update() == pytest.approx(0.005)


def test_copies_and_pickles_keep_working():
    import pickle

    c = AdaptiveRepoCoef(target_entropy=1.0, repo_coef=0.2, mode="multiplicative")
    c.observe(0.5, n_tokens=3)
    for other in (copy.deepcopy(c), pickle.loads(pickle.dumps(c))):
        assert other.state_dict() == c.state_dict()
        other.observe(0.1)  # its own lock and observations
        assert other.state_dict()["pending_observations"] == 2 and c.state_dict()["pending_observations"] == 1


def _measured_or_not(case) -> None:
    """policy_loss_from_logprobs on a drawn case, with entropies or without (what needs them left
    out): its metrics follow the NaN convention, and a controller fed them either steps on a real
    measurement or refuses; a step after a refusal says that nothing was observed."""
    from helpers import check_metric_convention, logprob_case

    with_entropy = case.head.seed % 2 == 0
    lc = logprob_case(case, with_entropy)
    o = lc.case.opts
    out = fused_pg.policy_loss_from_logprobs(lc.logprobs, lc.inp.advantages, lc.inp.old_logprobs, lc.mask,
                                             entropy=lc.entropy, **lc.inp.tensors(), **lc.loss_opts)
    check_metric_convention(out.metrics, o["repo"], cov_measured=with_entropy or o["repo_center"] != "state")
    for make in CONTROLLERS:
        ctrl = make()
        before = ctrl.state_dict()
        if not with_entropy:
            with pytest.raises(ValueError, match="entropy_measured == 0"):
                ctrl.observe(out.metrics)
            assert ctrl.state_dict() == before
            with pytest.warns(fused_pg.NothingObservedWarning):
                assert ctrl.update() == 0.0
        else:
            ctrl.observe(out.metrics)
            change = ctrl.update()
            assert math.isfinite(change) and math.isfinite(ctrl.value)
            if float(out.metrics["n_tokens"]) == 0:
                assert change == 0.0 and ctrl.steps == 0
            else:
                assert ctrl.steps == 1 and ctrl.entropy_ema == pytest.approx(float(out.metrics["entropy_mean"]))
        assert ctrl.state_dict()["pending_observations"] == 0


def test_unmeasured_values_never_reach_a_controller():
    from helpers import loss_cases, run_property

    run_property(loss_cases("reference", dtypes=("fp64", "fp32")), _measured_or_not, examples=30)
