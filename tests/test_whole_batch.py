"""The sum over data-parallel ranks, or over gradient-accumulation micro-batches, equals one
process on the whole batch: for every aggregation (each term's own, too) and every padding.

Generated batches of sequences of any length are split into consecutive parts, each padded
to its own length (the longest sequence it holds plus some extra padding); the whole batch is
padded to the longest of those. Normalisers that depend on the whole batch -- token and
sequence counts, Dr.GRPO's length -- must be the whole batch's:

* ``parallel=DataParallel(group)`` on 2 and 3 gloo ranks makes them global itself: the sum of
  the ranks' losses and the ranks' gradients equal one process on the whole batch, and every
  rank's metrics are the whole batch's;
* gradient accumulation gets them from the caller (``repo_stats`` merged from
  ``repo_statistics``, ``num_items_in_batch`` and the per-term normalisers, ``max_length``),
  and a Dr.GRPO normaliser without ``max_length`` is refused: the default length, each
  micro-batch's own T, is not the whole batch's.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import fused_pg
from fused_pg.config import AGGREGATIONS, KL_ESTIMATORS
from helpers import assert_close, n_examples, run_property
from helpers.multiproc import run_group

DRGRPO = "seq-mean-token-sum-norm"


@dataclass
class Split:
    lengths: tuple[int, ...]   # valid-length of each sequence (before the random mask)
    parts: tuple[int, ...]     # sequences in each consecutive part
    extra: tuple[int, ...]     # padding of each part beyond its longest sequence
    opts: dict                 # loss options
    adv_per_seq: bool
    weights: str               # "none" | "token" | "sequence"
    seed: int

    @property
    def pads(self) -> list[int]:
        """Each part's padded length T_p (at least 1)."""
        out, s = [], 0
        for n, e in zip(self.parts, self.extra):
            out.append(max([*self.lengths[s:s + n], 0]) + e or 1)
            s += n
        return out

    @property
    def T(self) -> int:
        return max(self.pads)

    def features(self) -> list[str]:
        return [f"parts={len(self.parts)}", f"aggregation={self.opts['aggregation']}",
                f"pads_differ={len(set(self.pads)) > 1}"]


