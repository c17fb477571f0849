"""Tests of the benchmark CLI (``python -m bench``): arguments, JSON schema, tiny CPU runs.

Benchmarks are not timed tests: nothing here asserts a speed. The runs use tiny shapes;
the whole file takes well under a minute on 2 cores (the torch.compile test is the
largest part: one compile of one small graph).
"""

from __future__ import annotations

import copy
import json
import os
import runpy
import sys

import pytest
import torch

# bench/ is not installed: it runs from the repository root (`python -m bench`)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from bench import cli, peers, report  # noqa: E402
from bench.config import MODEL_PRESETS, PRECISIONS, Shape  # noqa: E402
from bench.impls import IMPL_KEYS, build_impls  # noqa: E402

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU defaults and CPU skip reasons")

# tiny problem: 2 sequences of 64 tokens, odd V (exercises the tails of the vocabulary tiles)
TINY = ["--n", "128", "--d", "32", "--v", "1000", "--seq-len", "64", "--warmup", "1", "--repeats", "2"]


def parse_error(argv: list[str], capsys) -> str:
    """Run the parser on bad arguments; return its error message (it must exit with 2)."""
    with pytest.raises(SystemExit) as exc:
        cli.config_from_args(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def run_main(argv: list[str], capsys) -> tuple[str, dict]:
    """``python -m bench argv`` in this process; returns (stdout, the JSON it wrote)."""
    out_dir = argv[argv.index("--out") + 1]
    assert cli.main(argv) == 0
    stdout = capsys.readouterr().out
    with open(os.path.join(out_dir, report.JSON_NAME)) as f:
        return stdout, json.load(f)


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
                                "--out", "somewhere"])
    assert cfg.shapes == (Shape(1024, 64, 1000), Shape(2048, 64, 1000), Shape(1024, 64, 3000), Shape(2048, 64, 3000))
    assert (cfg.loss.repo, cfg.loss.kl_coef, cfg.loss.entropy_coef) == ("none", 0.04, 0.0)
    assert (cfg.dtype, cfg.impls, cfg.repeats, cfg.warmup, cfg.out_dir) == (
        "bf16", ("naive", "fused-torch"), 7, 2, "somewhere")


@needs_no_cuda
def test_cpu_defaults_and_quick():
    cfg = cli.config_from_args([])
    assert (cfg.device, cfg.dtype, cfg.suite, cfg.impls) == ("cpu", "fp32", "cpu", ("fused-torch", "naive"))
    assert os.path.join("results", "local") in cfg.out_dir
    quick = cli.config_from_args(["--quick"])
    assert quick.suite == "cpu-quick" and quick.quick
    assert sum(s.n for s in quick.shapes) < sum(s.n for s in cfg.shapes)


def test_impl_all_and_precision_all():
    cfg = cli.config_from_args(["--device", "cpu", "--impl", "all", "--precision", "all"])
    assert cfg.impls == IMPL_KEYS and cfg.precisions == PRECISIONS
    names = [impl.name for impl in build_impls("fused-torch", PRECISIONS)]
    assert names == ["fused-torch", "fused-torch@tf32", "fused-torch@ieee"]


@pytest.mark.parametrize("argv, message", [
    (["--model", "gpt-17"], "unknown model preset 'gpt-17'"),
    (["--model", "llama3-8b", "--d", "64"], "either --model or --d/--v"),
    (["--n", "0"], "expected a positive integer, got '0'"),
    (["--n", "1k"], "expected a positive integer, got '1k'"),
    (["--n", ","], "expected a comma-separated list of token counts"),
    (["--n", "1500", "--seq-len", "1024"], "N=1500 is not a multiple of the sequence length 1024"),
    (["--impl", "fused-cuda"], "unknown implementation 'fused-cuda'"),
    (["--precision", "fp8"], "unknown precision 'fp8'"),
    (["--dtype", "fp64"], "invalid choice: 'fp64'"),
    (["--kl", "-1"], "expected a finite number >= 0"),
    (["--repo-coef", "2"], "--repo-coef must be in [0, 1] for --repo decorrelate"),
    (["--eps-low", "1.5"], "--eps-low must be < 1"),
    (["--repeats", "-3"], "expected a positive integer"),
])
def test_bad_arguments_give_clear_errors(argv, message, capsys):
    assert message in parse_error(["--device", "cpu", *argv], capsys)


@needs_no_cuda
def test_cuda_requested_without_gpu(capsys):
    assert "no CUDA GPU is visible" in parse_error(["--device", "cuda"], capsys)


