"""Entropy dynamics of policy-gradient RL: plain clipped PG collapses entropy, REPO keeps it.

A tiny language model is trained with GRPO-style group sampling on a synthetic task where
many different answers earn reward and the initial policy is already calibrated (its likely
answers tend to be the rewarded ones) -- the setting in which policy-gradient training
collapses the policy's entropy. Every method is the *same* training loop; only the loss
call differs, and every loss is computed by ``fused_pg`` straight from the model's final
hidden states and the LM-head weight (no ``N x V`` logits in the training step).

Why entropy collapses: for a softmax policy, one policy-gradient step changes the entropy by
about ``-lr * Cov_{a~pi}(log pi(a), A(a))``. When the policy is calibrated, likely answers
have positive advantages, the covariance is positive, and every step sharpens the
distribution. REPO subtracts ``zeta * (log pi - mean)`` from the advantage so that this
batch covariance shrinks (``decorrelate`` with ``repo_coef = gamma`` removes the fraction
``gamma`` of it); ADAPO adapts the clip range from the measured entropy.

The task
    A frozen random "teacher" network (the same architecture as the policy) scores every
    next token given the context. A prompt is ``prompt_len`` random tokens; an answer is
    ``answer_len`` tokens, and it earns reward 1 iff every answer token is in the teacher's
    top ``n_valid`` tokens at its position (several thousand correct answers per prompt).
    The initial policy is a noisy copy of the teacher with sharper logits: calibrated, but
    not perfect. Training prompts come from a fixed pool; pass@1 and pass@k are measured on
    held-out prompts with ``eval_samples`` samples each (unbiased pass@k estimator).

Methods (same seeds, same budget, same optimiser; see ``make_methods``)
    pg                plain clipped PG, DAPO clip-higher range (repo="none")
    repo-fixed        REPO, A' = A - zeta (logp - mean), fixed zeta
    repo-decorrelate  REPO, zeta = gamma Cov(A, logp) / Var(logp) per batch
    adapo             adapo_loss: the clip range follows an AdaptiveClip entropy controller,
                      on top of the same REPO-decorrelate advantages (adapo_loss's default)
    adapo-clip-only   the AdaptiveClip controller alone (repo="none"): an ablation. In this
                      task it does not stop the collapse: clipping only drops gradient terms
                      (and never the first, on-policy minibatch's), so it can slow the
                      sharpening but not reverse the sign of Cov(A, log pi).
    repo-adaptive     REPO-decorrelate whose gamma an AdaptiveRepoCoef controller steers

Run::

    python examples/entropy_dynamics.py                  # default run, 3-4 min on 2 CPU cores
    python examples/entropy_dynamics.py --quick          # small budget (what the test uses)
    python examples/entropy_dynamics.py --steps 400 --seeds 0 1 2 --out results/local/ed

It writes ``entropy_dynamics.png`` (entropy, reward, pass@1, pass@k, covariance and clip
curves per method) and ``entropy_dynamics.json`` (every per-step curve, the configuration
and the summary) into ``--out`` and prints a summary table. The default configuration
writes into ``results/entropy_dynamics/`` (its committed figure), any other into
``results/local/entropy_dynamics/`` (git-ignored), unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from fused_pg import AdaptiveClip, AdaptiveRepoCoef, adapo_loss, fused_logprobs_entropy, repo_loss

DEFAULT_OUT = "results/entropy_dynamics"        # the committed default run
LOCAL_OUT = "results/local/entropy_dynamics"     # any other configuration (git-ignored)


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """Everything that defines a run (the defaults are the committed default run)."""

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
    steps: int = 250
    prompts_per_step: int = 32
    group_size: int = 8            # GRPO group: samples per prompt
    epochs: int = 2                # passes over each rollout batch (PPO-style: off-policy
    minibatches: int = 4           # minibatches make the clip range matter)
    lr: float = 1e-3               # Adam
    eps_low: float = 0.2
    eps_high: float = 0.28         # DAPO clip-higher; ADAPO starts here
    # methods
    repo_fixed_zeta: float = 0.1
    # decorrelate's repo_coef. gamma = 1 removes the batch covariance exactly, which keeps the
    # entropy flat only to first order for a softmax trained by plain SGD; with Adam and a
    # shared MLP it over-corrects here (seeds 0-1: +17% entropy, reward 0.944 vs PG's 0.997),
    # gamma = 0.5 under-corrects (-42%, 0.993), 0.85 gives -1% / 0.971, 0.7 gives -17% / 0.983.
    repo_gamma: float = 0.7
    adapo_bounds: tuple[float, float] = (0.1, 1.0)
    adapo_rate: float = 0.2        # eps_high change per nat of entropy error per step
    repo_adaptive_rate: float = 0.3
    target_frac: float = 1.0       # entropy target = target_frac * initial entropy
    # evaluation
    eval_every: int = 1
    eval_samples: int = 16         # samples per held-out prompt
    k: int = 8                     # pass@k
    final_frac: float = 0.1        # "final" = mean over the last 10% of steps

    @classmethod
    def quick(cls) -> "Config":
        """Small budget for the test: fewer steps and held-out evaluations."""
        return cls(steps=110, eval_every=10)


@dataclass(frozen=True)
class Method:
    """One training recipe: the loss keyword arguments and an optional entropy controller."""

    label: str
    loss_kwargs: dict = field(default_factory=dict)
    controller: str | None = None  # None | "clip" (ADAPO) | "repo" (adaptive REPO coef)


def make_methods(cfg: Config) -> dict[str, Method]:
    return {
        "pg": Method("plain clipped PG (repo='none')", {"repo": "none"}),
        "repo-fixed": Method(f"REPO fixed (zeta={cfg.repo_fixed_zeta})",
                             {"repo": "fixed", "repo_coef": cfg.repo_fixed_zeta}),
        "repo-decorrelate": Method(f"REPO decorrelate (gamma={cfg.repo_gamma})",
                                   {"repo": "decorrelate", "repo_coef": cfg.repo_gamma}),
        "adapo": Method(f"ADAPO (AdaptiveClip + REPO decorrelate gamma={cfg.repo_gamma})",
                        {"repo": "decorrelate", "repo_coef": cfg.repo_gamma}, controller="clip"),
        "adapo-clip-only": Method("ADAPO clip control only (repo='none')",
                                  {"repo": "none"}, controller="clip"),
        "repo-adaptive": Method("REPO decorrelate, gamma from AdaptiveRepoCoef",
                                {"repo": "decorrelate"}, controller="repo"),
    }


METHOD_NAMES = tuple(make_methods(Config()))
DEFAULT_METHODS = METHOD_NAMES


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


def pass_at_k(n: int, c: Tensor, k: int) -> Tensor:
    """Unbiased pass@k from n samples with c successes: 1 - C(n-c, k) / C(n, k)."""
    return torch.tensor([1.0 - math.comb(n - int(ci), k) / math.comb(n, k) for ci in c])


@torch.no_grad()
def evaluate(task: Task, policy: TinyLM, generator: torch.Generator) -> tuple[float, float, float]:
    """Held-out (pass@1, pass@k, distinct correct answers among ``eval_samples`` samples)."""
    cfg = task.cfg
    n = cfg.eval_samples
    prompts = task.eval_prompts.repeat_interleave(n, 0)
    answers = policy.sample(prompts, cfg.answer_len, generator)
    rewards = task.reward(prompts, answers).view(-1, n)
    # diversity: distinct correct answers per prompt (answers encoded as base-V integers)
    codes = (answers * cfg.vocab ** torch.arange(cfg.answer_len)).sum(1).view(-1, n)
    codes = torch.where(rewards > 0, codes, -1).sort(dim=1).values
    distinct = (codes[:, :1] >= 0).sum(1) + ((codes[:, 1:] != codes[:, :-1]) & (codes[:, 1:] >= 0)).sum(1)
    return (rewards.mean().item(), pass_at_k(n, rewards.sum(1), cfg.k).mean().item(),
            distinct.float().mean().item())


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------

CURVES = ("entropy", "reward", "pass1", "passk", "distinct", "adv_logp_cov", "adv_logp_cov_after",
          "repo_zeta", "clip_frac_low", "clip_frac_high", "eps_low", "eps_high", "repo_coef")


@torch.no_grad()
def initial_entropy(task: Task, seed: int) -> float:
    """Mean token entropy of the initial policy on a rollout of training prompts."""
    cfg, policy = task.cfg, task.init_policy
    g = torch.Generator().manual_seed(10_000 + seed)
    idx = torch.randint(0, cfg.n_train_prompts, (4 * cfg.prompts_per_step,), generator=g)
    prompts = task.train_prompts[idx].repeat_interleave(cfg.group_size, 0)
    answers = policy.sample(prompts, cfg.answer_len, g)
    _, ent = fused_logprobs_entropy(policy(prompts, answers), policy.lm_head.weight, answers)
    return ent.mean().item()


def train(task: Task, method: Method, seed: int, target_entropy: float) -> dict[str, list]:
    """One run; returns per-step curves (pass@1/pass@k are None on steps without evaluation)."""
    cfg = task.cfg
    policy = copy.deepcopy(task.init_policy)
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(seed)            # rollouts and minibatch order
    g_eval = torch.Generator().manual_seed(1_000_003 + seed)
    ctrl: AdaptiveClip | AdaptiveRepoCoef | None = None
    if method.controller == "clip":
        ctrl = AdaptiveClip(target_entropy=target_entropy, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
                            bounds=cfg.adapo_bounds, rate=cfg.adapo_rate)
    elif method.controller == "repo":
        ctrl = AdaptiveRepoCoef(target_entropy=target_entropy, repo_coef=cfg.repo_gamma,
                                bounds=(0.0, 1.0), rate=cfg.repo_adaptive_rate)

    curves: dict[str, list] = {name: [] for name in CURVES}
    n_seqs = cfg.prompts_per_step * cfg.group_size
    mb = n_seqs // cfg.minibatches
    for step in range(cfg.steps):
        # 1. rollout: GRPO groups, group-normalised advantages (one per sequence)
        idx = torch.randint(0, cfg.n_train_prompts, (cfg.prompts_per_step,), generator=g)
        prompts = task.train_prompts[idx].repeat_interleave(cfg.group_size, 0)
        answers = policy.sample(prompts, cfg.answer_len, g)
        rewards = task.reward(prompts, answers)
        r = rewards.view(-1, cfg.group_size)
        adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)).view(-1)
        with torch.no_grad():  # behaviour log-probs and entropies, fused as well
            old_logp, ent = fused_logprobs_entropy(policy(prompts, answers), policy.lm_head.weight, answers)
        entropy = ent.mean()

        # 2. PPO-style updates: `epochs` passes of `minibatches` minibatches
        stats: dict[str, list[float]] = {}
        for _ in range(cfg.epochs):
            perm = torch.randperm(n_seqs, generator=g)
            for j in perm.split(mb):
                hidden = policy(prompts[j], answers[j])                            # [b, T, D]
                args = (hidden, policy.lm_head.weight, answers[j], adv[j], old_logp[j])
                if method.controller == "clip":
                    out = adapo_loss(*args, controller=ctrl, **method.loss_kwargs)
                elif method.controller == "repo":
                    out = repo_loss(*args, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
                                    repo_coef=ctrl.repo_coef, **method.loss_kwargs)
                else:
                    out = repo_loss(*args, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
                                    **method.loss_kwargs)
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
                opt.step()
                m = out.metrics
                for key, name in (("adv_logp_cov_before", "adv_logp_cov"),
                                  ("adv_logp_cov_after", "adv_logp_cov_after"),
                                  ("repo_zeta", "repo_zeta"), ("clip_frac_low", "clip_frac_low"),
                                  ("clip_frac_high", "clip_frac_high")):
                    stats.setdefault(name, []).append(float(m[key]))

        # 3. record, then let the controller see this step's entropy (one scalar per step)
        curves["entropy"].append(entropy.item())
        curves["reward"].append(rewards.mean().item())
        for name, vals in stats.items():
            curves[name].append(sum(vals) / len(vals))
        curves["eps_low"].append(float(m["eps_low"]))
        curves["eps_high"].append(float(m["eps_high"]))
        if method.controller == "repo":
            curves["repo_coef"].append(ctrl.repo_coef)
        else:
            curves["repo_coef"].append(method.loss_kwargs.get("repo_coef", 0.0))
        if ctrl is not None:
            ctrl.update(entropy)
        if step % cfg.eval_every == 0 or step == cfg.steps - 1:
            p1, pk, distinct = evaluate(task, policy, g_eval)
        else:
            p1 = pk = distinct = None
        curves["pass1"].append(p1)
        curves["passk"].append(pk)
        curves["distinct"].append(distinct)
    return curves


# ---------------------------------------------------------------------------------------------
# experiment, summary, outputs
# ---------------------------------------------------------------------------------------------


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else float("nan")


def _std(xs) -> float:
    if len(xs) < 2:
        return 0.0
    mu = _mean(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1))


def final_value(curve: list, frac: float) -> float:
    """Mean over the last ``frac`` of the steps (at least one recorded value)."""
    tail = max(1, int(round(len(curve) * frac)))
    vals = [x for x in curve[-tail:] if x is not None]
    if not vals:  # sparse evaluations: the last recorded one
        vals = [next(x for x in reversed(curve) if x is not None)]
    return _mean(vals)


def run_experiment(cfg: Config, seeds=(0,), methods=DEFAULT_METHODS, log=print) -> dict:
    """Train every method on every seed; returns the JSON-ready results."""
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
            curves = train(task, all_methods[name], seed, targets[seed])
            runs[name][seed] = curves
            log(f"  seed {seed} {name:17s} entropy {curves['entropy'][0]:.3f} -> "
                f"{final_value(curves['entropy'], cfg.final_frac):.3f}   reward "
                f"{final_value(curves['reward'], cfg.final_frac):.3f}   ({time.perf_counter() - t0:.1f} s)")
    summary = summarize(cfg, runs, targets)
    return {
        "config": asdict(cfg), "seeds": list(seeds), "methods": list(methods),
        "labels": {m: all_methods[m].label for m in methods},
        "target_entropy": {str(s): v for s, v in targets.items()},
        "summary": summary, "checks": acceptance_checks(summary),
        "wall_time_s": time.perf_counter() - t_start,
        "runs": {m: {str(s): c for s, c in r.items()} for m, r in runs.items()},
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''} x{os.cpu_count()} cpus, "
                   f"{torch.get_num_threads()} torch thread(s)".replace("  ", " "),
    }


def summarize(cfg: Config, runs: dict, targets: dict) -> dict:
    out = {}
    for name, per_seed in runs.items():
        rows = {
            "entropy_init": [c["entropy"][0] for c in per_seed.values()],
            "entropy_final": [final_value(c["entropy"], cfg.final_frac) for c in per_seed.values()],
            "reward_final": [final_value(c["reward"], cfg.final_frac) for c in per_seed.values()],
            "pass1_final": [final_value(c["pass1"], cfg.final_frac) for c in per_seed.values()],
            "passk_final": [final_value(c["passk"], cfg.final_frac) for c in per_seed.values()],
            "pass1_init": [c["pass1"][0] for c in per_seed.values()],
            "passk_init": [c["passk"][0] for c in per_seed.values()],
            "distinct_init": [c["distinct"][0] for c in per_seed.values()],
            "distinct_final": [final_value(c["distinct"], cfg.final_frac) for c in per_seed.values()],
            "eps_high_final": [c["eps_high"][-1] for c in per_seed.values()],
            "entropy_vs_init": [final_value(c["entropy"], cfg.final_frac) / c["entropy"][0] - 1
                                for c in per_seed.values()],
            "entropy_vs_target": [final_value(c["entropy"], cfg.final_frac) / targets[s] - 1
                                  for s, c in per_seed.items()],
        }
        out[name] = {k: {"mean": _mean(v), "std": _std(v), "per_seed": v} for k, v in rows.items()}
    return out


REWARD_MARGIN = 0.03  # what "no worse than plain PG's by more than a small margin" means here


def acceptance_checks(summary: dict) -> dict:
    """The issue's acceptance criteria, evaluated on the seed means."""
    checks = {}
    get = lambda m, k: summary[m][k]["mean"]  # noqa: E731
    if "pg" in summary:
        checks["pg loses >= 50% of its initial entropy"] = get("pg", "entropy_vs_init") <= -0.5
    for m in ("repo-decorrelate", "adapo"):
        if m in summary:
            key = "entropy_vs_target" if m == "adapo" else "entropy_vs_init"
            ref = "target" if m == "adapo" else "initial"
            checks[f"{m} entropy within +-30% of {ref}"] = abs(get(m, key)) <= 0.3
            if "pg" in summary:
                gap = get("pg", "reward_final") - get(m, "reward_final")
                checks[f"{m} reward >= pg reward - {REWARD_MARGIN}"] = gap <= REWARD_MARGIN
    return checks


