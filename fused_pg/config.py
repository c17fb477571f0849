"""Frozen option objects, validated once at construction.

``HeadConfig`` travels into the vocabulary sweeps (and the autograd ``Function``);
``LossConfig`` into the O(N) loss epilogue. Every check raises an error that names the
public argument it concerns.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from .checks import boolean, choice, positive_int, real

REPO_MODES = ("none", "fixed", "decorrelate")
# "+": the value of the named estimator with the gradient of k2 (a straight-through estimator)
KL_ESTIMATORS = ("k1", "k2", "k3", "abs", "k1+", "k3+", "abs+")
AGGREGATIONS = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
SEQUENCE_AGGREGATIONS = ("seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
IMPORTANCE_LEVELS = ("token", "sequence")
PRECISIONS = ("native", "tf32", "ieee")
BACKENDS = ("auto", "triton", "torch", "reference")


@dataclass(frozen=True)
class HeadConfig:
    """Options of the LM-head sweep: ``z = softcap((hidden @ weight.T + bias) / temperature)``.

    temperature:   logits are divided by it (sampling temperature of the rollout).
    softcap:       if set, ``z = softcap * tanh(z / softcap)`` after the temperature.
    precision:     dot-product precision. ``"native"``: operands in their storage dtype
                   (bf16/fp16 tensor cores; mixed dtypes promote to fp32; fp32 operands as
                   IEEE fp32 on the PyTorch backends, as 3xTF32 on tensor cores with Triton:
                   within 2^-20 relative per product), fp32 accumulation. ``"tf32"``: fp32
                   operands rounded to TF32 (Triton only). ``"ieee"``: operands upcast to
                   fp32, IEEE fp32 products.
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


class Default:
    """A keyword argument's library default, marking "not passed by the caller".

    The preset-able options of the loss functions (:data:`PRESET_OPTIONS`) have a ``Default``
    as their signature default, so that ``preset=`` can replace a value the caller did not
    pass while an explicit value (``None`` included) always wins. ``repr`` shows the value.
    """

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)


def _verl_kl_clamp(options: dict) -> float | None:
    # verl clamps its "low_var_kl" (k3) estimate, and the value of "k3+", to [-10, 10]; not k1/k2/abs
    return 10.0 if options["kl_estimator"] in ("k3", "k3+") else None


_TRL = dict(eps_low=0.2, eps_high=0.2, dual_clip=None, delta=None, importance_level="token",
            kl_estimator="k3", kl_clamp=None)
_VERL = dict(eps_low=0.2, eps_high=0.2, dual_clip=3.0, delta=None, aggregation="token-mean",
             importance_level="token", kl_estimator="k3", kl_clamp=_verl_kl_clamp)

PRESETS: dict[str, dict] = {
    # verl's actor defaults (clip_ratio 0.2, clip_ratio_c 3.0 dual clip, loss_agg_mode token-mean,
    # kl_loss_type low_var_kl = k3 clamped to [-10, 10]) and its "gspo" loss mode (no dual clip)
    "verl": _VERL,
    "verl-gspo": dict(_VERL, dual_clip=None, importance_level="sequence"),
    # TRL GRPOTrainer defaults (epsilon 0.2, epsilon_high = epsilon, k3 KL unclamped) per loss_type
    "trl-grpo": dict(_TRL, aggregation="seq-mean-token-mean"),
    "trl-gspo": dict(_TRL, aggregation="seq-mean-token-mean", importance_level="sequence"),
    "trl-dapo": dict(_TRL, aggregation="token-mean"),
    "trl-bnpo": dict(_TRL, aggregation="token-mean"),
    # max_completion_length defaults to 512 in TRL: pass max_length= when yours differs
    "trl-dr-grpo": dict(_TRL, aggregation="seq-mean-token-sum-norm", max_length=512),
    "trl-luspo": dict(_TRL, aggregation="seq-mean-token-sum", importance_level="sequence"),
    # OpenRLHF defaults (eps_clip 0.2, no dual clip, token-mean, kl estimator k1 clamped to [-10, 10])
    "openrlhf": dict(eps_low=0.2, eps_high=0.2, dual_clip=None, delta=None, aggregation="token-mean",
                     importance_level="token", kl_estimator="k1", kl_clamp=10.0),
}
"""Trainer defaults a ``preset=`` applies to the options the caller did not pass. A value may be
a function of the other resolved options. Presets never touch REPO / ADAPO options."""

PRESET_OPTIONS = ("eps_low", "eps_high", "dual_clip", "delta", "aggregation", "importance_level",
                  "kl_estimator", "kl_clamp", "max_length")
