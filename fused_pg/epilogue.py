"""The O(N) policy-gradient epilogue, shared by every backend.

Input: per-token ``logprobs`` and ``entropy`` (differentiable outputs of a vocabulary sweep)
and a :class:`~fused_pg.batch.TokenBatch`. Output: the aggregated scalar loss and metrics.

It is plain PyTorch on ``[N]`` vectors, so autograd produces the two per-token gradient
scalars the backward sweep needs, ``g_t = dL/dlogp_t`` and ``e_t = dL/dH_t``: one forward
sweep, this epilogue, one backward sweep. No ``.item()``, no data-dependent Python branch:
the loss works under CUDA graphs and ``torch.compile``, and metrics stay tensors.

Per valid token t (masked tokens are excluded from every statistic)::

    L_t   = logp_t - mu | logp_t + H_t | logp_t             repo_center "batch" | "state" | "none", detached
    A'_t  = A_t - zeta * L_t                                REPO "fixed" / "decorrelate"
          | A_t - zeta |A_t| L_t, kept on the side of A_t   REPO-R ("relative")
    r_t   = exp(clamp(logp_t - old_t, -20, 20))             importance_level="token"
          | exp(clamp(sg(mean_seq(logp - old)) + logp_t - sg(logp_t), -20, 20))   "sequence"
    pg_t  = max(-A'_t * min(r_t, delta), -A'_t * clip(r_t, 1 - eps_low, 1 + eps_high))
    pg_t  = min(pg_t, -dual_clip * A'_t)   where A'_t < 0   (dual clip)
    pg_t *= min(exp(old_t - rollout_t), tis_cap)            truncated importance sampling
    pg_t *= w_t                                              per-token weights
    kl_t  = clamp(KL_k(logp_t, ref_t), -kl_clamp, kl_clamp)  [* r_t with kl_ratio_weight]
    loss  = agg(pg) + kl_coef * agg_kl(kl) - entropy_coef * agg_ent(H)

Each term has its own aggregation and normaliser (the KL and entropy terms default to the
policy term's), so that a trainer's separate normalisers are reproduced exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .batch import TokenBatch
from .config import LossConfig
from .stats import RepoStats

LOG_RATIO_CLAMP = 20.0  # as verl: exp of a clamped log-ratio never overflows
REPO_VAR_EPS = 1e-8  # a batch whose log-probs have no spread needs no decorrelation


def repo_advantages(advantages: Tensor, logprobs: Tensor, entropy: Tensor | None, batch: TokenBatch,
                    cfg: LossConfig):
    """REPO advantage correction with ``L`` the centred log-prob, detached (docs/repo.md).

    ``L = logp - mu`` (``repo_center="batch"``, ``mu`` the batch mean of logp), ``logp + H``
    (``"state"``: ``E_a[log pi(a|s)] = -H(s)``, so L is centred per state) or ``logp`` (``"none"``).

    * ``none``:        ``A' = A``.
    * ``fixed``:       ``A' = A - zeta L``, ``zeta = repo_coef``.
    * ``decorrelate``: ``A' = A - zeta L``, ``zeta = repo_coef * Cov(A, L) / Var(L)`` over the tokens
      that count, so that ``repo_coef = 1`` removes the batch covariance exactly (0 if Var < 1e-8).
    * ``relative``:    REPO-R, ``A' = A - zeta |A| L`` kept on the side of A: ``max(A (1 - zeta L), 0)``
      where A > 0, ``min(A (1 + zeta L), 0)`` where A < 0, 0 where A = 0; ``zeta = repo_coef``.

    The statistics (``mu``, ``Cov``, ``Var``) are those of ``batch.repo_stats`` when given (the whole
    batch across micro-batches / ranks), else of this batch; "fixed" and "relative" with the
    "state" or "none" centre use none. ``entropy`` ([N]) is needed for the "state" centre (None:
    not measured). Returns ``(A', zeta, cov_before, cov_after)``: ``Cov(A, L)`` and ``Cov(A', L)``
    over the batch the statistics describe (``cov_after = cov_before - zeta Var(L)``); NaN where
    they cannot be had: without the moments of ``logp + H`` for the "state" centre, and
    ``cov_after`` for "relative", whose sign clamp is no function of the batch moments.
    """
    lp = logprobs.detach()
    state = cfg.repo_center == "state"
    stats = batch.repo_stats
    if stats is None:
        stats = RepoStats.of(lp, advantages, batch.valid, entropy if state else None)
    # a constant centre leaves Cov(A, .) and Var(.) unchanged: logp's moments serve "batch" and "none"
    if not state:
        cov, var = stats.cov_adv_logprob, stats.var_logprob
    elif stats.has_state:
        cov, var = stats.cov_adv_state, stats.var_state
    else:
        cov = var = torch.full_like(stats.count, float("nan"))
    dtype = logprobs.dtype
    if cfg.repo == "none":
        return advantages, torch.zeros((), dtype=dtype, device=lp.device), cov.to(dtype), cov.to(dtype)
    if cfg.repo_center == "batch":
        centred = lp - stats.mean_logprob.to(dtype)
    elif state:
        centred = lp + entropy.detach()
    else:
        centred = lp
    if cfg.repo == "decorrelate":
        has_spread = var > REPO_VAR_EPS
        zeta = torch.where(has_spread, cfg.repo_coef * cov / torch.where(has_spread, var, 1.0), 0.0)
    else:
        zeta = torch.full_like(cov, cfg.repo_coef)
    z = zeta.to(dtype)
    if cfg.repo == "relative":
        shifted = advantages - z * advantages.abs() * centred
        corrected = torch.where(advantages > 0, shifted.clamp_min(0.0),
                                torch.where(advantages < 0, shifted.clamp_max(0.0), 0.0))
        cov_after = torch.full_like(cov, float("nan"))
    else:
        corrected = advantages - z * centred
        cov_after = cov - zeta * var
    return corrected, z, cov.to(dtype), cov_after.to(dtype)


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str, clamp: float | None = None) -> Tensor:
    """Per-token KL(pi || pi_ref) estimate from ``x = clamp(logp - ref, -20, 20)``.

    k1 = x;  k2 = x^2 / 2;  k3 = exp(-x) - 1 + x (Schulman's low-variance estimator);
    abs = |x|;  "<name>+" = the value of <name> with the gradient of k2 (verl's straight-through
    variants k1+, k3+, abs+). ``clamp`` bounds the value to [-clamp, clamp] (verl clamps k3 to
    +-10, OpenRLHF every estimator): a clamped plain estimate has zero gradient there, a "+"
    estimate keeps the k2 gradient.
    """
    x = torch.clamp(logprobs - ref_logprobs, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    base = estimator.rstrip("+")
    if base == "k1":
        value = x
    elif base == "abs":
        value = x.abs()
    elif base == "k2":
        value = 0.5 * x * x
    else:
        value = torch.exp(-x) - 1.0 + x
    if clamp is not None:
        value = torch.clamp(value, -clamp, clamp)
    if not estimator.endswith("+"):
        return value
    k2 = 0.5 * x * x
    return k2 - k2.detach() + value.detach()


@dataclass(frozen=True)
class Metric:
    """One key of ``metrics``: how data-parallel ranks combine it, and what it means.

    reduction: "mean" (weighted by each rank's ``n_tokens``, or by the metric named in
               ``weight``: a mean over another set of tokens, e.g. the clipped ones), "sum",
               "max", "same" (already the whole group's: computed from the group's REPO
               statistics, or a hyper-parameter), or "empty" (1 iff the group counted no token).
    weight:    for a "mean" over other tokens than the counted ones: the "sum" metric that counts
               them. A rank that has none of them contributes nothing; a group that has none
               reports NaN (not measured), as one process does.
    """

    reduction: str
    doc: str
    weight: str | None = None


METRICS: dict[str, Metric] = {
    "pg_loss": Metric("sum", "the policy-gradient term of the loss, aggregated (this rank's share under data parallelism)"),
    "entropy_mean": Metric("mean", "mean token entropy H of the current policy over counted tokens (nats; NaN when "
                                   "not measured: see `entropy_measured`)"),
    "logprob_mean": Metric("mean", "mean log-probability of the sampled tokens under the current policy"),
    "ratio_mean": Metric("mean", "mean importance ratio r (token or sequence level, before `delta` and clipping)"),
    "ratio_max": Metric("max", "largest importance ratio r"),
    "clip_frac_low": Metric("mean", "share of counted tokens with A' < 0 and r < 1 - eps_low (the low clip stops their gradient)"),
    "clip_frac_high": Metric("mean", "share of counted tokens with A' > 0 and r > 1 + eps_high (the high clip stops their gradient)"),
    "clip_frac_dual": Metric("mean", "share of counted tokens with A' < 0 whose loss the dual-clip bound `-dual_clip A'` caps"),
    "approx_kl": Metric("mean", "mean of `old - logp` over counted tokens: the k1 estimate of KL(pi_old || pi) on tokens sampled from pi_old"),
    "kl_mean": Metric("mean", "mean per-token KL estimate to the reference policy, after `kl_clamp` (0 without ref_logprobs)"),
    "tis_weight_mean": Metric("mean", "mean truncated importance weight (0 without tis_cap)"),
    "kl_loss": Metric("sum", "the KL term, aggregated, before `kl_coef` (0 without ref_logprobs)"),
    "entropy_loss": Metric("sum", "the entropy term, aggregated, before `entropy_coef` (NaN without entropies)"),
    "repo_zeta": Metric("same", "the zeta of the REPO correction"),
    "adv_logp_cov_before": Metric(
        "same", "Cov(A, L) over the batch the REPO statistics describe, L = logp (`repo_center` \"batch\" or "
        "\"none\") or logp + H (\"state\"); NaN for \"state\" with `repo_stats` computed without entropies"),
    "adv_logp_cov_after": Metric(
        "same", "Cov(A', L) after the correction, over the same batch; NaN for \"relative\" (its sign clamp is "
        "no function of the batch moments: see `entropy_drive`)"),
    "entropy_drive": Metric(
        "mean", "-mean over counted tokens of A' (logp + H), A' the advantages the loss used: the first-order "
        "entropy change a policy-gradient step drives (> 0: entropy rises); `entropy_drive_pos + "
        "entropy_drive_neg`"),
    "entropy_drive_pos": Metric("mean", "the part of `entropy_drive` from tokens with A' > 0 (their sum over "
                                        "those tokens, divided by the number of counted tokens)"),
    "entropy_drive_neg": Metric("mean", "the part of `entropy_drive` from tokens with A' < 0 (likewise)"),
    "n_clip_low": Metric("sum", "number of counted tokens the low clip acts on (those of `clip_frac_low`)"),
    "n_clip_high": Metric("sum", "number of counted tokens the high clip acts on (those of `clip_frac_high`)"),
    "clip_low_p_mean": Metric("mean", "mean behaviour probability exp(old) of the tokens clipped low "
                                      "(NaN when none is)", weight="n_clip_low"),
    "clip_high_p_mean": Metric("mean", "mean behaviour probability exp(old) of the tokens clipped high "
                                       "(NaN when none is)", weight="n_clip_high"),
    "clip_low_below_avg": Metric("mean", "share of the tokens clipped low whose logp + H < 0 (less likely "
                                         "than the policy's average at that state; NaN when none is clipped)",
                                 weight="n_clip_low"),
    "clip_high_below_avg": Metric("mean", "share of the tokens clipped high whose logp + H < 0: clip-higher "
                                          "can raise entropy only through these (NaN when none is clipped)",
                                  weight="n_clip_high"),
    "rollout_mismatch_abs_mean": Metric("mean", "mean |old - rollout| over counted tokens: trainer against "
                                                "inference-engine log-probs (NaN without rollout_logprobs)"),
    "rollout_phantom_clip_frac": Metric(
        "mean", "share of counted tokens whose ratio exp(old - rollout) alone lies outside "
        "[1 - eps_low, 1 + eps_high]: clipping the sampler-trainer mismatch would cause by itself "
        "(NaN without rollout_logprobs)"),
    "entropy_measured": Metric("same", "1.0 when per-token entropies were available (always with `repo_loss`; "
                                       "with `policy_loss_from_logprobs` only given `entropy=`), else 0.0 and every "
                                       "metric that needs H is NaN (a float)"),
    "rollout_measured": Metric("same", "1.0 when rollout_logprobs were given, else 0.0 and the rollout_* metrics "
                                       "are NaN (a float)"),
    "n_tokens": Metric("sum", "number of counted tokens"),
    "n_seqs": Metric("sum", "number of sequences with at least one counted token (0 for packed inputs without cu_seqlens)"),
    "empty_batch": Metric("empty", "1 when no token counted (the loss is then 0 with zero gradients), else 0"),
    "eps_low": Metric("same", "the lower clip offset used (a float)"),
    "eps_high": Metric("same", "the upper clip offset used (a float)"),
}
"""The one table of ``metrics`` keys: every key is always present, so loggers see the same columns
every step; the data-parallel reduction and the README's list are read from here.

Convention: a metric whose option is off is 0 (``kl_mean`` without ``ref_logprobs``); means over
the counted tokens are 0 in an empty batch (``empty_batch`` says so); a value that could not be
*measured* is NaN, never a number, and a flag says why: ``entropy_measured`` (no entropies),
``rollout_measured`` (no rollout log-probs), ``n_clip_low`` / ``n_clip_high`` (no clipped token).
The controllers refuse an unmeasured entropy."""

METRIC_KEYS = tuple(METRICS)


def metrics_markdown() -> str:
    """The README's list of metrics, generated from :data:`METRICS`."""
    return "\n".join(f"* `{k}`: {m.doc}." for k, m in METRICS.items())


def policy_loss(logprobs: Tensor, entropy: Tensor | None, batch: TokenBatch, cfg: LossConfig):
    """Loss and metrics from per-token ``logprobs`` / ``entropy`` ([N], 0 where not valid;
    ``entropy=None``: not measured, which ``entropy_coef != 0`` and ``repo_center="state"`` refuse
    before this point).

    Returns ``(loss, metrics, per_token)``: a scalar with grad to ``logprobs`` and ``entropy``;
    a dict with every key of :data:`METRIC_KEYS`: detached 0-dim tensors, and the floats
    ``eps_low``, ``eps_high`` (hyper-parameters used), ``entropy_measured``, ``rollout_measured``;
    and the detached [N] tensors ``advantages`` (REPO-corrected) and ``ratio`` (the importance
    ratio before delta and clipping), 0 where not valid.
    """
    valid = batch.valid
    layout = batch.layout
    m = valid.to(logprobs.dtype)
    n_tokens = m.sum()
    inv_n = 1.0 / n_tokens.clamp_min(1.0)
    mean = lambda x: (torch.where(valid, x, 0.0)).sum() * inv_n  # noqa: E731
    zero = torch.zeros_like(n_tokens)
    nan = torch.full_like(n_tokens, float("nan"))  # not measured
    lp = logprobs.detach()
    H = entropy.detach() if entropy is not None else None
    # on-policy (no behaviour log-probs): old = logp, so the ratio is 1 with the gradient of logp
    old = batch.old_logprobs if batch.old_logprobs is not None else lp

    # 1. REPO-corrected advantages ----------------------------------------------------------
    adv, zeta, cov_before, cov_after = repo_advantages(batch.advantages, logprobs, H, batch, cfg)

    # 2. importance ratio -----------------------------------------------------------------------
    if cfg.importance_level == "token":
        log_ratio = logprobs - old
    else:
        # GSPO: the value is the sequence's geometric-mean ratio; each token keeps the
        # gradient ratio * dlogp_t (verl's GSPO-token form; equals GSPO for per-sequence A).
        seq_log_ratio = layout.seq_sum((lp - old) * m) / layout.seq_sum(m).clamp_min(1.0)
        log_ratio = layout.broadcast(seq_log_ratio) + logprobs - lp
    ratio = torch.exp(torch.clamp(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))

    # 3. asymmetric clipped surrogate -----------------------------------------------------------
    ratio_unclipped = torch.clamp(ratio, max=cfg.delta) if cfg.delta is not None else ratio
    pg = torch.maximum(-adv * ratio_unclipped,
                       -adv * torch.clamp(ratio, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high))
    clip_frac_dual = zero
    if cfg.dual_clip is not None:
        pg_dual = -adv * cfg.dual_clip
        clip_frac_dual = mean(((adv < 0) & (pg_dual < pg)).to(m.dtype))
        pg = torch.where(adv < 0, torch.minimum(pg, pg_dual), pg)
    r = ratio.detach()

    # 4. truncated importance sampling (trainer vs rollout-engine log-probs), per-token weights --
    tis_weight_mean = zero
    if cfg.tis_cap is not None:
        log_w = old - batch.rollout_logprobs
        if cfg.tis_level == "sequence":
            log_w = layout.broadcast(layout.seq_sum(log_w * m))
        tis_weight = torch.clamp(torch.exp(log_w), max=cfg.tis_cap)
        pg = pg * tis_weight
        tis_weight_mean = mean(tis_weight)
    if batch.weights is not None:
        pg = pg * batch.weights

    # 5. the three terms, each aggregated with its own normaliser ------------------------------
    # (a term aggregated like the policy term shares its normaliser unless given its own)
    def items(own, term_aggregation):
        return own if own is not None else (batch.num_items_in_batch if term_aggregation is None else None)

    pg_term = aggregate(pg, batch, cfg.aggregation, batch.num_items_in_batch)
    loss = pg_term
    kl_mean = kl_loss = zero
    if batch.ref_logprobs is not None:
        kl = kl_penalty(logprobs, batch.ref_logprobs, cfg.kl_estimator, cfg.kl_clamp)
        if cfg.kl_ratio_weight:
            kl = kl * ratio
        kl_term = aggregate(kl, batch, cfg.kl_mode, items(batch.kl_num_items_in_batch, cfg.kl_aggregation))
        if cfg.kl_coef > 0:
            loss = loss + cfg.kl_coef * kl_term
        kl_mean = mean(kl.detach())
        kl_loss = kl_term.detach()
    entropy_loss = nan
    if entropy is not None:
        entropy_term = aggregate(entropy, batch, cfg.entropy_mode,
                                 items(batch.entropy_num_items_in_batch, cfg.entropy_aggregation))
        if cfg.entropy_coef != 0:
            loss = loss - cfg.entropy_coef * entropy_term
        entropy_loss = entropy_term.detach()

    # 6. the entropy monitor, from what the sweep gave (O(N), no extra pass) -------------------
    # the first-order entropy change of a policy-gradient step is driven by -E[A' L] with
    # L = logp + H, the log-prob centred per state (E_a[log pi] = -H); docs/repo.md
    sum_tok = lambda x: torch.where(valid, x, 0.0).sum()  # noqa: E731
    drive_pos = drive_neg = entropy_mean = nan
    below_avg = None
    if H is not None:
        centred = lp + H
        drive = -adv * centred
        drive_pos = sum_tok(torch.where(adv > 0, drive, 0.0)) * inv_n
        drive_neg = sum_tok(torch.where(adv < 0, drive, 0.0)) * inv_n
        entropy_mean = mean(H)
        below_avg = centred < 0
    clipped_low = valid & (r < 1.0 - cfg.eps_low) & (adv < 0)
    clipped_high = valid & (r > 1.0 + cfg.eps_high) & (adv > 0)
    p_old = torch.exp(old)

    def over_clipped(clipped: Tensor, x: Tensor | None) -> tuple[Tensor, Tensor]:
        """(count, mean of x over the clipped tokens: NaN when there are none or x is None)."""
        count = clipped.to(m.dtype).sum()
        if x is None:
            return count, nan
        return count, torch.where(count > 0, torch.where(clipped, x, 0.0).sum() / count.clamp_min(1.0), nan)

    n_clip_low, clip_low_p_mean = over_clipped(clipped_low, p_old)
    n_clip_high, clip_high_p_mean = over_clipped(clipped_high, p_old)
    _, clip_low_below_avg = over_clipped(clipped_low, None if below_avg is None else below_avg.to(m.dtype))
    _, clip_high_below_avg = over_clipped(clipped_high, None if below_avg is None else below_avg.to(m.dtype))
    mismatch = phantom = nan
    if batch.rollout_logprobs is not None:
        engine_gap = old - batch.rollout_logprobs
        engine_ratio = torch.exp(engine_gap)
        mismatch = mean(engine_gap.abs())
        phantom = mean(((engine_ratio < 1.0 - cfg.eps_low) | (engine_ratio > 1.0 + cfg.eps_high)).to(m.dtype))

    metrics: dict[str, Tensor | float] = dict(
        pg_loss=pg_term.detach(),
        entropy_mean=entropy_mean,
        logprob_mean=mean(lp),
        ratio_mean=mean(r),
        ratio_max=torch.where(valid, r, 0.0).max() if r.numel() else zero,
        clip_frac_low=n_clip_low * inv_n,
        clip_frac_high=n_clip_high * inv_n,
        clip_frac_dual=clip_frac_dual,
        approx_kl=mean(old - lp),
        kl_mean=kl_mean,
        tis_weight_mean=tis_weight_mean,
        kl_loss=kl_loss,
        entropy_loss=entropy_loss,
        repo_zeta=zeta,
        adv_logp_cov_before=cov_before,
        adv_logp_cov_after=cov_after,
        entropy_drive=drive_pos + drive_neg,
        entropy_drive_pos=drive_pos,
        entropy_drive_neg=drive_neg,
        n_clip_low=n_clip_low,
        n_clip_high=n_clip_high,
        clip_low_p_mean=clip_low_p_mean,
        clip_high_p_mean=clip_high_p_mean,
        clip_low_below_avg=clip_low_below_avg,
        clip_high_below_avg=clip_high_below_avg,
        rollout_mismatch_abs_mean=mismatch,
        rollout_phantom_clip_frac=phantom,
        entropy_measured=1.0 if H is not None else 0.0,
        rollout_measured=1.0 if batch.rollout_logprobs is not None else 0.0,
        n_tokens=n_tokens,
        n_seqs=(layout.seq_sum(m) > 0).to(m.dtype).sum() if layout is not None else zero,
        empty_batch=(n_tokens == 0).to(m.dtype),
        eps_low=cfg.eps_low,
        eps_high=cfg.eps_high,
    )
    per_token = dict(advantages=torch.where(valid, adv.detach(), 0.0), ratio=torch.where(valid, r, 0.0))
    return loss, metrics, per_token


def aggregate(loss_tok: Tensor, batch: TokenBatch, mode: str, num_items) -> Tensor:
    """Reduce per-token values to a scalar (verl's ``agg_loss`` modes).

    token-mean:              sum_t l_t / n_valid_tokens
    token-sum:               sum_t l_t
    seq-mean-token-mean:     mean over non-empty sequences of (sum_t l_t / n_valid_in_seq)
    seq-mean-token-sum:      mean over non-empty sequences of sum_t l_t
    seq-mean-token-sum-norm: sum_t l_t / (num_sequences * max_length)   (Dr.GRPO, constant)

    ``num_items`` (a number or 0-dim tensor) replaces the local count in the denominator (valid
    tokens for token-mean, sequences for the sequence modes, 1 for token-sum) so that gradient
    accumulation and data parallelism give the loss of the whole global batch. An all-masked
    batch gives exactly 0.
    """
    valid = batch.valid
    x = torch.where(valid, loss_tok, 0.0)
    if mode == "token-mean":
        denom = num_items if num_items is not None else valid.sum().clamp_min(1)
        return x.sum() / denom
    if mode == "token-sum":
        return x.sum() / num_items if num_items is not None else x.sum()
    layout = batch.layout
    if mode == "seq-mean-token-sum-norm":
        num_seqs = num_items if num_items is not None else max(layout.num_seqs, 1)
        return x.sum() / (num_seqs * batch.max_length)
    seq_loss = layout.seq_sum(x)
    seq_count = layout.seq_sum(valid.to(x.dtype))
    if mode == "seq-mean-token-mean":
        seq_loss = seq_loss / seq_count.clamp_min(1.0)
    denom = num_items if num_items is not None else (seq_count > 0).sum().clamp_min(1)
    return seq_loss.sum() / denom
