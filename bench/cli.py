"""Command line of ``python -m bench`` (installed: ``fused-pg-bench``): arguments ->
:class:`~bench.config.BenchConfig` -> checks -> run -> tables, JSON and plot; and ``--tune``.

Without arguments it runs the default suite of the machine: on CPU a ~1-minute comparison
of fused-pg's torch backend with naive materialised PyTorch; on CUDA the GPU suite (bf16,
D=4096, V=151936 and 128256, N=4096..32768, every implementation that can run).

Before running, it drops the implementations that cannot run here (saying why; none left
is an error), and estimates the run time from one small GEMM on this device: a run estimated
above ``--max-minutes`` (or above the memory available) is refused unless ``--yes`` is given.
Ctrl-C stops a run cleanly: the rows finished so far are printed and written.

``--tune`` is a thin layer over the kernels' tuning sweep (``fused_pg.kernels.tuning.sweep``):
it times candidate Triton configs on the local CUDA GPU and prints the rows of the kernels'
config table. Exit status: 0 done; 1 a run or sweep failed (e.g. the tuning module is
absent); 2 bad arguments, nothing can run here, or the estimate was refused; 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import sys
from typing import Callable, Sequence

import torch

from .config import (CUDA_SUITE, DATA_KINDS, DEFAULT_TARGET_ENTROPY, DTYPES, MODEL_PRESETS, PRECISIONS,
                     REPO_MODES, BenchConfig, LossSpec, Shape, default_out_dir, default_suite, device_name,
                     pick_device)
from .impls import IMPL_HELP, IMPL_KEYS
from .problem import describe_layout, max_realistic_entropy

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
PROG = "python -m bench"
CONSOLE_PROG = "fused-pg-bench"
TUNE_N = 16384  # tokens of a tuning sweep unless --n is given

EPILOG = """\
examples:
  python -m bench                          default suite for this machine
  python -m bench --quick                  shorter run (CPU: about a minute)
  python -m bench --model qwen2.5-7b,llama3-8b --n 4096,16384 --dtype bf16
  python -m bench --impl fused-torch,naive,compiled --repo none --kl 0.04
  python -m bench --impl fused-triton --precision all     speed cost of native/tf32/ieee
  python -m bench --data flat              i.i.d. logits (several nats of entropy)
  python -m bench --tune                   sweep Triton kernel configs on this GPU
  python -m bench --acceptance             the GPU acceptance run (about 8 minutes), results/<device>/acceptance/
  python -m bench --list                   model presets and implementations

