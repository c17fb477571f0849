"""Tables for the terminal and markdown, the JSON file, and its schema check.

JSON schema ``fused-pg-bench/1`` (top-level keys, all required):

    schema, created (ISO date), wall_s, device {type, name, slug, ...},
    versions {python, torch, triton, fused_pg, liger_kernel, cut_cross_entropy, platform},
    git {commit, dirty}, config {...BenchConfig...}, timer, memory_method,
    skipped [{impl, label, reason}], accuracy {shape, dtype, results [...]} | null,
    floors [{n, d, v, gemm_ms, floor_ms {fwd, bwd, fwd_bwd}, tflops}],
    results [{impl, key, label, family, precision, n, d, v, status, reason, notes, computes,
              grads_in_forward, loss, anchor_loss, loss_ok, loss_tol, first_call_s,
              peak_mem_bytes, fwd_ms, bwd_ms, fwd_bwd_ms ({median, min, max, samples} | null),
              tflops, floor_ratio ({fwd, bwd, fwd_bwd} | null)}],
    loss_check {reference, checked, all_agree, max_abs_diff, mismatches}

Times are milliseconds, memory bytes, throughput TFLOP/s of the 4-GEMM model (:mod:`bench.floor`).
"""

from __future__ import annotations

import json
import os

SCHEMA = "fused-pg-bench/1"
TOP_LEVEL = ("schema", "created", "wall_s", "device", "versions", "git", "config", "timer",
             "memory_method", "skipped", "accuracy", "floors", "results", "loss_check")
RESULT_KEYS = ("impl", "key", "label", "family", "precision", "n", "d", "v", "status", "reason", "notes",
               "computes", "grads_in_forward", "loss", "anchor_loss", "loss_ok", "loss_tol", "first_call_s",
               "peak_mem_bytes", "fwd_ms", "bwd_ms", "fwd_bwd_ms", "tflops", "floor_ratio")
STATUSES = ("ok", "oom", "error", "skipped")
JSON_NAME, TABLE_NAME, PLOT_NAME = "bench.json", "table.md", "bench.png"


# --- formatting helpers -----------------------------------------------------------------------

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


# --- the tables -------------------------------------------------------------------------------

RESULT_HEADERS = ["implementation", "N", "D", "V", "fwd ms", "bwd ms", "fwd+bwd ms [min-max]",
                  "peak mem", "TFLOP/s", "x floor", "loss check", "notes"]


def result_rows(report: dict) -> list[list[str]]:
    rows = []
    floors = {(f["n"], f["d"], f["v"]): f for f in report["floors"]}
    for key, floor in floors.items():
        ms = floor["floor_ms"]
        rows.append(["4-GEMM floor (matmul)", *map(str, key), f"{ms['fwd']:.1f}", f"{ms['bwd']:.1f}",
                     f"{ms['fwd_bwd']:.1f}", "-", fmt_tflops(floor['tflops']), "1.00", "-", "same device and dtype"])
        for c in report["results"]:
            if (c["n"], c["d"], c["v"]) != key:
                continue
            notes = list(c["notes"])
            if c["grads_in_forward"]:
                notes.append("grads computed in fwd")
            if c["status"] != "ok":
                rows.append([c["label"], *map(str, key), "-", "-", c["status"].upper(), "-", "-", "-", "-",
                             "; ".join(notes + [c["reason"] or ""]).strip("; ")])
                continue
            check = "ok" if c["loss_ok"] else f"MISMATCH ({c['loss']:.6g} vs {c['anchor_loss']:.6g})"
            rows.append([
                c["label"], *map(str, key), fmt_ms(c["fwd_ms"]), fmt_ms(c["bwd_ms"]), fmt_ms(c["fwd_bwd_ms"], True),
                fmt_bytes(c["peak_mem_bytes"]), fmt_tflops(c["tflops"]["fwd_bwd"]),
                f"{c['floor_ratio']['fwd_bwd']:.2f}" if c["floor_ratio"] else "-", check, "; ".join(notes)])
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


def render(report: dict, markdown: bool = False) -> str:
    """The whole human-readable report: header, accuracy table, results table, loss check."""
    cfg, dev = report["config"], report["device"]
    lines = []
    title = f"fused-pg benchmark on {dev['name']}"
    lines += [f"## {title}" if markdown else title, ""]
    v = report["versions"]
    lines.append(f"{report['created']}  torch {v['torch']}  triton {v['triton']}  "
                 f"git {str(report['git']['commit'])[:10]}{' (dirty)' if report['git']['dirty'] else ''}")
    lines.append(f"dtype {cfg['dtype']}, {cfg['warmup']} warm-up + {cfg['repeats']} timed repeats, "
                 f"timer {report['timer']}")
    loss = cfg["loss"]
    lines.append(f"loss: repo={loss['repo']} kl={loss['kl_coef']:g} entropy_coef={loss['entropy_coef']:g} "
                 f"clip=[1-{loss['eps_low']:g}, 1+{loss['eps_high']:g}] token-mean; "
                 f"{cfg['seq_len']} tokens per sequence")
    lines.append(f"peak memory: {report['memory_method']}")
    for s in report["skipped"]:
        lines.append(f"skipped {s['label']}: {s['reason']}")
    lines.append("")
    if report["accuracy"] is not None:
        a = report["accuracy"]
        lines.append(f"Max error vs fp64 reference (N={a['shape']['n']} D={a['shape']['d']} V={a['shape']['v']}, "
                     f"{a['dtype']} inputs):")
        lines += ["", format_table(ACCURACY_HEADERS, accuracy_rows(report), markdown), ""]
    lines.append("Times (median after warm-up), peak memory above the inputs, TFLOP/s of the 4-GEMM model "
                 "(8*N*D*V flops), ratio to the 4-GEMM floor:")
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
    lines.append(f"wall time {report['wall_s']:.0f} s")
    return "\n".join(lines)


def _tol(report: dict) -> str:
    tols = {c["loss_tol"] for c in report["results"]}
    return ", ".join(f"{t:g}" for t in sorted(tols)) or "-"


# --- files ---------------------------------------------------------------------------------------

def validate(report: dict) -> None:
    """Raise ``ValueError`` naming the first part of ``report`` that breaks the schema."""
    if report.get("schema") != SCHEMA:
        raise ValueError(f"schema must be {SCHEMA!r}, got {report.get('schema')!r}")
    for key in TOP_LEVEL:
        if key not in report:
            raise ValueError(f"missing top-level key {key!r}")
    for key in ("type", "name", "slug"):
        if not isinstance(report["device"].get(key), str):
            raise ValueError(f"device.{key} must be a string")
    for key in ("torch", "fused_pg", "python"):
        if not isinstance(report["versions"].get(key), str):
            raise ValueError(f"versions.{key} must be a string")
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
        if r["status"] == "ok":
            for key in ("fwd_ms", "bwd_ms", "fwd_bwd_ms"):
                stats = r[key]
                if not isinstance(stats, dict) or not {"median", "min", "max", "samples"} <= set(stats):
                    raise ValueError(f"results[{i}].{key} must hold median/min/max/samples")
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
