"""What a run leaves behind: the terminal and markdown tables, the JSON file and its schema
check, the PNG plot, and the provenance they record (device, versions, date, git commit).

JSON schema ``fused-pg-bench/1`` (top-level keys, all required):

    schema, created (ISO date), wall_s, interrupted (bool: stopped by Ctrl-C, rows so far),
    device {type, name, slug, ...},
    versions {python, torch, triton, fused_pg, liger_kernel, cut_cross_entropy, trl, verl, platform},
    git {commit, dirty}, config {...BenchConfig...}, timer, memory_method,
    estimate {seconds, per_shape, gemm_tflops, model, memory_bytes, available_bytes} | null,
    skipped [{impl, label, reason}], accuracy {shape, dtype, mean_entropy, results [...]} | null,
    batches [{n, d, v, seqs, seq_len, valid_tokens, data, mean_entropy, oracle_rows}],
    floors [{n, d, v, gemm_ms, floor_ms {fwd, bwd, fwd_bwd}, tflops}],
    results [{impl, key, label, family, precision, n, d, v, status, reason, notes, computes,
              grads_in_forward, loss, anchor_loss, loss_ok, loss_tol, first_call_s,
              peak_mem_bytes, fwd_ms, bwd_ms, fwd_bwd_ms ({median, min, max, spread, samples} | null),
              tflops, floor_ratio ({fwd, bwd, fwd_bwd} | null), gemms, rows_swept, own_floor_ms,
              flags (subset of FLAGS), logprobs_max_abs, entropy_max_abs (against the fp64
              oracle on the batch's oracle_rows sampled valid tokens; null where not exposed)}],
    loss_check {reference, checked, all_agree, max_abs_diff, mismatches}

Times are milliseconds, memory bytes, throughput TFLOP/s of the 4-GEMM model
(:mod:`bench.measure`), entropies nats. ``interrupted``, ``estimate``, ``batches``, the
``spread`` of a timing and a result's ``gemms``/``rows_swept``/``own_floor_ms``/``flags``/
``logprobs_max_abs``/``entropy_max_abs`` were
added to the first version of this schema without changing any earlier key.

The plot: one row of two panels per (D, V): forward+backward time against N on log-log axes
(a tick at every decade and at 2..9 times it between, labelled as densely as the range
allows), with the 4-GEMM floor as a
dashed black line through the floor measured once per shape (a marker at every N); peak
memory on a linear axis from 0. matplotlib is imported only when a plot is written.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys

import torch

from . import peers
from .measure import NOISY_SPREAD
from .config import REPO_ROOT, device_name, slug

SCHEMA = "fused-pg-bench/1"
TOP_LEVEL = ("schema", "created", "wall_s", "interrupted", "device", "versions", "git", "config", "timer",
             "memory_method", "estimate", "skipped", "accuracy", "batches", "floors", "results", "loss_check")
RESULT_KEYS = ("impl", "key", "label", "family", "precision", "n", "d", "v", "status", "reason", "notes",
               "computes", "grads_in_forward", "loss", "anchor_loss", "loss_ok", "loss_tol", "first_call_s",
               "peak_mem_bytes", "fwd_ms", "bwd_ms", "fwd_bwd_ms", "tflops", "floor_ratio",
               "gemms", "rows_swept", "own_floor_ms", "flags", "logprobs_max_abs", "entropy_max_abs")
STATUSES = ("ok", "oom", "error", "skipped")
FLAGS = ("noisy", "below-floor")
JSON_NAME, TABLE_NAME, PLOT_NAME = "bench.json", "table.md", "bench.png"


# --- provenance ----------------------------------------------------------------------------------------

def device_info(device: torch.device) -> dict:
    name = device_name(device)
    info = {"type": device.type, "name": name, "slug": slug(name), "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(total_memory_bytes=props.total_memory, capability=f"{props.major}.{props.minor}",
                    cuda=torch.version.cuda)
    return info


def _module_version(name: str) -> str | None:
    try:
        module = __import__(name)
    except Exception:  # noqa: BLE001 -- absent or broken: no version
        return None
    return getattr(module, "__version__", None)


def versions() -> dict:
    import fused_pg
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "triton": _module_version("triton"),
        "fused_pg": fused_pg.__version__,
        "liger_kernel": peers.version(peers.LIGER),
        "cut_cross_entropy": peers.version(peers.CCE),
        "trl": peers.version(peers.TRL),
        "verl": peers.version(peers.VERL),
        "platform": platform.platform(),
    }


def git_commit() -> dict:
    """``{"commit": sha or None, "dirty": bool or None}`` of the checkout the bench lives in."""
    def git(*args: str) -> str | None:
        if REPO_ROOT is None:
            return None
        try:
            return subprocess.run(["git", "-C", REPO_ROOT, *args], capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": sha, "dirty": None if status is None else bool(status)}


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --- formatting helpers -----------------------------------------------------------------------------

def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.0f} MiB"


def fmt_ms(stats: dict | None, spread: bool = False) -> str:
    if stats is None:
        return "-"
    text = f"{stats['median']:.1f}" if stats["median"] >= 10 else f"{stats['median']:.2f}"
    if spread:
        text += f" [{stats['min']:.1f}-{stats['max']:.1f}]"
    return text


def fmt_seconds(s: float) -> str:
    if s < 10:
        return f"{s:.1f} s"
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def fmt_tflops(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def fmt_err(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1e}"


def format_table(headers: list[str], rows: list[list[str]], markdown: bool = False) -> str:
    """Column-aligned plain text, or a GitHub markdown table."""
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(headers), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows])


# --- the tables -------------------------------------------------------------------------------------

RESULT_HEADERS = ["implementation", "N", "D", "V", "fwd ms", "bwd ms", "fwd+bwd ms [min-max]", "spread",
                  "peak mem", "TFLOP/s", "x floor", "loss check", "logp err", "notes"]


def flag_notes(case: dict) -> list[str]:
    """Human-readable text of a result's flags."""
    out = []
    if "noisy" in case["flags"]:
        out.append(f"NOISY: spread {case['fwd_bwd_ms']['spread']:.1%} > {NOISY_SPREAD:.0%}, median uncertain")
    if "below-floor" in case["flags"]:
        out.append(f"BELOW ITS OWN {case['gemms']}-GEMM FLOOR ({case['own_floor_ms']:.1f} ms): "
                   "timing suspect or work skipped")
    return out


