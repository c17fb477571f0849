"""Entropy dynamics of GRPO on a tiny causal transformer: forced tokens and forks, the clip's
diagnostics, sequential learning, and a bf16 sampler.

A 2-layer causal transformer (d = 64, 4 heads, built here from ``torch.nn``) answers a
verifiable task whose answers mix **forced** positions (one right token, fixed by the prompt
and the tokens before it) with a few **forks** (several right tokens), as an LLM's answers
mostly do. A short supervised warm-up on a *skewed* sample of the valid answers makes the
start calibrated but narrow, like a pretrained model. Then GRPO-style RL with fused-pg's
losses (``backend="torch"``), every method the same loop; only the loss call differs. The
losses get the transformer's final hidden states and the LM-head weight.

The task (vocabulary V = ``vocab``: fork tokens ``0 .. n_fork_tokens-1``, content tokens after)
    A prompt is ``prompt_len`` = 4 content tokens ``a0 a1 a2 a3``. The answer follows the
    template ``a0 a1 F pair(F) a2 a3 F pair(F)``: ``a_i`` copies the prompt, ``F`` is a fork
    and ``pair(F)`` a fixed content token for each fork token (it depends on the sampled fork).
    Reward 1 iff every forced token is right and every fork is in the task's valid set:
    phase 1 accepts fork tokens ``0 .. n_valid-1`` (``n_valid ** 2`` = 16 correct answers per
    prompt), 6 of 8 tokens forced. The warm-up shows the valid fork tokens with the skewed
    probabilities ``warmup_fork_probs`` (0.6, 0.25, 0.1, 0.05) and stops before the forced
    positions are perfect, so RL has something to learn at both kinds of position.

Phase 1 (``--mu``)
    GRPO groups (``group_size`` samples per prompt, advantages ``(r - mean) / (std + 1e-6)``
    per group, the same for every token of a sequence), ``mu`` = 1 or 4 mini-batch updates per
    rollout (behaviour log-probs fixed at sampling time, so from the second mini-batch on the
    ratios have moved and the clips act). The mini-batch and the number of optimizer steps are
    the same in both regimes.

Phase 2: sequential learning
    Every phase-1 policy (and the warm-up policy) is then trained with plain PG, on-policy, on a
    second task whose answers are rare under it: only the warm-up's *rare* fork tokens
    (``phase2_forks``: 2 and 3, shown 10% and 5% of the time) are accepted. The reward curve and
    its area say how much trainability each phase-1 method left.

Precision (``--precision``)
    ``fp32``           sampler and trainer in fp32; behaviour log-probs from the trainer's path
                       (the on-policy ratio is exactly 1);
    the three ``bf16-*`` modes sample from a bf16 copy of the policy whose logits carry a common
    offset ``sampler_logit_offset`` before rounding to bf16 (softmax ignores a common offset;
    bf16 rounding at that magnitude does not), as an inference engine that keeps its logits in
    bf16 does. They differ in what enters the ratio:
    ``bf16-sampler``   the sampler's log-probs are the behaviour log-probs (the mismatch enters
                       the ratio: "phantom" clipping on-policy);
    ``bf16-recompute`` the trainer recomputes the behaviour log-probs in fp32 (ratio 1 at
                       mu = 1) and ignores the sampler mismatch;
    ``bf16-tis``       the same, with truncated importance sampling ``min(exp(old - rollout),
                       tis_cap)`` against the sampler's log-probs.

Methods (``make_methods``)
    pg                 plain clipped PG, eps 0.2 / 0.2, repo="none"
    clip-higher        DAPO clip-higher, eps 0.2 / 0.28, repo="none"
    adapo-high         AdaptiveClip steers eps_high (the library default), repo="none"
    adapo-low          AdaptiveClip's ``adapt_low`` law steers eps_low; eps_high stays 0.28
    repo-decorrelate   REPO, zeta = Cov(A, L) / Var(L) per mini-batch, L = logp - batch mean
    repo-state         the same with per-state centring, L = logp + H (repo_center="state")
    repo-r             REPO-R (repo="relative", repo_center="state"), zeta from
                       AdaptiveRepoCoef(mode="multiplicative")
    adapo+repo         adapo_loss: AdaptiveClip on eps_high over REPO-decorrelate advantages

The monitor: per update, fused-pg's metrics ``entropy_drive`` (-mean A' (logp + H): the
first-order entropy change a PG step drives) split by the sign of A', the clip fractions per
side, the mean behaviour probability of the tokens each side clips (``clip_*_p_mean``) and the
share of them below the state's average log-prob (``clip_*_below_avg``); plus the share of
tokens with A = 0 and the rollout entropy split into fork and forced positions.

Run::

    python examples/entropy_transformer.py            # the committed run (results/entropy_transformer/):
                                                      # 1389 s on a 2-core x86-64 CPU, one torch thread
    python examples/entropy_transformer.py --quick    # small budget, about a minute (the slow test runs it)
    python examples/entropy_transformer.py --seeds 0 --methods pg repo-r --set updates=300
    python examples/entropy_transformer.py --replot results/entropy_transformer/entropy_transformer.json
    python examples/entropy_transformer.py --tables results/entropy_transformer/entropy_transformer.json

It writes ``entropy_transformer.json`` (configuration, summaries, binned per-seed curves, wall
time, machine) and three figures into ``--out``, and prints the tables. The default
configuration writes into ``results/entropy_transformer/``, any other into
``results/local/entropy_transformer/`` (git-ignored).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fused_pg import AdaptiveClip, AdaptiveRepoCoef, adapo_loss, fused_logprobs_entropy, repo_loss

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the studies' shared helpers
from study_common import machine, mean, parse_overrides, pass_at_k, shrink_png, std  # noqa: E402

DEFAULT_OUT = "results/entropy_transformer"
LOCAL_OUT = "results/local/entropy_transformer"
PRECISIONS = ("fp32", "bf16-sampler", "bf16-recompute", "bf16-tis")
TEMPLATE = ("copy", "copy", "fork", "pair", "copy", "copy", "fork", "pair")  # the answer, position by position


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """One regime's runs (the defaults are the committed run's)."""

    # task
    vocab: int = 32                   # V: fork tokens first, then content tokens
    n_fork_tokens: int = 8            # tokens that may stand at a fork (the model may pick any token)
    n_valid: int = 4                  # phase 1 accepts fork tokens 0 .. n_valid-1
    phase2_forks: tuple[int, ...] = (2, 3)   # phase 2 accepts only these (the warm-up's rare ones)
    prompt_len: int = 4
    n_eval_prompts: int = 32
    # model
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    # supervised warm-up: skewed over the valid fork tokens, stopped before the forced tokens are perfect
    warmup_fork_probs: tuple[float, ...] = (0.6, 0.25, 0.1, 0.05)
    warmup_steps: int = 110
    warmup_batch: int = 64
    warmup_lr: float = 3e-3
    # RL, phase 1
    updates: int = 200                # optimizer steps (the same in every regime)
    mu: int = 1                       # mini-batch updates per rollout
    minibatch_prompts: int = 8
    group_size: int = 8
    lr: float = 1e-3                  # Adam
    precision: str = "fp32"           # see the module doc
    sampler_logit_offset: float = 64.0
    tis_cap: float = 2.0
    # clip ranges: plain PG symmetric (GRPO), the others start from DAPO's clip-higher
    eps_low: float = 0.2
    eps_high_pg: float = 0.2
    eps_high: float = 0.28
    # REPO
    repo_gamma: float = 1.0           # decorrelate: removes the batch covariance exactly
    repo_r_zeta0: float = 0.01        # REPO-R's initial zeta (multiplicative controller, factor 2)
    # ADAPO
    adapo_rate: float = 0.2
    adapo_bounds: tuple[float, float] = (0.1, 1.0)
    adapo_low_bounds: tuple[float, float] = (0.0, 0.3)
    target_frac: float = 1.0          # entropy target = target_frac * the warm-up policy's entropy
    # phase 2
    phase2_updates: int = 100
    # evaluation
    log_every: int = 10               # curves: means over bins of this many updates
    eval_every: int = 50              # held-out evaluation period (updates)
    eval_samples: int = 16            # samples per held-out prompt (n of the pass@k estimator)
    ks: tuple[int, ...] = (4, 16)
    final_frac: float = 0.1           # "final" = mean over the last 10% of the updates

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.updates % self.mu or self.updates % self.log_every or self.phase2_updates % self.log_every:
            raise ValueError("updates must be a multiple of mu and of log_every; phase2_updates of log_every")
        if len(self.warmup_fork_probs) != self.n_valid or max(self.phase2_forks) >= self.n_valid:
            raise ValueError("warmup_fork_probs needs one probability per valid fork token; phase2_forks "
                             "must be valid phase-1 fork tokens")
        if max(self.ks) > self.eval_samples:
            raise ValueError("pass@k needs eval_samples >= k")

    @classmethod
    def quick(cls, **kw) -> "Config":
        """The test's budget: fewer optimizer steps, a shorter phase 2."""
        return cls(**{"updates": 120, "phase2_updates": 40, "eval_every": 60, **kw})

    @property
    def answer_len(self) -> int:
        return len(TEMPLATE)


