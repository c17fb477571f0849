"""Public loss functions: ``repo_loss`` (from hidden states), ``policy_loss_from_logprobs``
(from per-token log-probs) and ``adapo_loss`` (``repo_loss`` with an ADAPO controller).

``repo_loss`` is the fused head (:func:`fused_pg.head.run_head`) followed by the same
epilogue ``policy_loss_from_logprobs`` runs, so both give identical losses on identical
log-probs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from . import backends, checks, distributed
from .batch import make_token_batch
from .config import Default, HeadConfig, LossConfig
from .control import AdaptiveClip
from .epilogue import policy_loss
from .head import check_head_args, check_head_values, flat_head_targets, run_head
from .stats import RepoStats


@dataclass
class PolicyLossOutput:
    """What the loss functions return.

    loss:     scalar, differentiable w.r.t. hidden, weight and bias (``repo_loss``) or
              logprobs and entropy (``policy_loss_from_logprobs``).
    logprobs: log-probabilities of the targets, fp32 (fp64 for fp64 inputs), the per-token
              shape, detached, 0 where masked.
    entropy:  token entropies, same shape and dtype, detached, 0 where masked (all 0 when
              ``policy_loss_from_logprobs`` got no entropy).
    advantages: the advantages the loss used (REPO-corrected), per token, same shape and
              dtype, detached, 0 where masked.
    ratio:    the importance ratio per token (token or sequence level; before ``delta`` and
              clipping), same shape and dtype, detached, 0 where masked.
    metrics:  every key of :data:`fused_pg.epilogue.METRIC_KEYS`, always present (0 where an
              option is off): 0-dim tensors (no host sync happens until you read them) and
              the float hyper-parameters used (eps_low, eps_high).
    """

    loss: Tensor
    logprobs: Tensor
    entropy: Tensor
    metrics: dict[str, Tensor | float] = field(default_factory=dict)
    advantages: Tensor | None = None
    ratio: Tensor | None = None


class _NoGradientPath(torch.autograd.Function):
    """Identity on the loss whose backward explains, by name, that nothing requires grad."""

    @staticmethod
    def forward(ctx, loss, anchor, message):
        ctx.message = message
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(ctx.message)


def _explain_missing_grad(loss: Tensor, leaves: dict[str, Tensor | None], fn: str) -> Tensor:
    """If grad mode is on but no input requires grad, ``loss.backward()`` would fail with
    PyTorch's generic message; make it name the inputs instead (the value is unchanged)."""
    if not torch.is_grad_enabled() or any(t is not None and t.requires_grad for t in leaves.values()):
        return loss
    names = ", ".join(n for n, t in leaves.items() if t is not None)
    message = (f"{fn}: none of {names} requires grad, so the loss has no gradient; call "
               f"requires_grad_() on the inputs to train (or compute the loss under torch.no_grad())")
    anchor = torch.zeros((), device=loss.device, requires_grad=True)
    return _NoGradientPath.apply(loss, anchor, message)


_LOSS_OPTIONS = tuple(f.name for f in fields(LossConfig) if f.name != "preset")


def _loss_config(arguments: dict) -> LossConfig:
    """The validated :class:`LossConfig` of a public loss function's arguments (``locals()``
    on entry): every loss option has the same name there and in ``LossConfig``."""
    return LossConfig.from_options(arguments["preset"], **{k: arguments[k] for k in _LOSS_OPTIONS})


