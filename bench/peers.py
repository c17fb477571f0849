"""Adapters for the peer libraries (docs/benchmark.md says how each is called), imported lazily: a
missing peer is skipped with its reason. Those that produce per-token log-probs get fused-pg's
epilogue on top. Install: ``pip install trl liger-kernel cut-cross-entropy`` and
``pip install --no-deps verl`` (none is a dependency of fused-pg).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys
import types

import torch

from fused_pg import LossConfig

from .problem import Problem, StepOutput, loss_from_logprobs

LIGER, CCE, TRL, VERL = "liger_kernel", "cut_cross_entropy", "trl", "verl"
PIP_NAMES = {LIGER: "liger-kernel", CCE: "cut-cross-entropy", TRL: "trl", VERL: "verl"}


def missing(module: str) -> str | None:
    """Reason a peer cannot be imported, or None."""
    if importlib.util.find_spec(module) is None:
        return f"{PIP_NAMES[module]} is not installed (pip install {PIP_NAMES[module]})"
    return None


def version(module: str) -> str | None:
    """Installed version of a peer, or None."""
    try:
        return importlib.metadata.version(PIP_NAMES[module])
    except importlib.metadata.PackageNotFoundError:
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


# --- TRL -----------------------------------------------------------------------------------------

TRL_CHUNK = 32768  # the vocabulary chunk add_fused_lm_head passes (TRL 1.16)


def trl_check(device: torch.device, dtype: torch.dtype) -> str | None:
    reason = missing(TRL)
    installed = version(TRL)
    if not reason and installed and tuple(int(p) for p in installed.split(".")[:2] if p.isdigit()) < (1, 16):
        return f"trl {installed} has no chunked fused LM head (needs trl >= 1.16)"
    return reason or _import_error(TRL, "trl.kernels.ChunkedLogProbFunction")


def trl_make(problem: Problem, loss: LossConfig):
    from trl.kernels import ChunkedLogProbFunction
    try:  # TRL sweeps only the unmasked rows where it uses Triton
        from trl.kernels.chunked_logprob import _use_triton
        compact = bool(_use_triton(problem.hidden.device))
    except Exception:  # noqa: BLE001 -- private helper moved: TRL 1.16's rule
        compact = problem.hidden.device.type in ("cuda", "xpu")
    chunk = getattr(sys.modules.get("trl.trainer.utils"), "_CHUNKED_LOGPROB_CHUNK_SIZE", TRL_CHUNK)
    mask, D = problem.mask, problem.shape.d
    rows = int(mask.sum()) if compact else None

    def step() -> StepOutput:
        h, y = (problem.hidden[mask], problem.targets[mask]) if compact else \
            (problem.hidden.reshape(-1, D), problem.targets.reshape(-1))
        logp, ent, *_ = ChunkedLogProbFunction.apply(h, problem.weight, None, y, 1.0, chunk, None, 1.0,
                                                     ("entropy",))
        if compact:  # as add_fused_lm_head: zeros at the masked positions
            logp = logp.new_zeros(mask.shape).masked_scatter(mask, logp)
            ent = ent.new_zeros(mask.shape).masked_scatter(mask, ent)
        return StepOutput(loss_from_logprobs(problem, loss, logp, ent), logp, ent, rows)
    return step


# --- verl ----------------------------------------------------------------------------------------

# Why verl's kernel cannot run without a GPU (verl 0.9.1, torch 2.13 CPU build, triton 3.9; see
# docs/benchmark.md): LinearCrossEntropy opens torch.cuda.nvtx ranges, which raise on a CPU-only
# torch build; efficient_entropy_forward/backward assert that every tensor is a CUDA tensor; and
# under TRITON_INTERPRET=1 the forward kernel's first masked store fails in the interpreter.
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


def verl_make(problem: Problem, loss: LossConfig):
    D = problem.shape.d
    if D % 128:
        raise ValueError(f"verl's kernel needs a hidden size D that is a multiple of 128, got D={D}")
    linear_cross_entropy = verl_linear_cross_entropy()

    def step() -> StepOutput:
        logp, ent = linear_cross_entropy(problem.hidden.reshape(-1, D), problem.weight,
                                         problem.targets.reshape(-1), 1.0, "none")
        return StepOutput(loss_from_logprobs(problem, loss, logp, ent), logp, ent)
    return step


# --- Liger-Kernel --------------------------------------------------------------------------------

def liger_chunked_check(device: torch.device, dtype: torch.dtype) -> str | None:
    return _import_error(LIGER, "liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss")


def liger_chunked_make(problem: Problem, loss: LossConfig):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    use_ref = loss.kl_coef > 0
    loss_fn = LigerFusedLinearGRPOLoss(
        beta=loss.kl_coef, compiled=problem.hidden.is_cuda, use_ref_model=use_ref, epsilon_low=loss.eps_low,
        epsilon_high=loss.eps_high, loss_type="dapo", temperature=1.0)
    mask = problem.mask.long()

    def step() -> StepOutput:
        out = loss_fn(problem.hidden, problem.weight, problem.targets, mask, problem.advantages,
                      ref_per_token_logps=problem.ref_logprobs if use_ref else None,
                      old_per_token_logps=problem.old_logprobs)
        return StepOutput(out[0] if isinstance(out, (tuple, list)) else out)
    return step


def liger_triton_check(device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type != "cuda":
        return "Liger's Triton GRPO loss needs a CUDA GPU"
    return _import_error(LIGER, "liger_kernel.transformers.grpo_loss.triton_grpo_loss")


def liger_triton_make(problem: Problem, loss: LossConfig):
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss
    maskf = problem.mask.to(torch.float32)
    pad = problem.hidden.new_zeros(problem.hidden.shape[0], 1, problem.shape.d)

    def step() -> StepOutput:
        # logits for positions 0..T (T+1 rows per sequence); the kernel drops the last one
        logits = torch.cat([problem.hidden, pad], dim=1) @ problem.weight.T
        per_token_loss, _kl, _clipped = triton_grpo_loss(
            logits, problem.old_logprobs, problem.ref_logprobs if loss.kl_coef > 0 else None, problem.targets,
            problem.advantages, problem.mask, temperature=1.0, beta=loss.kl_coef, eps_low=loss.eps_low,
            eps_high=loss.eps_high)
        # DAPO / token-mean normalisation over the valid tokens of the batch
        return StepOutput((per_token_loss * maskf).sum() / maskf.sum().clamp_min(1.0))
    return step


# --- Cut Cross-Entropy ---------------------------------------------------------------------------

def cce_check(device: torch.device, dtype: torch.dtype) -> str | None:
    return _import_error(CCE, "cut_cross_entropy.linear_cross_entropy")


def cce_make(problem: Problem, loss: LossConfig):
    from cut_cross_entropy import linear_cross_entropy
    impl = "cce" if problem.hidden.is_cuda else "torch_compile"
    targets = torch.where(problem.mask, problem.targets, -100)

    def step() -> StepOutput:
        nll = linear_cross_entropy(problem.hidden, problem.weight, targets, ignore_index=-100, reduction="none",
                                   impl=impl)
        logp = -nll.float()
        return StepOutput(loss_from_logprobs(problem, loss, logp, None), logp)
    return step
