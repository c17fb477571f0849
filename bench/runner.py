"""Runs a :class:`~bench.config.BenchConfig` (what one run does: docs/benchmark.md): the accuracy
check, then per shape the batch, the GEMM floor, the sampled fp64 oracle and every implementation.
Returns the report that :mod:`bench.report` prints and writes.
"""

from __future__ import annotations

import gc
import time
from typing import Callable

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor

from fused_pg import LossConfig
from fused_pg.reference.head import logprobs_entropy_ref
from fused_pg.reference.loss import repo_loss_ref

from . import measure, report as report_mod
from .config import BenchConfig, Shape, describe_loss, device_name, loss_options, pick_device
from .impls import Impl, build_impls, fused_loss
from .problem import Problem, StepOutput, make_problem

LOSS_TOL = {"fp32": 1e-4, "bf16": 5e-3, "fp16": 5e-3}  # loss check: |L - L_anchor| <= tol * max(1, |L_anchor|)
# on CPU, skip a materialising implementation whose logits would take more than this share of the
# available memory (an OOM on CPU kills the process instead of raising)
CPU_MEMORY_SHARE = 0.7
ACCURACY_SHAPE = Shape(n=256, d=128, v=1531)  # odd V: masked tile tails; D % 128 == 0: verl's kernel
ACCURACY_SEQ_LEN = 64
ORACLE_ROWS = 64  # valid tokens per benchmark batch checked against the fp64 oracle


def resolve_impls(cfg: BenchConfig, device: torch.device) -> tuple[list[Impl], list[dict]]:
    """The implementations that can run here, and the skipped ones with their reasons."""
    runnable, skipped = [], []
    for impl in (i for key in cfg.impls for i in build_impls(key, cfg.precisions)):
        reason = impl.check(device, cfg.torch_dtype)
        if reason is None:
            runnable.append(impl)
        else:
            skipped.append({"impl": impl.name, "label": impl.display, "reason": reason})
    return runnable, skipped


def estimate(cfg: BenchConfig, device: torch.device, impls: list[Impl]) -> dict:
    """:func:`bench.measure.estimate_run` for this run, with rates measured here."""
    rates = {(s.d, s.v): measure.measure_rates(device, cfg.torch_dtype, s.d, s.v) for s in cfg.shapes}
    est = measure.estimate_run(cfg.shapes, [i.key for i in impls], rates, device_type=device.type,
                               warmup=cfg.warmup, repeats=cfg.repeats)
    est["memory_bytes"] = max((measure.memory_needed(s, cfg.torch_dtype) for s in cfg.shapes), default=0)
    est["available_bytes"] = measure.available_bytes(device)
    return est


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]


class RowOracle:
    """fp64 log-probs and entropies of ``count`` valid tokens spread evenly over a batch (on its
    rounded inputs, on its device)."""

    def __init__(self, problem: Problem, count: int = ORACLE_ROWS):
        valid = problem.mask.reshape(-1).nonzero().squeeze(1)
        self.rows = valid[torch.linspace(0, len(valid) - 1, min(count, len(valid)), device=valid.device).long()]
        with torch.no_grad():
            h = problem.hidden.detach().reshape(-1, problem.shape.d)[self.rows]
            self.logprobs, self.entropy = logprobs_entropy_ref(
                h, problem.weight.detach(), problem.targets.reshape(-1)[self.rows], dtype=torch.float64)

    def errors(self, out: StepOutput) -> tuple[float | None, float | None]:
        """max |logp - oracle| and max |entropy - oracle| over the sampled tokens (None: not exposed)."""
        def err(values: Tensor | None, ref: Tensor) -> float | None:
            if values is None:
                return None
            return float((values.detach().reshape(-1)[self.rows].double() - ref).abs().max())
        return err(out.logprobs, self.logprobs), err(out.entropy, self.entropy)


