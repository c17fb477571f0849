"""Entropy dynamics of policy-gradient RL where clipping acts: several mini-batch updates per
rollout, REPO and ADAPO, and the effect of numerical precision.

A tiny language model is trained with GRPO-style group sampling on a synthetic task where
many different answers earn reward and the initial policy is already calibrated (its likely
answers tend to be the rewarded ones) -- the setting in which policy-gradient training
collapses the policy's entropy. Every method is the *same* training loop; only the loss call
differs, and every loss is computed by ``fused_pg`` straight from the model's final hidden
states and the LM-head weight (no ``N x V`` logits in the training step).

Why entropy collapses: for a softmax policy, one policy-gradient step changes the entropy by
about ``-lr * Cov_{a~pi}(log pi(a), A(a))``. When the policy is calibrated, likely answers have
positive advantages, the covariance is positive, and every step sharpens the distribution.
REPO subtracts ``zeta * (log pi - mean)`` from the advantages so that this covariance shrinks;
ADAPO adapts the asymmetric clip range ``[1 - eps_low, 1 + eps_high]`` from the measured
entropy. A clip can only act where the ratio ``pi / pi_old`` has left 1, i.e. on the second and
later mini-batch updates of a rollout batch: hence the regimes.

Regimes (``--mu``)
    mu = 1, 2, 4 mini-batch updates per rollout batch. The mini-batch (``minibatch_prompts``
    prompts x ``group_size`` samples) and the number of optimizer steps are the same in every
    regime; a rollout batch holds ``mu`` mini-batches, and its behaviour log-probs are fixed
    when it is sampled, so in mini-batch j > 1 of a rollout the ratios have moved by the j - 1
    updates before it. mu = 1 is exactly on-policy (ratio 1, no clip can act).

Precision (``--precision``)
    ``fp32``        the policy and the loss in fp32 (fused-pg's sweep from fp32 inputs);
    ``bf16-fused``  hidden states and LM-head weight cast to bf16, fused-pg's sweep accumulates
                    the logits in fp32 (never rounded);
    ``bf16-logits`` the same bf16 inputs, but the logits are materialised in bf16 (rounded, as a
                    trainer that runs the LM head in bf16 does), then log-softmax in fp32 and
                    the same loss through ``fused_pg.policy_loss_from_logprobs``.
    The sampler always runs in fp32; behaviour log-probs come from the trainer's own path.

The task
    A frozen random "teacher" network (the same architecture as the policy) scores every next
    token given the context. A prompt is ``prompt_len`` random tokens; an answer is
    ``answer_len`` tokens, and it earns reward 1 iff every answer token is in the teacher's top
    ``n_valid`` tokens at its position. The initial policy is a noisy copy of the teacher with
    sharper logits: calibrated, but not perfect. Training prompts come from a fixed pool;
    pass@1, pass@k and the number of distinct correct answers are measured on held-out prompts
    with ``eval_samples`` samples each (unbiased pass@k estimator).

Methods (same seeds, same budget, same optimiser; see ``make_methods``)
    pg               plain clipped PG, GRPO's symmetric range (eps 0.2 / 0.2), repo="none"
    clip-higher      DAPO clip-higher: fixed eps_low 0.2, eps_high 0.28, repo="none"
    adapo            ADAPO alone: AdaptiveClip moves the clip range, repo="none"
    repo-fixed       REPO, A' = A - zeta (logp - mean), fixed zeta
    repo-decorrelate REPO, zeta = gamma Cov(A, logp) / Var(logp) per mini-batch
    repo-adaptive    REPO decorrelate whose gamma an AdaptiveRepoCoef controller steers
    adapo+repo       adapo_loss: AdaptiveClip on top of REPO decorrelate (its default)

Run::

    python examples/entropy_dynamics.py                  # default run: mu 1 2 4 + precision, seeds 0-2
                                                         # (176 s of CPU time, one core of a 2-core CPU)
    python examples/entropy_dynamics.py --clip-map       # the clip range's authority (ADAPO study)
    python examples/entropy_dynamics.py --quick          # small budget (what the test uses)
    python examples/entropy_dynamics.py --mu 4 --methods pg adapo --seeds 0 1 2 3 4 \
        --set epochs=4 adapo_adapt_low=True             # any Config field
    python examples/entropy_dynamics.py --replot results/entropy_dynamics/entropy_dynamics.json

It writes one figure per regime (``entropy_dynamics_mu{1,2,4}.png``, ``..._precision.png``)
and ``entropy_dynamics.json`` (binned per-seed curves, the configuration and the summary) into
``--out`` and prints a summary table per regime. The default configuration writes into
``results/entropy_dynamics/`` (the committed run), any other into
``results/local/entropy_dynamics/`` (git-ignored), unless ``--out`` says otherwise.
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

import fused_pg
from fused_pg import AdaptiveClip, AdaptiveRepoCoef, adapo_loss, fused_logprobs_entropy, repo_loss

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the studies' shared helpers
from study_common import machine, parse_overrides, pass_at_k, shrink_png  # noqa: E402
from study_common import mean as _mean, std as _std  # noqa: E402

DEFAULT_OUT = "results/entropy_dynamics"        # the committed default run
LOCAL_OUT = "results/local/entropy_dynamics"     # any other configuration (git-ignored)
PRECISIONS = ("fp32", "bf16-fused", "bf16-logits")


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """Everything that defines one regime's runs (the defaults are the committed default run)."""

    # task
    vocab: int = 64                # V
    prompt_len: int = 4
    answer_len: int = 2            # tokens per answer (T of the [B, T, D] hidden states)
    n_valid: int = 24              # rewarded tokens per position (top-k of the teacher)
    d_embed: int = 16
    d_model: int = 64              # D
    init_noise: float = 0.3        # policy init = teacher + init_noise * std(param) * N(0, 1)
    init_logit_scale: float = 7.5  # ... with its LM head scaled by this (sharper than uniform)
    n_train_prompts: int = 512
    n_eval_prompts: int = 64
    # RL
    updates: int = 400             # optimizer steps per run (the same in every regime)
    mu: int = 1                    # mini-batch updates per rollout batch (per epoch)
    epochs: int = 1                # passes over each rollout batch (PPO epochs; 1 in the default run)
    minibatch_prompts: int = 8     # prompts per mini-batch (x group_size samples)
    group_size: int = 8            # GRPO group: samples per prompt
    lr: float = 1e-3               # Adam
    precision: str = "fp32"        # see the module doc
    # clip ranges: plain PG uses GRPO's symmetric range, clip-higher and ADAPO start from DAPO's
    eps_low: float = 0.2
    eps_high_pg: float = 0.2
    eps_high: float = 0.28
    # REPO
    repo_fixed_zeta: float = 0.1
    repo_gamma: float = 1.0        # decorrelate's gamma: 1 removes the batch covariance exactly
    repo_adaptive_rate: float = 0.3
    # ADAPO (AdaptiveClip)
    adapo_rate: float = 0.2
    adapo_bounds: tuple[float, float] = (0.1, 1.0)
    adapo_adapt_low: bool = False  # eps_high only (the library default); --clip-map tries both sides
    adapo_low_ratio: float = 1.0
    adapo_low_bounds: tuple[float, float] = (0.0, 0.3)
    target_frac: float = 1.0       # entropy target = target_frac * initial entropy
    # evaluation
    log_every: int = 20            # curves are stored as means over bins of this many updates
    eval_every: int = 20           # held-out evaluation period (updates)
    eval_samples: int = 32         # samples per held-out prompt (n of the pass@k estimator)
    ks: tuple[int, ...] = (8, 16)  # pass@k
    final_frac: float = 0.1        # "final" = mean over the last 10% of updates

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.updates % (self.mu * self.epochs) or self.updates % self.log_every:
            raise ValueError("updates must be a multiple of mu * epochs and of log_every")
        if max(self.ks) > self.eval_samples:
            raise ValueError("pass@k needs eval_samples >= k")

    @classmethod
    def quick(cls, **kw) -> "Config":
        """Small budget for the test: the same training, held-out evaluation only every 100 steps
        (at 240 updates the REPO runs still trail PG's reward by up to 0.05 on some seeds)."""
        return cls(**{"eval_every": 100, **kw})


