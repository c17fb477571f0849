"""Public loss functions: ``repo_loss`` and ``adapo_loss``."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from .batch import make_token_batch
from .config import HeadConfig, LossConfig
from .control import AdaptiveClip
from .epilogue import policy_loss
from .head import check_head_args, resolve_backend, run_head


@dataclass
class PolicyLossOutput:
    """What the loss functions return.

    loss:     scalar, differentiable w.r.t. hidden, weight and bias.
    logprobs: log-probabilities of the targets, fp32, hidden's leading shape, detached, 0 where masked.
    entropy:  token entropies, same shape and dtype, detached, 0 where masked.
    metrics:  0-dim tensors (read them when you like: no host sync happens until you do)
              and the float hyper-parameters used (eps_low, eps_high).
    """

    loss: Tensor
    logprobs: Tensor
    entropy: Tensor
    metrics: dict[str, Tensor | float] = field(default_factory=dict)


def repo_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    advantages: Tensor,
    old_logprobs: Tensor,
    mask: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    rollout_logprobs: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    dual_clip: float | None = None,
    delta: float | None = None,
    repo: str = "decorrelate",
    repo_coef: float = 1.0,
    repo_center: bool = True,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
    softcap: float | None = None,
    aggregation: str = "token-mean",
    num_items_in_batch: float | Tensor | None = None,
    max_length: int | None = None,
    importance_level: str = "token",
    tis_cap: float | None = None,
    tis_level: str = "token",
    ignore_index: int = -100,
    backend: str = "auto",
    precision: str = "native",
    deterministic: bool = False,
    token_chunk: int | None = None,
    vocab_chunk: int | None = None,
    validate: bool | None = None,
) -> PolicyLossOutput:
    """Entropy-aware clipped policy-gradient loss straight from hidden states.

    One vocabulary sweep gives per-token log-probs and entropies (no ``N x V`` logits),
    then, per valid token::

        A'  = A - zeta * (logp - mu)                                   REPO (logp detached)
        r   = exp(clamp(logp - old, -20, 20))                          (or GSPO sequence ratio)
        pg  = max(-A' min(r, delta), -A' clip(r, 1 - eps_low, 1 + eps_high))
        pg  = min(pg, -dual_clip A')  if A' < 0                        (dual clip)
        l   = pg * tis_weight + kl_coef * KL(logp, ref) - entropy_coef * H
        L   = aggregate(l, mask)

    Args:
        hidden:        [B, T, D] or packed [N, D] final hidden states.
        weight:        [V, D] LM-head weight (bias: optional [V]).
        targets:       token ids, hidden's leading shape ([B, T] or [N]).
        advantages:    per token (hidden's leading shape) or per sequence ([B], or [S] with
                       cu_seqlens).
        old_logprobs:  behaviour-policy log-probs, hidden's leading shape.
        mask:          1/True for tokens that count (bool, int or float 0/1); tokens whose
                       target is ``ignore_index`` never count.
        ref_logprobs:  reference-policy log-probs, for ``kl_coef`` (KL is reported whenever given).
        rollout_logprobs, tis_cap, tis_level: truncated importance sampling against the
                       inference engine: ``min(exp(old - rollout), tis_cap)`` per token or per
                       sequence (sum of log-ratios), multiplied into the policy-gradient term.
        cu_seqlens:    [S + 1] sequence offsets of packed inputs (needed for sequence-level
                       options with packed inputs).
        eps_low, eps_high: clip range offsets from 1 (DAPO clip-higher).
        dual_clip:     verl's ``clip_ratio_c`` (> 1): caps the loss at ``-c A'`` where ``A' < 0``.
        delta:         TRL's two-sided cap (> 1): ``min(r, delta)`` in the unclipped term.
        repo:          "none" | "fixed" | "decorrelate" (see :func:`fused_pg.epilogue.repo_advantages`).
        repo_coef:     zeta for "fixed" (>= 0), gamma in [0, 1] for "decorrelate".
        repo_center:   mu = batch mean of logp (True) or 0.
        kl_coef, kl_estimator: ``"k1" | "k2" | "k3" | "k3+"``.
        entropy_coef:  entropy bonus coefficient (the loss subtracts ``entropy_coef * H``).
        temperature, softcap: LM-head options, see :func:`fused_logprobs_entropy`.
        aggregation:   "token-mean" | "seq-mean-token-mean" | "seq-mean-token-sum" |
                       "seq-mean-token-sum-norm" (Dr.GRPO; divisor num_seqs * max_length).
        num_items_in_batch: global normaliser replacing the local count (valid tokens for
                       token-mean, sequences otherwise) for gradient accumulation / DP.
        max_length:    Dr.GRPO's constant length (default: T of [B, T] inputs).
        importance_level: "token" or "sequence" (GSPO).
        ignore_index:  target id that marks tokens to skip.
        backend, precision, deterministic, token_chunk, vocab_chunk, validate:
                       see :func:`fused_logprobs_entropy`.

    Returns:
        :class:`PolicyLossOutput` with ``loss``, ``logprobs``, ``entropy``, ``metrics``.
        An all-masked batch gives ``loss == 0`` with zero gradients and
        ``metrics["empty_batch"] == 1``.

    Example:
        >>> out = repo_loss(h, model.lm_head.weight, ids[:, 1:], adv, old_logp, mask)
        >>> out.loss.backward()
    """
    N, _, validate = check_head_args(hidden, weight, targets, bias, ignore_index, validate)
    loss_cfg = LossConfig(
        eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip, delta=delta, repo=repo,
        repo_coef=repo_coef, repo_center=repo_center, kl_coef=kl_coef, kl_estimator=kl_estimator,
        entropy_coef=entropy_coef, aggregation=aggregation, max_length=max_length,
        importance_level=importance_level, tis_cap=tis_cap, tis_level=tis_level)
    head_cfg = HeadConfig(temperature=temperature, softcap=softcap, precision=precision,
                          deterministic=deterministic, token_chunk=token_chunk, vocab_chunk=vocab_chunk)
    backend = resolve_backend(backend, hidden.device)
    batch = make_token_batch(
        hidden, weight, targets, advantages, old_logprobs, mask, bias=bias,
        ref_logprobs=ref_logprobs, rollout_logprobs=rollout_logprobs, cu_seqlens=cu_seqlens,
        num_items_in_batch=num_items_in_batch, ignore_index=ignore_index, cfg=loss_cfg,
        validate=validate)
    logprobs, entropy = run_head(hidden.reshape(N, -1), weight, bias, batch.head_targets, head_cfg, backend)
    loss, metrics = policy_loss(logprobs, entropy, batch, loss_cfg)
    return PolicyLossOutput(
        loss=loss,
        logprobs=logprobs.detach().view(targets.shape),
        entropy=entropy.detach().view(targets.shape),
        metrics=metrics,
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