@dataclass(frozen=True)
class Method:
    """One training recipe: the loss keyword arguments and an optional entropy controller."""

    label: str
    loss_kwargs: dict = field(default_factory=dict)
    controller: str | None = None  # None | "clip-high" | "clip-low" | "repo-r"


def make_methods(cfg: Config) -> dict[str, Method]:
    pg_clip = {"eps_low": cfg.eps_low, "eps_high": cfg.eps_high_pg}
    dapo = {"eps_low": cfg.eps_low, "eps_high": cfg.eps_high}
    decorrelate = {"repo": "decorrelate", "repo_coef": cfg.repo_gamma}
    return {
        "pg": Method(f"plain clipped PG (eps {cfg.eps_low}/{cfg.eps_high_pg})", {"repo": "none", **pg_clip}),
        "clip-higher": Method(f"clip-higher (eps {cfg.eps_low}/{cfg.eps_high})", {"repo": "none", **dapo}),
        "adapo-high": Method("ADAPO on eps_high (repo='none')", {"repo": "none"}, "clip-high"),
        "adapo-low": Method(f"ADAPO on eps_low (eps_high {cfg.eps_high}, repo='none')", {"repo": "none"},
                            "clip-low"),
        "repo-decorrelate": Method("REPO decorrelate (batch centre)", {**decorrelate, **dapo}),
        "repo-state": Method("REPO decorrelate, per-state centre", {**decorrelate, "repo_center": "state", **dapo}),
        "repo-r": Method("REPO-R + AdaptiveRepoCoef (multiplicative)",
                         {"repo": "relative", "repo_center": "state", **dapo}, "repo-r"),
        "adapo+repo": Method("ADAPO (eps_high) + REPO decorrelate", decorrelate, "clip-high"),
    }


METHOD_NAMES = tuple(make_methods(Config()))
PRECISION_METHODS = ("pg", "repo-decorrelate")
# --quick: seed 0, mu = 4, these methods, one precision mode for plain PG (what the test runs)
QUICK_METHODS = ("pg", "adapo-high", "repo-decorrelate", "repo-r")
QUICK_PRECISIONS = ("bf16-sampler",)
CURVES = ("entropy", "entropy_fork", "entropy_forced", "reward", "adv_zero_frac", "clip_frac_high",
          "clip_frac_low", "entropy_drive", "entropy_drive_pos", "entropy_drive_neg", "approx_kl",
          "eps_low", "eps_high", "repo_zeta", "phantom_clip_frac", "sampler_mismatch", "tis_weight_mean")
# weighted by the number of clipped tokens of each update (NaN where none was clipped)
CLIP_GATED = (("clip_high_p_mean", "n_clip_high"), ("clip_high_below_avg", "n_clip_high"),
              ("clip_low_p_mean", "n_clip_low"), ("clip_low_below_avg", "n_clip_low"))


def make_controller(method: Method, cfg: Config, target: float):
    if method.controller == "clip-high":
        return AdaptiveClip(target, eps_low=cfg.eps_low, eps_high=cfg.eps_high, bounds=cfg.adapo_bounds,
                            rate=cfg.adapo_rate)
    if method.controller == "clip-low":
        # the adapt_low law: eps_low moves opposite to the controller's eps_high, which is left
        # unbounded in practice so that it never stops the law; the loss keeps eps_high fixed
        return AdaptiveClip(target, eps_low=cfg.eps_low, eps_high=cfg.eps_high, bounds=(0.0, 100.0),
                            rate=cfg.adapo_rate, adapt_low=True, low_bounds=cfg.adapo_low_bounds)
    if method.controller == "repo-r":
        return AdaptiveRepoCoef(target, repo_coef=cfg.repo_r_zeta0, mode="multiplicative")
    return None


