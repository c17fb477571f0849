"""What a run leaves behind: the terminal and markdown tables (``rich``), the JSON file, the PNG
plot, and the provenance they record (device, versions, date, git commit).

The JSON (``schema: fused-pg-bench/1``) is the report as :func:`bench.runner.run` returns it:
``created``, ``wall_s``, ``interrupted`` (stopped early: the rows so far), ``device``, ``versions``,
``git {commit, dirty}``, ``config`` (the run, its ``loss`` as fused-pg's option names), ``timer``,
``memory_method``, ``estimate``, ``skipped [{impl, label, reason}]``, ``accuracy {shape, dtype,
mean_entropy, results}``, ``batches [{n, d, v, seqs, seq_len, valid_tokens, data, mean_entropy,
oracle_rows}]``, ``floors [{n, d, v, gemm_ms, floor_ms {fwd, bwd, fwd_bwd}, tflops}]``, ``results``
(one row per implementation and shape: :func:`bench.runner.new_row`) and ``loss_check``. Times are
milliseconds (``{median, min, max, spread, samples}``), memory bytes, throughput TFLOP/s of the
4-GEMM model, entropies nats.

The plot: one row of two panels per (D, V): forward+backward time against N on log-log axes with
the 4-GEMM floor as a dashed black line (a marker at every N), and peak memory on a linear axis
from 0. matplotlib is imported only when a plot is written.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import platform
import subprocess
import sys

import torch
from rich import box
from rich.console import Console
from rich.table import Table

from fused_pg import LossConfig

from . import peers
from .config import REPO_ROOT, describe_loss, device_name, slug
from .measure import NOISY_SPREAD

SCHEMA = "fused-pg-bench/1"
TIMER = "torch.utils.benchmark.timer (synchronises the device)"
JSON_NAME, TABLE_NAME, PLOT_NAME = "bench.json", "table.md", "bench.png"
FLAGS = ("noisy", "below-floor")


def make_console() -> Console:
    """The console of progress and tables: plain text (no markup), lines kept whole in logs."""
    console = Console(highlight=False, markup=False, soft_wrap=True)
    if not console.is_terminal:
        console.width = 250
    return console


# --- provenance ------------------------------------------------------------------------------------

def device_info(device: torch.device) -> dict:
    name = device_name(device)
    info = {"type": device.type, "name": name, "slug": slug(name), "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(total_memory_bytes=props.total_memory, capability=f"{props.major}.{props.minor}",
                    cuda=torch.version.cuda, sms=props.multi_processor_count)
    return info


def versions() -> dict:
    import fused_pg
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 -- absent or broken
        triton_version = None
    return {"python": sys.version.split()[0], "torch": torch.__version__, "triton": triton_version,
            "fused_pg": fused_pg.__version__, **{m: peers.version(m) for m in peers.PIP_NAMES},
            "platform": platform.platform()}


def git_commit() -> dict:
    """``{"commit": sha or None, "dirty": bool or None}`` of the checkout the bench lives in."""
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", REPO_ROOT, *args], capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip() if REPO_ROOT else None
        except (OSError, subprocess.SubprocessError):
            return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# --- formatting --------------------------------------------------------------------------------------

def fmt_bytes(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def fmt_ms(stats: dict | None, spread: bool = False) -> str:
    if stats is None:
        return "-"
    text = f"{stats['median']:.1f}" if stats["median"] >= 10 else f"{stats['median']:.2f}"
    return text + (f" [{stats['min']:.1f}-{stats['max']:.1f}]" if spread else "")


def fmt_seconds(s: float) -> str:
    return (f"{s:.1f} s" if s < 10 else f"{s:.0f} s" if s < 90 else f"{s / 60:.0f} min" if s < 5400
            else f"{s / 3600:.1f} h")


def fmt_err(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1e}"


def format_table(headers: list[str], rows: list[list[str]], markdown: bool = False) -> str:
    """Column-aligned text (or a GitHub markdown table): the first column left, the rest right."""
    table = Table(box=box.MARKDOWN if markdown else box.SIMPLE_HEAD, show_edge=markdown, pad_edge=markdown)
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i == 0 else "right", no_wrap=True)
    for r in rows:
        table.add_row(*r)
    out = io.StringIO()
    Console(file=out, width=100_000, highlight=False, markup=False).print(table)
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines() if line.strip())


RESULT_HEADERS = ["implementation", "N", "D", "V", "fwd ms", "bwd ms", "fwd+bwd ms [min-max]", "spread",
                  "peak mem", "TFLOP/s", "time / floor", "loss check", "logp err", "notes"]
ACCURACY_HEADERS = ["implementation", "loss abs err", "logp max abs err", "entropy max abs err",
                    "dh max rel err", "dW max rel err", "notes"]


def flag_notes(row: dict) -> list[str]:
    """Human-readable text of a result's flags."""
    out = []
    if "noisy" in row["flags"]:
        out.append(f"NOISY: spread {row['fwd_bwd_ms']['spread']:.1%} > {NOISY_SPREAD:.0%}, median uncertain")
    if "below-floor" in row["flags"]:
        out.append(f"BELOW ITS OWN {row['gemms']}-GEMM FLOOR ({row['own_floor_ms']:.1f} ms): "
                   "timing suspect or work skipped")
    return out


