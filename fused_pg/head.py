"""The LM-head building block: per-token log-probability and entropy, fused.

Public entry point :func:`fused_logprobs_entropy`, and :class:`FusedHead`, the one
``torch.autograd.Function`` that serves every sweep backend: its forward calls the backend's
``forward_sweep`` (online log-sum-exp, entropy, target logit) and its backward the backend's
``backward_sweep`` (logits recomputed tile by tile). Between them, autograd runs whatever the
caller does with the two outputs, e.g. the policy-loss epilogue. Backends and their
capabilities live in :mod:`fused_pg.backends`.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import backends, checks, distributed
from .backends.common import compute_dtype
from .config import HeadConfig


class FusedHead(torch.autograd.Function):
    """(hidden [N, D], weight [V, D], bias [V] | None, targets [N]) -> (logprobs, entropy).

    Saves the inputs plus ``lse`` and ``entropy`` ([N] each) for backward: O(N) extra memory.
    Both sweeps run with autocast disabled, on the inputs' own dtypes, so forward and backward
    see the same logits whatever autocast region the caller is in.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, sweeps: ModuleType, cfg: HeadConfig):
        with torch.autocast(hidden.device.type, enabled=False):
            logprobs, entropy, lse = sweeps.forward_sweep(hidden, weight, bias, targets, cfg)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.sweeps, ctx.cfg = sweeps, cfg
        # an output that gets no gradient (the entropy, when only logged) arrives as None,
        # not as zeros: the backward sweep then skips its term (see upstream_grads)
        ctx.set_materialize_grads(False)
        return logprobs, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logprobs, grad_entropy):
        return (*sweep_gradients(ctx, grad_logprobs, grad_entropy), None, None, None)


def upstream_grads(targets: Tensor, lse: Tensor, grad_logprobs: Tensor | None,
                   grad_entropy: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """(g, e) for a backward sweep, 0 at tokens that do not count (their outputs are constants).

    A None upstream gradient (the ``Function`` does not materialise them) means that output
    reaches no loss: g is then 0, and e stays None, which tells the sweep to skip the entropy
    term ``e p (log p + H)`` of every logit instead of multiplying it by 0.
    """
    valid = targets >= 0
    g = torch.where(valid, grad_logprobs, 0.0) if grad_logprobs is not None else torch.zeros_like(lse)
    e = torch.where(valid, grad_entropy, 0.0) if grad_entropy is not None else None
    return g, e


def sweep_gradients(ctx, grad_logprobs: Tensor | None, grad_entropy: Tensor | None, reduce_d_hidden=None):
    """The backward of a sweep ``Function`` whose ctx saved (hidden, weight, bias, targets,
    lse, entropy) and holds ``sweeps`` and ``cfg``: (d_hidden, d_weight, d_bias) in the
    inputs' dtypes, None where not needed. ``reduce_d_hidden`` (in place, fp32) sums d_hidden
    over the ranks that each swept a slice of the vocabulary.
    """
    hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
    g, e = upstream_grads(targets, lse, grad_logprobs, grad_entropy)
    need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
    with torch.autocast(hidden.device.type, enabled=False):
        d_hidden, d_weight, d_bias = ctx.sweeps.backward_sweep(
            hidden, weight, bias, targets, lse, entropy, g, e, ctx.cfg,
            needs=(need_dh, need_dw, need_db and bias is not None))
    if need_dh and reduce_d_hidden is not None:
        reduce_d_hidden(d_hidden)
    return (
        d_hidden.to(hidden.dtype) if need_dh else None,
        d_weight.to(weight.dtype) if need_dw else None,
        d_bias.to(bias.dtype) if need_db and bias is not None else None,
    )


def check_head_args(hidden, weight, targets, bias, ignore_index) -> tuple[int, int]:
    """Check types and shapes of the LM-head arguments (no value reads); returns (N, V)."""
    for name, x in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        distributed.reject_dtensor(name, x)
    checks.tensor("hidden", hidden, dims=(2, 3), floating=True)
    dev = hidden.device
    checks.tensor("weight", weight, dims=(2,), floating=True, device=dev)
    checks.tensor("targets", targets, integer=True, device=dev)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must have shape (V, {hidden.shape[-1]}) to match hidden's last "
                         f"dimension, got {tuple(weight.shape)}")
    checks.shape("targets", targets, hidden.shape[:-1], "the leading shape of hidden")
    V = weight.shape[0]
    if bias is not None:
        checks.tensor("bias", bias, dims=(1,), floating=True, device=dev)
        checks.shape("bias", bias, (V,), "one entry per vocabulary row of weight")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if hidden.shape[-1] == 0 or V == 0:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must have "
                         "a non-empty hidden size and vocabulary")
    return targets.numel(), V