def loss_kwargs(method: Method, ctrl, cfg: Config) -> dict:
    """The clip range and REPO coefficient of this step (controllers read here, updated after the step)."""
    kw = dict(method.loss_kwargs, backend="torch")
    if method.controller == "clip-low":
        kw.update(eps_low=ctrl.eps_low, eps_high=cfg.eps_high)
    elif method.controller == "repo-r":
        kw["repo_coef"] = ctrl.repo_coef
    return kw


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln(x))`` (causal), then ``x + mlp(ln(x))``."""

    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: Tensor) -> Tensor:                                      # [B, L, D]
        B, L, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)            # [B, H, L, D/H]
        x = x + self.proj(a.transpose(1, 2).reshape(B, L, D))
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    """Causal LM over ``prompt + answer``: ``forward(prompts [B, P], answers [B, T]) -> hidden
    [B, T, D]``, the final hidden states that predict each answer token (positions P-1 ..
    P+T-2 of the sequence). The logits ``hidden @ lm_head.weight.T`` are formed only to sample;
    the training step hands ``hidden`` and ``lm_head.weight`` to the fused loss."""

    def __init__(self, cfg: Config):
        super().__init__()
        n_ctx = cfg.prompt_len + cfg.answer_len - 1
        self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos = nn.Parameter(0.1 * torch.randn(n_ctx, cfg.d_model))
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_heads) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)

    def forward(self, prompts: Tensor, answers: Tensor) -> Tensor:
        seq = torch.cat([prompts, answers[:, :-1]], dim=1)                       # [B, P+T-1]
        x = self.embed(seq) + self.pos[: seq.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, prompts.shape[1] - 1:]                             # [B, T, D]

    def logits(self, prompts: Tensor, answers: Tensor) -> Tensor:
        return self(prompts, answers) @ self.lm_head.weight.T                   # [B, T, V]


@torch.no_grad()
def sample(policy: TinyTransformer, prompts: Tensor, answer_len: int, g: torch.Generator,
           logit_offset: float | None = None) -> tuple[Tensor, Tensor]:
    """Ancestral sampling (no KV cache: the sequences are 11 tokens). Returns ``answers [B, T]``
    and the sampler's log-probs of them ``[B, T]``. With ``logit_offset`` the logits are
    ``bf16(bf16(hidden @ W.T) + offset)`` from the policy's bf16 weights (the bf16 sampler),
    else fp32."""
    dtype = next(policy.parameters()).dtype
    answers = torch.zeros(prompts.shape[0], answer_len, dtype=torch.long)
    logp = torch.zeros(prompts.shape[0], answer_len)
    for t in range(answer_len):
        logits = policy.logits(prompts, answers)[:, t]                           # [B, V] in dtype
        if logit_offset is not None:
            logits = logits + torch.tensor(logit_offset, dtype=dtype)           # rounded to bf16
        lp = logits.float().log_softmax(-1)
        answers[:, t] = torch.multinomial(lp.exp(), 1, generator=g)[:, 0]
        logp[:, t] = lp.gather(1, answers[:, t:t + 1])[:, 0]
    return answers, logp


# ---------------------------------------------------------------------------------------------
# the task
# ---------------------------------------------------------------------------------------------


class Task:
    """Prompts, the reward of both phases, and the warm-up policy, for one seed."""

    def __init__(self, cfg: Config, seed: int):
        self.cfg = cfg
        content = torch.arange(cfg.n_fork_tokens, cfg.vocab)
        # pair(f): a content token per fork token, distinct, fixed
        self.pair = content[(7 * torch.arange(cfg.n_fork_tokens) + 3) % content.numel()]
        self.fork_pos = torch.tensor([k == "fork" for k in TEMPLATE])
        copies = [i for i, k in enumerate(TEMPLATE) if k == "copy"]
        self.copy_pos, self.copy_src = torch.tensor(copies), torch.arange(len(copies)) % cfg.prompt_len
        g = torch.Generator().manual_seed(seed)
        self.eval_prompts = content[torch.randint(0, content.numel(), (cfg.n_eval_prompts, cfg.prompt_len),
                                                  generator=g)]
        self.content = content
        torch.manual_seed(seed)  # module initialisers use the global generator
        self.init_policy = warm_up(self, TinyTransformer(cfg), g)

    def prompts(self, n: int, g: torch.Generator) -> Tensor:
        """``n`` fresh prompts (the space has 24^4 of them: training never repeats much)."""
        return self.content[torch.randint(0, self.content.numel(), (n, self.cfg.prompt_len), generator=g)]

    def forced(self, prompts: Tensor, answers: Tensor) -> Tensor:
        """The right token at every non-fork position given the tokens before it ``[B, T]``
        (fork positions hold -1)."""
        want = torch.full_like(answers, -1)
        want[:, self.copy_pos] = prompts[:, self.copy_src]
        pair_pos = [i for i, k in enumerate(TEMPLATE) if k == "pair"]
        want[:, pair_pos] = self.pair[answers[:, [p - 1 for p in pair_pos]].clamp_max(self.cfg.n_fork_tokens - 1)]
        return want

    def reward(self, prompts: Tensor, answers: Tensor, phase: int = 1) -> Tensor:
        """1.0 iff every forced token is right and every fork is accepted by this phase ``[B]``."""
        forced_ok = ((answers == self.forced(prompts, answers)) | self.fork_pos).all(1)
        accepted = torch.zeros(self.cfg.vocab, dtype=torch.bool)
        accepted[list(range(self.cfg.n_valid)) if phase == 1 else list(self.cfg.phase2_forks)] = True
        return (forced_ok & accepted[answers[:, self.fork_pos]].all(1)).float()

    def demonstrations(self, n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        """Valid answers with forks drawn from ``warmup_fork_probs`` (the skewed warm-up data)."""
        prompts = self.prompts(n, g)
        answers = torch.zeros(n, self.cfg.answer_len, dtype=torch.long)
        probs = torch.tensor(self.cfg.warmup_fork_probs)
        for t, kind in enumerate(TEMPLATE):
            if kind == "fork":
                answers[:, t] = torch.multinomial(probs, n, replacement=True, generator=g)
        want = self.forced(prompts, answers)
        return prompts, torch.where(want >= 0, want, answers)


def warm_up(task: Task, policy: TinyTransformer, g: torch.Generator) -> TinyTransformer:
    """Supervised next-token training on skewed valid answers (cross-entropy, Adam)."""
    cfg = task.cfg
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.warmup_lr)
    for _ in range(cfg.warmup_steps):
        prompts, answers = task.demonstrations(cfg.warmup_batch, g)
        loss = F.cross_entropy(policy.logits(prompts, answers).flatten(0, 1), answers.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return policy


@torch.no_grad()
def evaluate(task: Task, policy: TinyTransformer, g: torch.Generator, phase: int = 1) -> dict[str, float]:
    """Held-out pass@1, pass@k, distinct correct answers (of ``eval_samples``), entropy and the
    probability mass of each fork token at the first fork."""
    cfg = task.cfg
    n = cfg.eval_samples
    prompts = task.eval_prompts.repeat_interleave(n, 0)
    answers, _ = sample(policy, prompts, cfg.answer_len, g)
    rewards = task.reward(prompts, answers, phase).view(-1, n)
    codes = (answers[:, task.fork_pos] * torch.tensor([1, cfg.vocab])).sum(1).view(-1, n)  # forks fix the answer
    codes = torch.where(rewards > 0, codes, -1).sort(dim=1).values
    distinct = (codes[:, :1] >= 0).sum(1) + ((codes[:, 1:] != codes[:, :-1]) & (codes[:, 1:] >= 0)).sum(1)
    hidden = policy(prompts, answers)
    _, ent = fused_logprobs_entropy(hidden, policy.lm_head.weight, answers, backend="torch")
    first_fork = int(task.fork_pos.nonzero()[0])
    fork_p = (hidden[:, first_fork] @ policy.lm_head.weight.T).softmax(-1).mean(0)[: cfg.n_fork_tokens]
    out = {"pass1": rewards.mean().item()}
    for k in cfg.ks:
        out[f"pass{k}"] = pass_at_k(n, rewards.sum(1), k).mean().item()
    out["distinct"] = distinct.float().mean().item()
    out["eval_entropy"] = ent.mean().item()
    out["fork_probs"] = [round(p, 5) for p in fork_p.tolist()]
    return out


def eval_keys(cfg: Config) -> tuple[str, ...]:
    return ("pass1", *(f"pass{k}" for k in cfg.ks), "distinct", "eval_entropy", "fork_probs")


@torch.no_grad()
def initial_entropy(task: Task, seed: int) -> float:
    """Mean token entropy of the warm-up policy on its own samples (512 answers): the reference
    for entropy change and, times ``target_frac``, the controllers' target."""
    g = torch.Generator().manual_seed(10_000 + seed)
    policy = task.init_policy
    prompts = task.prompts(512, g)
    answers, _ = sample(policy, prompts, task.cfg.answer_len, g)
    _, ent = fused_logprobs_entropy(policy(prompts, answers), policy.lm_head.weight, answers, backend="torch")
    return ent.mean().item()


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------


