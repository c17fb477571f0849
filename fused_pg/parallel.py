"""Scale-out as small strategy objects: how the vocabulary and the batch are split over ranks.

``parallel=`` of :func:`fused_pg.repo_loss` (and of :func:`fused_pg.fused_logprobs_entropy`,
:func:`fused_pg.policy_loss_from_logprobs`) takes a :class:`VocabParallel`, a
:class:`DataParallel`, or a :class:`Parallel` holding one of each. The data path calls the same
hooks whatever the layout; :data:`LOCAL` (one process) implements every hook as the identity.

**Vocabulary parallelism** (:class:`VocabParallel`). Rank ``r`` of the group holds the rows
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
all-reduce, fp32). Communication per step and rank (``R`` ranks, ``N`` tokens):
:func:`vocab_parallel_comm_bytes`. Nothing of size ``N x V``.

**Data parallelism** (:class:`DataParallel`; :func:`fused_pg.repo_statistics` and
:meth:`fused_pg.RepoStats.all_reduce` for gradient accumulation). Each rank holds a different
part of the batch. The REPO statistics are all-gathered and merged in rank order, the
normalisers (``num_items_in_batch``) are summed over the group, and the metrics are those of
the whole batch. Convention: ``out.loss`` on rank ``r`` is rank ``r``'s share of the loss of
the concatenated batch, so the *sum* over ranks of the losses (and of their gradients) equals
one process on the concatenated batch. DDP and FSDP *average* gradients over the group:
multiply the loss by the group size before ``backward()`` to get the one-process gradient
(or turn the wrapper's averaging off).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from . import checks, comm
from .backends.sweep import LOCAL_HOOKS
from .batch import TokenBatch
from .epilogue import METRICS
from .stats import RepoStats

OFF_SHARD = 2**62
"""Shard-local target of a row that counts but whose target lives on another rank. It is
``>= V_r`` (the target-logit match never fires, in any tile of any backend, whatever its
padding) and ``>= 0`` (the row is not "ignored": only ``targets < 0`` means that)."""


# ---------------------------------------------------------------------------------------------
# the vocabulary: one process, or a split over ranks
# ---------------------------------------------------------------------------------------------

class _WholeVocabulary:
    """The head of one process: ``V`` rows, global ids are local ids."""

    hooks = LOCAL_HOOKS

    def __init__(self, weight: Tensor):
        self.vocab_size = weight.shape[0]

    def local_targets(self, targets: Tensor) -> Tensor:
        return targets

    def check_values(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                     counted: Tensor, valid: Tensor, ignore_index: int) -> None:
        checks.target_ids(targets, counted, self.vocab_size, ignore_index, bias)
        checks.head_values(hidden, weight, bias, valid)


@dataclass(frozen=True)
class VocabParallel:
    """The LM head's vocabulary split over ``group`` in rank order (see the module doc)."""

    group: object

    def bind(self, weight: Tensor) -> "_VocabShard":
        """This rank's shard layout, from one all-gather of the shard sizes (R int64)."""
        comm.check_group("process_group", self.group)
        # a fill, not a host-to-device copy: nothing here waits for the device
        sizes = comm.all_gather(torch.full((1,), weight.shape[0], dtype=torch.int64, device=weight.device),
                                self.group).reshape(-1)
        rank = comm.rank(self.group)
        return _VocabShard(group=self.group, rank=rank, size=weight.shape[0], start=sizes[:rank].sum(),
                           vocab_size=sizes.sum())


