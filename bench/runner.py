"""Runs a :class:`~bench.config.BenchConfig`: the accuracy check, then per shape the batch, the
GEMM floor and every implementation (loss check, warm-up, memory, timing). Returns the report
dict that :mod:`bench.report` prints and writes.

Per implementation and shape:

1. the first call (forward + backward; compilation and autotuning happen here, its wall
   time is reported as ``first_call_s``) gives the loss, which is compared with fused-pg's
   torch backend on the same inputs and the same loss options (the *loss check*), and the
   per-token log-probs and entropies where the implementation exposes them, compared with the
   fp64 oracle on :data:`ORACLE_ROWS` valid tokens of the batch (``logprobs_max_abs``,
   ``entropy_max_abs``: a token's values depend on its own row only, so a sample of rows is
   checked exactly at any N);
2. the remaining warm-up iterations;
3. ``repeats`` timed iterations, over which the peak memory above the inputs is taken; the
   row is flagged ``noisy`` when the spread of its forward+backward times exceeds
   :data:`bench.measure.NOISY_SPREAD`, and ``below-floor`` when its median beats its own GEMM
   floor (a timing to distrust, or an implementation skipping work).

Accuracy: on one small shape (:data:`ACCURACY_SHAPE`, inputs of a normal batch in the
benchmark dtype and device), each implementation's loss, log-probs, entropies and gradients
against the fp64 oracle (:func:`fused_pg.reference.repo_loss_ref`) run on the *same rounded
values* on the CPU, for the loss it actually computes (:meth:`bench.impls.Impl.effective_loss`):
``loss_abs``, ``logprobs_max_abs`` and ``entropy_max_abs`` over valid tokens (when exposed),
``grad_hidden_max_rel`` and ``grad_weight_max_rel`` (``max |g - g_ref| / max |g_ref|``).

Failures do not stop the run: a CUDA out-of-memory is recorded as ``oom``, any other
exception as ``error`` with its message, and an implementation that cannot run here
(missing peer, no GPU) as ``skipped`` with its reason. Ctrl-C stops it: the report then holds
the rows finished so far and ``interrupted: true``.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from fused_pg.reference.head import logprobs_entropy_ref
from fused_pg.reference.loss import repo_loss_ref

from . import measure, report as report_mod
from .config import BenchConfig, LossSpec, Shape, device_name, pick_device
from .impls import Impl, build_impls, fused_loss
from .problem import Problem, StepOutput, make_problem

Log = Callable[..., None]

# loss check: |L - L_anchor| <= tol * max(1, |L_anchor|)
LOSS_TOL = {"fp32": 1e-4, "bf16": 5e-3, "fp16": 5e-3}
# on CPU, skip a materialising implementation whose logits would take more than this share
# of the available memory (an OOM on CPU kills the process instead of raising)
CPU_MEMORY_SHARE = 0.7
# odd V: not a multiple of any tile size, exercises the masked tails
# (D a multiple of 128: verl's kernel needs it)
ACCURACY_SHAPE = Shape(n=256, d=128, v=1531)
ACCURACY_SEQ_LEN = 64
# valid tokens per benchmark batch whose log-probs and entropies are checked against the fp64 oracle
ORACLE_ROWS = 64


@dataclass
class CaseResult:
    """One implementation on one shape."""

    impl: Impl
    shape: Shape
    loss_spec: LossSpec
    notes: tuple[str, ...]
    status: str = "ok"                  # ok | oom | error | skipped
    reason: str | None = None
    loss: float | None = None
    anchor_loss: float | None = None
    loss_ok: bool | None = None
    first_call_s: float | None = None
    times: measure.StepTimes | None = None
    peak_bytes: int | None = None
    rows: int | None = None             # hidden rows swept, when fewer than N
    logprobs_err: float | None = None   # max |logp - fp64 oracle| over the sampled rows
    entropy_err: float | None = None

    def as_dict(self, floor: measure.Floor | None, tol: float) -> dict:
        notes = list(self.notes)
        if self.rows is not None:
            notes.append(f"sweeps only the {self.rows} unmasked of {self.shape.n} rows")
        d = {
            "impl": self.impl.name, "key": self.impl.key, "label": self.impl.display,
            "family": self.impl.family, "precision": self.impl.precision,
            "n": self.shape.n, "d": self.shape.d, "v": self.shape.v,
            "status": self.status, "reason": self.reason, "notes": notes,
            "computes": self.loss_spec.as_dict(), "grads_in_forward": self.impl.grads_in_forward,
            "loss": self.loss, "anchor_loss": self.anchor_loss, "loss_ok": self.loss_ok, "loss_tol": tol,
            "first_call_s": self.first_call_s, "peak_mem_bytes": self.peak_bytes,
            "fwd_ms": None, "bwd_ms": None, "fwd_bwd_ms": None, "tflops": None, "floor_ratio": None,
            "gemms": self.impl.gemms, "rows_swept": self.rows if self.rows is not None else self.shape.n,
            "own_floor_ms": None, "flags": [],
            "logprobs_max_abs": self.logprobs_err, "entropy_max_abs": self.entropy_err,
        }
        if self.times is not None:
            t = {"fwd": self.times.fwd, "bwd": self.times.bwd, "fwd_bwd": self.times.fwd_bwd}
            d.update(fwd_ms=t["fwd"].as_dict(), bwd_ms=t["bwd"].as_dict(), fwd_bwd_ms=t["fwd_bwd"].as_dict())
            fl = measure.flops(self.shape)
            d["tflops"] = {k: fl[k] / (s.median * 1e-3) / 1e12 if s.median > 0 else None for k, s in t.items()}
            if self.times.fwd_bwd.spread > measure.NOISY_SPREAD:
                d["flags"].append("noisy")
            if floor is not None:
                d["floor_ratio"] = {k: s.median / floor.ms[k] for k, s in t.items()}
                d["own_floor_ms"] = floor.gemms_ms(self.impl.gemms) * d["rows_swept"] / self.shape.n
                if self.times.fwd_bwd.median < d["own_floor_ms"]:
                    d["flags"].append("below-floor")
        return d


class Progress:
    """``[ k/total]`` prefixes on one line per case (readable on a terminal and in logs)."""

    def __init__(self, total: int, log: Log):
        self.total, self.done, self.log = total, 0, log
        self.t0 = time.perf_counter()

    def start(self, text: str) -> None:
        self.done += 1
        self.log(f"[{self.done:>{len(str(self.total))}}/{self.total}] {text} ...", end="", flush=True)

    def finish(self, text: str) -> None:
        self.log(f" {text}  ({time.perf_counter() - self.t0:.0f} s elapsed)", flush=True)


def resolve_impls(cfg: BenchConfig, device: torch.device) -> tuple[list[Impl], list[dict]]:
    """The implementations that can run here, and the skipped ones with their reasons."""
    runnable, skipped = [], []
    for key in cfg.impls:
        for impl in build_impls(key, cfg.precisions):
            reason = impl.check(device, cfg.torch_dtype)
            if reason is None:
                runnable.append(impl)
            else:
                skipped.append({"impl": impl.name, "label": impl.display, "reason": reason})
    return runnable, skipped


def estimate(cfg: BenchConfig, device: torch.device, impls: list[Impl]) -> dict:
    """:func:`bench.measure.estimate_run` for this configuration, with rates measured here."""
    rates = {(s.d, s.v): None for s in cfg.shapes}
    for d, v in rates:
        rates[(d, v)] = measure.measure_rates(device, cfg.torch_dtype, d, v)
    est = measure.estimate_run(cfg.shapes, [i.key for i in impls], rates, device_type=device.type,
                               warmup=cfg.warmup, repeats=cfg.repeats, accuracy=cfg.accuracy)
    est["memory_bytes"] = max((measure.memory_needed(s, cfg.torch_dtype) for s in cfg.shapes), default=0)
    est["available_bytes"] = measure.available_bytes(device)
    return est


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return text[:limit]


class Anchors:
    """fused-pg torch-backend losses per (shape, loss spec): the reference of the loss check."""

    def __init__(self):
        self._values: dict[tuple[Shape, LossSpec], float] = {}

    def seed(self, shape: Shape, spec: LossSpec, value: float) -> None:
        self._values.setdefault((shape, spec), value)

    def get(self, problem: Problem, spec: LossSpec) -> float:
        key = (problem.shape, spec)
        if key not in self._values:
            with torch.no_grad():
                self._values[key] = float(fused_loss(problem, spec, "torch").loss)
        return self._values[key]


@dataclass(frozen=True)
class RowOracle:
    """fp64 log-probs and entropies of a sample of a batch's valid tokens (flat indices)."""

    rows: Tensor        # [S] int64, on the batch's device
    logprobs: Tensor    # [S] fp64
    entropy: Tensor

    @classmethod
    def of(cls, problem: Problem, count: int = ORACLE_ROWS) -> "RowOracle":
        """The oracle on ``count`` valid tokens spread evenly over the batch (its rounded inputs)."""
        valid = problem.mask.reshape(-1).nonzero().squeeze(1)
        rows = valid[torch.linspace(0, len(valid) - 1, min(count, len(valid)), device=valid.device).long()]
        with torch.no_grad():
            h = problem.hidden.detach().reshape(-1, problem.shape.d)[rows]
            logp, ent = logprobs_entropy_ref(h, problem.weight.detach(), problem.targets.reshape(-1)[rows],
                                             dtype=torch.float64)
        return cls(rows, logp, ent)

    def errors(self, out: StepOutput) -> tuple[float | None, float | None]:
        """max |logp - oracle| and max |entropy - oracle| over the sampled tokens (None: not exposed)."""
        def err(values: Tensor | None, ref: Tensor) -> float | None:
            if values is None:
                return None
            return float((values.detach().reshape(-1)[self.rows].double() - ref).abs().max())
        return err(out.logprobs, self.logprobs), err(out.entropy, self.entropy)


