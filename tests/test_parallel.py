"""Scale-out against one process and the fp64 oracle, with gloo on CPU, 2 and 4 processes.

One forked process group per world size runs every multi-process check (start-up dominates;
see tests/helpers/multiproc.py); the assertions run here, in the test process, on what each rank
returned:

* vocabulary parallelism (``parallel=VocabParallel(group)``): the vocabulary cut into unequal
  consecutive shards (-inf bias entries, i.e. padded vocabularies, included; a shard may be all -inf);
  loss, log-probs, entropy, metrics and the gradients of hidden (all-reduced), weight and
  bias (each rank's shard) against the oracle and the one-process result, for every REPO
  variant, dense and packed layouts, fp32 and fp64; identical outputs on every rank;
* data parallelism (``parallel=DataParallel(group)``): the batch split by sequences over the
  ranks (some ranks may hold no sequence); the sum of the ranks' losses and gradients, and the
  (global) metrics against the oracle on the whole batch;
* both at once on a 2 x 2 mesh (spelt ``process_group=`` / ``data_parallel_group=``), DDP's
  gradient averaging with the documented loss scaling, gradient accumulation with ``repo_statistics(process_group=)``, the Triton kernels under
  the interpreter, and the errors that must be raised on every rank.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace
from functools import lru_cache

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, Phase, assume, given, seed, settings

import fused_pg
from fused_pg.comm import CommLog
from fused_pg.parallel import OFF_SHARD, merge_shard_stats, vocab_parallel_comm_bytes
from helpers import (TOLS, assert_close, check_grads, check_head_values, check_metrics, loss_cases,
                     make_loss_inputs, oracle_guards, run_oracle_loss, same_number)
from helpers.multiproc import run_group

WORLDS = (2, 4)
REPO_VARIANTS = [("none", True), ("fixed", True), ("fixed", False), ("decorrelate", True), ("decorrelate", False)]
LAYOUTS = ("dense", "packed", "packed-nocu")


# ---------------------------------------------------------------------------------------------
# cases: drawn from the loss property tests' strategy, one per (REPO variant, layout, dtype)
# ---------------------------------------------------------------------------------------------


def _draw_case(layout: str, dtype: str, repo: str, center: bool, salt: int):
    """The first example of ``loss_cases`` (fixed seed) with this REPO variant that the oracle
    accepts (``oracle_guards``) and that has a vocabulary of at least 4 (one id per rank)."""
    found = []

    @seed(salt)
    @settings(max_examples=40, database=None, derandomize=False, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(case=loss_cases("torch", layouts=(layout,), dtypes=(dtype,)))
    def draw(case):
        if found:
            return
        assume(case.head.V >= 4)
        opts = dict(case.opts, repo=repo, repo_center=center)
        opts["repo_coef"] = {"none": 1.0, "fixed": 0.5, "decorrelate": 0.8}[repo]
        case = replace(case, opts=opts)
        inp = make_loss_inputs(case)
        ref, grads, floors = run_oracle_loss(case, inp, "torch")
        oracle_guards(case, inp, ref)
        found.append((case, inp, ref, grads, floors))

    draw()
    assert found, f"no usable example for {layout}/{dtype}/{repo}"
    return found[0]


@lru_cache(maxsize=None)
def cases() -> list[tuple]:
    out = []
    for i, layout in enumerate(LAYOUTS):
        for j, (repo, center) in enumerate(REPO_VARIANTS):
            out.append((f"{layout}/fp32/{repo}/center={center}", *_draw_case(layout, "fp32", repo, center, 100 * i + j)))
        out.append((f"{layout}/fp64/decorrelate", *_draw_case(layout, "fp64", "decorrelate", True, 100 * i + 50)))
    return out


def _one_process(case, inp):
    """fused_pg.repo_loss on the whole batch and vocabulary: the result to reproduce."""
    h, w, b = inp.head.leaves()
    out = fused_pg.repo_loss(h, w, inp.head.targets, inp.advantages, inp.old_logprobs, inp.mask,
                             bias=b, **inp.tensors(), **case.fused_kwargs("torch"))
    out.loss.backward()
    return out, {"hidden": h.grad, "weight": w.grad, "bias": None if b is None else b.grad}


def vocab_cuts(V: int, world: int, salt: int) -> list[int]:
    """Unequal consecutive shards [cuts[r], cuts[r+1]), each at least one id."""
    g = torch.Generator().manual_seed(salt)
    inner = sorted((torch.randperm(V - 1, generator=g)[: world - 1] + 1).tolist())
    return [0, *inner, V]


# ---------------------------------------------------------------------------------------------
# jobs run on every rank (closures: the processes are forked, nothing is pickled)
# ---------------------------------------------------------------------------------------------


def _tp_job(case, inp, cuts, group_of=None, backend="torch"):
    """The vocabulary-parallel loss on this rank's shard ``[cuts[r], cuts[r+1])``."""

    def job(rank, world):
        group = group_of(rank) if group_of else dist.group.WORLD
        r = dist.get_rank(group)
        a, c = cuts[r], cuts[r + 1]
        h, w, b = inp.head.leaves()
        w = w[a:c].detach().clone().requires_grad_()
        b = None if b is None else b[a:c].detach().clone().requires_grad_()
        kw = dict(case.fused_kwargs(backend), parallel=fused_pg.VocabParallel(group))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the interpreter's log(0) on an all -inf shard
            out = fused_pg.repo_loss(h, w, inp.head.targets, inp.advantages, inp.old_logprobs, inp.mask,
                                     bias=b, **inp.tensors(), **kw)
            out.loss.backward()
        return dict(loss=out.loss.detach(), logprobs=out.logprobs, entropy=out.entropy, metrics=out.metrics,
                    hidden=h.grad, weight=w.grad, bias=None if b is None else b.grad)

    return job


