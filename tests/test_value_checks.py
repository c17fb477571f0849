"""Every public input that can carry NaN, a negative count or an out-of-range value is checked
where ``validate`` says, or is provably harmless.

For each public function and each such input, over generated batches: a bad value where it
counts raises ``ValueError`` naming the argument when ``validate=True`` (the CPU default);
the same value at a token that does not count changes nothing, bit for bit, whatever
``validate`` says; and the inputs the losses guard without reading them (target ids outside
``[0, V)`` or excluded by a -inf bias, malformed ``cu_seqlens``) are harmless unchecked too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import pytest
import torch
from hypothesis import strategies as st

from fused_pg import RepoStats, fused_logprobs_entropy, policy_loss_from_logprobs, repo_loss, repo_statistics
from helpers import assert_close, run_property


# ---------------------------------------------------------------------------------------------
# the items the probe found
# ---------------------------------------------------------------------------------------------

def _stats(**change) -> RepoStats:
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(20, generator=g, dtype=torch.float64) - 0.5
    stats = repo_statistics(lp, torch.randn(20, generator=g, dtype=torch.float64) + lp)
    return replace(stats, **{k: torch.tensor(v, dtype=torch.float64) for k, v in change.items()})


@pytest.mark.parametrize("field,value", [("m2_logprob", math.nan), ("co_moment", math.nan), ("count", -3.0),
                                         ("count", math.inf), ("m2_logprob", -1.0), ("mean_logprob", 0.5),
                                         ("mean_advantage", -math.inf)])
@pytest.mark.parametrize("fn", ["repo_loss", "policy_loss_from_logprobs"])
def test_repo_stats_are_value_checked(field, value, fn):
    """A NaN variance used to turn REPO off silently, NaN statistics gave NaN gradients and a
    negative count was accepted: refused by name where validate says (default on CPU)."""
    g = torch.Generator().manual_seed(1)
    h, W = torch.randn(2, 4, 6, generator=g), torch.randn(9, 6, generator=g)
    y, adv = torch.randint(0, 9, (2, 4), generator=g), torch.randn(2, generator=g)
    bad = _stats(**{field: value})
    call = (lambda **kw: repo_loss(h, W, y, adv, **kw)) if fn == "repo_loss" else \
        (lambda **kw: policy_loss_from_logprobs(-torch.rand(2, 4, generator=g), adv, **kw))
    with pytest.raises(ValueError, match=f"repo_stats.{field}"):
        call(repo_stats=bad)
    with pytest.raises(ValueError, match=f"repo_stats.{field}"):
        call(repo_stats=bad, validate=True)
    assert torch.isfinite(call(repo_stats=_stats()).loss)  # a sound one passes


@pytest.mark.parametrize("change,match", [
    (dict(mask=torch.tensor([[1, 2, 0, 1]])), "mask"),
    (dict(mask=torch.tensor([[1.0, 0.5, 0.0, 1.0]])), "mask"),
    (dict(logprobs=torch.tensor([[-1.0, 0.3, -0.2, -2.0]])), "logprobs"),
    (dict(logprobs=torch.tensor([[-1.0, math.nan, -0.2, -2.0]])), "logprobs"),
    (dict(advantages=torch.tensor([math.inf])), "advantages"),
    (dict(cu_seqlens=torch.tensor([0, 3, 2, 4]), logprobs=-torch.ones(4), advantages=torch.ones(3)), "cu_seqlens"),
])
def test_repo_statistics_checks_values_as_the_loss_does(change, match):
    """repo_statistics used to accept a mask value 2 and log-probs > 0, which the loss refuses."""
    args = dict(logprobs=-torch.rand(1, 4) - 0.1, advantages=torch.ones(1), mask=torch.ones(1, 4))
    args.update(change)
    if "cu_seqlens" in args:
        args.pop("mask")
    with pytest.raises(ValueError, match=match):
        repo_statistics(**args)
    repo_statistics(**args, validate=False)  # unchecked: no error, no out-of-bounds read


# ---------------------------------------------------------------------------------------------
# the invariant, over generated inputs
# ---------------------------------------------------------------------------------------------

@dataclass
class Batch:
    """One generated batch, dense [B, T] (or packed [N] with cu_seqlens), float64, with at least
    one token that counts and one that does not (masked)."""

    h: torch.Tensor
    W: torch.Tensor
    b: torch.Tensor
    y: torch.Tensor
    adv: torch.Tensor
    old: torch.Tensor
    ref: torch.Tensor
    rollout: torch.Tensor
    weights: torch.Tensor
    mask: torch.Tensor
    lp: torch.Tensor
    ent: torch.Tensor
    cu: torch.Tensor | None

    @property
    def counted(self) -> int:  # flat index of a token that counts
        return int(self.mask.reshape(-1).nonzero()[0])

    @property
    def masked(self) -> int:  # flat index of a token that does not
        return int((~self.mask.reshape(-1)).nonzero()[0])


@st.composite
def batches(draw):
    packed = draw(st.booleans())
    B, T = draw(st.integers(1, 3)), draw(st.integers(2, 6))
    V, D = draw(st.integers(3, 11)), draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    lead = (B * T,) if packed else (B, T)
    N = B * T
    mask = torch.rand(N, generator=g) > 0.4
    mask[draw(st.integers(0, N - 1))] = True
    mask[draw(st.integers(0, N - 1).filter(lambda i: not mask[i]))] = False
    f64 = dict(dtype=torch.float64)
    b = 0.3 * torch.randn(V, generator=g, **f64)
    b[-1] = -math.inf  # id V - 1 is excluded
    return Batch(
        h=torch.randn(*lead, D, generator=g, **f64), W=torch.randn(V, D, generator=g, **f64), b=b,
        y=torch.randint(0, V - 1, lead, generator=g),
        adv=torch.randn(lead, generator=g, **f64), old=-torch.rand(lead, generator=g, **f64) - 0.1,
        ref=-torch.rand(lead, generator=g, **f64) - 0.1, rollout=-torch.rand(lead, generator=g, **f64) - 0.1,
        weights=torch.rand(lead, generator=g, **f64) + 0.5, mask=mask.view(lead),
        lp=-torch.rand(lead, generator=g, **f64) - 0.1, ent=torch.rand(lead, generator=g, **f64),
        cu=torch.arange(0, N + 1, T) if packed else None)


OPTIONS = dict(kl_coef=0.1, tis_cap=2.0, entropy_coef=0.01, repo="decorrelate", repo_coef=0.5,
               aggregation="seq-mean-token-mean")


def _loss(x: Batch, mask=None, **kw):
    h, W, b = (t.detach().clone().requires_grad_() for t in (x.h, x.W, x.b))
    out = repo_loss(h, W, x.y, x.adv, x.old, x.mask if mask is None else mask, bias=b, ref_logprobs=x.ref, rollout_logprobs=x.rollout,
                    weights=x.weights, cu_seqlens=x.cu, **OPTIONS, **kw)
    out.loss.backward()
    return [out.loss, h.grad, W.grad, b.grad]


def _from_logprobs(x: Batch, mask=None, **kw):
    lp, ent = x.lp.detach().clone().requires_grad_(), x.ent.detach().clone().requires_grad_()
    out = policy_loss_from_logprobs(lp, x.adv, x.old, x.mask if mask is None else mask, entropy=ent, ref_logprobs=x.ref,
                                    rollout_logprobs=x.rollout, weights=x.weights, cu_seqlens=x.cu, **OPTIONS, **kw)
    out.loss.backward()
    return [out.loss, lp.grad, ent.grad]


def _statistics(x: Batch, mask=None, **kw):
    return [repo_statistics(x.lp, x.adv, x.mask if mask is None else mask, cu_seqlens=x.cu, **kw).as_tensor()]


def _head(x: Batch, **kw):
    h, W, b = (t.detach().clone().requires_grad_() for t in (x.h, x.W, x.b))
    y = torch.where(x.mask, x.y, -100)  # the head's "does not count": ignore_index
    out = fused_logprobs_entropy(h, W, y, bias=b, **kw)
    (out.logprobs.sum() + 0.5 * out.entropy.sum()).backward()
    return [out.logprobs, out.entropy, h.grad, W.grad, b.grad]


FUNCTIONS: dict[str, Callable] = {"repo_loss": _loss, "policy_loss_from_logprobs": _from_logprobs,
                                  "repo_statistics": _statistics, "fused_logprobs_entropy": _head}


def _at(x: Batch, field: str, index: int, value) -> Batch:
    """``field`` with ``value`` at token ``index`` (hidden: its whole row; weight, bias: entry 0)."""
    t = getattr(x, field).clone()
    if field == "h":
        t.view(-1, t.shape[-1])[index] = value
    else:
        t.view(-1)[index if field not in ("W", "b") else 0] = value
    return replace(x, **{field: t})


@dataclass(frozen=True)
class Bad:
    """One bad input: ``field`` of the batch gets ``value`` at one token (``per_token``: both at
    a token that counts and at one that does not) or as a whole keyword argument."""

    functions: tuple[str, ...]
    field: str
    value: object
    match: str
    per_token: bool = True
    guarded: bool = False   # harmless unchecked: the same as not counting the token

    def apply(self, x: Batch, index: int) -> tuple[Batch, dict]:
        if self.field.startswith("kw:"):
            return x, {self.field[3:]: self.value(x) if callable(self.value) else self.value}
        value = self.value(x) if callable(self.value) else self.value
        return _at(x, self.field, index, value), {}


LOSSES = ("repo_loss", "policy_loss_from_logprobs")
ALL = LOSSES + ("repo_statistics",)
HEAD = ("repo_loss", "fused_logprobs_entropy")
BAD = [
    Bad(HEAD, "h", math.nan, "hidden"),
    Bad(HEAD, "h", -math.inf, "hidden"),
    Bad(HEAD, "W", math.nan, "weight", per_token=False),
    Bad(HEAD, "b", math.nan, "bias", per_token=False),
    Bad(HEAD, "b", math.inf, "bias", per_token=False),
    Bad(HEAD, "y", lambda x: x.W.shape[0] + 2, "targets", guarded=True),
    Bad(HEAD, "y", -5, "targets", guarded=True),
    Bad(HEAD, "y", lambda x: x.W.shape[0] - 1, "targets", guarded=True),  # bias -inf: an excluded id
    Bad(ALL, "adv", math.nan, "advantages"),
    Bad(ALL, "adv", math.inf, "advantages"),
    Bad(LOSSES, "old", math.nan, "old_logprobs"),
    Bad(LOSSES, "old", 0.5, "old_logprobs"),
    Bad(LOSSES, "ref", math.nan, "ref_logprobs"),
    Bad(LOSSES, "ref", 2.0, "ref_logprobs"),
    Bad(LOSSES, "rollout", -math.inf, "rollout_logprobs"),
    Bad(LOSSES, "weights", math.nan, "weights"),
    Bad(("policy_loss_from_logprobs", "repo_statistics"), "lp", math.nan, "logprobs"),
    Bad(("policy_loss_from_logprobs", "repo_statistics"), "lp", 0.7, "logprobs"),
    Bad(("policy_loss_from_logprobs",), "ent", math.nan, "entropy"),
    Bad(("policy_loss_from_logprobs",), "ent", -0.5, "entropy"),
    Bad(ALL, "kw:mask", lambda x: x.mask.long() * 2, "mask", per_token=False),
    Bad(ALL, "kw:mask", lambda x: x.mask.double() * 0.5, "mask", per_token=False),
    Bad(LOSSES, "kw:num_items_in_batch", torch.tensor(math.nan), "num_items_in_batch", per_token=False),
    Bad(LOSSES, "kw:num_items_in_batch", torch.tensor(-4.0), "num_items_in_batch", per_token=False),
    Bad(LOSSES, "kw:num_items_in_batch", torch.tensor(math.inf), "num_items_in_batch", per_token=False),
    Bad(LOSSES, "kw:kl_num_items_in_batch", torch.tensor(0.0), "kl_num_items_in_batch", per_token=False),
    Bad(LOSSES, "kw:entropy_num_items_in_batch", torch.tensor(-1.0), "entropy_num_items_in_batch", per_token=False),
    Bad(LOSSES, "kw:repo_stats", lambda x: _stats(count=-2.0), "repo_stats", per_token=False),
    Bad(LOSSES, "kw:repo_stats", lambda x: _stats(m2_logprob=math.nan), "repo_stats", per_token=False),
    Bad(LOSSES, "kw:repo_stats", lambda x: _stats(mean_logprob=1.0), "repo_stats", per_token=False),
]
CU_BAD = [lambda n, T: [0, n + 4, n], lambda n, T: [0, n, 0, n], lambda n, T: [-2, T, n], lambda n, T: [0, n - 1]]


def _same(name: str, want: list, got: list) -> None:
    for i, (a, c) in enumerate(zip(want, got)):
        if a is None:
            assert c is None, f"{name}: output {i}"
            continue
        assert torch.equal(a, c), f"{name}: output {i} changed:\n{a}\n{c}"


def _check_bad_inputs(x: Batch) -> None:
    clean = {fn: FUNCTIONS[fn](x) for fn in FUNCTIONS}
    for bad in BAD:
        for fn in bad.functions:
            call = FUNCTIONS[fn]
            name = f"{fn}({bad.field} = {bad.value if not callable(bad.value) else 'bad'})"
            y, kw = bad.apply(x, x.counted)
            with pytest.raises(ValueError, match=bad.match):
                call(y, validate=True, **kw)
            if bad.per_token:  # where the token does not count: nothing changes, checked or not
                y, kw = bad.apply(x, x.masked)
                for validate in (True, False):
                    _same(f"{name} at a token that does not count, validate={validate}", clean[fn],
                          call(y, validate=validate, **kw))
            if bad.guarded:  # unchecked where it counts: the same as that token not counting
                y, kw = bad.apply(x, x.counted)
                masked = replace(x, mask=_at(x, "mask", x.counted, False).mask)
                got, want = call(y, validate=False, **kw), FUNCTIONS[fn](masked, validate=False)
                for i, (a, c) in enumerate(zip(want, got)):
                    if a is not None:
                        assert_close(f"{name} unchecked vs not counted, output {i}", a, c, atol=1e-12, rtol=1e-10)
    if x.cu is not None:  # malformed offsets: refused by name, or guarded (nothing read out of bounds)
        n, T = x.y.numel(), int(x.cu[1])
        for make in CU_BAD:
            cu = torch.tensor(make(n, T))
            for fn in LOSSES + ("repo_statistics",):
                with pytest.raises(ValueError, match="cu_seqlens"):
                    FUNCTIONS[fn](replace(x, cu=cu), validate=True)
                for t in FUNCTIONS[fn](replace(x, cu=cu), validate=False):
                    assert t is None or torch.isfinite(t).all(), f"{fn}: unchecked cu_seqlens {cu.tolist()}"


def test_bad_values_are_refused_by_name_or_harmless():
    run_property(batches(), _check_bad_inputs, examples=12)