def rollout(task: Task, cfg: Config, policy: TinyTransformer, n_prompts: int, g: torch.Generator, phase: int):
    """Sample GRPO groups; returns prompts, answers ``[B, T]``, rewards ``[B]``, advantages
    ``[B, T]``, the trainer's fp32 log-probs and entropies ``[B, T]`` and the sampler's
    log-probs ``[B, T]`` (the trainer's own in fp32)."""
    prompts = task.prompts(n_prompts, g).repeat_interleave(cfg.group_size, 0)
    if cfg.precision == "fp32":
        answers, _ = sample(policy, prompts, cfg.answer_len, g)
    else:
        sampler = copy.deepcopy(policy).to(torch.bfloat16)
        answers, sampler_logp = sample(sampler, prompts, cfg.answer_len, g, logit_offset=cfg.sampler_logit_offset)
    with torch.no_grad():
        logp, ent = fused_logprobs_entropy(policy(prompts, answers), policy.lm_head.weight, answers,
                                           backend="torch")
    if cfg.precision == "fp32":
        sampler_logp = logp
    rewards = task.reward(prompts, answers, phase)
    r = rewards.view(-1, cfg.group_size)
    adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)).view(-1)
    return prompts, answers, rewards, adv[:, None].expand(-1, cfg.answer_len), logp, ent, sampler_logp


