"""The transformer entropy study at a small budget: plain PG collapses the entropy at the forks
and then cannot learn a task whose answers it no longer samples; REPO keeps the forks open and
learns it; a bf16 sampler's log-probs clip tokens on-policy; runs are deterministic.

The margins are qualitative (a factor of two in entropy, 0.1 of reward area) against the
differences the quick configuration shows on seed 0 (entropy 0.06 vs 0.40 nats, area 0.0 vs 0.7).
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from helpers.examples import load_example

METHODS = ("pg", "adapo-high", "repo-decorrelate")


@pytest.fixture(scope="module")
def et():
    return load_example("entropy_transformer")


@pytest.fixture(scope="module")
def study(et):
    """Seed 0 at the quick budget: phase 1 at mu = 4, phase 2 from each policy, the bf16 sampler for PG."""
    return et.run_study(et.Config.quick(), seeds=(0,), mus=(4,), methods=METHODS, precisions=("bf16-sampler",),
                        precision_methods=("pg",), log=lambda *a: None)


def _get(study, group, key):
    return study["summary"][group][key]["mean"]


def test_pg_collapses_the_forks_and_repo_keeps_them(study):
    h0 = study["seed_info"]["0"]["entropy_init"]
    pg = _get(study, "phase1/mu4/pg", "entropy_final")
    repo = _get(study, "phase1/mu4/repo-decorrelate", "entropy_final")
    assert pg < 0.5 * h0, (pg, h0)
    assert repo > 2 * pg, (repo, pg)
    assert _get(study, "phase1/mu4/repo-decorrelate", "entropy_fork_final") > \
        2 * _get(study, "phase1/mu4/pg", "entropy_fork_final")
    # both learn phase 1: reward above the warm-up policy's held-out pass@1
    start = study["seed_info"]["0"]["init_eval"]["pass1"]
    for m in ("pg", "repo-decorrelate"):
        assert _get(study, f"phase1/mu4/{m}", "reward_final") > start, m
    # distinct correct answers follow the fork entropy
    assert _get(study, "phase1/mu4/repo-decorrelate", "distinct_final") > _get(study, "phase1/mu4/pg", "distinct_final")


def test_the_entropy_preserving_policy_learns_the_second_task_faster(study):
    pg = _get(study, "phase2/mu4/pg", "reward_auc")
    repo = _get(study, "phase2/mu4/repo-decorrelate", "reward_auc")
    assert repo > pg + 0.1, (repo, pg)
    assert set(study["summary"]) >= {"phase2/mu4/pg", "phase2/warmup/none"}


def test_clips_act_off_policy_and_the_controller_moves(study, et):
    cfg = study["config"]
    for m in METHODS:
        row = study["summary"][f"phase1/mu4/{m}"]
        assert row["clip_frac_high"]["mean"] > 0 and row["clip_frac_low"]["mean"] > 0, m
        assert row["phantom_clip_frac"]["mean"] == 0.0, m  # fp32: the sampler is the trainer
        for key in ("entropy_drive", "entropy_drive_pos", "entropy_drive_neg"):
            assert row[key]["mean"] == row[key]["mean"], (m, key)  # measured (not NaN)
    eps = study["runs"]["phase1/mu4/adapo-high/0"]["curves"]["eps_high"]
    assert eps[-1] != cfg["eps_high"]
    assert all(abs(x - cfg["eps_high_pg"]) < 1e-12 for x in study["runs"]["phase1/mu4/pg/0"]["curves"]["eps_high"])


def test_a_bf16_sampler_clips_on_policy(study):
    """mu = 1 and the sampler's log-probs as the behaviour log-probs: every clip is the mismatch's."""
    row = study["summary"]["precision/bf16-sampler/pg"]
    assert row["phantom_clip_frac"]["mean"] > 0
    assert row["sampler_mismatch"]["mean"] > 0
    assert row["clip_frac_high"]["mean"] + row["clip_frac_low"]["mean"] > 0


def test_runs_are_deterministic_and_on_policy_runs_never_clip(et):
    cfg = dataclasses.replace(et.Config.quick(), updates=20, warmup_steps=20, eval_every=10)
    method = et.make_methods(cfg)["repo-r"]
    runs = []
    for _ in range(2):
        task = et.Task(cfg, seed=3)
        runs.append(et.train(task, task.init_policy, method, cfg, seed=3, target=0.5))
    a, b = (json.dumps(r, sort_keys=True) for r in runs)  # NaN-safe equality
    assert a == b
    curves = runs[0]["curves"]
    assert max(curves["clip_frac_high"]) == 0.0 and max(curves["clip_frac_low"]) == 0.0
    assert len(set(curves["repo_zeta"])) > 1  # the multiplicative controller steps zeta


def test_main_writes_the_documented_json_and_figures(et, tmp_path):
    et.main(["--quick", "--methods", "pg", "--set", "updates=20", "phase2_updates=10", "eval_every=10",
             "--precision", "bf16-tis", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "entropy_transformer.json").read_text())
    for key in ("config", "seeds", "mus", "methods", "precisions", "labels", "seed_info", "summary", "runs",
                "wall_time_s", "machine", "command", "torch", "default_run"):
        assert key in data, key
    assert data["default_run"] is False
    assert set(data["summary"]) == {"phase1/mu4/pg", "phase2/mu4/pg", "phase2/warmup/none",
                                    "precision/bf16-tis/pg"}
    row = data["summary"]["phase1/mu4/pg"]
    for key in (*et.SUMMARY_KEYS, "pass1_final", "pass16_final", "distinct_final", "fork_probs_final"):
        assert key in row, key
    assert data["summary"]["precision/bf16-tis/pg"]["phantom_clip_frac"]["mean"] > 0
    assert len(data["runs"]["phase1/mu4/pg/0"]["curves"]["entropy"]) == 20 // data["config"]["log_every"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    for name in ("phase1.png", "phase2.png", "precision.png"):
        assert (tmp_path / name).stat().st_size > 2_000, name
        (tmp_path / name).unlink()
    et.main(["--replot", str(tmp_path / "entropy_transformer.json")])  # figures from the JSON alone
    assert (tmp_path / "phase2.png").stat().st_size > 2_000


@pytest.mark.slow
def test_quick_command_runs(et, tmp_path):
    """The documented `--quick` run, end to end (about a minute on one core)."""
    results = et.main(["--quick", "--out", str(tmp_path)])
    s = results["summary"]
    assert s["phase1/mu4/repo-r"]["entropy_final"]["mean"] > 2 * s["phase1/mu4/pg"]["entropy_final"]["mean"]
    assert s["phase2/mu4/repo-r"]["reward_auc"]["mean"] > s["phase2/mu4/pg"]["reward_auc"]["mean"]
