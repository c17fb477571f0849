"""Scale-out through ``torch.distributed``: a vocabulary-parallel LM head, and data-parallel
REPO statistics, normalisers and metrics.

**Vocabulary parallelism** (``process_group=`` of :func:`fused_pg.repo_loss` and
:func:`fused_pg.fused_logprobs_entropy`). Rank ``r`` of the group holds the rows
``[v_r, v_r + V_r)`` of the LM-head weight (and bias), consecutive in rank order
(``v_r = V_0 + ... + V_{r-1}``; sizes may differ), and every rank passes the same hidden
states, targets and per-token arguments. Each rank sweeps its shard with the ordinary sweep
backend, on shard-local targets (a target on another rank becomes :data:`OFF_SHARD`: the row
counts, its target logit is simply not in this shard). From each shard's
``(logp_r, H_r, lse_r)`` per token, one all-gather of ``[3, N]`` gives, on every rank, in rank
order (bitwise identical on all ranks)::

    lse = logsumexp_r lse_r,      w_r = exp(lse_r - lse)            (sum_r w_r = 1)
    H   = sum_r w_r (H_r + lse - lse_r)                             (each term >= 0)
    z_y = logp_r + lse_r   on the rank that owns the target,     logp = z_y - lse

Backward: every rank runs its backward sweep with the *global* ``lse`` and ``H`` and its
shard-local targets; ``dL/dz_v = g (1[v = y] - p_v) - e p_v (log p_v + H)`` needs nothing
else, so ``dW_r`` and ``db_r`` stay local and ``dh`` is summed over the group (one
all-reduce, fp32). Communication per step, per rank, ``R`` ranks, ``N`` tokens: the forward
all-gather sends ``3 N s`` bytes (``s`` = 4 for fp32 statistics, 8 for fp64 inputs) and
receives ``(R - 1) 3 N s``; the ``dh`` all-reduce moves ``2 (R - 1) / R * 4 N D`` bytes each
way with a ring algorithm (none when hidden needs no gradient); plus ``8 R`` bytes for the
shard sizes. Nothing of size ``N x V``.

**Data parallelism** (``data_parallel_group=`` of :func:`fused_pg.repo_loss` and
:func:`fused_pg.policy_loss_from_logprobs`; :func:`fused_pg.repo_statistics` and
:meth:`fused_pg.RepoStats.all_reduce` for gradient accumulation). Each rank holds a different
part of the batch. The REPO statistics are all-gathered and merged in rank order, the
normaliser (``num_items_in_batch``) is summed over the group, and the metrics are those of the
whole batch. Convention: ``out.loss`` on rank ``r`` is rank ``r``'s share of the loss of the
concatenated batch, so the *sum* over ranks of the losses (and of their gradients) equals one
process on the concatenated batch. DDP and FSDP *average* gradients over the group: multiply
the loss by the group size before ``backward()`` to get the one-process gradient (or turn the
wrapper's averaging off).

Every collective goes through this module's small helpers, which a :class:`CommLog` can
record, so the communication volume is measured rather than assumed.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import backends, checks, head  # head imports this module first; head.* is used at call time
from .config import HeadConfig
from .stats import RepoStats

OFF_SHARD = 2**62
"""Shard-local target of a row that counts but whose target lives on another rank. It is
``>= V_r`` (the target-logit match never fires, in any tile of any backend, whatever its
padding) and ``>= 0`` (the row is not "ignored": only ``targets < 0`` means that)."""


# ---------------------------------------------------------------------------------------------
# collectives: the only calls into torch.distributed, recorded by CommLog
# ---------------------------------------------------------------------------------------------

_LOGS: list["CommLog"] = []


@dataclass
class CommLog:
    """Records the collectives this module issues while active (``with CommLog() as log:``).

    ``calls``: ``(op, payload_bytes)`` per collective, where the payload is this rank's input
    tensor (``numel * itemsize``; the pickled size for object gathers); ``seconds``: the
    wall time spent in each (on GPU: to enqueue it, collectives being asynchronous there).
    """

    calls: list = None
    seconds: list = None

    def __post_init__(self):
        self.calls, self.seconds = [], []

    def __enter__(self) -> "CommLog":
        _LOGS.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _LOGS.remove(self)

    def payload_bytes(self, op: str | None = None) -> int:
        return sum(b for o, b in self.calls if op is None or o == op)

    def total_seconds(self) -> float:
        return sum(self.seconds)


@contextmanager
def _record(op: str, nbytes: int):
    start = time.perf_counter()
    yield
    elapsed = time.perf_counter() - start
    for log in _LOGS:
        log.calls.append((op, nbytes))
        log.seconds.append(elapsed)


def _group_size(group) -> int:
    return dist.get_world_size(group)


def _all_gather(x: Tensor, group) -> Tensor:
    """[*shape] on every rank -> [R, *shape], rank order."""
    R = _group_size(group)
    x = x.contiguous()
    out = torch.empty((R * x.shape[0],) + tuple(x.shape[1:]) if x.dim() else (R,),
                      dtype=x.dtype, device=x.device)
    # torch >= 2.13 names it all_gather_single (all_gather_into_tensor is deprecated there)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    with _record("all_gather", x.numel() * x.element_size()):
        gather(out, x if x.dim() else x.reshape(1), group=group)
    return out.view((R,) + tuple(x.shape))


def _all_reduce_sum(x: Tensor, group) -> None:
    with _record("all_reduce", x.numel() * x.element_size()):
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)


def _all_gather_object(obj, group) -> list:
    import pickle

    out = [None] * _group_size(group)
    with _record("all_gather_object", len(pickle.dumps(obj))):
        dist.all_gather_object(out, obj, group=group)
    return out


def check_group(name: str, group) -> None:
    """A process group argument: torch.distributed initialised and ``group`` usable."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{name} needs torch.distributed to be initialised "
                           "(torch.distributed.init_process_group)")
    if group is not dist.group.WORLD and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{name} must be a torch.distributed ProcessGroup (e.g. dist.group.WORLD or "
                        f"one from dist.new_group), got {type(group).__name__}")
    if dist.get_rank(group) < 0:
        raise ValueError(f"{name}: this process (global rank {dist.get_rank()}) is not a member of the group")


