"""Options as values: :class:`LossConfig` (the policy-gradient epilogue) and :class:`HeadConfig`
(the LM-head sweep), frozen and validated once, at construction.

Each option is documented once, on its field (the ``doc`` of :func:`option`); the README's
option tables are generated from those docs (:func:`options_markdown`). The public functions
take ``config=`` / ``head=`` and also accept any field as a keyword override, checked by name
(:func:`resolve`): ``repo_loss(..., eps_high=0.3)`` and
``repo_loss(..., config=LossConfig(eps_high=0.3))`` are the same call.
"""

from __future__ import annotations

import difflib
from dataclasses import MISSING, dataclass, field, fields, replace

from .checks import boolean, choice, positive_int, real

REPO_MODES = ("none", "fixed", "decorrelate", "relative")
# what the REPO correction subtracts from logp: the batch mean, -H(s) (the policy's own expectation
# of logp at that state, so L = logp + H), or nothing
REPO_CENTERS = ("batch", "state", "none")
# "+": the value of the named estimator with the gradient of k2 (a straight-through estimator)
KL_ESTIMATORS = ("k1", "k2", "k3", "abs", "k1+", "k3+", "abs+")
AGGREGATIONS = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
SEQUENCE_AGGREGATIONS = ("seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
IMPORTANCE_LEVELS = ("token", "sequence")
PRECISIONS = ("native", "tf32", "ieee")
BACKENDS = ("auto", "triton", "torch", "reference")


def option(default, doc: str):
    """A config field with its one documentation string."""
    return field(default=default, metadata={"doc": doc})


def _set(obj, name: str, value) -> None:
    object.__setattr__(obj, name, value)


@dataclass(frozen=True)
class HeadConfig:
    """Options of the LM-head sweep ``z = softcap((hidden @ weight.T + bias) / temperature)``."""

    temperature: float = option(1.0, "logits are divided by it (the sampling temperature of the rollout); > 0")
    softcap: float | None = option(
        None, "if set, `z = softcap * tanh(z / softcap)` after the temperature (Gemma-2 style)")
    precision: str = option(
        "native", '"native": operands in their storage dtype (bf16/fp16 tensor cores; mixed dtypes promote '
        "to fp32; fp32 operands as IEEE fp32 on the PyTorch backends, as 3xTF32 on tensor cores with Triton: "
        'within 2^-20 relative per product), fp32 accumulation; "tf32": fp32 operands rounded to TF32 '
        '(triton only); "ieee": operands upcast to fp32, IEEE fp32 products')
    deterministic: bool = option(
        False, "bitwise reproducible results (fixed tile configs, no autotuning; the sweeps never use atomics)")
    token_chunk: int | None = option(None, "rows of the logits tile a chunked sweep holds at once (None: backend default)")
    vocab_chunk: int | None = option(
        None, "vocabulary columns of the logits tile a chunked sweep holds at once (None: backend default)")
    compact_rows: bool | None = option(
        None, "sweep only the rows that count (one host sync for their number); None: on CPU only")
    backend: str = option(
        "auto", '"triton" (CUDA kernels), "torch" (chunked PyTorch), "reference" (materialised logits, '
        'fp64-capable), "auto" (triton on CUDA, torch otherwise)')
    ignore_index: int = option(
        -100, "target id of the tokens the head skips (HF padding convention): log-prob and entropy 0, not "
        "counted by `repo_loss`; functions that take log-probs see no targets: pass them the head's `mask`")

    def __post_init__(self):
        _set(self, "temperature", real("temperature", self.temperature, lo=0.0, lo_open=True))
        if self.softcap is not None:
            _set(self, "softcap", real("softcap", self.softcap, lo=0.0, lo_open=True))
        choice("precision", self.precision, PRECISIONS)
        boolean("deterministic", self.deterministic)
        for name in ("token_chunk", "vocab_chunk"):
            if getattr(self, name) is not None:
                positive_int(name, getattr(self, name))
        if self.compact_rows is not None:
            boolean("compact_rows", self.compact_rows)
        choice("backend", self.backend, BACKENDS)
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(self.ignore_index).__name__}")


