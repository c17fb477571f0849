"""TRL: a ``GRPOTrainer`` whose policy loss fused-pg computes from hidden states.

One line changes::

    from fused_pg.integrations.trl import GRPOTrainer     # instead of: from trl import GRPOTrainer

With TRL's own ``GRPOConfig`` that is stock TRL (the same losses, metrics and checkpoints; REPO
off, no controller): only the loss runs fused-pg's LM-head sweep (log-probs and entropies
without ``B x T x V`` logits). fused-pg's options are fields of
:class:`fused_pg.integrations.trl.GRPOConfig`, TRL's ``GRPOConfig`` plus (usable from Python, a
YAML file and the command line, ``python -m fused_pg.integrations.trl grpo --config ...``, which
is TRL's ``trl grpo`` with this trainer):

* ``repo``, ``repo_coef``, ``repo_center``: the :class:`fused_pg.LossConfig` fields of the same
  names (REPO; ``repo`` defaults to "none" here: stock TRL; "relative" is REPO-R, centre
  "batch" / "state" / "none": fused-pg's head gives the per-state centre's entropies).
* ``backend``, ``precision``, ``deterministic``, ``token_chunk``, ``vocab_chunk``,
  ``compact_rows``: the :class:`fused_pg.HeadConfig` fields of the same names; ``validate``.
* ``adapo_target_entropy`` (an ADAPO controller, :class:`fused_pg.AdaptiveClip`, whose clip range
  replaces ``epsilon`` / ``epsilon_high``, starting from them), ``adapo_rate``, ``adapo_bounds``,
  ``adapo_smoothing``, ``adapo_adapt_low``, ``adapo_low_ratio``, ``adapo_low_bounds``: its
  arguments; or ``repo_control_target_entropy`` (a REPO controller,
  :class:`fused_pg.AdaptiveRepoCoef`, starting at ``repo_coef``) with ``repo_control_mode``,
  ``repo_control_factor``, ``repo_control_rate``, ``repo_control_bounds``,
  ``repo_control_smoothing``; ``controller_fresh_start``.

Each field's help text is the library's documentation of the option. Every option, fused-pg's
and the ``GRPOConfig`` values fused-pg reads, is checked when the config and the trainer are
built, naming the ``GRPOConfig`` field. The loss options are one :class:`fused_pg.LossConfig`
and one :class:`fused_pg.HeadConfig`, built at construction (again only if a trainer attribute
they come from changes).

Everything else is TRL's: generation, rewards, advantages, old / reference log-probs, logging,
checkpoints. Only ``GRPOTrainer._compute_loss`` (TRL's loss hook) changes: it calls the model
with a loss request, and the model's forward runs the backbone, then fused-pg's LM-head sweep
and the policy-loss epilogue, so that DDP / FSDP wrappers see one ordinary forward call. The
trainer checks at construction that TRL still has every internal it relies on (``_compute_loss``
called from ``compute_loss``, the checkpoint hooks, the fused log-prob pass, the attributes it
reads) and raises naming the internal and TRL's version otherwise; and after every optimiser
step that the loss hook ran (a TRL that stopped calling it raises instead of training with its
stock loss).

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
``exp`` (TRL does not). Under bf16 autocast TRL's default head rounds every logit tile to bf16,
while fused-pg accumulates the logits in fp32 from the bf16 activations and the fp32 master
weight. At the level of training the two are about equally far from fp32: on the tiny Qwen2 of
``tests/test_integration_trl.py`` (``pytest -s`` prints it), fused-pg's first-step gradient was
0.89-0.97x as far from an fp32 run's as stock TRL's over the six loss-type / ratio-level
configurations (measured on a 2-core Intel Xeon CPU, torch 2.13.0); the bf16 backbone's own
rounding dominates both.

REPO statistics are those of the whole optimiser step: every micro-batch of the gradient
accumulation window (TRL's generation buffer holds them all) on every process, from a no-grad
pass of the current policy (log-probs, and entropies for the per-state centre) at the step's
first micro-batch -- one extra forward per optimiser step, only for the modes that use batch
statistics ("fixed" and "relative" with the "state" or "none" centre use none). The gradient
therefore does not depend on how a step is split into micro-batches or processes (for the loss
types whose own normalisers do not: all but "bnpo"). A controller is
stepped once per optimiser step with the token-weighted mean of the exact token entropies
(fused-pg's head computes them) over the whole accumulation window across processes, saved
with every checkpoint (``fused_pg_controller.json`` in the checkpoint folder) and restored on
resume; resuming from a checkpoint without that file (e.g. one written by stock TRL) raises
unless ``controller_fresh_start=True``.

Tested with trl 1.16.0 and transformers 5.25.0 (the drop-in refuses other trl minor versions).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import types
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..config import HeadConfig, LossConfig
from ..control import EntropyController
from ..epilogue import METRIC_KEYS
from ..head import fused_logprobs_entropy
from ..loss import PolicyLossOutput, policy_loss_from_logprobs
from ._common import (CONTROLLER_FILE, Options, TrainerChanged, behaviour_repo_stats, check_internal, check_uses,
                      distributed_group, load_controller, needs_batch_stats, option_keys, require, resolve_options,
                      save_controller, trainer_version)

trl = require("trl", package="trl", minimum="1.16", below="1.17", extra="trl")
transformers = require("transformers", package="transformers", minimum="5.0", below="6", extra="trl")

from accelerate.utils import is_peft_model  # noqa: E402  (trl's dependency)
from transformers import TrainerCallback  # noqa: E402
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR  # noqa: E402
from transformers.utils import ModelOutput  # noqa: E402

import trl.trainer.utils as _trl_utils  # noqa: E402

for _name in ("maybe_gather_lm_head_ctx", "nanmax", "nanmin", "FusedCausalLMOutput"):
    if not hasattr(_trl_utils, _name):
        raise TrainerChanged(f"trl {trainer_version('trl')} has no trl.trainer.utils.{_name}, which the fused-pg "
                             "drop-in relies on: this version of TRL is not supported")
maybe_gather_lm_head_ctx, nanmax, nanmin = _trl_utils.maybe_gather_lm_head_ctx, _trl_utils.nanmax, _trl_utils.nanmin

try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # torch built without distributed support
    _DTensor = None

SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "num_images",
                    "token_type_ids", "mm_token_type_ids", "image_position_ids", "spatial_shapes", "num_tiles")
LOSS_OPTIONS = ("repo", "repo_coef", "repo_center")
HEAD_OPTIONS = ("backend", "precision", "deterministic", "token_chunk", "vocab_chunk", "compact_rows")
OPTION_KEYS = option_keys(LOSS_OPTIONS)
_ADAPO_DOCS = {
    "target_entropy": "the ADAPO controller's target mean token entropy (nats); set it to adapt the clip range "
                      "(epsilon / epsilon_high are its starting point); None: no controller",
    "rate": "the controller's step per nat of entropy error (fused_pg.AdaptiveClip's rate)",
    "bounds": "the (low, high) bounds of eps_high (fused_pg.AdaptiveClip's bounds)",
    "smoothing": "exponential moving average of the measured entropy, in [0, 1) (fused_pg.AdaptiveClip)",
    "adapt_low": "move eps_low the opposite way too (fused_pg.AdaptiveClip's adapt_low)",
    "low_ratio": "eps_low's step relative to eps_high's (fused_pg.AdaptiveClip's low_ratio)",
    "low_bounds": "the (low, high) bounds of eps_low (fused_pg.AdaptiveClip's low_bounds)",
}


def _library_field(cls, name: str, default=dataclasses.MISSING, note: str = ""):
    """A config field documented by the library field of the same name (its one documentation)."""
    library = cls.__dataclass_fields__[name]
    value = library.default if default is dataclasses.MISSING else default
    return field(default=value, metadata={"help": f"fused-pg: {library.metadata['doc']}{note}"})


def _adapo_field(name: str):
    return field(default=None, metadata={"help": f"fused-pg ADAPO: {_ADAPO_DOCS[name]}"})


_REPO_CONTROL_DOCS = {
    "target_entropy": "the REPO controller's target mean token entropy (nats); set it to adapt repo_coef (its "
                      "starting point); None: no controller",
    "mode": '"additive" or "multiplicative" (REPO-R\'s law for repo="relative"; fused_pg.AdaptiveRepoCoef\'s mode)',
    "factor": "the multiplicative law's factor (fused_pg.AdaptiveRepoCoef's factor)",
    "rate": "the additive law's step per nat of entropy error (fused_pg.AdaptiveRepoCoef's rate)",
    "bounds": "bounds of repo_coef (additive) or of |repo_coef| (multiplicative; fused_pg.AdaptiveRepoCoef)",
    "smoothing": "exponential moving average of the measured entropy, in [0, 1) (fused_pg.AdaptiveRepoCoef)",
}


def _repo_control_field(name: str):
    return field(default=None, metadata={"help": f"fused-pg REPO controller: {_REPO_CONTROL_DOCS[name]}"})


@dataclass
class GRPOConfig(trl.GRPOConfig):
    """TRL's ``GRPOConfig`` plus fused-pg's options (see the module docstring); each field is the
    :class:`fused_pg.LossConfig` / :class:`fused_pg.HeadConfig` field of the same name, or an
    argument of the ADAPO controller. Checked when built, naming the field."""

    repo: str = _library_field(LossConfig, "repo", "none", " (default here: 'none', stock TRL)")
    repo_coef: float = _library_field(LossConfig, "repo_coef")
    repo_center: str = _library_field(LossConfig, "repo_center")
    backend: str = _library_field(HeadConfig, "backend")
    precision: str = _library_field(HeadConfig, "precision")
    deterministic: bool = _library_field(HeadConfig, "deterministic")
    token_chunk: int | None = _library_field(HeadConfig, "token_chunk")
    vocab_chunk: int | None = _library_field(HeadConfig, "vocab_chunk")
    compact_rows: bool | None = _library_field(HeadConfig, "compact_rows")
    validate: bool | None = field(default=None, metadata={
        "help": "fused-pg: value checks (NaN/Inf, ids, log-probs <= 0) that synchronise a GPU; None: on CPU only"})
    adapo_target_entropy: float | None = _adapo_field("target_entropy")
    adapo_rate: float | None = _adapo_field("rate")
    adapo_bounds: list[float] | None = _adapo_field("bounds")
    adapo_smoothing: float | None = _adapo_field("smoothing")
    adapo_adapt_low: bool | None = _adapo_field("adapt_low")
    adapo_low_ratio: float | None = _adapo_field("low_ratio")
    adapo_low_bounds: list[float] | None = _adapo_field("low_bounds")
    repo_control_target_entropy: float | None = _repo_control_field("target_entropy")
    repo_control_mode: str | None = _repo_control_field("mode")
    repo_control_factor: float | None = _repo_control_field("factor")
    repo_control_rate: float | None = _repo_control_field("rate")
    repo_control_bounds: list[float] | None = _repo_control_field("bounds")
    repo_control_smoothing: float | None = _repo_control_field("smoothing")
    controller_fresh_start: bool = field(default=False, metadata={
        "help": "fused-pg: resume from a checkpoint without the controller's state, restarting the controller "
                "(by default such a resume raises)"})

    def __post_init__(self):
        super().__post_init__()
        _check_config(self)
        _options(self)


def _options(args) -> tuple[Options, HeadConfig]:
    """fused-pg's options of a ``GRPOConfig``: this module's subclass's fields, checked (naming
    them), or the stock defaults for TRL's own class (REPO off, no controller)."""
    if not isinstance(args, GRPOConfig):
        return resolve_options({"repo": "none"}, OPTION_KEYS, str), HeadConfig()
    values = {k: getattr(args, k) for k in OPTION_KEYS}
    options = resolve_options(values, OPTION_KEYS, lambda k: f"GRPOConfig.{k}")
    try:
        head = HeadConfig(**{k: getattr(args, k) for k in HEAD_OPTIONS})
    except (TypeError, ValueError) as e:
        bad = next((k for k in HEAD_OPTIONS if k in str(e)), HEAD_OPTIONS[0])
        raise type(e)(f"GRPOConfig.{bad}: {e}") from e
    return options, head


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
    """Everything the forward needs besides the model inputs (built by ``_compute_loss``): the
    configs (built once) and this micro-batch's tensors and normalisers."""

    completion_ids: Tensor
    mask: Tensor
    head: HeadConfig
    config: LossConfig
    data: dict
    validate: bool | None
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