def reject_dtensor(name: str, x) -> None:
    """A ``DTensor`` (FSDP2's sharded parameter, or a tensor-parallel tensor) is refused by name:
    the sweeps work on local tensors, and a sharded weight used outside its module's forward
    would get neither FSDP2's all-gather nor its gradient reduce-scatter."""
    if x is None or "torch.distributed.tensor" not in sys.modules:
        return  # no DTensor can exist before that module is imported
    from torch.distributed.tensor import DTensor

    if isinstance(x, DTensor):
        raise TypeError(
            f"{name} is a DTensor (placements {tuple(x.placements)}); fused_pg needs local tensors. "
            "With FSDP2 (fully_shard), compute the loss inside the forward of the module that owns the "
            "LM-head weight: FSDP2 then gathers the full weight for the sweep and reduce-scatters its "
            "gradient (see docs/distributed.md). For a vocabulary split over ranks, pass the local "
            f"shard ({name}.to_local()) with process_group=.")


# ---------------------------------------------------------------------------------------------
# vocabulary parallelism: the layout of the shards
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VocabShard:
    """This rank's part of a vocabulary split over ``group`` in rank order.

    start, vocab_size: 0-dim int64 tensors on the weight's device (no host synchronisation):
    the first global id of this rank's rows, and the total vocabulary ``V = sum_r V_r``.
    size: ``V_r``, this rank's number of rows (host int, from the local weight's shape).
    """

    group: object
    rank: int
    world: int
    size: int
    start: Tensor
    vocab_size: Tensor

    @staticmethod
    def of(group, weight: Tensor) -> "VocabShard":
        """Shard layout from one all-gather of the shard sizes (R int64)."""
        check_group("process_group", group)
        # a fill, not a host-to-device copy: nothing here waits for the device
        sizes = _all_gather(torch.full((1,), weight.shape[0], dtype=torch.int64, device=weight.device), group)
        sizes = sizes.reshape(-1)
        rank = dist.get_rank(group)
        return VocabShard(group=group, rank=rank, world=sizes.numel(), size=weight.shape[0],
                          start=sizes[:rank].sum(), vocab_size=sizes.sum())

    def local_targets(self, targets: Tensor) -> Tensor:
        """Global int64 targets (-1: not counted) -> shard-local ones: ``y - start`` where this
        rank holds ``y``, :data:`OFF_SHARD` where another rank does, -1 where not counted."""
        here = (targets >= self.start) & (targets < self.start + self.size)
        return torch.where(targets < 0, -1, torch.where(here, targets - self.start, OFF_SHARD))

    def check_values(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                     counted: Tensor, valid: Tensor, ignore_index: int) -> None:
        """The value checks of the one-process head, made across the group (``validate=True``).

        Every rank gathers every rank's view and raises the same error, so that no rank is
        left waiting in a collective: weight shards with different ``D``, hidden states,
        targets or ``hidden.requires_grad`` that differ between ranks, NaN/Inf in a weight
        shard, NaN/+Inf in a bias shard, a bias that excludes every id on every rank, target
        ids outside ``[0, V)``, or targets whose (owning rank's) bias is -inf.

        hidden [N, D]; targets, counted, valid: flat [N] (int64 ids; tokens whose ids must be
        vocabulary ids; tokens that count).
        """
        f64 = torch.float64
        rows = hidden.reshape(valid.numel(), hidden.shape[-1])
        problem = None
        try:
            checks.finite("hidden", rows[valid])
            checks.finite("weight", weight)
            if bias is not None and (bool(torch.isnan(bias).any()) or bool((bias == float("inf")).any())):
                raise ValueError("bias contains NaN or +Inf values (only -inf is allowed, to exclude tokens)")
        except ValueError as err:
            problem = str(err)
        # a fingerprint of what must be identical on every rank (position-weighted sums)
        pos = torch.arange(1, valid.numel() + 1, dtype=f64, device=valid.device)
        fingerprint = (
            tuple(hidden.shape),
            float(torch.where(valid, rows.detach().to(f64).sum(1) * pos, 0.0).sum()) if problem is None else None,
            float((torch.where(counted, targets, -1).to(f64) * pos).sum()),
            float((valid.to(f64) * pos).sum()),
        )
        start = int(self.start)
        here = valid & (targets >= start) & (targets < start + self.size)
        excluded = None
        if bias is not None:
            hit = here & torch.isneginf(bias)[torch.where(here, targets - start, 0)]
            if bool(hit.any()):
                excluded = int(targets[hit][0])
        info = dict(D=weight.shape[1], V=weight.shape[0], problem=problem, fingerprint=fingerprint,
                    requires_grad=bool(hidden.requires_grad), excluded=excluded,
                    live_bias=bias is None or bool(torch.isfinite(bias).any()))
        views = _all_gather_object(info, self.group)
        where = lambda k: f"rank {k} of process_group"  # noqa: E731
        for k, v in enumerate(views):
            if v["problem"] is not None:
                raise ValueError(f"{where(k)}: {v['problem']}")
        for k, v in enumerate(views):
            if v["D"] != views[0]["D"]:
                raise ValueError(f"weight shards differ in hidden size D: {where(0)} has shape "
                                 f"({views[0]['V']}, {views[0]['D']}), {where(k)} has ({v['V']}, {v['D']}); "
                                 "every shard is [V_r, D] with the same D")
            if v["fingerprint"] != views[0]["fingerprint"]:
                raise ValueError(f"hidden, targets or mask differ between {where(0)} and {where(k)}: the "
                                 "vocabulary-parallel head needs the same hidden states and per-token "
                                 "arguments on every rank (each rank holds a slice of the vocabulary)")
            if v["requires_grad"] != views[0]["requires_grad"]:
                raise ValueError(f"hidden.requires_grad is {views[0]['requires_grad']} on {where(0)} but "
                                 f"{v['requires_grad']} on {where(k)}: the backward all-reduces d_hidden, "
                                 "so every rank must agree")
        if not any(v["live_bias"] for v in views):
            raise ValueError("bias excludes every vocabulary entry (all -inf on every rank of process_group)")
        checks.target_ids(targets, counted, sum(v["V"] for v in views), ignore_index)
        for k, v in enumerate(views):
            if v["excluded"] is not None:
                raise ValueError(f"targets contains id {v['excluded']} whose bias is -inf on {where(k)} "
                                 "(an excluded token): its log-probability would be -inf")


