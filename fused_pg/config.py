"""Frozen option objects, validated once at construction.

``HeadConfig`` travels into the vocabulary sweeps (and the autograd ``Function``);
``LossConfig`` into the O(N) loss epilogue. Every check raises an error that names the
public argument it concerns.
"""

from __future__ import annotations

from dataclasses import dataclass

from .checks import boolean, choice, positive_int, real

REPO_MODES = ("none", "fixed", "decorrelate")
KL_ESTIMATORS = ("k1", "k2", "k3", "k3+")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
IMPORTANCE_LEVELS = ("token", "sequence")
PRECISIONS = ("native", "tf32", "ieee")
BACKENDS = ("auto", "triton", "torch", "reference")


@dataclass(frozen=True)
class HeadConfig:
    """Options of the LM-head sweep: ``z = softcap((hidden @ weight.T + bias) / temperature)``.

    temperature:   logits are divided by it (sampling temperature of the rollout).
    softcap:       if set, ``z = softcap * tanh(z / softcap)`` after the temperature.
    precision:     dot-product precision. ``"native"``: operands in their storage dtype
                   (bf16/fp16 tensor cores, fp32 as IEEE fp32; mixed dtypes promote), fp32
                   accumulation. ``"tf32"``: fp32 operands rounded to TF32 (Triton only).
                   ``"ieee"``: operands upcast to fp32, IEEE fp32 products.
    deterministic: bitwise reproducible results (fixed tile configs, no autotuning; the
                   sweeps never use atomics in any mode).
    token_chunk, vocab_chunk: tile of logits a chunked sweep holds at once (None: backend
                   default).
    compact_rows:  sweep only the rows that count (one host sync for their number); None:
                   on CPU only.
    """

    temperature: float = 1.0
    softcap: float | None = None
    precision: str = "native"
    deterministic: bool = False
    token_chunk: int | None = None
    vocab_chunk: int | None = None
    compact_rows: bool | None = None

    def __post_init__(self):
        if self.compact_rows is not None:
            boolean("compact_rows", self.compact_rows)
        object.__setattr__(self, "temperature", real("temperature", self.temperature, lo=0.0, lo_open=True))
        if self.softcap is not None:
            object.__setattr__(self, "softcap", real("softcap", self.softcap, lo=0.0, lo_open=True))
        choice("precision", self.precision, PRECISIONS)
        boolean("deterministic", self.deterministic)
        if self.token_chunk is not None:
            positive_int("token_chunk", self.token_chunk)
        if self.vocab_chunk is not None:
            positive_int("vocab_chunk", self.vocab_chunk)


@dataclass(frozen=True)
class LossConfig:
    """Hyper-parameters of the policy-gradient epilogue (see :func:`fused_pg.repo_loss`)."""

    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip: float | None = None
    delta: float | None = None
    repo: str = "decorrelate"
    repo_coef: float = 1.0
    repo_center: bool = True
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    aggregation: str = "token-mean"
    max_length: int | None = None
    importance_level: str = "token"
    tis_cap: float | None = None
    tis_level: str = "token"

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("eps_low", real("eps_low", self.eps_low, lo=0.0, hi=1.0, hi_open=True))
        set_("eps_high", real("eps_high", self.eps_high, lo=0.0))
        if self.dual_clip is not None:
            # verl's clip_ratio_c: the lower bound -c*A only makes sense above the clip range
            set_("dual_clip", real("dual_clip", self.dual_clip, lo=1.0, lo_open=True))
        if self.delta is not None:
            # TRL's two-sided cap min(r, delta) on the unclipped ratio
            set_("delta", real("delta", self.delta, lo=1.0, lo_open=True))
        choice("repo", self.repo, REPO_MODES)
        if self.repo == "decorrelate":
            set_("repo_coef", real("repo_coef", self.repo_coef, lo=0.0, hi=1.0))
        else:
            set_("repo_coef", real("repo_coef", self.repo_coef, lo=0.0))
        boolean("repo_center", self.repo_center)
        set_("kl_coef", real("kl_coef", self.kl_coef, lo=0.0))
        choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        set_("entropy_coef", real("entropy_coef", self.entropy_coef))
        choice("aggregation", self.aggregation, AGGREGATIONS)
        if self.max_length is not None:
            positive_int("max_length", self.max_length)
        choice("importance_level", self.importance_level, IMPORTANCE_LEVELS)
        if self.tis_cap is not None:
            set_("tis_cap", real("tis_cap", self.tis_cap, lo=0.0, lo_open=True))
        choice("tis_level", self.tis_level, IMPORTANCE_LEVELS)

    @property
    def needs_sequences(self) -> bool:
        """Whether any option needs the sequence structure of the batch."""
        return (
            self.aggregation != "token-mean"
            or self.importance_level == "sequence"
            or (self.tis_cap is not None and self.tis_level == "sequence")
        )