def result_rows(report: dict) -> list[list[str]]:
    rows = []
    batches = {(b["n"], b["d"], b["v"]): b for b in report["batches"]}
    for floor in report["floors"]:
        key = (floor["n"], floor["d"], floor["v"])
        ms = floor["floor_ms"]
        b = batches.get(key)
        where = "same device and dtype" + (f"; {b['seqs']} x {b['seq_len']} tokens" if b else "")
        rows.append(["4-GEMM floor (matmul)", *map(str, key), f"{ms['fwd']:.1f}", f"{ms['bwd']:.1f}",
                     f"{ms['fwd_bwd']:.1f}", "-", "-", fmt_tflops(floor["tflops"]), "1.00", "-", "-", where])
        for c in report["results"]:
            if (c["n"], c["d"], c["v"]) != key:
                continue
            notes = list(c["notes"])
            if c["grads_in_forward"]:
                notes.append("grads computed in fwd")
            if c["status"] != "ok":
                rows.append([c["label"], *map(str, key), "-", "-", c["status"].upper(), "-", "-", "-", "-", "-", "-",
                             "; ".join(notes + [c["reason"] or ""]).strip("; ")])
                continue
            check = "ok" if c["loss_ok"] else f"MISMATCH ({c['loss']:.6g} vs {c['anchor_loss']:.6g})"
            rows.append([
                c["label"], *map(str, key), fmt_ms(c["fwd_ms"]), fmt_ms(c["bwd_ms"]), fmt_ms(c["fwd_bwd_ms"], True),
                f"{c['fwd_bwd_ms']['spread']:.0%}", fmt_bytes(c["peak_mem_bytes"]),
                fmt_tflops(c["tflops"]["fwd_bwd"]),
                f"{c['floor_ratio']['fwd_bwd']:.2f}" if c["floor_ratio"] else "-", check,
                fmt_err(c["logprobs_max_abs"]), "; ".join(flag_notes(c) + notes)])
    return rows


ACCURACY_HEADERS = ["implementation", "loss abs err", "logp max abs err", "entropy max abs err",
                    "dh max rel err", "dW max rel err", "notes"]