@st.composite
def splits(draw, n_parts: int | None = None):
    S = draw(st.integers(1, 7))
    lengths = tuple(draw(st.lists(st.integers(0, 6), min_size=S, max_size=S)))
    P = n_parts or draw(st.integers(2, 4))
    # cut points: parts of consecutive sequences, some possibly empty
    cuts = sorted(draw(st.lists(st.integers(0, S), min_size=P - 1, max_size=P - 1)))
    bounds = [0, *cuts, S]
    parts = tuple(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    extra = tuple(draw(st.lists(st.integers(0, 3), min_size=P, max_size=P)))
    aggregation = draw(st.sampled_from(AGGREGATIONS))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = random.Random(f"{seed}|{lengths}|{parts}")
    pick = rng.choice
    opts = dict(aggregation=aggregation, repo=pick(["none", "fixed", "decorrelate"]), repo_center=pick([True, False]),
                eps_low=pick([0.1, 0.2]), eps_high=pick([0.2, 0.28]), dual_clip=pick([None, 3.0]),
                delta=pick([None, 1.5]), importance_level=pick(["token", "sequence"]),
                entropy_coef=pick([0.0, 0.01, -0.05]))
    opts["repo_coef"] = {"none": 1.0, "fixed": 0.4, "decorrelate": 0.8}[opts["repo"]]
    for term in ("kl", "entropy"):
        if pick([True, False]):
            opts[f"{term}_aggregation"] = pick(AGGREGATIONS)
    if pick([True, False]):
        opts.update(kl_coef=pick([0.0, 0.1]), kl_estimator=pick(KL_ESTIMATORS), with_ref=True)
    if pick([True, False]):
        opts.update(tis_cap=2.0, tis_level=pick(["token", "sequence"]))
    modes = [opts["aggregation"], opts.get("kl_aggregation"), opts.get("entropy_aggregation")]
    if DRGRPO in modes and pick([True, False, False]):
        opts["max_length"] = 9  # >= every padded length here
    return Split(lengths=lengths, parts=parts, extra=extra, opts=opts, adv_per_seq=pick([True, False]),
                 weights=pick(["none", "token", "sequence"]), seed=seed)


def whole_batch(split: Split) -> dict:
    """The whole batch padded to T (float64 leaves; padding holds values that must not matter)."""
    g = torch.Generator().manual_seed(split.seed)
    S, T = len(split.lengths), split.T
    f64 = dict(dtype=torch.float64)
    pos = torch.arange(T)[None, :]
    mask = (pos < torch.tensor(split.lengths)[:, None]) & (torch.rand(S, T, generator=g) > 0.2)
    out = dict(logprobs=-3 * torch.rand(S, T, generator=g, **f64), entropy=2 * torch.rand(S, T, generator=g, **f64),
               old_logprobs=-3 * torch.rand(S, T, generator=g, **f64), mask=mask,
               advantages=torch.randn(S if split.adv_per_seq else (S, T), generator=g, **f64))
    if split.opts.get("with_ref"):
        out["ref_logprobs"] = -3 * torch.rand(S, T, generator=g, **f64)
    if "tis_cap" in split.opts:
        out["rollout_logprobs"] = -3 * torch.rand(S, T, generator=g, **f64)
    if split.weights != "none":
        out["weights"] = torch.rand(S if split.weights == "sequence" else (S, T), generator=g, **f64) + 0.5
    return out


def part_batches(split: Split, whole: dict) -> list[dict]:
    """Part p: its sequences, cut to its own padded length T_p."""
    out, s = [], 0
    for n, T_p in zip(split.parts, split.pads):
        part = {}
        for k, x in whole.items():
            rows = x[s:s + n]
            part[k] = rows[:, :T_p] if rows.dim() == 2 else rows
        out.append(part)
        s += n
    return out


def _options(split: Split) -> dict:
    return {k: v for k, v in split.opts.items() if k != "with_ref"}


def _loss(batch: dict, **kw):
    lp = batch["logprobs"].detach().clone().requires_grad_()
    ent = batch["entropy"].detach().clone().requires_grad_()
    rest = {k: v for k, v in batch.items() if k not in ("logprobs", "entropy", "advantages", "old_logprobs", "mask")}
    out = fused_pg.policy_loss_from_logprobs(lp, batch["advantages"], batch["old_logprobs"], batch["mask"],
                                             entropy=ent, **rest, **kw)
    out.loss.backward()
    grads = {k: torch.zeros_like(x) if x.grad is None else x.grad for k, x in (("logprobs", lp), ("entropy", ent))}
    return dict(loss=out.loss.detach(), metrics=out.metrics, **grads)


def _compare(name: str, split: Split, one: dict, results: list[dict]) -> None:
    """Sum of the parts' losses, their gradients put back in place, against one process."""
    assert_close(f"{name}: sum of losses", one["loss"], sum(r["loss"] for r in results), atol=1e-12, rtol=1e-9)
    S, T = len(split.lengths), split.T
    for key in ("logprobs", "entropy"):
        grad = torch.zeros(S, T, dtype=torch.float64)
        s = 0
        for n, T_p, r in zip(split.parts, split.pads, results):
            grad[s:s + n, :T_p] = r[key]
            s += n
        assert_close(f"{name}: d {key}", one[key], grad, atol=1e-12, rtol=1e-9)


def normaliser(mode: str, whole: dict, split: Split):
    """What a caller passes for one term over the whole batch (None: token-sum needs none)."""
    mask = whole["mask"]
    if mode == "token-mean":
        return max(int(mask.sum()), 1)
    if mode == "token-sum":
        return None
    if mode == DRGRPO:
        return len(split.lengths)
    return max(int(mask.any(1).sum()), 1)


# ---------------------------------------------------------------------------------------------
# gradient accumulation (one process)
# ---------------------------------------------------------------------------------------------

def _check_accumulation(split: Split) -> None:
    opts = _options(split)
    whole = whole_batch(split)
    one = _loss(whole, **opts)
    parts = part_batches(split, whole)
    stats = fused_pg.RepoStats.merge_all([
        fused_pg.repo_statistics(p["logprobs"], p["advantages"], p["mask"]) for p in parts])
    known = dict(repo_stats=stats)  # what the caller knows of the whole batch
    items = normaliser(opts["aggregation"], whole, split)
    if items is not None:
        known["num_items_in_batch"] = items
    for term in ("kl", "entropy"):
        mode = opts.get(f"{term}_aggregation")
        if mode is not None and normaliser(mode, whole, split) is not None:
            known[f"{term}_num_items_in_batch"] = normaliser(mode, whole, split)
    modes = (opts["aggregation"], opts.get("kl_aggregation") or opts["aggregation"],
             opts.get("entropy_aggregation") or opts["aggregation"])
    if DRGRPO in modes and "max_length" not in opts:
        with pytest.raises(ValueError, match="max_length"):
            _loss(parts[0], **opts, **known)
        known["max_length"] = split.T  # the whole batch's length
    results = [_loss(p, **opts, **known) for p in parts]
    _compare(f"accumulation over {len(parts)} micro-batches", split, one, results)


def test_accumulated_micro_batches_padded_differently_equal_one_batch():
    run_property(splits(), _check_accumulation, examples=100)


def test_dr_grpo_normaliser_without_max_length_is_refused():
    """Micro-batches padded to T = 4 and T = 7 divided by their own T: the sum was 0.3875
    against 0.3244 for one process on the batch padded to 7. Now refused by name."""
    lp = -torch.rand(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="num_items_in_batch .* needs max_length"):
        fused_pg.policy_loss_from_logprobs(lp, torch.ones(2), aggregation=DRGRPO, num_items_in_batch=5)
    with pytest.raises(ValueError, match="kl_num_items_in_batch .* needs max_length"):
        fused_pg.policy_loss_from_logprobs(lp, torch.ones(2), ref_logprobs=lp, kl_aggregation=DRGRPO,
                                           kl_num_items_in_batch=5)
    out = fused_pg.policy_loss_from_logprobs(lp, torch.ones(2), aggregation=DRGRPO, num_items_in_batch=5, max_length=7)
    assert torch.isfinite(out.loss)


# ---------------------------------------------------------------------------------------------
# data parallelism (2 and 3 gloo ranks)
# ---------------------------------------------------------------------------------------------

def draw_splits(world: int, count: int) -> list[Split]:
    """``count`` generated splits into ``world`` parts (drawn up front: one process group runs
    them all; a failure prints the case)."""
    found: list[Split] = []

    @settings(max_examples=count, database=None, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(split=splits(n_parts=world))
    def draw(split):
        found.append(split)

    draw()
    return found


@lru_cache(maxsize=None)
def dp_cases(world: int) -> list[Split]:
    return draw_splits(world, n_examples(40))


def _dp_job(split: Split):
    def job(rank, world):
        part = part_batches(split, whole_batch(split))[rank]
        return _loss(part, **_options(split), parallel=fused_pg.DataParallel(dist.group.WORLD))

    return job


@lru_cache(maxsize=None)
def dp_results(world: int) -> list[list[dict]]:
    cases = dp_cases(world)
    per_rank = run_group(world, [(str(i), _dp_job(split)) for i, split in enumerate(cases)])
    return [[r[str(i)] for r in per_rank] for i in range(len(cases))]


@pytest.mark.parametrize("world", [2, 3])
def test_data_parallel_ranks_padded_differently_equal_one_process(world):
    checked = set()
    for split, ranks in zip(dp_cases(world), dp_results(world)):
        whole = whole_batch(split)
        one = _loss(whole, **_options(split))
        name = f"{world} ranks, {split}"
        _compare(name, split, one, ranks)
        for rank, r in enumerate(ranks):  # every rank reports the whole batch's metrics
            for key, value in one["metrics"].items():
                if isinstance(value, float):  # a hyper-parameter
                    assert r["metrics"][key] == value, f"{name}: rank {rank} metric {key}"
                    continue
                assert_close(f"{name}: rank {rank} metric {key}", value, r["metrics"][key], atol=1e-12, rtol=1e-9)
        checked.add(split.opts["aggregation"])
    assert checked == set(AGGREGATIONS), f"aggregations not exercised on {world} ranks: {set(AGGREGATIONS) - checked}"


def test_data_parallel_dr_grpo_with_ranks_padded_to_4_and_7():
    """The probe's case: ranks padded to T = 4 and T = 7 summed to 0.3875 against 0.3244."""
    split = Split(lengths=(4, 3, 7, 5), parts=(2, 2), extra=(0, 0), opts=dict(aggregation=DRGRPO, repo="none"),
                  adv_per_seq=True, weights="none", seed=0)
    assert split.pads == [4, 7]
    ranks = run_group(2, [("dr", _dp_job(split))])
    one = _loss(whole_batch(split), **split.opts)
    _compare("Dr.GRPO, ranks padded to 4 and 7", split, one, [r["dr"] for r in ranks])