# ---------------------------------------------------------------------------------------------
# vocabulary parallelism: merging the shards' statistics, and the autograd Function
# ---------------------------------------------------------------------------------------------


def merge_shard_stats(lse_k: Tensor, entropy_k: Tensor, target_logit_k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-shard statistics ``[R, N]`` (rank order) -> global ``(lse, entropy, target_logit)`` [N].

    lse = logsumexp_r lse_r;  H = sum_r w_r (H_r + lse - lse_r), w_r = exp(lse_r - lse);
    z_y = sum_r z_y,r (0 except on the owning rank). A shard whose logits are all -inf for a
    token (every id excluded by a -inf bias) has lse_r = -inf and contributes nothing.
    """
    lse = torch.logsumexp(lse_k, dim=0)
    lse_safe = torch.where(torch.isfinite(lse), lse, 0.0)
    live = lse_k > float("-inf")
    w = torch.exp(lse_k - lse_safe)
    entropy = torch.where(live, w * (entropy_k + (lse_safe - lse_k)), 0.0).sum(0)
    return lse, entropy, target_logit_k.sum(0)


class VocabParallelHead(torch.autograd.Function):
    """(hidden [N, D], weight [V_r, D], bias [V_r] | None, shard-local targets [N]) ->
    (logprobs, entropy) of the whole vocabulary, identical on every rank of ``group``.

    Saves the inputs plus the global ``lse`` and ``entropy`` ([N] each). Forward: one sweep of
    the local shard and one all-gather of ``[3, N]``. Backward: one sweep with the global
    statistics (``dW_r``, ``db_r`` local) and one all-reduce of ``d_hidden`` (fp32).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, sweeps, cfg: HeadConfig, group):
        with torch.autocast(hidden.device.type, enabled=False):
            logp_r, entropy_r, lse_r = sweeps.forward_sweep(hidden, weight, bias, targets, cfg)
            owned = (targets >= 0) & (targets < weight.shape[0])
            target_logit_r = torch.where(owned, logp_r + lse_r, 0.0)
            gathered = _all_gather(torch.stack([lse_r, entropy_r, target_logit_r]), group)  # [R, 3, N]
            lse, entropy, target_logit = merge_shard_stats(*gathered.unbind(1))
        valid = targets >= 0
        logprobs = torch.where(valid, target_logit - lse, 0.0)
        entropy = torch.where(valid, entropy, 0.0)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.sweeps, ctx.cfg, ctx.group = sweeps, cfg, group
        return logprobs, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logprobs, grad_entropy):
        # dh = sum_r dlogits_r @ W_r: every rank contributes its vocabulary slice (fp32 sum)
        grads = head.sweep_gradients(ctx, grad_logprobs, grad_entropy,
                                     reduce_d_hidden=lambda dh: _all_reduce_sum(dh, ctx.group))
        return (*grads, None, None, None, None)


