"""The public losses: ``repo_loss`` (from hidden states), ``policy_loss_from_logprobs`` (from
per-token log-probs), ``adapo_loss`` (``repo_loss`` with an ADAPO controller) and ``RepoLoss``
(the same as a ``torch.nn.Module`` that holds its options and controller).

One straight data path::

    repo_loss                  = prepare (head + batch) -> head.sweep -> finish
    policy_loss_from_logprobs  = prepare (batch)        ->               finish

``prepare`` runs every check once, before the sweep; ``finish`` is the data-parallel
strategy's whole-batch statistics, the shared epilogue (:mod:`fused_pg.epilogue`) and the
metric reduction. Both losses therefore give identical results on identical log-probs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import checks, head as head_mod
from .batch import TokenBatch, make_token_batch
from .config import LOSS_FIELDS, HeadConfig, LossConfig, resolve
from .control import AdaptiveClip, EntropyController
from .epilogue import policy_loss
from .parallel import LOCAL, Parallel
from .stats import RepoStats

# keywords the public losses accept besides the config fields: the older spellings of the
# parallel groups, and the KL / entropy terms' own normalisers
_EXTRAS = ("process_group", "data_parallel_group", "kl_num_items_in_batch", "entropy_num_items_in_batch")


@dataclass
class PolicyLossOutput:
    """What the loss functions return.

    loss:     scalar, differentiable w.r.t. hidden, weight and bias (``repo_loss``) or
              logprobs and entropy (``policy_loss_from_logprobs``).
    logprobs: log-probabilities of the targets, fp32 (fp64 for fp64 inputs), the per-token
              shape, detached, 0 where masked.
    entropy:  token entropies, same shape and dtype, detached, 0 where masked (all NaN, i.e. not
              measured, when ``policy_loss_from_logprobs`` got no entropy).
    advantages: the advantages the loss used (REPO-corrected), per token, same shape and
              dtype, detached, 0 where masked.
    ratio:    the importance ratio per token (token or sequence level; before ``delta`` and
              clipping), same shape and dtype, detached, 0 where masked.
    metrics:  every key of :data:`fused_pg.epilogue.METRICS`, always present (0 where an
              option is off, NaN where a value could not be measured, with a flag saying why):
              0-dim tensors (no host sync happens until you read them) and the floats eps_low,
              eps_high (the hyper-parameters used), entropy_measured and rollout_measured.
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


