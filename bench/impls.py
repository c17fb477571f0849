"""The implementations compared side by side (docs/benchmark.md says how each is called), behind
one small interface, and their registry. Each :class:`Impl` turns a :class:`~bench.problem.Problem`
into a ``step()`` closure that runs the forward pass and returns a :class:`~bench.problem.StepOutput`
(the scalar loss, plus per-token log-probs / entropies where exposed); the runner times ``step()``
and ``torch.autograd.grad(loss, [hidden, weight])``.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

import fused_pg
from fused_pg import LossConfig

from . import peers
from .problem import Problem, StepOutput, loss_from_logprobs

Step = Callable[[], StepOutput]
MakeStep = Callable[[Problem, LossConfig], Step]
Check = Callable[[torch.device, torch.dtype], "str | None"]
ALL_FEATURES = frozenset({"entropy", "repo", "kl"})


@dataclass(frozen=True)
class Impl:
    """One implementation (at one dot-product precision for fused-pg's backends).

    features: the parts of the benchmark loss it can compute; a missing one is dropped from its
              loss (and the output says so).
    grads_in_forward: computes the gradients during the forward (Liger's chunked loss).
    logits_bytes_per_nv: bytes it holds per logit at its peak (None: streaming); on CPU a run
              that would not fit in memory is skipped.
    gemms:    the GEMMs it must do per forward+backward (its own floor): 4 when the backward
              recomputes the logits, 3 when it keeps them or forms the gradients in the forward.
    """

    key: str
    label: str
    family: str                               # "fused-pg" | "baseline" | "peer"
    make: MakeStep
    check: Check
    features: frozenset[str] = ALL_FEATURES
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

    def effective_loss(self, loss: LossConfig) -> tuple[LossConfig, tuple[str, ...]]:
        """The loss this implementation actually computes for ``loss``, and what it leaves out."""
        drop = {"entropy": ("no entropy", dict(entropy_coef=0.0), True),
                "repo": ("no REPO", dict(repo="none"), loss.repo != "none"),
                "kl": ("no KL", dict(kl_coef=0.0), loss.kl_coef > 0)}
        notes = []
        for feature, (note, change, used) in drop.items():
            if feature not in self.features and used:
                notes.append(note)
                loss = dataclasses.replace(loss, **change)
        return loss, tuple(notes) + self.notes


def fused_loss(problem: Problem, loss: LossConfig, backend: str, precision: str = "native"):
    """:func:`fused_pg.repo_loss` on the problem (the anchor of the loss check uses it too)."""
    return fused_pg.repo_loss(
        problem.hidden, problem.weight, problem.targets, problem.advantages, problem.old_logprobs,
        problem.mask, ref_logprobs=problem.ref_logprobs, config=loss, backend=backend, precision=precision,
        validate=False)


def _fused_make(backend: str, precision: str) -> MakeStep:
    def make(problem: Problem, loss: LossConfig) -> Step:
        # fused-pg sweeps only the tokens that count where that costs no host sync (its
        # compact_rows default: on CPU); on CUDA it sweeps every row
        rows = int(problem.mask.sum()) if problem.hidden.device.type == "cpu" else None

        def step() -> StepOutput:
            out = fused_loss(problem, loss, backend, precision)
            return StepOutput(out.loss, out.logprobs, out.entropy, rows)
        return step
    return make


def _cuda_only(device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type != "cuda":
        return "needs a CUDA GPU (under the CPU interpreter Triton is far too slow to benchmark)"
    return None


def _torch_precision(precision: str) -> Check:
    reason = {"tf32": "precision='tf32' exists only in the Triton backend",
              "ieee": "same arithmetic as 'native' in the torch backend (operands are upcast to fp32)"}.get(precision)
    return lambda device, dtype: reason


def _always(device: torch.device, dtype: torch.dtype) -> str | None:
    return None


def naive_logprobs_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None, *,
                           temperature: float = 1.0, softcap: float | None = None) -> tuple[Tensor, Tensor]:
    """Materialised head as RL trainers write it: ``F.linear`` in the inputs' (promoted) dtype,
    then fp32 temperature, soft-cap, ``log_softmax`` and entropy.

    hidden [N, D], weight [V, D], targets [N] -> (logprobs, entropy), [N] fp32 each. Autograd keeps
    the ``[N, V]`` fp32 logits, log-softmax and probabilities for the backward.
    """
    dt = torch.promote_types(hidden.dtype, weight.dtype)
    z = F.linear(hidden.to(dt), weight.to(dt), None if bias is None else bias.to(dt)).float()
    if temperature != 1.0:
        z = z / temperature
    if softcap is not None:  # a -inf bias excludes its token, soft-cap or not
        z = torch.where(torch.isneginf(z), z, softcap * torch.tanh(z / softcap))
    logp_all = torch.log_softmax(z, dim=-1)
    p = logp_all.exp()
    # H = -sum p log p with 0 * log 0 = 0 (only a -inf bias entry makes a logit -inf)
    entropy = -(p * (logp_all if bias is None else torch.where(p > 0, logp_all, 0.0))).sum(-1)
    return logp_all.gather(-1, targets[:, None]).squeeze(-1), entropy


def _head_make(head: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]) -> MakeStep:
    """A step from a per-token head ``(hidden [N, D], weight, targets [N]) -> (logp, entropy)``."""
    def make(problem: Problem, loss: LossConfig) -> Step:
        def step() -> StepOutput:
            logp, ent = head(problem.hidden.reshape(-1, problem.shape.d), problem.weight,
                             problem.targets.reshape(-1))
            return StepOutput(loss_from_logprobs(problem, loss, logp, ent), logp, ent)
        return step
    return make


def chunk_logprobs_entropy(hidden: Tensor, weight: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """hidden [n, D], weight [V, D], targets [n] -> (logprobs, entropy), [n] fp32 each:
    ``H = lse - sum_v softmax(z)_v z_v``, ``logp = z_y - lse`` on fp32 logits."""
    logits = (hidden @ weight.T).float()
    lse = torch.logsumexp(logits, dim=-1)
    entropy = lse - (torch.exp(logits - lse[:, None]) * logits).sum(-1)
    return logits.gather(-1, targets[:, None]).squeeze(-1) - lse, entropy


_compiled: Callable | None = None


def compiled_logprobs_entropy(hidden: Tensor, weight: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """The compiled, checkpointed chunk function (compiled once per process) over token chunks."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(lambda h, w, y: checkpoint(chunk_logprobs_entropy, h, w, y, use_reentrant=False),
                                  dynamic=False)
    chunk = 2048 if hidden.is_cuda else 1024
    parts = [_compiled(hidden[i:i + chunk], weight, targets[i:i + chunk]) for i in range(0, hidden.shape[0], chunk)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _check_compile(device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type == "cpu" and not (shutil.which("cc") or shutil.which("gcc")):
        return "torch.compile on CPU needs a C compiler (none found)"
    return None


# --- the registry ---------------------------------------------------------------------------------

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
    if key in ("fused-triton", "fused-torch"):
        backend = key.split("-")[1]
        check = _cuda_only if backend == "triton" else None
        return [Impl(key, f"fused-pg {backend}", "fused-pg", _fused_make(backend, p), check or _torch_precision(p),
                     precision=p) for p in precisions]
    impl = {
        "naive": Impl(key, "naive PyTorch", "baseline", _head_make(naive_logprobs_entropy), _always,
                      logits_bytes_per_nv=24.0, gemms=3),
        "reference": Impl(key, "fused-pg reference", "baseline", _fused_make("reference", "native"), _always,
                          logits_bytes_per_nv=24.0, gemms=3),
        "compiled": Impl(key, "torch.compile chunked", "baseline", _head_make(compiled_logprobs_entropy),
                         _check_compile),
        "trl": Impl(key, "TRL chunked head", "peer", peers.trl_make, peers.trl_check),
        "verl": Impl(key, "verl fused kernel", "peer", peers.verl_make, peers.verl_check),
        "liger-chunked": Impl(key, "Liger chunked GRPO", "peer", peers.liger_chunked_make, peers.liger_chunked_check,
                              features=frozenset({"kl"}), grads_in_forward=True, gemms=3),
        "liger-triton": Impl(key, "Liger Triton GRPO", "peer", peers.liger_triton_make, peers.liger_triton_check,
                             features=frozenset({"kl"}), logits_bytes_per_nv=2.0, gemms=3,
                             notes=("materialised logits",)),
        "cce": Impl(key, "CCE + epilogue", "peer", peers.cce_make, peers.cce_check,
                    features=frozenset({"repo", "kl"})),
    }.get(key)
    if impl is None:
        raise ValueError(f"unknown implementation {key!r}; choose from {', '.join(IMPL_KEYS)}")
    return [impl]