def _head_forward(module, head: HeadConfig, fp32_head: bool, backbone_attr: str, *args, labels=None,
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
        logp, ent = fused_logprobs_entropy(hidden[mask], weight, labels[mask], bias=bias, head=head)
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
        logp, ent = fused_logprobs_entropy(hidden, weight, targets, bias=bias, head=request.head)
    loss_kwargs = dict(request.data)
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
                                                      mask=mask, entropy=ent, config=request.config,
                                                      validate=request.validate, **loss_kwargs)
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
                         "control is ADAPO (fused_pg.integrations.trl.GRPOConfig.adapo_target_entropy)")
    if args.beta != 0.0 and args.use_bias_correction_kl and args.importance_sampling_level == "sequence":
        raise ValueError("GRPOConfig.use_bias_correction_kl=True with importance_sampling_level='sequence' "
                         "is not supported (TRL weights the KL by the sequence ratio through every token); "
                         "set use_bias_correction_kl=False or use token-level importance sampling")
    _loss_config(args.loss_type, args.epsilon, args.epsilon_high if args.epsilon_high is not None else args.epsilon,
                 args.delta, args.importance_sampling_level, args.beta, args.use_bias_correction_kl,
                 args.entropy_coef, args.max_completion_length, LossConfig(repo="none"))


