"""Tests of the benchmark CLI (``python -m bench``): arguments, JSON schema, tiny CPU runs, and
each behaviour of the command line (estimate and refusal, Ctrl-C, exit codes, flags, odd N,
the plot, realistic data, the console entry point, ``--tune``, the peers, ``--acceptance``).

Benchmarks are not timed tests: nothing here asserts a speed. The runs use tiny shapes; the
whole file takes about a minute on 2 cores (the torch.compile test is the largest part: one
compile of one small graph).
"""

from __future__ import annotations

import io
import json
import os
import re
import runpy
import subprocess
import sys
import types
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

from fused_pg.bench import acceptance, cli, impls, measure, peers, problem, report, runner
from fused_pg import LossConfig
from fused_pg.bench.config import DEFAULT_LOSS, MODEL_PRESETS, Shape, loss_options
from fused_pg.config import PRECISIONS
from fused_pg.bench.impls import IMPL_KEYS, build_impls

ROOT = Path(__file__).resolve().parents[1]
needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU defaults and CPU skip reasons")

# tiny problem: 2 sequences of 64 tokens, odd V (exercises the tails of the vocabulary tiles)
TINY = ["--n", "128", "--d", "32", "--v", "1000", "--seq-len", "64", "--warmup", "1", "--repeats", "2"]