def result_rows(report: dict) -> list[list[str]]:
    rows = []
    batches = {(b["n"], b["d"], b["v"]): b for b in report["batches"]}
    for floor in report["floors"]:
        key = (floor["n"], floor["d"], floor["v"])
        ms, b = floor["floor_ms"], batches.get(key)
        where = "same device and dtype" + (f"; {b['seqs']} x {b['seq_len']} tokens" if b else "")
        rows.append(["4-GEMM floor (matmul)", *map(str, key), f"{ms['fwd']:.1f}", f"{ms['bwd']:.1f}",
                     f"{ms['fwd_bwd']:.1f}", "-", "-", f"{floor['tflops']:.3g}", "1.00", "-", "-", where])
        for c in (c for c in report["results"] if (c["n"], c["d"], c["v"]) == key):
            notes = c["notes"] + (["grads computed in fwd"] if c["grads_in_forward"] else [])
            if c["status"] != "ok":
                rows.append([c["label"], *map(str, key), "-", "-", c["status"].upper(), *["-"] * 6,
                             "; ".join(notes + [c["reason"] or ""]).strip("; ")])
                continue
            check = "ok" if c["loss_ok"] else f"MISMATCH ({c['loss']:.6g} vs {c['anchor_loss']:.6g})"
            tflops = c["tflops"]["fwd_bwd"]
            rows.append([c["label"], *map(str, key), fmt_ms(c["fwd_ms"]), fmt_ms(c["bwd_ms"]),
                         fmt_ms(c["fwd_bwd_ms"], True), f"{c['fwd_bwd_ms']['spread']:.0%}",
                         fmt_bytes(c["peak_mem_bytes"]), "-" if tflops is None else f"{tflops:.3g}",
                         f"{c['floor_ratio']['fwd_bwd']:.2f}" if c["floor_ratio"] else "-", check,
                         fmt_err(c["logprobs_max_abs"]), "; ".join(flag_notes(c) + notes)])
    return rows


def accuracy_rows(report: dict) -> list[list[str]]:
    keys = ("loss_abs", "logprobs_max_abs", "entropy_max_abs", "grad_hidden_max_rel", "grad_weight_max_rel")
    return [[r["label"], *(["ERROR", "-", "-", "-", "-", r["reason"] or ""] if r["status"] != "ok"
                           else [*(fmt_err(r[k]) for k in keys), "; ".join(r["notes"])])]
            for r in report["accuracy"]["results"]]


def data_line(report: dict) -> str:
    """The benchmark data and its measured mean token entropy."""
    cfg, ents = report["config"], [b["mean_entropy"] for b in report["batches"]]
    kind = (f"realistic logits (target mean entropy {cfg['target_entropy']:.1f} nats)" if cfg["data"] == "realistic"
            else "flat logits (i.i.d., std 3; uniform targets)")
    if not ents:
        return f"data: {kind}"
    lo, hi = f"{min(ents):.2f}", f"{max(ents):.2f}"
    return f"data: {kind}; mean token entropy {lo if lo == hi else f'{lo}-{hi}'} nats over valid tokens"


def render(report: dict, markdown: bool = False) -> str:
    """The whole human-readable report: header, accuracy table, results table, loss check."""
    cfg, v = report["config"], report["versions"]
    title = f"fused-pg benchmark on {report['device']['name']}"
    lines = [f"## {title}" if markdown else title, ""]
    if report["interrupted"]:
        lines += ["INTERRUPTED (Ctrl-C): the tables hold the rows finished before it.", ""]
    odd = [f"N={b['n']}: {b['seqs']} x {b['seq_len']}" for b in report["batches"] if b["seq_len"] != cfg["seq_len"]]
    lines += [f"{report['created']}  torch {v['torch']}  triton {v['triton']}  git "
              f"{str(report['git']['commit'])[:10]}{' (dirty)' if report['git']['dirty'] else ''}",
              f"dtype {cfg['dtype']}, {cfg['warmup']} warm-up + {cfg['repeats']} timed repeats, "
              f"timer {report['timer']}",
              f"loss: {describe_loss(LossConfig(**cfg['loss']))}; {cfg['seq_len']} tokens per sequence"
              + (f" ({', '.join(odd)})" if odd else ""),
              data_line(report), f"peak memory: {report['memory_method']}",
              *(f"skipped {s['label']}: {s['reason']}" for s in report["skipped"]), ""]
    if report["accuracy"] is not None:
        a = report["accuracy"]
        lines += [f"Max error vs fp64 reference (N={a['shape']['n']} D={a['shape']['d']} V={a['shape']['v']}, "
                  f"{a['dtype']} inputs, mean entropy {a['mean_entropy']:.2f} nats):", "",
                  format_table(ACCURACY_HEADERS, accuracy_rows(report), markdown), ""]
    oracle_rows = "/".join(map(str, sorted({b["oracle_rows"] for b in report["batches"]}))) or "no"
    lines += ["Times (median after warm-up, spread = inter-quartile range / median), peak memory above the inputs, "
              "TFLOP/s of the 4-GEMM model (8*N*D*V flops), ratio to the 4-GEMM floor, logp err = max |logp - fp64 "
              f"oracle| over {oracle_rows} valid tokens of the batch:", "",
              format_table(RESULT_HEADERS, result_rows(report), markdown), ""]
    lc = report["loss_check"]
    tols = ", ".join(f"{t:g}" for t in sorted({c["loss_tol"] for c in report["results"]})) or "-"
    if lc["checked"] == 0:
        lines.append("loss check: nothing checked")
    elif lc["all_agree"]:
        lines.append(f"loss check: all {lc['checked']} runs agree with the {lc['reference']} "
                     f"(max |diff| {lc['max_abs_diff']:.1e}, tolerance {tols} x max(1, |loss|))")
    else:
        lines.append(f"loss check: {len(lc['mismatches'])} of {lc['checked']} runs DISAGREE with the "
                     f"{lc['reference']}: " + ", ".join(f"{m['impl']} N={m['n']}" for m in lc["mismatches"]))
    est = report["estimate"]
    lines.append(f"wall time {report['wall_s']:.0f} s"
                 + (f" (estimated {fmt_seconds(est['seconds'])} before the run)" if est else ""))
    return "\n".join(lines)