# GRPOConfig field -> the LossConfig field it sets (named in errors)
_TRL_NAMES = {"eps_low": "epsilon", "eps_high": "epsilon_high", "delta": "delta", "kl_coef": "beta",
              "entropy_coef": "entropy_coef", "max_length": "max_completion_length",
              "importance_level": "importance_sampling_level"}
_AGGREGATION = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm",
                "luspo": "seq-mean-token-sum", "dapo": "token-mean"}


def _loss_config(loss_type, eps_low, eps_high, delta, importance_level, beta, bias_corrected_kl, entropy_coef,
                 max_completion_length, base: LossConfig) -> LossConfig:
    """TRL's loss options as one LossConfig on top of ``base`` (fused-pg's REPO options); an error
    names the GRPOConfig field."""
    values = dict(eps_low=eps_low, eps_high=eps_high, dual_clip=None, delta=delta, importance_level=importance_level,
                  aggregation=_AGGREGATION[loss_type], kl_coef=beta, kl_estimator="k3", kl_clamp=None,
                  kl_ratio_weight=bool(bias_corrected_kl) and beta != 0.0)
    if loss_type == "dr_grpo":
        values["max_length"] = max_completion_length
    if entropy_coef:
        # TRL's bonus: the micro-batch's mean token entropy (its own normaliser, given per call)
        values.update(entropy_coef=entropy_coef, entropy_aggregation="token-mean")
    try:
        return dataclasses.replace(base, **values)
    except (TypeError, ValueError) as e:
        bad = next((k for k in sorted(_TRL_NAMES, key=len, reverse=True) if k in str(e)), "epsilon")
        raise type(e)(f"GRPOConfig.{_TRL_NAMES.get(bad, bad)}: {e} (fused-pg's {bad})") from e


