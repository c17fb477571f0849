"""The LM-head building block: per-token log-probability and entropy, fused.

The steps, each used once by every public function that has a head: :func:`prepare`
(argument checks that read no values, the backend) and :func:`check_local_values` (the value
checks a rank makes alone, when ``validate``) -- both local, run before any collective inside
the strategy's agreement on errors --, then :func:`bind` (the vocabulary layout: one all-gather
for a split vocabulary), :func:`check_values` (the value checks made across a split
vocabulary's group), :func:`sweep` (the sweep itself, through
:class:`fused_pg.backends.sweep.Sweep`). :func:`fused_logprobs_entropy` is the public entry
point.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

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
    counted [N] bool: tokens whose target is not ``ignore_index`` (and once bound, without
    ``validate``, a vocabulary id: unchecked ids outside [0, V) never count); vocab: the
    vocabulary strategy (``LOCAL`` or a ``VocabParallel``) until :func:`bind`, then the bound
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
    """Check the head's arguments (no value reads) and pick the backend; no communication (the
    vocabulary layout is bound by :func:`bind`). ``validate=None``: value checks on CPU tensors
    only."""
    checks.head_args(hidden, weight, targets, bias, cfg.ignore_index)
    validate = checks.resolve_validate(validate, hidden.device)
    backend = backends.resolve(cfg.backend, hidden.device)
    dtypes = (hidden.dtype, weight.dtype) + ((bias.dtype,) if bias is not None else ())
    backend.check(hidden.device, dtypes, cfg.precision)
    if parallel.vocab is not LOCAL and not backend.sweeps:
        raise ValueError("a vocabulary split over ranks (parallel=VocabParallel, or process_group=) needs a "
                         f"sweep backend ('torch' or 'triton'), not backend={backend.name!r}")
    # targets widened to int64 first: a small integer dtype (uint8 wraps -100 to 156) must not
    # alias a vocabulary id
    wide = targets.reshape(-1).long()
    return HeadInputs(hidden=hidden.reshape(wide.numel(), hidden.shape[-1]), weight=weight, bias=bias,
                      targets=wide, counted=wide != cfg.ignore_index, vocab=parallel.vocab, backend=backend,
                      cfg=cfg, validate=validate)


def check_local_values(inputs: HeadInputs, valid: Tensor, ids: Tensor | None = None) -> None:
    """The value checks one rank makes alone (``validate=True``), before any collective: for a
    whole vocabulary all of them (the targets of the tokens ``ids``, default ``valid``, are
    vocabulary ids not excluded by a -inf bias; weight, bias and the hidden rows that count are
    finite); a split vocabulary makes its checks across the group (:func:`check_values`)."""
    inputs.vocab.check_local_values(inputs.hidden, inputs.weight, inputs.bias, inputs.targets,
                                    valid if ids is None else ids, valid, inputs.cfg.ignore_index)


def bind(inputs: HeadInputs) -> HeadInputs:
    """Bind the vocabulary layout (a split vocabulary: one all-gather of the shard sizes, so
    after the group agreed on the local checks). Unchecked ids outside [0, V) stop counting
    (a sync-free guard)."""
    vocab = inputs.vocab.bind(inputs.weight)
    counted = inputs.counted
    if not inputs.validate:
        counted = counted & (inputs.targets >= 0) & (inputs.targets < vocab.vocab_size)
    return replace(inputs, vocab=vocab, counted=counted)


def check_values(inputs: HeadInputs, valid: Tensor, ids: Tensor | None = None) -> None:
    """The value checks of a split vocabulary, made across its group once bound (every rank
    raises the same error); nothing is left for a whole vocabulary (:func:`check_local_values`)."""
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


def sweep(inputs: HeadInputs, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(logprobs, entropy, valid), flat [N]: the outputs are 0 where the returned ``valid`` is
    False (no gradient there).

    The returned ``valid`` is ``valid`` without the tokens whose log-probability came out -inf:
    a target excluded by a -inf bias, which only unchecked inputs (``validate=False``) can
    reach. Such a token does not count, like an unchecked id outside ``[0, V)``: decided on
    the device from the merged outputs (the same on every rank of a split vocabulary), without
    a host synchronisation, so that no -inf or NaN reaches a statistic or a gradient.

    Rows that do not count never touch an output: either only the rows that count are swept
    (``compact_rows``: padded and packed batches are often 30-70% masked, and those rows then
    cost nothing), or they are zeroed before any product (padding rows may hold NaN). With a
    vocabulary split over ranks every rank has the same targets, so compaction keeps the same
    rows everywhere.
    """
    logprobs, entropy = _sweep_valid(inputs, valid)
    live = valid & ~torch.isneginf(logprobs)
    return torch.where(live, logprobs, 0.0), torch.where(live, entropy, 0.0), live