@dataclass(frozen=True)
class _VocabShard:
    """This rank's part of the vocabulary, and the sweep's hooks for it.

    start, vocab_size: 0-dim int64 tensors on the weight's device (no host synchronisation):
    the first global id of this rank's rows, and the total vocabulary ``V = sum_r V_r``.
    size: ``V_r``, this rank's number of rows (host int, from the local weight's shape).
    """

    group: object
    rank: int
    size: int
    start: Tensor
    vocab_size: Tensor

    @property
    def hooks(self) -> "_VocabShard":
        return self

    def local_targets(self, targets: Tensor) -> Tensor:
        """Global int64 targets (-1: not counted) -> shard-local ones: ``y - start`` where this
        rank holds ``y``, :data:`OFF_SHARD` where another rank does, -1 where not counted."""
        here = (targets >= self.start) & (targets < self.start + self.size)
        return torch.where(targets < 0, -1, torch.where(here, targets - self.start, OFF_SHARD))

    # -- the sweep's hooks ------------------------------------------------------------------------

    def merge_forward(self, logp_r: Tensor, entropy_r: Tensor, lse_r: Tensor, targets: Tensor,
                      vocab_rows: int) -> tuple[Tensor, Tensor, Tensor]:
        """This shard's statistics -> those of the whole vocabulary (one all-gather of [3, N])."""
        owned = (targets >= 0) & (targets < vocab_rows)
        target_logit_r = torch.where(owned, logp_r + lse_r, 0.0)
        gathered = comm.all_gather(torch.stack([lse_r, entropy_r, target_logit_r]), self.group)  # [R, 3, N]
        lse, entropy, target_logit = merge_shard_stats(*gathered.unbind(1))
        valid = targets >= 0
        return torch.where(valid, target_logit - lse, 0.0), torch.where(valid, entropy, 0.0), lse

    def reduce_d_hidden(self, d_hidden: Tensor) -> None:
        # dh = sum_r dlogits_r @ W_r: every rank contributes its vocabulary slice (fp32 sum)
        comm.all_reduce_sum(d_hidden, self.group)

    # -- value checks, made across the group --------------------------------------------------------

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
        views = comm.all_gather_object(info, self.group)
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


def vocab_parallel_comm_bytes(num_tokens: int, hidden_size: int, world_size: int, *,
                              stats_itemsize: int = 4, hidden_grad: bool = True) -> dict:
    """Bytes one rank sends per training step (forward + backward) of the vocabulary-parallel
    head, by collective, with ring algorithms (what NCCL and gloo use for large payloads).

    sizes: all-gather of 1 int64 -> sends 8 (R - 1) (a ring all-gather forwards R - 1 blocks).
    forward: all-gather of [3, N] statistics -> sends (R - 1) 3 N s (s = 4 for fp32 statistics,
    8 for fp64 inputs). backward: all-reduce of d_hidden [N, D] fp32 -> sends 2 (R - 1) / R * 4 N D
    (none when hidden needs no gradient).
    """
    R, N, D = world_size, num_tokens, hidden_size
    out = {
        "sizes_all_gather": 8 * (R - 1),
        "stats_all_gather": (R - 1) * 3 * N * stats_itemsize,
        "dhidden_all_reduce": (2 * (R - 1) * 4 * N * D) // R if hidden_grad else 0,
    }
    out["total"] = sum(out.values())
    return out


# ---------------------------------------------------------------------------------------------
# the batch: one process, or split over data-parallel ranks
# ---------------------------------------------------------------------------------------------

def local_num_items(batch: TokenBatch, aggregation: str) -> Tensor:
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


