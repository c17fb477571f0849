"""Command line of ``python -m bench`` (installed: ``fused-pg-bench``): arguments ->
:class:`~bench.config.BenchConfig` -> run -> tables, JSON and plot; ``--tune``; ``--acceptance``.
``--help`` lists the options and exit statuses; docs/benchmark.md says what a run does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from typing import Callable, Sequence

import torch

from fused_pg import LossConfig
from fused_pg.config import PRECISIONS, PRESETS

from .config import (CUDA_SUITE, DATA_KINDS, DEFAULT_LOSS, DEFAULT_TARGET_ENTROPY, DTYPES, MODEL_PRESETS,
                     BenchConfig, Shape, default_out_dir, default_suite, device_name, loss_options, pick_device)
from .impls import IMPL_HELP, IMPL_KEYS
from .problem import describe_layout, max_realistic_entropy

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
PROG, CONSOLE_PROG = "python -m bench", "fused-pg-bench"
TUNE_N = 16384  # tokens of a tuning sweep unless --n is given

EPILOG = """\
examples:
  python -m bench                          default suite for this machine
  python -m bench --quick                  shorter run (CPU: about a minute)
  python -m bench --model qwen2.5-7b,llama3-8b --n 4096,16384 --dtype bf16
  python -m bench --impl fused-torch,naive,compiled --repo none --kl-coef 0.04
  python -m bench --impl fused-triton --precision all     speed cost of native/tf32/ieee
  python -m bench --data flat              i.i.d. logits (several nats of entropy)
  python -m bench --tune                   sweep Triton kernel configs on this GPU
  python -m bench --acceptance             the GPU acceptance run (about 8 minutes), results/<device>/acceptance/
  python -m bench --list                   model presets and implementations

results go to results/local/<device>/ (bench.json, table.md, bench.png) unless --out is given.
A run estimated longer than --max-minutes is refused unless --yes is given.
exit status: 0 done, 1 failed, 2 bad arguments / nothing can run here / refused, 130 Ctrl-C.
"""


def _csv(convert: Callable[[str], object]) -> Callable[[str], list]:
    """A comma-separated list of ``convert``'s values (``--n 4096,16384``)."""
    def parse(text: str) -> list:
        return [convert(t) for t in text.split(",") if t.strip()]
    parse.__name__ = f"comma-separated {'str' if convert is str.lower else convert.__name__}"  # argparse's errors
    return parse


def _add_loss_options(group) -> None:
    """``--preset`` and one option per field of :class:`fused_pg.LossConfig` (its doc as help);
    an option not given keeps the benchmark's loss (:data:`bench.config.DEFAULT_LOSS`)."""
    group.add_argument("--preset", choices=tuple(PRESETS), help="a trainer's defaults (LossConfig.preset), the "
                       "options given here on top")
    hints = typing.get_type_hints(LossConfig)
    for f in dataclasses.fields(LossConfig):
        kind = next(t for t in (typing.get_args(hints[f.name]) or (hints[f.name],)) if t is not type(None))
        flags = [f"--{f.name.replace('_', '-')}"] + (["--kl"] if f.name == "kl_coef" else [])
        extra = {"action": argparse.BooleanOptionalAction} if kind is bool else {"type": kind}
        group.add_argument(*flags, dest=f.name, default=argparse.SUPPRESS, **extra,
                           help=f"{f.metadata['doc']} (default {getattr(DEFAULT_LOSS, f.name)})".replace("%", "%%"))