def train(task: Task, policy: TinyTransformer, method: Method, cfg: Config, seed: int, target: float,
          phase: int = 1) -> dict:
    """One RL run (in place on ``policy``); returns binned curves, held-out evaluations, "final"
    values (the last ``final_frac`` of the updates) and the clip-gated means over the run."""
    updates = cfg.updates if phase == 1 else cfg.phase2_updates
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(seed + 100 * phase)
    g_eval = torch.Generator().manual_seed(1_000_003 + seed + 100 * phase)
    ctrl = make_controller(method, cfg, target)
    mb = cfg.minibatch_prompts * cfg.group_size
    lo_hi = (cfg.eps_low, cfg.eps_high)
    per: dict[str, list[float]] = {k: [] for k in CURVES}
    gated = {k: [0.0, 0.0] for k, _ in CLIP_GATED}     # sum of value * n, sum of n
    evals: dict[str, list] = {"step": [], **{k: [] for k in eval_keys(cfg)}}
    step = 0
    for _ in range(updates // cfg.mu):
        prompts, answers, rewards, adv, logp, ent, sampler_logp = rollout(task, cfg, policy,
                                                                          cfg.mu * cfg.minibatch_prompts, g, phase)
        # behaviour log-probs: the sampler's own in "bf16-sampler", else the trainer's (fp32) recompute
        old = sampler_logp if cfg.precision == "bf16-sampler" else logp
        monitored = cfg.precision in ("bf16-recompute", "bf16-tis")  # the loss sees the sampler's too
        tis = {"tis_cap": cfg.tis_cap} if cfg.precision == "bf16-tis" else {}
        # the mismatch alone: share of ratios exp(trainer - sampler) outside [1 - eps_low, 1 + eps_high]
        mism = logp - sampler_logp
        phantom = ((mism.exp() < 1 - lo_hi[0]) | (mism.exp() > 1 + lo_hi[1])).float().mean().item()
        is_fork = task.fork_pos.expand_as(ent)
        for j in torch.randperm(mb * cfg.mu, generator=g).split(mb):
            kw = {**loss_kwargs(method, ctrl, cfg), **tis}
            if monitored:
                kw["rollout_logprobs"] = sampler_logp[j]
            hidden = policy(prompts[j], answers[j])                             # [mb, T, D]
            args = (hidden, policy.lm_head.weight, answers[j], adv[j], old[j])
            if method.controller == "clip-high":
                out = adapo_loss(*args, controller=ctrl, **kw)
            else:
                out = repo_loss(*args, **kw)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            m = {k: float(v) for k, v in out.metrics.items() if k in METRIC_NAMES}
            per["entropy"].append(ent.mean().item())
            per["entropy_fork"].append(ent[is_fork].mean().item())
            per["entropy_forced"].append(ent[~is_fork].mean().item())
            per["reward"].append(rewards.mean().item())
            per["adv_zero_frac"].append((adv[j] == 0).float().mean().item())
            for k in ("clip_frac_high", "clip_frac_low", "entropy_drive", "entropy_drive_pos",
                      "entropy_drive_neg", "approx_kl", "eps_low", "eps_high", "tis_weight_mean"):
                per[k].append(m[k])
            per["repo_zeta"].append(m["repo_zeta"])
            per["phantom_clip_frac"].append(phantom)
            per["sampler_mismatch"].append(mism.abs().mean().item())
            for k, n in CLIP_GATED:
                if m[n] > 0:
                    gated[k][0] += m[k] * m[n]
                    gated[k][1] += m[n]
            if ctrl is not None:
                ctrl.update(out.metrics)  # once per optimizer step
            if step % cfg.eval_every == 0:
                _record(evals, step, evaluate(task, policy, g_eval, phase))
            step += 1
    _record(evals, step, evaluate(task, policy, g_eval, phase))
    tail = max(1, round(cfg.final_frac * updates))
    return {
        "curves": {k: [mean(v[i:i + cfg.log_every]) for i in range(0, len(v), cfg.log_every)] for k, v in per.items()},
        "final": {k: mean(v[-tail:]) for k, v in per.items()},
        "run_mean": {k: mean(v) for k, v in per.items()},
        "gated": {k: (s / n if n else float("nan")) for k, (s, n) in gated.items()},
        "evals": evals,
    }


METRIC_NAMES = ("clip_frac_high", "clip_frac_low", "entropy_drive", "entropy_drive_pos", "entropy_drive_neg",
                "approx_kl", "eps_low", "eps_high", "tis_weight_mean", "entropy_mean", "repo_zeta",
                *(k for pair in CLIP_GATED for k in pair))


def _record(evals: dict, step: int, values: dict) -> None:
    evals["step"].append(step)
    for k, v in values.items():
        evals[k].append(v)


# ---------------------------------------------------------------------------------------------
# the study
# ---------------------------------------------------------------------------------------------


def run_study(cfg: Config, seeds=(0,), mus=(1, 4), methods=METHOD_NAMES, precisions=("bf16-sampler",
              "bf16-recompute", "bf16-tis"), precision_methods=PRECISION_METHODS, phase2=True, log=print) -> dict:
    """Phase 1 for every (mu, method, seed), phase 2 from every phase-1 policy (and the warm-up
    policy), the precision modes at mu = 1. Returns the JSON-ready results (without curves'
    rounding)."""
    all_methods = make_methods(cfg)
    unknown = [m for m in (*methods, *precision_methods) if m not in all_methods]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(all_methods)}")
    t0 = time.perf_counter()
    runs: dict[str, dict] = {}          # "phase1/mu4/pg/0", "phase2/mu4/pg/0", "precision/bf16-tis/pg/0"
    seeds_info = {}
    pg2 = all_methods["pg"]
    for seed in seeds:
        t_seed = time.perf_counter()
        task = Task(cfg, seed)
        h0 = initial_entropy(task, seed)
        target = cfg.target_frac * h0
        g0 = torch.Generator().manual_seed(1_000_003 + seed)
        seeds_info[str(seed)] = {"entropy_init": h0, "target": target, "warmup_s": time.perf_counter() - t_seed,
                                 "init_eval": evaluate(task, task.init_policy, g0, 1),
                                 "init_eval_phase2": evaluate(task, task.init_policy, g0, 2)}
        jobs = [(f"mu{mu}", replace(cfg, mu=mu), name) for mu in mus for name in methods]
        jobs += [(p, replace(cfg, mu=1, precision=p), name) for p in precisions for name in precision_methods]
        for regime, rcfg, name in jobs:
            t = time.perf_counter()
            policy = copy.deepcopy(task.init_policy)
            run = train(task, policy, all_methods[name], rcfg, seed, target)
            kind = "phase1" if regime.startswith("mu") else "precision"
            runs[f"{kind}/{regime}/{name}/{seed}"] = run
            f = run["final"]
            msg = (f"  seed {seed} {regime:15s} {name:17s} H {h0:.3f} -> {f['entropy']:.3f} (fork "
                   f"{f['entropy_fork']:.3f})  reward {f['reward']:.3f}  "
                   f"clip hi/lo {run['run_mean']['clip_frac_high']:.4f}"
                   f"/{run['run_mean']['clip_frac_low']:.4f}  phantom {run['run_mean']['phantom_clip_frac']:.4f}")
            if phase2 and kind == "phase1":
                run2 = train(task, policy, pg2, rcfg, seed, target, phase=2)
                runs[f"phase2/{regime}/{name}/{seed}"] = run2
                msg += f"  | phase 2 reward AUC {run2['run_mean']['reward']:.3f}"
            log(msg + f"  ({time.perf_counter() - t:.1f} s)")
        if phase2:
            policy = copy.deepcopy(task.init_policy)
            runs[f"phase2/warmup/none/{seed}"] = train(task, policy, pg2, replace(cfg, mu=1), seed, target, phase=2)
    return {"config": asdict(cfg), "seeds": list(seeds), "mus": list(mus), "methods": list(methods),
            "precisions": list(precisions), "precision_methods": list(precision_methods),
            "labels": {m: all_methods[m].label for m in all_methods}, "seed_info": seeds_info,
            "summary": summarize(runs), "wall_time_s": time.perf_counter() - t0, "runs": runs}