def vocab_parallel_sweep(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, cfg: HeadConfig,
                         backend: backends.Backend, impl, shard: VocabShard) -> tuple[Tensor, Tensor]:
    """The sweep of :func:`fused_pg.head.run_head` for a vocabulary split over ``shard.group``.

    hidden [N, D] (N > 0; rows that do not count already zeroed or dropped), targets [N] int64
    global ids (-1: not counted) -> (logprobs, entropy) [N] of the whole vocabulary.
    """
    if not backend.sweeps:
        raise ValueError(f"process_group needs a sweep backend ('torch' or 'triton'), "
                         f"not backend={backend.name!r}")
    return VocabParallelHead.apply(hidden, weight, bias, shard.local_targets(targets), impl, cfg, shard.group)


# ---------------------------------------------------------------------------------------------
# data parallelism: REPO statistics, normalisers, metrics
# ---------------------------------------------------------------------------------------------


def all_reduce_repo_stats(stats: RepoStats, group) -> RepoStats:
    """The statistics of the union of every rank's tokens, identical on every rank.

    One all-gather of the [5] float64 vectors, merged in rank order (Chan's pairwise update is
    not a sum, and a fixed order keeps the result bitwise reproducible).
    """
    check_group("process_group", group)
    parts = _all_gather(stats.as_tensor(), group)
    return RepoStats.merge_all([RepoStats.from_tensor(p) for p in parts.unbind(0)])