_TRAINER_ATTRIBUTES = ("loss_type", "epsilon_low", "epsilon_high", "importance_sampling_level", "beta",
                       "temperature", "entropy_coef", "_entropy_bonus_enabled", "off_policy_mask_threshold",
                       "use_vllm", "vllm_importance_sampling_correction", "max_completion_length", "aux_loss_enabled",
                       "ref_model", "accelerator", "_metrics", "_step", "_buffered_inputs")


def check_trl() -> None:
    """Check that TRL still has every internal the drop-in relies on; raise TrainerChanged naming
    it and TRL's version otherwise."""
    where = "trl.GRPOTrainer"
    stock = trl.GRPOTrainer
    compute_loss = check_internal(stock, "compute_loss", ("model", "inputs"), package="trl", where=where)
    check_internal(stock, "_compute_loss", ("model", "inputs"), package="trl", where=where)
    check_uses(compute_loss, "self._compute_loss(", package="trl", where=f"{where}.compute_loss")
    logps = check_internal(stock, "_get_per_token_logps_and_entropies", ("model", "input_ids"), package="trl",
                           where=where)
    check_uses(logps, "fused_lm_head=True", package="trl", where=f"{where}._get_per_token_logps_and_entropies")
    prepare = check_internal(stock, "_prepare_inputs", ("generation_batch",), package="trl", where=where)
    check_uses(prepare, "self._buffered_inputs[self._step % self.args.steps_per_generation]", package="trl",
               where=f"{where}._prepare_inputs")
    check_internal(stock, "_save_checkpoint", ("model", "trial"), package="trl", where=where)
    check_internal(stock, "_load_optimizer_and_scheduler", ("checkpoint",), package="trl", where=where)


