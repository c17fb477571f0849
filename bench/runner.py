"""Runs a :class:`~bench.config.BenchConfig`: accuracy check, then per shape the GEMM floor
and every implementation (loss check, warm-up, memory, timing). Returns the report dict
that :mod:`bench.report` prints and writes.

Per implementation and shape:

1. the first call (forward + backward; compilation and autotuning happen here, its wall
   time is reported as ``first_call_s``) gives the loss, which is compared with fused-pg's
   torch backend on the same inputs and the same loss options (the *loss check*);
2. the remaining warm-up iterations;
3. peak memory above the inputs (:mod:`bench.memory`): on CPU in one extra untimed
   iteration, on CUDA over the timed iterations;
4. ``repeats`` timed iterations (:mod:`bench.timing`).

Failures do not stop the run: a CUDA out-of-memory is recorded as ``oom``, any other
exception as ``error`` with its message, and an implementation that cannot run here
(missing peer, no GPU) as ``skipped`` with its reason.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Callable

import torch

import fused_pg

from . import accuracy, env, memory
from .config import BenchConfig, LossSpec, Shape
from .floor import Floor, flops, measure_floor
from .impls import Impl, build_impls
from .problem import Problem, make_problem
from .report import SCHEMA
from .timing import StepTimes, synchronize, time_fwd_bwd, timer_name

Log = Callable[..., None]

# loss check: |L - L_anchor| <= tol * max(1, |L_anchor|)
LOSS_TOL = {"fp32": 1e-4, "bf16": 5e-3, "fp16": 5e-3}
# on CPU, skip a materialising implementation whose logits would take more than this share
# of the available memory (an OOM on CPU kills the process instead of raising)
CPU_MEMORY_SHARE = 0.7


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
    times: StepTimes | None = None
    peak_bytes: int | None = None

    def as_dict(self, floor: Floor | None, tol: float) -> dict:
        d = {
            "impl": self.impl.name, "key": self.impl.key, "label": self.impl.display,
            "family": self.impl.family, "precision": self.impl.precision,
            "n": self.shape.n, "d": self.shape.d, "v": self.shape.v,
            "status": self.status, "reason": self.reason, "notes": list(self.notes),
            "computes": self.loss_spec.as_dict(), "grads_in_forward": self.impl.grads_in_forward,
            "loss": self.loss, "anchor_loss": self.anchor_loss, "loss_ok": self.loss_ok, "loss_tol": tol,
            "first_call_s": self.first_call_s, "peak_mem_bytes": self.peak_bytes,
            "fwd_ms": None, "bwd_ms": None, "fwd_bwd_ms": None, "tflops": None, "floor_ratio": None,
        }
        if self.times is not None:
            t = {"fwd": self.times.fwd, "bwd": self.times.bwd, "fwd_bwd": self.times.fwd_bwd}
            d.update(fwd_ms=t["fwd"].as_dict(), bwd_ms=t["bwd"].as_dict(), fwd_bwd_ms=t["fwd_bwd"].as_dict())
            fl = flops(self.shape)
            d["tflops"] = {k: fl[k] / (s.median * 1e-3) / 1e12 if s.median > 0 else None for k, s in t.items()}
            if floor is not None:
                d["floor_ratio"] = {k: s.median / floor.ms[k] for k, s in t.items()}
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


def resolve_impls(cfg: BenchConfig, device: torch.device, log: Log) -> tuple[list[Impl], list[dict]]:
    """The implementations that can run here, and the skipped ones with their reasons."""
    runnable, skipped = [], []
    for key in cfg.impls:
        for impl in build_impls(key, cfg.precisions):
            reason = impl.check(device, cfg.torch_dtype)
            if reason is None:
                runnable.append(impl)
            else:
                skipped.append({"impl": impl.name, "label": impl.display, "reason": reason})
                log(f"skip {impl.display}: {reason}", flush=True)
    return runnable, skipped


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
                out = fused_pg.repo_loss(
                    problem.hidden, problem.weight, problem.targets, problem.advantages,
                    problem.old_logprobs, problem.mask, ref_logprobs=problem.ref_logprobs,
                    eps_low=spec.eps_low, eps_high=spec.eps_high, repo=spec.repo, repo_coef=spec.repo_coef,
                    kl_coef=spec.kl_coef, kl_estimator="k3", entropy_coef=spec.entropy_coef,
                    backend="torch", validate=False)
            self._values[key] = float(out.loss)
        return self._values[key]


def _iteration(step, inputs):
    out = step()
    return torch.autograd.grad(out.loss, inputs)


def run_case(impl: Impl, problem: Problem, spec: LossSpec, cfg: BenchConfig, device: torch.device,
             anchors: Anchors) -> CaseResult:
    """Loss check, warm-up, memory and timing of one implementation on one problem."""
    eff, notes = impl.effective_loss(spec)
    res = CaseResult(impl, problem.shape, eff, notes)
    if device.type == "cpu" and impl.logits_bytes_per_nv:
        need = impl.logits_bytes_per_nv * problem.shape.n * problem.shape.v
        avail = memory.available_bytes(device)
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
        synchronize(device)
        res.first_call_s = time.perf_counter() - t0
        res.loss = float(out.loss.detach())
        del out, grads
        if impl.key == "fused-torch" and impl.precision == "native":
            anchors.seed(problem.shape, eff, res.loss)
        res.anchor_loss = anchors.get(problem, eff)
        res.loss_ok = abs(res.loss - res.anchor_loss) <= tol * max(1.0, abs(res.anchor_loss))
        # 2. warm-up
        for _ in range(cfg.warmup - 1):
            _iteration(step, inputs)
        # 3-4. memory and timing
        if device.type == "cuda":
            with memory.PeakMemory(device) as pm:
                res.times = time_fwd_bwd(step, lambda o: torch.autograd.grad(o.loss, inputs), device, cfg.repeats)
        else:
            with memory.PeakMemory(device) as pm:
                _iteration(step, inputs)
            res.times = time_fwd_bwd(step, lambda o: torch.autograd.grad(o.loss, inputs), device, cfg.repeats)
        res.peak_bytes = pm.peak_bytes
    except torch.cuda.OutOfMemoryError as exc:
        res.status, res.reason = "oom", _first_line(exc)
    except Exception as exc:  # noqa: BLE001 -- recorded, the run goes on
        res.status, res.reason = "error", _first_line(exc)
    finally:
        _free(device)
    return res


def run_accuracy(impls: list[Impl], cfg: BenchConfig, device: torch.device, log: Log) -> dict:
    """Max errors vs the fp64 reference on :data:`bench.accuracy.ACCURACY_SHAPE`."""
    problem = accuracy.accuracy_problem(cfg.torch_dtype, device, cfg.loss, cfg.seed)
    refs: dict[LossSpec, accuracy.RefOutputs] = {}
    rows = []
    log(f"accuracy vs fp64 reference ({accuracy.ACCURACY_SHAPE}, {cfg.dtype}) ...", end="", flush=True)
    for impl in impls:
        eff, notes = impl.effective_loss(cfg.loss)
        row = {"impl": impl.name, "label": impl.display, "notes": list(notes), "status": "ok", "reason": None,
               "loss_abs": None, "logprobs_max_abs": None, "entropy_max_abs": None,
               "grad_hidden_max_rel": None, "grad_weight_max_rel": None}
        try:
            if eff not in refs:
                refs[eff] = accuracy.reference_outputs(problem, eff)
            row.update(accuracy.impl_errors(impl, problem, eff, refs[eff]))
        except Exception as exc:  # noqa: BLE001 -- recorded, the run goes on
            row["status"], row["reason"] = "error", _first_line(exc)
        rows.append(row)
        _free(device)
    log(" done", flush=True)
    shape = accuracy.ACCURACY_SHAPE
    return {"shape": {"n": shape.n, "d": shape.d, "v": shape.v}, "dtype": cfg.dtype, "results": rows}


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


def run(cfg: BenchConfig, log: Log = print) -> dict:
    """Run the whole benchmark; returns the report (see :mod:`bench.report` for its schema)."""
    device = env.pick_device(cfg.device)
    started = time.perf_counter()
    log(f"fused-pg bench: {env.device_name(device)}, {cfg.dtype}, loss: {cfg.loss.describe()}")
    log(f"timer: {timer_name(device)}; memory: {memory.method(device)}", flush=True)
    impls, skipped = resolve_impls(cfg, device, log)
    report = {
        "schema": SCHEMA, "device": env.device_info(device), "versions": env.versions(), "git": env.git_commit(),
        "created": env.now_iso(), "config": cfg.as_dict(), "timer": timer_name(device),
        "memory_method": memory.method(device), "skipped": skipped,
    }
    report["accuracy"] = run_accuracy(impls, cfg, device, log) if cfg.accuracy and impls else None
    anchors = Anchors()
    progress = Progress(len(cfg.shapes) * len(impls), log)
    floors, cases = [], []
    tol = LOSS_TOL[cfg.dtype]
    for shape in cfg.shapes:
        log(f"{shape}: inputs and GEMM floor ...", end="", flush=True)
        problem = make_problem(shape, cfg.torch_dtype, device, cfg.loss, seq_len=cfg.seq_len, seed=cfg.seed)
        floor = measure_floor(problem.hidden, problem.weight, warmup=1, repeats=max(3, cfg.repeats))
        floors.append(floor.as_dict())
        log(f" 4-GEMM floor {floor.ms['fwd_bwd']:.1f} ms ({floor.tflops():.2f} TFLOP/s)", flush=True)
        for impl in impls:
            progress.start(f"{impl.display:<28} {shape}")
            res = run_case(impl, problem, cfg.loss, cfg, device, anchors)
            case = res.as_dict(floor, tol)
            cases.append(case)
            progress.finish(_case_line(case))
        del problem
        _free(device)
    report.update(floors=floors, results=cases, loss_check=loss_check_summary(cases),
                  wall_s=time.perf_counter() - started)
    return report


def _case_line(case: dict) -> str:
    if case["status"] != "ok":
        return f"{case['status'].upper()}: {case['reason']}"
    mem = case["peak_mem_bytes"]
    mem_txt = f", peak {mem / 2**20:.0f} MiB" if mem is not None else ""
    check = "" if case["loss_ok"] else "  LOSS MISMATCH"
    return f"fwd+bwd {case['fwd_bwd_ms']['median']:.1f} ms{mem_txt}{check}"