def _loss(args: argparse.Namespace) -> LossConfig:
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(LossConfig) if hasattr(args, f.name)}
    if args.preset is None:
        return dataclasses.replace(DEFAULT_LOSS, **given)
    ours = {k: v for k, v in loss_options(DEFAULT_LOSS).items() if v != getattr(LossConfig(), k)}
    return LossConfig.preset(args.preset, **{**ours, **given})


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    from .acceptance import STAGES
    p = argparse.ArgumentParser(
        prog=prog, description="Benchmark fused-pg against materialised PyTorch, torch.compile and peer "
        "libraries: time, peak memory, GEMM-floor ratio, accuracy.",
        epilog=EPILOG.replace(PROG, prog), formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to run")
    g.add_argument("--quick", action="store_true", help="shorter default suite")
    g.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    g.add_argument("--impl", type=_csv(str), metavar="LIST",
                   help=f"comma-separated from {', '.join(IMPL_KEYS)}; 'all'; 'default' (the suite's)")
    g.add_argument("--precision", type=_csv(str), metavar="LIST", help="dot-product precisions of the fused-pg "
                   "implementations: native,tf32,ieee or all (default native)")
    g.add_argument("--tune", action="store_true", help="instead of benchmarking, sweep the Triton kernels' tile "
                   "configs on this CUDA GPU and print config-table rows (shapes from --model/--d/--v, N from "
                   f"--n, default {TUNE_N})")
    a = p.add_argument_group("GPU acceptance run (docs/benchmark.md)")
    a.add_argument("--acceptance", action="store_true", help="environment, tests/test_cuda.py, the acceptance "
                   "table, a per-kernel profile and the sync / CUDA-graph / torch.compile probes, each stage "
                   "time-boxed, into results/<device>/acceptance/ (about 8 minutes; --device cpu: tiny shapes)")
    a.add_argument("--budget-s", type=float, metavar="S", help="time for all stages (default 450)")
    a.add_argument("--stages", type=_csv(str), metavar="LIST", help=f"run only these of {', '.join(STAGES)}")
    s = p.add_argument_group("shapes and data")
    s.add_argument("--model", type=_csv(str.lower), metavar="LIST",
                   help="LM-head shapes of real models (D, V), e.g. qwen2.5-7b,llama3-8b; see --list")
    s.add_argument("--n", type=_csv(int), metavar="LIST", help="token counts N")
    s.add_argument("--d", type=int, help="hidden size D")
    s.add_argument("--v", type=_csv(int), metavar="LIST", help="vocabulary sizes V")
    s.add_argument("--dtype", choices=tuple(DTYPES), help="input dtype (default: fp32 on CPU, bf16 on CUDA)")
    s.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (default 1024); an N it does "
                   "not divide is split into equal shorter sequences, and the report says so")
    s.add_argument("--data", choices=DATA_KINDS, default="realistic",
                   help="realistic: logits with an RL policy's token entropy (default); flat: i.i.d. logits")
    s.add_argument("--target-entropy", type=float, default=DEFAULT_TARGET_ENTROPY, metavar="NATS",
                   help=f"mean token entropy of realistic data (default {DEFAULT_TARGET_ENTROPY:g}; RL policies "
                        "have about 0.3-2)")
    _add_loss_options(p.add_argument_group("loss (fused_pg.LossConfig; default: REPO decorrelate, entropy bonus "
                                           f"{DEFAULT_LOSS.entropy_coef:g})"))
    t = p.add_argument_group("measurement and output")
    t.add_argument("--repeats", type=int, help="timed repeats (default: CPU 5, CUDA 10)")
    t.add_argument("--warmup", type=int, help="warm-up iterations, >= 1 (default: CPU 1, CUDA 3)")
    t.add_argument("--max-minutes", type=float, default=15.0, metavar="M",
                   help="refuse a run estimated longer than this (default 15)")
    t.add_argument("--yes", action="store_true", help="run even when the estimate exceeds --max-minutes or memory")
    t.add_argument("--out", metavar="DIR", help="output folder (default results/local/<device>/)")
    t.add_argument("--no-plot", action="store_true", help="skip the PNG")
    t.add_argument("--no-accuracy", action="store_true", help="skip the max-error check vs fp64")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--list", action="store_true", help="print model presets and implementations, then exit")
    return p