def dp_split(case, inp, world: int):
    """Per rank: the keyword arguments of repo_loss for its part of the batch (whole sequences;
    dense rows or packed sequences in order), and the flat token range it covers. None when a
    packed layout has fewer sequences than ranks (cu_seqlens cannot describe no sequence)."""
    lead = tuple(inp.head.targets.shape)
    N = case.head.N
    if case.layout == "dense":
        B, T = lead
        rows = [(B * r // world, B * (r + 1) // world) for r in range(world)]
        spans = [(a * T, c * T) for a, c in rows]
        seq_ranges = rows
    elif case.layout == "packed":
        S = len(case.lengths)
        if S < world:
            return None
        seq_ranges = [(S * r // world, S * (r + 1) // world) for r in range(world)]
        cu = inp.cu_seqlens.tolist()
        spans = [(cu[a], cu[c]) for a, c in seq_ranges]
    else:
        spans = [(N * r // world, N * (r + 1) // world) for r in range(world)]
        seq_ranges = None
    parts = []
    h, w, b = inp.head.leaves()
    for r in range(world):
        t0, t1 = spans[r]

        def tok(x):
            if x is None:
                return None
            if case.layout == "dense":
                a, c = seq_ranges[r]
                return x[a:c]
            return x.reshape(N, *x.shape[len(lead):])[t0:t1]

        kw = dict(hidden=tok(inp.head.hidden), targets=tok(inp.head.targets), old_logprobs=tok(inp.old_logprobs),
                  mask=tok(inp.mask), ref_logprobs=tok(inp.ref_logprobs), rollout_logprobs=tok(inp.rollout_logprobs))
        if case.adv_per_seq:
            a, c = seq_ranges[r]
            kw["advantages"] = inp.advantages[a:c]
        else:
            kw["advantages"] = tok(inp.advantages)
        if case.weights == "sequence":
            a, c = seq_ranges[r]
            kw["weights"] = inp.weights[a:c]
        else:
            kw["weights"] = tok(inp.weights)
        if case.layout == "packed":
            a, c = seq_ranges[r]
            kw["cu_seqlens"] = inp.cu_seqlens[a:c + 1] - inp.cu_seqlens[a]
        parts.append((kw, (t0, t1)))
    return parts


def _dp_job(case, inp, parts, group_of=None, tp=None):
    """The data-parallel loss on this rank's part of the batch (and, with ``tp = (cuts,
    tp_group_of)``, on its vocabulary shard too)."""

    def job(rank, world):
        group = group_of(rank) if group_of else dist.group.WORLD
        kw, _ = parts[dist.get_rank(group)]
        kw = dict(kw)
        h = kw.pop("hidden").detach().clone().requires_grad_()
        _, w, b = inp.head.leaves()
        # the data-parallel case alone uses the strategy value, the 2 x 2 mesh the keyword spelling
        opts = dict(case.fused_kwargs("torch"), parallel=fused_pg.DataParallel(group))
        if tp is not None:
            cuts, tp_group_of = tp
            tp_group = tp_group_of(rank)
            r = dist.get_rank(tp_group)
            w = w[cuts[r]:cuts[r + 1]].detach().clone().requires_grad_()
            b = None if b is None else b[cuts[r]:cuts[r + 1]].detach().clone().requires_grad_()
            del opts["parallel"]
            opts.update(data_parallel_group=group, process_group=tp_group)
        out = fused_pg.repo_loss(h, w, kw.pop("targets"), kw.pop("advantages"), kw.pop("old_logprobs"),
                                 kw.pop("mask"), bias=b, **{k: v for k, v in kw.items() if v is not None}, **opts)
        out.loss.backward()
        return dict(loss=out.loss.detach(), logprobs=out.logprobs, entropy=out.entropy, metrics=out.metrics,
                    hidden=h.grad, weight=w.grad, bias=None if b is None else b.grad)

    return job


# ---------------------------------------------------------------------------------------------
# the groups: one per world size, every job at once
# ---------------------------------------------------------------------------------------------


def _mesh_groups(world):
    """2 x 2 mesh of 4 ranks: vocabulary-parallel pairs {0,1}, {2,3}; data-parallel {0,2}, {1,3}.
    Every rank creates every group (torch.distributed requires it), in the same order."""
    cache = {}

    def groups():
        if not cache:
            cache["tp"] = [dist.new_group([0, 1]), dist.new_group([2, 3])]
            cache["dp"] = [dist.new_group([0, 2]), dist.new_group([1, 3])]
        return cache

    return (lambda rank: groups()["tp"][rank // 2]), (lambda rank: groups()["dp"][rank % 2])


@lru_cache(maxsize=None)
def group_results(world: int) -> dict:
    import torch._dynamo  # noqa: F401  (DDP imports it: once here, not in every forked rank)

    jobs = []
    meta = {}
    for k, (name, case, inp, *_rest) in enumerate(cases()):
        cuts = vocab_cuts(case.head.V, world, k)
        meta[("tp", name)] = cuts
        jobs.append((f"tp:{name}", _tp_job(case, inp, cuts)))
        parts = dp_split(case, inp, world)
        meta[("dp", name)] = parts
        if parts is not None:
            jobs.append((f"dp:{name}", _dp_job(case, inp, parts)))
    if world == 4:
        tp_of, dp_of = _mesh_groups(world)
        for k, (name, case, inp, *_rest) in enumerate(cases()):
            parts = dp_split(case, inp, 2)
            if parts is None or name.startswith("packed-nocu"):
                continue
            cuts = vocab_cuts(case.head.V, 2, 7 + k)
            meta[("mesh", name)] = (cuts, parts)
            jobs.append((f"mesh:{name}", _dp_job(case, inp, parts, group_of=dp_of, tp=(cuts, tp_of))))
    jobs += extra_jobs(world)
    per_rank = run_group(world, jobs)
    return dict(per_rank=per_rank, meta=meta)


# ---------------------------------------------------------------------------------------------
# checks: vocabulary parallelism
# ---------------------------------------------------------------------------------------------


def _check_against(name, case, inp, ref, ref_grads, floors, got: dict, grads: dict, *, key: str) -> None:
    """One result (loss, logp, entropy, metrics, gradients) against one reference with the
    pass rules of the loss property tests (fp32: 1e-5 relative on logp/H, ...)."""
    tol = TOLS[case.dtype]
    valid = inp.valid.view(inp.head.targets.shape)
    assert_close(f"{name}: loss vs {key}", ref.loss, got["loss"], atol=tol.value, rtol=tol.value, key=case.dtype)
    check_head_values(f"{name}: logprobs vs {key}", case.dtype, ref.logprobs.detach(), got["logprobs"], valid)
    check_head_values(f"{name}: entropy vs {key}", case.dtype, ref.entropy.detach(), got["entropy"], valid)
    check_metrics(ref.metrics, got["metrics"], case.dtype)
    check_grads({k: (ref_grads[k], grads[k]) for k in grads if grads[k] is not None}, case.dtype, floors)


@pytest.mark.parametrize("world", WORLDS)
def test_vocab_parallel_matches_one_process_and_oracle(world):
    res = group_results(world)
    for name, case, inp, ref, ref_grads, floors in cases():
        ranks = [r[f"tp:{name}"] for r in res["per_rank"]]
        first = ranks[0]
        for k, other in enumerate(ranks[1:], 1):  # every rank computes the same loss, bit for bit
            for key in ("loss", "logprobs", "entropy", "hidden"):
                assert torch.equal(first[key], other[key]), f"{name}: {key} differs between rank 0 and {k}"
        grads = {"hidden": first["hidden"], "weight": torch.cat([r["weight"] for r in ranks]),
                 "bias": None if first["bias"] is None else torch.cat([r["bias"] for r in ranks])}
        assert grads["weight"].shape == inp.head.weight.shape
        _check_against(name, case, inp, ref, ref_grads, floors, first, grads, key="oracle")
        one, one_grads = _one_process(case, inp)
        _check_against(name, case, inp, one, one_grads, floors, first, grads, key="one process")


# ---------------------------------------------------------------------------------------------
# checks: data parallelism
# ---------------------------------------------------------------------------------------------


def _dp_combined(name, case, inp, ranks, parts):
    """Sum of the ranks' losses and weight/bias gradients; hidden gradients put back in place."""
    N, D = case.head.N, case.head.D
    dh = torch.zeros(N, D, dtype=inp.head.hidden.dtype)
    for r, (_, (t0, t1)) in zip(ranks, parts):
        dh[t0:t1] = r["hidden"].reshape(-1, D)
    got = dict(loss=sum(r["loss"] for r in ranks), logprobs=None, entropy=None, metrics=ranks[0]["metrics"])
    grads = {"hidden": dh.view_as(inp.head.hidden), "weight": sum(r["weight"] for r in ranks),
             "bias": None if ranks[0]["bias"] is None else sum(r["bias"] for r in ranks)}
    lp = torch.zeros(N, dtype=ranks[0]["logprobs"].dtype)
    ent = torch.zeros_like(lp)
    for r, (_, (t0, t1)) in zip(ranks, parts):
        lp[t0:t1], ent[t0:t1] = r["logprobs"].reshape(-1), r["entropy"].reshape(-1)
    got["logprobs"], got["entropy"] = lp.view(inp.head.targets.shape), ent.view(inp.head.targets.shape)
    for k, r in enumerate(ranks[1:], 1):  # metrics are the whole batch's, on every rank
        for key, v in r["metrics"].items():
            assert same_number(v, ranks[0]["metrics"][key]), f"{name}: metric {key} differs between ranks 0, {k}"
    return got, grads


@pytest.mark.parametrize("world", WORLDS)
def test_data_parallel_matches_one_process_and_oracle(world):
    res = group_results(world)
    checked = 0
    for name, case, inp, ref, ref_grads, floors in cases():
        parts = res["meta"][("dp", name)]
        if parts is None:
            continue
        ranks = [r[f"dp:{name}"] for r in res["per_rank"]]
        got, grads = _dp_combined(name, case, inp, ranks, parts)
        _check_against(name, case, inp, ref, ref_grads, floors, got, grads, key="oracle")
        one, one_grads = _one_process(case, inp)
        _check_against(name, case, inp, one, one_grads, floors, got, grads, key="one process")
        checked += 1
    assert checked >= len(cases()) // 2


def test_vocab_and_data_parallel_on_a_2x2_mesh():
    res = group_results(4)
    checked = 0
    for name, case, inp, ref, ref_grads, floors in cases():
        if ("mesh", name) not in res["meta"]:
            continue
        cuts, parts = res["meta"][("mesh", name)]
        per_rank = [r[f"mesh:{name}"] for r in res["per_rank"]]
        # ranks {0, 1} hold the first half of the batch, {2, 3} the second; within a pair the
        # vocabulary is split: the pair agrees on everything but its weight shard
        for a, c in ((0, 1), (2, 3)):
            for key in ("loss", "logprobs", "entropy", "hidden"):
                assert torch.equal(per_rank[a][key], per_rank[c][key]), f"{name}: {key} differs in pair {a}, {c}"
        dp_ranks = []
        for dp_rank in (0, 1):
            pair = per_rank[2 * dp_rank: 2 * dp_rank + 2]
            merged = dict(pair[0])
            merged["weight"] = torch.cat([p["weight"] for p in pair])
            merged["bias"] = None if pair[0]["bias"] is None else torch.cat([p["bias"] for p in pair])
            dp_ranks.append(merged)
        got, grads = _dp_combined(name, case, inp, dp_ranks, parts)
        _check_against(name, case, inp, ref, ref_grads, floors, got, grads, key="oracle")
        checked += 1
    assert checked >= 8


# ---------------------------------------------------------------------------------------------
# more jobs: DDP, accumulation, Triton, errors, the log of collectives
# ---------------------------------------------------------------------------------------------


def _batch(seed=0, B=4, T=6, D=8, V=29):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g)
    W = torch.randn(V, D, generator=g) * 0.7
    b = 0.3 * torch.randn(V, generator=g)
    b[-3:] = -math.inf  # a padded vocabulary
    y = torch.randint(0, V - 3, (B, T), generator=g)
    adv = torch.randn(B, generator=g)
    old = -2 * torch.rand(B, T, generator=g) - 0.3
    mask = torch.rand(B, T, generator=g) > 0.2
    return h, W, b, y, adv, old, mask


KW = dict(repo="decorrelate", repo_coef=0.9, entropy_coef=0.02, aggregation="seq-mean-token-mean", dual_clip=3.0)


class _PolicyHead(torch.nn.Module):
    """The LM head as a module whose forward computes the loss: what DDP and FSDP2 wrap."""

    def __init__(self, W, b):
        super().__init__()
        self.weight = torch.nn.Parameter(W.clone())
        self.bias = torch.nn.Parameter(b.clone())

    def forward(self, h, y, adv, old, mask):
        out = fused_pg.repo_loss(h, self.weight, y, adv, old, mask, bias=self.bias,
                                 data_parallel_group=dist.group.WORLD, **KW)
        return out.loss


def _wrapped_job(wrap):
    """DDP / FSDP2 average gradients: loss * world reproduces the one-process gradient."""

    def job(rank, world):
        h, W, b, y, adv, old, mask = _batch()
        B = y.shape[0]
        a, c = B * rank // world, B * (rank + 1) // world
        head = _PolicyHead(W, b)
        model = wrap(head, world)
        loss = model(h[a:c], y[a:c], adv[a:c], old[a:c], mask[a:c])
        (loss * world).backward()
        grads = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for p in (head.weight, head.bias)]
        error = None
        try:  # outside the wrapped forward, FSDP2's weight is a sharded DTensor: refused by name
            fused_pg.repo_loss(h[a:c], head.weight, y[a:c], adv[a:c], old[a:c], mask[a:c])
        except TypeError as err:
            error = str(err)
        return dict(weight=grads[0], bias=grads[1], loss=loss.detach(), error=error)

    return job


def _ddp(module, world):
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module)


def _fsdp2(module, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    fully_shard(module, mesh=init_device_mesh("cpu", (world,)))
    return module


def _accumulation_job(rank, world):
    """Gradient accumulation inside data parallelism: statistics of the whole group's batch from
    repo_statistics(process_group=), the token count summed over the group."""
    h, W, b, y, adv, old, mask = _batch(seed=1)
    B = y.shape[0]
    a, c = B * rank // world, B * (rank + 1) // world
    Wr = W.clone().requires_grad_()
    micro = [(i, i + 1) for i in range(a, c)]
    with torch.no_grad():
        parts = [repo_statistics_of(h[i:j], W, b, y[i:j], adv[i:j], mask[i:j]) for i, j in micro]
    stats = fused_pg.RepoStats.merge_all(parts).all_reduce(dist.group.WORLD)
    n_tokens = (mask[a:c]).sum().double()
    dist.all_reduce(n_tokens)
    for i, j in micro:
        out = fused_pg.repo_loss(h[i:j], Wr, y[i:j], adv[i:j], old[i:j], mask[i:j], bias=b, repo_stats=stats,
                                 num_items_in_batch=n_tokens, **{**KW, "aggregation": "token-mean"})
        out.loss.backward()
    grad = Wr.grad if Wr.grad is not None else torch.zeros_like(W)
    dist.all_reduce(grad)
    return dict(weight=grad, stats=stats.as_tensor())


def repo_statistics_of(h, W, b, y, adv, mask):
    logp, _ = fused_pg.fused_logprobs_entropy(h, W, y, bias=b)
    return fused_pg.repo_statistics(logp, adv, mask)


def _comm_log_job(rank, world):
    """The collectives of one vocabulary-parallel step, as CommLog records them."""
    h, W, b, y, adv, old, mask = _batch(seed=2)
    V = W.shape[0]
    a, c = V * rank // world, V * (rank + 1) // world
    hh = h.clone().requires_grad_()
    w = W[a:c].clone().requires_grad_()
    with CommLog() as log:
        out = fused_pg.repo_loss(hh, w, y, adv, old, mask, bias=b[a:c], validate=False,
                                 process_group=dist.group.WORLD, **KW)
        out.loss.backward()
    return log.calls


def _logprobs_entropy_job(rank, world):
    """fused_logprobs_entropy(process_group=) with an upstream gradient on both outputs."""
    h, W, b, y, adv, old, mask = _batch(seed=3)
    y = torch.where(mask, y, -100)
    V = W.shape[0]
    a, c = V * rank // world, V * (rank + 1) // world
    hh = h.clone().requires_grad_()
    w = W[a:c].clone().requires_grad_()
    logp, ent = fused_pg.fused_logprobs_entropy(hh, w, y, bias=b[a:c], temperature=0.8, softcap=5.0,
                                                vocab_chunk=5, process_group=dist.group.WORLD)
    g = torch.Generator().manual_seed(9)
    ((logp * torch.randn(logp.shape, generator=g)).sum() + (ent * torch.randn(ent.shape, generator=g)).sum()).backward()
    return dict(logp=logp.detach(), ent=ent.detach(), hidden=hh.grad, weight=w.grad)


def _triton_job(case, inp, cuts):
    return _tp_job(case, inp, cuts, backend="triton")


def _error_jobs(world):
    """Each job provokes one error that every rank must raise (no rank left in a collective)."""
    h, W, b, y, adv, old, mask = _batch(seed=4)
    V = W.shape[0]

    def shard(rank):
        return W[V * rank // world: V * (rank + 1) // world], b[V * rank // world: V * (rank + 1) // world]

    def expect(fn):
        def job(rank, world_):
            try:
                fn(rank)
            except (ValueError, TypeError, RuntimeError) as err:
                return dict(error=f"{type(err).__name__}: {err}")
            return dict(error=None)
        return job

    def loss(rank, **over):
        w, bb = shard(rank)
        kw = dict(hidden=h, weight=w, targets=y, bias=bb)
        kw.update(over)
        return fused_pg.repo_loss(kw.pop("hidden"), kw.pop("weight"), kw.pop("targets"), adv, old, mask,
                                  process_group=dist.group.WORLD, **kw)

    def other_d(rank):
        w, bb = shard(rank)
        # a rank whose shard has another D: its hidden must match it too, or it fails alone
        if rank == 1:
            return loss(rank, hidden=torch.randn(*h.shape[:-1], 5), weight=torch.randn(w.shape[0], 5))
        return loss(rank)

    def other_hidden(rank):
        return loss(rank, hidden=h + (rank == world - 1) * 1e-3)

    def other_requires_grad(rank):
        return loss(rank, hidden=h.clone().requires_grad_(rank == 0))

    counted = tuple(mask.nonzero()[0].tolist())

    def excluded_target(rank):
        yy = y.clone()
        yy[counted] = V - 1  # bias -inf, on the last rank
        return loss(rank, targets=yy)

    def out_of_range(rank):
        yy = y.clone()
        yy[counted] = V + 5
        return loss(rank, targets=yy)

    def all_excluded(rank):
        w, bb = shard(rank)
        return loss(rank, bias=torch.full_like(bb, -math.inf))

    def nan_weight(rank):
        w, bb = shard(rank)
        if rank == world - 1:
            w = w.clone()
            w[0, 0] = math.nan
        return loss(rank, weight=w)

    def reference_backend(rank):
        return loss(rank, backend="reference")

    def not_a_group(rank):
        w, bb = shard(rank)
        return fused_pg.repo_loss(h, w, y, adv, old, mask, bias=bb, process_group="tp")

    return [(f"error:{fn.__name__}", expect(fn)) for fn in (
        other_d, other_hidden, other_requires_grad, excluded_target, out_of_range, all_excluded,
        nan_weight, reference_backend, not_a_group)]


def extra_jobs(world: int) -> list:
    jobs = [("ddp", _wrapped_job(_ddp)), ("fsdp2", _wrapped_job(_fsdp2)), ("accumulation", _accumulation_job), ("comm_log", _comm_log_job),
            ("logprobs_entropy", _logprobs_entropy_job)]
    jobs += _error_jobs(world)
    if world == 2:
        for name, case, inp, *_ in triton_cases():
            jobs.append((f"triton:{name}", _triton_job(case, inp, vocab_cuts(case.head.V, 2, 3))))
    return jobs


@lru_cache(maxsize=None)
def triton_cases():
    """Two fp32 cases for the Triton kernels under the interpreter (slow: kept small)."""
    out = []
    for name, case, inp, ref, grads, floors in cases():
        if case.dtype == "fp32" and case.head.N <= 24 and case.head.V <= 64 and case.head.bias != "none":
            out.append((name, case, inp, ref, grads, floors))
    return out[:2]


# ---------------------------------------------------------------------------------------------
# checks of the extra jobs
# ---------------------------------------------------------------------------------------------


def _one_process_batch(seed, **over):
    h, W, b, y, adv, old, mask = _batch(seed=seed)
    Wl = W.clone().requires_grad_()
    bl = b.clone().requires_grad_()
    out = fused_pg.repo_loss(h, Wl, y, adv, old, mask, bias=bl, **{**KW, **over})
    out.loss.backward()
    return out, Wl.grad, bl.grad


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
@pytest.mark.parametrize("world", WORLDS)
def test_ddp_and_fsdp2_with_the_loss_scaled_by_the_group_size(world, wrapper):
    """The loss computed inside the wrapped module's forward: DDP all-reduces, FSDP2 gathers the
    sharded weight for the sweep and reduce-scatters its gradient; both average, so the loss is
    scaled by the group size before backward."""
    res = group_results(world)["per_rank"]
    one, dW, db = _one_process_batch(0)
    for r in res:
        assert_close(f"{wrapper} weight grad", dW, r[wrapper]["weight"], atol=1e-6, rtol=1e-5)
        assert_close(f"{wrapper} bias grad", db, r[wrapper]["bias"], atol=1e-6, rtol=1e-5)
    assert_close(f"sum of {wrapper} losses", one.loss, sum(r[wrapper]["loss"] for r in res), atol=1e-6, rtol=1e-5)
    for r in res:
        if wrapper == "fsdp2":
            assert r[wrapper]["error"] is not None and "weight is a DTensor" in r[wrapper]["error"]
        else:
            assert r[wrapper]["error"] is None


@pytest.mark.parametrize("world", WORLDS)
def test_accumulation_with_group_statistics(world):
    res = group_results(world)["per_rank"]
    h, W, b, y, adv, old, mask = _batch(seed=1)
    one, dW, _ = _one_process_batch(1, aggregation="token-mean")
    with torch.no_grad():
        whole = repo_statistics_of(h, W, b, y, adv, mask)
    for r in res:
        assert_close("group statistics", whole.as_tensor(), r["accumulation"]["stats"], atol=1e-10, rtol=1e-8)
        assert_close("accumulated weight grad", dW, r["accumulation"]["weight"], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("world", WORLDS)
def test_collectives_of_a_vocab_parallel_step(world):
    """Forward: one all-gather of the shard sizes, one of [3, N] statistics; backward: one
    all-reduce of d_hidden. O(N) and O(N D) payloads (N: the tokens that count); nothing of
    size N x V."""
    res = group_results(world)["per_rank"]
    h, W, b, y, adv, old, mask = _batch(seed=2)
    N, D = int(mask.sum()), h.shape[2]  # compact_rows (default on CPU) sweeps the tokens that count
    for r in res:
        assert r["comm_log"] == [("all_gather", 8), ("all_gather", 3 * N * 4), ("all_reduce", N * D * 4)]
    predicted = vocab_parallel_comm_bytes(N, D, world)
    assert predicted["stats_all_gather"] == (world - 1) * 3 * N * 4
    assert predicted["dhidden_all_reduce"] == 2 * (world - 1) * 4 * N * D // world


@pytest.mark.parametrize("world", WORLDS)
def test_fused_logprobs_entropy_vocab_parallel(world):
    res = group_results(world)["per_rank"]
    h, W, b, y, adv, old, mask = _batch(seed=3)
    y = torch.where(mask, y, -100)
    hh, Wl = h.clone().requires_grad_(), W.clone().requires_grad_()
    logp, ent = fused_pg.fused_logprobs_entropy(hh, Wl, y, bias=b, temperature=0.8, softcap=5.0, vocab_chunk=5)
    g = torch.Generator().manual_seed(9)
    ((logp * torch.randn(logp.shape, generator=g)).sum() + (ent * torch.randn(ent.shape, generator=g)).sum()).backward()
    for r in res:
        got = r["logprobs_entropy"]
        assert_close("logp", logp, got["logp"], atol=1e-5, rtol=1e-5)
        assert_close("entropy", ent, got["ent"], atol=1e-5, rtol=1e-5)
        assert_close("d hidden", hh.grad, got["hidden"], atol=1e-5, rtol=1e-4)
    dW = torch.cat([r["logprobs_entropy"]["weight"] for r in res])
    assert_close("d weight", Wl.grad, dW, atol=1e-5, rtol=1e-4)


ERRORS = {
    "other_d": "weight shards differ in hidden size D",
    "other_hidden": "hidden, targets or mask differ between rank 0",
    "other_requires_grad": "hidden.requires_grad is True on rank 0",
    "excluded_target": "targets contains id 28 whose bias is -inf on rank",
    "out_of_range": "targets contains id 34 outside [0, 29)",
    "all_excluded": "bias excludes every vocabulary entry (all -inf on every rank",
    "nan_weight": "of process_group: weight contains NaN",
    "reference_backend": "needs a sweep backend ('torch' or 'triton'), not backend='reference'",
    "not_a_group": "process_group must be a torch.distributed ProcessGroup",
}


@pytest.mark.parametrize("world", WORLDS)
def test_errors_are_raised_on_every_rank(world):
    res = group_results(world)["per_rank"]
    for name, message in ERRORS.items():
        for rank, r in enumerate(res):
            err = r[f"error:{name}"]["error"]
            assert err is not None, f"{name}: rank {rank} raised nothing"
            assert message in err, f"{name}: rank {rank} raised {err!r}, expected {message!r}"


@pytest.mark.interpreter
def test_vocab_parallel_triton_kernels():
    """The Triton sweeps (interpreter) on shard-local targets: OFF_SHARD never matches a padded
    tile column (a target of V_r would: the forward's last tile pads past V_r with -inf)."""
    res = group_results(2)
    assert triton_cases(), "no small case for the interpreter"
    for name, case, inp, ref, ref_grads, floors in triton_cases():
        ranks = [r[f"triton:{name}"] for r in res["per_rank"]]
        grads = {"hidden": ranks[0]["hidden"], "weight": torch.cat([r["weight"] for r in ranks]),
                 "bias": None if ranks[0]["bias"] is None else torch.cat([r["bias"] for r in ranks])}
        _check_against(f"triton {name}", case, inp, ref, ref_grads, floors, ranks[0], grads, key="oracle")


# ---------------------------------------------------------------------------------------------
# one process: the merge formula and the OFF_SHARD protocol of the sweep backends
# ---------------------------------------------------------------------------------------------


def test_merging_shard_statistics_is_exact_in_fp64():
    """lse, entropy and the target logit merged from per-shard (lse_r, H_r, z_y) equal the
    whole vocabulary's, including a shard whose logits are all -inf."""
    g = torch.Generator().manual_seed(0)
    z = 4 * torch.randn(7, 23, generator=g, dtype=torch.float64)
    z[:, 15:19] = -math.inf
    cuts = [0, 5, 15, 19, 23]
    lse_k, H_k = [], []
    for a, c in zip(cuts[:-1], cuts[1:]):
        zz = z[:, a:c]
        lse = torch.logsumexp(zz, 1)
        p = torch.exp(zz - lse[:, None])
        H_k.append(torch.where(torch.isfinite(lse), -(p * torch.where(p > 0, zz - lse[:, None], 0.0)).sum(1), math.nan))
        lse_k.append(lse)
    y = torch.randint(0, 15, (7,), generator=g)
    zy_k = torch.stack([torch.where((y >= a) & (y < c), z.gather(1, y[:, None]).squeeze(1), 0.0)
                        for a, c in zip(cuts[:-1], cuts[1:])])
    lse, H, zy = merge_shard_stats(torch.stack(lse_k), torch.stack(H_k), zy_k)
    p = torch.softmax(z, 1)
    assert_close("lse", torch.logsumexp(z, 1), lse, rtol=1e-14)
    assert_close("entropy", -(p * torch.where(p > 0, torch.log_softmax(z, 1), 0.0)).sum(1), H, atol=1e-13, rtol=1e-13)
    assert torch.equal(zy, z.gather(1, y[:, None]).squeeze(1))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_sweeps_honour_off_shard_targets(backend):
    """A target OFF_SHARD counts (entropy and lse of this weight's rows) without a target logit
    (log-prob = -lse) or a one-hot term in the backward; V % tile != 0 exercises padding."""
    from fused_pg import backends
    from fused_pg.config import HeadConfig

    sweeps = backends.REGISTRY[backend].load()
    cfg = HeadConfig(vocab_chunk=16)
    g = torch.Generator().manual_seed(0)
    h, W = torch.randn(9, 8, generator=g), torch.randn(53, 8, generator=g)
    y = torch.full((9,), OFF_SHARD)
    y[4] = -1
    logp, H, lse = sweeps.forward_sweep(h, W, None, y, cfg)
    z = h.double() @ W.double().T
    ref_lse = torch.logsumexp(z, 1)
    p = torch.softmax(z, 1)
    ref_H = -(p * torch.log_softmax(z, 1)).sum(1)
    counts = y >= 0
    assert_close("lse", ref_lse, lse, atol=1e-5, rtol=1e-5, where=counts)  # rows not counted: zeroed hidden
    assert_close("entropy", torch.where(counts, ref_H, 0.0), H, atol=1e-5, rtol=1e-5)
    assert_close("logp = -lse", torch.where(counts, -ref_lse, 0.0), logp, atol=1e-5, rtol=1e-5)
    ge = torch.randn(2, 9, generator=g, dtype=torch.float64)
    gl, ee = torch.where(counts, ge[0], 0.0), torch.where(counts, ge[1], 0.0)
    dh, dW, _ = sweeps.backward_sweep(h, W, None, y, lse, H, gl.float(), ee.float(), cfg, needs=(True, True, False))
    logp_all = torch.log_softmax(z, 1)
    # d/dz of g * (-lse) + e * H, no one-hot term
    dz = -gl[:, None] * p - ee[:, None] * p * (logp_all + ref_H[:, None])
    assert_close("d hidden", dz @ W.double(), dh, atol=1e-5, rtol=1e-4)
    assert_close("d weight", dz.T @ h.double(), dW, atol=1e-5, rtol=1e-4)


def test_metric_reductions_cover_every_metric():
    """Every metric of the one table says how data-parallel ranks combine it."""
    assert set(fused_pg.METRICS) == set(fused_pg.METRIC_KEYS)
    assert {m.reduction for m in fused_pg.METRICS.values()} <= {"mean", "sum", "max", "same", "empty"}


def test_measured_communication_matches_the_formula():
    """measure_vocab_parallel (the benchmark's entry point) on a small head: the bytes gloo sends
    per step are the predicted ring volume (plus a little framing)."""
    from fused_pg.bench.vocab_parallel import measure_vocab_parallel

    try:
        with open("/proc/self/io") as f:
            assert "wchar:" in f.read()
    except (OSError, AssertionError):
        pytest.skip("no /proc/self/io write accounting on this system")
    rows = measure_vocab_parallel((1, 2), tokens=96, hidden=16, vocab=500, steps=2, warmup=1)
    assert [r["world_size"] for r in rows] == [1, 2]
    assert rows[0]["bytes_sent"] == 0 and rows[0]["collectives"] == []
    r = rows[1]
    assert r["collectives"] == ["all_gather", "all_gather", "all_reduce"]
    assert r["payload_bytes"] == 8 + 3 * 96 * 4 + 96 * 16 * 4
    total = r["predicted"]["total"]
    assert total <= r["bytes_sent"] <= total + 4096, (r["bytes_sent"], total)
    assert r["median_s"] > 0 and 0 <= r["comm_median_s"] <= r["median_s"]


@pytest.mark.cuda
def test_nccl_vocab_and_data_parallel():
    """The same equalities with NCCL, one GPU per rank (2 to 4), Triton and torch backends."""
    import tempfile

    import torch.multiprocessing as mp

    from nccl_jobs import distributed_worker

    n = torch.cuda.device_count()
    if n < 2:
        pytest.skip(f"NCCL tests need at least 2 CUDA GPUs; this machine has {n}")
    if not dist.is_nccl_available():
        pytest.skip("this torch build has no NCCL")
    world = min(n, 4)
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(distributed_worker, args=(world, f"file://{tmp}/store"), nprocs=world,
                           start_method="spawn")
