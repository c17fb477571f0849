"""Literal oracle of the REPO / ADAPO policy-gradient loss.

``policy_loss_ref`` takes per-token log-probs and entropies (the oracle of
``fused_pg.policy_loss_from_logprobs``); ``repo_loss_ref`` is the materialised head
(:func:`logprobs_entropy_ref`) followed by it (the oracle of ``fused_pg.repo_loss``).
Written for clarity, not speed: per-token Python-level formulas and explicit loops over
sequences. Masked tokens are excluded from every statistic and contribute nothing.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .head import logprobs_entropy_ref

LOG_RATIO_CLAMP = 20.0  # log-ratios are clamped to +-20 before exp (as verl does)
REPO_VAR_EPS = 1e-8  # below this variance of log-probs, "decorrelate" applies no correction


@dataclass
class ReferenceOutput:
    loss: Tensor
    logprobs: Tensor
    entropy: Tensor
    metrics: dict[str, Tensor | float] = field(default_factory=dict)
    advantages: Tensor | None = None  # REPO-corrected, 0 where masked
    ratio: Tensor | None = None       # importance ratio before delta and clipping, 0 where masked


def _sequences(lead: tuple[int, ...], cu_seqlens: Tensor | None) -> list[list[int]] | None:
    """Flat token indices of each sequence, or None when the layout carries no sequences."""
    if len(lead) == 2:
        B, T = lead
        return [list(range(b * T, (b + 1) * T)) for b in range(B)]
    if cu_seqlens is None:
        return None
    cu = [int(c) for c in cu_seqlens]
    return [list(range(cu[i], cu[i + 1])) for i in range(len(cu) - 1)]


OPTION_DEFAULTS = dict(
    eps_low=0.2, eps_high=0.28, dual_clip=None, delta=None, repo="decorrelate", repo_coef=1.0, repo_center="batch",
    kl_coef=0.0, kl_estimator="k3", kl_clamp=None, kl_ratio_weight=False, kl_aggregation=None, entropy_coef=0.0,
    entropy_aggregation=None, aggregation="token-mean", max_length=None, importance_level="token", tis_cap=None,
    tis_level="token",
)
"""The loss options the oracle understands and what each means when not given."""


def resolve_options(options: dict) -> dict:
    """Every option's value: given, else the preset's (``preset=``), else the default."""
    unknown = set(options) - set(OPTION_DEFAULTS) - {"preset"}
    if unknown:
        raise TypeError(f"unknown loss options {sorted(unknown)}")
    preset = options.get("preset")
    table = _preset_values(preset, options.get("kl_estimator"))
    return {**OPTION_DEFAULTS, **table, **{k: v for k, v in options.items() if k != "preset"}}


def _preset_values(preset: str | None, kl_estimator: str | None) -> dict:
    """The trainers' defaults, written out per trainer (see each trainer's own configuration).

    kl_estimator: the caller's estimator (None: not given), needed for verl's k3-only clamp.
    """
    if preset is None:
        return {}
    trl = dict(eps_low=0.2, eps_high=0.2, dual_clip=None, delta=None, importance_level="token",
               kl_estimator="k3", kl_clamp=None)
    if preset in ("verl", "verl-gspo"):
        est = "k3" if kl_estimator is None else kl_estimator  # verl's default: low_var_kl
        out = dict(eps_low=0.2, eps_high=0.2, dual_clip=3.0, delta=None, aggregation="token-mean",
                   importance_level="token", kl_estimator="k3",
                   kl_clamp=10.0 if est in ("k3", "k3+") else None)
        if preset == "verl-gspo":
            out.update(dual_clip=None, importance_level="sequence")
        return out
    if preset == "trl-grpo":
        return dict(trl, aggregation="seq-mean-token-mean")
    if preset == "trl-gspo":
        return dict(trl, aggregation="seq-mean-token-mean", importance_level="sequence")
    if preset in ("trl-dapo", "trl-bnpo"):
        return dict(trl, aggregation="token-mean")
    if preset == "trl-dr-grpo":
        return dict(trl, aggregation="seq-mean-token-sum-norm", max_length=512)
    if preset == "trl-luspo":
        return dict(trl, aggregation="seq-mean-token-sum", importance_level="sequence")
    if preset == "openrlhf":
        return dict(eps_low=0.2, eps_high=0.2, dual_clip=None, delta=None, aggregation="token-mean",
                    importance_level="token", kl_estimator="k1", kl_clamp=10.0)
    raise ValueError(f"unknown preset {preset!r}")


def _masked_mean(x: Tensor, valid: Tensor) -> Tensor:
    n = int(valid.sum())
    return x[valid].sum() / n if n > 0 else x.new_zeros(())


def repo_loss_ref(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    advantages: Tensor,
    old_logprobs: Tensor | None,
    mask: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    dtype: torch.dtype | None = None,
    **loss_options,
) -> ReferenceOutput:
    """Materialised reference of :func:`fused_pg.repo_loss` (same arguments and meaning):
    :func:`logprobs_entropy_ref` on the tokens that count, then :func:`policy_loss_ref`.

    All arithmetic happens in ``dtype`` (default: the promoted dtype of hidden and weight).
    """
    lead = tuple(targets.shape)
    D = hidden.shape[-1]
    y = targets.reshape(-1)
    valid = y != ignore_index
    if mask is not None:
        valid = valid & mask.reshape(-1).bool()
    cdt = dtype or torch.promote_types(hidden.dtype, weight.dtype)
    logp, ent = logprobs_entropy_ref(
        hidden.reshape(-1, D), weight, torch.where(valid, y, ignore_index), bias,
        temperature=temperature, softcap=softcap, ignore_index=ignore_index, dtype=cdt)
    return policy_loss_ref(logp.reshape(lead), advantages, old_logprobs, valid.reshape(lead),
                           entropy=ent.reshape(lead), dtype=cdt, **loss_options)


def policy_loss_ref(
    logprobs: Tensor,
    advantages: Tensor,
    old_logprobs: Tensor | None = None,
    mask: Tensor | None = None,
    *,
    entropy: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    rollout_logprobs: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    weights: Tensor | None = None,
    repo_stats=None,
    num_items_in_batch: float | None = None,
    kl_num_items_in_batch: float | None = None,
    entropy_num_items_in_batch: float | None = None,
    dtype: torch.dtype | None = None,
    **options,
) -> ReferenceOutput:
    """Literal reference of :func:`fused_pg.policy_loss_from_logprobs` (same arguments; the loss
    options, :data:`OPTION_DEFAULTS` and ``preset``, as keywords).

    ``logprobs`` ([B, T] or packed [N]) and ``entropy`` are used as given (differentiable);
    ``old_logprobs=None`` is on-policy. ``repo_stats``, if given, is any object with
    ``mean_logprob``, ``var_logprob`` and ``cov_adv_logprob`` (whole-batch REPO statistics), and
    ``var_state`` / ``cov_adv_state`` (those of ``logp + H``, or None) for ``repo_center="state"``.
    Without ``entropy`` every metric that needs it is NaN (not measured), and so are the means
    over clipped tokens when none is clipped and the rollout metrics without ``rollout_logprobs``.
    All arithmetic happens in ``dtype`` (default: float64 for float64 log-probs, else float32).
    The loss is ``agg(pg) + kl_coef * agg_kl(kl) - entropy_coef * agg_ent(H)``, each term with
    its own aggregation and normaliser (KL and entropy default to the policy term's).
    """
    o = resolve_options(options)
    eps_low, eps_high, dual_clip, delta = o["eps_low"], o["eps_high"], o["dual_clip"], o["delta"]
    repo, repo_coef, repo_center = o["repo"], o["repo_coef"], o["repo_center"]
    kl_coef, kl_estimator, kl_clamp = o["kl_coef"], o["kl_estimator"], o["kl_clamp"]
    kl_ratio_weight, kl_aggregation = o["kl_ratio_weight"], o["kl_aggregation"]
    entropy_coef, entropy_aggregation = o["entropy_coef"], o["entropy_aggregation"]
    aggregation, max_length, importance_level = o["aggregation"], o["max_length"], o["importance_level"]
    tis_cap, tis_level = o["tis_cap"], o["tis_level"]

    lead = tuple(logprobs.shape)
    seqs = _sequences(lead, cu_seqlens)
    cdt = dtype or (torch.float64 if logprobs.dtype == torch.float64 else torch.float32)
    dev = logprobs.device
    N = logprobs.numel()
    zero = torch.zeros((), dtype=cdt, device=dev)

    valid = torch.ones(N, dtype=torch.bool, device=dev)
    if mask is not None:
        valid = valid & mask.reshape(-1).bool()
    logp = torch.where(valid, logprobs.reshape(-1).to(cdt), 0.0)
    ent = torch.where(valid, entropy.reshape(-1).to(cdt), 0.0) if entropy is not None \
        else torch.zeros(N, dtype=cdt, device=dev)
    lpd = logp.detach()
    old = lpd if old_logprobs is None else old_logprobs.detach().reshape(-1).to(cdt)

    # --- advantages: per token, or one per sequence broadcast over its tokens ---------
    if tuple(advantages.shape) == lead:
        A = advantages.reshape(-1).to(cdt)
    else:
        A = torch.zeros(N, dtype=cdt, device=dev)
        for i, idx in enumerate(seqs):
            for t in idx:
                A[t] = advantages[i].to(cdt)

    n_tok = int(valid.sum())
    metrics: dict[str, Tensor | float] = {}

    # --- REPO: A' = A - zeta L, or REPO-R, with L (Lc) the centred log-prob (detached) ---------
    nan = torch.tensor(float("nan"), dtype=cdt, device=dev)
    center = {True: "batch", False: "none"}.get(repo_center, repo_center)
    H = ent.detach() if entropy is not None else None
    if center == "state" and H is None and repo != "none":
        raise ValueError("repo_center='state' needs entropy")
    mean_lp = _masked_mean(lpd, valid)
    if center == "batch":
        mu = mean_lp if repo_stats is None else torch.as_tensor(repo_stats.mean_logprob, dtype=cdt, device=dev)
        Lc = [lpd[t] - mu for t in range(N)]
    elif center == "state":  # E_a[log pi(a|s)] = -H(s): centred per state
        Lc = [lpd[t] + H[t] if H is not None else nan for t in range(N)]
    else:
        Lc = [lpd[t] for t in range(N)]
    Lc = torch.stack(Lc) if N else lpd.clone()

    def cov_with(x: Tensor, y: Tensor) -> Tensor:
        """Population covariance over the valid tokens, the obvious two-pass way."""
        if n_tok == 0:
            return zero
        mx, my = x[valid].mean(), y[valid].mean()
        return sum(((x[t] - mx) * (y[t] - my) for t in range(N) if valid[t]), zero) / n_tok

    if repo_stats is None:
        cov, var = cov_with(A, Lc), cov_with(Lc, Lc)
    elif center == "state":
        s_cov, s_var = getattr(repo_stats, "cov_adv_state", None), getattr(repo_stats, "var_state", None)
        cov = nan if s_cov is None else torch.as_tensor(s_cov, dtype=cdt, device=dev)
        var = nan if s_var is None else torch.as_tensor(s_var, dtype=cdt, device=dev)
    else:  # statistics of the whole batch, computed elsewhere (a constant centre changes neither)
        cov = torch.as_tensor(repo_stats.cov_adv_logprob, dtype=cdt, device=dev)
        var = torch.as_tensor(repo_stats.var_logprob, dtype=cdt, device=dev)
    if repo == "none":
        zeta = zero
    elif repo in ("fixed", "relative"):
        zeta = torch.tensor(repo_coef, dtype=cdt, device=dev)
    elif repo == "decorrelate":
        # gamma * Cov(A, L) / Var(L): with gamma = 1 the corrected advantage has exactly zero
        # covariance with L over the batch.
        zeta = repo_coef * cov / var if var > REPO_VAR_EPS else zero
    else:
        raise ValueError(repo)
    if repo == "none":
        A_corr = A
    elif repo == "relative":  # REPO-R: beta = zeta |A|, and A' keeps the sign of A
        A_corr = torch.zeros(N, dtype=cdt, device=dev)
        for t in range(N):
            if A[t] > 0:
                A_corr[t] = torch.clamp(A[t] * (1 - zeta * Lc[t]), min=0.0)
            elif A[t] < 0:
                A_corr[t] = torch.clamp(A[t] * (1 + zeta * Lc[t]), max=0.0)
    else:
        A_corr = A - zeta * Lc
    if repo == "relative":
        cov_after = nan  # the sign clamp makes it no function of the batch moments
    elif repo_stats is None:
        cov_after = cov_with(A_corr, Lc)
    else:  # Cov(A - zeta L, L) = Cov(A, L) - zeta Var(L), over the whole batch
        cov_after = cov - zeta * var
    metrics.update(repo_zeta=zeta, adv_logp_cov_before=cov, adv_logp_cov_after=cov_after)

    # --- importance ratio --------------------------------------------------------------
    if importance_level == "token":
        ratio = torch.exp(torch.clamp(logp - old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    else:  # "sequence" (GSPO-token): value exp(mean_seq(logp - old)), gradient ratio * dlogp_t
        ratio_list: list[Tensor] = [None] * N  # type: ignore[list-item]
        for idx in seqs:
            v = [t for t in idx if valid[t]]
            seq_lr = sum((lpd[t] - old[t] for t in v), zero) / max(len(v), 1)
            for t in idx:
                ratio_list[t] = torch.exp(torch.clamp(
                    seq_lr + logp[t] - lpd[t], -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        ratio = torch.stack(ratio_list) if ratio_list else logp * 0

    # --- clipped surrogate ---------------------------------------------------------------
    ratio_unclipped = torch.clamp(ratio, max=delta) if delta is not None else ratio
    pg1 = -A_corr * ratio_unclipped
    pg2 = -A_corr * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    pg = torch.maximum(pg1, pg2)
    metrics["clip_frac_dual"] = zero
    if dual_clip is not None:
        pg3 = -A_corr * dual_clip
        metrics["clip_frac_dual"] = _masked_mean(((A_corr < 0) & (pg3 < pg)).to(cdt), valid)
        pg = torch.where(A_corr < 0, torch.minimum(pg, pg3), pg)
    metrics["clip_frac_low"] = _masked_mean(((ratio < 1 - eps_low) & (A_corr < 0)).to(cdt), valid)
    metrics["clip_frac_high"] = _masked_mean(((ratio > 1 + eps_high) & (A_corr > 0)).to(cdt), valid)

    # --- which tokens the clip acts on, token by token ------------------------------------------
    r_det = ratio.detach()
    for side in ("low", "high"):
        if side == "low":
            hit = [t for t in range(N) if valid[t] and r_det[t] < 1 - eps_low and A_corr[t] < 0]
        else:
            hit = [t for t in range(N) if valid[t] and r_det[t] > 1 + eps_high and A_corr[t] > 0]
        metrics[f"n_clip_{side}"] = torch.tensor(float(len(hit)), dtype=cdt, device=dev)
        metrics[f"clip_{side}_p_mean"] = (sum((torch.exp(old[t]) for t in hit), zero) / len(hit)) if hit else nan
        if hit and H is not None:
            metrics[f"clip_{side}_below_avg"] = torch.tensor(
                sum(1.0 for t in hit if lpd[t] + H[t] < 0) / len(hit), dtype=cdt, device=dev)
        else:
            metrics[f"clip_{side}_below_avg"] = nan

    # --- truncated importance sampling against the rollout engine's log-probs ---------
    metrics["tis_weight_mean"] = zero
    is_ratio = ratio  # the importance ratio before delta and clipping (for kl_ratio_weight)
    metrics["rollout_mismatch_abs_mean"] = metrics["rollout_phantom_clip_frac"] = nan
    if rollout_logprobs is not None:  # the trainer's behaviour log-probs against the engine's
        rollout = rollout_logprobs.detach().reshape(-1).to(cdt)
        gaps = [old[t] - rollout[t] for t in range(N) if valid[t]]
        metrics["rollout_mismatch_abs_mean"] = sum((abs(g) for g in gaps), zero) / max(n_tok, 1)
        outside = sum(1.0 for g in gaps if not (1 - eps_low <= math.exp(float(g)) <= 1 + eps_high))
        metrics["rollout_phantom_clip_frac"] = torch.tensor(outside / max(n_tok, 1), dtype=cdt, device=dev)
    if tis_cap is not None:
        rollout = rollout_logprobs.reshape(-1).to(cdt)
        log_w = old - rollout
        if tis_level == "token":
            w = torch.clamp(torch.exp(log_w), max=tis_cap)
        else:
            w = torch.zeros(N, dtype=cdt, device=dev)
            for idx in seqs:
                s = sum((log_w[t] for t in idx if valid[t]), zero)
                for t in idx:
                    w[t] = torch.clamp(torch.exp(s), max=tis_cap)
        pg = pg * w
        metrics["tis_weight_mean"] = _masked_mean(w, valid)

    # --- per-token weights of the policy term (rollout IS weights, entropy masks, ...) ------
    if weights is not None:
        if tuple(weights.shape) == lead:
            w_tok = weights.detach().reshape(-1).to(cdt)
        else:
            w_tok = torch.zeros(N, dtype=cdt, device=dev)
            for i, idx in enumerate(seqs):
                for t in idx:
                    w_tok[t] = weights[i].detach().to(cdt)
        pg = pg * torch.where(valid, w_tok, 0.0)

    # --- aggregation, term by term ------------------------------------------------------------
    def aggregate(x: Tensor, mode: str, num_items) -> Tensor:
        x = torch.where(valid, x, 0.0)
        if mode == "token-mean":
            denom = num_items if num_items is not None else max(n_tok, 1)
            return x.sum() / denom
        if mode == "token-sum":
            return x.sum() / (num_items if num_items is not None else 1)
        if mode == "seq-mean-token-sum-norm":
            S = len(seqs)
            denom = (num_items if num_items is not None else max(S, 1))
            L = max_length if max_length is not None else max(lead[1], 1)
            return x.sum() / (denom * L)
        per_seq = []
        for idx in seqs:
            n_i = int(valid[idx].sum())
            if n_i == 0:
                continue
            s = x[idx].sum()
            per_seq.append(s / n_i if mode == "seq-mean-token-mean" else s)
        denom = num_items if num_items is not None else max(len(per_seq), 1)
        return sum(per_seq, x.sum() * 0.0) / denom  # "* 0": keep the graph when all are empty

    # a term aggregated like the policy term shares its normaliser unless given its own
    kl_mode = kl_aggregation if kl_aggregation is not None else aggregation
    kl_items = kl_num_items_in_batch if kl_num_items_in_batch is not None else (
        num_items_in_batch if kl_aggregation is None else None)
    ent_mode = entropy_aggregation if entropy_aggregation is not None else aggregation
    ent_items = entropy_num_items_in_batch if entropy_num_items_in_batch is not None else (
        num_items_in_batch if entropy_aggregation is None else None)

    loss = aggregate(pg, aggregation, num_items_in_batch)

    # --- KL to the reference policy --------------------------------------------------------
    metrics["kl_mean"] = zero
    metrics["kl_loss"] = zero
    if ref_logprobs is not None:
        ref = ref_logprobs.reshape(-1).to(cdt)
        x = torch.clamp(logp - ref, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # log(pi / pi_ref)
        k2 = 0.5 * x**2
        base = {"k1": x, "k2": k2, "k3": torch.exp(-x) - 1 + x, "abs": torch.abs(x)}[kl_estimator.rstrip("+")]
        if kl_clamp is not None:
            base = torch.clamp(base, -kl_clamp, kl_clamp)
        # "+": the value of the estimator, the gradient of k2 (straight-through)
        kl = k2 - k2.detach() + base.detach() if kl_estimator.endswith("+") else base
        if kl_ratio_weight:
            kl = kl * is_ratio
        kl_term = aggregate(kl, kl_mode, kl_items)
        loss = loss + kl_coef * kl_term
        metrics["kl_mean"] = _masked_mean(kl.detach(), valid)
        metrics["kl_loss"] = kl_term.detach()

    # --- entropy bonus ---------------------------------------------------------------------
    if entropy is not None:
        ent_term = aggregate(ent, ent_mode, ent_items)
        loss = loss - entropy_coef * ent_term
        metrics["entropy_loss"] = ent_term.detach()
    else:
        metrics["entropy_loss"] = nan

    # --- the entropy monitor: -mean over counted tokens of A' (logp + H) -------------------
    metrics["entropy_measured"] = 1.0 if H is not None else 0.0
    metrics["rollout_measured"] = 1.0 if rollout_logprobs is not None else 0.0
    if H is not None:
        for side, keep in (("pos", lambda a: a > 0), ("neg", lambda a: a < 0)):
            part = sum((-A_corr[t] * (lpd[t] + H[t]) for t in range(N) if valid[t] and keep(A_corr[t])), zero)
            metrics[f"entropy_drive_{side}"] = part / max(n_tok, 1)
        drive = sum((-A_corr[t] * (lpd[t] + H[t]) for t in range(N) if valid[t]), zero)
        metrics["entropy_drive"] = drive / max(n_tok, 1)
    else:
        metrics["entropy_drive"] = metrics["entropy_drive_pos"] = metrics["entropy_drive_neg"] = nan

    # --- metrics --------------------------------------------------------------------------
    metrics.update(
        n_tokens=torch.tensor(float(n_tok), dtype=cdt, device=dev),
        empty_batch=torch.tensor(float(n_tok == 0), dtype=cdt, device=dev),
        entropy_mean=_masked_mean(ent.detach(), valid) if H is not None else nan,
        logprob_mean=mean_lp,
        ratio_mean=_masked_mean(ratio.detach(), valid),
        ratio_max=ratio.detach()[valid].max() if n_tok else zero,
        approx_kl=_masked_mean(old - lpd, valid),
        pg_loss=aggregate(pg.detach(), aggregation, num_items_in_batch),
        n_seqs=torch.tensor(float(sum(int(valid[idx].sum()) > 0 for idx in seqs)) if seqs is not None else 0.0,
                            dtype=cdt, device=dev),
        eps_low=eps_low,
        eps_high=eps_high,
    )

    return ReferenceOutput(
        loss=loss,
        logprobs=lpd.reshape(lead),
        entropy=ent.detach().reshape(lead),
        metrics=metrics,
        advantages=torch.where(valid, A_corr.detach(), 0.0).reshape(lead),
        ratio=torch.where(valid, ratio.detach(), 0.0).reshape(lead),
    )