def _edt(*tensors: Tensor | None) -> torch.dtype:
    """Epilogue arithmetic dtype: fp64 when any input is fp64, else fp32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


@dataclass(frozen=True)
class _Call:
    """One call, prepared: the checked configs, the flat token batch, the strategy."""

    cfg: LossConfig
    batch: TokenBatch
    parallel: Parallel
    lead: tuple[int, ...]


def _check_repo_inputs(cfg: LossConfig, repo_stats, entropy_given: bool) -> None:
    """What the REPO options need from the call: the per-state centre needs the entropies, and
    "decorrelate" with it needs statistics that hold the moments of ``logp + H``."""
    if cfg.repo_center != "state" or cfg.repo == "none":
        return
    if not entropy_given:
        raise ValueError("repo_center='state' centres logp by the token's entropy (L = logp + H): pass entropy= "
                         "(per-token entropies, the shape of logprobs)")
    if cfg.repo == "decorrelate" and isinstance(repo_stats, RepoStats) and not repo_stats.has_state:
        raise ValueError("repo_stats has no moments of logp + H, which repo='decorrelate' with repo_center='state' "
                         "needs: compute it with repo_statistics(..., entropy=...)")


def _finish(logprobs: Tensor, entropy: Tensor | None, call: _Call, leaves: dict, fn: str) -> PolicyLossOutput:
    """Whole-batch statistics (data parallelism), the epilogue, the metrics of the whole batch.
    ``entropy=None``: not measured (the output's entropies are then NaN)."""
    batch = call.parallel.data.whole_batch(call.batch, logprobs, call.cfg, entropy)
    loss, metrics, per_token = policy_loss(logprobs, entropy, batch, call.cfg)
    metrics = call.parallel.data.reduce_metrics(metrics)
    if entropy is None:
        entropy = torch.full_like(logprobs, float("nan"))
    return PolicyLossOutput(
        loss=_explain_missing_grad(loss, leaves, fn),
        logprobs=logprobs.detach().view(call.lead),
        entropy=entropy.detach().view(call.lead),
        metrics=metrics,
        advantages=per_token["advantages"].view(call.lead),
        ratio=per_token["ratio"].view(call.lead),
    )


def repo_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    advantages: Tensor,
    old_logprobs: Tensor | None = None,
    mask: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    rollout_logprobs: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    weights: Tensor | None = None,
    repo_stats: RepoStats | None = None,
    num_items_in_batch: float | Tensor | None = None,
    config: LossConfig | None = None,
    head: HeadConfig | None = None,
    parallel=None,
    validate: bool | None = None,
    **overrides,
) -> PolicyLossOutput:
    """Entropy-aware clipped policy-gradient loss straight from hidden states.

    One vocabulary sweep gives per-token log-probs and entropies (no ``N x V`` logits),
    then the epilogue of :func:`policy_loss_from_logprobs`, per valid token::

        L    = logp - mu | logp + H | logp                               repo_center batch | state | none
        A'   = A - zeta L   (REPO-R, repo="relative": A - zeta |A| L, kept on A's side; L detached)
        r    = exp(clamp(logp - old, -20, 20))                          (or GSPO sequence ratio)
        pg   = max(-A' min(r, delta), -A' clip(r, 1 - eps_low, 1 + eps_high))
        pg   = min(pg, -dual_clip A')  if A' < 0                        (dual clip)
        pg   = pg * tis_weight * weights
        loss = agg(pg) + kl_coef * agg_kl(KL(logp, ref)) - entropy_coef * agg_ent(H)

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
        rollout_logprobs: the inference engine's log-probs, for ``tis_cap``; without ``tis_cap``
                       they are only monitored (``rollout_mismatch_abs_mean``, ...).
        cu_seqlens:    [S + 1] sequence offsets of packed inputs (needed for sequence-level
                       options with packed inputs).
        weights:       per-token ([B, T] / [N]) or per-sequence ([B] / [S]) weights multiplied
                       into the policy-gradient term only (not KL, not entropy): rollout
                       importance weights, masks from entropy quantiles, off-policy masks.
                       Constants (detached inside); the normalisers still count every valid token.
        repo_stats:    REPO statistics of the whole batch (:func:`fused_pg.repo_statistics`),
                       for gradient accumulation and data parallelism; default: this batch's.
                       Needed by "decorrelate" and by the "batch" centre; "fixed" and "relative"
                       with ``repo_center`` "state" or "none" need no statistics (only the
                       ``adv_logp_cov_*`` metrics use them).
        num_items_in_batch: global normaliser of the policy term replacing the local count
                       (valid tokens for token-mean, non-empty sequences for seq-mean-*, all
                       sequences for seq-mean-token-sum-norm, 1 for token-sum) for gradient
                       accumulation / DP. ``kl_num_items_in_batch`` / ``entropy_num_items_in_batch``
                       (keywords) do the same for the KL / entropy terms when those have their
                       own aggregation; otherwise they share this one.
        config:        a :class:`fused_pg.LossConfig` (clip range, REPO, KL, entropy,
                       aggregation, ...); ``preset="verl"`` etc. builds it from a trainer's
                       defaults (:meth:`LossConfig.preset`).
        head:          a :class:`fused_pg.HeadConfig` (temperature, softcap, backend, precision,
                       ignore_index, ...), see :func:`fused_logprobs_entropy`.
        overrides:     any field of ``LossConfig`` or ``HeadConfig`` as a keyword, applied on top
                       of ``config`` / ``head`` (``repo_loss(..., eps_high=0.3, temperature=0.7)``);
                       an unknown name raises ``TypeError`` naming the nearest valid one.
        parallel:      ``VocabParallel(group)``: ``weight``/``bias`` are this rank's slice of the
                       vocabulary, every rank passes the same batch and gets the same loss;
                       ``DataParallel(group)``: each rank passes its part of the batch, and
                       ``repo_stats``, ``num_items_in_batch`` (those not passed) and the metrics
                       become the whole group's, ``loss`` being this rank's share (the sum over
                       ranks equals one process on the whole batch); ``Parallel(vocab, data)``
                       for both (see :mod:`fused_pg.parallel`).
        validate:      value checks (NaN/Inf, ids, log-probs <= 0 up to 1e-2 where they count);
                       default True on CPU, False on GPU (value checks synchronise).

    Returns:
        :class:`PolicyLossOutput` with ``loss``, ``logprobs``, ``entropy``, ``metrics``.
        An all-masked (or empty) batch gives ``loss == 0`` with zero gradients and
        ``metrics["empty_batch"] == 1``.

    Example:
        >>> out = repo_loss(h, model.lm_head.weight, ids[:, 1:], adv, old_logp, mask, eps_high=0.28)
        >>> out.loss.backward()
    """
    cfg, head_cfg, extras = resolve("repo_loss", config, head, overrides, extras=_EXTRAS)
    par = Parallel.of(parallel, process_group=extras.get("process_group"),
                      data_parallel_group=extras.get("data_parallel_group"))
    _check_repo_inputs(cfg, repo_stats, entropy_given=True)
    inputs = head_mod.prepare(hidden, weight, targets, bias, head_cfg, par, validate)
    batch = make_token_batch(
        tuple(targets.shape), hidden.device, _edt(hidden, weight), counted=inputs.counted,
        advantages=advantages, old_logprobs=old_logprobs, mask=mask, ref_logprobs=ref_logprobs,
        rollout_logprobs=rollout_logprobs, cu_seqlens=cu_seqlens, num_items_in_batch=num_items_in_batch,
        repo_stats=repo_stats, cfg=cfg, validate=inputs.validate, what="the leading shape of hidden",
        weights=weights, kl_num_items_in_batch=extras.get("kl_num_items_in_batch"),
        entropy_num_items_in_batch=extras.get("entropy_num_items_in_batch"))
    if inputs.validate:
        head_mod.check_values(inputs, batch.valid)
    call = _Call(cfg=cfg, batch=batch, parallel=par, lead=tuple(targets.shape))
    logprobs, entropy = head_mod.sweep(inputs, batch.valid)
    return _finish(logprobs, entropy, call, {"hidden": hidden, "weight": weight, "bias": bias}, "repo_loss")


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
    repo_stats: RepoStats | None = None,
    num_items_in_batch: float | Tensor | None = None,
    config: LossConfig | None = None,
    parallel=None,
    validate: bool | None = None,
    **overrides,
) -> PolicyLossOutput:
    """The policy loss of :func:`repo_loss` for callers that already have per-token log-probs.

    For trainers that compute log-probs (and entropies) with their own head, e.g. verl and
    OpenRLHF: the same options, semantics, metrics and output. ``repo_loss`` is the fused
    head followed by exactly this epilogue.

    Args:
        logprobs:  [B, T] or packed [N] log-probs of the sampled tokens under the current
                   policy, differentiable (any float dtype; the epilogue runs in fp32, or fp64).
        advantages, old_logprobs, mask, ref_logprobs, rollout_logprobs, cu_seqlens, weights,
                   repo_stats, num_items_in_batch: as in :func:`repo_loss`, with
                   ``logprobs``' shape in place of hidden's leading shape; ``old_logprobs=None``
                   means on-policy.
        entropy:   optional per-token entropies, ``logprobs``' shape, differentiable; needed
                   when ``entropy_coef != 0`` and for ``repo_center="state"``. Without them every
                   metric that needs H (``entropy_mean``, ``entropy_drive``, ...) is NaN and
                   ``metrics["entropy_measured"]`` is 0.0: a controller fed those metrics raises.
        config, overrides, validate: as in :func:`repo_loss` (``LossConfig`` fields only).
        parallel:  ``DataParallel(group)`` (or ``data_parallel_group=group``), as in :func:`repo_loss`.

    Returns:
        :class:`PolicyLossOutput`; ``loss`` is differentiable w.r.t. ``logprobs`` and ``entropy``.

    Example:
        >>> logp = model_logprobs(batch)                 # [B, T], requires grad
        >>> out = policy_loss_from_logprobs(logp, adv, old_logp, response_mask, preset="verl")
        >>> out.loss.backward()
    """
    cfg, _, extras = resolve("policy_loss_from_logprobs", config, None, overrides, extras=_EXTRAS[1:],
                             head_fields=False)
    par = Parallel.of(parallel, data_parallel_group=extras.get("data_parallel_group"))
    if par.vocab is not LOCAL:
        raise ValueError("policy_loss_from_logprobs takes log-probs, not an LM head: a VocabParallel "
                         "strategy does not apply (pass DataParallel(group))")
    checks.tensor("logprobs", logprobs, dims=(1, 2), floating=True)
    dev = logprobs.device
    lead = tuple(logprobs.shape)
    if entropy is not None:
        checks.tensor("entropy", entropy, floating=True, device=dev, like="logprobs")
        checks.shape("entropy", entropy, lead, "the shape of logprobs")
    if entropy is None and cfg.entropy_coef != 0:
        raise ValueError("entropy_coef != 0 needs entropy (per-token entropies, the shape of logprobs)")
    _check_repo_inputs(cfg, repo_stats, entropy_given=entropy is not None)
    validate = checks.resolve_validate(validate, dev)
    edt = _edt(logprobs)
    batch = make_token_batch(
        lead, dev, edt, counted=None, advantages=advantages, old_logprobs=old_logprobs, mask=mask,
        ref_logprobs=ref_logprobs, rollout_logprobs=rollout_logprobs, cu_seqlens=cu_seqlens,
        num_items_in_batch=num_items_in_batch, repo_stats=repo_stats, cfg=cfg, validate=validate,
        what="the shape of logprobs", like="logprobs", weights=weights,
        kl_num_items_in_batch=extras.get("kl_num_items_in_batch"),
        entropy_num_items_in_batch=extras.get("entropy_num_items_in_batch"))
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
        ent = None  # not measured
    call = _Call(cfg=cfg, batch=batch, parallel=par, lead=lead)
    return _finish(lp, ent, call, {"logprobs": logprobs, "entropy": entropy}, "policy_loss_from_logprobs")