"""The options a preset may set (their signature defaults are :class:`Default` markers)."""


@dataclass(frozen=True)
class LossConfig:
    """Hyper-parameters of the policy-gradient epilogue (see :func:`fused_pg.repo_loss`).

    Build it with :meth:`from_options` to resolve ``preset`` and :class:`Default` markers.
    """

    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip: float | None = None
    delta: float | None = None
    repo: str = "decorrelate"
    repo_coef: float = 1.0
    repo_center: bool = True
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    kl_clamp: float | None = None
    kl_ratio_weight: bool = False
    kl_aggregation: str | None = None
    entropy_coef: float = 0.0
    entropy_aggregation: str | None = None
    aggregation: str = "token-mean"
    max_length: int | None = None
    importance_level: str = "token"
    tis_cap: float | None = None
    tis_level: str = "token"
    preset: str | None = None

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        for name in _LOSS_DEFAULTS:
            if isinstance(getattr(self, name), Default):
                raise TypeError(f"{name}: unresolved Default marker; build LossConfig with from_options()")
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
        if self.kl_clamp is not None:
            set_("kl_clamp", real("kl_clamp", self.kl_clamp, lo=0.0, lo_open=True))
        boolean("kl_ratio_weight", self.kl_ratio_weight)
        if self.kl_aggregation is not None:
            choice("kl_aggregation", self.kl_aggregation, AGGREGATIONS)
        set_("entropy_coef", real("entropy_coef", self.entropy_coef))
        if self.entropy_aggregation is not None:
            choice("entropy_aggregation", self.entropy_aggregation, AGGREGATIONS)
        choice("aggregation", self.aggregation, AGGREGATIONS)
        if self.max_length is not None:
            positive_int("max_length", self.max_length)
        choice("importance_level", self.importance_level, IMPORTANCE_LEVELS)
        if self.tis_cap is not None:
            set_("tis_cap", real("tis_cap", self.tis_cap, lo=0.0, lo_open=True))
        choice("tis_level", self.tis_level, IMPORTANCE_LEVELS)
        if self.preset is not None:
            choice("preset", self.preset, tuple(PRESETS))

    @classmethod
    def from_options(cls, preset: str | None = None, **options) -> "LossConfig":
        """Resolve ``preset`` and :class:`Default` markers, then validate.

        An option passed as a plain value (``None`` included) is used as is. An option left at
        its :class:`Default` marker, or not passed at all, takes the preset's value when ``preset`` names one that sets
        it, else the marker's library default. A preset's ``max_length`` only applies when some
        term uses ``"seq-mean-token-sum-norm"``.
        """
        if preset is not None:
            choice("preset", preset, tuple(PRESETS))
        table = PRESETS[preset] if preset is not None else {}
        options = {**{k: Default(_LOSS_DEFAULTS[k]) for k in PRESET_OPTIONS if k not in options}, **options}
        resolved = {k: v for k, v in options.items() if not isinstance(v, Default)}
        deferred = []
        for k, v in options.items():
            if not isinstance(v, Default):
                continue
            if k in table:
                if callable(table[k]):
                    deferred.append(k)
                else:
                    resolved[k] = table[k]
            else:
                resolved[k] = v.value
        for k in deferred:  # preset values that depend on other resolved options
            resolved[k] = table[k](resolved)
        cfg = cls(preset=preset, **resolved)
        if "max_length" in table and isinstance(options.get("max_length"), Default) \
                and "seq-mean-token-sum-norm" not in cfg.modes:
            # the preset's Dr.GRPO length only concerns that aggregation
            cfg = cls(preset=preset, **dict(resolved, max_length=None))
        return cfg

    @property
    def kl_mode(self) -> str:
        """Aggregation of the KL term (``kl_aggregation``, default ``aggregation``)."""
        return self.kl_aggregation or self.aggregation

    @property
    def entropy_mode(self) -> str:
        """Aggregation of the entropy term (``entropy_aggregation``, default ``aggregation``)."""
        return self.entropy_aggregation or self.aggregation

    @property
    def modes(self) -> tuple[str, str, str]:
        """Aggregations of the policy, KL and entropy terms."""
        return self.aggregation, self.kl_mode, self.entropy_mode

    @property
    def needs_sequences(self) -> bool:
        """Whether any option needs the sequence structure of the batch."""
        return (
            any(m in SEQUENCE_AGGREGATIONS for m in self.modes)
            or self.importance_level == "sequence"
            or (self.tis_cap is not None and self.tis_level == "sequence")
        )


_LOSS_DEFAULTS = {f.name: f.default for f in fields(LossConfig)}  # (computed once: torch.compile traces lookups)