def check_head_values(hidden: Tensor, weight: Tensor, bias: Tensor | None, valid: Tensor) -> None:
    """Value checks (they read tensors): finite weight and bias, finite hidden rows that count."""
    checks.finite("hidden", hidden.reshape(valid.numel(), hidden.shape[-1])[valid.reshape(-1)])
    checks.finite("weight", weight)
    if bias is not None:
        checks.bias_values(bias)


def _sweep(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, cfg: HeadConfig,
           backend: backends.Backend,
           shard: "distributed.VocabShard | None" = None) -> tuple[Tensor, Tensor]:
    if hidden.shape[0] == 0:  # nothing to sweep: empty outputs, still connected (zero gradients)
        anchor = hidden.sum() + weight.sum() + (bias.sum() if bias is not None else 0.0)
        dtype = compute_dtype(hidden, weight)
        empty = torch.zeros(0, dtype=dtype, device=hidden.device) * anchor.to(dtype)
        return empty, empty.clone()
    if not backend.skips_invalid_rows:
        hidden = torch.where((targets >= 0)[:, None], hidden, 0.0)
    impl = backend.load()
    if shard is not None:
        return distributed.vocab_parallel_sweep(hidden, weight, bias, targets, cfg, backend, impl, shard)
    if not backend.sweeps:
        return impl.logprobs_entropy(hidden, weight, bias, targets, cfg)
    return FusedHead.apply(hidden, weight, bias, targets, impl, cfg)


def compacts_rows(cfg: HeadConfig, device: torch.device) -> bool:
    """Whether the sweep gathers the rows that count first (``cfg.compact_rows``; by default on
    CPU, where counting them costs nothing, and not on CUDA, where it synchronises)."""
    if torch.compiler.is_compiling():  # a data-dependent row count would break the graph
        return False
    return cfg.compact_rows if cfg.compact_rows is not None else device.type == "cpu"


def run_head(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
             cfg: HeadConfig, backend: backends.Backend,
             shard: "distributed.VocabShard | None" = None) -> tuple[Tensor, Tensor]:
    """Flat inputs, hidden [N, D], targets [N] int64 (-1 = not counted) -> (logprobs, entropy).

    Rows that do not count never touch an output: either only the rows that count are swept
    (``compact_rows``: padded and packed batches are often 30-70% masked, and those rows then
    cost nothing), or they are zeroed before any product (padding rows may hold NaN); their
    outputs are 0 and their gradient exactly 0 either way. With ``shard`` the weight is one
    rank's slice of a vocabulary split over a process group (targets stay global ids; every
    rank has the same targets, so compaction keeps the same rows everywhere).
    """
    dtypes = (hidden.dtype, weight.dtype) + ((bias.dtype,) if bias is not None else ())
    backend.check(hidden.device, dtypes, cfg.precision)
    N = hidden.shape[0]
    if N and compacts_rows(cfg, hidden.device):
        rows = (targets >= 0).nonzero().squeeze(1)  # the one host sync of compaction
        if rows.numel() < N:
            logprobs, entropy = _sweep(hidden.index_select(0, rows), weight, bias,
                                       targets.index_select(0, rows), cfg, backend, shard)
            zeros = logprobs.new_zeros(N)
            return zeros.index_copy(0, rows, logprobs), zeros.index_copy(0, rows, entropy)
    return _sweep(hidden, weight, bias, targets, cfg, backend, shard)


