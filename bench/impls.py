"""The implementations compared side by side, behind one small interface, and their registry.

Each :class:`Impl` turns a :class:`~bench.problem.Problem` into a ``step()`` closure that runs
the *forward* pass and returns a :class:`~bench.problem.StepOutput` (the scalar loss, plus
per-token log-probs / entropies where the implementation exposes them); the runner times
``step()`` as the forward and ``torch.autograd.grad(loss, [hidden, weight])`` as the backward.

Keys (``--impl``):

* ``fused-triton``  fused-pg, Triton kernels (CUDA only; the interpreter is far too slow).
* ``fused-torch``   fused-pg, chunked PyTorch backend (the CPU default).
* ``naive``         materialised logits as trainers write it: ``(h @ W.T).float()``,
                    ``log_softmax``, gather, entropy, fused-pg's epilogue; autograd backward.
* ``reference``     fused-pg's ``backend="reference"``: materialised, inputs upcast to fp32
                    before the GEMM (identical to ``naive`` for fp32 inputs).
* ``compiled``      ``torch.compile``d chunked logits with activation checkpointing: what a
                    careful PyTorch user writes without a fused kernel, and the fastest
                    plain-PyTorch contender. Tokens are split into chunks (2048 on CUDA, 1024 on
                    CPU); per chunk one compiled, checkpointed function computes
                    ``(h @ W.T).float()``, the log-sum-exp, the target log-prob and the entropy.
                    Only one chunk of logits is alive in the forward; backward recomputes them.
* ``trl``, ``verl``, ``liger-chunked``, ``liger-triton``, ``cce``: peers (:mod:`bench.peers`), when installed.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

import fused_pg

from . import peers
from .config import LossSpec
from .problem import Problem, StepOutput, loss_from_logprobs

FEATURES = ("entropy", "repo", "kl")

Step = Callable[[], StepOutput]
MakeStep = Callable[[Problem, LossSpec], Step]
Check = Callable[[torch.device, torch.dtype], "str | None"]


@dataclass(frozen=True)
class Impl:
    """One implementation (at one dot-product precision for fused-pg's backends).

    features: which parts of the benchmark loss it can compute ("entropy", "repo", "kl");
              a missing feature is dropped from its loss (and said so in the output).
    grads_in_forward: computes the gradients during the forward pass (Liger's chunked
              losses); its backward only hands them over.
    logits_bytes_per_nv: bytes it holds per logit (N x V) at its peak; None for streaming
              implementations. Used to skip runs that cannot fit in memory on CPU.
    gemms:    the GEMMs it must do per forward+backward (its own floor): 4 when the backward
              recomputes the logits, 3 when they are kept or the gradients formed in forward.
    """

    key: str
    label: str
    family: str                               # "fused-pg" | "baseline" | "peer"
    make: MakeStep
    check: Check
    features: frozenset[str] = frozenset(FEATURES)
    precision: str | None = None
    grads_in_forward: bool = False
    logits_bytes_per_nv: float | None = None
    gemms: int = 4
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def name(self) -> str:
        """Key plus precision, unique within a run (e.g. ``fused-triton@tf32``)."""
        return self.key if self.precision in (None, "native") else f"{self.key}@{self.precision}"

    @property
    def display(self) -> str:
        return self.label if self.precision in (None, "native") else f"{self.label} [{self.precision}]"

    def effective_loss(self, spec: LossSpec) -> tuple[LossSpec, tuple[str, ...]]:
        """The loss this implementation actually computes for ``spec``, and what it leaves out."""
        notes = []
        if "entropy" not in self.features:
            notes.append("no entropy")
            spec = replace(spec, entropy_coef=0.0)
        if "repo" not in self.features and spec.repo != "none":
            notes.append("no REPO")
            spec = replace(spec, repo="none")
        if "kl" not in self.features and spec.kl_coef > 0:
            notes.append("no KL")
            spec = replace(spec, kl_coef=0.0)
        return spec, tuple(notes) + self.notes


# --- fused-pg --------------------------------------------------------------------------------------

def fused_loss(problem: Problem, spec: LossSpec, backend: str, precision: str = "native"):
    """:func:`fused_pg.repo_loss` on the problem (the anchor of the loss check uses it too)."""
    return fused_pg.repo_loss(
        problem.hidden, problem.weight, problem.targets, problem.advantages, problem.old_logprobs,
        problem.mask, ref_logprobs=problem.ref_logprobs, backend=backend, precision=precision,
        validate=False, **spec.kwargs())


def _fused_make(backend: str, precision: str) -> MakeStep:
    def make(problem: Problem, spec: LossSpec) -> Step:
        # fused-pg sweeps only the tokens that count where that costs no host sync (its
        # compact_rows default: on CPU); on CUDA it sweeps every row
        compacted = problem.hidden.device.type == "cpu"
        rows = int(problem.mask.sum()) if compacted else None

        def step() -> StepOutput:
            out = fused_loss(problem, spec, backend, precision)
            return StepOutput(out.loss, out.logprobs, out.entropy, rows=rows)
        return step
    return make


def _check_triton(device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type != "cuda":
        return "needs a CUDA GPU (under the CPU interpreter Triton is far too slow to benchmark)"
    return None


def _check_torch_precision(precision: str) -> Check:
    def check(device: torch.device, dtype: torch.dtype) -> str | None:
        if precision == "tf32":
            return "precision='tf32' exists only in the Triton backend"
        if precision == "ieee":
            return "same arithmetic as 'native' in the torch backend (operands are upcast to fp32)"
        return None
    return check


def _always(device: torch.device, dtype: torch.dtype) -> str | None:
    return None


# --- naive materialised PyTorch --------------------------------------------------------------------

def naive_logprobs_entropy(hidden: Tensor, weight: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Materialised head as RL trainers write it: GEMM in the input dtype, fp32 softmax.

    hidden [N, D], weight [V, D], targets [N] -> (logprobs, entropy), [N] fp32 each.
    Autograd keeps the ``[N, V]`` fp32 logits, log-softmax and probabilities for backward.
    """
    logits = (hidden @ weight.T).float()
    logp_all = torch.log_softmax(logits, dim=-1)
    probs = logp_all.exp()
    entropy = -(probs * logp_all).sum(-1)
    logprobs = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    return logprobs, entropy


def _head_make(head: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]) -> MakeStep:
    """A step from a per-token head ``(hidden [N, D], weight, targets [N]) -> (logp, entropy)``."""
    def make(problem: Problem, spec: LossSpec) -> Step:
        D = problem.shape.d
        def step() -> StepOutput:
            logp, ent = head(problem.hidden.reshape(-1, D), problem.weight, problem.targets.reshape(-1))
            return StepOutput(loss_from_logprobs(problem, spec, logp, ent), logp, ent)
        return step
    return make