results go to results/local/<device>/ (bench.json, table.md, bench.png) unless --out is given.
A run estimated longer than --max-minutes is refused unless --yes is given.
exit status: 0 done, 1 failed, 2 bad arguments / nothing can run here / refused, 130 Ctrl-C.
"""


def _list_of(kind: Callable[[str], object], what: str) -> Callable[[str], list]:
    def parse(text: str) -> list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, got {text!r}")
        return [kind(t) for t in items]
    return parse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _model(text: str) -> str:
    key = text.lower()
    if key not in MODEL_PRESETS:
        raise argparse.ArgumentTypeError(f"unknown model preset {text!r}; choose from {', '.join(MODEL_PRESETS)}")
    return key


def _impl(text: str) -> str:
    if text not in (*IMPL_KEYS, "all", "default"):
        raise argparse.ArgumentTypeError(f"unknown implementation {text!r}; choose from "
                                         f"{', '.join(IMPL_KEYS)}, all, default")
    return text


def _precision(text: str) -> str:
    if text not in (*PRECISIONS, "all"):
        raise argparse.ArgumentTypeError(f"unknown precision {text!r}; choose from {', '.join(PRECISIONS)}, all")
    return text


def _stage(text: str) -> str:
    from .acceptance import STAGES
    if text not in STAGES:
        raise argparse.ArgumentTypeError(f"unknown stage {text!r}; choose from {', '.join(STAGES)}")
    return text


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Benchmark fused-pg against materialised PyTorch, "
        "torch.compile and peer libraries: time, peak memory, GEMM-floor ratio, accuracy.",
        epilog=EPILOG.replace(PROG, prog), formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to run")
    g.add_argument("--quick", action="store_true", help="shorter default suite")
    g.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    g.add_argument("--impl", type=_list_of(_impl, "implementations"), metavar="LIST",
                   help=f"comma-separated from {', '.join(IMPL_KEYS)}; 'all'; 'default' (the suite's)")
    g.add_argument("--precision", type=_list_of(_precision, "precisions"), metavar="LIST",
                   help="dot-product precisions of the fused-pg implementations: native,tf32,ieee or all "
                        "(default native)")
    g.add_argument("--tune", action="store_true",
                   help="instead of benchmarking, sweep the Triton kernels' tile configs on this CUDA GPU "
                        f"and print config-table rows (shapes from --model/--d/--v, N from --n, default {TUNE_N})")
    a = p.add_argument_group("GPU acceptance run (bench/acceptance.py)")
    a.add_argument("--acceptance", action="store_true",
                   help="environment, tests/test_cuda.py, the acceptance table, a per-kernel profile and the "
                        "sync / CUDA-graph / torch.compile probes, each stage time-boxed, into "
                        "results/<device>/acceptance/ (about 8 minutes on an H100; --device cpu: tiny shapes)")
    a.add_argument("--budget-s", type=_positive_float, metavar="S", help="time for all stages (default 450)")
    a.add_argument("--stages", type=_list_of(_stage, "stages"), metavar="LIST",
                   help="run only these stages (env, tests, table, profile, probes)")
    s = p.add_argument_group("shapes and data")
    s.add_argument("--model", type=_list_of(_model, "model presets"), metavar="LIST",
                   help="LM-head shapes of real models (D, V), e.g. qwen2.5-7b,llama3-8b; see --list")
    s.add_argument("--n", type=_list_of(_positive_int, "token counts"), metavar="LIST", help="token counts N")
    s.add_argument("--d", type=_positive_int, help="hidden size D")
    s.add_argument("--v", type=_list_of(_positive_int, "vocabulary sizes"), metavar="LIST", help="vocabulary sizes V")
    s.add_argument("--dtype", choices=tuple(DTYPES), help="input dtype (default: fp32 on CPU, bf16 on CUDA)")
    s.add_argument("--seq-len", type=_positive_int, default=1024,
                   help="tokens per sequence (default 1024); an N it does not divide is split into equal "
                        "shorter sequences, and the report says so")
    s.add_argument("--data", choices=DATA_KINDS, default="realistic",
                   help="realistic: logits with an RL policy's token entropy (default); flat: i.i.d. logits")
    s.add_argument("--target-entropy", type=_positive_float, default=DEFAULT_TARGET_ENTROPY, metavar="NATS",
                   help=f"mean token entropy of realistic data (default {DEFAULT_TARGET_ENTROPY:g}; "
                        "RL policies have about 0.3-2)")
    l = p.add_argument_group("loss")
    l.add_argument("--repo", choices=REPO_MODES, default="decorrelate", help="REPO variant (default decorrelate)")
    l.add_argument("--repo-coef", type=_non_negative_float, default=1.0, help="zeta / gamma (default 1)")
    l.add_argument("--kl", type=_non_negative_float, default=0.0, metavar="COEF",
                   help="k3 KL coefficient; 0 = no KL term (default)")
    l.add_argument("--entropy-coef", type=_non_negative_float, default=1e-3,
                   help="entropy bonus; > 0 puts the entropy gradient in the work (default 1e-3)")
    l.add_argument("--eps-low", type=_non_negative_float, default=0.2)
    l.add_argument("--eps-high", type=_non_negative_float, default=0.28)
    t = p.add_argument_group("measurement and output")
    t.add_argument("--repeats", type=_positive_int, help="timed iterations (default: CPU 5, CUDA 10)")
    t.add_argument("--warmup", type=_positive_int, help="warm-up iterations, >= 1 (default: CPU 1, CUDA 3)")
    t.add_argument("--max-minutes", type=_positive_float, default=15.0, metavar="M",
                   help="refuse a run estimated longer than this (default 15)")
    t.add_argument("--yes", action="store_true", help="run even when the estimate exceeds --max-minutes or memory")
    t.add_argument("--out", metavar="DIR", help="output folder (default results/local/<device>/)")
    t.add_argument("--no-plot", action="store_true", help="skip the PNG")
    t.add_argument("--no-accuracy", action="store_true", help="skip the max-error check vs fp64")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--list", action="store_true", help="print model presets and implementations, then exit")
    return p


def _shapes(args: argparse.Namespace, dv: Sequence[tuple[int, int]], ns: Sequence[int],
            p: argparse.ArgumentParser) -> tuple[Shape, ...]:
    if args.model and (args.d or args.v):
        p.error("give either --model or --d/--v, not both")
    if args.model:
        pairs = [MODEL_PRESETS[m] for m in args.model]
    elif args.d or args.v:
        d = args.d or dv[0][0]
        pairs = [(d, v) for v in (args.v or [dv[0][1]])]
    else:
        pairs = list(dv)
    ns = args.n or list(ns)
    return tuple(Shape(n, d, v) for d, v in dict.fromkeys(pairs) for n in sorted(set(ns)))


def _impls(args: argparse.Namespace, suite) -> tuple[str, ...]:
    if not args.impl:
        return suite.impls
    keys: list[str] = []
    for item in args.impl:
        keys += IMPL_KEYS if item == "all" else suite.impls if item == "default" else [item]
    return tuple(dict.fromkeys(keys))


def _config(args: argparse.Namespace, p: argparse.ArgumentParser, argv: Sequence[str] | None) -> BenchConfig:
    try:
        device = pick_device(args.device)
    except ValueError as exc:
        p.error(str(exc))
    suite = default_suite(device.type, args.quick)
    if args.eps_low >= 1:
        p.error(f"--eps-low must be < 1, got {args.eps_low}")
    if args.repo == "decorrelate" and args.repo_coef > 1:
        p.error(f"--repo-coef must be in [0, 1] for --repo decorrelate, got {args.repo_coef}")
    shapes = _shapes(args, suite.dv, suite.ns, p)
    if args.data == "realistic":
        from .runner import ACCURACY_SHAPE
        vs = {s.v for s in shapes} | ({ACCURACY_SHAPE.v} if not args.no_accuracy else set())
        v = min(vs)
        if args.target_entropy > max_realistic_entropy(v):
            where = " (the accuracy check's; --no-accuracy skips it)" if v == ACCURACY_SHAPE.v else ""
            p.error(f"--target-entropy {args.target_entropy:g} nats is above what realistic data reaches at "
                    f"V={v}{where}: at most {max_realistic_entropy(v):.2f}")
    precisions = PRECISIONS if args.precision and "all" in args.precision else tuple(args.precision or ("native",))
    loss = LossSpec(repo=args.repo, repo_coef=args.repo_coef, kl_coef=args.kl, entropy_coef=args.entropy_coef,
                    eps_low=args.eps_low, eps_high=args.eps_high)
    return BenchConfig(
        device=device.type, dtype=args.dtype or suite.dtype, shapes=shapes,
        impls=_impls(args, suite), precisions=tuple(dict.fromkeys(precisions)), loss=loss,
        warmup=args.warmup or suite.warmup, repeats=args.repeats or suite.repeats, seq_len=args.seq_len,
        out_dir=args.out or default_out_dir(device), suite=suite.name, quick=args.quick, plot=not args.no_plot,
        accuracy=not args.no_accuracy, seed=args.seed, data=args.data, target_entropy=args.target_entropy,
        max_minutes=args.max_minutes, yes=args.yes, argv=tuple(argv if argv is not None else sys.argv[1:]))


def config_from_args(argv: Sequence[str] | None = None, prog: str = PROG) -> BenchConfig | None:
    """Parse ``argv``; None for ``--list`` (already printed). Exits with status 2 on bad input."""
    p = build_parser(prog)
    args = p.parse_args(argv)
    if args.list:
        print_list()
        return None
    return _config(args, p, argv)


def print_list() -> None:
    print("model presets (D, V):")
    for name, (d, v) in MODEL_PRESETS.items():
        print(f"  {name:<14} D={d:<5} V={v}")
    print("implementations (--impl):")
    for key, text in IMPL_HELP.items():
        print(f"  {key:<14} {text}")


def _shown(path: str) -> str:
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- the benchmark -----------------------------------------------------------------------------------

def refusal(cfg: BenchConfig, est: dict) -> str | None:
    """Why this run should not start without ``--yes`` (None when it may)."""
    from .report import fmt_seconds
    reasons = []
    if est["seconds"] > 60 * cfg.max_minutes:
        worst = max(est["per_shape"], key=lambda s: s["gemm_s"])
        tflops = est["gemm_tflops"][f"{worst['d']}x{worst['v']}"]
        reasons.append(
            f"estimated run time about {fmt_seconds(est['seconds'])}, above --max-minutes {cfg.max_minutes:g} "
            f"(one N={worst['n']} D={worst['d']} V={worst['v']} {cfg.dtype} GEMM takes about "
            f"{fmt_seconds(worst['gemm_s'])} here at the {tflops:.3g} TFLOP/s measured; a run does dozens)")
    avail = est["available_bytes"]
    if avail is not None and est["memory_bytes"] > avail:
        reasons.append(f"its inputs and GEMM floor need about {est['memory_bytes'] / 2**30:.1f} GiB, "
                       f"{avail / 2**30:.1f} GiB available")
    if not reasons:
        return None
    return ("refusing to start: " + "; ".join(reasons) +
            ". Choose smaller shapes (--n, --model, --d/--v), or pass --yes to run anyway.")


def run_benchmark(cfg: BenchConfig) -> int:
    from . import report, runner

    device = pick_device(cfg.device)
    for shape in cfg.shapes:
        note = describe_layout(shape.n, cfg.seq_len)
        if note:
            print(f"note: {note}")
    impls, skipped = runner.resolve_impls(cfg, device)
    for s in skipped:
        print(f"skip {s['label']}: {s['reason']}", flush=True)
    if not impls:
        _err(f"nothing to run on {device_name(device)}: none of the implementations asked for "
             f"({', '.join(cfg.impls)}) can run here (reasons above)")
        return EXIT_USAGE
    est = runner.estimate(cfg, device, impls)
    print(f"estimate: about {report.fmt_seconds(est['seconds'])} for {len(cfg.shapes)} shape(s) x "
          f"{len(impls)} implementation(s)", flush=True)
    why = refusal(cfg, est)
    if why and not cfg.yes:
        _err(why)
        return EXIT_USAGE
    os.makedirs(cfg.out_dir, exist_ok=True)

    def write(result: dict) -> list[str]:  # after every row: a run that dies keeps what finished
        return [report.write_json(result, cfg.out_dir), report.write_table(result, cfg.out_dir)]
    result = runner.run(cfg, impls=impls, skipped=skipped, est=est, on_row=write)
    print()
    print(report.render(result))
    paths = write(result)
    if cfg.plot:
        png = report.write_plot(result, cfg.out_dir)
        if png:
            paths.append(png)
    print("wrote " + ", ".join(_shown(p) for p in paths))
    return EXIT_INTERRUPTED if result["interrupted"] else EXIT_OK


# --- --tune -----------------------------------------------------------------------------------------

def tune(args: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    """Sweep the Triton kernels' configs on this GPU: ``sweep(kind, (N, D, V), dtype, device)``
    for every kind of ``fused_pg.kernels.tuning`` at every shape; print the best as table rows."""
    if args.device == "cpu" or not torch.cuda.is_available():
        _err("--tune needs a CUDA GPU: it times Triton kernel configs on the local GPU, and "
             "torch.cuda.is_available() is False here")
        return EXIT_USAGE
    try:
        from fused_pg.kernels import tuning
        sweep = tuning.sweep
    except Exception as exc:  # noqa: BLE001 -- absent module or function: say so, do not crash
        _err(f"--tune: the kernels' tuning sweep (fused_pg.kernels.tuning.sweep) is not available in this "
             f"install ({type(exc).__name__}: {exc})")
        return EXIT_FAILED
    kinds = tuple(getattr(tuning, "KINDS", ("fwd", "dlogits", "matmul")))
    format_row = getattr(tuning, "format_row", repr)
    dtype_key = args.dtype or "bf16"
    shapes = _shapes(args, CUDA_SUITE.dv, (TUNE_N,), p)
    try:
        inspect.signature(sweep).bind(kinds[0], (1, 1, 1), DTYPES[dtype_key], "cuda")
    except TypeError as exc:
        _err(f"--tune: fused_pg.kernels.tuning.sweep does not take (kind, (N, D, V), dtype, device): {exc}")
        return EXIT_FAILED
    device = torch.device("cuda")
    rows, timings = [], []
    for shape in shapes:
        for kind in kinds:
            print(f"== {kind} N={shape.n} D={shape.d} V={shape.v} {dtype_key}", flush=True)
            found = list(sweep(kind, (shape.n, shape.d, shape.v), DTYPES[dtype_key], device))
            timings += found
            if found:
                rows.append(format_row(found[0]))
            else:
                rows.append(f"# {kind} N={shape.n} D={shape.d} V={shape.v}: no config ran")
    print("\nfastest config per kernel and shape (rows of the kernels' config table):")
    print("\n".join(str(r) for r in rows))
    out_dir = args.out or default_out_dir(device)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "tune.json")
    with open(path, "w") as f:
        json.dump({"device": device_name(device), "dtype": dtype_key, "rows": [str(r) for r in rows],
                   "timings": [dataclasses.asdict(t) if dataclasses.is_dataclass(t) else repr(t) for t in timings]},
                  f, indent=1, default=str)
        f.write("\n")
    print(f"wrote {_shown(path)}")
    return EXIT_OK


def acceptance(args: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    from . import acceptance as acc
    try:
        device = pick_device(args.device)
    except ValueError as exc:
        p.error(str(exc))
    impls = _impls(args, default_suite(device.type, False)) if args.impl else None
    return acc.main(device.type, args.out, impls, args.budget_s or acc.BUDGET_S, tuple(args.stages or acc.STAGES))


# --- entry points ------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """``python -m bench``; returns the exit status (see the module docstring)."""
    p = build_parser(prog)
    args = p.parse_args(argv)
    try:
        if args.list:
            print_list()
            return EXIT_OK
        if args.tune:
            return tune(args, p)
        if args.acceptance:
            return acceptance(args, p)
        return run_benchmark(_config(args, p, argv))
    except KeyboardInterrupt:
        _err("\ninterrupted (Ctrl-C) before any row finished: nothing written")
        return EXIT_INTERRUPTED


def console() -> int:
    """The ``fused-pg-bench`` console script."""
    return main(prog=CONSOLE_PROG)

