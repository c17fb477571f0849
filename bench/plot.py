"""PNG plot: forward+backward time and peak memory vs N, one line per implementation.

One row of two panels per (D, V) pair: time on log-log axes with the 4-GEMM floor
(dashed), memory on a linear axis from 0. matplotlib is imported here only, when a plot is written (Agg backend, no display).
"""

from __future__ import annotations

import os

from .report import PLOT_NAME


def _series(report: dict, d: int, v: int) -> dict[str, list[tuple[int, float, float | None]]]:
    """label -> [(N, fwd+bwd median ms, peak bytes)] of the successful runs at (d, v)."""
    out: dict[str, list] = {}
    for r in report["results"]:
        if r["status"] == "ok" and (r["d"], r["v"]) == (d, v):
            out.setdefault(r["label"], []).append((r["n"], r["fwd_bwd_ms"]["median"], r["peak_mem_bytes"]))
    return {k: sorted(pts) for k, pts in out.items()}


def write_plot(report: dict, out_dir: str) -> str | None:
    """Write ``bench.png`` into ``out_dir``; returns its path (None when nothing ran)."""
    pairs = sorted({(f["d"], f["v"]) for f in report["floors"]})
    if not pairs or not any(r["status"] == "ok" for r in report["results"]):
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator, ScalarFormatter

    peaks = [r["peak_mem_bytes"] for r in report["results"] if r["status"] == "ok" and r["peak_mem_bytes"]]
    unit, scale = ("GiB", 2**30) if peaks and max(peaks) >= 2**30 else ("MiB", 2**20)
    fig, axes = plt.subplots(len(pairs), 2, figsize=(12, 4.2 * len(pairs)), squeeze=False)
    dtype = report["config"]["dtype"]
    for row, (d, v) in enumerate(pairs):
        ax_t, ax_m = axes[row]
        floor = sorted((f["n"], f["floor_ms"]["fwd_bwd"]) for f in report["floors"] if (f["d"], f["v"]) == (d, v))
        ns_all = [n for n, _ in floor]
        ax_t.plot(ns_all, [t for _, t in floor], "k--", label="4-GEMM floor")
        for label, pts in _series(report, d, v).items():
            ns = [p[0] for p in pts]
            line, = ax_t.plot(ns, [p[1] for p in pts], "o-", label=label)
            mem = [(n, b) for n, _, b in pts if b]
            if mem:
                ax_m.plot([n for n, _ in mem], [b / scale for _, b in mem], "o-", color=line.get_color(), label=label)
        for ax, ylabel in ((ax_t, "forward+backward time (ms)"), (ax_m, f"peak memory above inputs ({unit})")):
            ax.set_xscale("log", base=2)
            if ax is ax_t:
                ax.set_yscale("log")
            ax.xaxis.set_major_locator(FixedLocator(ns_all))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_major_formatter(ScalarFormatter())
            plain = FuncFormatter(lambda y, _pos: f"{y:g}")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
            ax.set_xlabel("tokens N")
            ax.set_ylabel(ylabel)
            ax.set_title(f"D={d} V={v} {dtype}")
            ax.grid(True, which="both", alpha=0.3)
        ax_m.set_ylim(bottom=0)
        ax_t.legend(fontsize=8)
        ax_m.legend(fontsize=8)
    fig.suptitle(f"fused-pg benchmark - {report['device']['name']}")
    fig.tight_layout()
    path = os.path.join(out_dir, PLOT_NAME)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