def write_json(report: dict, out_dir: str) -> str:
    path = os.path.join(out_dir, JSON_NAME)
    with open(path, "w") as f:
        json.dump({"schema": SCHEMA, **report}, f, indent=1)
        f.write("\n")
    return path


def write_table(report: dict, out_dir: str) -> str:
    path = os.path.join(out_dir, TABLE_NAME)
    with open(path, "w") as f:
        f.write(render(report, markdown=True) + "\n")
    return path


# --- the plot ------------------------------------------------------------------------------------------

FLOOR_LABEL = "4-GEMM floor"


def make_figure(report: dict):
    """The matplotlib figure of the report (None when nothing ran)."""
    pairs = sorted({(f["d"], f["v"]) for f in report["floors"]})
    ok = [r for r in report["results"] if r["status"] == "ok"]
    if not pairs or not ok:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, LogFormatter, LogLocator, NullLocator, ScalarFormatter

    peaks = [r["peak_mem_bytes"] for r in ok if r["peak_mem_bytes"]]
    unit, scale = ("GiB", 2**30) if peaks and max(peaks) >= 2**30 else ("MiB", 2**20)
    fig, axes = plt.subplots(len(pairs), 2, figsize=(12, 4.4 * len(pairs)), squeeze=False)
    for (ax_t, ax_m), (d, v) in zip(axes, pairs):
        floor = sorted((f["n"], f["floor_ms"]["fwd_bwd"]) for f in report["floors"] if (f["d"], f["v"]) == (d, v))
        ns = [n for n, _ in floor]
        ax_t.plot(ns, [t for _, t in floor], "k--", marker="_", markersize=18, markeredgewidth=2, label=FLOOR_LABEL,
                  zorder=3)
        for label in dict.fromkeys(r["label"] for r in ok if (r["d"], r["v"]) == (d, v)):
            pts = sorted((r["n"], r["fwd_bwd_ms"]["median"], r["peak_mem_bytes"]) for r in ok
                         if (r["label"], r["d"], r["v"]) == (label, d, v))
            line, = ax_t.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
            mem = [(n, b / scale) for n, _, b in pts if b]
            if mem:
                ax_m.plot(*zip(*mem), "o-", color=line.get_color(), label=label)
        ax_t.set_yscale("log")
        ax_t.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0,), numticks=30))
        ax_t.yaxis.set_minor_locator(LogLocator(base=10, subs=tuple(range(2, 10)), numticks=30))
        # every tick labelled within about a decade, a subset within three, decades only beyond
        ax_t.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(3, 1.2)))
        ax_t.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(3, 1.2)))
        for ax, ylabel in ((ax_t, "forward+backward time (ms)"), (ax_m, f"peak memory above inputs ({unit})")):
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_locator(FixedLocator(ns))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_major_formatter(ScalarFormatter())
            if len(ns) == 1:  # one N: give the log axis some width around it
                ax.set_xlim(ns[0] / 1.5, ns[0] * 1.5)
            ax.set(xlabel="tokens N", ylabel=ylabel, title=f"D={d} V={v} {report['config']['dtype']}")
            ax.grid(True, which="major", alpha=0.45)
            ax.grid(True, which="minor", alpha=0.15)
            ax.legend(fontsize=8)
        ax_m.set_ylim(bottom=0)
    fig.suptitle(f"fused-pg benchmark - {report['device']['name']}" + (f"\n{data_line(report)}" if report["batches"]
                                                                        else ""))
    fig.tight_layout()
    return fig


def write_plot(report: dict, out_dir: str) -> str | None:
    """Write ``bench.png`` into ``out_dir``; returns its path (None when nothing ran)."""
    fig = make_figure(report)
    if fig is None:
        return None
    import matplotlib.pyplot as plt
    path = os.path.join(out_dir, PLOT_NAME)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
