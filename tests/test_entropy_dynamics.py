"""The entropy-dynamics example at a small budget: plain PG collapses entropy,
the controlled methods keep it -- on-policy (mu = 1) and with several mini-batch updates per
rollout (mu = 4), where the ratios leave 1 and the clip acts.

Margins: see QUICK_MARGINS below (measured with the example's quick configuration).
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from helpers.examples import load_example

METHODS = ("pg", "repo-decorrelate", "adapo+repo")
MUS = (1, 4)


@pytest.fixture(scope="module")
def ed():
    return load_example("entropy_dynamics")


@pytest.fixture(scope="module")
def quick(ed):
    """{mu: regime results} for seed 0 at the quick budget."""
    return {mu: ed.run_regime(ed.Config.quick(mu=mu), seeds=(0,), methods=METHODS, log=lambda *a: None)
            for mu in MUS}


def _final(regime, method, key):
    return regime["summary"][method][key]["mean"]


@pytest.mark.parametrize("mu", MUS)
def test_pg_collapses_entropy_and_the_controlled_methods_keep_it(quick, mu):
    regime = quick[mu]
    dh = {m: _final(regime, m, "entropy_vs_init") for m in METHODS}
    reward = {m: _final(regime, m, "reward_final") for m in METHODS}
    print(f"mu={mu}: entropy change {dh}, reward {reward}")
    assert dh["pg"] < -0.5, dh  # plain PG loses more than half of its entropy
    assert reward["pg"] > 0.95, reward  # the task is learnable: PG gets there
    for m in ("repo-decorrelate", "adapo+repo"):
        assert abs(dh[m]) <= 0.3, (m, dh)
        assert reward[m] >= reward["pg"] - 0.03, (m, reward)
    assert all(regime["checks"].values()), regime["checks"]


def test_the_clip_acts_only_off_policy(quick):
    """mu = 1 is exactly on-policy: every ratio is 1, so no clip fraction is ever non-zero. With
    mu = 4 the later mini-batches of a rollout have moved ratios, and the clip acts."""
    for m in METHODS:
        on = quick[1]["runs"][m]["0"]["curves"]
        off = quick[4]["runs"][m]["0"]["curves"]
        assert max(on["clip_frac_high"]) == 0.0 and max(on["clip_frac_low"]) == 0.0, m
        assert max(abs(x) for x in on["approx_kl"]) < 1e-6, m
        assert max(off["clip_frac_high"]) > 0.0 and max(off["clip_frac_low"]) > 0.0, m
        assert max(off["approx_kl"]) > 1e-3, m
    # ADAPO's controller moved eps_high; plain PG kept its range
    cfg = quick[4]["config"]
    assert quick[4]["runs"]["adapo+repo"]["0"]["curves"]["eps_high"][-1] != cfg["eps_high"]
    assert all(abs(x - cfg["eps_high_pg"]) < 1e-12 for x in quick[4]["runs"]["pg"]["0"]["curves"]["eps_high"])


def test_curves_and_evaluations_are_recorded(quick, ed):
    regime = quick[4]
    cfg = ed.Config.quick(mu=4)
    for method, per_seed in regime["runs"].items():
        run = per_seed["0"]
        for name in ed.CURVES:
            assert len(run["curves"][name]) == cfg.updates // cfg.log_every, (method, name)
        steps = list(range(0, cfg.updates, cfg.eval_every)) + [cfg.updates]
        assert run["evals"]["step"] == steps
        for key in ed.eval_keys(cfg):
            assert len(run["evals"][key]) == len(steps), (method, key)
        for k in cfg.ks:
            assert all(0.0 <= x <= 1.0 for x in run["evals"][f"pass{k}"])
            assert all(a <= b + 1e-12 for a, b in zip(run["evals"]["pass1"], run["evals"][f"pass{k}"]))


def test_runs_are_deterministic(ed):
    cfg = dataclasses.replace(ed.Config.quick(mu=2), updates=20, log_every=10, eval_every=10)
    method = ed.make_methods(cfg)["adapo+repo"]
    a = ed.train(ed.Task(cfg, seed=3), method, seed=3, target_entropy=1.5)
    b = ed.train(ed.Task(cfg, seed=3), method, seed=3, target_entropy=1.5)
    assert a == b


def test_main_writes_json_and_one_plot_per_regime(ed, tmp_path):
    results = ed.main(["--quick", "--updates", "20", "--mu", "1", "2", "--methods", "pg", "adapo",
                       "--out", str(tmp_path)])
    data = json.loads((tmp_path / "entropy_dynamics.json").read_text())
    assert data["default_run"] is False and set(data["regimes"]) == {"mu1", "mu2"}
    assert data["regimes"]["mu2"]["methods"] == ["pg", "adapo"]
    assert len(data["runs"]["mu2/adapo/0"]["curves"]["entropy"]) == 20 // ed.Config().log_every
    assert results["regimes"]["mu1"]["checks"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    for name in ("mu1", "mu2"):
        png = tmp_path / f"entropy_dynamics_{name}.png"
        assert png.stat().st_size > 10_000
        png.unlink()
    again = ed.main(["--replot", str(tmp_path / "entropy_dynamics.json")])  # figures from the JSON alone
    assert set(again["regimes"]["mu2"]["runs"]) == {"pg", "adapo"}
    assert (tmp_path / "entropy_dynamics_mu2.png").stat().st_size > 10_000