# --- torch.compile chunked -------------------------------------------------------------------------

CHUNK_CUDA = 2048
CHUNK_CPU = 1024
_compiled: Callable | None = None


def chunk_logprobs_entropy(hidden: Tensor, weight: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """hidden [n, D], weight [V, D], targets [n] -> (logprobs, entropy), [n] fp32 each.

    ``H = lse - sum_v softmax(z)_v z_v``, ``logp = z_y - lse`` on fp32 logits.
    """
    logits = (hidden @ weight.T).float()
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - lse[:, None])
    entropy = lse - (probs * logits).sum(-1)
    logprobs = logits.gather(-1, targets[:, None]).squeeze(-1) - lse
    return logprobs, entropy


def _checkpointed(hidden: Tensor, weight: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    return checkpoint(chunk_logprobs_entropy, hidden, weight, targets, use_reentrant=False)


def compiled_chunk() -> Callable:
    """The compiled, checkpointed chunk function (compiled lazily, once per process)."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_checkpointed, dynamic=False)
    return _compiled


def compiled_logprobs_entropy(hidden: Tensor, weight: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Run the compiled chunk function over token chunks of hidden [N, D]."""
    chunk = CHUNK_CUDA if hidden.is_cuda else CHUNK_CPU
    fn = compiled_chunk()
    parts = [fn(hidden[i:i + chunk], weight, targets[i:i + chunk]) for i in range(0, hidden.shape[0], chunk)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _check_compile(device: torch.device, dtype: torch.dtype) -> str | None:
    """Reason ``torch.compile`` cannot run here, or None (compile errors surface at run time)."""
    if device.type == "cpu" and not (shutil.which("cc") or shutil.which("gcc")):
        return "torch.compile on CPU needs a C compiler (none found)"
    return None


# --- registry --------------------------------------------------------------------------------------

IMPL_HELP = {
    "fused-triton": "fused-pg, Triton kernels (CUDA only)",
    "fused-torch": "fused-pg, chunked PyTorch backend",
    "naive": "materialised fp32 logits, GEMM in the input dtype, autograd (what trainers write)",
    "reference": "fused-pg backend='reference' (materialised, inputs upcast to fp32)",
    "compiled": "torch.compile'd chunked logits + activation checkpointing",
    "trl": "TRL's chunked fused LM head (log-probs + entropy) + fused-pg epilogue (peer)",
    "verl": "verl's fused kernel linear_cross_entropy (log-probs + entropy) + fused-pg epilogue (peer, CUDA)",
    "liger-chunked": "Liger-Kernel LigerFusedLinearGRPOLoss (peer; no entropy, no REPO)",
    "liger-triton": "Liger-Kernel Triton GRPO loss on materialised logits (peer, CUDA; no entropy, no REPO)",
    "cce": "Cut Cross-Entropy linear_cross_entropy + fused-pg epilogue (peer; no entropy)",
}
IMPL_KEYS = tuple(IMPL_HELP)


def build_impls(key: str, precisions: tuple[str, ...]) -> list[Impl]:
    """The :class:`Impl` objects behind one ``--impl`` key (one per precision for fused-pg)."""
    if key == "fused-triton":
        return [Impl(key, "fused-pg triton", "fused-pg", _fused_make("triton", p), _check_triton,
                     precision=p) for p in precisions]
    if key == "fused-torch":
        return [Impl(key, "fused-pg torch", "fused-pg", _fused_make("torch", p), _check_torch_precision(p),
                     precision=p) for p in precisions]
    if key == "naive":
        return [Impl(key, "naive PyTorch", "baseline", _head_make(naive_logprobs_entropy), _always,
                     logits_bytes_per_nv=24.0, gemms=3)]
    if key == "reference":
        return [Impl(key, "fused-pg reference", "baseline", _fused_make("reference", "native"), _always,
                     logits_bytes_per_nv=24.0, gemms=3)]
    if key == "compiled":
        return [Impl(key, "torch.compile chunked", "baseline", _head_make(compiled_logprobs_entropy),
                     _check_compile)]
    if key == "trl":
        return [Impl(key, "TRL chunked head", "peer", peers.trl_make, peers.trl_check)]
    if key == "verl":
        return [Impl(key, "verl fused kernel", "peer", peers.verl_make, peers.verl_check)]
    if key == "liger-chunked":
        return [Impl(key, "Liger chunked GRPO", "peer", peers.liger_chunked_make, peers.liger_chunked_check,
                     features=frozenset({"kl"}), grads_in_forward=True, gemms=3)]
    if key == "liger-triton":
        return [Impl(key, "Liger Triton GRPO", "peer", peers.liger_triton_make, peers.liger_triton_check,
                     features=frozenset({"kl"}), logits_bytes_per_nv=2.0, gemms=3,
                     notes=("materialised logits",))]
    if key == "cce":
        return [Impl(key, "CCE + epilogue", "peer", peers.cce_make, peers.cce_check,
                     features=frozenset({"repo", "kl"}))]
    raise ValueError(f"unknown implementation {key!r}; choose from {', '.join(IMPL_KEYS)}")