SUMMARY_KEYS = {
    # key in the summary: (where, name)
    "entropy_final": ("final", "entropy"), "entropy_fork_final": ("final", "entropy_fork"),
    "entropy_forced_final": ("final", "entropy_forced"), "reward_final": ("final", "reward"),
    "reward_auc": ("run_mean", "reward"), "adv_zero_frac": ("run_mean", "adv_zero_frac"),
    "clip_frac_high": ("run_mean", "clip_frac_high"), "clip_frac_low": ("run_mean", "clip_frac_low"),
    "entropy_drive": ("run_mean", "entropy_drive"), "entropy_drive_pos": ("run_mean", "entropy_drive_pos"),
    "entropy_drive_neg": ("run_mean", "entropy_drive_neg"), "eps_high_final": ("final", "eps_high"),
    "eps_low_final": ("final", "eps_low"), "repo_zeta_final": ("final", "repo_zeta"),
    "phantom_clip_frac": ("run_mean", "phantom_clip_frac"), "sampler_mismatch": ("run_mean", "sampler_mismatch"),
    "clip_high_p_mean": ("gated", "clip_high_p_mean"), "clip_high_below_avg": ("gated", "clip_high_below_avg"),
    "clip_low_p_mean": ("gated", "clip_low_p_mean"), "clip_low_below_avg": ("gated", "clip_low_below_avg"),
}


def summarize(runs: dict) -> dict:
    """{"phase1/mu4/pg": {key: {"mean", "std", "per_seed"}}}: seed means of SUMMARY_KEYS and of
    the last held-out evaluation."""
    groups: dict[str, list[dict]] = {}
    for key, run in runs.items():
        groups.setdefault(key.rsplit("/", 1)[0], []).append(run)
    out = {}
    for group, rs in groups.items():
        rows = {k: [r[where][name] for r in rs] for k, (where, name) in SUMMARY_KEYS.items()}
        for k, v in rs[0]["evals"].items():
            if k not in ("step", "fork_probs"):
                rows[f"{k}_final"] = [r["evals"][k][-1] for r in rs]
        rows["fork_probs_final"] = [r["evals"]["fork_probs"][-1] for r in rs]
        out[group] = {k: {"mean": _vec_mean(v), "std": _vec_std(v), "per_seed": v} for k, v in rows.items()}
    return out


def _vec_mean(v):
    return [mean(c) for c in zip(*v)] if isinstance(v[0], list) else mean(v)


def _vec_std(v):
    return [std(c) for c in zip(*v)] if isinstance(v[0], list) else std([x for x in v if not math.isnan(x)])


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------


def print_tables(results: dict, file=sys.stdout) -> None:
    s, info = results["summary"], results["seed_info"]
    h0 = mean([v["entropy_init"] for v in info.values()])
    ie = lambda k: mean([v["init_eval"][k] for v in info.values()])  # noqa: E731
    print(f"\nwarm-up policy: entropy {h0:.3f}, pass@1 {ie('pass1'):.3f}, distinct {ie('distinct'):.2f}, "
          f"fork probs {[round(p, 3) for p in _vec_mean([v['init_eval']['fork_probs'] for v in info.values()])]}; "
          f"phase-2 pass@1 {mean([v['init_eval_phase2']['pass1'] for v in info.values()]):.3f}", file=file)

    def c(row, key, fmt="{:.3f}"):
        return fmt.format(row[key]["mean"]) if key in row else "-"

    head = (f"{'run':34s} {'H':>6s} {'H fork':>6s} {'H forc':>6s} {'reward':>6s} {'pass1':>6s} {'pass16':>6s} "
            f"{'dist':>5s} {'A=0':>5s} {'drv+':>7s} {'drv-':>7s} {'clipH':>6s} {'clipL':>6s} {'pH':>5s} "
            f"{'pL':>5s} {'H<avg':>5s} {'phant':>6s} {'eps lo/hi':>9s} {'P2 AUC':>6s}")
    print(head, file=file)
    print("-" * len(head), file=file)
    for group, row in s.items():
        if group.startswith("phase2"):
            continue
        p2 = s.get(group.replace("phase1", "phase2"), {}) if group.startswith("phase1") else {}
        print(f"{group:34s} {c(row, 'entropy_final')} {c(row, 'entropy_fork_final')} "
              f"{c(row, 'entropy_forced_final')} {c(row, 'reward_final')} {c(row, 'pass1_final')} "
              f"{c(row, 'pass16_final')} {c(row, 'distinct_final', '{:5.2f}')} {c(row, 'adv_zero_frac', '{:.3f}')} "
              f"{c(row, 'entropy_drive_pos', '{:+.4f}')} {c(row, 'entropy_drive_neg', '{:+.4f}')} "
              f"{c(row, 'clip_frac_high', '{:.4f}')} {c(row, 'clip_frac_low', '{:.4f}')} "
              f"{c(row, 'clip_high_p_mean', '{:.2f}')} {c(row, 'clip_low_p_mean', '{:.2f}')} "
              f"{c(row, 'clip_high_below_avg', '{:.2f}')} {c(row, 'phantom_clip_frac', '{:.4f}')} "
              f"{c(row, 'eps_low_final', '{:.2f}')}/{c(row, 'eps_high_final', '{:.2f}')} "
              f"{c(p2, 'reward_auc') if p2 else '-':>6s}", file=file)
    if "phase2/warmup/none" in s:
        print(f"phase 2 from the warm-up policy: reward AUC {s['phase2/warmup/none']['reward_auc']['mean']:.3f}, "
              f"final {s['phase2/warmup/none']['reward_final']['mean']:.3f}", file=file)
    print(f"wall time {results['wall_time_s']:.0f} s", file=file)


def curve_mean(results: dict, group: str, key: str) -> float:
    """Seed mean of a run-mean read back from the binned curves (equal bins: the same mean)."""
    return mean([mean(r["curves"][key]) for k, r in results["runs"].items() if k.rsplit("/", 1)[0] == group])