@dataclass(frozen=True)
class Method:
    """One training recipe: the loss keyword arguments and an optional entropy controller."""

    label: str
    loss_kwargs: dict = field(default_factory=dict)
    controller: str | None = None  # None | "clip" (ADAPO) | "repo" (adaptive REPO coef)


def make_methods(cfg: Config) -> dict[str, Method]:
    pg_clip = {"eps_low": cfg.eps_low, "eps_high": cfg.eps_high_pg}
    dapo_clip = {"eps_low": cfg.eps_low, "eps_high": cfg.eps_high}
    decorrelate = {"repo": "decorrelate", "repo_coef": cfg.repo_gamma}
    return {
        "pg": Method(f"plain clipped PG (eps {cfg.eps_low}/{cfg.eps_high_pg})", {"repo": "none", **pg_clip}),
        "clip-higher": Method(f"clip-higher (eps {cfg.eps_low}/{cfg.eps_high})", {"repo": "none", **dapo_clip}),
        "adapo": Method("ADAPO alone (AdaptiveClip, repo='none')", {"repo": "none"}, controller="clip"),
        "repo-fixed": Method(f"REPO fixed (zeta={cfg.repo_fixed_zeta})",
                             {"repo": "fixed", "repo_coef": cfg.repo_fixed_zeta, **dapo_clip}),
        "repo-decorrelate": Method(f"REPO decorrelate (gamma={cfg.repo_gamma})", {**decorrelate, **dapo_clip}),
        "repo-adaptive": Method("REPO decorrelate, gamma from AdaptiveRepoCoef",
                                {"repo": "decorrelate", **dapo_clip}, controller="repo"),
        "adapo+repo": Method(f"ADAPO + REPO decorrelate (gamma={cfg.repo_gamma})", decorrelate,
                             controller="clip"),
    }


METHOD_NAMES = tuple(make_methods(Config()))
DEFAULT_METHODS = METHOD_NAMES
PRECISION_METHODS = ("pg", "adapo", "repo-decorrelate", "adapo+repo")  # the precision regime's subset
DEFAULT_MUS = (1, 2, 4)
PRECISION_MU = 4


def make_controller(method: Method, cfg: Config, target_entropy: float):
    if method.controller == "clip":
        return AdaptiveClip(target_entropy=target_entropy, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
                            bounds=cfg.adapo_bounds, rate=cfg.adapo_rate, adapt_low=cfg.adapo_adapt_low,
                            low_ratio=cfg.adapo_low_ratio, low_bounds=cfg.adapo_low_bounds)
    if method.controller == "repo":
        return AdaptiveRepoCoef(target_entropy=target_entropy, repo_coef=cfg.repo_gamma,
                                bounds=(0.0, 1.0), rate=cfg.repo_adaptive_rate)
    return None


# ---------------------------------------------------------------------------------------------
# the policy and the task
# ---------------------------------------------------------------------------------------------


