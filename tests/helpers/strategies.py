"""Hypothesis strategies of the property tests: head cases (shapes, dtypes, bias, temperature,
soft-cap, chunks, ...) and loss cases (layouts, masks and every loss option), and the option
tables they draw from.

Shapes are drawn by hypothesis (it finds the 1-token / V=2 / D=1 edges); options are picked
uniformly from a drawn seed (see ``option_rng``). Inputs are built from a case by ``inputs``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import hypothesis.strategies as st
import torch

from .backends import DTYPES, limits

TEMPERATURES = [1.0, 0.7, 1.3]
SOFTCAPS = [None, None, 4.0, 30.0]
LOGIT_SCALES = [0.5, 2.0, 6.0]  # std of the logits: flat, typical, peaky distributions


@dataclass
class HeadCase:
    dtype: str
    lead: tuple[int, ...]          # (B, T) or (N,)
    D: int
    V: int
    token_chunk: int | None
    vocab_chunk: int | None
    bias: str                      # "none" | "finite" | "neg_inf" (some entries -inf)
    temperature: float
    softcap: float | None
    ignore_index: int
    ignore_frac: float
    logit_scale: float
    precision: str
    seed: int
    compact_rows: bool | None = None   # None: the default (on CPU)

    @property
    def N(self) -> int:
        return math.prod(self.lead)

    def head_kwargs(self, backend: str) -> dict:
        return dict(temperature=self.temperature, softcap=self.softcap, ignore_index=self.ignore_index,
                    backend=backend, precision=self.precision, token_chunk=self.token_chunk,
                    vocab_chunk=self.vocab_chunk, compact_rows=self.compact_rows)


def _odd_biased(lo: int, hi: int):
    """Integers in [lo, hi], half of them odd by construction."""
    return st.one_of(st.integers(lo, hi), st.integers(lo // 2, (hi - 1) // 2).map(lambda k: 2 * k + 1)) \
        .filter(lambda x: lo <= x <= hi)


def option_rng(draw, *structure) -> random.Random:
    """A ``random.Random`` for the option choices of one example.

    Hypothesis biases ``sampled_from`` toward the first element (its "simplest" value): with
    ~100 examples that left options like ``repo="decorrelate"`` or ``kl_estimator="k3+"`` with
    a handful of examples. Options are therefore picked uniformly from a drawn seed, while
    shapes stay hypothesis-drawn (it finds the 1-token / V=2 / D=1 edges). The seed mixes the
    drawn integer with the drawn shapes (``structure``): hypothesis often repeats an integer
    across examples, and a repeated seed alone would repeat the whole option set. Every
    example's full case is printed on failure, so nothing is lost for reproduction.
    """
    return random.Random(f"{draw(st.integers(0, 2**32 - 1))}|{structure}")


@st.composite
def head_fields(draw, backend: str, lead: tuple[int, ...] | None = None, dtypes=None) -> dict:
    lim = limits(backend)
    if lead is None:
        if draw(st.booleans()):
            B = draw(st.integers(1, 4))
            lead = (B, draw(st.integers(1, max(1, lim.max_tokens // B))))
        else:
            lead = (draw(_odd_biased(1, lim.max_tokens)),)
    N = math.prod(lead)
    V = draw(_odd_biased(2, lim.max_vocab))
    D = draw(_odd_biased(1, lim.max_dim))
    rng = option_rng(draw, lead, V, D)
    dtype = rng.choice([d for d in (dtypes or DTYPES) if d in lim.dtypes])
    return dict(
        dtype=dtype, lead=lead, D=D, V=V,
        token_chunk=rng.randint(1, N) if rng.random() < 0.6 else None,
        # mostly several vocabulary chunks, V mostly not a multiple of the chunk
        vocab_chunk=rng.randint(1, max(1, V - 1)) if rng.random() < 0.75 else None,
        bias=rng.choice(["none", "finite", "neg_inf"]),
        temperature=rng.choice(TEMPERATURES),
        softcap=rng.choice(SOFTCAPS),
        ignore_index=rng.choice([-100, -1]),
        ignore_frac=rng.choice([0.0, 0.25]),
        logit_scale=rng.choice(LOGIT_SCALES),
        precision=rng.choice(["native", "ieee"]),
        seed=rng.getrandbits(31),
        compact_rows=rng.choice([None, False]),  # None: compacted on CPU; False: rows zeroed
    )


def head_cases(backend: str, **kw):
    return head_fields(backend, **kw).map(lambda f: HeadCase(**f))


# ---------------------------------------------------------------------------------------------
# the loss
# ---------------------------------------------------------------------------------------------

AGGREGATIONS = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
TOKEN_AGGREGATIONS = ("token-mean", "token-sum")
KL_ESTIMATORS = ("k1", "k2", "k3", "abs", "k1+", "k3+", "abs+")
PRESETS = (None, "verl", "verl-gspo", "trl-grpo", "trl-gspo", "trl-dapo", "trl-bnpo", "trl-dr-grpo", "trl-luspo",
           "openrlhf")
PRESET_OPTIONS = ("eps_low", "eps_high", "dual_clip", "delta", "aggregation", "importance_level",
                  "kl_estimator", "kl_clamp", "max_length")
LIBRARY_DEFAULTS = dict(eps_low=0.2, eps_high=0.28, dual_clip=None, delta=None, aggregation="token-mean",
                        importance_level="token", kl_estimator="k3", kl_clamp=None, max_length=None)
MASKS = ("none", "random", "random", "empty_rows", "empty_rows", "all_masked")  # repeats weight the pick
REPO_MODES = ("none", "fixed", "decorrelate", "relative")
REPO_CENTERS = ("batch", "state", "none", True, False)  # True / False: the older spelling


@dataclass
class LossCase:
    head: HeadCase
    layout: str                    # "dense" [B, T] | "packed" [N] + cu_seqlens | "packed-nocu"
    lengths: tuple[int, ...]       # sequence lengths (dense: B x T; packed-nocu: one run)
    mask: str
    mask_dtype: torch.dtype
    adv_per_seq: bool
    with_ref: bool
    with_rollout: bool
    opts: dict                     # keyword arguments shared by fused_pg.repo_loss and the oracle
    deterministic: bool
    weights: str = "none"          # "none" | "token" | "sequence" (per-token weights of the policy term)

    @property
    def dtype(self) -> str:
        return self.head.dtype

    @property
    def effective(self) -> dict:
        """``opts`` with the options left to the preset (or the library default) filled in,
        from the oracle's own preset table."""
        return effective_options(self.opts)

    def features(self) -> list[str]:
        """Option values of this example, for the coverage summary."""
        o, h = self.effective, self.head
        f = [f"dtype={h.dtype}", f"layout={self.layout}", f"mask={self.mask}", f"repo={o['repo']}",
             f"repo_center={o['repo_center']}",
             f"aggregation={o['aggregation']}", f"importance={o['importance_level']}", f"bias={h.bias}",
             f"softcap={h.softcap is not None}", f"temperature!=1={h.temperature != 1}",
             f"dual_clip={o['dual_clip'] is not None}", f"delta={o['delta'] is not None}",
             f"num_items={'num_items_in_batch' in o}", f"max_length={o['max_length'] is not None}",
             f"adv_per_seq={self.adv_per_seq}", f"entropy_coef!=0={o['entropy_coef'] != 0}",
             f"ignore_frac>0={h.ignore_frac > 0}", f"multi_vocab_chunks={(h.vocab_chunk or h.V) < h.V}",
             f"multi_token_chunks={(h.token_chunk or h.N) < h.N}", f"compact_rows={h.compact_rows}"]
        f += [f"preset={o.get('preset')}", f"weights={self.weights}",
              f"kl_aggregation={o.get('kl_aggregation')}", f"entropy_aggregation={o.get('entropy_aggregation')}"]
        if self.with_ref:
            f.append(f"kl={o['kl_estimator']},coef>0={o['kl_coef'] > 0}")
            f.append(f"kl_clamp={o['kl_clamp']},ratio_weight={o.get('kl_ratio_weight', False)}")
        if self.with_rollout:
            f.append(f"tis_level={o['tis_level']},tis_cap={o['tis_cap'] is not None}")
        if self.layout == "packed":
            f.append(f"empty_sequence={0 in self.lengths}")
        return f

    def fused_kwargs(self, backend: str) -> dict:
        h = self.head
        return dict(self.opts, backend=backend, precision=h.precision, deterministic=self.deterministic,
                    token_chunk=h.token_chunk, vocab_chunk=h.vocab_chunk, compact_rows=h.compact_rows)