@dataclass(frozen=True)
class LossConfig:
    """Hyper-parameters of the policy-gradient epilogue (the formulas: :func:`fused_pg.repo_loss`).

    Build one directly, or from a trainer's defaults with :meth:`preset`.
    """

    eps_low: float = option(0.2, "lower clip offset: the ratio is clipped at `1 - eps_low` where A' < 0; in [0, 1)")
    eps_high: float = option(
        0.28, "upper clip offset: the ratio is clipped at `1 + eps_high` where A' > 0 (DAPO clip-higher)")
    dual_clip: float | None = option(None, "verl's `clip_ratio_c` (> 1): caps the loss at `-dual_clip * A'` where A' < 0")
    delta: float | None = option(None, "TRL's two-sided cap (> 1): `min(r, delta)` in the unclipped term, whatever the sign of A'")
    repo: str = option(
        "decorrelate", '"none" | "fixed" | "decorrelate" (`A\' = A - zeta L`) | "relative" (REPO-R: '
        "`A' = A (1 - zeta L)` where A > 0, `A (1 + zeta L)` where A < 0, each clamped to keep the sign "
        "of A), with L the centred log-prob of `repo_center`, detached (docs/repo.md)")
    repo_coef: float = option(
        1.0, 'zeta for "fixed" (>= 0) and "relative" (any sign: > 0 raises entropy, < 0 lowers it); gamma in '
        '[0, 1] for "decorrelate" (`zeta = gamma Cov(A, L) / Var(L)`)')
    repo_center: str = option(
        "batch", 'L = logp - (the batch mean of logp) for "batch", logp + H (H the token\'s entropy: centred '
        'per state) for "state", logp for "none"; True / False mean "batch" / "none"')
    kl_coef: float = option(0.0, "weight of the KL penalty to the reference policy (needs `ref_logprobs`); >= 0")
    kl_estimator: str = option(
        "k3", '"k1" | "k2" | "k3" | "abs", or "k1+" | "k3+" | "abs+" (that value with the gradient of k2)')
    kl_clamp: float | None = option(None, "bounds the per-token KL value to `[-kl_clamp, kl_clamp]` (None: no bound)")
    kl_ratio_weight: bool = option(
        False, "multiply the per-token KL by the importance ratio (TRL's `use_bias_correction_kl`)")
    kl_aggregation: str | None = option(
        None, "aggregation of the KL term (None: `aggregation`, sharing its normaliser)")
    entropy_coef: float = option(0.0, "entropy bonus: the loss subtracts `entropy_coef * agg(H)`")
    entropy_aggregation: str | None = option(None, "aggregation of the entropy term (None: `aggregation`)")
    aggregation: str = option(
        "token-mean", '"token-mean" | "token-sum" | "seq-mean-token-mean" | "seq-mean-token-sum" | '
        '"seq-mean-token-sum-norm" (Dr.GRPO: divisor num_seqs * max_length)')
    max_length: int | None = option(
        None, 'Dr.GRPO\'s constant length for "seq-mean-token-sum-norm" (default: T of [B, T] inputs, '
        "the longest T of the group under `DataParallel`; needed with packed inputs and with a given "
        "normaliser such as `num_items_in_batch`; TRL's is `max_completion_length`)")
    importance_level: str = option(
        "token", '"token", or "sequence" (GSPO: the geometric-mean ratio of the sequence)')
    tis_cap: float | None = option(
        None, "truncated importance sampling against the inference engine: "
        "`min(exp(old - rollout), tis_cap)` multiplies the policy term (needs `rollout_logprobs`)")
    tis_level: str = option("token", '"token", or "sequence" (the sum of a sequence\'s log-ratios)')

    def __post_init__(self):
        _set(self, "eps_low", real("eps_low", self.eps_low, lo=0.0, hi=1.0, hi_open=True))
        _set(self, "eps_high", real("eps_high", self.eps_high, lo=0.0))
        if self.dual_clip is not None:
            # verl's clip_ratio_c: the lower bound -c*A only makes sense above the clip range
            _set(self, "dual_clip", real("dual_clip", self.dual_clip, lo=1.0, lo_open=True))
        if self.delta is not None:
            _set(self, "delta", real("delta", self.delta, lo=1.0, lo_open=True))
        choice("repo", self.repo, REPO_MODES)
        if self.repo == "relative":  # REPO-R: the sign of zeta picks the direction
            _set(self, "repo_coef", real("repo_coef", self.repo_coef))
        else:
            coef = real("repo_coef", self.repo_coef, hi=1.0 if self.repo == "decorrelate" else None)
            if coef < 0:
                raise ValueError(f"repo_coef must be >= 0 for repo={self.repo!r}, got {coef} (a negative zeta, "
                                 'which lowers entropy, is for repo="relative")')
            _set(self, "repo_coef", coef)
        if isinstance(self.repo_center, bool):  # the older spelling
            _set(self, "repo_center", "batch" if self.repo_center else "none")
        if not isinstance(self.repo_center, str):
            raise TypeError(f"repo_center must be one of {REPO_CENTERS} (or a bool), "
                            f"got {type(self.repo_center).__name__}")
        choice("repo_center", self.repo_center, REPO_CENTERS)
        _set(self, "kl_coef", real("kl_coef", self.kl_coef, lo=0.0))
        choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        if self.kl_clamp is not None:
            _set(self, "kl_clamp", real("kl_clamp", self.kl_clamp, lo=0.0, lo_open=True))
        boolean("kl_ratio_weight", self.kl_ratio_weight)
        _set(self, "entropy_coef", real("entropy_coef", self.entropy_coef))
        for name in ("aggregation", "kl_aggregation", "entropy_aggregation"):
            if getattr(self, name) is not None:
                choice(name, getattr(self, name), AGGREGATIONS)
        if self.max_length is not None:
            positive_int("max_length", self.max_length)
        choice("importance_level", self.importance_level, IMPORTANCE_LEVELS)
        if self.tis_cap is not None:
            _set(self, "tis_cap", real("tis_cap", self.tis_cap, lo=0.0, lo_open=True))
        choice("tis_level", self.tis_level, IMPORTANCE_LEVELS)

    @classmethod
    def preset(cls, name: str, **overrides) -> "LossConfig":
        """A trainer's defaults (:data:`PRESETS`) with ``overrides`` on top.

        A preset sets the clip range, dual clip / delta, aggregation, importance level and KL
        estimator of its trainer, never the REPO options, nor lengths the trainer takes from its
        own settings: "trl-dr-grpo" divides like TRL only with ``max_length=`` TRL's
        ``max_completion_length`` (otherwise by T, see ``max_length``). A preset value may
        depend on the other options (verl clamps only its k3 estimates), so pass overrides here
        rather than ``dataclasses.replace`` a preset's result.
        """
        choice("preset", name, tuple(PRESETS))
        _check_names("LossConfig.preset", overrides, LOSS_FIELDS)
        table = PRESETS[name]
        resolved = {**{k: v for k, v in table.items() if not callable(v)}, **overrides}
        for k, v in table.items():  # preset values that depend on other resolved options
            if callable(v) and k not in overrides:
                resolved[k] = v(resolved)
        return cls(**resolved)

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
        return (any(m in SEQUENCE_AGGREGATIONS for m in self.modes)
                or self.importance_level == "sequence"
                or (self.tis_cap is not None and self.tis_level == "sequence"))