def accuracy_rows(report: dict) -> list[list[str]]:
    rows = []
    for r in report["accuracy"]["results"]:
        if r["status"] != "ok":
            rows.append([r["label"], "ERROR", "-", "-", "-", "-", r["reason"] or ""])
            continue
        rows.append([r["label"], fmt_err(r["loss_abs"]), fmt_err(r["logprobs_max_abs"]), fmt_err(r["entropy_max_abs"]),
                     fmt_err(r["grad_hidden_max_rel"]), fmt_err(r["grad_weight_max_rel"]), "; ".join(r["notes"])])
    return rows


def data_line(report: dict) -> str:
    """The benchmark data and its measured mean token entropy."""
    cfg, batches = report["config"], report["batches"]
    kind = (f"realistic logits (target mean entropy {cfg['target_entropy']:.1f} nats)" if cfg["data"] == "realistic"
            else "flat logits (i.i.d., std 3; uniform targets)")
    if not batches:
        return f"data: {kind}"
    ents = [b["mean_entropy"] for b in batches]
    lo, hi = min(ents), max(ents)
    measured = f"{lo:.2f}" if f"{lo:.2f}" == f"{hi:.2f}" else f"{lo:.2f}-{hi:.2f}"
    return f"data: {kind}; mean token entropy {measured} nats over valid tokens"


def layout_line(report: dict) -> str:
    seq_len = report["config"]["seq_len"]
    odd = [b for b in report["batches"] if b["seq_len"] != seq_len]
    text = f"{seq_len} tokens per sequence"
    if odd:
        text += " (" + ", ".join(f"N={b['n']}: {b['seqs']} x {b['seq_len']}" for b in odd) + ")"
    return text


def render(report: dict, markdown: bool = False) -> str:
    """The whole human-readable report: header, accuracy table, results table, loss check."""
    cfg, dev = report["config"], report["device"]
    lines = []
    title = f"fused-pg benchmark on {dev['name']}"
    lines += [f"## {title}" if markdown else title, ""]
    if report["interrupted"]:
        lines += ["INTERRUPTED (Ctrl-C): the tables hold the rows finished before it.", ""]
    v = report["versions"]
    lines.append(f"{report['created']}  torch {v['torch']}  triton {v['triton']}  "
                 f"git {str(report['git']['commit'])[:10]}{' (dirty)' if report['git']['dirty'] else ''}")
    lines.append(f"dtype {cfg['dtype']}, {cfg['warmup']} warm-up + {cfg['repeats']} timed repeats, "
                 f"timer {report['timer']}")
    loss = cfg["loss"]
    kl = f"kl={loss['kl_coef']:g}" + (f" ({loss['kl_estimator']})" if loss["kl_coef"] else "")
    lines.append(f"loss: repo={loss['repo']} {kl} entropy_coef={loss['entropy_coef']:g} "
                 f"clip=[1-{loss['eps_low']:g}, 1+{loss['eps_high']:g}] {loss['aggregation']}; "
                 f"{layout_line(report)}")
    lines.append(data_line(report))
    lines.append(f"peak memory: {report['memory_method']}")
    for s in report["skipped"]:
        lines.append(f"skipped {s['label']}: {s['reason']}")
    lines.append("")
    if report["accuracy"] is not None:
        a = report["accuracy"]
        lines.append(f"Max error vs fp64 reference (N={a['shape']['n']} D={a['shape']['d']} V={a['shape']['v']}, "
                     f"{a['dtype']} inputs, mean entropy {a['mean_entropy']:.2f} nats):")
        lines += ["", format_table(ACCURACY_HEADERS, accuracy_rows(report), markdown), ""]
    oracle_rows = sorted({b["oracle_rows"] for b in report["batches"]})
    lines.append("Times (median after warm-up, spread = inter-quartile range / median), peak memory above the "
                 "inputs, TFLOP/s of the 4-GEMM model (8*N*D*V flops), ratio to the 4-GEMM floor, logp err = "
                 f"max |logp - fp64 oracle| over {'/'.join(map(str, oracle_rows)) or 'no'} valid tokens of the batch:")
    lines += ["", format_table(RESULT_HEADERS, result_rows(report), markdown), ""]
    lc = report["loss_check"]
    if lc["checked"] == 0:
        lines.append("loss check: nothing checked")
    elif lc["all_agree"]:
        lines.append(f"loss check: all {lc['checked']} runs agree with the {lc['reference']} "
                     f"(max |diff| {lc['max_abs_diff']:.1e}, tolerance {_tol(report)} x max(1, |loss|))")
    else:
        lines.append(f"loss check: {len(lc['mismatches'])} of {lc['checked']} runs DISAGREE with the "
                     f"{lc['reference']}: " + ", ".join(f"{m['impl']} N={m['n']}" for m in lc["mismatches"]))
    est = report["estimate"]
    took = f"wall time {report['wall_s']:.0f} s"
    if est is not None:
        took += f" (estimated {fmt_seconds(est['seconds'])} before the run)"
    lines.append(took)
    return "\n".join(lines)


