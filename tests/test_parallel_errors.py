"""No rank can leave its peers waiting on a local error.

One rank of a group passes a bad argument (a wrong shape, an empty vocabulary shard, an
unknown option, a NaN where it counts, ...) to a function that communicates; every rank must
then raise an error of the same type with the same message, naming the rank that failed and
the argument, within seconds -- not after the collective timeout (10 minutes on NCCL). The
cases are generated: the function (vocabulary- and data-parallel losses, the head,
``repo_statistics``), the bad argument and the failing rank, on 2 and 3 gloo ranks and on a
2 x 2 mesh of vocabulary- and data-parallel groups.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from datetime import timedelta
from functools import lru_cache
from typing import Callable

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import fused_pg
from helpers import n_examples
from helpers.multiproc import run_group

# a collective waits this long for a missing peer (a hang fails the test instead of stalling it)
PEER_TIMEOUT = timedelta(seconds=20)
WITHIN_SECONDS = 5.0  # every rank must have raised by then

B, T, D, V = 4, 5, 6, 13


def _data(seed: int):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden=torch.randn(B, T, D, generator=g), weight=torch.randn(V, D, generator=g),
                bias=0.1 * torch.randn(V, generator=g), targets=torch.randint(0, V, (B, T), generator=g),
                advantages=torch.randn(B, generator=g), old_logprobs=-torch.rand(B, T, generator=g) - 0.1,
                mask=torch.rand(B, T, generator=g) > 0.2, logprobs=-torch.rand(B, T, generator=g) - 0.1)


@dataclass(frozen=True)
class Bad:
    """A bad argument on one rank: ``change(args)`` edits the failing rank's arguments;
    ``names``: what the agreed message must name."""

    name: str
    change: Callable
    names: str
    functions: tuple[str, ...]


def _set(key, value):
    def change(a):
        a[key] = value(a) if callable(value) else value
    return change


def _nan_where_counted(key):
    def change(a):
        x = a[key].clone()
        x.view(-1, *x.shape[2:])[int(a["mask"].reshape(-1).nonzero()[0])] = math.nan
        a[key] = x
    return change


def _empty_shard(a):
    a["weight"], a["bias"] = a["weight"][:0], a["bias"][:0]


VOCAB = ("repo_loss/vocab", "fused_logprobs_entropy/vocab", "repo_loss/mesh")
DATA = ("repo_loss/data", "policy_loss_from_logprobs/data", "repo_loss/mesh")
LOSSES = VOCAB[:1] + DATA
ALL = VOCAB + DATA + ("repo_statistics/data",)
BAD = [
    Bad("empty vocabulary shard", _empty_shard, "vocabulary", VOCAB + ("repo_loss/data",)),
    Bad("advantages shape", _set("advantages", torch.randn(B + 1)), "advantages", LOSSES + ("repo_statistics/data",)),
    Bad("targets float", _set("targets", lambda a: a["targets"].float()), "targets", VOCAB + ("repo_loss/data",)),
    Bad("hidden size", _set("hidden", torch.randn(B, T, D + 1)), "weight", VOCAB + ("repo_loss/data",)),
    Bad("unknown option", _set("options", dict(epsilon_high=0.3)), "epsilon_high", LOSSES),
    Bad("eps_low out of range", _set("options", dict(eps_low=-0.5)), "eps_low", LOSSES),
    Bad("temperature out of range", _set("options", dict(temperature=0.0)), "temperature", VOCAB),
    Bad("mask value 2", _set("mask", lambda a: a["mask"].long() * 2), "mask", LOSSES + ("repo_statistics/data",)),
    Bad("NaN advantage", _set("advantages", torch.tensor([math.nan] * B)), "advantages",
        LOSSES + ("repo_statistics/data",)),
    Bad("NaN hidden where it counts", _nan_where_counted("hidden"), "hidden", ("repo_loss/data", "repo_loss/mesh")),
    Bad("positive old log-probs", _set("old_logprobs", lambda a: a["old_logprobs"].abs() + 0.5), "old_logprobs",
        LOSSES),
    Bad("log-probs > 0", _set("logprobs", lambda a: a["logprobs"].abs() + 0.5), "logprobs",
        ("policy_loss_from_logprobs/data", "repo_statistics/data")),
    Bad("num_items_in_batch 0", _set("options", dict(num_items_in_batch=0)), "num_items_in_batch", LOSSES),
    Bad("Dr.GRPO normaliser without max_length",
        _set("options", dict(aggregation="seq-mean-token-sum-norm", num_items_in_batch=3)), "max_length", LOSSES),
    Bad("repo_stats with a negative count",
        _set("options", lambda a: dict(repo_stats=replace(fused_pg.repo_statistics(a["logprobs"], a["advantages"]),
                                                          count=torch.tensor(-1.0, dtype=torch.float64)))),
        "repo_stats.count", LOSSES),
]


# ---------------------------------------------------------------------------------------------
# calls: each rank's arguments (its vocabulary shard, or its part of the batch), and the call
# ---------------------------------------------------------------------------------------------

def _mesh_groups():
    """2 x 2 mesh of 4 ranks: vocabulary-parallel pairs {0,1}, {2,3}; data-parallel {0,2}, {1,3}
    (every rank creates every group, in the same order)."""
    tp = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    dp = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    return tp, dp


def _args(function: str, rank: int, world: int, seed: int, groups) -> dict:
    a = _data(seed)
    a["options"] = {}
    layout = function.split("/")[1]
    vocab_rank, data_rank, vocab_world, data_world = rank, rank, world, world
    if layout == "mesh":
        vocab_rank, data_rank, vocab_world, data_world = rank % 2, rank // 2, 2, 2
    if layout in ("vocab", "mesh"):
        lo, hi = V * vocab_rank // vocab_world, V * (vocab_rank + 1) // vocab_world
        a["weight"], a["bias"] = a["weight"][lo:hi], a["bias"][lo:hi]
    if layout in ("data", "mesh"):
        lo, hi = B * data_rank // data_world, B * (data_rank + 1) // data_world
        for k in ("hidden", "targets", "advantages", "old_logprobs", "mask", "logprobs"):
            a[k] = a[k][lo:hi]
    if layout == "vocab":
        a["parallel"] = fused_pg.VocabParallel(dist.group.WORLD)
    elif layout == "data":
        a["parallel"] = fused_pg.DataParallel(dist.group.WORLD)
    else:
        tp, dp = groups
        a["parallel"] = fused_pg.Parallel(vocab=fused_pg.VocabParallel(tp[rank // 2]),
                                          data=fused_pg.DataParallel(dp[rank % 2]))
    return a


def _call(function: str, a: dict):
    name = function.split("/")[0]
    if name == "repo_loss":
        out = fused_pg.repo_loss(a["hidden"], a["weight"], a["targets"], a["advantages"], a["old_logprobs"],
                                 a["mask"], bias=a["bias"], parallel=a["parallel"], **a["options"])
        return out.loss
    if name == "policy_loss_from_logprobs":
        return fused_pg.policy_loss_from_logprobs(a["logprobs"], a["advantages"], a["old_logprobs"], a["mask"],
                                                  parallel=a["parallel"], **a["options"]).loss
    if name == "fused_logprobs_entropy":
        return fused_pg.fused_logprobs_entropy(a["hidden"], a["weight"], a["targets"], bias=a["bias"],
                                               parallel=a["parallel"], **a["options"]).logprobs
    return fused_pg.repo_statistics(a["logprobs"], a["advantages"], a["mask"],
                                    process_group=a["parallel"].group).as_tensor()


@dataclass(frozen=True)
class Case:
    function: str
    bad: str
    failing_rank: int
    seed: int


def _job(case: Case, groups_of):
    bad = {b.name: b for b in BAD}[case.bad]

    def job(rank, world):
        a = _args(case.function, rank, world, case.seed, groups_of())
        if rank == case.failing_rank:
            bad.change(a)
        start = time.perf_counter()
        try:
            _call(case.function, a)
        except Exception as err:  # noqa: BLE001 -- what each rank raised is compared in the test
            return dict(error=f"{type(err).__name__}: {err}", seconds=time.perf_counter() - start)
        return dict(error=None, seconds=time.perf_counter() - start)

    return job


def _clean_job(function: str, seed: int, groups_of):
    """The same call with no bad argument anywhere: no error (and the group is still in step)."""
    def job(rank, world):
        _call(function, _args(function, rank, world, seed, groups_of()))
        return dict(error=None)

    return job


def draw_cases(world: int, count: int) -> list[Case]:
    """Generated cases (drawn up front: one process group runs them all), every (function, bad
    argument) pair of this world size at least once."""
    layouts = ("vocab", "data") if world != 4 else ("mesh",)
    pairs = [(f, b.name) for b in BAD for f in b.functions if f.split("/")[1] in layouts]
    found: list[Case] = []

    @settings(max_examples=count, database=None, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(pair=st.sampled_from(pairs), failing_rank=st.integers(0, world - 1), seed=st.integers(0, 2**31 - 1))
    def draw(pair, failing_rank, seed):
        found.append(Case(*pair, failing_rank, seed))

    draw()
    seen = {(c.function, c.bad) for c in found}
    found += [Case(f, b, k % world, k) for k, (f, b) in enumerate(pairs) if (f, b) not in seen]
    return found


@lru_cache(maxsize=None)
def results(world: int):
    cases = draw_cases(world, n_examples(30 if world != 4 else 10))
    cache: dict = {}

    def groups_of():
        if world == 4 and not cache:
            cache["mesh"] = _mesh_groups()
        return cache.get("mesh")

    jobs = []
    for i, case in enumerate(cases):
        jobs.append((f"bad{i}", _job(case, groups_of)))
        jobs.append((f"clean{i}", _clean_job(case.function, case.seed, groups_of)))
    per_rank = run_group(world, jobs, timeout=PEER_TIMEOUT)
    return cases, per_rank


@pytest.mark.parametrize("world", [2, 3, 4])
def test_one_ranks_bad_argument_fails_every_rank_with_the_same_message(world):
    cases, per_rank = results(world)
    bad = {b.name: b for b in BAD}
    for i, case in enumerate(cases):
        got = [r[f"bad{i}"] for r in per_rank]
        messages = [g["error"] for g in got]
        assert all(m is not None for m in messages), f"{case}: ranks that raised nothing: {messages}"
        assert len(set(messages)) == 1, f"{case}: ranks raised different errors:\n" + "\n".join(messages)
        message = messages[0]
        assert bad[case.bad].names in message, f"{case}: the message does not name the argument: {message}"
        assert f"rank {case.failing_rank}" in message, f"{case}: the message does not name the rank: {message}"
        slowest = max(g["seconds"] for g in got)
        assert slowest < WITHIN_SECONDS, f"{case}: a rank raised only after {slowest:.1f} s"
        assert all(r[f"clean{i}"]["error"] is None for r in per_rank)


@pytest.mark.parametrize("function,bad", [("repo_loss/vocab", "empty vocabulary shard"),
                                          ("repo_loss/data", "advantages shape")])
def test_the_probes_cases_on_their_own(function, bad):
    """The probe's two cases, each alone in its group: rank 1 holds an empty vocabulary shard;
    rank 1 passes advantages of the wrong shape (data parallel). Rank 0 used to wait in the
    first collective until the process-group timeout."""
    case = Case(function, bad, failing_rank=1, seed=0)
    per_rank = run_group(2, [("bad", _job(case, lambda: None))], timeout=PEER_TIMEOUT)
    got = [r["bad"] for r in per_rank]
    assert got[0]["error"] == got[1]["error"] and "rank 1" in got[0]["error"], got
    assert max(g["seconds"] for g in got) < WITHIN_SECONDS, got


def _through_a_host_group_job(rank, world):
    """As on an NCCL group: the agreement runs on a gloo group over the same ranks, created once."""
    from fused_pg import comm

    comm._runs_on_cpu = lambda group: False  # this forked process only
    errors = []
    for step in range(3):
        a = _args("policy_loss_from_logprobs/data", rank, world, step, None)
        if step == 1 and rank == 1:
            a["advantages"] = torch.randn(7)
        try:
            _call("policy_loss_from_logprobs/data", a)
            errors.append(None)
        except ValueError as err:
            errors.append(str(err))
    return dict(errors=errors, host_groups=len(comm._HOST_GROUPS))


def test_agreement_through_a_host_group_for_groups_without_a_cpu_backend():
    per_rank = run_group(2, [("host", _through_a_host_group_job)], timeout=PEER_TIMEOUT)
    for r in per_rank:
        errors = r["host"]["errors"]
        assert errors[0] is None and errors[2] is None
        assert errors[1] is not None and "rank 1" in errors[1] and "advantages" in errors[1]
        assert r["host"]["host_groups"] == 1
    assert per_rank[0]["host"]["errors"] == per_rank[1]["host"]["errors"]