def _iteration(step, inputs):
    out = step()
    return torch.autograd.grad(out.loss, inputs)


def run_case(impl: Impl, problem: Problem, spec: LossSpec, cfg: BenchConfig, device: torch.device,
             anchors: Anchors, oracle: RowOracle | None = None) -> CaseResult:
    """Loss check, warm-up, memory and timing of one implementation on one problem."""
    eff, notes = impl.effective_loss(spec)
    res = CaseResult(impl, problem.shape, eff, notes)
    if device.type == "cpu" and impl.logits_bytes_per_nv:
        need = impl.logits_bytes_per_nv * problem.shape.n * problem.shape.v
        avail = measure.available_bytes(device)
        if avail is not None and need > CPU_MEMORY_SHARE * avail:
            res.status = "skipped"
            res.reason = f"needs ~{need / 2**30:.1f} GiB of logits, {avail / 2**30:.1f} GiB available"
            return res
    inputs = problem.grad_inputs()
    tol = LOSS_TOL[cfg.dtype]
    try:
        step = impl.make(problem, eff)
        # 1. first call: compilation / autotuning, and the loss check
        t0 = time.perf_counter()
        out = step()
        grads = torch.autograd.grad(out.loss, inputs)
        measure.synchronize(device)
        res.first_call_s = time.perf_counter() - t0
        res.loss, res.rows = float(out.loss.detach()), out.rows
        if oracle is not None:
            res.logprobs_err, res.entropy_err = oracle.errors(out)
        del out, grads
        if impl.key == "fused-torch" and impl.precision == "native":
            anchors.seed(problem.shape, eff, res.loss)
        res.anchor_loss = anchors.get(problem, eff)
        res.loss_ok = abs(res.loss - res.anchor_loss) <= tol * max(1.0, abs(res.anchor_loss))
        # 2. warm-up
        for _ in range(cfg.warmup - 1):
            _iteration(step, inputs)
        # 3. memory and timing, over the same timed iterations
        backward = lambda o: torch.autograd.grad(o.loss, inputs)  # noqa: E731
        with measure.PeakMemory(device) as pm:
            res.times = measure.time_fwd_bwd(step, backward, device, cfg.repeats)
        res.peak_bytes = pm.peak_bytes
    except torch.cuda.OutOfMemoryError as exc:
        res.status, res.reason = "oom", _first_line(exc)
    except Exception as exc:  # noqa: BLE001 -- recorded, the run goes on
        res.status, res.reason = "error", _first_line(exc)
    finally:
        _free(device)
    return res


