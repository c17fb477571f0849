"""TRL: a ``GRPOTrainer`` whose policy loss fused-pg computes from hidden states.

One line changes::

    from fused_pg.integrations.trl import GRPOTrainer     # instead of: from trl import GRPOTrainer

    trainer = GRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...),
                          fused_pg=dict(repo="decorrelate"))           # or FusedPGOptions(...)

Everything else is TRL's: generation, rewards, advantages, old / reference log-probs, logging,
checkpoints. Only ``GRPOTrainer._compute_loss`` (TRL's loss hook) changes: it calls the model
with a loss request, and the model's forward runs the backbone, then fused-pg's LM-head sweep
(log-probs and entropies without ``B x T x V`` logits) and the policy-loss epilogue, so that
DDP / FSDP wrappers see one ordinary forward call.

What is mapped from ``GRPOConfig`` (with ``repo="none"`` and no controller the loss equals
stock TRL's, see ``tests/test_integration_trl.py``):

* ``loss_type`` -> aggregation and normaliser, per micro-batch of B rows, G = gradient
  accumulation steps (1 in evaluation):
  ``grpo`` seq-mean-token-mean / (B G);  ``bnpo`` token-mean / (valid tokens * G);
  ``dr_grpo`` seq-mean-token-sum-norm / (B G max_completion_length);  ``luspo``
  seq-mean-token-sum / (B G);  ``dapo`` token-mean / (num_items_in_batch / processes
  * G / steps_per_generation). Per-sequence modes count every row, empty ones included, as TRL.
* ``epsilon`` / ``epsilon_high`` -> eps_low / eps_high (or the ADAPO controller's), ``delta``,
  ``importance_sampling_level`` (GSPO; fused-pg's GSPO-token form, identical in value and
  gradient for per-sequence advantages, which is what GRPO produces), ``temperature`` (and the
  model's logit scale / final soft-cap, as TRL's head applies them), ``beta`` with TRL's k3 KL,
  ``use_bias_correction_kl`` (token level), ``entropy_coef`` (TRL averages the bonus over the
  micro-batch's tokens whatever the loss type: its own normaliser), ``off_policy_mask_threshold``
  and vLLM's importance-sampling correction (as per-token weights of the policy term).
* Logged through the trainer: TRL's ``entropy``, ``kl``, ``clip_ratio/*``, ``policy_loss``,
  ``entropy_coef`` keys, plus every fused-pg metric as ``fused_pg/<key>`` (REPO's zeta and
  covariances, ADAPO's clip range, ...).

Refused by name (``ValueError`` at construction): ``loss_type`` cispo / sapo / vespo,
``top_entropy_quantile < 1``, ``use_adaptive_entropy``, ``use_bias_correction_kl`` with
sequence-level importance sampling, the MoE router auxiliary loss, DeepSpeed ZeRO-3,
``final_logit_softcapping`` with ``temperature != 1``; multimodal inputs at the first step.

Numerics that differ from stock TRL, on purpose: fused-pg clamps log-ratios to +-20 before
``exp`` (TRL does not); under bf16 autocast TRL rounds every logit tile to bf16 while fused-pg
accumulates logits in fp32 from bf16 activations and the fp32 master weight (more accurate).

REPO statistics are those of each micro-batch on each rank (pass ``repo="fixed"`` for a
batch-independent correction). An ADAPO controller (``FusedPGOptions.controller``) replaces
``epsilon`` / ``epsilon_high``; it is stepped once per optimiser step with the token-weighted
mean entropy of the whole accumulation window across processes, and saved with every
checkpoint (``fused_pg_controller.json``) and restored on resume.
"""

from __future__ import annotations

import functools
import json
import os
import types
from dataclasses import dataclass

import torch
from torch import Tensor

from ..control import AdaptiveClip
from ..epilogue import METRIC_KEYS
from ..head import fused_logprobs_entropy
from ..loss import PolicyLossOutput, policy_loss_from_logprobs
from ._common import require

trl = require("trl", package="trl", minimum="1.16", extra="trl")
transformers = require("transformers", package="transformers", minimum="5.0", extra="trl")

from accelerate.utils import is_peft_model  # noqa: E402  (trl's dependency)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR  # noqa: E402
from transformers.utils import ModelOutput  # noqa: E402
from trl.trainer.utils import maybe_gather_lm_head_ctx, nanmax, nanmin  # noqa: E402

