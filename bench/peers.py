"""Adapters for peer libraries, imported lazily: a missing peer is skipped with its reason.

* ``trl``: TRL's own chunked fused LM head (TRL >= 1.16: ``trl.kernels.ChunkedLogProbFunction``,
  what ``trl.trainer.utils.add_fused_lm_head`` patches into a model's forward). Per-token
  log-probs and entropy without materialising logits: cuBLAS GEMMs on
  ``[4096, 32768]`` logit tiles folded by a Triton kernel (torch ops off GPU), backward
  recomputes each tile (entropy gradient included). Called as ``add_fused_lm_head`` calls it:
  the same vocabulary chunk and, where TRL uses Triton, only the unmasked rows. fused-pg's
  epilogue adds the policy loss (REPO, KL and the entropy bonus included).
* ``liger-chunked``: Liger-Kernel's ``LigerFusedLinearGRPOLoss`` (``liger_kernel.chunked_loss``):
  chunks of sequences, logits per chunk, gradients computed *during the forward* and
  handed over in backward. Computes the DAPO-normalised clipped loss (+ k3 KL), no entropy,
  no REPO. ``torch.compile`` of its loss math on CUDA only (compiling on CPU takes ~25 s).
* ``liger-triton``: Liger-Kernel's Triton GRPO loss (``liger_kernel.transformers.grpo_loss.
  triton_grpo_loss``) on *materialised* logits in the input dtype (``h @ W.T``); it expects
  ``B x (T+1)`` logit rows (the last position of each sequence is dropped), so one dummy
  hidden row per sequence is appended. CUDA only (Triton).
* ``verl``: verl's fused kernel ``verl.utils.kernel.linear_cross_entropy`` (NVIDIA's
  ``efficient_entropy_*`` Triton kernels): per-token log-probs **and entropy** from hidden states
  and the LM head without materialising logits; the backward takes the entropy's gradient too.
  fused-pg's epilogue adds the policy loss (REPO, KL and the entropy bonus included). CUDA only
  (see :data:`VERL_NO_CPU`). Its two modules need only torch and triton: when verl's package
  does not import (its own dependencies are absent, as on a GPU machine given only verl's
  wheel), they are loaded without running ``verl/__init__.py``.
* ``cce``: Cut Cross-Entropy's ``linear_cross_entropy(..., reduction="none")`` gives
  ``-logp`` per token without materialising logits; fused-pg's epilogue adds the policy loss
  (REPO and KL included, no entropy). ``impl="cce"`` (Triton) on CUDA, ``"torch_compile"`` on CPU.

Install them with ``pip install trl liger-kernel cut-cross-entropy`` and ``pip install --no-deps verl``
(none is a dependency of fused-pg; liger-kernel and cut-cross-entropy are pure Python; trl pulls
transformers).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types

import torch
from torch import Tensor

from .config import LossSpec
from .problem import Problem, StepOutput, loss_from_logprobs

LIGER = "liger_kernel"
CCE = "cut_cross_entropy"
TRL = "trl"
VERL = "verl"
PIP_NAMES = {LIGER: "liger-kernel", CCE: "cut-cross-entropy", TRL: "trl", VERL: "verl"}


def missing(module: str) -> str | None:
    """Reason a peer cannot be imported, or None."""
    if importlib.util.find_spec(module) is None:
        return f"{PIP_NAMES[module]} is not installed (pip install {PIP_NAMES[module]})"
    return None


def version(module: str) -> str | None:
    """Installed version of a peer, or None."""
    try:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version
        return dist_version(PIP_NAMES[module])
    except (PackageNotFoundError, KeyError):
        return None


def _import_error(module: str, attr_path: str) -> str | None:
    """None when ``module.attr_path`` imports, else the reason it does not."""
    reason = missing(module)
    if reason:
        return reason
    mod_name, _, attr = attr_path.rpartition(".")
    try:
        getattr(importlib.import_module(mod_name), attr)
    except Exception as exc:  # noqa: BLE001 -- any import failure is a reason to skip
        return f"{PIP_NAMES[module]} is installed but {attr_path} does not import: {exc!r}"
    return None


# --- TRL: chunked fused LM head ------------------------------------------------------------------

TRL_MIN_VERSION = (1, 16)
# the vocabulary chunk add_fused_lm_head passes (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE in
# TRL 1.16; read from there when that heavy module is already imported)
TRL_CHUNK = 32768


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def trl_check(device: torch.device, dtype: torch.dtype) -> str | None:
    reason = missing(TRL)
    if reason:
        return reason
    installed = version(TRL)
    if installed and _version_tuple(installed) < TRL_MIN_VERSION:
        return (f"trl {installed} has no chunked fused LM head (needs trl >= "
                f"{'.'.join(map(str, TRL_MIN_VERSION))})")
    return _import_error(TRL, "trl.kernels.ChunkedLogProbFunction")


def _trl_compacts(device: torch.device) -> bool:
    """Whether TRL sweeps only the unmasked rows on ``device`` (it does where it uses Triton)."""
    try:
        from trl.kernels.chunked_logprob import _use_triton
        return bool(_use_triton(device))
    except Exception:  # noqa: BLE001 -- private helper moved: TRL's rule as of 1.16
        return device.type in ("cuda", "xpu")


def trl_make(problem: Problem, spec: LossSpec):
    from trl.kernels import ChunkedLogProbFunction

    utils = sys.modules.get("trl.trainer.utils")
    chunk = getattr(utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", TRL_CHUNK)
    compact = _trl_compacts(problem.hidden.device)
    mask = problem.mask
    rows = int(mask.sum()) if compact else None
    D = problem.shape.d

    def step() -> StepOutput:
        if compact:
            h, y = problem.hidden[mask], problem.targets[mask]
        else:
            h, y = problem.hidden.reshape(-1, D), problem.targets.reshape(-1)
        logp, ent, *_ = ChunkedLogProbFunction.apply(h, problem.weight, None, y, 1.0, chunk, None, 1.0,
                                                     ("entropy",))
        if compact:  # as add_fused_lm_head: zeros at the masked positions
            logp = logp.new_zeros(mask.shape).masked_scatter(mask, logp)
            ent = ent.new_zeros(mask.shape).masked_scatter(mask, ent)
        return StepOutput(loss_from_logprobs(problem, spec, logp, ent), logp, ent, rows=rows)
    return step


# --- Liger-Kernel: chunked fused-linear GRPO loss ---------------------------------------------

def liger_chunked_check(device: torch.device, dtype: torch.dtype) -> str | None:
    return _import_error(LIGER, "liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss")


def liger_chunked_make(problem: Problem, spec: LossSpec):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    use_ref = spec.kl_coef > 0
    loss_fn = LigerFusedLinearGRPOLoss(
        beta=spec.kl_coef, compiled=problem.hidden.is_cuda, use_ref_model=use_ref,
        epsilon_low=spec.eps_low, epsilon_high=spec.eps_high, loss_type="dapo", temperature=1.0)
    mask = problem.mask.long()

    def step() -> StepOutput:
        out = loss_fn(problem.hidden, problem.weight, problem.targets, mask, problem.advantages,
                      ref_per_token_logps=problem.ref_logprobs if use_ref else None,
                      old_per_token_logps=problem.old_logprobs)
        loss = out[0] if isinstance(out, (tuple, list)) else out
        return StepOutput(loss)
    return step


# --- Liger-Kernel: Triton GRPO loss on materialised logits ------------------------------------

def liger_triton_check(device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type != "cuda":
        return "Liger's Triton GRPO loss needs a CUDA GPU"
    return _import_error(LIGER, "liger_kernel.transformers.grpo_loss.triton_grpo_loss")


def liger_triton_make(problem: Problem, spec: LossSpec):
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    mask = problem.mask
    maskf = mask.to(torch.float32)
    pad = problem.hidden.new_zeros(problem.num_seqs, 1, problem.shape.d)

    def step() -> StepOutput:
        # logits for positions 0..T (T+1 rows per sequence); the kernel drops the last one
        hidden = torch.cat([problem.hidden, pad], dim=1)
        logits = hidden @ problem.weight.T
        per_token_loss, _kl, _clipped = triton_grpo_loss(
            logits, problem.old_logprobs, problem.ref_logprobs if spec.kl_coef > 0 else None,
            problem.targets, problem.advantages, mask, temperature=1.0, beta=spec.kl_coef,
            eps_low=spec.eps_low, eps_high=spec.eps_high)
        # DAPO / token-mean normalisation over the valid tokens of the batch
        loss = (per_token_loss * maskf).sum() / maskf.sum().clamp_min(1.0)
        return StepOutput(loss)
    return step


# --- verl: fused log-probs + entropy kernel -----------------------------------------------------

# Why verl's kernel cannot run without a GPU, checked with verl 0.9.1, torch 2.13 (CPU build) and
# triton 3.9: LinearCrossEntropy opens torch.cuda.nvtx ranges, which raise on a CPU-only torch
# build; efficient_entropy_forward/backward assert that every tensor is a CUDA tensor; and under
# TRITON_INTERPRET=1 the forward kernel's first masked store fails in the interpreter ("mask has
# unsupported dtype": ``(offs_max_m < num_tokens) & (offs_max_n < num_splits)`` is int32 there).
VERL_NO_CPU = ("verl's kernel runs only on CUDA: it opens torch.cuda.nvtx ranges (an error on a "
               "CPU-only torch), asserts hidden.is_cuda, and its forward kernel fails under the Triton "
               "interpreter ('mask has unsupported dtype' on a masked store)")
VERL_MODULE = "verl.utils.kernel.linear_cross_entropy"


def verl_check(device: torch.device, dtype: torch.dtype) -> str | None:
    reason = missing(VERL)
    if reason:
        return reason.replace("pip install verl", "pip install --no-deps verl")
    return VERL_NO_CPU if device.type != "cuda" else None


def verl_linear_cross_entropy():
    """``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy``; when verl's package does
    not import, its kernel modules alone, under bare ``verl``/``verl.utils``/``verl.utils.kernel``
    package entries (their ``__init__`` files import verl's whole dependency tree)."""
    try:
        return importlib.import_module(VERL_MODULE).linear_cross_entropy
    except ImportError:
        if "verl.utils.kernel" in sys.modules:
            raise
    root = os.path.dirname(importlib.util.find_spec(VERL).origin)
    for name in ("verl", "verl.utils", "verl.utils.kernel"):
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [os.path.join(root, *name.split(".")[1:])]
            sys.modules[name] = package
    return importlib.import_module(VERL_MODULE).linear_cross_entropy


def verl_make(problem: Problem, spec: LossSpec):
    D = problem.shape.d
    if D % 128:
        raise ValueError(f"verl's kernel needs a hidden size D that is a multiple of 128, got D={D}")
    linear_cross_entropy = verl_linear_cross_entropy()

    def step() -> StepOutput:
        logp, ent = linear_cross_entropy(problem.hidden.reshape(-1, D), problem.weight,
                                         problem.targets.reshape(-1), 1.0, "none")
        return StepOutput(loss_from_logprobs(problem, spec, logp, ent), logp, ent)
    return step


# --- Cut Cross-Entropy: log-probs without logits, fused-pg epilogue ---------------------------

def cce_check(device: torch.device, dtype: torch.dtype) -> str | None:
    return _import_error(CCE, "cut_cross_entropy.linear_cross_entropy")


def cce_make(problem: Problem, spec: LossSpec):
    from cut_cross_entropy import linear_cross_entropy

    impl = "cce" if problem.hidden.is_cuda else "torch_compile"
    targets = torch.where(problem.mask, problem.targets, -100)

    def step() -> StepOutput:
        nll: Tensor = linear_cross_entropy(problem.hidden, problem.weight, targets,
                                           ignore_index=-100, reduction="none", impl=impl)
        logp = -nll.float()
        return StepOutput(loss_from_logprobs(problem, spec, logp, None), logp)
    return step