@st.composite
def loss_cases(draw, backend: str, layouts=("dense", "packed", "packed-nocu"), masks=MASKS,
               dtypes=None, repos=REPO_MODES, centers=REPO_CENTERS) -> LossCase:
    lim = limits(backend)
    layout = draw(st.sampled_from(layouts))
    if layout == "dense":
        B = draw(st.integers(1, 4))
        T = draw(_odd_biased(1, max(1, lim.max_tokens // B)))
        lengths, lead = (T,) * B, (B, T)
    elif layout == "packed":
        # sequences of any length, empty ones included, at least one token overall
        lengths = tuple(draw(st.lists(st.integers(0, 9), min_size=1, max_size=6)
                             .filter(lambda ls: 0 < sum(ls) <= lim.max_tokens)))
        lead = (sum(lengths),)
    else:
        N = draw(_odd_biased(1, lim.max_tokens))
        lengths, lead = (N,), (N,)
    head = HeadCase(**draw(head_fields(backend, lead=lead, dtypes=dtypes)))

    seqs = layout != "packed-nocu"
    rng = option_rng(draw, head)
    pick = rng.choice
    opts: dict = dict(temperature=head.temperature, softcap=head.softcap, ignore_index=head.ignore_index)
    opts["repo"] = repo = pick(list(repos))
    if repo == "fixed":
        opts["repo_coef"] = pick([0.0, 0.1, 0.5, 2.0])
    elif repo == "decorrelate":
        opts["repo_coef"] = pick([0.3, 1.0, 1.0])
    elif repo == "relative":  # any sign; |zeta L| > 1 happens, so the sign clamp acts
        opts["repo_coef"] = pick([-2.0, -0.5, 0.0, 0.3, 1.0, 3.0])
    opts["repo_center"] = pick(list(centers))
    opts["eps_low"] = pick([0.0, 0.1, 0.2, 0.35])
    opts["eps_high"] = pick([0.0, 0.2, 0.28, 0.5])
    opts["dual_clip"] = pick([None, 1.5, 3.0])
    opts["delta"] = pick([None, 1.2, 1.6])
    with_ref = pick([True, False])
    opts["kl_coef"] = pick([0.0, 0.05, 0.5]) if with_ref else 0.0
    opts["kl_estimator"] = pick(KL_ESTIMATORS)
    opts["kl_clamp"] = pick([None, None, 10.0, 0.3, 0.05])  # |KL| <= ~1 here: 0.3 and 0.05 do clamp
    if pick([True, False, False]):
        opts["kl_ratio_weight"] = True
    opts["entropy_coef"] = pick([0.0, 0.01, -0.1])
    aggs = AGGREGATIONS if seqs else TOKEN_AGGREGATIONS
    opts["aggregation"] = agg = pick(aggs)
    opts["importance_level"] = pick(["token", "sequence"] if seqs else ["token"])
    for term in ("kl", "entropy"):  # separate normalisers of the KL and entropy terms
        if pick([True, False]):
            opts[f"{term}_aggregation"] = pick(aggs)
        if pick([True, False]):
            opts[f"{term}_num_items_in_batch"] = float(rng.randint(1, 3 * head.N))
    with_rollout = pick([True, False])
    if with_rollout:  # (rollout log-probs without tis_cap are only monitored)
        opts["tis_cap"] = pick([0.5, 1.5, 4.0, None])
        opts["tis_level"] = pick(["token", "sequence"] if seqs else ["token"])
    if pick([True, False]):
        opts["num_items_in_batch"] = float(rng.randint(1, 3 * head.N))
    modes = (agg, opts.get("kl_aggregation") or agg, opts.get("entropy_aggregation") or agg)
    if "seq-mean-token-sum-norm" in modes and (layout == "packed" or pick([True, False])):
        opts["max_length"] = max(lengths) + rng.randint(0, 5)
    # a preset: some of the options it sets are left out (the preset decides), the rest win
    preset = pick(PRESETS[:1] * 9 + PRESETS[1:])
    if preset is not None:
        opts["preset"] = preset
        for name in PRESET_OPTIONS:
            if pick([True, False]):
                opts.pop(name, None)
        eff = effective_options(opts)
        if not seqs:  # packed without cu_seqlens: only token-level options can apply
            for name in ("aggregation", "importance_level"):
                if name not in opts:
                    opts[name] = "token-mean" if name == "aggregation" else "token"
            eff = effective_options(opts)
        modes = (eff["aggregation"], opts.get("kl_aggregation") or eff["aggregation"],
                 opts.get("entropy_aggregation") or eff["aggregation"])
        if "seq-mean-token-sum-norm" not in modes:
            opts.pop("max_length", None)  # (a preset's Dr.GRPO length is then unused)
        elif layout == "packed" and effective_options(opts)["max_length"] is None:
            opts["max_length"] = max(lengths) + rng.randint(0, 5)
    weights = pick(["none", "token", "sequence"] if seqs else ["none", "token"])
    return LossCase(
        head=head, layout=layout, lengths=lengths, mask=pick(masks),
        mask_dtype=pick([torch.bool, torch.int64, torch.float32]),
        adv_per_seq=seqs and pick([True, False]), with_ref=with_ref, with_rollout=with_rollout,
        opts=opts, deterministic=pick([True, False]), weights=weights)


def effective_options(opts: dict) -> dict:
    """The values the oracle uses for the preset-able options (from its own preset table)."""
    from fused_pg.reference.loss import _preset_values

    table = _preset_values(opts.get("preset"), opts.get("kl_estimator"))
    out = dict(opts)
    for name in PRESET_OPTIONS:
        if name not in opts:
            out[name] = table.get(name, LIBRARY_DEFAULTS[name])
    return out