try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # torch built without distributed support
    _DTensor = None

SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
CONTROLLER_FILE = "fused_pg_controller.json"
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "num_images",
                    "token_type_ids", "mm_token_type_ids", "image_position_ids", "spatial_shapes", "num_tiles")


@dataclass
class FusedPGOptions:
    """fused-pg's own options for :class:`GRPOTrainer` (TRL's come from ``GRPOConfig``).

    repo, repo_coef, repo_center: the REPO advantage correction (see :func:`fused_pg.repo_loss`);
                  ``repo="none"`` reproduces stock TRL's loss.
    controller:   an :class:`fused_pg.AdaptiveClip` (ADAPO): its eps_low / eps_high replace
                  ``epsilon`` / ``epsilon_high``; stepped once per optimiser step, checkpointed.
    backend, precision, deterministic, token_chunk, vocab_chunk, compact_rows, validate: the
                  LM-head sweep's options (see :func:`fused_pg.fused_logprobs_entropy`).
    """

    repo: str = "decorrelate"
    repo_coef: float = 1.0
    repo_center: bool = True
    controller: AdaptiveClip | None = None
    backend: str = "auto"
    precision: str = "native"
    deterministic: bool = False
    token_chunk: int | None = None
    vocab_chunk: int | None = None
    compact_rows: bool | None = None
    validate: bool | None = None

    def __post_init__(self):
        if self.controller is not None and not isinstance(self.controller, AdaptiveClip):
            raise TypeError(f"controller must be a fused_pg.AdaptiveClip, got {type(self.controller).__name__}")


@dataclass
class FusedPGCausalLMOutput(ModelOutput):
    """What the patched forward returns for a loss request (a ``ModelOutput``, so that wrappers
    find the loss): the loss, per-token log-probs / entropies / corrected advantages / ratios
    ([B, C], detached, 0 where masked) and fused-pg's metrics."""

    loss: Tensor | None = None
    log_probs: Tensor | None = None
    entropy: Tensor | None = None
    advantages: Tensor | None = None
    ratio: Tensor | None = None
    metrics: dict | None = None


@dataclass
class _LossRequest:
    """Everything the forward needs besides the model inputs (built by ``_compute_loss``)."""

    completion_ids: Tensor
    mask: Tensor
    head: dict
    loss: dict
    fp32_head: bool
    backbone_attr: str
    off_policy_threshold: float | None = None
    sampling_logprobs: Tensor | None = None


def _logit_scale(text_config) -> float:
    """The logit multiplier TRL's fused head applies (``trl.trainer.utils.add_fused_lm_head``)."""
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        s = text_config.logits_scaling
        scale = s if text_config.model_type == "hyperclovax" else 1 / s
    return 1.0 if scale is None else float(scale)


def _backbone_attr(model) -> str:
    """Where the model keeps its backbone (as TRL's ``add_fused_lm_head`` looks it up)."""
    if model.config.get_text_config() is not model.config and int(transformers.__version__.split(".")[0]) < 5:
        return "model"  # vision-language models before transformers 5
    return "base_model"


def _head_inputs(module, hidden: Tensor, fp32_head: bool):
    """The LM head's weight / bias and the hidden states in the dtype the head runs on."""
    lm_head = module.get_output_embeddings()
    weight, bias = lm_head.weight, lm_head.bias
    if _DTensor is not None and isinstance(weight, _DTensor):  # FSDP2 shards: gather once, like TRL's head
        weight = weight.full_tensor()
        bias = bias.full_tensor() if bias is not None else None
    hidden = hidden.to(weight.device)
    if fp32_head:
        hidden = hidden.float()
    elif torch.is_autocast_enabled(hidden.device.type):
        # the activations in the autocast dtype, as TRL's head; the weight as stored (the fp32
        # master weight under mixed precision): fused-pg accumulates the logits in fp32
        hidden = hidden.to(torch.get_autocast_dtype(hidden.device.type))
    return hidden, weight, bias