def local_num_items(batch, aggregation: str) -> Tensor:
    """This batch's normaliser as :func:`fused_pg.epilogue.aggregate` counts it (float64, 0-dim):
    valid tokens (token-mean), sequences with a valid token (seq-mean-token-mean / -sum), or
    all sequences (seq-mean-token-sum-norm, Dr.GRPO). (token-sum has none: its sum over ranks is
    already the whole batch's.)"""
    valid = batch.valid
    if aggregation == "token-mean":
        return valid.sum().to(torch.float64)
    layout = batch.layout
    if aggregation == "seq-mean-token-sum-norm":
        return torch.full((), float(layout.num_seqs), dtype=torch.float64, device=valid.device)
    return (layout.seq_sum(valid.to(torch.float64)) > 0).sum().to(torch.float64)


def data_parallel_batch(batch, logprobs: Tensor, cfg, group):
    """The token batch with whole-group ``repo_stats`` and normalisers, for what the caller did
    not pass itself: one all-gather of float64 (statistics of this rank's tokens from the fresh
    ``logprobs``, and its normaliser of each term that needs one: the policy term's, and the KL /
    entropy terms' when they have their own aggregation)."""
    check_group("data_parallel_group", group)
    own_stats = batch.repo_stats is None
    # (field of the batch, aggregation) of each normaliser to make global
    terms = [("num_items_in_batch", cfg.aggregation)]
    if cfg.kl_aggregation is not None:
        terms.append(("kl_num_items_in_batch", cfg.kl_aggregation))
    if cfg.entropy_aggregation is not None:
        terms.append(("entropy_num_items_in_batch", cfg.entropy_aggregation))
    terms = [(f, mode) for f, mode in terms if getattr(batch, f) is None and mode != "token-sum"]
    if not (own_stats or terms):
        return batch
    stats = RepoStats.of(logprobs.detach(), batch.advantages, batch.valid)
    local = torch.cat([stats.as_tensor(), *[local_num_items(batch, mode).reshape(1) for _, mode in terms]])
    parts = _all_gather(local, group)  # [R, 5 + terms]
    if own_stats:
        merged = RepoStats.merge_all([RepoStats.from_tensor(p[:5]) for p in parts.unbind(0)])
        batch = replace(batch, repo_stats=merged)
    for i, (name, _) in enumerate(terms):
        total = parts[:, 5 + i].sum()
        # an all-empty group keeps the one-process behaviour (loss 0, divided by 1)
        batch = replace(batch, **{name: total.clamp_min(1.0).to(logprobs.dtype)})
    return batch