def flat_head_targets(targets: Tensor, valid: Tensor) -> Tensor:
    """int64 [N] targets for the sweeps: the id where ``valid``, -1 elsewhere."""
    return torch.where(valid.reshape(-1), targets.reshape(-1).long(), -1)


def fused_logprobs_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    backend: str = "auto",
    precision: str = "native",
    deterministic: bool = False,
    token_chunk: int | None = None,
    vocab_chunk: int | None = None,
    compact_rows: bool | None = None,
    validate: bool | None = None,
    process_group=None,
) -> tuple[Tensor, Tensor]:
    """Log-probability of the sampled tokens and entropy of the next-token distribution.

    Computes, without materialising the ``N x V`` logits (backends "triton" and "torch")::

        z_v  = softcap((hidden . weight_v + bias_v) / temperature)
        logp = z_y - logsumexp(z)             H = logsumexp(z) - sum_v softmax(z)_v z_v

    Args:
        hidden:  [B, T, D] or [N, D], float16 / bfloat16 / float32 (float64: torch, reference).
        weight:  [V, D] LM-head (unembedding) matrix; may differ in dtype from hidden.
        targets: integer, hidden's leading shape; ``ignore_index`` marks tokens to skip.
        bias:    optional [V]; ``-inf`` entries exclude tokens (e.g. a padded vocabulary).
        temperature, softcap: see the formula; softcap is applied after the temperature.
        backend: "triton" (CUDA), "torch" (chunked PyTorch), "reference" (materialised),
                 "auto" (triton on CUDA, torch otherwise).
        precision: "native" | "tf32" | "ieee", dot-product precision (see HeadConfig).
        deterministic: bitwise reproducible kernels (fixed configs, no autotuning).
        token_chunk, vocab_chunk: logits tile of the chunked sweeps (None: default).
        compact_rows: sweep only the tokens that count (gathered first; needs one host sync
                 for their number). Default: True on CPU, False on CUDA (no sync: rows that
                 do not count are zeroed and swept).
        validate: check values (NaN/Inf, target ids); default True on CPU, False on GPU
                  (value checks synchronise with the device). Unchecked ids outside
                  [0, V) are never read: they do not count (0, no gradient), on every backend.
        process_group: vocabulary parallelism (see :mod:`fused_pg.distributed`): ``weight``
                  (and ``bias``) hold this rank's consecutive slice ``[V_r, D]`` of the
                  vocabulary, in rank order; every rank passes the same hidden and targets
                  (global ids) and gets the same outputs; d_hidden is summed over the group.

    Returns:
        ``(logprobs, entropy)``, fp32 (fp64 for fp64 inputs), shaped like ``targets``, 0 at
        ignored tokens, differentiable w.r.t. hidden, weight and bias through both outputs.

    Example:
        >>> logp, ent = fused_logprobs_entropy(h, lm_head.weight, input_ids[:, 1:])
    """
    _, V = check_head_args(hidden, weight, targets, bias, ignore_index)
    cfg = HeadConfig(temperature=temperature, softcap=softcap, precision=precision,
                     deterministic=deterministic, token_chunk=token_chunk, vocab_chunk=vocab_chunk,
                     compact_rows=compact_rows)
    impl = backends.resolve(backend, hidden.device)
    shard = None if process_group is None else distributed.VocabShard.of(process_group, weight)
    if shard is not None:
        V = shard.vocab_size  # the whole vocabulary (a 0-dim tensor: no host sync)
    wide = targets.long()
    valid = (wide != ignore_index) & (wide >= 0) & (wide < V)
    if checks.resolve_validate(validate, hidden.device):
        if shard is None:
            checks.target_ids(wide, wide != ignore_index, V, ignore_index, bias)
            check_head_values(hidden, weight, bias, valid)
        else:
            shard.check_values(hidden, weight, bias, wide.reshape(-1), (wide != ignore_index).reshape(-1),
                               valid.reshape(-1), ignore_index)
    flat = flat_head_targets(wide, valid)
    logprobs, entropy = run_head(hidden.reshape(targets.numel(), hidden.shape[-1]), weight, bias, flat, cfg, impl,
                                 shard=shard)
    return logprobs.view(targets.shape), entropy.view(targets.shape)
