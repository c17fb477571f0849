"""Literal, materialised PyTorch oracle for fused-pg (installed as ``fused_pg.reference``).

Everything here is written the obvious way: full ``[N, V]`` logits, ``log_softmax``, Python
loops over sequences, autograd for every gradient. It runs in any floating dtype, float64
included, and is the ground truth every backend of :mod:`fused_pg` is tested against.

It deliberately imports nothing from ``fused_pg`` or ``kernels``: an oracle that shares code
with what it checks proves nothing.
"""

from .head import logprobs_entropy_ref
from .loss import ReferenceOutput, policy_loss_ref, repo_loss_ref

__all__ = ["logprobs_entropy_ref", "policy_loss_ref", "repo_loss_ref", "ReferenceOutput"]