def print_summary(results: dict, file=sys.stdout) -> None:
    s = results["summary"]
    cfg = results["config"]
    k, n = cfg["k"], cfg["eval_samples"]
    multi = len(results["seeds"]) > 1

    def cell(row, key, width=13):
        r = row[key]
        text = f"{r['mean']:.3f}+-{r['std']:.3f}" if multi else f"{r['mean']:.3f}"
        return text.rjust(width)

    print(f"\nsummary over seeds {results['seeds']}: final = mean of the last {cfg['final_frac']:.0%} "
          f"of steps; pass@1, pass@{k} and distinct correct answers (of {n} samples) on "
          f"{cfg['n_eval_prompts']} held-out prompts", file=file)
    head = (f"{'method':17s} {'H init':>6s} {'H final':>13s} {'dH':>5s} {'reward':>13s} {'pass@1':>13s} "
            f"{f'pass@{k}':>13s} {'distinct':>13s} {'eps_high':>8s}")
    print(head, file=file)
    print("-" * len(head), file=file)
    for name, row in s.items():
        cells = " ".join(cell(row, key) for key in ("reward_final", "pass1_final", "passk_final",
                                                     "distinct_final"))
        print(f"{name:17s} {row['entropy_init']['mean']:6.3f} {cell(row, 'entropy_final')} "
              f"{row['entropy_vs_init']['mean']:+5.0%} {cells} {row['eps_high_final']['mean']:8.2f}",
              file=file)
    first = next(iter(s.values()))
    print(f"initial policy: pass@1 {first['pass1_init']['mean']:.3f}, "
          f"pass@{k} {first['passk_init']['mean']:.3f}, distinct {first['distinct_init']['mean']:.2f}; "
          f"entropy target (ADAPO, adaptive REPO) "
          f"{_mean(list(results['target_entropy'].values())):.3f}", file=file)
    print("\nacceptance checks (seed means):", file=file)
    for name, ok in results["checks"].items():
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}", file=file)