def _sweep_valid(inputs: HeadInputs, valid: Tensor) -> tuple[Tensor, Tensor]:
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


class _LogprobsEntropy(NamedTuple):
    logprobs: Tensor
    entropy: Tensor


class HeadOutput(_LogprobsEntropy):
    """What :func:`fused_logprobs_entropy` returns: the pair ``(logprobs, entropy)`` (it unpacks
    as two tensors, ``logp, ent = ...``), and ``mask``: bool, the targets' shape, True for the
    tokens the head counted (target not ``ignore_index``; without ``validate``, also a
    vocabulary id not excluded by a -inf bias). The outputs are 0 elsewhere, which a function
    that takes log-probs cannot tell from a token of probability 1: pass ``mask`` along to
    :func:`fused_pg.repo_statistics` and :func:`fused_pg.policy_loss_from_logprobs` (combined
    with your own mask, ``mask & out.mask``)."""

    def __new__(cls, logprobs: Tensor, entropy: Tensor, mask: Tensor | None = None):
        out = super().__new__(cls, logprobs, entropy)
        out.mask = mask
        return out


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
) -> HeadOutput:
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
                 (value checks synchronise with the device). Unchecked ids outside [0, V), and
                 unchecked targets whose bias is -inf, are never read: they do not count (0,
                 no gradient), on every backend.

    Returns:
        :class:`HeadOutput`: ``(logprobs, entropy)``, fp32 (fp64 for fp64 inputs), shaped like
        ``targets``, 0 at tokens that do not count, differentiable w.r.t. hidden, weight and
        bias through both; and ``.mask``, the tokens that count (pass it on to functions that
        take log-probs: they see no targets).

    Example:
        >>> logp, ent = fused_logprobs_entropy(h, lm_head.weight, input_ids[:, 1:], temperature=0.7)
        >>> out = fused_logprobs_entropy(h, lm_head.weight, labels)   # labels padded with -100
        >>> stats = repo_statistics(out.logprobs, advantages, out.mask)
    """
    groups = {k: overrides.pop(k) for k in ("process_group",) if k in overrides}
    par = Parallel.of(parallel, **groups)
    if par.data is not LOCAL:
        raise ValueError("fused_logprobs_entropy has no batch-level statistics: pass only a VocabParallel")
    with par.agreement("fused_logprobs_entropy"):
        cfg = head_config("fused_logprobs_entropy", head, overrides)
        inputs = prepare(hidden, weight, targets, bias, cfg, par, validate)
        if inputs.validate:
            check_local_values(inputs, inputs.counted)
    inputs = bind(inputs)
    in_vocab = (inputs.targets >= 0) & (inputs.targets < inputs.vocab.vocab_size)
    valid = inputs.counted & in_vocab
    if inputs.validate:
        check_values(inputs, valid, ids=inputs.counted)
    logprobs, entropy, counted = sweep(inputs, valid)
    return HeadOutput(logprobs.view(targets.shape), entropy.view(targets.shape), counted.view(targets.shape))