# --- accuracy against the fp64 oracle --------------------------------------------------------------

@dataclass(frozen=True)
class RefOutputs:
    loss: float
    logprobs: Tensor      # [B, T] fp64, CPU
    entropy: Tensor
    grad_hidden: Tensor   # [B, T, D]
    grad_weight: Tensor   # [V, D]


def reference_outputs(problem: Problem, spec: LossSpec) -> RefOutputs:
    """fp64 oracle on the problem's (rounded) inputs, on the CPU."""
    cpu = lambda t: None if t is None else t.detach().cpu()  # noqa: E731
    h = problem.hidden.detach().cpu().double().requires_grad_(True)
    w = problem.weight.detach().cpu().double().requires_grad_(True)
    out = repo_loss_ref(h, w, cpu(problem.targets), cpu(problem.advantages), cpu(problem.old_logprobs),
                        cpu(problem.mask), ref_logprobs=cpu(problem.ref_logprobs), dtype=torch.float64,
                        **spec.kwargs())
    gh, gw = torch.autograd.grad(out.loss, [h, w])
    return RefOutputs(float(out.loss.detach()), out.logprobs.detach(), out.entropy.detach(), gh, gw)


def _max_rel(got: Tensor, ref: Tensor) -> float:
    return float((got.detach().cpu().double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _max_abs_valid(got: Tensor | None, ref: Tensor, valid: Tensor) -> float | None:
    if got is None:
        return None
    diff = (got.detach().cpu().double().reshape(ref.shape) - ref).abs()
    return float(diff[valid].max())


def impl_errors(impl: Impl, problem: Problem, spec: LossSpec, ref: RefOutputs) -> dict:
    """Errors of one implementation (``spec`` is already its effective loss)."""
    out = impl.make(problem, spec)()
    gh, gw = torch.autograd.grad(out.loss, problem.grad_inputs())
    valid = problem.mask.cpu()
    return {
        "loss_abs": abs(float(out.loss.detach()) - ref.loss),
        "logprobs_max_abs": _max_abs_valid(out.logprobs, ref.logprobs, valid),
        "entropy_max_abs": _max_abs_valid(out.entropy, ref.entropy, valid),
        "grad_hidden_max_rel": _max_rel(gh, ref.grad_hidden),
        "grad_weight_max_rel": _max_rel(gw, ref.grad_weight),
    }


def run_accuracy(impls: list[Impl], cfg: BenchConfig, device: torch.device, log: Log) -> dict:
    """Max errors vs the fp64 reference on :data:`ACCURACY_SHAPE`."""
    problem = make_problem(ACCURACY_SHAPE, cfg.torch_dtype, device, cfg.loss, seq_len=ACCURACY_SEQ_LEN,
                           seed=cfg.seed + 1, data=cfg.data, target_entropy=cfg.target_entropy)
    refs: dict[LossSpec, RefOutputs] = {}
    rows = []
    log(f"accuracy vs fp64 reference ({ACCURACY_SHAPE}, {cfg.dtype}) ...", end="", flush=True)
    for impl in impls:
        eff, notes = impl.effective_loss(cfg.loss)
        row = {"impl": impl.name, "label": impl.display, "notes": list(notes), "status": "ok", "reason": None,
               "loss_abs": None, "logprobs_max_abs": None, "entropy_max_abs": None,
               "grad_hidden_max_rel": None, "grad_weight_max_rel": None}
        try:
            if eff not in refs:
                refs[eff] = reference_outputs(problem, eff)
            row.update(impl_errors(impl, problem, eff, refs[eff]))
        except Exception as exc:  # noqa: BLE001 -- recorded, the run goes on
            row["status"], row["reason"] = "error", _first_line(exc)
        rows.append(row)
        _free(device)
    log(" done", flush=True)
    shape = ACCURACY_SHAPE
    return {"shape": {"n": shape.n, "d": shape.d, "v": shape.v}, "dtype": cfg.dtype,
            "mean_entropy": problem.mean_entropy, "results": rows}


def loss_check_summary(cases: list[dict]) -> dict:
    checked = [c for c in cases if c["loss_ok"] is not None]
    diffs = [abs(c["loss"] - c["anchor_loss"]) for c in checked]
    return {
        "reference": "fused-pg torch backend, same inputs and loss options",
        "checked": len(checked),
        "all_agree": all(c["loss_ok"] for c in checked) if checked else None,
        "max_abs_diff": max(diffs) if diffs else None,
        "mismatches": [{"impl": c["impl"], "n": c["n"], "d": c["d"], "v": c["v"], "loss": c["loss"],
                        "anchor_loss": c["anchor_loss"]} for c in checked if not c["loss_ok"]],
    }


# --- the whole run ----------------------------------------------------------------------------------

def run(cfg: BenchConfig, log: Log = print, *, impls: list[Impl] | None = None,
        skipped: list[dict] | None = None, est: dict | None = None,
        on_row: Callable[[dict], None] | None = None) -> dict:
    """Run the whole benchmark; returns the report (see :mod:`bench.report` for its schema).

    ``impls``/``skipped`` come from :func:`resolve_impls` when not given; ``est`` (from
    :func:`estimate`) is recorded as given. A KeyboardInterrupt ends the run early: the report
    then holds what finished, with ``interrupted: true``. ``on_row`` receives the report of the
    rows finished so far (``interrupted: true`` until the end) after every row.
    """
    device = pick_device(cfg.device)
    started = time.perf_counter()
    if impls is None:
        impls, skipped = resolve_impls(cfg, device)
        for s in skipped:
            log(f"skip {s['label']}: {s['reason']}", flush=True)
    log(f"fused-pg bench: {device_name(device)}, {cfg.dtype}, loss: {cfg.loss.describe()}")
    log(f"timer: {measure.timer_name(device)}; memory: {measure.memory_method(device)}", flush=True)
    report = {
        "schema": report_mod.SCHEMA, "device": report_mod.device_info(device), "versions": report_mod.versions(),
        "git": report_mod.git_commit(), "created": report_mod.now_iso(), "config": cfg.as_dict(),
        "timer": measure.timer_name(device), "memory_method": measure.memory_method(device),
        "skipped": list(skipped or []), "estimate": est, "accuracy": None, "batches": [], "floors": [],
        "results": [], "interrupted": False,
    }
    anchors = Anchors()
    progress = Progress(len(cfg.shapes) * len(impls), log)
    tol = LOSS_TOL[cfg.dtype]
    try:
        if cfg.accuracy and impls:
            report["accuracy"] = run_accuracy(impls, cfg, device, log)
        for shape in cfg.shapes:
            log(f"{shape}: inputs and GEMM floor ...", end="", flush=True)
            problem = make_problem(shape, cfg.torch_dtype, device, cfg.loss, seq_len=cfg.seq_len, seed=cfg.seed,
                                   data=cfg.data, target_entropy=cfg.target_entropy)
            floor = measure.measure_floor(problem.hidden, problem.weight, warmup=1, repeats=max(3, cfg.repeats))
            oracle = RowOracle.of(problem)
            report["batches"].append({**problem.info(), "oracle_rows": len(oracle.rows)})
            report["floors"].append(floor.as_dict())
            log(f" {problem.num_seqs} x {problem.seq_len} tokens, mean entropy {problem.mean_entropy:.2f} nats;"
                f" 4-GEMM floor {floor.ms['fwd_bwd']:.1f} ms ({floor.tflops():.2f} TFLOP/s)", flush=True)
            for impl in impls:
                progress.start(f"{impl.display:<28} {shape}")
                res = run_case(impl, problem, cfg.loss, cfg, device, anchors, oracle)
                case = res.as_dict(floor, tol)
                report["results"].append(case)
                progress.finish(_case_line(case))
                if on_row is not None:
                    on_row(_finished(dict(report), started, interrupted=True))
            del problem, oracle
            _free(device)
    except KeyboardInterrupt:
        report["interrupted"] = True
        log("\ninterrupted (Ctrl-C): reporting the rows finished so far", flush=True)
    return _finished(report, started, report["interrupted"])


def _finished(report: dict, started: float, interrupted: bool) -> dict:
    report.update(loss_check=loss_check_summary(report["results"]), wall_s=time.perf_counter() - started,
                  interrupted=interrupted)
    return report


def _case_line(case: dict) -> str:
    if case["status"] != "ok":
        return f"{case['status'].upper()}: {case['reason']}"
    mem = case["peak_mem_bytes"]
    mem_txt = f", peak {mem / 2**20:.0f} MiB" if mem is not None else ""
    check = "" if case["loss_ok"] else "  LOSS MISMATCH"
    flags = "".join(f"  [{f}]" for f in case["flags"])
    return f"fwd+bwd {case['fwd_bwd_ms']['median']:.1f} ms{mem_txt}{check}{flags}"