def _check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What argparse cannot say by itself: list members, positive numbers."""
    from .acceptance import STAGES
    for flag, values, allowed in (("--model", args.model, MODEL_PRESETS), ("--stages", args.stages, STAGES),
                                  ("--impl", args.impl, (*IMPL_KEYS, "all", "default")),
                                  ("--precision", args.precision, (*PRECISIONS, "all"))):
        if values is not None and (not values or set(values) - set(allowed)):
            p.error(f"{flag}: unknown {sorted(set(values) - set(allowed)) or 'empty list'}; choose from "
                    f"{', '.join(allowed)}")
    for flag in ("n", "v", "d", "seq_len", "repeats", "warmup", "max_minutes", "target_entropy", "budget_s"):
        value = getattr(args, flag)
        if value is not None and (value == [] or min(value if isinstance(value, list) else [value]) <= 0):
            p.error(f"--{flag.replace('_', '-')} must be positive, got {value}")


def _shapes(args: argparse.Namespace, dv: Sequence[tuple[int, int]], ns: Sequence[int],
            p: argparse.ArgumentParser) -> tuple[Shape, ...]:
    if args.model and (args.d or args.v):
        p.error("give either --model or --d/--v, not both")
    if args.model:
        pairs = [MODEL_PRESETS[m] for m in args.model]
    elif args.d or args.v:
        pairs = [(args.d or dv[0][0], v) for v in (args.v or [dv[0][1]])]
    else:
        pairs = list(dv)
    return tuple(Shape(n, d, v) for d, v in dict.fromkeys(pairs) for n in sorted(set(args.n or ns)))


def _impls(args: argparse.Namespace, suite_impls: Sequence[str]) -> tuple[str, ...]:
    keys = [k for item in (args.impl or ["default"])
            for k in (IMPL_KEYS if item == "all" else suite_impls if item == "default" else [item])]
    return tuple(dict.fromkeys(keys))


def _config(args: argparse.Namespace, p: argparse.ArgumentParser, argv: Sequence[str] | None) -> BenchConfig:
    try:
        device = pick_device(args.device)
        loss = _loss(args)
    except ValueError as exc:
        p.error(str(exc))
    suite = default_suite(device.type, args.quick)
    shapes = _shapes(args, suite.dv, suite.ns, p)
    if args.data == "realistic":
        from .runner import ACCURACY_SHAPE
        v = min({s.v for s in shapes} | ({ACCURACY_SHAPE.v} if not args.no_accuracy else set()))
        if args.target_entropy > max_realistic_entropy(v):
            where = " (the accuracy check's; --no-accuracy skips it)" if v == ACCURACY_SHAPE.v else ""
            p.error(f"--target-entropy {args.target_entropy:g} nats is above what realistic data reaches at "
                    f"V={v}{where}: at most {max_realistic_entropy(v):.2f}")
    precisions = PRECISIONS if "all" in (args.precision or ()) else tuple(dict.fromkeys(args.precision or ["native"]))
    return BenchConfig(
        device=device.type, dtype=args.dtype or suite.dtype, shapes=shapes, impls=_impls(args, suite.impls),
        precisions=precisions, loss=loss, warmup=args.warmup or suite.warmup, repeats=args.repeats or suite.repeats,
        seq_len=args.seq_len, out_dir=args.out or default_out_dir(device), suite=suite.name, quick=args.quick,
        plot=not args.no_plot, accuracy=not args.no_accuracy, seed=args.seed, data=args.data,
        target_entropy=args.target_entropy, max_minutes=args.max_minutes, yes=args.yes,
        argv=tuple(argv if argv is not None else sys.argv[1:]))


def config_from_args(argv: Sequence[str] | None = None, prog: str = PROG) -> BenchConfig | None:
    """Parse ``argv``; None for ``--list`` (already printed). Exits with status 2 on bad input."""
    p = build_parser(prog)
    args = p.parse_args(argv)
    _check(p, args)
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
    if est["available_bytes"] is not None and est["memory_bytes"] > est["available_bytes"]:
        reasons.append(f"its inputs and GEMM floor need about {est['memory_bytes'] / 2**30:.1f} GiB, "
                       f"{est['available_bytes'] / 2**30:.1f} GiB available")
    return ("refusing to start: " + "; ".join(reasons) + ". Choose smaller shapes (--n, --model, --d/--v), or "
            "pass --yes to run anyway.") if reasons else None


def run_benchmark(cfg: BenchConfig) -> int:
    from . import report, runner
    console = report.make_console()
    device = pick_device(cfg.device)
    for note in filter(None, (describe_layout(s.n, cfg.seq_len) for s in cfg.shapes)):
        console.print(f"note: {note}")
    impls, skipped = runner.resolve_impls(cfg, device)
    for s in skipped:
        console.print(f"skip {s['label']}: {s['reason']}")
    if not impls:
        _err(f"nothing to run on {device_name(device)}: none of the implementations asked for "
             f"({', '.join(cfg.impls)}) can run here (reasons above)")
        return EXIT_USAGE
    est = runner.estimate(cfg, device, impls)
    console.print(f"estimate: about {report.fmt_seconds(est['seconds'])} for {len(cfg.shapes)} shape(s) x "
                  f"{len(impls)} implementation(s)")
    why = refusal(cfg, est)
    if why and not cfg.yes:
        _err(why)
        return EXIT_USAGE
    os.makedirs(cfg.out_dir, exist_ok=True)

    def write(result: dict) -> list[str]:  # after every row: a run that dies keeps what finished
        return [report.write_json(result, cfg.out_dir), report.write_table(result, cfg.out_dir)]
    result = runner.run(cfg, console, impls=impls, skipped=skipped, est=est, on_row=write)
    print("\n" + report.render(result))
    paths = write(result) + ([report.write_plot(result, cfg.out_dir)] if cfg.plot else [])
    print("wrote " + ", ".join(_shown(p) for p in paths if p))
    return EXIT_INTERRUPTED if result["interrupted"] else EXIT_OK


def tune(args: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    """``fused_pg.kernels.tuning.sweep(kind, (N, D, V), dtype, device)`` for every kind at every
    shape on this GPU; prints the fastest config of each as a row of the kernels' config table."""
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
    dtype_key, device = args.dtype or "bf16", torch.device("cuda")
    rows, timings = [], []
    for shape in _shapes(args, CUDA_SUITE.dv, (TUNE_N,), p):
        for kind in getattr(tuning, "KINDS", ("fwd", "dlogits", "matmul")):
            print(f"== {kind} N={shape.n} D={shape.d} V={shape.v} {dtype_key}", flush=True)
            found = list(sweep(kind, (shape.n, shape.d, shape.v), DTYPES[dtype_key], device))
            timings += found
            rows.append(str(getattr(tuning, "format_row", repr)(found[0])) if found else
                        f"# {kind} N={shape.n} D={shape.d} V={shape.v}: no config ran")
    print("\nfastest config per kernel and shape (rows of the kernels' config table):\n" + "\n".join(rows))
    out_dir = args.out or default_out_dir(device)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "tune.json")
    with open(path, "w") as f:
        json.dump({"device": device_name(device), "dtype": dtype_key, "rows": rows,
                   "timings": [dataclasses.asdict(t) if dataclasses.is_dataclass(t) else repr(t) for t in timings]},
                  f, indent=1, default=str)
    print(f"wrote {_shown(path)}")
    return EXIT_OK


def acceptance(args: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    from . import acceptance as acc
    try:
        device = pick_device(args.device)
    except ValueError as exc:
        p.error(str(exc))
    impls = _impls(args, acc.IMPLS) if args.impl else None
    return acc.main(device.type, args.out, impls, args.budget_s or acc.BUDGET_S, tuple(args.stages or acc.STAGES))


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """``python -m bench``; returns the exit status (see the module docstring)."""
    p = build_parser(prog)
    args = p.parse_args(argv)
    _check(p, args)
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