class TinyLM(nn.Module):
    """A fixed-window MLP language model over answer positions.

    Position ``t`` of the answer sees the prompt and ``answer[:t]`` (later slots are zeroed):
    ``forward(prompts [B, P], answers [B, T]) -> hidden [B, T, D]``; the next-token logits are
    ``hidden @ lm_head.weight.T``, which the training step never forms: it hands ``hidden``
    and ``lm_head.weight`` to the fused loss.
    """

    def __init__(self, vocab: int, prompt_len: int, answer_len: int, d_embed: int, d_model: int):
        super().__init__()
        ctx = prompt_len + answer_len - 1
        self.embed = nn.Embedding(vocab, d_embed)
        self.inp = nn.Linear(ctx * d_embed, d_model)
        self.pos = nn.Parameter(0.5 * torch.randn(answer_len, d_model))
        self.mlp = nn.Linear(d_model, d_model)
        self.lm_head = nn.Linear(d_model, vocab, bias=False)
        visible = torch.zeros(answer_len, ctx)
        for t in range(answer_len):
            visible[t, : prompt_len + t] = 1.0
        self.register_buffer("visible", visible)

    def forward(self, prompts: Tensor, answers: Tensor) -> Tensor:
        seq = torch.cat([prompts, answers[:, :-1]], dim=1)                   # [B, ctx]
        x = self.embed(seq)[:, None] * self.visible[None, :, :, None]         # [B, T, ctx, E]
        h = torch.tanh(self.inp(x.flatten(2)) + self.pos)                     # [B, T, D]
        return h + torch.tanh(self.mlp(h))

    @torch.no_grad()
    def sample(self, prompts: Tensor, answer_len: int, generator: torch.Generator) -> Tensor:
        """Ancestral sampling (full logits here: sampling needs the whole distribution)."""
        answers = torch.zeros(prompts.shape[0], answer_len, dtype=torch.long)
        for t in range(answer_len):
            logits = self(prompts, answers)[:, t] @ self.lm_head.weight.T     # [B, V]
            answers[:, t] = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]
        return answers