def _tol(report: dict) -> str:
    tols = {c["loss_tol"] for c in report["results"]}
    return ", ".join(f"{t:g}" for t in sorted(tols)) or "-"


# --- files ---------------------------------------------------------------------------------------------

def validate(report: dict) -> None:
    """Raise ``ValueError`` naming the first part of ``report`` that breaks the schema."""
    if report.get("schema") != SCHEMA:
        raise ValueError(f"schema must be {SCHEMA!r}, got {report.get('schema')!r}")
    for key in TOP_LEVEL:
        if key not in report:
            raise ValueError(f"missing top-level key {key!r}")
    if not isinstance(report["interrupted"], bool):
        raise ValueError("interrupted must be a bool")
    for key in ("type", "name", "slug"):
        if not isinstance(report["device"].get(key), str):
            raise ValueError(f"device.{key} must be a string")
    for key in ("torch", "fused_pg", "python"):
        if not isinstance(report["versions"].get(key), str):
            raise ValueError(f"versions.{key} must be a string")
    for i, b in enumerate(report["batches"]):
        for key in ("n", "d", "v", "seqs", "seq_len", "valid_tokens", "data", "mean_entropy", "oracle_rows"):
            if key not in b:
                raise ValueError(f"batches[{i}] misses {key!r}")
    for i, f in enumerate(report["floors"]):
        for key in ("n", "d", "v", "floor_ms", "tflops"):
            if key not in f:
                raise ValueError(f"floors[{i}] misses {key!r}")
    for i, r in enumerate(report["results"]):
        missing = [k for k in RESULT_KEYS if k not in r]
        if missing:
            raise ValueError(f"results[{i}] misses {missing}")
        if r["status"] not in STATUSES:
            raise ValueError(f"results[{i}].status must be one of {STATUSES}, got {r['status']!r}")
        unknown = [f for f in r["flags"] if f not in FLAGS]
        if unknown:
            raise ValueError(f"results[{i}].flags has unknown {unknown}; known: {FLAGS}")
        if r["status"] == "ok":
            for key in ("fwd_ms", "bwd_ms", "fwd_bwd_ms"):
                stats = r[key]
                if not isinstance(stats, dict) or not {"median", "min", "max", "spread", "samples"} <= set(stats):
                    raise ValueError(f"results[{i}].{key} must hold median/min/max/spread/samples")
            if not isinstance(r["loss"], float) or not isinstance(r["loss_ok"], bool):
                raise ValueError(f"results[{i}] must carry its loss and loss check")
        elif not r["reason"]:
            raise ValueError(f"results[{i}] has status {r['status']!r} but no reason")
    for key in ("checked", "all_agree", "mismatches"):
        if key not in report["loss_check"]:
            raise ValueError(f"loss_check misses {key!r}")


def write_json(report: dict, out_dir: str) -> str:
    report = {"schema": SCHEMA, **report}
    validate(report)
    path = os.path.join(out_dir, JSON_NAME)
    with open(path, "w") as f:
        json.dump(report, f, indent=1, sort_keys=False)
        f.write("\n")
    return path


def write_table(report: dict, out_dir: str) -> str:
    path = os.path.join(out_dir, TABLE_NAME)
    with open(path, "w") as f:
        f.write(render(report, markdown=True) + "\n")
    return path


# --- the plot ------------------------------------------------------------------------------------------

FLOOR_LABEL = "4-GEMM floor"