# How each metric of one rank combines into the metric of the whole group's batch:
# "mean" (over tokens that count, weighted by each rank's n_tokens), "sum", "max", or "same"
# (already global: computed from the group's REPO statistics, or a hyper-parameter).
METRIC_REDUCTION = {
    "pg_loss": "sum", "entropy_mean": "mean", "logprob_mean": "mean", "ratio_mean": "mean",
    "ratio_max": "max", "clip_frac_low": "mean", "clip_frac_high": "mean", "clip_frac_dual": "mean",
    "approx_kl": "mean", "kl_mean": "mean", "tis_weight_mean": "mean", "kl_loss": "sum", "entropy_loss": "sum",
    "repo_zeta": "same",
    "adv_logp_cov_before": "same", "adv_logp_cov_after": "same", "n_tokens": "sum", "n_seqs": "sum",
    "empty_batch": "empty", "eps_low": "same", "eps_high": "same",
}


def data_parallel_metrics(metrics: dict, group) -> dict:
    """Metrics of the whole group's batch, identical on every rank: one all-gather of the
    tensor metrics, combined in rank order (see :data:`METRIC_REDUCTION`)."""
    keys = [k for k, v in metrics.items() if isinstance(v, Tensor) and METRIC_REDUCTION[k] != "same"]
    local = torch.stack([metrics[k].detach().to(torch.float64).reshape(()) for k in keys])
    parts = _all_gather(local, group)  # [R, K]
    col = {k: parts[:, i] for i, k in enumerate(keys)}
    counts = col["n_tokens"]
    total = counts.sum()
    out = dict(metrics)
    for k in keys:
        how, x = METRIC_REDUCTION[k], col[k]
        if how == "mean":
            value = (x * counts).sum() / total.clamp_min(1.0)
        elif how == "sum":
            value = x.sum()
        elif how == "max":
            value = x.max()
        else:  # "empty"
            value = (total == 0).to(torch.float64)
        out[k] = value.to(metrics[k].dtype)
    return out


# ---------------------------------------------------------------------------------------------
# measurement: communication volume and time of the vocabulary-parallel head
# ---------------------------------------------------------------------------------------------


def vocab_parallel_comm_bytes(num_tokens: int, hidden_size: int, world_size: int, *,
                              stats_itemsize: int = 4, hidden_grad: bool = True) -> dict:
    """Bytes one rank sends per training step (forward + backward) of the vocabulary-parallel
    head, by collective, with ring algorithms (what NCCL and gloo use for large payloads).

    sizes: all-gather of 1 int64 -> sends 8 (R - 1) (a ring all-gather forwards R - 1 blocks).
    forward: all-gather of [3, N] statistics -> sends (R - 1) 3 N s.
    backward: all-reduce of d_hidden [N, D] fp32 -> sends 2 (R - 1) / R * 4 N D.
    """
    R, N, D = world_size, num_tokens, hidden_size
    out = {
        "sizes_all_gather": 8 * (R - 1),
        "stats_all_gather": (R - 1) * 3 * N * stats_itemsize,
        "dhidden_all_reduce": (2 * (R - 1) * 4 * N * D) // R if hidden_grad else 0,
    }
    out["total"] = sum(out.values())
    return out