class Task:
    """Teacher, calibrated initial policy and prompt pools for one seed."""

    def __init__(self, cfg: Config, seed: int):
        self.cfg = cfg
        torch.manual_seed(seed)  # module initialisers use the global generator
        self.teacher = TinyLM(cfg.vocab, cfg.prompt_len, cfg.answer_len, cfg.d_embed, cfg.d_model)
        self.teacher.requires_grad_(False)
        policy = copy.deepcopy(self.teacher)
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(cfg.init_noise * p.std() * torch.randn_like(p))
            policy.lm_head.weight.mul_(cfg.init_logit_scale)
        self.init_policy = policy.requires_grad_(True)
        # disjoint train / held-out prompt pools
        n = cfg.n_train_prompts + cfg.n_eval_prompts
        codes = torch.randint(0, cfg.vocab ** cfg.prompt_len, (2 * n,)).unique()
        codes = codes[torch.randperm(codes.numel())][:n]
        digits = cfg.vocab ** torch.arange(cfg.prompt_len - 1, -1, -1)
        prompts = (codes[:, None] // digits) % cfg.vocab
        self.train_prompts = prompts[: cfg.n_train_prompts]
        self.eval_prompts = prompts[cfg.n_train_prompts:]

    @torch.no_grad()
    def reward(self, prompts: Tensor, answers: Tensor) -> Tensor:
        """1.0 where every answer token is in the teacher's top ``n_valid`` at its position."""
        scores = self.teacher(prompts, answers) @ self.teacher.lm_head.weight.T   # [B, T, V]
        threshold = scores.topk(self.cfg.n_valid, dim=-1).values[..., -1]
        chosen = scores.gather(-1, answers[..., None])[..., 0]
        return (chosen >= threshold).all(dim=1).float()


@torch.no_grad()
def evaluate(task: Task, policy: TinyLM, generator: torch.Generator) -> dict[str, float]:
    """Held-out pass@1, pass@k, distinct correct answers (of ``eval_samples``) and entropy."""
    cfg = task.cfg
    n = cfg.eval_samples
    prompts = task.eval_prompts.repeat_interleave(n, 0)
    answers = policy.sample(prompts, cfg.answer_len, generator)
    rewards = task.reward(prompts, answers).view(-1, n)
    # diversity: distinct correct answers per prompt (answers encoded as base-V integers)
    codes = (answers * cfg.vocab ** torch.arange(cfg.answer_len)).sum(1).view(-1, n)
    codes = torch.where(rewards > 0, codes, -1).sort(dim=1).values
    distinct = (codes[:, :1] >= 0).sum(1) + ((codes[:, 1:] != codes[:, :-1]) & (codes[:, 1:] >= 0)).sum(1)
    _, ent = fused_logprobs_entropy(policy(prompts, answers), policy.lm_head.weight, answers)
    out = {"pass1": rewards.mean().item()}
    for k in cfg.ks:
        out[f"pass{k}"] = pass_at_k(n, rewards.sum(1), k).mean().item()
    out["distinct"] = distinct.float().mean().item()
    out["eval_entropy"] = ent.mean().item()
    return out


# ---------------------------------------------------------------------------------------------
# the trainer's head: log-probs and entropies in the chosen precision
# ---------------------------------------------------------------------------------------------


def head_inputs(policy: TinyLM, hidden: Tensor, precision: str) -> tuple[Tensor, Tensor]:
    """(hidden, weight) as the trainer's LM head sees them (bf16 casts are differentiable)."""
    weight = policy.lm_head.weight
    if precision == "fp32":
        return hidden, weight
    return hidden.to(torch.bfloat16), weight.to(torch.bfloat16)


def materialised_bf16(hidden: Tensor, weight: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Log-probs and entropies from bf16-rounded logits (what a bf16 materialising trainer does):
    ``logits = hidden @ weight.T`` stored in bf16, then log-softmax in fp32."""
    logits = F.linear(hidden, weight)                                   # [B, T, V] bf16 (rounded)
    logp_all = logits.float().log_softmax(-1)
    logp = logp_all.gather(-1, targets[..., None])[..., 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


@torch.no_grad()
def behaviour_logprobs(policy: TinyLM, prompts: Tensor, answers: Tensor, precision: str):
    """The rollout's behaviour log-probs and entropies, from the trainer's own head."""
    hidden, weight = head_inputs(policy, policy(prompts, answers), precision)
    if precision == "bf16-logits":
        return materialised_bf16(hidden, weight, answers)
    return fused_logprobs_entropy(hidden, weight, answers)


def policy_loss(method: Method, ctrl, cfg: Config, policy: TinyLM, prompts: Tensor, answers: Tensor,
                adv: Tensor, old_logp: Tensor):
    hidden, weight = head_inputs(policy, policy(prompts, answers), cfg.precision)
    kwargs = dict(method.loss_kwargs)
    if method.controller == "repo":
        kwargs["repo_coef"] = ctrl.repo_coef
    if cfg.precision == "bf16-logits":
        if not hasattr(fused_pg, "policy_loss_from_logprobs"):
            raise RuntimeError("--precision bf16-logits needs fused_pg.policy_loss_from_logprobs")
        if method.controller == "clip":
            kwargs.update(eps_low=ctrl.eps_low, eps_high=ctrl.eps_high, repo=kwargs.get("repo", "decorrelate"))
        logp, ent = materialised_bf16(hidden, weight, answers)
        return fused_pg.policy_loss_from_logprobs(logp, adv, old_logp, entropy=ent, **kwargs)
    if method.controller == "clip":
        return adapo_loss(hidden, weight, answers, adv, old_logp, controller=ctrl, **kwargs)
    return repo_loss(hidden, weight, answers, adv, old_logp, **kwargs)


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------

# binned per-update curves (means over log_every updates) and held-out curves (every eval_every)
CURVES = ("entropy", "reward", "clip_frac_low", "clip_frac_high", "approx_kl", "adv_logp_cov",
          "eps_low", "eps_high", "repo_coef")


def eval_keys(cfg: Config) -> tuple[str, ...]:
    return ("pass1", *(f"pass{k}" for k in cfg.ks), "distinct", "eval_entropy")


@torch.no_grad()
def initial_entropy(task: Task, seed: int) -> float:
    """Mean token entropy of the initial policy on a rollout of 128 training prompts (the
    reference for "entropy change" and, times target_frac, the controllers' target)."""
    cfg, policy = task.cfg, task.init_policy
    g = torch.Generator().manual_seed(10_000 + seed)
    idx = torch.randint(0, cfg.n_train_prompts, (128,), generator=g)
    prompts = task.train_prompts[idx].repeat_interleave(cfg.group_size, 0)
    answers = policy.sample(prompts, cfg.answer_len, g)
    _, ent = fused_logprobs_entropy(policy(prompts, answers), policy.lm_head.weight, answers)
    return ent.mean().item()


def train(task: Task, method: Method, seed: int, target_entropy: float) -> dict[str, list]:
    """One run; returns binned per-update curves and the held-out evaluations."""
    cfg = task.cfg
    policy = copy.deepcopy(task.init_policy)
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(seed)            # rollouts and mini-batch order
    g_eval = torch.Generator().manual_seed(1_000_003 + seed)
    ctrl = make_controller(method, cfg, target_entropy)

    per_update: dict[str, list[float]] = {name: [] for name in CURVES}
    evals: dict[str, list] = {"step": [], **{k: [] for k in eval_keys(cfg)}}
    mb = cfg.minibatch_prompts * cfg.group_size
    step = 0
    for _ in range(cfg.updates // (cfg.mu * cfg.epochs)):
        # 1. rollout: mu mini-batches of GRPO groups, group-normalised advantages per sequence,
        #    behaviour log-probs fixed for the whole rollout batch
        idx = torch.randint(0, cfg.n_train_prompts, (cfg.mu * cfg.minibatch_prompts,), generator=g)
        prompts = task.train_prompts[idx].repeat_interleave(cfg.group_size, 0)
        answers = policy.sample(prompts, cfg.answer_len, g)
        rewards = task.reward(prompts, answers)
        r = rewards.view(-1, cfg.group_size)
        adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)).view(-1)
        old_logp, ent = behaviour_logprobs(policy, prompts, answers, cfg.precision)
        entropy, reward = ent.mean().item(), rewards.mean().item()

        # 2. mu optimizer steps per epoch, one per mini-batch; the controller steps with the optimizer
        minibatches = [j for _ in range(cfg.epochs) for j in torch.randperm(mb * cfg.mu, generator=g).split(mb)]
        for j in minibatches:
            out = policy_loss(method, ctrl, cfg, policy, prompts[j], answers[j], adv[j], old_logp[j])
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            m = out.metrics
            per_update["entropy"].append(entropy)
            per_update["reward"].append(reward)
            per_update["clip_frac_low"].append(float(m["clip_frac_low"]))
            per_update["clip_frac_high"].append(float(m["clip_frac_high"]))
            per_update["approx_kl"].append(float(m.get("approx_kl", math.nan)))
            per_update["adv_logp_cov"].append(float(m.get("adv_logp_cov_before", math.nan)))
            per_update["eps_low"].append(float(m["eps_low"]))
            per_update["eps_high"].append(float(m["eps_high"]))
            per_update["repo_coef"].append(ctrl.repo_coef if method.controller == "repo"
                                           else method.loss_kwargs.get("repo_coef", 0.0))
            if ctrl is not None:
                ctrl.update(m)  # once per optimizer step; an empty batch would leave it unchanged
            if step % cfg.eval_every == 0:
                _record_eval(evals, step, evaluate(task, policy, g_eval))
            step += 1
    _record_eval(evals, step, evaluate(task, policy, g_eval))
    binned = {k: [sum(v[i:i + cfg.log_every]) / cfg.log_every for i in range(0, len(v), cfg.log_every)]
              for k, v in per_update.items()}
    final = {k: _mean(v[-max(1, round(cfg.final_frac * len(v))):]) for k, v in per_update.items()}
    return {"curves": binned, "evals": evals, "final": final}


def _record_eval(evals: dict, step: int, values: dict) -> None:
    evals["step"].append(step)
    for k, v in values.items():
        evals[k].append(v)


# ---------------------------------------------------------------------------------------------
# experiment, summary, outputs
# ---------------------------------------------------------------------------------------------


def regime_name(cfg: Config) -> str:
    return f"mu{cfg.mu}" if cfg.precision == "fp32" else f"mu{cfg.mu}-{cfg.precision}"


def run_regime(cfg: Config, seeds=(0,), methods=DEFAULT_METHODS, log=print) -> dict:
    """Train every method on every seed in one regime; returns the JSON-ready results."""
    all_methods = make_methods(cfg)
    unknown = [m for m in methods if m not in all_methods]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(all_methods)}")
    runs: dict[str, dict] = {m: {} for m in methods}
    targets: dict[int, float] = {}
    t_start = time.perf_counter()
    for seed in seeds:
        task = Task(cfg, seed)
        h0 = initial_entropy(task, seed)
        targets[seed] = cfg.target_frac * h0
        for name in methods:
            t0 = time.perf_counter()
            run = train(task, all_methods[name], seed, targets[seed])
            run["entropy_init"] = h0
            runs[name][seed] = run
            f = run["final"]
            log(f"  {regime_name(cfg):18s} seed {seed} {name:16s} entropy {run['entropy_init']:.3f} -> "
                f"{f['entropy']:.3f}  reward {f['reward']:.3f}  clip high/low {f['clip_frac_high']:.3f}/"
                f"{f['clip_frac_low']:.3f}  eps {f['eps_low']:.2f}/{f['eps_high']:.2f}  "
                f"({time.perf_counter() - t0:.1f} s)")
    summary = summarize(cfg, runs, targets)
    return {
        "config": asdict(cfg), "seeds": list(seeds), "methods": list(methods),
        "labels": {m: all_methods[m].label for m in methods},
        "target_entropy": {str(s): v for s, v in targets.items()},
        "summary": summary, "checks": acceptance_checks(summary),
        "wall_time_s": time.perf_counter() - t_start,
        "runs": {m: {str(s): {"curves": r["curves"], "evals": r["evals"]} for s, r in per.items()}
                 for m, per in runs.items()},
    }


def summarize(cfg: Config, runs: dict, targets: dict) -> dict:
    out = {}
    for name, per_seed in runs.items():
        rows = {
            "entropy_init": [r["entropy_init"] for r in per_seed.values()],
            "entropy_final": [r["final"]["entropy"] for r in per_seed.values()],
            "entropy_vs_init": [r["final"]["entropy"] / r["entropy_init"] - 1 for r in per_seed.values()],
            "entropy_vs_target": [r["final"]["entropy"] / targets[s] - 1 for s, r in per_seed.items()],
            "reward_final": [r["final"]["reward"] for r in per_seed.values()],
            "clip_frac_high": [r["final"]["clip_frac_high"] for r in per_seed.values()],
            "clip_frac_low": [r["final"]["clip_frac_low"] for r in per_seed.values()],
            "clip_frac_high_mean": [_mean(r["curves"]["clip_frac_high"]) for r in per_seed.values()],
            "clip_frac_low_mean": [_mean(r["curves"]["clip_frac_low"]) for r in per_seed.values()],
            "approx_kl_mean": [_mean(r["curves"]["approx_kl"]) for r in per_seed.values()],
            "eps_high_final": [r["final"]["eps_high"] for r in per_seed.values()],
            "eps_low_final": [r["final"]["eps_low"] for r in per_seed.values()],
        }
        for key in eval_keys(cfg):
            rows[f"{key}_init"] = [r["evals"][key][0] for r in per_seed.values()]
            rows[f"{key}_final"] = [_final_evals(r["evals"], key, cfg) for r in per_seed.values()]
        out[name] = {k: {"mean": _mean(v), "std": _std(v), "per_seed": v} for k, v in rows.items()}
    return out


def _final_evals(evals: dict, key: str, cfg: Config) -> float:
    """Mean of the held-out evaluations in the last final_frac of the updates (at least one)."""
    start = cfg.updates * (1 - cfg.final_frac)
    vals = [v for s, v in zip(evals["step"], evals[key]) if s >= start]
    return _mean(vals or evals[key][-1:])


REWARD_MARGIN = 0.03   # "at a reward gap <= 0.03" to plain PG
ENTROPY_BAND = 0.3     # "within +-30%" of the initial entropy (= the controllers' target)
CONTROLLED = ("repo-decorrelate", "repo-adaptive", "adapo+repo")


def acceptance_checks(summary: dict) -> dict:
    """The headline, evaluated on the seed means."""
    checks = {}
    get = lambda m, k: summary[m][k]["mean"]  # noqa: E731
    if "pg" in summary:
        checks["pg loses more than half of its initial entropy"] = get("pg", "entropy_vs_init") < -0.5
    for m in CONTROLLED:
        if m in summary:
            checks[f"{m} entropy within +-{ENTROPY_BAND:.0%} of initial"] = \
                abs(get(m, "entropy_vs_init")) <= ENTROPY_BAND
            if "pg" in summary:
                gap = get("pg", "reward_final") - get(m, "reward_final")
                checks[f"{m} reward >= pg reward - {REWARD_MARGIN}"] = gap <= REWARD_MARGIN
    return checks


SUMMARY_COLUMNS = (("entropy_final", "H final"), ("reward_final", "reward"), ("pass1_final", "pass@1"),
                   ("pass8_final", "pass@8"), ("pass16_final", "pass@16"), ("distinct_final", "distinct"),
                   ("clip_frac_high_mean", "clip hi"), ("clip_frac_low_mean", "clip lo"))


def print_summary(regime: dict, file=sys.stdout) -> None:
    s, cfg = regime["summary"], regime["config"]
    multi = len(regime["seeds"]) > 1

    def cell(row, key, width=12):
        if key not in row:
            return "-".rjust(width)
        r = row[key]
        text = f"{r['mean']:.3f}+-{r['std']:.3f}" if multi else f"{r['mean']:.3f}"
        return text.rjust(width)

    print(f"\n{regime['name']}: mu={cfg['mu']} updates per rollout, precision {cfg['precision']}, seeds "
          f"{regime['seeds']}, {cfg['updates']} updates; final = mean of the last "
          f"{cfg['final_frac']:.0%}; held-out pass@k and distinct correct answers of "
          f"{cfg['eval_samples']} samples on {cfg['n_eval_prompts']} prompts", file=file)
    head = f"{'method':16s} {'H init':>6s} " + " ".join(f"{t:>12s}" for _, t in SUMMARY_COLUMNS[:1]) + \
        f" {'dH':>5s} " + " ".join(f"{t:>12s}" for _, t in SUMMARY_COLUMNS[1:]) + f" {'eps lo/hi':>9s}"
    print(head, file=file)
    print("-" * len(head), file=file)
    for name, row in s.items():
        print(f"{name:16s} {row['entropy_init']['mean']:6.3f} {cell(row, 'entropy_final')} "
              f"{row['entropy_vs_init']['mean']:+5.0%} "
              + " ".join(cell(row, k) for k, _ in SUMMARY_COLUMNS[1:])
              + f" {row['eps_low_final']['mean']:4.2f}/{row['eps_high_final']['mean']:4.2f}", file=file)
    first = next(iter(s.values()))
    print(f"initial policy: pass@1 {first['pass1_init']['mean']:.3f}, pass@8 {first['pass8_init']['mean']:.3f}, "
          f"pass@16 {first['pass16_init']['mean']:.3f}, distinct {first['distinct_init']['mean']:.2f}; "
          f"entropy target {_mean(list(regime['target_entropy'].values())):.3f}; "
          f"{regime['wall_time_s']:.0f} s", file=file)
    for name, ok in regime["checks"].items():
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}", file=file)