def _head_forward(module, head: dict, fp32_head: bool, backbone_attr: str, *args, labels=None,
                  shift_labels=None, num_items_in_batch=None, **kwargs):
    """TRL's ``fused_lm_head=True`` call (old / reference log-probs) on fused-pg's head, so that
    the importance ratio compares log-probs of one and the same head."""
    from trl.trainer.utils import FusedCausalLMOutput

    kwargs["use_cache"] = False
    if kwargs.get("output_router_logits"):
        raise ValueError("the MoE router auxiliary loss is not supported by fused_pg.integrations.trl")
    backbone_out = getattr(module, backbone_attr)(*args, **kwargs)
    if shift_labels is None:
        hidden, labels = backbone_out.last_hidden_state[:, :-1], labels[:, 1:]
    else:
        hidden, labels = backbone_out.last_hidden_state, shift_labels
    hidden, weight, bias = _head_inputs(module, hidden, fp32_head)
    labels = labels.to(hidden.device)
    mask = labels != -100
    with maybe_gather_lm_head_ctx(weight, bias):  # only the labelled rows are swept
        logp, ent = fused_logprobs_entropy(hidden[mask], weight, labels[mask], bias=bias, **head)
    log_probs = logp.new_zeros(mask.shape).masked_scatter(mask, logp)
    entropy = ent.new_zeros(mask.shape).masked_scatter(mask, ent)
    loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
    return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, label_mask=mask)


def _fused_forward(module, request: _LossRequest, *args, **kwargs) -> FusedPGCausalLMOutput:
    """Backbone, fused LM head and policy loss, as one forward of ``module``."""
    kwargs["use_cache"] = False
    backbone_out = getattr(module, request.backbone_attr)(*args, **kwargs)
    C = request.completion_ids.size(1)
    hidden = backbone_out.last_hidden_state[:, -C - 1:-1]  # positions that predict the completion
    hidden, weight, bias = _head_inputs(module, hidden, request.fp32_head)
    mask = request.mask.to(hidden.device)
    targets = torch.where(mask.bool(), request.completion_ids.to(hidden.device), -100)
    with maybe_gather_lm_head_ctx(weight, bias):
        logp, ent = fused_logprobs_entropy(hidden, weight, targets, bias=bias, **request.head)
    loss_kwargs = dict(request.loss)
    if request.off_policy_threshold is not None:
        # DeepSeek-V3.2's off-policy sequence mask, as TRL's get_off_policy_mask: keep a sequence
        # (or token, for per-token advantages) if A >= 0 or its mean KL to the sampler is small
        sampling = request.sampling_logprobs if request.sampling_logprobs is not None else logp.detach()
        kl_div = torch.nan_to_num(sampling - logp.detach(), nan=0.0)
        avg_seq_kl = (kl_div * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1.0)
        adv = loss_kwargs["advantages"]
        adv = adv[:, None] if adv.dim() == 1 else adv
        keep = ((adv >= 0) | (avg_seq_kl <= request.off_policy_threshold)).to(logp.dtype).expand_as(mask)
        weights = loss_kwargs.get("weights")
        loss_kwargs["weights"] = keep if weights is None else weights * keep
    out: PolicyLossOutput = policy_loss_from_logprobs(logp, old_logprobs=loss_kwargs.pop("old_logprobs"),
                                                      mask=mask, entropy=ent, **loss_kwargs)
    return FusedPGCausalLMOutput(loss=out.loss, log_probs=out.logprobs, entropy=out.entropy,
                                 advantages=out.advantages, ratio=out.ratio, metrics=out.metrics)


def _check_config(args) -> None:
    """Refuse, by name, the ``GRPOConfig`` options fused-pg cannot reproduce."""
    if args.loss_type not in SUPPORTED_LOSS_TYPES:
        raise ValueError(f"GRPOConfig.loss_type={args.loss_type!r} is not a clipped-ratio loss fused-pg "
                         f"expresses; use one of {SUPPORTED_LOSS_TYPES}")
    if args.top_entropy_quantile < 1.0:
        raise ValueError(f"GRPOConfig.top_entropy_quantile={args.top_entropy_quantile} is not supported "
                         "(its mask also restricts TRL's entropy bonus); leave it at 1.0")
    if args.use_adaptive_entropy:
        raise ValueError("GRPOConfig.use_adaptive_entropy=True is not supported; fused-pg's entropy "
                         "control is FusedPGOptions.controller (ADAPO)")
    if args.beta != 0.0 and args.use_bias_correction_kl and args.importance_sampling_level == "sequence":
        raise ValueError("GRPOConfig.use_bias_correction_kl=True with importance_sampling_level='sequence' "
                         "is not supported (TRL weights the KL by the sequence ratio through every token); "
                         "set use_bias_correction_kl=False or use token-level importance sampling")