def parse_error(argv: list[str], capsys) -> str:
    """Run the parser on bad arguments; return its error message (it must exit with 2)."""
    with pytest.raises(SystemExit) as exc:
        cli.config_from_args(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def run_main(argv: list[str], capsys, status: int = 0) -> tuple[str, dict]:
    """``python -m bench argv`` in this process; returns (stdout, the JSON it wrote)."""
    out_dir = argv[argv.index("--out") + 1]
    assert cli.main(argv) == status
    stdout = capsys.readouterr().out
    with open(os.path.join(out_dir, report.JSON_NAME)) as f:
        return stdout, json.load(f)


def replace_impl(monkeypatch, key: str, make) -> None:
    """Make ``--impl key`` build one implementation whose steps come from ``make(problem, spec)``."""
    def build(k, precisions):
        if k == key:
            return [impls.Impl(key, f"patched {key}", "baseline", make, impls._always)]
        return build_impls(k, precisions)
    monkeypatch.setattr("fused_pg.bench.runner.build_impls", build)


# --- argument handling ---------------------------------------------------------------------------

def test_model_presets_give_their_head_shapes():
    cfg = cli.config_from_args(["--device", "cpu", "--model", "qwen2.5-7b,llama3-8b", "--n", "4096,8192"])
    assert cfg.shapes == (Shape(4096, 3584, 152064), Shape(8192, 3584, 152064),
                          Shape(4096, 4096, 128256), Shape(8192, 4096, 128256))
    assert MODEL_PRESETS["qwen3-8b"] == (4096, 151936)


def test_explicit_shapes_and_loss_options():
    cfg = cli.config_from_args(["--device", "cpu", "--n", "2048,1024,2048", "--d", "64", "--v", "1000,3000",
                                "--repo", "none", "--kl", "0.04", "--entropy-coef", "0", "--dtype", "bf16",
                                "--impl", "naive,fused-torch,naive", "--repeats", "7", "--warmup", "2",
                                "--data", "flat", "--out", "somewhere"])
    assert cfg.shapes == (Shape(1024, 64, 1000), Shape(2048, 64, 1000), Shape(1024, 64, 3000), Shape(2048, 64, 3000))
    assert (cfg.loss.repo, cfg.loss.kl_coef, cfg.loss.entropy_coef) == ("none", 0.04, 0.0)
    assert (cfg.dtype, cfg.impls, cfg.repeats, cfg.warmup, cfg.out_dir, cfg.data) == (
        "bf16", ("naive", "fused-torch"), 7, 2, "somewhere", "flat")


def test_loss_options_are_fused_pgs_own():
    """The benchmark's loss is a fused_pg.LossConfig: one flag per field (its help is the field's
    doc), ``--preset`` as LossConfig.preset, validated by fused-pg (errors name the option); the
    oracle gets the same options by name."""
    import dataclasses

    from fused_pg.reference.loss import OPTION_DEFAULTS  # the oracle's loss options
    cfg = cli.config_from_args(["--device", "cpu", "--repo", "fixed", "--repo-coef", "0.3", "--kl", "0.1",
                                "--kl-estimator", "k1", "--repo-center", "state", "--max-length", "64"])
    assert cfg.loss == dataclasses.replace(DEFAULT_LOSS, repo="fixed", repo_coef=0.3, kl_coef=0.1, kl_estimator="k1",
                                           repo_center="state", max_length=64)
    assert cfg.as_dict()["loss"]["kl_estimator"] == "k1" and set(loss_options(cfg.loss)) == set(OPTION_DEFAULTS)
    help_text = " ".join(cli.build_parser().format_help().split())
    for field in dataclasses.fields(LossConfig):
        assert f"--{field.name.replace('_', '-')}" in help_text, field.name
    assert " ".join(dataclasses.fields(LossConfig)[0].metadata["doc"].split()) in help_text
    verl = cli.config_from_args(["--device", "cpu", "--preset", "verl", "--eps-high", "0.3"]).loss
    assert verl == LossConfig.preset("verl", eps_high=0.3, entropy_coef=DEFAULT_LOSS.entropy_coef)


@needs_no_cuda
def test_cpu_defaults_and_quick():
    cfg = cli.config_from_args([])
    assert (cfg.device, cfg.dtype, cfg.suite, cfg.impls) == ("cpu", "fp32", "cpu", ("fused-torch", "naive"))
    assert cfg.data == "realistic" and cfg.repeats >= 5
    assert os.path.join("results", "local") in cfg.out_dir
    quick = cli.config_from_args(["--quick"])
    assert quick.suite == "cpu-quick" and quick.quick and quick.repeats >= 5  # a stable median of >= 5
    assert sum(s.n for s in quick.shapes) < sum(s.n for s in cfg.shapes)


def test_impl_all_and_precision_all():
    cfg = cli.config_from_args(["--device", "cpu", "--impl", "all", "--precision", "all"])
    assert cfg.impls == IMPL_KEYS and cfg.precisions == PRECISIONS
    names = [impl.name for impl in build_impls("fused-torch", PRECISIONS)]
    assert names == ["fused-torch", "fused-torch@tf32", "fused-torch@ieee"]


@pytest.mark.parametrize("argv, message", [
    (["--model", "gpt-17"], "--model: unknown ['gpt-17']"),
    (["--model", "llama3-8b", "--d", "64"], "either --model or --d/--v"),
    (["--n", "0"], "--n must be positive, got [0]"),
    (["--d", "-64"], "--d must be positive, got -64"),
    (["--n", "1k"], "argument --n: invalid comma-separated int value: '1k'"),
    (["--n", ","], "--n must be positive, got []"),
    (["--impl", "fused-cuda"], "--impl: unknown ['fused-cuda']"),
    (["--precision", "fp8"], "--precision: unknown ['fp8']"),
    (["--dtype", "fp64"], "invalid choice: 'fp64'"),
    (["--data", "spiky"], "invalid choice: 'spiky'"),
    (["--target-entropy", "0"], "--target-entropy must be positive"),
    (["--v", "50000", "--target-entropy", "3"], "above what realistic data reaches at V=1531 (the accuracy check's"),
    (["--v", "1000", "--no-accuracy", "--target-entropy", "3"], "above what realistic data reaches at V=1000"),
    (["--max-minutes", "0"], "--max-minutes must be positive"),
    (["--kl", "-1"], "kl_coef must be >= 0.0, got -1.0"),
    (["--repo-coef", "2"], "repo_coef must be <= 1.0, got 2.0"),
    (["--eps-low", "1.5"], "eps_low must be < 1.0, got 1.5"),
    (["--kl-estimator", "k9"], "kl_estimator must be one of"),
    (["--repeats", "-3"], "--repeats must be positive"),
    (["--acceptance", "--stages", "env,bench"], "--stages: unknown ['bench']"),
])
def test_bad_arguments_give_clear_errors(argv, message, capsys):
    assert message in parse_error(["--device", "cpu", *argv], capsys)


@needs_no_cuda
def test_cuda_requested_without_gpu(capsys):
    assert "no CUDA GPU is visible" in parse_error(["--device", "cuda"], capsys)


def test_list_and_module_entry_point(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench", "--list"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("fused_pg.bench", run_name="__main__")
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "qwen2.5-7b" in out and "D=3584" in out and "V=152064" in out
    assert all(key in out for key in IMPL_KEYS)


def test_console_script_entry_point(capsys, monkeypatch):
    """``fused-pg-bench`` = ``bench.cli:console``: the same CLI, named after the script."""
    monkeypatch.setattr(sys, "argv", ["fused-pg-bench", "--list"])
    assert cli.console() == 0
    assert "qwen3-8b" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["fused-pg-bench", "--help"])
    with pytest.raises(SystemExit) as exc:
        cli.console()
    assert exc.value.code == 0
    help_text = capsys.readouterr().out
    assert help_text.startswith("usage: fused-pg-bench") and "fused-pg-bench --quick" in help_text


# --- n not a multiple of the sequence length -----------------------------------------------------

def test_layout_keeps_n_exact_and_says_how():
    assert problem.layout(4096, 1024) == (4, 1024)
    assert problem.layout(1500, 1024) == (2, 750)
    assert problem.layout(512, 1024) == (1, 512)
    assert problem.layout(1031, 1024) == (1031, 1)  # prime: exact N, one-token sequences
    assert problem.describe_layout(4096, 1024) is None
    assert problem.describe_layout(1500, 1024) == "N=1500: 2 sequences of 750 tokens (--seq-len 1024 does not divide 1500)"
    assert "1 sequence of 512 tokens" in problem.describe_layout(512, 1024)
    cfg = cli.config_from_args(["--device", "cpu", "--n", "1500", "--seq-len", "1024"])
    assert cfg.shapes[0].n == 1500


# --- realistic benchmark data ---------------------------------------------------------------------

@pytest.mark.parametrize("target", [0.3, 1.0, 2.0])
def test_realistic_data_has_the_target_mean_entropy(target):
    """Mean token entropy over valid tokens within +-20% of the target (RL policies: 0.3-2 nats)."""
    p = problem.make_problem(Shape(2048, 64, 4096), torch.float32, "cpu", DEFAULT_LOSS, seq_len=256,
                             target_entropy=target)
    assert p.data == "realistic"
    assert 0.8 * target <= p.mean_entropy <= 1.2 * target, p.mean_entropy
    # targets are sampled from the policy: their mean log-prob is close to minus the entropy
    assert abs(float(p.old_logprobs[p.mask].mean()) + target) < 0.5 * target + 0.1
    assert p.hidden.shape == (8, 256, 64) and p.hidden.requires_grad


def test_flat_data_keeps_several_nats():
    p = problem.make_problem(Shape(512, 64, 4096), torch.float32, "cpu", DEFAULT_LOSS, seq_len=256, data="flat")
    assert p.mean_entropy > 3.0  # about log V - 4.5 = 3.8 nats
    with pytest.raises(ValueError, match="more than this vocabulary reaches"):
        problem.make_problem(Shape(64, 16, 50), torch.float32, "cpu", DEFAULT_LOSS, seq_len=64, target_entropy=5.0)


# --- timing statistics and row flags --------------------------------------------------------------

def _floor(ms: float) -> dict:
    one = measure.stats([ms])
    return {"gemm_ms": {"logits": one, "grad_hidden": one, "grad_weight": one},
            "floor_ms": {"fwd": ms, "bwd": 3 * ms, "fwd_bwd": 4 * ms}}


def _row(samples: list[float], floor_ms: float = 10.0, rows: int | None = None) -> dict:
    impl = build_impls("naive", ("native",))[0]           # keeps its logits: 3 GEMMs
    row = runner.new_row(impl, Shape(128, 32, 1000), DEFAULT_LOSS, (), 1e-4)
    row["rows_swept"] = rows or row["n"]
    s = measure.stats(samples)
    runner.add_times(row, {"fwd": s, "bwd": s, "fwd_bwd": s}, _floor(floor_ms))
    return row


def test_spread_and_flags():
    assert measure.stats([10.0, 10.0, 10.0, 10.0, 50.0])["spread"] == 0.0  # one outlier: median holds
    assert measure.stats([10.0, 10.0, 10.0, 20.0, 30.0])["spread"] == pytest.approx(1.0)
    assert build_impls("naive", ("native",))[0].gemms == 3 and build_impls("fused-torch", ("native",))[0].gemms == 4
    assert _row([100.0, 101.0, 102.0, 100.0, 101.0])["flags"] == []
    assert _row([100.0, 100.0, 150.0, 200.0, 250.0])["flags"] == ["noisy"]
    case = _row([25.0, 25.0, 25.0])                      # own floor: 3 x 10 ms
    assert case["flags"] == ["below-floor"] and case["own_floor_ms"] == pytest.approx(30.0)
    assert case["floor_ratio"]["fwd_bwd"] == pytest.approx(25.0 / 40.0)
    assert "BELOW ITS OWN 3-GEMM FLOOR (30.0 ms)" in report.flag_notes(case)[0]
    assert _row([25.0, 25.0, 25.0], rows=64)["flags"] == []  # swept only half of the rows


def test_forward_and_backward_are_timed_in_the_same_iteration():
    calls = []
    times = measure.time_fwd_bwd(lambda: calls.append("fwd") or len(calls), lambda out: calls.append(f"bwd {out}"), 3)
    assert calls == ["fwd", "bwd 1", "fwd", "bwd 3", "fwd", "bwd 5"]
    for a, b, both in zip(times["fwd"]["samples"], times["bwd"]["samples"], times["fwd_bwd"]["samples"]):
        assert a >= 0 and b >= 0 and both == pytest.approx(a + b)


# --- the estimate and the refusal -----------------------------------------------------------------

def test_estimate_grows_with_the_shapes():
    rates = {(64, 16384): dict(gemm_flops=5e10, elementwise=1e9, latency=1e-4)}
    small = measure.estimate_run([Shape(1024, 64, 16384)], ["fused-torch"], rates, device_type="cpu",
                                 warmup=1, repeats=5)
    big = measure.estimate_run([Shape(4096, 64, 16384)], ["fused-torch", "naive"], rates, device_type="cpu",
                               warmup=1, repeats=5)
    assert 0 < small["seconds"] < big["seconds"] and big["per_shape"][0]["gemm_s"] == pytest.approx(2 * 4096 * 64 * 16384 / 5e10)


@needs_no_cuda
def test_hours_long_shapes_are_refused_with_an_estimate(tmp_path, capsys):
    """The README's GPU example on a CPU: refused in seconds, with the estimate and --yes named."""
    status = cli.main(["--model", "qwen3-8b", "--n", "16384", "--dtype", "bf16", "--impl", "fused-torch",
                       "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert status == cli.EXIT_USAGE
    assert "estimate: about" in out and (" min " in out or " h " in out)
    assert "refusing to start: estimated run time about" in err and "--yes" in err
    assert not os.path.exists(os.path.join(tmp_path, report.JSON_NAME))


@needs_no_cuda
def test_impl_that_cannot_run_here_exits_nonzero(tmp_path, capsys):
    status = cli.main(["--device", "cpu", *TINY, "--impl", "fused-triton,liger-triton", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert status == cli.EXIT_USAGE
    assert "skip fused-pg triton: needs a CUDA GPU" in captured.out
    assert "nothing to run on CPU" in captured.err
    assert not os.path.exists(os.path.join(tmp_path, report.JSON_NAME))


# --- end to end on the CPU, and the JSON schema ---------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny run of the CPU default implementations (shared by the tests below). N=96 does
    not split into 64-token sequences: it runs as 2 x 48."""
    out_dir = str(tmp_path_factory.mktemp("bench"))
    argv = ["--device", "cpu", *TINY[2:], "--n", "96,256", "--impl", "fused-torch,naive,reference,fused-triton",
            "--out", out_dir]
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert cli.main(argv) == 0
    with open(os.path.join(out_dir, report.JSON_NAME)) as f:
        data = json.load(f)
    return out_dir, buf.getvalue(), data


def test_tiny_cpu_run_writes_table_json_and_png(tiny_run):
    out_dir, stdout, data = tiny_run
    for name in (report.JSON_NAME, report.TABLE_NAME, report.PLOT_NAME):
        assert os.path.getsize(os.path.join(out_dir, name)) > 0, name
    with open(os.path.join(out_dir, report.PLOT_NAME), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # estimate, progress, tables, the data's entropy and the loss check are printed
    assert "estimate: about" in stdout and "(estimated " in stdout
    assert "[1/6]" in stdout and "[6/6]" in stdout
    assert "4-GEMM floor" in stdout and "Max error vs fp64 reference" in stdout
    assert "data: realistic logits (target mean entropy 1.0 nats); mean token entropy" in stdout
    assert "spread" in stdout
    assert "loss check: all 6 runs agree" in stdout
    assert "skipped fused-pg triton: needs a CUDA GPU" in stdout or torch.cuda.is_available()
    with open(os.path.join(out_dir, report.TABLE_NAME)) as f:
        assert re.search(r"\| fused-pg torch +\| +256 \| +32 \| +1000 \|", f.read())


def test_n_not_a_multiple_of_the_sequence_length_is_reported_truly(tiny_run):
    _, stdout, data = tiny_run
    assert "note: N=96: 2 sequences of 48 tokens (--seq-len 64 does not divide 96)" in stdout
    assert "64 tokens per sequence (N=96: 2 x 48)" in stdout
    batches = {b["n"]: (b["seqs"], b["seq_len"]) for b in data["batches"]}
    assert batches == {96: (2, 48), 256: (4, 64)}
    # every N is kept exactly; fused-pg's CPU sweeps (all its backends) compact to the tokens that count, the
    # materialising baselines sweep all N rows
    valid = {b["n"]: b["valid_tokens"] for b in data["batches"]}
    for r in data["results"]:
        want = valid[r["n"]] if r["impl"] in ("fused-torch", "reference") else r["n"]
        assert r["rows_swept"] == want, (r["impl"], r["n"], r["rows_swept"])


def test_json_schema_and_contents(tiny_run):
    _, _, data = tiny_run
    assert data["schema"] == report.SCHEMA and data["interrupted"] is False
    assert data["device"]["type"] == "cpu" and data["device"]["name"]
    assert data["versions"]["torch"] == torch.__version__ and "triton" in data["versions"] and "trl" in data["versions"]
    assert "commit" in data["git"] and data["created"][:2] == "20"
    assert data["timer"] == report.TIMER
    assert data["estimate"]["seconds"] > 0 and data["estimate"]["gemm_tflops"]
    assert {s["impl"] for s in data["skipped"]} == {"fused-triton"}
    assert [(f["n"], f["d"], f["v"]) for f in data["floors"]] == [(96, 32, 1000), (256, 32, 1000)]
    for b in data["batches"]:
        assert b["data"] == "realistic" and 0.5 < b["mean_entropy"] < 1.5
    assert len(data["results"]) == 6
    for r in data["results"]:
        assert r["status"] == "ok", r
        assert r["loss_ok"] is True
        assert len(r["fwd_bwd_ms"]["samples"]) == 2
        assert r["fwd_bwd_ms"]["min"] <= r["fwd_bwd_ms"]["median"] <= r["fwd_bwd_ms"]["max"]
        assert r["fwd_bwd_ms"]["spread"] >= 0 and set(r["flags"]) <= set(report.FLAGS)
        assert r["tflops"]["fwd_bwd"] > 0 and r["floor_ratio"]["fwd_bwd"] > 0 and r["own_floor_ms"] > 0
        assert r["peak_mem_bytes"] is None or r["peak_mem_bytes"] >= 0
    acc = {r["impl"]: r for r in data["accuracy"]["results"]}
    assert set(acc) == {"fused-torch", "naive", "reference"}
    for r in acc.values():  # fp32 inputs: errors of fp32 arithmetic
        assert r["status"] == "ok"
        assert r["logprobs_max_abs"] < 1e-4 and r["entropy_max_abs"] < 1e-4
        assert r["grad_hidden_max_rel"] < 1e-4 and r["grad_weight_max_rel"] < 1e-4
    assert data["loss_check"]["all_agree"] is True and data["loss_check"]["checked"] == 6


def test_plot_has_log_ticks_and_one_floor_line(tiny_run):
    _, _, data = tiny_run
    fig = report.make_figure(data)
    ax = fig.axes[0]                                    # time panel of the only (D, V)
    (floor_line,) = [ln for ln in ax.get_lines() if ln.get_label() == report.FLOOR_LABEL]
    assert list(floor_line.get_xdata()) == [96, 256]   # one point per N, measured once per shape
    assert list(floor_line.get_ydata()) == [f["floor_ms"]["fwd_bwd"] for f in data["floors"]]
    assert floor_line.get_marker() == "_"
    lo, hi = ax.get_ylim()
    majors = [t for t in ax.get_yticks() if lo <= t <= hi]
    minors = [t for t in ax.yaxis.get_minorticklocs() if lo <= t <= hi]
    assert all(abs(torch.log10(torch.tensor(t)).item() % 1) < 1e-9 for t in ax.get_yticks())  # decades
    assert minors and all(abs(torch.log10(torch.tensor(t)).item() % 1) > 1e-6 for t in minors)  # between
    labels = [t.get_text() for t in ax.get_yticklabels(minor=True) + ax.get_yticklabels() if t.get_text()]
    assert len(labels) >= 2, (majors, minors, labels)
    import matplotlib.pyplot as plt
    plt.close(fig)


def test_failures_are_recorded_not_raised(tmp_path, capsys, monkeypatch):
    """An implementation that raises is reported as an error with its message; the run goes on."""
    def broken(problem, spec):
        def step():
            raise RuntimeError("kernel exploded")
        return step
    replace_impl(monkeypatch, "naive", broken)
    stdout, data = run_main(["--device", "cpu", *TINY, "--impl", "fused-torch,naive", "--no-accuracy",
                             "--no-plot", "--out", str(tmp_path)], capsys)
    statuses = {r["label"]: (r["status"], r["reason"]) for r in data["results"]}
    assert statuses["patched naive"] == ("error", "RuntimeError: kernel exploded")
    assert statuses["fused-pg torch"][0] == "ok"
    assert "ERROR: RuntimeError: kernel exploded" in stdout


def test_ctrl_c_writes_the_rows_finished_so_far(tmp_path, capsys, monkeypatch):
    """A KeyboardInterrupt in the second shape: rows of the first are printed and written,
    the exit status is 130. The run was over --max-minutes, so --yes is what let it start."""
    def interrupted_at_256(problem, spec):
        step = impls._head_make(impls.naive_logprobs_entropy)(problem, spec)
        def wrapped():
            if problem.shape.n == 256:
                raise KeyboardInterrupt
            return step()
        return wrapped
    replace_impl(monkeypatch, "naive", interrupted_at_256)
    argv = ["--device", "cpu", *TINY, "--n", "128,256", "--impl", "fused-torch,naive", "--no-accuracy",
            "--max-minutes", "1e-6", "--yes", "--out", str(tmp_path)]
    stdout, data = run_main(argv, capsys, status=cli.EXIT_INTERRUPTED)
    assert data["interrupted"] is True
    assert [(r["impl"], r["n"]) for r in data["results"]] == [("fused-torch", 128), ("naive", 128),
                                                               ("fused-torch", 256)]
    assert "interrupted (Ctrl-C): reporting the rows finished so far" in stdout
    assert "INTERRUPTED (Ctrl-C)" in stdout and "wrote" in stdout
    with open(os.path.join(tmp_path, report.TABLE_NAME)) as f:
        assert "INTERRUPTED (Ctrl-C)" in f.read()
    assert os.path.exists(os.path.join(tmp_path, report.PLOT_NAME))


@needs_no_cuda
def test_max_minutes_refuses_without_yes(tmp_path, capsys):
    assert cli.main(["--device", "cpu", *TINY, "--impl", "fused-torch", "--max-minutes", "1e-6",
                     "--out", str(tmp_path)]) == cli.EXIT_USAGE
    assert "above --max-minutes 1e-06" in capsys.readouterr().err


# --- --tune ---------------------------------------------------------------------------------------

@needs_no_cuda
def test_tune_needs_a_gpu(capsys):
    assert cli.main(["--tune"]) == cli.EXIT_USAGE
    assert "--tune needs a CUDA GPU" in capsys.readouterr().err


def _fake_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("fused_pg.bench.cli.device_name", lambda device: "Fake GPU")


def test_tune_says_when_the_tuning_module_is_absent(capsys, monkeypatch):
    _fake_gpu(monkeypatch)
    monkeypatch.setitem(sys.modules, "fused_pg.kernels.tuning", None)  # import fails
    monkeypatch.delattr("fused_pg.kernels.tuning", raising=False)
    assert cli.main(["--tune"]) == cli.EXIT_FAILED
    assert "fused_pg.kernels.tuning.sweep) is not available in this install" in capsys.readouterr().err


def test_tune_calls_the_sweep_and_prints_table_rows(tmp_path, capsys, monkeypatch):
    _fake_gpu(monkeypatch)
    calls = []

    def sweep(kind, shape, dtype, device="cuda", *, verbose=True):
        calls.append((kind, shape, dtype, torch.device(device).type))
        return [types.SimpleNamespace(kind=kind, ms=1.0)]
    fake = types.SimpleNamespace(sweep=sweep, KINDS=("fwd", "dlogits"), format_row=lambda t: f"Row({t.kind!r})")
    monkeypatch.setitem(sys.modules, "fused_pg.kernels.tuning", fake)
    monkeypatch.delattr("fused_pg.kernels.tuning", raising=False)
    assert cli.main(["--tune", "--model", "llama3-8b", "--out", str(tmp_path)]) == cli.EXIT_OK
    assert calls == [("fwd", (16384, 4096, 128256), torch.bfloat16, "cuda"),
                     ("dlogits", (16384, 4096, 128256), torch.bfloat16, "cuda")]
    out = capsys.readouterr().out
    assert "Row('fwd')\nRow('dlogits')" in out
    with open(os.path.join(tmp_path, "tune.json")) as f:
        assert json.load(f)["rows"] == ["Row('fwd')", "Row('dlogits')"]


# --- peers and torch.compile ------------------------------------------------------------------------

def test_peers_run_or_are_skipped_with_reason(tmp_path, capsys):
    """Real adapters, no mocks: each peer runs (and matches fused-pg's loss) or says why not."""
    stdout, data = run_main(["--device", "cpu", *TINY, "--impl", "trl,liger-chunked,cce,liger-triton",
                             "--no-plot", "--out", str(tmp_path)], capsys)
    ran = {r["impl"]: r for r in data["results"]}
    skipped = {s["impl"]: s["reason"] for s in data["skipped"]}
    for key, module in (("trl", peers.TRL), ("liger-chunked", peers.LIGER), ("cce", peers.CCE)):
        reason = peers.missing(module)
        if reason:
            assert skipped[key] == reason and f"is not installed (pip install {peers.PIP_NAMES[module]})" in reason
            assert reason in stdout
        else:
            assert ran[key]["status"] == "ok" and ran[key]["loss_ok"] is True, ran[key]
    assert "no entropy" in ran.get("cce", {"notes": ["no entropy"]})["notes"]
    if "trl" in ran:  # TRL's head computes the entropy (and its gradient): the full loss
        assert ran["trl"]["notes"] == [] and ran["trl"]["computes"]["entropy_coef"] > 0
        (acc,) = [r for r in data["accuracy"]["results"] if r["impl"] == "trl"]
        assert acc["entropy_max_abs"] < 1e-4 and acc["grad_hidden_max_rel"] < 1e-4
    if not torch.cuda.is_available():
        assert "needs a CUDA GPU" in skipped["liger-triton"]


def test_torch_compile_baseline(tmp_path, capsys):
    """The compiled chunked baseline runs, agrees with fused-pg and with the fp64 reference.

    The benchmark shape equals the accuracy shape so that a single compilation serves both.
    """
    stdout, data = run_main(["--device", "cpu", "--n", "256", "--d", "128", "--v", "1531", "--seq-len", "64",
                             "--impl", "compiled", "--warmup", "1", "--repeats", "1", "--no-plot",
                             "--out", str(tmp_path)], capsys)
    (res,) = data["results"]
    if res["status"] != "ok":
        pytest.fail(f"torch.compile baseline failed: {res['reason']}")
    assert res["loss_ok"] is True and res["first_call_s"] > 0
    (acc,) = data["accuracy"]["results"]
    assert acc["grad_hidden_max_rel"] < 1e-4 and acc["entropy_max_abs"] < 1e-4


# --- verl's fused kernel as a peer ------------------------------------------------------------------

def test_verl_peer_adapter_with_a_stand_in_kernel(tmp_path, capsys, monkeypatch):
    """The adapter around verl's kernel (which runs only on CUDA), with a materialised torch head
    standing in for ``linear_cross_entropy``: called as verl's API is (flat hidden, flat labels,
    temperature, reduction), its entropy feeds the loss, and the row computes the full loss."""
    calls = []

    def stand_in(hidden, weight, labels, temperature, reduction):
        calls.append((tuple(hidden.shape), tuple(labels.shape), temperature, reduction))
        return impls.naive_logprobs_entropy(hidden, weight, labels)
    monkeypatch.setattr(peers, "verl_linear_cross_entropy", lambda: stand_in)
    monkeypatch.setattr(peers, "verl_check", lambda device, dtype: None)
    stdout, data = run_main(["--device", "cpu", *TINY, "--d", "128", "--impl", "fused-torch,verl", "--no-plot",
                             "--out", str(tmp_path)], capsys)
    rows = {r["impl"]: r for r in data["results"]}
    assert rows["verl"]["status"] == "ok" and rows["verl"]["loss_ok"] is True, rows["verl"]
    assert rows["verl"]["notes"] == [] and rows["verl"]["computes"]["entropy_coef"] > 0
    assert rows["verl"]["logprobs_max_abs"] < 1e-4 and rows["verl"]["entropy_max_abs"] < 1e-4
    (acc,) = [r for r in data["accuracy"]["results"] if r["impl"] == "verl"]
    assert acc["entropy_max_abs"] < 1e-4 and acc["grad_hidden_max_rel"] < 1e-4 and acc["grad_weight_max_rel"] < 1e-4
    assert {c[2:] for c in calls} == {(1.0, "none")} and ((128, 128), (128,)) in {c[:2] for c in calls}


def test_verl_peer_needs_cuda_and_a_hidden_size_multiple_of_128(tmp_path, capsys, monkeypatch):
    reason = peers.verl_check(torch.device("cpu"), torch.float32)
    assert reason == (peers.missing(peers.VERL) or "").replace("pip install verl", "pip install --no-deps verl") \
        or reason == peers.VERL_NO_CPU
    monkeypatch.setattr(peers, "verl_check", lambda device, dtype: None)
    _, data = run_main(["--device", "cpu", *TINY, "--impl", "verl", "--no-accuracy", "--no-plot",
                        "--out", str(tmp_path)], capsys)
    (row,) = data["results"]
    assert row["status"] == "error" and "multiple of 128, got D=32" in row["reason"]


def test_verl_kernel_loads_without_verls_dependencies():
    """Where verl's package does not import (here: tensordict blocked), its kernel modules load
    on their own, and nothing of verl's package __init__ runs."""
    pytest.importorskip("verl", reason="verl is not installed")
    code = ("import sys; sys.modules['tensordict'] = None\n"
            "from fused_pg.bench.peers import verl_linear_cross_entropy\n"
            "fn = verl_linear_cross_entropy()\n"
            "print(fn.__self__.__module__, 'verl.protocol' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["verl.utils.kernel.linear_cross_entropy", "False"]


# --- the acceptance run ---------------------------------------------------------------------------

def test_acceptance_run_end_to_end_on_cpu(tmp_path, capsys):
    """``--acceptance --device cpu``: every stage runs (tiny shapes), and each leaves its files."""
    out = str(tmp_path)
    status = cli.main(["--acceptance", "--device", "cpu", "--out", out,
                       "--impl", "fused-triton,fused-torch,naive,verl,liger-triton"])
    stdout = capsys.readouterr().out
    with open(os.path.join(out, "acceptance.json")) as f:
        stages = {s["stage"]: s for s in json.load(f)["stages"]}
    assert status == 0 and all(s["status"] == "ok" for s in stages.values()), stages
    assert list(stages) == list(acceptance.STAGES)
    with open(os.path.join(out, "env.json")) as f:
        env = json.load(f)
    assert env["versions"]["torch"] == torch.__version__ and env["device"]["type"] == "cpu"
    assert len(env["git"]["commit"] or "") == 40
    with open(os.path.join(out, "tests.log")) as f:
        assert "tests/test_cuda.py" in f.read()
    assert os.path.getsize(os.path.join(out, "pytest-junit.xml")) > 0
    with open(os.path.join(out, report.JSON_NAME)) as f:
        bench = json.load(f)
    assert bench["interrupted"] is False and {(r["impl"], r["v"]) for r in bench["results"]} == {
        (k, v) for k in ("fused-torch", "naive") for v in (1531, 1000)}
    assert all(r["status"] == "ok" and r["logprobs_max_abs"] < 1e-4 for r in bench["results"])
    skipped = {s["impl"]: s["reason"] for s in bench["skipped"]}
    assert set(skipped) == {"fused-triton", "verl", "liger-triton"} and all(skipped.values())
    with open(os.path.join(out, "profile.json")) as f:
        prof = json.load(f)
    assert prof["step_ms"] > 0 and prof["floor_ms"] > 0 and prof["kernels"]
    with open(os.path.join(out, "probes.json")) as f:
        probes = json.load(f)
    assert set(probes) == set(acceptance.PROBES) and all("needs CUDA" in p["skipped"] for p in probes.values())
    with open(os.path.join(out, "summary.md")) as f:
        summary = f.read()
    assert re.search(r"\| fused-pg torch +\| +256 \| +1531 \|", summary) and "skipped verl fused kernel" in summary
    assert summary.strip() in stdout


def test_a_stage_past_its_time_box_is_stopped_and_keeps_its_output(tmp_path):
    code = "import time; print('first row', flush=True); time.sleep(60)"
    rec = acceptance.run_stage("slow", [sys.executable, "-c", code], 2.0, str(tmp_path / "slow.log"))
    assert rec["status"] == "timeout" and rec["seconds"] < 2 + acceptance.GRACE_S
    assert "first row" in (tmp_path / "slow.log").read_text()
