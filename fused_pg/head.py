"""The LM-head building block: per-token log-probability and entropy, fused.

Three steps, each used once by every public function that has a head:
:func:`prepare` (argument checks that read no values, the backend, the vocabulary layout),
:func:`check_values` (checks that read values, when ``validate``), :func:`sweep` (the sweep
itself, through :class:`fused_pg.backends.sweep.Sweep`). :func:`fused_logprobs_entropy` is the
public entry point.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import backends, checks
from .backends.common import compute_dtype
from .backends.sweep import Sweep
from .config import HeadConfig, head_config
from .parallel import LOCAL, Parallel


@dataclass(frozen=True)
class HeadInputs:
    """The head's arguments, checked and flattened.

    hidden [N, D], weight [V_r, D], bias [V_r] | None; targets [N] int64 as given (global ids);
    counted [N] bool: tokens whose target is not ``ignore_index`` (and, without ``validate``,
    a vocabulary id: unchecked ids outside [0, V) never count); vocab: the bound vocabulary
    layout (``vocab_size``, ``local_targets``, ``check_values``, the sweep's ``hooks``);
    validate: whether the checks that read values run.
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    targets: Tensor
    counted: Tensor
    vocab: object
    backend: backends.Backend
    cfg: HeadConfig
    validate: bool


def prepare(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None, cfg: HeadConfig,
            parallel: Parallel, validate: bool | None) -> HeadInputs:
    """Check the head's arguments (no value reads), pick the backend, bind the vocabulary layout.
    ``validate=None``: value checks on CPU tensors only."""
    checks.head_args(hidden, weight, targets, bias, cfg.ignore_index)
    validate = checks.resolve_validate(validate, hidden.device)
    backend = backends.resolve(cfg.backend, hidden.device)
    dtypes = (hidden.dtype, weight.dtype) + ((bias.dtype,) if bias is not None else ())
    backend.check(hidden.device, dtypes, cfg.precision)
    if parallel.vocab is not LOCAL and not backend.sweeps:
        raise ValueError("a vocabulary split over ranks (parallel=VocabParallel, or process_group=) needs a "
                         f"sweep backend ('torch' or 'triton'), not backend={backend.name!r}")
    vocab = parallel.vocab.bind(weight)
    # targets widened to int64 first: a small integer dtype (uint8 wraps -100 to 156) must not
    # alias a vocabulary id. Unchecked ids outside [0, V) never count (a sync-free guard).
    wide = targets.reshape(-1).long()
    counted = wide != cfg.ignore_index
    if not validate:
        counted = counted & (wide >= 0) & (wide < vocab.vocab_size)
    return HeadInputs(hidden=hidden.reshape(wide.numel(), hidden.shape[-1]), weight=weight, bias=bias,
                      targets=wide, counted=counted, vocab=vocab, backend=backend, cfg=cfg, validate=validate)


def check_values(inputs: HeadInputs, valid: Tensor, ids: Tensor | None = None) -> None:
    """The checks that read values (``validate=True``): the targets of the tokens ``ids``
    (default: ``valid``) are vocabulary ids not excluded by a -inf bias; weight, bias and the
    hidden rows that count (``valid``) are finite (made across the group for a split vocabulary)."""
    inputs.vocab.check_values(inputs.hidden, inputs.weight, inputs.bias, inputs.targets,
                              valid if ids is None else ids, valid, inputs.cfg.ignore_index)


def compacts_rows(cfg: HeadConfig, device: torch.device) -> bool:
    """Whether the sweep gathers the rows that count first (``cfg.compact_rows``; by default on
    CPU, where counting them costs nothing, and not on CUDA, where it synchronises)."""
    if torch.compiler.is_compiling():  # a data-dependent row count would break the graph
        return False
    return cfg.compact_rows if cfg.compact_rows is not None else device.type == "cpu"


def _sweep_rows(inputs: HeadInputs, hidden: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    weight, bias, backend = inputs.weight, inputs.bias, inputs.backend
    if hidden.shape[0] == 0:  # nothing to sweep: empty outputs, still connected (zero gradients)
        anchor = hidden.sum() + weight.sum() + (bias.sum() if bias is not None else 0.0)
        dtype = compute_dtype(hidden, weight)
        empty = torch.zeros(0, dtype=dtype, device=hidden.device) * anchor.to(dtype)
        return empty, empty.clone()
    if not backend.skips_invalid_rows:
        hidden = torch.where((targets >= 0)[:, None], hidden, 0.0)
    impl = backend.load()
    if not backend.sweeps:
        return impl.logprobs_entropy(hidden, weight, bias, targets, inputs.cfg)
    return Sweep.apply(hidden, weight, bias, inputs.vocab.local_targets(targets), impl, inputs.cfg,
                       inputs.vocab.hooks)


def sweep(inputs: HeadInputs, valid: Tensor) -> tuple[Tensor, Tensor]:
    """(logprobs, entropy), flat [N], 0 where ``valid`` is False (no gradient there).

    Rows that do not count never touch an output: either only the rows that count are swept
    (``compact_rows``: padded and packed batches are often 30-70% masked, and those rows then
    cost nothing), or they are zeroed before any product (padding rows may hold NaN). With a
    vocabulary split over ranks every rank has the same targets, so compaction keeps the same
    rows everywhere.
    """
    targets = torch.where(valid, inputs.targets, -1)
    hidden = inputs.hidden
    N = hidden.shape[0]
    if N and compacts_rows(inputs.cfg, hidden.device):
        rows = valid.nonzero().squeeze(1)  # the one host sync of compaction
        if rows.numel() < N:
            logprobs, entropy = _sweep_rows(inputs, hidden.index_select(0, rows), targets.index_select(0, rows))
            zeros = logprobs.new_zeros(N)
            return zeros.index_copy(0, rows, logprobs), zeros.index_copy(0, rows, entropy)
    return _sweep_rows(inputs, hidden, targets)


def fused_logprobs_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    head: HeadConfig | None = None,
    parallel=None,
    validate: bool | None = None,
    **overrides,
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
        head:    a :class:`fused_pg.HeadConfig` (temperature, softcap, backend, precision, ...);
                 any of its fields may also be passed as a keyword (``temperature=0.7``).
        parallel: ``VocabParallel(group)`` when ``weight`` (and ``bias``) hold this rank's
                 consecutive slice ``[V_r, D]`` of the vocabulary, in rank order; every rank
                 passes the same hidden and targets (global ids) and gets the same outputs
                 (``process_group=group`` is the older spelling).
        validate: check values (NaN/Inf, target ids); default True on CPU, False on GPU
                 (value checks synchronise with the device). Unchecked ids outside [0, V)
                 are never read: they do not count (0, no gradient), on every backend.

    Returns:
        ``(logprobs, entropy)``, fp32 (fp64 for fp64 inputs), shaped like ``targets``, 0 at
        tokens that do not count, differentiable w.r.t. hidden, weight and bias through both.

    Example:
        >>> logp, ent = fused_logprobs_entropy(h, lm_head.weight, input_ids[:, 1:], temperature=0.7)
    """
    groups = {k: overrides.pop(k) for k in ("process_group",) if k in overrides}
    cfg = head_config("fused_logprobs_entropy", head, overrides)
    par = Parallel.of(parallel, **groups)
    if par.data is not LOCAL:
        raise ValueError("fused_logprobs_entropy has no batch-level statistics: pass only a VocabParallel")
    inputs = prepare(hidden, weight, targets, bias, cfg, par, validate)
    in_vocab = (inputs.targets >= 0) & (inputs.targets < inputs.vocab.vocab_size)
    valid = inputs.counted & in_vocab
    if inputs.validate:
        check_values(inputs, valid, ids=inputs.counted)
    logprobs, entropy = sweep(inputs, valid)
    return logprobs.view(targets.shape), entropy.view(targets.shape)
