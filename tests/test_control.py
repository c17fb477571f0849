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
], ids=["AdaptiveClip", "AdaptiveRepoCoef"])
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
    ref = fused_pg.reference.repo_loss_ref(h.double(), W.double(), y, adv.double(), old.double(), mask,
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
