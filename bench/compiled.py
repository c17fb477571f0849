"""The ``torch.compile`` baseline: chunked logits with activation checkpointing, compiled.

What a careful PyTorch user writes without a fused kernel: split the tokens into chunks
(2048 on CUDA, 1024 on CPU), and for each chunk compute ``(h @ W.T).float()``, the
log-sum-exp, the target log-prob and the entropy inside one ``torch.compile``d,
activation-checkpointed function. Only one chunk of logits is alive at a time in the
forward; backward recomputes each chunk's logits. fused-pg's epilogue adds the policy loss.
SPEC section 7 calls it the fastest plain-PyTorch contender.
"""

from __future__ import annotations

import shutil
from typing import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .config import LossSpec
from .epilogue import loss_from_logprobs
from .problem import Problem

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


def chunked_logprobs_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """Run the compiled chunk function over ``chunk``-token slices of hidden [N, D]."""
    fn = compiled_chunk()
    parts = [fn(hidden[i:i + chunk], weight, targets[i:i + chunk]) for i in range(0, hidden.shape[0], chunk)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def check(device: torch.device, dtype: torch.dtype) -> str | None:
    """Reason ``torch.compile`` cannot run here, or None (compile errors surface at run time)."""
    if device.type == "cpu" and not (shutil.which("cc") or shutil.which("gcc")):
        return "torch.compile on CPU needs a C compiler (none found)"
    return None


def make_step(problem: Problem, spec: LossSpec):
    from .impls import StepOutput

    chunk = CHUNK_CUDA if problem.hidden.is_cuda else CHUNK_CPU
    D = problem.shape.d

    def step() -> StepOutput:
        logp, ent = chunked_logprobs_entropy(problem.hidden.reshape(-1, D), problem.weight,
                                             problem.targets.reshape(-1), chunk)
        return StepOutput(loss_from_logprobs(problem, spec, logp, ent), logp, ent)
    return step