def new_row(impl: Impl, shape: Shape, loss: LossConfig, notes: tuple[str, ...], tol: float) -> dict:
    """The result row of one implementation on one shape, before it runs."""
    return {"impl": impl.name, "key": impl.key, "label": impl.display, "family": impl.family,
            "precision": impl.precision, "n": shape.n, "d": shape.d, "v": shape.v, "status": "ok", "reason": None,
            "notes": list(notes), "computes": loss_options(loss), "grads_in_forward": impl.grads_in_forward,
            "loss": None, "anchor_loss": None, "loss_ok": None, "loss_tol": tol, "first_call_s": None,
            "peak_mem_bytes": None, "fwd_ms": None, "bwd_ms": None, "fwd_bwd_ms": None, "tflops": None,
            "floor_ratio": None, "gemms": impl.gemms, "rows_swept": shape.n, "own_floor_ms": None, "flags": [],
            "logprobs_max_abs": None, "entropy_max_abs": None}


def add_times(row: dict, times: dict, floor: dict | None) -> None:
    """Timings into ``row``, with the TFLOP/s, floor ratios and flags derived from them."""
    row.update(fwd_ms=times["fwd"], bwd_ms=times["bwd"], fwd_bwd_ms=times["fwd_bwd"])
    fl = measure.flops(Shape(row["n"], row["d"], row["v"]))
    row["tflops"] = {k: fl[k] / (t["median"] * 1e-3) / 1e12 if t["median"] > 0 else None for k, t in times.items()}
    if times["fwd_bwd"]["spread"] > measure.NOISY_SPREAD:
        row["flags"].append("noisy")
    if floor is not None:
        row["floor_ratio"] = {k: t["median"] / floor["floor_ms"][k] for k, t in times.items()}
        row["own_floor_ms"] = measure.own_floor_ms(floor, row["gemms"]) * row["rows_swept"] / row["n"]
        if times["fwd_bwd"]["median"] < row["own_floor_ms"]:
            row["flags"].append("below-floor")


def run_case(impl: Impl, problem: Problem, cfg: BenchConfig, device: torch.device, anchors: dict,
             oracle: RowOracle | None = None, floor: dict | None = None) -> dict:
    """Loss check, oracle check, warm-up, memory and timing of one implementation on one problem."""
    loss, notes = impl.effective_loss(cfg.loss)
    row = new_row(impl, problem.shape, loss, notes, LOSS_TOL[cfg.dtype])
    if device.type == "cpu" and impl.logits_bytes_per_nv:
        need, avail = impl.logits_bytes_per_nv * problem.shape.n * problem.shape.v, measure.available_bytes(device)
        if avail is not None and need > CPU_MEMORY_SHARE * avail:
            row.update(status="skipped", reason=f"needs ~{need / 2**30:.1f} GiB of logits, "
                                                f"{avail / 2**30:.1f} GiB available")
            return row
    inputs = problem.grad_inputs()
    backward = lambda out: torch.autograd.grad(out.loss, inputs)  # noqa: E731
    try:
        step = impl.make(problem, loss)
        t0 = measure.clock()
        out = step()
        backward(out)
        row["first_call_s"] = measure.clock() - t0
        row["loss"] = float(out.loss.detach())
        if out.rows is not None:
            row["rows_swept"] = out.rows
            row["notes"].append(f"sweeps only the {out.rows} unmasked of {problem.shape.n} rows")
        if oracle is not None:
            row["logprobs_max_abs"], row["entropy_max_abs"] = oracle.errors(out)
        del out
        key = (problem.shape, loss)
        if impl.key == "fused-torch" and impl.precision == "native":
            anchors.setdefault(key, row["loss"])
        if key not in anchors:
            with torch.no_grad():
                anchors[key] = float(fused_loss(problem, loss, "torch").loss)
        row["anchor_loss"] = anchors[key]
        row["loss_ok"] = abs(row["loss"] - anchors[key]) <= row["loss_tol"] * max(1.0, abs(anchors[key]))
        for _ in range(cfg.warmup - 1):
            backward(step())
        with measure.PeakMemory(device) as pm:
            times = measure.time_fwd_bwd(step, backward, cfg.repeats)
        row["peak_mem_bytes"] = pm.peak_bytes
        add_times(row, times, floor)
    except torch.cuda.OutOfMemoryError as exc:
        row.update(status="oom", reason=_first_line(exc))
    except Exception as exc:  # noqa: BLE001 -- recorded, the run goes on
        row.update(status="error", reason=_first_line(exc))
    finally:
        _free(device)
    return row