def _loss_overrides(where: str, config: LossConfig | None, kwargs: dict) -> LossConfig:
    """Pop the ``LossConfig`` keywords (and ``preset``) out of ``kwargs`` into one config."""
    loss_kw = {k: kwargs.pop(k) for k in list(kwargs) if k in LOSS_FIELDS or k == "preset"}
    cfg, _, _ = resolve(where, config, None, loss_kw, head_fields=False)
    return cfg


def adapo_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    advantages: Tensor,
    old_logprobs: Tensor | None = None,
    mask: Tensor | None = None,
    *,
    controller: AdaptiveClip,
    update_controller: bool = False,
    config: LossConfig | None = None,
    **kwargs,
) -> PolicyLossOutput:
    """:func:`repo_loss` with the clip range read from an ADAPO controller.

    ``eps_high`` (and ``eps_low``) come from ``controller`` (an :class:`fused_pg.AdaptiveClip`);
    passing them as well is an error. With ``update_controller=True`` the
    controller takes one step from this batch's ``metrics`` before returning
    (``controller.update(out.metrics)``: one scalar read from the device; a batch with no valid
    token leaves it unchanged). Otherwise call ``controller.update(out.metrics)`` yourself
    after the optimizer step -- or, with gradient accumulation, ``controller.observe(out.metrics)``
    per micro-batch and ``controller.update()`` once per optimizer step (a token-weighted mean
    over the micro-batches). Other keyword arguments are those of :func:`repo_loss` (``repo``
    defaults to "decorrelate": pass ``repo="none"`` for pure ADAPO).
    """
    if not isinstance(controller, AdaptiveClip):
        raise TypeError(f"controller must be an AdaptiveClip, got {type(controller).__name__} "
                        "(RepoLoss(controller=...) takes any fused_pg controller)")
    for name in controller.controlled():
        if name in kwargs:
            raise TypeError(f"adapo_loss takes {name} from the controller; do not pass {name}")
    cfg = controller.apply(_loss_overrides("adapo_loss", config, kwargs))
    out = repo_loss(hidden, weight, targets, advantages, old_logprobs, mask, config=cfg, **kwargs)
    if update_controller:
        controller.update(out.metrics)
    return out