def to_json(results: dict) -> str:
    """Indented metadata and summary; one line per curve, values rounded to 5 decimals."""
    def rounded(x):
        if isinstance(x, float):
            return round(x, 5)
        if isinstance(x, dict):
            return {k: rounded(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [rounded(v) for v in x]
        return x

    runs = rounded(results["runs"])
    body = json.dumps({k: rounded(v) for k, v in results.items() if k != "runs"}, indent=1)
    lines = [f'  "{m}": {{' + ", ".join(f'\n   "{s}": {json.dumps(c, separators=(",", ":"))}'
                                         for s, c in per_seed.items()) + "}"
             for m, per_seed in runs.items()]
    return body[:-2] + ',\n "runs": {\n' + ",\n".join(lines) + "\n }\n}\n"


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    cfg = results["config"]
    panels = [("entropy", "mean token entropy (nats)"), ("reward", "train reward (rollout mean)"),
              ("pass1", "held-out pass@1"), ("passk", f"held-out pass@{cfg['k']}"),
              ("distinct", f"held-out distinct correct answers (of {cfg['eval_samples']})"),
              ("adv_logp_cov", "batch Cov(A, log pi) before REPO"),
              ("eps_high", "eps_high (ADAPO moves it)"), ("clip_frac_high", "clip fraction (high side)")]
    colors = {"pg": "tab:red", "repo-fixed": "tab:orange", "repo-decorrelate": "tab:blue",
              "adapo": "tab:green", "adapo-clip-only": "tab:olive", "repo-adaptive": "tab:purple"}
    fig, axes = plt.subplots(2, 4, figsize=(19, 8.5))
    for ax, (key, title) in zip(axes.flat, panels):
        for name, per_seed in results["runs"].items():
            xs, ys = _mean_curve(list(per_seed.values()), key)
            if key in ("reward", "adv_logp_cov", "clip_frac_high"):
                ys = _smooth(ys, 9)
            ax.plot(xs, ys, label=name, color=colors.get(name), lw=1.6)
        if key in ("pass1", "passk"):
            ax.set_ylim(bottom=min(0.9, ax.get_ylim()[0]), top=1.005)
        if key == "entropy":
            ax.axhline(_mean(list(results["target_entropy"].values())), color="k", ls=":", lw=1,
                       label="initial entropy = target")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"Entropy dynamics, seeds {results['seeds']}: V={cfg['vocab']}, "
                 f"{cfg['answer_len']}-token answers, {cfg['n_valid']} valid tokens/position, "
                 f"GRPO group {cfg['group_size']}, {cfg['steps']} steps (fused_pg losses from hidden states)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _mean_curve(curves: list[dict], key: str) -> tuple[list[int], list[float]]:
    n = len(curves[0][key])
    xs, ys = [], []
    for i in range(n):
        vals = [c[key][i] for c in curves if c[key][i] is not None]
        if vals:
            xs.append(i)
            ys.append(sum(vals) / len(vals))
    return xs, ys


def _smooth(ys: list[float], w: int) -> list[float]:
    out = []
    for i in range(len(ys)):
        lo = max(0, i - w + 1)
        out.append(sum(ys[lo: i + 1]) / (i + 1 - lo))
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, help=f"RL steps per run (default {Config.steps})")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: 0 1)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHOD_NAMES)
    p.add_argument("--out", type=Path, default=None,
                   help=f"output folder (default: {DEFAULT_OUT} for the default configuration, "
                        f"{LOCAL_OUT} for any other)")
    p.add_argument("--quick", action="store_true", help="small budget: one seed, fewer steps")
    p.add_argument("--lr", type=float, help=f"Adam learning rate (default {Config.lr})")
    p.add_argument("--eval-every", type=int, help="held-out evaluation period in steps")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: these tiny ops only lose from threading)")
    p.add_argument("--no-plot", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = Config.quick() if args.quick else Config()
    overrides = {k: v for k, v in (("steps", args.steps), ("lr", args.lr), ("eval_every", args.eval_every))
                 if v is not None}
    cfg = replace(cfg, **overrides)
    seeds = tuple(args.seeds) if args.seeds is not None else ((0,) if args.quick else (0, 1))
    default_run = cfg == Config() and seeds == (0, 1) and tuple(args.methods) == DEFAULT_METHODS
    out_dir = args.out or Path(DEFAULT_OUT if default_run else LOCAL_OUT)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"entropy dynamics: {len(args.methods)} methods x seeds {list(seeds)} x {cfg.steps} steps "
          f"({cfg.prompts_per_step} prompts x {cfg.group_size} samples, {cfg.answer_len}-token answers, "
          f"V={cfg.vocab}) -> {out_dir}")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # sharp softmaxes make denormals, which are slow on CPU
    try:
        results = run_experiment(cfg, seeds, args.methods)
    finally:  # process-wide settings: give them back (main() is also called from tests)
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)
    results["command"] = " ".join(["python", "examples/entropy_dynamics.py", *(argv or sys.argv[1:])])
    results["default_run"] = default_run
    print_summary(results)
    (out_dir / "entropy_dynamics.json").write_text(to_json(results))
    if not args.no_plot and plot(results, out_dir / "entropy_dynamics.png"):
        print(f"\nwrote {out_dir / 'entropy_dynamics.png'} and {out_dir / 'entropy_dynamics.json'}")
    print(f"wall time {results['wall_time_s']:.1f} s")
    return results


if __name__ == "__main__":
    main()
