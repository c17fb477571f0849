"""Command line of ``python -m bench``: arguments -> :class:`~bench.config.BenchConfig` -> run.

Without arguments it runs the default suite of the machine: on CPU a ~1-minute comparison
of fused-pg's torch backend with naive materialised PyTorch; on CUDA the GPU suite (bf16,
D=4096, V=151936 and 128256, N=4096..32768, every implementation that can run).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from . import env
from .config import (DTYPES, MODEL_PRESETS, PRECISIONS, REPO_MODES, BenchConfig, LossSpec, Shape,
                     default_suite)
from .impls import IMPL_HELP, IMPL_KEYS
from .problem import split_tokens

EPILOG = """\
examples:
  python -m bench                          default suite for this machine
  python -m bench --quick                  shorter run (CPU: well under 2 minutes)
  python -m bench --model qwen2.5-7b,llama3-8b --n 4096,16384 --dtype bf16
  python -m bench --impl fused-torch,naive,compiled --repo none --kl 0.04
  python -m bench --impl fused-triton --precision all     speed cost of native/tf32/ieee
  python -m bench --list                   model presets and implementations

results go to results/local/<device>/ (bench.json, table.md, bench.png) unless --out is given.
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench", description="Benchmark fused-pg against materialised PyTorch, "
        "torch.compile and peer libraries: time, peak memory, GEMM-floor ratio, accuracy.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to run")
    g.add_argument("--quick", action="store_true", help="shorter default suite")
    g.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    g.add_argument("--impl", type=_list_of(_impl, "implementations"), metavar="LIST",
                   help=f"comma-separated from {', '.join(IMPL_KEYS)}; 'all'; 'default' (the suite's)")
    g.add_argument("--precision", type=_list_of(_precision, "precisions"), metavar="LIST",
                   help="dot-product precisions of the fused-pg implementations: native,tf32,ieee or all "
                        "(default native)")
    s = p.add_argument_group("shapes")
    s.add_argument("--model", type=_list_of(_model, "model presets"), metavar="LIST",
                   help="LM-head shapes of real models (D, V), e.g. qwen2.5-7b,llama3-8b; see --list")
    s.add_argument("--n", type=_list_of(_positive_int, "token counts"), metavar="LIST", help="token counts N")
    s.add_argument("--d", type=_positive_int, help="hidden size D")
    s.add_argument("--v", type=_list_of(_positive_int, "vocabulary sizes"), metavar="LIST", help="vocabulary sizes V")
    s.add_argument("--dtype", choices=tuple(DTYPES), help="input dtype (default: fp32 on CPU, bf16 on CUDA)")
    s.add_argument("--seq-len", type=_positive_int, default=1024,
                   help="tokens per sequence; N must be a multiple (default 1024)")
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
    t.add_argument("--repeats", type=_positive_int, help="timed iterations (default: CPU 3, CUDA 10)")
    t.add_argument("--warmup", type=_positive_int, help="warm-up iterations, >= 1 (default: CPU 1, CUDA 3)")
    t.add_argument("--out", metavar="DIR", help="output folder (default results/local/<device>/)")
    t.add_argument("--no-plot", action="store_true", help="skip the PNG")
    t.add_argument("--no-accuracy", action="store_true", help="skip the max-error check vs fp64")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--list", action="store_true", help="print model presets and implementations, then exit")
    return p


def _shapes(args: argparse.Namespace, suite, p: argparse.ArgumentParser) -> tuple[Shape, ...]:
    if args.model and (args.d or args.v):
        p.error("give either --model or --d/--v, not both")
    if args.model:
        pairs = [MODEL_PRESETS[m] for m in args.model]
    elif args.d or args.v:
        d = args.d or suite.dv[0][0]
        pairs = [(d, v) for v in (args.v or [suite.dv[0][1]])]
    else:
        pairs = list(suite.dv)
    ns = args.n or list(suite.ns)
    shapes = tuple(Shape(n, d, v) for d, v in dict.fromkeys(pairs) for n in sorted(set(ns)))
    for shape in shapes:
        try:
            split_tokens(shape.n, args.seq_len)
        except ValueError as exc:
            p.error(str(exc))
    return shapes


def _impls(args: argparse.Namespace, suite) -> tuple[str, ...]:
    if not args.impl:
        return suite.impls
    keys: list[str] = []
    for item in args.impl:
        keys += IMPL_KEYS if item == "all" else suite.impls if item == "default" else [item]
    return tuple(dict.fromkeys(keys))


def config_from_args(argv: Sequence[str] | None = None) -> BenchConfig | None:
    """Parse ``argv``; None for ``--list`` (already printed). Exits with status 2 on bad input."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.list:
        print_list()
        return None
    try:
        device = env.pick_device(args.device)
    except ValueError as exc:
        p.error(str(exc))
    suite = default_suite(device.type, args.quick)
    if args.eps_low >= 1:
        p.error(f"--eps-low must be < 1, got {args.eps_low}")
    if args.repo == "decorrelate" and args.repo_coef > 1:
        p.error(f"--repo-coef must be in [0, 1] for --repo decorrelate, got {args.repo_coef}")
    precisions = PRECISIONS if args.precision and "all" in args.precision else tuple(args.precision or ("native",))
    loss = LossSpec(repo=args.repo, repo_coef=args.repo_coef, kl_coef=args.kl, entropy_coef=args.entropy_coef,
                    eps_low=args.eps_low, eps_high=args.eps_high)
    dtype = args.dtype or suite.dtype
    out = args.out or os.path.join(env.REPO_ROOT, "results", "local", env.slug(env.device_name(device)))
    return BenchConfig(
        device=device.type, dtype=dtype, shapes=_shapes(args, suite, p), impls=_impls(args, suite),
        precisions=tuple(dict.fromkeys(precisions)), loss=loss,
        warmup=args.warmup or suite.warmup, repeats=args.repeats or suite.repeats, seq_len=args.seq_len,
        out_dir=out, suite=suite.name, quick=args.quick, plot=not args.no_plot,
        accuracy=not args.no_accuracy, seed=args.seed, argv=tuple(argv if argv is not None else sys.argv[1:]))


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


def main(argv: Sequence[str] | None = None) -> int:
    cfg = config_from_args(argv)
    if cfg is None:
        return 0
    from . import plot, report, runner

    os.makedirs(cfg.out_dir, exist_ok=True)
    result = runner.run(cfg)
    print()
    print(report.render(result))
    paths = [report.write_json(result, cfg.out_dir), report.write_table(result, cfg.out_dir)]
    if cfg.plot:
        png = plot.write_plot(result, cfg.out_dir)
        if png:
            paths.append(png)
    print("wrote " + ", ".join(_shown(p) for p in paths))
    return 0