def _bytes_written() -> int:
    """Bytes this process has passed to write-like system calls (Linux ``/proc/self/io``);
    gloo's TCP transport writes every byte it sends through them."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    raise RuntimeError("no wchar in /proc/self/io")


def _bench_worker(rank: int, world: int, init: str, cfg: dict, out_path: str) -> None:
    import json

    torch.set_num_threads(cfg["threads"])
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=init)
    try:
        result = _bench_steps(cfg, group=dist.group.WORLD if world > 1 else None)
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(result, f)
    finally:
        dist.destroy_process_group()


def _bench_steps(cfg: dict, group) -> dict:
    """Time fwd+bwd steps of repo_loss on this rank's shard (or the whole head when group is
    None), with the per-step collectives recorded and the bytes written measured."""
    from .loss import repo_loss

    N, D, V = cfg["tokens"], cfg["hidden"], cfg["vocab"]
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, D, generator=g).requires_grad_()
    weight_full = torch.randn(V, D, generator=g) * D ** -0.5
    targets = torch.randint(0, V, (N,), generator=g)
    adv = torch.randn(N, generator=g)
    old = -torch.rand(N, generator=g) - 0.5
    if group is None:
        weight = weight_full.clone().requires_grad_()
        kw = {}
    else:
        R, rank = dist.get_world_size(group), dist.get_rank(group)
        bounds = [V * k // R for k in range(R + 1)]
        weight = weight_full[bounds[rank]:bounds[rank + 1]].clone().requires_grad_()
        kw = dict(process_group=group)

    def step():
        hidden.grad = weight.grad = None
        out = repo_loss(hidden, weight, targets, adv, old, backend="torch", validate=False, **kw)
        out.loss.backward()

    for _ in range(cfg["warmup"]):
        step()
    times, sent, payload, comm = [], [], [], []
    for _ in range(cfg["steps"]):
        if group is not None:
            dist.barrier(group)
        with CommLog() as log:
            w0, t0 = _bytes_written(), time.perf_counter()
            step()
            t1, w1 = time.perf_counter(), _bytes_written()
        times.append(t1 - t0)
        sent.append(w1 - w0)
        payload.append(log.payload_bytes())
        comm.append(log.total_seconds())
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return dict(median_s=median(times), min_s=min(times), comm_median_s=median(comm), bytes_sent=median(sent),
                payload_bytes=payload[0], collectives=[op for op, _ in log.calls])


def measure_vocab_parallel(world_sizes=(1, 2, 4), *, tokens: int = 2048, hidden: int = 256,
                           vocab: int = 32768, steps: int = 5, warmup: int = 1, threads: int = 1) -> list[dict]:
    """Measure the vocabulary-parallel head on CPU with gloo: time per fwd+bwd step and bytes
    sent per rank, against one process holding the whole head (``world_size == 1``, plain
    ``repo_loss`` without a process group).

    Each world size runs in fresh processes (``fork``), one thread each by default. Returns one
    dict per world size: ``world_size``, ``median_s``/``min_s`` (rank 0's step time),
    ``comm_median_s`` (rank 0's time inside the collectives, waiting for slower ranks included),
    ``bytes_sent`` (rank 0, measured from ``/proc/self/io``: gloo's TCP writes, Linux only),
    ``payload_bytes`` (rank 0's collective inputs, recorded by :class:`CommLog`),
    ``predicted`` (:func:`vocab_parallel_comm_bytes`), and the shape.

    Example::

        for row in measure_vocab_parallel((1, 2, 4), tokens=2048, hidden=256, vocab=32768):
            print(row["world_size"], row["median_s"], row["bytes_sent"], row["predicted"]["total"])
    """
    import json
    import tempfile

    import torch.multiprocessing as mp

    cfg = dict(tokens=tokens, hidden=hidden, vocab=vocab, steps=steps, warmup=warmup, threads=threads)
    rows = []
    for world in world_sizes:
        with tempfile.TemporaryDirectory() as tmp:
            out_path = os.path.join(tmp, "result.json")
            init = f"file://{os.path.join(tmp, 'store')}"
            mp.start_processes(_bench_worker, args=(world, init, cfg, out_path), nprocs=world,
                               start_method="fork")
            with open(out_path) as f:
                result = json.load(f)
        result.update(world_size=world, tokens=tokens, hidden=hidden, vocab=vocab,
                      predicted=vocab_parallel_comm_bytes(tokens, hidden, world) if world > 1 else None)
        rows.append(result)
    return rows