def run_accuracy(impls: list[Impl], cfg: BenchConfig, device: torch.device) -> dict:
    """Max errors vs the fp64 oracle on :data:`ACCURACY_SHAPE`, on the CPU, of each implementation's
    loss, log-probs and entropies (abs, valid tokens) and gradients (max |g - g_ref| / max |g_ref|),
    for the loss it actually computes."""
    problem = make_problem(ACCURACY_SHAPE, cfg.torch_dtype, device, cfg.loss, seq_len=ACCURACY_SEQ_LEN,
                           seed=cfg.seed + 1, data=cfg.data, target_entropy=cfg.target_entropy)
    cpu = lambda t: None if t is None else t.detach().cpu().double()  # noqa: E731
    valid, refs, rows = problem.mask.cpu(), {}, []
    for impl in impls:
        loss, notes = impl.effective_loss(cfg.loss)
        row = {"impl": impl.name, "label": impl.display, "notes": list(notes), "status": "ok", "reason": None}
        try:
            if loss not in refs:
                h, w = (cpu(t).requires_grad_(True) for t in problem.grad_inputs())
                ref = repo_loss_ref(h, w, problem.targets.cpu(), cpu(problem.advantages), cpu(problem.old_logprobs),
                                    valid, ref_logprobs=cpu(problem.ref_logprobs), dtype=torch.float64,
                                    **loss_options(loss))
                refs[loss] = (ref, *torch.autograd.grad(ref.loss, [h, w]))
            ref, ref_gh, ref_gw = refs[loss]
            out = impl.make(problem, loss)()
            gh, gw = torch.autograd.grad(out.loss, problem.grad_inputs())
            max_abs = lambda got, r: None if got is None else float(  # noqa: E731
                (cpu(got).reshape(r.shape) - r).abs()[valid].max())
            max_rel = lambda got, r: float((cpu(got) - r).abs().max() / r.abs().max().clamp_min(1e-30))  # noqa: E731
            row.update(loss_abs=abs(float(out.loss.detach()) - float(ref.loss.detach())),
                       logprobs_max_abs=max_abs(out.logprobs, ref.logprobs.detach()),
                       entropy_max_abs=max_abs(out.entropy, ref.entropy.detach()),
                       grad_hidden_max_rel=max_rel(gh, ref_gh), grad_weight_max_rel=max_rel(gw, ref_gw))
        except Exception as exc:  # noqa: BLE001 -- recorded, the run goes on
            row.update(status="error", reason=_first_line(exc))
        rows.append({**dict.fromkeys(("loss_abs", "logprobs_max_abs", "entropy_max_abs", "grad_hidden_max_rel",
                                      "grad_weight_max_rel")), **row})
        _free(device)
    shape = ACCURACY_SHAPE
    return {"shape": {"n": shape.n, "d": shape.d, "v": shape.v}, "dtype": cfg.dtype,
            "mean_entropy": problem.mean_entropy, "results": rows}


def loss_check_summary(rows: list[dict]) -> dict:
    checked = [c for c in rows if c["loss_ok"] is not None]
    return {"reference": "fused-pg torch backend, same inputs and loss options", "checked": len(checked),
            "all_agree": all(c["loss_ok"] for c in checked) if checked else None,
            "max_abs_diff": max((abs(c["loss"] - c["anchor_loss"]) for c in checked), default=None),
            "mismatches": [{k: c[k] for k in ("impl", "n", "d", "v", "loss", "anchor_loss")}
                           for c in checked if not c["loss_ok"]]}


# --- the whole run ----------------------------------------------------------------------------------

def _case_line(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['status'].upper()}: {row['reason']}"
    mem = "" if row["peak_mem_bytes"] is None else f", peak {row['peak_mem_bytes'] / 2**20:.0f} MiB"
    check = "" if row["loss_ok"] else "  LOSS MISMATCH"
    return f"fwd+bwd {row['fwd_bwd_ms']['median']:.1f} ms{mem}{check}" + "".join(f"  [{f}]" for f in row["flags"])