@dataclass(frozen=True)
class DataParallel:
    """The batch split over the ranks of ``group`` (see the module doc)."""

    group: object

    def whole_batch(self, batch: TokenBatch, logprobs: Tensor, cfg, entropy: Tensor | None = None) -> TokenBatch:
        """The token batch with whole-group ``repo_stats`` and normalisers, for what the caller
        did not pass itself: one all-gather of float64 (statistics of this rank's tokens from the
        fresh ``logprobs``, with the moments of ``logp + H`` for ``repo_center="state"``, and its
        normaliser of each term that needs one: the policy term's, and the KL / entropy terms'
        when they have their own aggregation)."""
        comm.check_group("data_parallel_group", self.group)
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
        state = entropy if cfg.repo_center == "state" else None
        stats = RepoStats.of(logprobs.detach(), batch.advantages, batch.valid, state).as_tensor()
        k = stats.numel()  # 5, or 8 with the moments of logp + H
        local = torch.cat([stats, *[local_num_items(batch, mode).reshape(1) for _, mode in terms]])
        parts = comm.all_gather(local, self.group)  # [R, k + terms]
        if own_stats:
            merged = RepoStats.merge_all([RepoStats.from_tensor(p[:k]) for p in parts.unbind(0)])
            batch = replace(batch, repo_stats=merged)
        for i, (name, _) in enumerate(terms):
            total = parts[:, k + i].sum()
            # an all-empty group keeps the one-process behaviour (loss 0, divided by 1)
            batch = replace(batch, **{name: total.clamp_min(1.0).to(logprobs.dtype)})
        return batch

    def reduce_metrics(self, metrics: dict) -> dict:
        """Metrics of the whole group's batch, identical on every rank: one all-gather of the
        tensor metrics, combined in rank order as :data:`fused_pg.epilogue.METRICS` says."""
        keys = [k for k, v in metrics.items() if isinstance(v, Tensor) and METRICS[k].reduction != "same"]
        local = torch.stack([metrics[k].detach().to(torch.float64).reshape(()) for k in keys])
        parts = comm.all_gather(local, self.group)  # [R, K]
        col = {k: parts[:, i] for i, k in enumerate(keys)}
        counts = col["n_tokens"]
        total = counts.sum()
        out = dict(metrics)
        for k in keys:
            how, x = METRICS[k].reduction, col[k]
            if how == "mean" and METRICS[k].weight is not None:
                # a mean over other tokens (e.g. the clipped ones): a rank without any (its value is
                # NaN, not measured) adds nothing; a group without any is NaN, as one process is
                w = col[METRICS[k].weight]
                value = torch.where(w > 0, x * w, 0.0).sum() / w.sum()
            elif how == "mean":
                value = (x * counts).sum() / total.clamp_min(1.0)
            elif how == "sum":
                value = x.sum()
            elif how == "max":
                value = x.max()
            else:  # "empty"
                value = (total == 0).to(torch.float64)
            out[k] = value.to(metrics[k].dtype)
        return out


class Local:
    """One process: the whole vocabulary and the whole batch (every hook is the identity)."""

    def bind(self, weight: Tensor) -> _WholeVocabulary:
        return _WholeVocabulary(weight)

    def whole_batch(self, batch: TokenBatch, logprobs: Tensor, cfg, entropy: Tensor | None = None) -> TokenBatch:
        return batch

    def reduce_metrics(self, metrics: dict) -> dict:
        return metrics

    def __repr__(self) -> str:
        return "LOCAL"


LOCAL = Local()


@dataclass(frozen=True)
class Parallel:
    """How one call is split: ``vocab`` (:class:`VocabParallel` or :data:`LOCAL`) and ``data``
    (:class:`DataParallel` or :data:`LOCAL`), combinable."""

    vocab: VocabParallel | Local = LOCAL
    data: DataParallel | Local = LOCAL

    @staticmethod
    def of(value, *, process_group=None, data_parallel_group=None) -> "Parallel":
        """Normalise a ``parallel=`` argument (None, a strategy, or a ``Parallel``); the keyword
        groups are the older spelling (``process_group`` = vocabulary, ``data_parallel_group`` =
        data) and may not be combined with a strategy of the same kind."""
        if value is None:
            par = NO_PARALLEL
        elif isinstance(value, Parallel):
            par = value
        elif isinstance(value, VocabParallel):
            par = Parallel(vocab=value)
        elif isinstance(value, DataParallel):
            par = Parallel(data=value)
        else:
            raise TypeError("parallel must be a fused_pg.VocabParallel, DataParallel or Parallel, "
                            f"got {type(value).__name__}")
        if process_group is not None:
            if par.vocab is not LOCAL:
                raise TypeError("pass the vocabulary group once: parallel=VocabParallel(group) or process_group=")
            par = replace(par, vocab=VocabParallel(process_group))
        if data_parallel_group is not None:
            if par.data is not LOCAL:
                raise TypeError("pass the data-parallel group once: parallel=DataParallel(group) or "
                                "data_parallel_group=")
            par = replace(par, data=DataParallel(data_parallel_group))
        return par


NO_PARALLEL = Parallel()
"""One process (a module constant, so ``torch.compile`` sees it with a source)."""