class _LossHookGuard(TrainerCallback):
    """After every optimiser step: the fused loss ran in it (a TRL that stopped calling
    ``_compute_loss`` would otherwise train with its stock loss, silently)."""

    def __init__(self, trainer: "GRPOTrainer"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer._fused_pg_calls == 0:
            raise TrainerChanged(f"trl {trainer_version('trl')} ran an optimiser step without calling "
                                 "GRPOTrainer._compute_loss, fused-pg's loss hook: this version of TRL is not "
                                 "supported")
        self.trainer._fused_pg_calls = 0


class GRPOTrainer(trl.GRPOTrainer):
    """``trl.GRPOTrainer`` with the policy loss computed by fused-pg (see the module docstring).

    Takes the arguments of ``trl.GRPOTrainer``; fused-pg's options are the fields of
    :class:`GRPOConfig` (with TRL's own ``GRPOConfig``: stock TRL).
    """

    def __init__(self, *args, **kwargs):
        check_trl()
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if config is not None:  # fail fast, before TRL loads models and datasets
            _check_config(config)
            _options(config)
        super().__init__(*args, **kwargs)
        _check_config(self.args)
        missing = [a for a in _TRAINER_ATTRIBUTES if not hasattr(self, a)]
        if missing:
            raise TrainerChanged(f"trl {trainer_version('trl')}: GRPOTrainer no longer sets {missing}, which the "
                                 "fused-pg drop-in reads: this version of TRL is not supported")
        self._fused_pg_options, head = _options(self.args)
        self._fused_pg_controller = self._fused_pg_options.controller(self.epsilon_low, self.epsilon_high)
        self._fused_pg_configs: dict = {}
        self._fused_pg_config()  # built (and checked) now
        self._fused_pg_checked_inputs = False
        self._fused_pg_adv_per_row = True
        self._fused_pg_calls = 0
        self._fused_pg_window: tuple = (None, None, None)  # (generation buffer, first slice, RepoStats)
        if needs_batch_stats(self._fused_pg_config()) and self.args.steps_per_generation % \
                self.args.gradient_accumulation_steps:
            raise ValueError(f"GRPOConfig.steps_per_generation={self.args.steps_per_generation} is not a multiple of "
                             f"gradient_accumulation_steps={self.args.gradient_accumulation_steps}: an optimiser step "
                             "would span two generation batches, and REPO's statistics of the whole step cannot be "
                             "had before its first micro-batch")
        self._fused_pg_head = self._check_model(head)
        self._patch_forward()
        self.add_callback(_LossHookGuard(self))

    @property
    def fused_pg_controller(self) -> EntropyController | None:
        """The controller: ADAPO (``adapo_target_entropy``), REPO's (``repo_control_target_entropy``) or None."""
        return self._fused_pg_controller

    # ---- construction ---------------------------------------------------------------------------

    def _check_model(self, head: HeadConfig) -> HeadConfig:
        """Refuse, by name, what fused-pg cannot reproduce for this model; return the head's config."""
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
        # TRL: z = softcap(scale * x) / T. fused-pg: z = softcap(x / tau): tau = T / scale without a
        # soft-cap, tau = 1 / scale with one (T = 1 then)
        return dataclasses.replace(head, temperature=self.temperature / scale, softcap=softcap)

    def _fused_pg_config(self) -> LossConfig:
        """The LossConfig of TRL's options as this trainer holds them, built once (and again only
        if one of those attributes changes)."""
        key = (self.loss_type, self.epsilon_low, self.epsilon_high, self.args.delta, self.importance_sampling_level,
               self.beta, bool(self.args.use_bias_correction_kl),
               self.entropy_coef if self._entropy_bonus_enabled else 0.0, self.max_completion_length)
        cfg = self._fused_pg_configs.get(key)
        if cfg is None:
            cfg = _loss_config(*key, base=self._fused_pg_options.loss)
            self._fused_pg_configs = {key: cfg}
        return cfg

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
        """The global normaliser TRL's ``_compute_loss`` divides by, for this micro-batch."""
        if loss_type in ("grpo", "dr_grpo", "luspo"):
            return float(B * accumulation)
        if loss_type == "bnpo":
            return mask.sum().clamp(min=1.0) * accumulation
        # dapo: num_items_in_batch spans the generation batch on all processes
        normaliser = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if self.model.training:
            normaliser = normaliser * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        return normaliser

    def _fused_pg_repo_stats(self, inputs: dict, config: LossConfig):
        """REPO statistics of the whole optimiser step: every micro-batch of the accumulation window
        (the slices of TRL's generation buffer) on every process, from a no-grad pass of the current
        policy (log-probs, and entropies for the per-state centre) at the window's first
        micro-batch. None where REPO uses no batch statistics, and in evaluation (its own batch)."""
        if not needs_batch_stats(config) or not self.model.training:
            return None
        buffered = self._buffered_inputs
        index = self._step % self.args.steps_per_generation
        if buffered is None or buffered[index] is not inputs:
            raise TrainerChanged(f"trl {trainer_version('trl')}: the micro-batch is not GRPOTrainer._buffered_inputs"
                                 "[_step % steps_per_generation], from which fused-pg takes the optimiser step's "
                                 "micro-batches: this version of TRL is not supported")
        start = index - index % self.args.gradient_accumulation_steps
        cached_buffer, cached_start, stats = self._fused_pg_window
        if cached_buffer is not buffered or cached_start != start:
            state = config.repo_center == "state"
            parts = []
            with torch.no_grad(), self.accelerator.autocast():
                for batch in buffered[start:start + self.args.gradient_accumulation_steps]:
                    completion_ids = batch["completion_ids"]
                    logps, entropies, _ = self._get_per_token_logps_and_entropies(
                        self.model, torch.cat([batch["prompt_ids"], completion_ids], dim=1),
                        torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1), completion_ids.size(1),
                        compute_entropy=state)
                    mask = batch["completion_mask"] if "tool_mask" not in batch else \
                        batch["completion_mask"] * batch["tool_mask"]
                    parts.append((logps, batch["advantages"], mask, entropies if state else None))
            stats = behaviour_repo_stats(parts, distributed_group(None))
            self._fused_pg_window = (buffered, start, stats)
        return stats

    def _compute_loss(self, model, inputs):
        self._fused_pg_calls += 1
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
        ctrl = self._fused_pg_controller
        config = self._fused_pg_config()
        if ctrl is not None:
            config = ctrl.apply(config)
        advantages = inputs["advantages"]
        self._fused_pg_adv_per_row = advantages.dim() == 1
        data = dict(advantages=advantages, old_logprobs=inputs.get("old_per_token_logps"),
                    num_items_in_batch=self._normaliser(self.loss_type, B, mask, inputs, accumulation))
        repo_stats = self._fused_pg_repo_stats(inputs, config)
        if repo_stats is not None:
            data["repo_stats"] = repo_stats
        if self.beta != 0.0:
            data["ref_logprobs"] = inputs["ref_per_token_logps"]
        if config.entropy_coef != 0.0:
            # TRL's bonus: the micro-batch's mean token entropy, scaled for accumulation only
            data["entropy_num_items_in_batch"] = mask.sum().clamp(min=1.0) * accumulation
        if self.use_vllm and self.vllm_importance_sampling_correction:
            # TRL's truncated / masked IS ratio against vLLM's log-probs, (B, T) or (B, 1)
            data["weights"] = inputs["importance_sampling_ratio"].expand_as(mask)
        request = _LossRequest(
            completion_ids=completion_ids, mask=mask, head=self._fused_pg_head, config=config, data=data,
            validate=self._fused_pg_options.validate, fp32_head=bool(self.args.cast_lm_head_to_fp32),
            backbone_attr=self._fused_pg_backbone_attr)
        if self.off_policy_mask_threshold is not None:
            old = inputs.get("old_per_token_logps")
            request.off_policy_threshold = self.off_policy_mask_threshold
            # TRL: vLLM's sampling log-probs, else the old ones, else (on-policy) the current ones
            request.sampling_logprobs = inputs.get("sampling_per_token_logps", old)

        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        with self.accelerator.autocast():
            out = model(input_ids=input_ids, attention_mask=attention_mask, fused_pg_loss=request)
        self._fused_pg_log(mode, out, mask, config.eps_low, config.eps_high, accumulation)
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
        controller = self._fused_pg_controller
        controller.observe(entropy_mean.detach(), n_tokens)
        if self.accelerator.sync_gradients:
            controller.update(process_group=distributed_group(None))

    # ---- checkpoints ----------------------------------------------------------------------------------

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self._fused_pg_controller is not None and self.args.should_save:
            folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            save_controller(os.path.join(self._get_output_dir(trial=trial), folder), self._fused_pg_controller)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if self._fused_pg_controller is not None and checkpoint is not None:
            load_controller(checkpoint, self._fused_pg_controller, fresh_ok=self._fused_pg_options.fresh_start,
                            how_to_start_fresh="set GRPOConfig.controller_fresh_start=True")