def run(cfg: BenchConfig, console: Console | None = None, *, impls: list[Impl] | None = None,
        skipped: list[dict] | None = None, est: dict | None = None,
        on_row: Callable[[dict], None] | None = None) -> dict:
    """Run the whole benchmark; returns the report (see :mod:`bench.report`).

    ``impls``/``skipped`` come from :func:`resolve_impls` when not given; ``est`` (from
    :func:`estimate`) is recorded as given. ``on_row`` receives the report of the rows finished so
    far (``interrupted: true`` until the end) after every row. A KeyboardInterrupt ends the run
    early: the report then holds what finished, with ``interrupted: true``.
    """
    console = console or report_mod.make_console()
    device = pick_device(cfg.device)
    started = time.perf_counter()
    if impls is None:
        impls, skipped = resolve_impls(cfg, device)
        for s in skipped:
            console.print(f"skip {s['label']}: {s['reason']}")
    console.print(f"fused-pg bench: {device_name(device)}, {cfg.dtype}, loss: {describe_loss(cfg.loss)}")
    console.print(f"timer: {report_mod.TIMER}; memory: {measure.memory_method(device)}")
    report = {"device": report_mod.device_info(device), "versions": report_mod.versions(),
              "git": report_mod.git_commit(), "created": report_mod.now_iso(), "config": cfg.as_dict(),
              "timer": report_mod.TIMER, "memory_method": measure.memory_method(device),
              "skipped": list(skipped or []), "estimate": est, "accuracy": None, "batches": [], "floors": [],
              "results": [], "interrupted": False}

    def finished(interrupted: bool) -> dict:
        return {**report, "interrupted": interrupted, "loss_check": loss_check_summary(report["results"]),
                "wall_s": time.perf_counter() - started}
    total, anchors = len(cfg.shapes) * len(impls), {}
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=True)
    try:
        with progress:
            task = progress.add_task("accuracy vs fp64 reference", total=total)
            if cfg.accuracy and impls:
                report["accuracy"] = run_accuracy(impls, cfg, device)
                console.print(f"accuracy vs fp64 reference ({ACCURACY_SHAPE}, {cfg.dtype}): done")
            for shape in cfg.shapes:
                progress.update(task, description=f"{shape}: inputs and GEMM floor")
                problem = make_problem(shape, cfg.torch_dtype, device, cfg.loss, seq_len=cfg.seq_len,
                                       seed=cfg.seed, data=cfg.data, target_entropy=cfg.target_entropy)
                floor = measure.measure_floor(problem.hidden, problem.weight, repeats=max(3, cfg.repeats))
                oracle = RowOracle(problem)
                batch = {**problem.info(), "oracle_rows": len(oracle.rows)}
                report["batches"].append(batch)
                report["floors"].append(floor)
                console.print(f"{shape}: {batch['seqs']} x {batch['seq_len']} tokens, mean entropy "
                              f"{problem.mean_entropy:.2f} nats; 4-GEMM floor {floor['floor_ms']['fwd_bwd']:.1f} ms "
                              f"({floor['tflops']:.2f} TFLOP/s)")
                for impl in impls:
                    progress.update(task, description=f"{impl.display} {shape}")
                    row = run_case(impl, problem, cfg, device, anchors, oracle, floor)
                    report["results"].append(row)
                    progress.advance(task)
                    done = int(progress.tasks[0].completed)
                    console.print(f"[{done:>{len(str(total))}}/{total}] {impl.display:<28} {shape} ... "
                                  f"{_case_line(row)}  ({time.perf_counter() - started:.0f} s elapsed)")
                    if on_row is not None:
                        on_row(finished(interrupted=True))
                del problem, oracle
                _free(device)
    except KeyboardInterrupt:
        console.print("\ninterrupted (Ctrl-C): reporting the rows finished so far")
        return finished(interrupted=True)
    return finished(interrupted=False)