def markdown_tables(results: dict) -> str:
    """The docs' tables from a results dict (mean +- std over seeds)."""
    s, labels = results["summary"], results["labels"]
    h0 = mean([v["entropy_init"] for v in results["seed_info"].values()])

    def pm(row, key, fmt="{:.3f}", scale=1.0):
        r = row[key]
        if r["mean"] is None or (isinstance(r["mean"], float) and math.isnan(r["mean"])):
            return "–"
        text = fmt.format(scale * r["mean"])
        return text + (" ± " + fmt.replace("+", "").format(scale * r["std"]) if len(results["seeds"]) > 1 else "")

    def dh(row):
        return f"{100 * (row['entropy_final']['mean'] / h0 - 1):+.0f}%"

    out = []
    mus = results["mus"]
    if mus:
        out.append("| method | " + " | ".join(f"μ={mu}: entropy (change) | μ={mu}: fork entropy | μ={mu}: reward"
                                                for mu in mus) + " |")
        out.append("|---" * (1 + 3 * len(mus)) + "|")
        for m in results["methods"]:
            cells = []
            for mu in mus:
                row = s[f"phase1/mu{mu}/{m}"]
                cells += [f"{pm(row, 'entropy_final')} ({dh(row)})", pm(row, "entropy_fork_final"),
                          pm(row, "reward_final")]
            out.append(f"| {labels[m]} | " + " | ".join(cells) + " |")
        for mu in mus:
            out.append("")
            out.append(f"| method (μ = {mu}) | pass@1 | pass@4 | pass@16 | distinct correct | A = 0 | drive A>0 | "
                       "drive A<0 | clip high / low | up-clipped: mean p, below avg | down-clipped: mean p | "
                       "eps low / high (end) |")
            out.append("|---" * 12 + "|")
            for m in results["methods"]:
                row = s[f"phase1/mu{mu}/{m}"]
                out.append(
                    f"| {m} | {pm(row, 'pass1_final')} | {pm(row, 'pass4_final')} | {pm(row, 'pass16_final')} | "
                    f"{pm(row, 'distinct_final', '{:.1f}')} | {pm(row, 'adv_zero_frac', '{:.2f}')} | "
                    f"{pm(row, 'entropy_drive_pos', '{:+.4f}')} | {pm(row, 'entropy_drive_neg', '{:+.4f}')} | "
                    f"{pm(row, 'clip_frac_high', '{:.2f}', 100)}% / {pm(row, 'clip_frac_low', '{:.2f}', 100)}% | "
                    f"{pm(row, 'clip_high_p_mean', '{:.2f}')}, {pm(row, 'clip_high_below_avg', '{:.2f}')} | "
                    f"{pm(row, 'clip_low_p_mean', '{:.2f}')} | "
                    f"{row['eps_low_final']['mean']:.2f} / {row['eps_high_final']['mean']:.2f} |")
        if any(k.startswith("phase2/") for k in s):
            out.append("")
            out.append("| phase-1 method | " + " | ".join(f"after μ={mu}: start pass@1 | reward area | final reward"
                                                          for mu in mus) + " |")
            out.append("|---" * (1 + 3 * len(mus)) + "|")
            rows = [(m, [f"phase2/mu{mu}/{m}" for mu in mus]) for m in results["methods"]]
            rows.append(("warm-up policy (no phase 1)", ["phase2/warmup/none"] * len(mus)))
            for m, groups in rows:
                cells = []
                for g in groups:
                    row = s[g]
                    starts = [r["evals"]["pass1"][0] for k, r in results["runs"].items() if k.rsplit("/", 1)[0] == g]
                    cells += [f"{mean(starts):.3f}", pm(row, "reward_auc"), pm(row, "reward_final")]
                out.append(f"| {m} | " + " | ".join(cells) + " |")
    if results["precisions"]:
        out.append("")
        out.append("| mode (μ = 1) | method | entropy (change) | fork entropy | reward | ratio outside range | "
                   "clip high / low | up-clipped: mean p | mean abs mismatch | TIS weight |")
        out.append("|---" * 10 + "|")
        for p in ("fp32", *results["precisions"]):
            for m in results["precision_methods"]:
                group = f"phase1/mu1/{m}" if p == "fp32" else f"precision/{p}/{m}"
                row = s.get(group)
                if row is None:
                    continue
                out.append(f"| {p} | {m} | {pm(row, 'entropy_final')} ({dh(row)}) | {pm(row, 'entropy_fork_final')} | "
                           f"{pm(row, 'reward_final')} | {pm(row, 'phantom_clip_frac', '{:.2f}', 100)}% | "
                           f"{pm(row, 'clip_frac_high', '{:.2f}', 100)}% / "
                           f"{pm(row, 'clip_frac_low', '{:.2f}', 100)}% | "
                           f"{pm(row, 'clip_high_p_mean', '{:.2f}')} | {pm(row, 'sampler_mismatch', '{:.4f}')} | "
                           + (f"{curve_mean(results, group, 'tis_weight_mean'):.4f} |" if p == "bf16-tis" else "– |"))
    return "\n".join(out) + "\n"