# ---------------------------------------------------------------------------------------------
# the command line: TRL's `trl grpo` script with this trainer and config
# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    """``python -m fused_pg.integrations.trl grpo [--config FILE.yaml] [options]``: TRL's ``trl grpo``
    (its script ``trl.scripts.grpo``: datasets, reward functions, model arguments) with this
    module's ``GRPOConfig`` (fused-pg's fields accepted in the YAML file and as flags) and
    ``GRPOTrainer``."""
    from trl import DatasetMixtureConfig, ModelConfig, TrlParser
    from trl.scripts import grpo as script

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "grpo":
        raise SystemExit("usage: python -m fused_pg.integrations.trl grpo [--config FILE.yaml] [TRL's grpo options]")
    check_internal(script, "main", ("script_args", "training_args", "model_args", "dataset_args"), package="trl",
                   where="trl.scripts.grpo")
    parser = TrlParser((script.GRPOScriptArguments, GRPOConfig, ModelConfig, DatasetMixtureConfig),
                       prog="python -m fused_pg.integrations.trl grpo")
    script_args, training_args, model_args, dataset_args = parser.parse_args_and_config(argv[1:])
    stock = trl.GRPOTrainer
    trl.GRPOTrainer = GRPOTrainer  # the script imports it from trl when it runs
    try:
        script.main(script_args, training_args, model_args, dataset_args)
    finally:
        trl.GRPOTrainer = stock


__all__ = ["GRPOTrainer", "GRPOConfig", "FusedPGCausalLMOutput", "SUPPORTED_LOSS_TYPES", "CONTROLLER_FILE", "check_trl",
           "main"]

if __name__ == "__main__":
    main()