class GRPOTrainer(trl.GRPOTrainer):
    """``trl.GRPOTrainer`` with the policy loss computed by fused-pg (see the module docstring).

    Args:
        *args, **kwargs: those of ``trl.GRPOTrainer``.
        fused_pg:        :class:`FusedPGOptions` or a dict of its fields (default: REPO
                         "decorrelate", no controller).
    """

    def __init__(self, *args, fused_pg: FusedPGOptions | dict | None = None, **kwargs):
        if fused_pg is None:
            fused_pg = FusedPGOptions()
        elif isinstance(fused_pg, dict):
            fused_pg = FusedPGOptions(**fused_pg)
        elif not isinstance(fused_pg, FusedPGOptions):
            raise TypeError(f"fused_pg must be a FusedPGOptions or a dict, got {type(fused_pg).__name__}")
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if config is not None:
            _check_config(config)  # fail fast, before TRL loads models and datasets
        super().__init__(*args, **kwargs)
        _check_config(self.args)
        self.fused_pg = fused_pg
        self._fused_pg_checked_inputs = False
        self._fused_pg_adv_per_row = True
        self._fused_pg_head = self._check_model()
        self._patch_forward()

    # ---- construction ---------------------------------------------------------------------------

    def _check_model(self) -> dict:
        """Refuse, by name, what fused-pg cannot reproduce for this model; return the head's options."""
        if self.aux_loss_enabled:
            raise ValueError("the MoE router auxiliary loss (router_aux_loss_coef != 0) is not supported")
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            raise ValueError("DeepSpeed ZeRO-3 is not supported (the fused head reads the partitioned lm_head "
                             "weight in its backward); use ZeRO-1/2 or FSDP")
        target = self._fused_pg_target()
        text_config = target.config.get_text_config()
        softcap = getattr(text_config, "final_logit_softcapping", None)
        scale = _logit_scale(text_config)
        if scale <= 0:
            raise ValueError(f"the model's logit scale must be > 0 for fused-pg, got {scale}")
        if softcap is not None and self.temperature != 1.0:
            raise ValueError(f"final_logit_softcapping={softcap} with GRPOConfig.temperature={self.temperature}: "
                             "TRL soft-caps before dividing by the temperature, fused-pg after; "
                             "only temperature=1.0 gives the same logits")
        o = self.fused_pg
        # TRL: z = softcap(scale * x) / T. fused-pg: z = softcap(x / tau): tau = T / scale without a
        # soft-cap, tau = 1 / scale with one (T = 1 then)
        return dict(temperature=self.temperature / scale, softcap=softcap, backend=o.backend,
                    precision=o.precision, deterministic=o.deterministic, token_chunk=o.token_chunk,
                    vocab_chunk=o.vocab_chunk, compact_rows=o.compact_rows)

    def _fused_pg_target(self):
        return self.model.get_base_model() if is_peft_model(self.model) else self.model

    def _patch_forward(self) -> None:
        """Wrap the forward TRL patched, on the policy and on the reference model: a
        ``fused_pg_loss=`` request runs the fused loss; TRL's ``fused_lm_head=True`` log-prob
        passes (old and reference log-probs) run on fused-pg's head too, so that the importance
        ratio and the KL compare log-probs of one head; any other call (generation) goes to the
        previous forward."""
        fp32_head = bool(self.args.cast_lm_head_to_fp32)
        targets = [self._fused_pg_target()]
        if self.ref_model is not None:
            targets.append(self.accelerator.unwrap_model(self.ref_model))
        for target in targets:
            previous, backbone_attr = target.forward, _backbone_attr(target)

            def forward(module, *args, fused_pg_loss: _LossRequest | None = None, fused_lm_head: bool = False,
                        _previous=previous, _backbone=backbone_attr, **kwargs):
                if fused_pg_loss is not None:
                    return _fused_forward(module, fused_pg_loss, *args, **kwargs)
                if fused_lm_head:
                    return _head_forward(module, self._fused_pg_head, fp32_head, _backbone, *args, **kwargs)
                return _previous(*args, **kwargs)

            target.forward = types.MethodType(functools.wraps(type(target).forward)(forward), target)
        self._fused_pg_backbone_attr = _backbone_attr(targets[0])

    # ---- the loss hook ----------------------------------------------------------------------------

    def _normaliser(self, loss_type: str, B: int, mask: Tensor, inputs: dict, accumulation: float):
        """Aggregation and its global normaliser, as TRL's ``_compute_loss`` divides."""
        if loss_type == "grpo":
            return dict(aggregation="seq-mean-token-mean", num_items_in_batch=float(B * accumulation))
        if loss_type == "bnpo":
            return dict(aggregation="token-mean", num_items_in_batch=mask.sum().clamp(min=1.0) * accumulation)
        if loss_type == "dr_grpo":
            return dict(aggregation="seq-mean-token-sum-norm", num_items_in_batch=float(B * accumulation),
                        max_length=self.max_completion_length)
        if loss_type == "luspo":
            return dict(aggregation="seq-mean-token-sum", num_items_in_batch=float(B * accumulation))
        # dapo: num_items_in_batch spans the generation batch on all processes
        normaliser = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if self.model.training:
            normaliser = normaliser * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        return dict(aggregation="token-mean", num_items_in_batch=normaliser)

    def _compute_loss(self, model, inputs):
        if not self._fused_pg_checked_inputs:
            present = [k for k in _MULTIMODAL_KEYS if inputs.get(k) is not None]
            if present:
                raise ValueError(f"multimodal inputs ({', '.join(present)}) are not supported by "
                                 "fused_pg.integrations.trl")
            self._fused_pg_checked_inputs = True
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        B = completion_ids.size(0)
        o = self.fused_pg
        ctrl = o.controller
        eps_low, eps_high = (ctrl.eps_low, ctrl.eps_high) if ctrl is not None else (self.epsilon_low,
                                                                                     self.epsilon_high)
        advantages = inputs["advantages"]
        self._fused_pg_adv_per_row = advantages.dim() == 1
        loss = dict(
            advantages=advantages, old_logprobs=inputs.get("old_per_token_logps"),
            eps_low=eps_low, eps_high=eps_high, dual_clip=None, delta=self.args.delta,
            importance_level=self.importance_sampling_level, repo=o.repo, repo_coef=o.repo_coef,
            repo_center=o.repo_center, validate=o.validate,
            **self._normaliser(self.loss_type, B, mask, inputs, accumulation))
        if self.beta != 0.0:
            loss.update(ref_logprobs=inputs["ref_per_token_logps"], kl_coef=self.beta, kl_estimator="k3",
                        kl_clamp=None, kl_ratio_weight=bool(self.args.use_bias_correction_kl))
        if self._entropy_bonus_enabled:
            # TRL's bonus: the micro-batch's mean token entropy, scaled for accumulation only
            loss.update(entropy_coef=self.entropy_coef, entropy_aggregation="token-mean",
                        entropy_num_items_in_batch=mask.sum().clamp(min=1.0) * accumulation)
        if self.use_vllm and self.vllm_importance_sampling_correction:
            # TRL's truncated / masked IS ratio against vLLM's log-probs, (B, T) or (B, 1)
            loss["weights"] = inputs["importance_sampling_ratio"].expand_as(mask)
        request = _LossRequest(
            completion_ids=completion_ids, mask=mask, head=self._fused_pg_head, loss=loss,
            fp32_head=bool(self.args.cast_lm_head_to_fp32), backbone_attr=self._fused_pg_backbone_attr)
        if self.off_policy_mask_threshold is not None:
            old = inputs.get("old_per_token_logps")
            request.off_policy_threshold = self.off_policy_mask_threshold
            # TRL: vLLM's sampling log-probs, else the old ones, else (on-policy) the current ones
            request.sampling_logprobs = inputs.get("sampling_per_token_logps", old)

        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        with self.accelerator.autocast():
            out = model(input_ids=input_ids, attention_mask=attention_mask, fused_pg_loss=request)
        self._fused_pg_log(mode, out, mask, eps_low, eps_high, accumulation)
        if ctrl is not None and mode == "train":
            self._fused_pg_step_controller(out.entropy, mask)
        return out.loss

    # ---- logging and the controller -----------------------------------------------------------------

    def _fused_pg_log(self, mode: str, out: FusedPGCausalLMOutput, mask: Tensor, eps_low: float,
                      eps_high: float, accumulation: float) -> None:
        """TRL's metric keys (same definitions) and every fused-pg metric as ``fused_pg/<key>``."""
        metrics = self._metrics[mode]
        m = mask.to(torch.float32)
        # TRL's sequence-level ratio is (B, 1): one clip decision per row, every row counted
        seq_level = self.importance_sampling_level == "sequence" and self._fused_pg_adv_per_row

        def global_masked_mean(x: Tensor, per_row: bool = False) -> float:
            if per_row:  # TRL's (B, 1) tensors: one value per row, every row counted
                local = torch.stack([x.sum(), torch.tensor(float(x.shape[0]), device=x.device)])
            else:
                local = torch.stack([(x * m).sum(), m.sum()])
            totals = self.accelerator.reduce(local, reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        n_tok = out.metrics["n_tokens"]
        if self.beta != 0.0:
            totals = self.accelerator.reduce(torch.stack([out.metrics["kl_mean"] * n_tok, n_tok]).float(),
                                             reduction="sum")
            metrics["kl"].append((totals[0] / totals[1].clamp(min=1.0)).item())
        metrics["entropy"].append(global_masked_mean(out.entropy))

        r = out.ratio if self.args.delta is None else out.ratio.clamp(max=self.args.delta)
        adv = out.advantages
        low = ((r < 1 - eps_low) & (adv < 0) & mask.bool()).float()
        high = ((r > 1 + eps_high) & (adv > 0) & mask.bool()).float()
        if seq_level:  # one decision per row (rows without tokens are not clipped, as in TRL)
            low, high = low.amax(1), high.amax(1)
            region = torch.maximum(low, high)
            seq_low, seq_high = low, high
        else:
            region = torch.maximum(low, high)
            seq_low = (low * m).sum(-1) / m.sum(-1)
            seq_high = (high * m).sum(-1) / m.sum(-1)
        metrics["clip_ratio/low_mean"].append(global_masked_mean(low, seq_level))
        metrics["clip_ratio/high_mean"].append(global_masked_mean(high, seq_level))
        metrics["clip_ratio/region_mean"].append(global_masked_mean(region, seq_level))
        metrics["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(seq_low)).item())
        metrics["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(seq_high)).item())

        if self._entropy_bonus_enabled:
            policy = out.metrics["pg_loss"] + self.beta * out.metrics["kl_loss"]
            if self.loss_type != "dapo":  # TRL logs these before dividing by the accumulation steps
                policy = policy * accumulation
            metrics["policy_loss"].append(self.accelerator.gather(policy.detach()).nanmean().item())
            if mode == "train" and self.accelerator.sync_gradients:
                metrics["entropy_coef"].append(self.entropy_coef)

        values = torch.stack([torch.as_tensor(out.metrics[k], dtype=torch.float32, device=n_tok.device)
                              for k in METRIC_KEYS])
        gathered = self.accelerator.gather(values[None]).nanmean(0).tolist()
        for k, v in zip(METRIC_KEYS, gathered):
            metrics[f"fused_pg/{k}"].append(v)

    def _fused_pg_step_controller(self, entropy: Tensor, mask: Tensor) -> None:
        """Observe the micro-batch's entropy; at the optimiser-step boundary step the ADAPO
        controller from the whole window of every process (as TRL steps its adaptive entropy
        coefficient)."""
        counted = mask.bool()
        n_tokens = counted.sum().to(torch.float64)
        entropy_mean = torch.where(counted, entropy.to(torch.float64), 0.0).sum() / n_tokens.clamp_min(1.0)
        controller = self.fused_pg.controller
        controller.observe(entropy_mean.detach(), n_tokens)
        if self.accelerator.sync_gradients:
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            controller.update(process_group=torch.distributed.group.WORLD if distributed else None)

    # ---- checkpoints ----------------------------------------------------------------------------------

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.fused_pg.controller is not None and self.args.should_save:
            folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            path = os.path.join(self._get_output_dir(trial=trial), folder, CONTROLLER_FILE)
            with open(path, "w") as f:
                json.dump(self.fused_pg.controller.state_dict(), f)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if self.fused_pg.controller is not None and checkpoint is not None:
            path = os.path.join(checkpoint, CONTROLLER_FILE)
            if os.path.exists(path):
                with open(path) as f:
                    self.fused_pg.controller.load_state_dict(json.load(f))


__all__ = ["GRPOTrainer", "FusedPGOptions", "FusedPGCausalLMOutput", "SUPPORTED_LOSS_TYPES"]