def _edt(*tensors: Tensor | None) -> torch.dtype:
    """Epilogue arithmetic dtype: fp64 when any input is fp64, else fp32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def repo_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    advantages: Tensor,
    old_logprobs: Tensor | None,
    mask: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    rollout_logprobs: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    weights: Tensor | None = None,
    preset: str | None = None,
    eps_low: float = Default(0.2),
    eps_high: float = Default(0.28),
    dual_clip: float | None = Default(None),
    delta: float | None = Default(None),
    repo: str = "decorrelate",
    repo_coef: float = 1.0,
    repo_center: bool = True,
    repo_stats: RepoStats | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = Default("k3"),
    kl_clamp: float | None = Default(None),
    kl_ratio_weight: bool = False,
    kl_aggregation: str | None = None,
    kl_num_items_in_batch: float | Tensor | None = None,
    entropy_coef: float = 0.0,
    entropy_aggregation: str | None = None,
    entropy_num_items_in_batch: float | Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    aggregation: str = Default("token-mean"),
    num_items_in_batch: float | Tensor | None = None,
    max_length: int | None = Default(None),
    importance_level: str = Default("token"),
    tis_cap: float | None = None,
    tis_level: str = "token",
    ignore_index: int = -100,
    backend: str = "auto",
    precision: str = "native",
    deterministic: bool = False,
    token_chunk: int | None = None,
    vocab_chunk: int | None = None,
    compact_rows: bool | None = None,
    validate: bool | None = None,
    process_group=None,
    data_parallel_group=None,
) -> PolicyLossOutput:
    """Entropy-aware clipped policy-gradient loss straight from hidden states.

    One vocabulary sweep gives per-token log-probs and entropies (no ``N x V`` logits),
    then the epilogue of :func:`policy_loss_from_logprobs`, per valid token::

        A'  = A - zeta * (logp - mu)                                   REPO (logp detached)
        r   = exp(clamp(logp - old, -20, 20))                          (or GSPO sequence ratio)
        pg  = max(-A' min(r, delta), -A' clip(r, 1 - eps_low, 1 + eps_high))
        pg  = min(pg, -dual_clip A')  if A' < 0                        (dual clip)
        pg  = pg * tis_weight * weights
        L   = agg(pg) + kl_coef * agg_kl(KL(logp, ref)) - entropy_coef * agg_ent(H)

    Args:
        hidden:        [B, T, D] or packed [N, D] final hidden states.
        weight:        [V, D] LM-head weight (bias: optional [V]).
        targets:       token ids, hidden's leading shape ([B, T] or [N]); any integer dtype.
        advantages:    per token (hidden's leading shape) or per sequence ([B], or [S] with
                       cu_seqlens).
        old_logprobs:  behaviour-policy log-probs, hidden's leading shape; ``None`` means
                       on-policy (ratio 1 with the gradient of logp, no extra sweep). Like
                       ref/rollout log-probs they are constants: detached inside.
        mask:          1/True for tokens that count (bool, int or float 0/1); tokens whose
                       target is ``ignore_index`` never count.
        ref_logprobs:  reference-policy log-probs, for ``kl_coef`` (KL is reported whenever given).
        rollout_logprobs, tis_cap, tis_level: truncated importance sampling against the
                       inference engine: ``min(exp(old - rollout), tis_cap)`` per token or per
                       sequence (sum of log-ratios), multiplied into the policy-gradient term.
        cu_seqlens:    [S + 1] sequence offsets of packed inputs (needed for sequence-level
                       options with packed inputs).
        weights:       per-token ([B, T] / [N]) or per-sequence ([B] / [S]) weights multiplied
                       into the policy-gradient term only (not KL, not entropy): rollout
                       importance weights, masks from entropy quantiles, off-policy masks.
                       Constants (detached inside); the normalisers still count every valid token.
        preset:        a trainer's defaults for the options you do not pass, one of
                       :data:`fused_pg.config.PRESETS`: "verl", "verl-gspo", "trl-grpo",
                       "trl-gspo", "trl-dapo", "trl-bnpo", "trl-dr-grpo", "trl-luspo",
                       "openrlhf". It sets eps_low/eps_high, dual_clip, delta, aggregation,
                       importance_level, kl_estimator, kl_clamp (and max_length for
                       trl-dr-grpo); never the REPO options. An explicit argument always wins.
        eps_low, eps_high: clip range offsets from 1 (DAPO clip-higher).
        dual_clip:     verl's ``clip_ratio_c`` (> 1): caps the loss at ``-c A'`` where ``A' < 0``.
        delta:         TRL's two-sided cap (> 1): ``min(r, delta)`` in the unclipped term.
        repo:          "none" | "fixed" | "decorrelate" (see :func:`fused_pg.epilogue.repo_advantages`).
        repo_coef:     zeta for "fixed" (>= 0), gamma in [0, 1] for "decorrelate".
        repo_center:   mu = batch mean of logp (True) or 0.
        repo_stats:    REPO statistics of the whole batch (:func:`fused_pg.repo_statistics`),
                       for gradient accumulation and data parallelism; default: this batch's.
        kl_coef, kl_estimator: ``"k1" | "k2" | "k3" | "abs"``, or ``"k1+" | "k3+" | "abs+"``
                       (that value with the gradient of k2); see :func:`fused_pg.epilogue.kl_penalty`.
        kl_clamp:      bounds the per-token KL value to [-kl_clamp, kl_clamp] (None: no bound).
        kl_ratio_weight: multiply the per-token KL by the (differentiable) importance ratio r,
                       TRL's ``use_bias_correction_kl`` (unbiased reverse-KL gradient off-policy).
        kl_aggregation, kl_num_items_in_batch: aggregation and normaliser of the KL term.
                       ``kl_aggregation=None``: ``aggregation``, with ``kl_num_items_in_batch``
                       defaulting to ``num_items_in_batch``; an explicit ``kl_aggregation``
                       uses ``kl_num_items_in_batch`` or else the local count.
        entropy_coef:  entropy bonus coefficient (the loss subtracts ``entropy_coef * agg_ent(H)``).
        entropy_aggregation, entropy_num_items_in_batch: the same for the entropy term (TRL
                       averages the entropy bonus over the micro-batch's tokens whatever its
                       loss_type: ``entropy_aggregation="token-mean"`` with its own normaliser).
        temperature, softcap: LM-head options, see :func:`fused_logprobs_entropy`.
        aggregation:   "token-mean" | "token-sum" | "seq-mean-token-mean" | "seq-mean-token-sum"
                       | "seq-mean-token-sum-norm" (Dr.GRPO; divisor num_seqs * max_length).
        num_items_in_batch: global normaliser of the policy term replacing the local count
                       (valid tokens for token-mean, non-empty sequences for seq-mean-*, all
                       sequences for seq-mean-token-sum-norm, 1 for token-sum) for gradient
                       accumulation / DP.
        max_length:    Dr.GRPO's constant length (default: T of [B, T] inputs).
        importance_level: "token" or "sequence" (GSPO).
        ignore_index:  target id that marks tokens to skip.
        backend, precision, deterministic, token_chunk, vocab_chunk, compact_rows, validate:
                       see :func:`fused_logprobs_entropy`. ``validate`` also checks that the
                       log-prob inputs are <= 0 (up to 1e-2) and finite where they count.
        process_group: vocabulary parallelism: ``weight``/``bias`` are this rank's consecutive
                       slice of the vocabulary (rank order); every rank passes the same batch
                       and gets the same loss (see :mod:`fused_pg.distributed`).
        data_parallel_group: data parallelism: each rank passes its part of the batch;
                       ``repo_stats`` and ``num_items_in_batch`` (those not passed) and the
                       metrics become those of the whole group's batch, and ``loss`` is this
                       rank's share: the sum over ranks equals one process on the whole batch
                       (DDP/FSDP average gradients: scale the loss by the group size).

    Returns:
        :class:`PolicyLossOutput` with ``loss``, ``logprobs``, ``entropy``, ``metrics``.
        An all-masked (or empty) batch gives ``loss == 0`` with zero gradients and
        ``metrics["empty_batch"] == 1``.

    Example:
        >>> out = repo_loss(h, model.lm_head.weight, ids[:, 1:], adv, old_logp, mask)
        >>> out.loss.backward()
    """
    N, V = check_head_args(hidden, weight, targets, bias, ignore_index)
    loss_cfg = _loss_config(locals())
    head_cfg = HeadConfig(temperature=temperature, softcap=softcap, precision=precision,
                          deterministic=deterministic, token_chunk=token_chunk, vocab_chunk=vocab_chunk,
                          compact_rows=compact_rows)
    impl = backends.resolve(backend, hidden.device)
    validate = checks.resolve_validate(validate, hidden.device)
    shard = None if process_group is None else distributed.VocabShard.of(process_group, weight)
    if shard is not None:
        V = shard.vocab_size  # the whole vocabulary (a 0-dim tensor: no host sync)
    # targets widened to int64 first: a small integer dtype (uint8 wraps -100 to 156) must not
    # alias a vocabulary id. Unchecked ids outside [0, V) never count (a sync-free guard).
    wide = targets.reshape(-1).long()
    counted = wide != ignore_index
    if not validate:
        counted = counted & (wide >= 0) & (wide < V)
    batch = make_token_batch(
        tuple(targets.shape), hidden.device, _edt(hidden, weight), counted=counted,
        advantages=advantages, old_logprobs=old_logprobs, mask=mask, ref_logprobs=ref_logprobs,
        rollout_logprobs=rollout_logprobs, cu_seqlens=cu_seqlens, num_items_in_batch=num_items_in_batch,
        repo_stats=repo_stats, cfg=loss_cfg, validate=validate, what="the leading shape of hidden",
        weights=weights, kl_num_items_in_batch=kl_num_items_in_batch,
        entropy_num_items_in_batch=entropy_num_items_in_batch)
    if validate and shard is None:
        checks.target_ids(wide, batch.valid, V, ignore_index, bias)
        check_head_values(hidden, weight, bias, batch.valid)
    elif validate:
        shard.check_values(hidden, weight, bias, wide, batch.valid, batch.valid, ignore_index)
    logprobs, entropy = run_head(hidden.reshape(N, hidden.shape[-1]), weight, bias, flat_head_targets(wide, batch.valid),
                                 head_cfg, impl, shard=shard)
    if data_parallel_group is not None:
        batch = distributed.data_parallel_batch(batch, logprobs, loss_cfg, data_parallel_group)
    loss, metrics, per_token = policy_loss(logprobs, entropy, batch, loss_cfg)
    if data_parallel_group is not None:
        metrics = distributed.data_parallel_metrics(metrics, data_parallel_group)
    loss = _explain_missing_grad(loss, {"hidden": hidden, "weight": weight, "bias": bias}, "repo_loss")
    return PolicyLossOutput(
        loss=loss,
        logprobs=logprobs.detach().view(targets.shape),
        entropy=entropy.detach().view(targets.shape),
        metrics=metrics,
        advantages=per_token["advantages"].view(targets.shape),
        ratio=per_token["ratio"].view(targets.shape),
    )


def policy_loss_from_logprobs(
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
    preset: str | None = None,
    eps_low: float = Default(0.2),
    eps_high: float = Default(0.28),
    dual_clip: float | None = Default(None),
    delta: float | None = Default(None),
    repo: str = "decorrelate",
    repo_coef: float = 1.0,
    repo_center: bool = True,
    repo_stats: RepoStats | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = Default("k3"),
    kl_clamp: float | None = Default(None),
    kl_ratio_weight: bool = False,
    kl_aggregation: str | None = None,
    kl_num_items_in_batch: float | Tensor | None = None,
    entropy_coef: float = 0.0,
    entropy_aggregation: str | None = None,
    entropy_num_items_in_batch: float | Tensor | None = None,
    aggregation: str = Default("token-mean"),
    num_items_in_batch: float | Tensor | None = None,
    max_length: int | None = Default(None),
    importance_level: str = Default("token"),
    tis_cap: float | None = None,
    tis_level: str = "token",
    validate: bool | None = None,
    data_parallel_group=None,
) -> PolicyLossOutput:
    """The policy loss of :func:`repo_loss` for callers that already have per-token log-probs.

    For trainers that compute log-probs (and entropies) with their own head, e.g. verl and
    OpenRLHF: the same options, semantics, metrics and output. ``repo_loss`` is the fused
    head followed by exactly this epilogue.

    Args:
        logprobs:  [B, T] or packed [N] log-probs of the sampled tokens under the current
                   policy, differentiable (any float dtype; the epilogue runs in fp32, or fp64).
        advantages, old_logprobs, mask, ref_logprobs, rollout_logprobs, cu_seqlens: as in
                   :func:`repo_loss`, with ``logprobs``' shape in place of hidden's leading
                   shape; ``old_logprobs=None`` means on-policy.
        entropy:   optional per-token entropies, ``logprobs``' shape, differentiable; needed
                   when ``entropy_coef != 0`` and reported as ``metrics["entropy_mean"]``
                   (0 when not given).
        other options: exactly those of :func:`repo_loss` (``data_parallel_group`` included).

    Returns:
        :class:`PolicyLossOutput`; ``loss`` is differentiable w.r.t. ``logprobs`` and ``entropy``.

    Example:
        >>> logp = model_logprobs(batch)                 # [B, T], requires grad
        >>> out = policy_loss_from_logprobs(logp, adv, old_logp, response_mask)
        >>> out.loss.backward()
    """
    checks.tensor("logprobs", logprobs, dims=(1, 2), floating=True)
    dev = logprobs.device
    lead = tuple(logprobs.shape)
    if entropy is not None:
        checks.tensor("entropy", entropy, floating=True, device=dev)
        checks.shape("entropy", entropy, lead, "the shape of logprobs")
    loss_cfg = _loss_config(locals())
    if entropy is None and loss_cfg.entropy_coef != 0:
        raise ValueError("entropy_coef != 0 needs entropy (per-token entropies, the shape of logprobs)")
    validate = checks.resolve_validate(validate, dev)
    edt = _edt(logprobs)
    batch = make_token_batch(
        lead, dev, edt, counted=None, advantages=advantages, old_logprobs=old_logprobs, mask=mask,
        ref_logprobs=ref_logprobs, rollout_logprobs=rollout_logprobs, cu_seqlens=cu_seqlens,
        num_items_in_batch=num_items_in_batch, repo_stats=repo_stats, cfg=loss_cfg, validate=validate,
        what="the shape of logprobs", weights=weights, kl_num_items_in_batch=kl_num_items_in_batch,
        entropy_num_items_in_batch=entropy_num_items_in_batch)
    valid = batch.valid
    lp = logprobs.reshape(-1)
    if validate:
        checks.finite("logprobs", lp.detach()[valid])
        checks.logprob_values("logprobs", lp.detach()[valid], 1e-2)
    lp = torch.where(valid, lp.to(edt), 0.0)
    if entropy is not None:
        ent = entropy.reshape(-1)
        if validate:
            checks.finite("entropy", ent.detach()[valid])
        ent = torch.where(valid, ent.to(edt), 0.0)
    else:
        ent = torch.zeros_like(lp, requires_grad=False)
    if data_parallel_group is not None:
        batch = distributed.data_parallel_batch(batch, lp, loss_cfg, data_parallel_group)
    loss, metrics, per_token = policy_loss(lp, ent, batch, loss_cfg)
    if data_parallel_group is not None:
        metrics = distributed.data_parallel_metrics(metrics, data_parallel_group)
    loss = _explain_missing_grad(loss, {"logprobs": logprobs, "entropy": entropy}, "policy_loss_from_logprobs")
    return PolicyLossOutput(
        loss=loss,
        logprobs=lp.detach().view(lead),
        entropy=ent.detach().view(lead),
        metrics=metrics,
        advantages=per_token["advantages"].view(lead),
        ratio=per_token["ratio"].view(lead),
    )


def adapo_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    advantages: Tensor,
    old_logprobs: Tensor,
    mask: Tensor | None = None,
    *,
    controller: AdaptiveClip,
    update_controller: bool = False,
    **kwargs,
) -> PolicyLossOutput:
    """:func:`repo_loss` with the clip range read from an ADAPO controller.

    ``eps_high`` (and ``eps_low``) come from ``controller``; passing them as well is an error.
    With ``update_controller=True`` the controller takes one step from this batch's
    ``metrics`` before returning (``controller.update(out.metrics)``: one scalar read from the
    device; a batch with no valid token leaves it unchanged). Otherwise call
    ``controller.update(out.metrics)`` yourself after the optimizer step -- or, with gradient
    accumulation, ``controller.observe(out.metrics)`` per micro-batch and ``controller.update()``
    once per optimizer step (a token-weighted mean over the micro-batches).
    Other keyword arguments are those of :func:`repo_loss` (``repo`` defaults to "decorrelate":
    pass ``repo="none"`` for pure ADAPO).
    """
    if not isinstance(controller, AdaptiveClip):
        raise TypeError(f"controller must be an AdaptiveClip, got {type(controller).__name__}")
    for name in ("eps_low", "eps_high"):
        if name in kwargs:
            raise TypeError(f"adapo_loss takes {name} from the controller; do not pass {name}")
    out = repo_loss(hidden, weight, targets, advantages, old_logprobs, mask,
                    eps_low=controller.eps_low, eps_high=controller.eps_high, **kwargs)
    if update_controller:
        controller.update(out.metrics)
    return out
