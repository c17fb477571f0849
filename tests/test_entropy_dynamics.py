"""The entropy-dynamics example (issue 6) at a small budget: plain PG collapses entropy,
REPO-decorrelate and ADAPO keep it.

Margins come from the example's quick configuration over seeds 0-11 (110 steps): the final
entropy of plain PG was 0.11-0.40x that of REPO-decorrelate and 0.12-0.40x that of ADAPO, PG
kept 11-32% of its initial entropy, and REPO-decorrelate / ADAPO kept 75-102% of theirs, at
rewards 0.010-0.038 below PG's. The test runs seed 0 only (ratios 0.25 and 0.28).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "entropy_dynamics.py"


def _load_example():
    name = "entropy_dynamics_example"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These are tiny ops: with two intra-op threads the module took 330 s instead of 20 s here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ed():
    return _load_example()


@pytest.fixture(scope="module")
def quick_run(ed):
    cfg = ed.Config.quick()
    methods = ("pg", "repo-decorrelate", "adapo")
    return ed.run_experiment(cfg, seeds=(0,), methods=methods, log=lambda *a: None)


def _final(results, method, key):
    return results["summary"][method][key]["mean"]


def test_pg_collapses_entropy_repo_and_adapo_keep_it(quick_run):
    h = {m: _final(quick_run, m, "entropy_final") for m in ("pg", "repo-decorrelate", "adapo")}
    h0 = {m: _final(quick_run, m, "entropy_init") for m in h}
    print(f"final entropy {h} (initial {h0})")
    # the qualitative claim, with the margin the run reliably shows (worst seed: 0.40x)
    assert h["pg"] < 0.5 * h["repo-decorrelate"], h
    assert h["pg"] < 0.5 * h["adapo"], h
    # plain PG loses more than half of its entropy; the entropy-preserving runs keep >= 70%
    assert h["pg"] < 0.5 * h0["pg"], (h, h0)
    assert h["repo-decorrelate"] > 0.7 * h0["repo-decorrelate"], (h, h0)
    assert h["adapo"] > 0.7 * quick_run["target_entropy"]["0"], (h, quick_run["target_entropy"])


def test_entropy_preservation_is_not_bought_with_the_reward(quick_run):
    r = {m: _final(quick_run, m, "reward_final") for m in ("pg", "repo-decorrelate", "adapo")}
    print(f"final train reward {r}")
    assert r["pg"] > 0.95, r  # the task is learnable: PG gets there
    assert r["repo-decorrelate"] >= r["pg"] - 0.05, r
    assert r["adapo"] >= r["pg"] - 0.05, r


def test_curves_are_recorded_per_step(quick_run, ed):
    cfg = ed.Config.quick()
    for method, per_seed in quick_run["runs"].items():
        curves = per_seed["0"]
        for name in ed.CURVES:
            assert len(curves[name]) == cfg.steps, (method, name)
        for name in ("entropy", "reward", "adv_logp_cov", "clip_frac_low", "clip_frac_high", "eps_high"):
            assert all(x is not None for x in curves[name]), (method, name)
        eval_steps = [s for s in range(cfg.steps) if s % cfg.eval_every == 0 or s == cfg.steps - 1]
        for name in ("pass1", "passk", "distinct"):
            assert [s for s, x in enumerate(curves[name]) if x is not None] == eval_steps, (method, name)
        assert all(0.0 <= curves["passk"][s] <= 1.0 for s in eval_steps)
    # ADAPO's controller moved eps_high; the other runs kept the DAPO value
    assert quick_run["runs"]["adapo"]["0"]["eps_high"][-1] != cfg.eps_high
    assert set(quick_run["runs"]["pg"]["0"]["eps_high"]) == {cfg.eps_high}


def test_runs_are_deterministic(ed):
    cfg = dataclasses.replace(ed.Config.quick(), steps=4, eval_every=2)
    task = ed.Task(cfg, seed=3)
    method = ed.make_methods(cfg)["adapo"]
    a = ed.train(task, method, seed=3, target_entropy=1.5)
    b = ed.train(ed.Task(cfg, seed=3), method, seed=3, target_entropy=1.5)
    assert a == b


def test_main_writes_json_and_plot(ed, tmp_path):
    results = ed.main(["--quick", "--steps", "3", "--methods", "pg", "adapo", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "entropy_dynamics.json").read_text())
    assert data["methods"] == ["pg", "adapo"] and data["default_run"] is False
    assert len(data["runs"]["adapo"]["0"]["entropy"]) == 3
    assert set(data["summary"]) == {"pg", "adapo"} and results["checks"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "entropy_dynamics.png").stat().st_size > 10_000