def to_json(results: dict) -> str:
    """Indented metadata and summaries; one line per run (curves and evaluations), rounded."""
    def rounded(x, nd=5):
        if isinstance(x, float):
            return None if math.isnan(x) else round(x, nd)
        if isinstance(x, dict):
            return {k: rounded(v, nd) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [rounded(v, nd) for v in x]
        return x

    head = {k: v for k, v in results.items() if k != "runs"}
    body = json.dumps(rounded(head), indent=1)
    lines = [f'  "{key}": ' + json.dumps(rounded({k: run[k] for k in ("curves", "evals", "gated")}, 4),
                                         separators=(",", ":")) for key, run in results["runs"].items()]
    return body[:-2] + ',\n "runs": {\n' + ",\n".join(lines) + "\n }\n}\n"


COLORS = {"pg": "tab:red", "clip-higher": "tab:pink", "adapo-high": "tab:olive", "adapo-low": "tab:brown",
          "repo-decorrelate": "tab:blue", "repo-state": "tab:cyan", "repo-r": "tab:purple",
          "adapo+repo": "tab:green", "none": "k"}


def _band(runs: dict, prefix: str, key: str, log_every: int):
    ys = [r["curves"][key] for k, r in runs.items() if k.rsplit("/", 1)[0] == prefix]
    if not ys:
        return None
    xs = [(i + 0.5) * log_every for i in range(len(ys[0]))]
    cols = list(zip(*ys))
    return xs, [min(c) for c in cols], [mean(c) for c in cols], [max(c) for c in cols]


def plot_all(results: dict, out_dir: Path) -> list[Path]:
    """Three figures: phase 1 (per mu: entropy, fork entropy, reward, clip fractions), phase 2
    (reward curves), precision (entropy, phantom clip, reward)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return []
    cfg, runs, written = results["config"], results["runs"], []
    le = cfg["log_every"]

    def draw(ax, prefix, key, name, ls="-", band=True, label=None):
        b = _band(runs, prefix, key, le)
        if b is None:
            return
        xs, lo, mid, hi = b
        ax.plot(xs, mid, ls, color=COLORS.get(name), lw=1.3, label=label)
        if band and len(results["seeds"]) > 1:
            ax.fill_between(xs, lo, hi, color=COLORS.get(name), alpha=0.1, lw=0)

    def finish(fig, axes, title, path):
        for ax in axes.flat:
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=60)
        plt.close(fig)
        shrink_png(path)
        written.append(path)

    panels = [("entropy", "rollout entropy (nats)"), ("entropy_fork", "entropy at forks"),
              ("reward", "train reward"), ("clip_frac_high", "clip fraction, high side"),
              ("clip_frac_low", "clip fraction, low side")]
    mus = results["mus"]
    if mus:
        fig, axes = plt.subplots(len(mus), len(panels), figsize=(15, 3.0 * len(mus)), squeeze=False)
        for r, mu in enumerate(mus):
            for ax, (key, title) in zip(axes[r], panels):
                for name in results["methods"]:
                    draw(ax, f"phase1/mu{mu}/{name}", key, name, label=name)
                ax.set_title(f"mu = {mu}: {title}", fontsize=9)
        axes[0, 0].legend(fontsize=6)
        path = out_dir / "phase1.png"
        finish(fig, axes, f"phase 1: mean over seeds {results['seeds']} (band = min-max); x: optimizer step", path)

        fig, axes = plt.subplots(1, len(mus), figsize=(5 * len(mus), 3.2), squeeze=False)
        for ax, mu in zip(axes[0], mus):
            for name in results["methods"]:
                draw(ax, f"phase2/mu{mu}/{name}", "reward", name, label=name)
            draw(ax, "phase2/warmup/none", "reward", "none", ls="--", label="warm-up policy")
            ax.set_title(f"policies from phase 1 at mu = {mu}", fontsize=9)
            ax.set_xlabel("phase-2 optimizer step (plain PG, on-policy)", fontsize=8)
        axes[0, 0].legend(fontsize=6)
        path = out_dir / "phase2.png"
        finish(fig, axes, "sequential learning: train reward on the second task (only the warm-up's rare fork "
                          "tokens accepted); mean over seeds, band = min-max", path)

    if results["precisions"]:
        ppanels = [("entropy", "rollout entropy"), ("phantom_clip_frac", "ratio(trainer/sampler) outside clip range"),
                   ("clip_frac_high", "clip fraction, high side"), ("reward", "train reward")]
        fig, axes = plt.subplots(1, len(ppanels), figsize=(15, 3.2), squeeze=False)
        styles = {"mu1": "-", "bf16-sampler": "--", "bf16-recompute": ":", "bf16-tis": "-."}
        for ax, (key, title) in zip(axes[0], ppanels):
            for name in results["precision_methods"]:
                for reg, ls in styles.items():
                    kind = "phase1" if reg == "mu1" else "precision"
                    draw(ax, f"{kind}/{reg}/{name}", key, name, ls=ls, band=False,
                         label=f"{name} {'fp32' if reg == 'mu1' else reg}")
            ax.set_title(title, fontsize=9)
        axes[0, 0].legend(fontsize=6)
        path = out_dir / "precision.png"
        finish(fig, axes, "precision at mu = 1: fp32 (solid), bf16 sampler log-probs as behaviour (dashed), "
                          "trainer recompute (dotted), recompute + TIS (dash-dot)", path)
    return written


def load_results(path: Path) -> dict:
    return json.loads(Path(path).read_text())


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mu", type=int, nargs="+", default=None, help="phase-1 regimes (default 1 4)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2; --quick: 0)")
    p.add_argument("--methods", nargs="+", default=None, choices=METHOD_NAMES)
    p.add_argument("--precision", nargs="*", default=None, choices=PRECISIONS[1:],
                   help=f"bf16 modes at mu = 1 for {PRECISION_METHODS} (default: all three; --quick: "
                        f"{QUICK_PRECISIONS} for pg)")
    p.add_argument("--no-phase2", action="store_true")
    p.add_argument("--quick", action="store_true",
                   help=f"the test's budget: seed 0, mu 4, {QUICK_METHODS}, fewer steps")
    p.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE", help="override any Config field")
    p.add_argument("--out", type=Path, default=None,
                   help=f"output folder (default: {DEFAULT_OUT} for the default run, {LOCAL_OUT} otherwise)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--replot", type=Path, metavar="JSON", help="instead: redraw the figures of a written JSON")
    p.add_argument("--tables", type=Path, metavar="JSON", help="instead: print the docs' markdown tables of a JSON")
    p.add_argument("--no-plot", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.tables:
        results = load_results(args.tables)
        print(markdown_tables(results), end="")
        return results
    if args.replot:
        results = load_results(args.replot)
        for path in plot_all(results, args.replot.parent):
            print(f"wrote {path}")
        return results
    default_run = not (args.quick or args.mu or args.seeds is not None or args.methods or args.precision is not None
                       or args.no_phase2 or args.set)
    out_dir = args.out or Path(DEFAULT_OUT if default_run else LOCAL_OUT)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = replace(Config.quick() if args.quick else Config(), **parse_overrides(Config, args.set))
    seeds = tuple(args.seeds) if args.seeds is not None else ((0,) if args.quick else (0, 1, 2))
    precisions = tuple(args.precision) if args.precision is not None else (
        QUICK_PRECISIONS if args.quick else PRECISIONS[1:])
    mus = tuple(args.mu or ((4,) if args.quick else (1, 4)))
    methods = tuple(args.methods or (QUICK_METHODS if args.quick else METHOD_NAMES))
    precision_methods = ("pg",) if args.quick else PRECISION_METHODS
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    try:
        results = run_study(cfg, seeds, mus, methods, precisions, precision_methods, phase2=not args.no_phase2)
    finally:  # process-wide: give it back (main() is also called from tests)
        torch.set_num_threads(threads)
    results.update(command=" ".join(["python", "examples/entropy_transformer.py",
                                     *(argv if argv is not None else sys.argv[1:])]),
                   default_run=default_run, wall_time_s=time.perf_counter() - t0, torch=torch.__version__,
                   machine=machine(args.threads))
    print_tables(results)
    (out_dir / "entropy_transformer.json").write_text(to_json(results))
    if not args.no_plot:
        for path in plot_all(json.loads(to_json(results)), out_dir):
            print(f"wrote {path}")
    print(f"wrote {out_dir / 'entropy_transformer.json'}; wall time {results['wall_time_s']:.1f} s")
    return results


if __name__ == "__main__":
    main()