def _verl_kl_clamp(options: dict) -> float | None:
    # verl clamps its "low_var_kl" (k3) estimate, and the value of "k3+", to [-10, 10]; not k1/k2/abs
    return 10.0 if options.get("kl_estimator", "k3") in ("k3", "k3+") else None


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
    # TRL divides by max_completion_length (a trainer setting, 512 by default): pass it as
    # max_length= for TRL's divisor; without it the divisor uses T, as for any Dr.GRPO aggregation
    "trl-dr-grpo": dict(_TRL, aggregation="seq-mean-token-sum-norm"),
    "trl-luspo": dict(_TRL, aggregation="seq-mean-token-sum", importance_level="sequence"),
    # OpenRLHF defaults (eps_clip 0.2, no dual clip, token-mean, kl estimator k1 clamped to [-10, 10])
    "openrlhf": dict(eps_low=0.2, eps_high=0.2, dual_clip=None, delta=None, aggregation="token-mean",
                     importance_level="token", kl_estimator="k1", kl_clamp=10.0),
}
"""Trainer defaults, applied by :meth:`LossConfig.preset`. A value may be a function of the other
resolved options."""

PRESET_OPTIONS = ("eps_low", "eps_high", "dual_clip", "delta", "aggregation", "importance_level",
                  "kl_estimator", "kl_clamp")