def to_json(results: dict) -> str:
    """Indented metadata and summaries; one line per run's curves, values rounded."""
    def rounded(x, nd=5):
        if isinstance(x, float):
            return round(x, nd)
        if isinstance(x, dict):
            return {k: rounded(v, nd) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [rounded(v, nd) for v in x]
        return x

    runs = {name: rounded(r.pop("runs"), 4) for name, r in results["regimes"].items()}
    try:
        body = json.dumps(rounded(results), indent=1)
    finally:
        for name, r in results["regimes"].items():
            r["runs"] = runs[name]
    lines = []
    for name, per_method in runs.items():
        for m, per_seed in per_method.items():
            for s, run in per_seed.items():
                lines.append(f'  "{name}/{m}/{s}": ' + json.dumps(run, separators=(",", ":")))
    return body[:-2] + ',\n "runs": {\n' + ",\n".join(lines) + "\n }\n}\n"


COLORS = {"pg": "tab:red", "clip-higher": "tab:pink", "adapo": "tab:olive", "repo-fixed": "tab:orange",
          "repo-decorrelate": "tab:blue", "repo-adaptive": "tab:purple", "adapo+repo": "tab:green"}


def plot_regime(regime: dict, path: Path, compare: dict | None = None) -> bool:
    """One figure per regime. ``compare``: a second regime drawn dashed (the precision figure)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    cfg = regime["config"]
    panels = [("entropy", "rollout entropy (nats)"), ("reward", "train reward"),
              ("pass1", "held-out pass@1"), ("pass16", "held-out pass@16 (solid) / pass@8 (dotted)"),
              ("distinct", f"distinct correct answers (of {cfg['eval_samples']})"),
              ("clip_frac_high", "clip fraction, high side"), ("clip_frac_low", "clip fraction, low side"),
              ("eps_high", "eps_high (solid) / eps_low (dotted)")]
    fig, axes = plt.subplots(2, 4, figsize=(15, 6.6))
    styles = [(regime, "-", "")] + ([(compare, "--", f" [{compare['config']['precision']}]")] if compare else [])
    for ax, (key, title) in zip(axes.flat, panels):
        for reg, ls, suffix in styles:
            for name, per_seed in reg["runs"].items():
                xs, lo, mid, hi = _band(reg, per_seed, key)
                label = name + (suffix if compare else "")
                ax.plot(xs, mid, ls, color=COLORS.get(name), lw=1.4, label=label)
                if len(per_seed) > 1 and not compare:
                    ax.fill_between(xs, lo, hi, color=COLORS.get(name), alpha=0.12, lw=0)
                twin_key = {"eps_high": "eps_low", "pass16": "pass8"}.get(key)
                if twin_key:
                    xs2, _, mid2, _ = _band(reg, per_seed, twin_key)
                    ax.plot(xs2, mid2, ":", color=COLORS.get(name), lw=1.2)
        if key == "entropy":
            ax.axhline(_mean(list(regime["target_entropy"].values())), color="k", ls=":", lw=1)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7, ncol=1 if not compare else 2)
    prec = (f"{cfg['precision']} (solid) vs {compare['config']['precision']} (dashed)" if compare
            else cfg["precision"])
    title = f"precision at mu = {cfg['mu']}" if compare else regime["name"]
    fig.suptitle(f"{title}: mu = {cfg['mu']} mini-batch updates per rollout, {prec}; "
                 f"seeds {regime['seeds']} (mean, band = min-max); V={cfg['vocab']}, "
                 f"{cfg['minibatch_prompts']}x{cfg['group_size']} samples per update", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)
    shrink_png(path)
    return True


def _band(regime: dict, per_seed: dict, key: str):
    cfg = regime["config"]
    runs = list(per_seed.values())
    if key in runs[0]["curves"]:
        ys = [r["curves"][key] for r in runs]
        xs = [(i + 0.5) * cfg["log_every"] for i in range(len(ys[0]))]
    else:
        ys = [r["evals"][key] for r in runs]
        xs = runs[0]["evals"]["step"]
    cols = list(zip(*ys))
    return xs, [min(c) for c in cols], [sum(c) / len(c) for c in cols], [max(c) for c in cols]


# ---------------------------------------------------------------------------------------------
# the clip map: how much authority does the clip range have over the entropy? (--clip-map)
# ---------------------------------------------------------------------------------------------

# (label, method, Config overrides); every row runs at mu = 4 with 1 and with 4 epochs
CLIP_MAP_ROWS = (
    ("fixed eps 0.2/0.05", "clip-higher", {"eps_low": 0.2, "eps_high": 0.05}),
    ("fixed eps 0.2/0.2", "clip-higher", {"eps_low": 0.2, "eps_high": 0.2}),
    ("fixed eps 0.2/0.28", "clip-higher", {"eps_low": 0.2, "eps_high": 0.28}),
    ("fixed eps 0.2/2.0", "clip-higher", {"eps_low": 0.2, "eps_high": 2.0}),
    ("fixed eps 0.0/0.28", "clip-higher", {"eps_low": 0.0, "eps_high": 0.28}),
    ("fixed eps 0.0/2.0", "clip-higher", {"eps_low": 0.0, "eps_high": 2.0}),
    ("fixed eps 0.9/0.28", "clip-higher", {"eps_low": 0.9, "eps_high": 0.28}),
    ("ADAPO eps_high only, rate 0.05", "adapo", {"adapo_rate": 0.05}),
    ("ADAPO eps_high only, rate 0.2", "adapo", {"adapo_rate": 0.2}),
    ("ADAPO eps_high only, rate 1.0", "adapo", {"adapo_rate": 1.0}),
    ("ADAPO both sides, rate 0.2", "adapo", {"adapo_rate": 0.2, "adapo_adapt_low": True,
                                            "adapo_low_bounds": (0.0, 0.3)}),
)
CLIP_MAP_EPOCHS = (1, 4)
CLIP_MAP_SEEDS = (0, 1, 2, 3, 4)


def clip_map(base: Config, seeds=CLIP_MAP_SEEDS, log=print) -> dict:
    """Final entropy and clip fractions over a grid of fixed clip ranges and ADAPO variants."""
    rows = []
    t0 = time.perf_counter()
    for epochs in CLIP_MAP_EPOCHS:
        for label, method, over in CLIP_MAP_ROWS:
            cfg = replace(base, mu=4, epochs=epochs, **over)
            s = run_regime(cfg, seeds, (method,), log=lambda *a: None)["summary"][method]
            row = {"epochs": epochs, "label": label, "method": method, "overrides": over,
                   **{k: s[k] for k in ("entropy_vs_init", "entropy_final", "reward_final",
                                        "clip_frac_high_mean", "clip_frac_low_mean",
                                        "eps_low_final", "eps_high_final")}}
            rows.append(row)
            log(f"  mu=4 epochs={epochs} {label:32s} entropy {s['entropy_vs_init']['mean']:+.0%} "
                f"+-{s['entropy_vs_init']['std']:.0%}  reward {s['reward_final']['mean']:.3f}  clip hi/lo "
                f"{s['clip_frac_high_mean']['mean']:.4f}/{s['clip_frac_low_mean']['mean']:.4f}  eps "
                f"{s['eps_low_final']['mean']:.2f}/{s['eps_high_final']['mean']:.2f}")
    return {"config": asdict(base), "seeds": list(seeds), "mu": 4, "rows": rows,
            "wall_time_s": time.perf_counter() - t0}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mu", type=int, nargs="+", default=None,
                   help=f"mini-batch updates per rollout batch, one regime each (default {DEFAULT_MUS})")
    p.add_argument("--precision", nargs="+", default=None, choices=PRECISIONS,
                   help="precisions (default: fp32 for every mu, plus bf16-fused and bf16-logits at "
                        f"mu={PRECISION_MU} for {PRECISION_METHODS})")
    p.add_argument("--updates", type=int, help=f"optimizer steps per run (default {Config.updates})")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: 0 1 2)")
    p.add_argument("--methods", nargs="+", default=None, choices=METHOD_NAMES)
    p.add_argument("--out", type=Path, default=None,
                   help=f"output folder (default: {DEFAULT_OUT} for the default configuration, "
                        f"{LOCAL_OUT} for any other)")
    p.add_argument("--quick", action="store_true", help="small budget (the test's): seed 0, mu 1 and 4, held-out evaluation every 100 steps")
    p.add_argument("--lr", type=float, help=f"Adam learning rate (default {Config.lr})")
    p.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                   help="override any Config field, e.g. --set adapo_rate=0.5 adapo_adapt_low=True")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: these tiny ops only lose from threading)")
    p.add_argument("--clip-map", action="store_true",
                   help="instead: the clip range's authority over the entropy (fixed ranges and ADAPO "
                        f"variants at mu=4, 1 and 4 epochs, seeds {list(CLIP_MAP_SEEDS)}); writes clip_map.json")
    p.add_argument("--replot", type=Path, metavar="JSON",
                   help="instead: redraw the figures of a written entropy_dynamics.json (into its folder)")
    p.add_argument("--no-plot", action="store_true")
    return p.parse_args(argv)


def plan(args) -> list[tuple[Config, tuple[str, ...]]]:
    """The regimes to run: (config, methods)."""
    base = Config.quick() if args.quick else Config()
    over = {k: v for k, v in (("updates", args.updates), ("lr", args.lr)) if v is not None}
    base = replace(base, **over, **parse_overrides(Config, args.set))
    mus = tuple(args.mu) if args.mu else ((1, 4) if args.quick else DEFAULT_MUS)
    methods = tuple(args.methods) if args.methods else DEFAULT_METHODS
    regimes = []
    if args.precision is None:
        regimes += [(replace(base, mu=mu), methods) for mu in mus]
        if not args.quick and not args.mu and not args.methods:
            regimes += [(replace(base, mu=PRECISION_MU, precision=p), PRECISION_METHODS)
                        for p in ("bf16-fused", "bf16-logits")]
    else:
        regimes += [(replace(base, mu=mu, precision=p), methods) for mu in mus for p in args.precision]
    return regimes


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.replot:
        results = load_results(args.replot)
        plot_all(results, args.replot.parent)
        return results
    default_run = (not args.quick and args.mu is None and args.precision is None and args.updates is None
                   and args.seeds is None and args.methods is None and args.lr is None and not args.set)
    out_dir = args.out or Path(DEFAULT_OUT if default_run else LOCAL_OUT)
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # sharp softmaxes make denormals, which are slow on CPU
    t0 = time.perf_counter()
    if args.clip_map:
        seeds = tuple(args.seeds) if args.seeds is not None else CLIP_MAP_SEEDS
        print(f"clip map: {len(CLIP_MAP_ROWS)} clip settings x epochs {CLIP_MAP_EPOCHS} x seeds {list(seeds)} "
              f"-> {out_dir}")
        try:
            cm = clip_map(replace(Config(), **parse_overrides(Config, args.set)), seeds)
        finally:
            torch.set_flush_denormal(False)
            torch.set_num_threads(threads)
        cm.update(command=" ".join(["python", "examples/entropy_dynamics.py",
                                    *(argv if argv is not None else sys.argv[1:])]),
                  torch=torch.__version__, machine=machine(args.threads))
        (out_dir / "clip_map.json").write_text(json.dumps(cm, indent=1) + "\n")
        print(f"wrote {out_dir / 'clip_map.json'}; wall time {cm['wall_time_s']:.1f} s")
        return cm
    seeds = tuple(args.seeds) if args.seeds is not None else ((0,) if args.quick else (0, 1, 2))
    regimes = plan(args)
    print(f"entropy dynamics: {len(regimes)} regimes x seeds {list(seeds)} -> {out_dir}")
    try:
        results: dict = {"regimes": {}}
        for cfg, methods in regimes:
            regime = run_regime(cfg, seeds, methods)
            regime["name"] = regime_name(cfg)
            results["regimes"][regime["name"]] = regime
            print_summary(regime)
    finally:  # process-wide settings: give them back (main() is also called from tests)
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)
    results.update(
        command=" ".join(["python", "examples/entropy_dynamics.py", *(argv if argv is not None else sys.argv[1:])]),
        default_run=default_run, seeds=list(seeds), wall_time_s=time.perf_counter() - t0,
        torch=torch.__version__, machine=machine(args.threads))
    (out_dir / "entropy_dynamics.json").write_text(to_json(results))
    if not args.no_plot:
        plot_all(results, out_dir)
    print(f"wrote {out_dir / 'entropy_dynamics.json'}; wall time {results['wall_time_s']:.1f} s")
    return results


def plot_all(results: dict, out_dir: Path) -> None:
    """One figure per regime; the bf16-logits regime is drawn dashed over its bf16-fused twin."""
    regs = results["regimes"]
    for name, regime in regs.items():
        if regime["config"]["precision"] == "bf16-logits":
            continue
        twin = regs.get(name.replace("bf16-fused", "bf16-logits")) if "bf16-fused" in name else None
        fname = (f"entropy_dynamics_precision_mu{regime['config']['mu']}.png" if twin
                 else f"entropy_dynamics_{name}.png")
        if plot_regime(regime, out_dir / fname, compare=twin):
            print(f"wrote {out_dir / fname}")


def load_results(path: Path) -> dict:
    """An ``entropy_dynamics.json`` with each regime's runs put back in place (for --replot)."""
    data = json.loads(Path(path).read_text())
    for key, run in data.pop("runs").items():
        name, method, seed = key.split("/")
        data["regimes"][name].setdefault("runs", {}).setdefault(method, {})[seed] = run
    return data


if __name__ == "__main__":
    main()