class RepoLoss(torch.nn.Module):
    """:func:`repo_loss` as a module: it holds the options (``config``, ``head``, ``parallel``)
    and an optional entropy controller, so a trainer builds them once.

    The controller's state is part of the module's ``state_dict`` (``get_extra_state``): a
    trainer that checkpoints the module (or a model that owns it) checkpoints the controller.
    While the module is in training mode every call observes its metrics
    (``controller.observe(out.metrics)``); call :meth:`update_controller` once per optimiser step.

    Example::

        loss_fn = RepoLoss(preset="trl-dapo", controller=AdaptiveClip(target_entropy=0.6))
        out = loss_fn(hidden, lm_head.weight, targets, advantages, old_logprobs, mask)
        out.loss.backward(); optimizer.step(); loss_fn.update_controller()
    """

    def __init__(self, config: LossConfig | None = None, head: HeadConfig | None = None, parallel=None,
                 controller: EntropyController | None = None, **overrides):
        super().__init__()
        if controller is not None and not isinstance(controller, EntropyController):
            raise TypeError(f"controller must be a fused_pg controller, got {type(controller).__name__}")
        if controller is not None:
            clash = set(controller.controlled()) & set(overrides)
            if clash:
                raise TypeError(f"RepoLoss takes {sorted(clash)} from the controller; do not pass them")
        self.config, self.head, _ = resolve("RepoLoss", config, head, overrides)
        self.parallel = Parallel.of(parallel)
        self.controller = controller

    def _config(self) -> LossConfig:
        return self.controller.apply(self.config) if self.controller is not None else self.config

    def _observe(self, out: PolicyLossOutput) -> PolicyLossOutput:
        if self.controller is not None and self.training:
            self.controller.observe(out.metrics)
        return out

    def forward(self, hidden: Tensor, weight: Tensor, targets: Tensor, advantages: Tensor,
                old_logprobs: Tensor | None = None, mask: Tensor | None = None, **data) -> PolicyLossOutput:
        """:func:`repo_loss` with this module's options; ``data``: its per-call tensor arguments
        (bias, ref_logprobs, rollout_logprobs, cu_seqlens, weights, repo_stats, num_items_in_batch,
        validate, kl_num_items_in_batch, entropy_num_items_in_batch)."""
        return self._observe(repo_loss(hidden, weight, targets, advantages, old_logprobs, mask,
                                       config=self._config(), head=self.head, parallel=self.parallel, **data))

    def from_logprobs(self, logprobs: Tensor, advantages: Tensor, old_logprobs: Tensor | None = None,
                      mask: Tensor | None = None, **data) -> PolicyLossOutput:
        """:func:`policy_loss_from_logprobs` with this module's loss options."""
        par = Parallel(data=self.parallel.data)
        return self._observe(policy_loss_from_logprobs(logprobs, advantages, old_logprobs, mask,
                                                       config=self._config(), parallel=par, **data))

    def update_controller(self, *, process_group=None) -> float:
        """One controller step from what was observed since the last (see
        :meth:`fused_pg.EntropyController.update`); 0.0 without a controller."""
        return self.controller.update(process_group=process_group) if self.controller is not None else 0.0

    def get_extra_state(self) -> dict:
        return {"controller": self.controller.state_dict() if self.controller is not None else None}

    def set_extra_state(self, state: dict) -> None:
        saved = state.get("controller")
        if (saved is None) != (self.controller is None):
            raise ValueError("RepoLoss state and module disagree on whether there is a controller: "
                             f"state has {'none' if saved is None else saved.get('controller')}, the module "
                             f"{'none' if self.controller is None else type(self.controller).__name__}")
        if saved is not None:
            self.controller.load_state_dict(saved)

    def extra_repr(self) -> str:
        return f"config={self.config}, head={self.head}, parallel={self.parallel}, controller={self.controller}"