"""The options a preset may set."""

LOSS_FIELDS = tuple(f.name for f in fields(LossConfig))
HEAD_FIELDS = tuple(f.name for f in fields(HeadConfig))


# ---------------------------------------------------------------------------------------------
# keyword overrides of the public functions
# ---------------------------------------------------------------------------------------------

def _check_names(where: str, given, valid) -> None:
    for name in given:
        if name not in valid:
            near = difflib.get_close_matches(name, valid, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise TypeError(f"{where}() got an unexpected keyword argument {name!r}{hint}")


def resolve(where: str, config: LossConfig | None, head: HeadConfig | None, overrides: dict,
            *, extras: tuple[str, ...] = (), head_fields: bool = True) -> tuple[LossConfig, HeadConfig | None, dict]:
    """The configs of one call: ``config`` / ``head`` (or the defaults) with the keyword
    ``overrides`` applied, every name checked.

    ``preset=`` builds the base ``LossConfig`` with :meth:`LossConfig.preset` (it cannot be
    combined with ``config=``). ``extras`` names further keywords the caller handles itself;
    they are returned in the third dict. Raises ``TypeError`` for an unknown keyword, naming
    the nearest valid one.
    """
    valid = ("preset", *LOSS_FIELDS, *(HEAD_FIELDS if head_fields else ()), *extras)
    _check_names(where, overrides, valid)
    if config is not None and not isinstance(config, LossConfig):
        raise TypeError(f"config must be a fused_pg.LossConfig, got {type(config).__name__}")
    if head is not None and not isinstance(head, HeadConfig):
        raise TypeError(f"head must be a fused_pg.HeadConfig, got {type(head).__name__}")
    loss_kw = {k: v for k, v in overrides.items() if k in LOSS_FIELDS}
    preset = overrides.get("preset")
    if preset is not None:
        if config is not None:
            raise TypeError(f"{where}(): pass either config= or preset=, not both "
                            "(LossConfig.preset(name, ...) builds a config from a preset)")
        config = LossConfig.preset(preset, **loss_kw)
    elif config is None:
        config = LossConfig(**loss_kw)
    elif loss_kw:
        config = replace(config, **loss_kw)
    if head_fields:
        head_kw = {k: v for k, v in overrides.items() if k in HEAD_FIELDS}
        head = (head or HeadConfig()) if not head_kw else replace(head or HeadConfig(), **head_kw)
    return config, head, {k: v for k, v in overrides.items() if k in extras}


def head_config(where: str, head: HeadConfig | None, overrides: dict) -> HeadConfig:
    """``head`` (or the defaults) with keyword overrides of its fields, every name checked."""
    _check_names(where, overrides, HEAD_FIELDS)
    if head is not None and not isinstance(head, HeadConfig):
        raise TypeError(f"head must be a fused_pg.HeadConfig, got {type(head).__name__}")
    return replace(head or HeadConfig(), **overrides) if overrides else (head or HeadConfig())


# ---------------------------------------------------------------------------------------------
# documentation generated from the fields
# ---------------------------------------------------------------------------------------------

def options_markdown(cls) -> str:
    """A Markdown table of ``cls``'s fields: option, default, meaning (from the fields' docs)."""
    rows = ["| option | default | meaning |", "| --- | --- | --- |"]
    for f in fields(cls):
        default = f.default if f.default is not MISSING else None
        doc = f.metadata["doc"].replace("|", "\\|")  # a bare "|" would split the Markdown cell
        rows.append(f"| `{f.name}` | `{default!r}` | {doc} |")
    return "\n".join(rows)