def test_list_and_module_entry_point(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench", "--list"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("bench", run_name="__main__")
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "qwen2.5-7b" in out and "D=3584" in out and "V=152064" in out
    assert all(key in out for key in IMPL_KEYS)


# --- end to end on the CPU, and the JSON schema ---------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny run of the CPU default implementations (shared by the tests below)."""
    out_dir = str(tmp_path_factory.mktemp("bench"))
    argv = ["--device", "cpu", *TINY[2:], "--n", "128,256", "--impl", "fused-torch,naive,reference,fused-triton",
            "--out", out_dir]
    import io
    from contextlib import redirect_stdout
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
    # progress, tables and the loss check are printed
    assert "[1/6]" in stdout and "[6/6]" in stdout
    assert "4-GEMM floor" in stdout and "Max error vs fp64 reference" in stdout
    assert "loss check: all 6 runs agree" in stdout
    assert "skipped fused-pg triton: needs a CUDA GPU" in stdout or torch.cuda.is_available()
    with open(os.path.join(out_dir, report.TABLE_NAME)) as f:
        assert "| fused-pg torch | 128 | 32 | 1000 |" in f.read()


def test_json_schema_and_contents(tiny_run):
    _, _, data = tiny_run
    report.validate(data)
    assert data["schema"] == report.SCHEMA
    assert data["device"]["type"] == "cpu" and data["device"]["name"]
    assert data["versions"]["torch"] == torch.__version__ and "triton" in data["versions"]
    assert "commit" in data["git"] and data["created"][:2] == "20"
    assert data["timer"] == "time.perf_counter"
    assert {s["impl"] for s in data["skipped"]} == {"fused-triton"}
    assert [(f["n"], f["d"], f["v"]) for f in data["floors"]] == [(128, 32, 1000), (256, 32, 1000)]
    assert len(data["results"]) == 6
    for r in data["results"]:
        assert r["status"] == "ok", r
        assert r["loss_ok"] is True
        assert len(r["fwd_bwd_ms"]["samples"]) == 2
        assert r["fwd_bwd_ms"]["min"] <= r["fwd_bwd_ms"]["median"] <= r["fwd_bwd_ms"]["max"]
        assert r["tflops"]["fwd_bwd"] > 0 and r["floor_ratio"]["fwd_bwd"] > 0
        assert r["peak_mem_bytes"] is None or r["peak_mem_bytes"] >= 0
    acc = {r["impl"]: r for r in data["accuracy"]["results"]}
    assert set(acc) == {"fused-torch", "naive", "reference"}
    for r in acc.values():  # fp32 inputs: errors of fp32 arithmetic
        assert r["status"] == "ok"
        assert r["logprobs_max_abs"] < 1e-4 and r["entropy_max_abs"] < 1e-4
        assert r["grad_hidden_max_rel"] < 1e-4 and r["grad_weight_max_rel"] < 1e-4
    assert data["loss_check"]["all_agree"] is True and data["loss_check"]["checked"] == 6


def test_schema_violations_are_named(tiny_run):
    _, _, data = tiny_run
    broken = copy.deepcopy(data)
    del broken["floors"]
    with pytest.raises(ValueError, match="missing top-level key 'floors'"):
        report.validate(broken)
    broken = copy.deepcopy(data)
    broken["results"][0]["status"] = "fast"
    with pytest.raises(ValueError, match=r"results\[0\].status"):
        report.validate(broken)
    broken = copy.deepcopy(data)
    broken["results"][1].update(status="error", reason=None)
    with pytest.raises(ValueError, match="no reason"):
        report.validate(broken)


def test_failures_are_recorded_not_raised(tmp_path, capsys, monkeypatch):
    """An implementation that raises is reported as an error with its message; the run goes on."""
    from bench import impls

    def broken(problem, spec):
        def step():
            raise RuntimeError("kernel exploded")
        return step
    def build(key, precisions):
        if key == "naive":
            return [impls.Impl("naive", "broken impl", "baseline", broken, impls._always)]
        return impls.build_impls(key, precisions)
    monkeypatch.setattr("bench.runner.build_impls", build)
    stdout, data = run_main(["--device", "cpu", *TINY, "--impl", "fused-torch,naive", "--no-accuracy",
                             "--no-plot", "--out", str(tmp_path)], capsys)
    statuses = {r["label"]: (r["status"], r["reason"]) for r in data["results"]}
    assert statuses["broken impl"] == ("error", "RuntimeError: kernel exploded")
    assert statuses["fused-pg torch"][0] == "ok"
    assert "ERROR: RuntimeError: kernel exploded" in stdout


# --- peers and torch.compile ------------------------------------------------------------------------

def test_peers_run_or_are_skipped_with_reason(tmp_path, capsys):
    """Real adapters, no mocks: each peer runs (and matches fused-pg's loss) or says why not."""
    stdout, data = run_main(["--device", "cpu", *TINY, "--impl", "liger-chunked,cce,liger-triton",
                             "--no-plot", "--out", str(tmp_path)], capsys)
    ran = {r["impl"]: r for r in data["results"]}
    skipped = {s["impl"]: s["reason"] for s in data["skipped"]}
    for key, module in (("liger-chunked", peers.LIGER), ("cce", peers.CCE)):
        reason = peers.missing(module)
        if reason:
            assert skipped[key] == reason and f"is not installed (pip install {peers.PIP_NAMES[module]})" in reason
            assert reason in stdout
        else:
            assert ran[key]["status"] == "ok" and ran[key]["loss_ok"] is True, ran[key]
    assert "no entropy" in ran.get("cce", {"notes": ["no entropy"]})["notes"]
    if not torch.cuda.is_available():
        assert "needs a CUDA GPU" in skipped["liger-triton"]


def test_torch_compile_baseline(tmp_path, capsys):
    """The compiled chunked baseline runs, agrees with fused-pg and with the fp64 reference.

    The benchmark shape equals the accuracy shape so that a single compilation serves both.
    """
    stdout, data = run_main(["--device", "cpu", "--n", "256", "--d", "64", "--v", "1531", "--seq-len", "64",
                             "--impl", "compiled", "--warmup", "1", "--repeats", "1", "--no-plot",
                             "--out", str(tmp_path)], capsys)
    (res,) = data["results"]
    if res["status"] != "ok":
        pytest.fail(f"torch.compile baseline failed: {res['reason']}")
    assert res["loss_ok"] is True and res["first_call_s"] > 0
    (acc,) = data["accuracy"]["results"]
    assert acc["grad_hidden_max_rel"] < 1e-4 and acc["entropy_max_abs"] < 1e-4