def _series(report: dict, d: int, v: int) -> dict[str, list[tuple[int, float, float | None]]]:
    """label -> [(N, fwd+bwd median ms, peak bytes)] of the successful runs at (d, v)."""
    out: dict[str, list] = {}
    for r in report["results"]:
        if r["status"] == "ok" and (r["d"], r["v"]) == (d, v):
            out.setdefault(r["label"], []).append((r["n"], r["fwd_bwd_ms"]["median"], r["peak_mem_bytes"]))
    return {k: sorted(pts) for k, pts in out.items()}


def log_labels(lo: float, hi: float) -> tuple[float, ...]:
    """Mantissas labelled on a log axis from ``lo`` to ``hi``: every tick within one decade,
    1-2-5 within three, decades only beyond."""
    decades = math.log10(max(hi, 1e-30) / max(lo, 1e-30))
    if decades <= 1.2:
        return tuple(float(m) for m in range(1, 10))
    return (1.0, 2.0, 5.0) if decades <= 3 else (1.0,)


def _log_formatter(mantissas: tuple[float, ...]):
    def label(y: float, _pos=None) -> str:
        if y <= 0:
            return ""
        mantissa = round(y / 10 ** math.floor(math.log10(y) + 1e-9), 6)
        return f"{y:g}" if mantissa in mantissas else ""
    return label


def make_figure(report: dict):
    """The matplotlib figure of the report (None when nothing ran)."""
    pairs = sorted({(f["d"], f["v"]) for f in report["floors"]})
    if not pairs or not any(r["status"] == "ok" for r in report["results"]):
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullLocator, ScalarFormatter

    peaks = [r["peak_mem_bytes"] for r in report["results"] if r["status"] == "ok" and r["peak_mem_bytes"]]
    unit, scale = ("GiB", 2**30) if peaks and max(peaks) >= 2**30 else ("MiB", 2**20)
    fig, axes = plt.subplots(len(pairs), 2, figsize=(12, 4.4 * len(pairs)), squeeze=False)
    dtype = report["config"]["dtype"]
    for row, (d, v) in enumerate(pairs):
        ax_t, ax_m = axes[row]
        floor = sorted((f["n"], f["floor_ms"]["fwd_bwd"]) for f in report["floors"] if (f["d"], f["v"]) == (d, v))
        ns_all = [n for n, _ in floor]
        ax_t.plot(ns_all, [t for _, t in floor], "k--", marker="_", markersize=18, markeredgewidth=2,
                  label=FLOOR_LABEL, zorder=3)
        for label, pts in _series(report, d, v).items():
            ns = [p[0] for p in pts]
            line, = ax_t.plot(ns, [p[1] for p in pts], "o-", label=label)
            mem = [(n, b) for n, _, b in pts if b]
            if mem:
                ax_m.plot([n for n, _ in mem], [b / scale for _, b in mem], "o-", color=line.get_color(), label=label)
        ax_t.set_yscale("log")
        ax_t.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0,), numticks=30))
        ax_t.yaxis.set_minor_locator(LogLocator(base=10, subs=tuple(range(2, 10)), numticks=30))
        labelled = _log_formatter(log_labels(*ax_t.get_ylim()))
        ax_t.yaxis.set_major_formatter(FuncFormatter(labelled))
        ax_t.yaxis.set_minor_formatter(FuncFormatter(labelled))
        for ax, ylabel in ((ax_t, "forward+backward time (ms)"), (ax_m, f"peak memory above inputs ({unit})")):
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_locator(FixedLocator(ns_all))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.set_xlabel("tokens N")
            ax.set_ylabel(ylabel)
            ax.set_title(f"D={d} V={v} {dtype}")
            ax.grid(True, which="major", alpha=0.45)
            ax.grid(True, which="minor", alpha=0.15)
        if len(ns_all) == 1:  # one N: give the log axis some width around it
            ax_t.set_xlim(ns_all[0] / 1.5, ns_all[0] * 1.5)
            ax_m.set_xlim(ns_all[0] / 1.5, ns_all[0] * 1.5)
        ax_m.set_ylim(bottom=0)
        ax_t.legend(fontsize=8)
        ax_m.legend(fontsize=8)
    title = f"fused-pg benchmark - {report['device']['name']}"
    if report["batches"]:
        title += f"\n{data_line(report)}"
    fig.suptitle(title)
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
