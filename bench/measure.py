"""How the benchmark measures: timers and their statistics, peak memory above the inputs,
the GEMM floor, and the run-time estimate made from the floor GEMM before a run starts.

Timing
    One timed repeat runs the forward (``step()``), then the backward
    (``torch.autograd.grad(loss, inputs)``), and records three marks: start, end of forward,
    end of backward. ``fwd = m1 - m0``, ``bwd = m2 - m1``, ``fwd+bwd = m2 - m0``: the forward
    and backward of the *same* iteration, with no host synchronisation between them on CUDA.
    CUDA: ``torch.cuda.Event(enable_timing=True)`` marks (GPU time), one synchronisation at the
    end of each repeat. CPU: ``time.perf_counter()`` (the work is synchronous). Warm-up repeats
    run first and are not recorded. Each measurement keeps its samples, median, min, max and
    its *spread*: the inter-quartile range over the median (robust to one pre-empted repeat).

Peak memory above the inputs (what the loss itself costs)
    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
    ``memory_allocated`` before the step. Exact for PyTorch tensors; the caching allocator's
    reserve and the CUDA context are not counted.
    CPU (Linux): the process's resident-set high-water mark. Before the step, freed heap memory
    is returned to the OS (``malloc_trim(0)``) and the high-water mark is reset to the current
    RSS (``echo 5 > /proc/self/clear_refs``); the peak is ``VmHWM`` after the step minus
    ``VmRSS`` before it. This sees every allocation (torch's CPU allocator has no statistics),
    at page granularity, including a few MiB of Python objects. Without ``/proc/self/clear_refs``
    or glibc, CPU memory is reported as unavailable.

The GEMM floor (measured in the same run, same device and dtype, plain ``torch.matmul``)
    ``logits``: ``h [N, D] @ W.T``; ``grad_hidden``: ``dZ [N, V] @ W``; ``grad_weight``:
    ``dZ.T [V, N] @ h``; each ``2 N D V`` FLOPs. Forward = 1 GEMM; backward with recomputation
    = 3 GEMMs; forward+backward = 4 GEMMs. An implementation's *floor ratio* is its time over
    the 4-GEMM floor; its *TFLOP/s* is the 4-GEMM model's FLOP count over its time, whatever it
    executes. Its *own floor* is the GEMMs it must do: 4 when it recomputes the logits in
    backward, 3 when it keeps them (materialised, or gradients formed in the forward).

The estimate
    Before a run, a small GEMM at the run's D and dtype, one elementwise pass over fp32 values
    and a tiny GEMM (latency) give this device's rates; the run's time is modelled from them
    (see :func:`estimate_run`). It is rough (a factor of two either way, more on a busy shared
    machine): it exists to refuse shapes that would take hours, not to predict results.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from .config import CALIBRATION_TOKENS, Shape

# --- timing -----------------------------------------------------------------------------------------

# a measurement whose inter-quartile range exceeds this share of its median is flagged noisy
NOISY_SPREAD = 0.10


@dataclass(frozen=True)
class Stats:
    """Median, min, max and spread of repeated measurements, in milliseconds."""

    median: float
    min: float
    max: float
    samples: tuple[float, ...]

    @classmethod
    def of(cls, samples: Sequence[float]) -> "Stats":
        if not samples:
            raise ValueError("no samples")
        return cls(statistics.median(samples), min(samples), max(samples), tuple(samples))

    @property
    def spread(self) -> float:
        """Inter-quartile range over the median (0 for fewer than two samples)."""
        if len(self.samples) < 2 or self.median <= 0:
            return 0.0
        q1, _, q3 = statistics.quantiles(self.samples, n=4, method="inclusive")
        return (q3 - q1) / self.median

    def as_dict(self) -> dict:
        return {"median": self.median, "min": self.min, "max": self.max, "spread": self.spread,
                "samples": list(self.samples)}


class Marks:
    """Records time marks on one device; :meth:`elapsed_ms` gives the gaps between them."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks.append(event)
        else:
            self._marks.append(time.perf_counter())

    def elapsed_ms(self) -> list[float]:
        """Milliseconds between consecutive marks (synchronises on CUDA)."""
        if self.cuda:
            self._marks[-1].synchronize()
            return [a.elapsed_time(b) for a, b in zip(self._marks, self._marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self._marks, self._marks[1:])]


def timer_name(device: torch.device) -> str:
    return "cuda-events" if device.type == "cuda" else "time.perf_counter"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class StepTimes:
    fwd: Stats
    bwd: Stats
    fwd_bwd: Stats


def time_fwd_bwd(forward: Callable[[], object], backward: Callable[[object], object],
                 device: torch.device, repeats: int) -> StepTimes:
    """Time ``repeats`` forward+backward iterations (after the caller's warm-up)."""
    fwd, bwd, both = [], [], []
    for _ in range(repeats):
        synchronize(device)
        marks = Marks(device)
        marks.mark()
        out = forward()
        marks.mark()
        grads = backward(out)
        marks.mark()
        t_fwd, t_bwd = marks.elapsed_ms()
        del out, grads
        fwd.append(t_fwd)
        bwd.append(t_bwd)
        both.append(t_fwd + t_bwd)
    return StepTimes(Stats.of(fwd), Stats.of(bwd), Stats.of(both))


def time_op(op: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> Stats:
    """Times of a single operation (the GEMM floor, the estimate's rates)."""
    for _ in range(warmup):
        op()
    samples = []
    for _ in range(repeats):
        synchronize(device)
        marks = Marks(device)
        marks.mark()
        op()
        marks.mark()
        samples.append(marks.elapsed_ms()[0])
    return Stats.of(samples)


# --- peak memory ------------------------------------------------------------------------------------

_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _status_kib(field: str) -> int:
    with open(_STATUS) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in {_STATUS}")


def cpu_memory_supported() -> str | None:
    """None when the CPU measure works here, else the reason it does not."""
    libc = _libc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return "no glibc malloc_trim"
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        _status_kib("VmHWM")
    except OSError as exc:
        return f"cannot reset the RSS high-water mark ({exc})"
    return None


def memory_method(device: torch.device) -> str:
    """One line saying how peak memory is measured on ``device``."""
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated() - memory_allocated() before the step"
    reason = cpu_memory_supported()
    if reason:
        return f"unavailable on this CPU host: {reason}"
    return "process VmHWM - VmRSS before the step (after malloc_trim and clear_refs=5)"


class PeakMemory:
    """Context manager: ``with PeakMemory(device) as pm: step()`` then ``pm.peak_bytes``.

    ``peak_bytes`` is None where the measure is unavailable.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes: int | None = None
        self._base = 0
        self._cpu_ok = device.type == "cuda" or cpu_memory_supported() is None

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self._cpu_ok:
            _libc().malloc_trim(0)
            with open(_CLEAR_REFS, "w") as f:
                f.write("5")
            self._base = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = max(torch.cuda.max_memory_allocated(self.device) - self._base, 0)
        elif self._cpu_ok:
            self.peak_bytes = max(_status_kib("VmHWM") * 1024 - self._base, 0)


def available_bytes(device: torch.device) -> int | None:
    """Memory free for new allocations on ``device`` (None if unknown)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# --- the GEMM floor ---------------------------------------------------------------------------------

def flops(shape: Shape) -> dict[str, float]:
    """FLOP counts of the floor model for ``fwd``, ``bwd`` and ``fwd_bwd``."""
    gemm = 2.0 * shape.n * shape.d * shape.v
    return {"fwd": gemm, "bwd": 3 * gemm, "fwd_bwd": 4 * gemm}


@dataclass(frozen=True)
class Floor:
    shape: Shape
    logits: Stats
    grad_hidden: Stats
    grad_weight: Stats

    @property
    def ms(self) -> dict[str, float]:
        fwd = self.logits.median
        bwd = self.logits.median + self.grad_hidden.median + self.grad_weight.median
        return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}

    def gemms_ms(self, gemms: int) -> float:
        """Forward+backward floor of an implementation that does ``gemms`` GEMMs (3 or 4)."""
        if gemms not in (3, 4):
            raise ValueError(f"an exact LM-head loss does 3 or 4 GEMMs, got {gemms}")
        return (gemms - 2) * self.logits.median + self.grad_hidden.median + self.grad_weight.median

    def tflops(self) -> float:
        """Achieved TFLOP/s of the 4 GEMMs."""
        return flops(self.shape)["fwd_bwd"] / (self.ms["fwd_bwd"] * 1e-3) / 1e12

    def as_dict(self) -> dict:
        return {
            "n": self.shape.n, "d": self.shape.d, "v": self.shape.v,
            "gemm_ms": {"logits": self.logits.as_dict(), "grad_hidden": self.grad_hidden.as_dict(),
                        "grad_weight": self.grad_weight.as_dict()},
            "floor_ms": self.ms,
            "tflops": self.tflops(),
        }


def measure_floor(hidden: Tensor, weight: Tensor, *, warmup: int, repeats: int) -> Floor:
    """Time the three GEMM shapes on the benchmark's own operands (hidden [.., D], weight [V, D]).

    Allocates one ``[N, V]`` product in the input dtype, freed afterwards.
    """
    h = hidden.detach().reshape(-1, hidden.shape[-1])
    w = weight.detach()
    shape = Shape(h.shape[0], h.shape[1], w.shape[0])
    device = h.device
    z = torch.empty(shape.n, shape.v, device=device, dtype=h.dtype)
    with torch.no_grad():
        t_logits = time_op(lambda: torch.matmul(h, w.T, out=z), device, warmup, repeats)
        t_dh = time_op(lambda: z @ w, device, warmup, repeats)
        t_dw = time_op(lambda: z.T @ h, device, warmup, repeats)
    del z
    return Floor(shape, t_logits, t_dh, t_dw)


# --- the run-time estimate --------------------------------------------------------------------------

# Elementwise passes over fp32 N x V values per forward+backward iteration of an implementation
# (softmax, entropy and their gradients; on the CPU suite's shapes fused-pg's torch backend
# costs about 14 exp passes beyond its GEMMs, naive PyTorch about 8), and per batch construction (the logits pass that samples targets and measures entropy).
PASSES_PER_ITERATION = 15
PASSES_PER_BATCH = 8
# Small operations per iteration whose latency (launch, thread wake-up) adds to the work: what
# dominates tiny shapes, and any shape on a heavily shared CPU. The accuracy check costs about
# ACCURACY_ITERATIONS iterations per implementation.
OPS_PER_ITERATION = 40
ACCURACY_ITERATIONS = 4
# first-call compilation, seconds (torch.compile of the chunked baseline, Liger's compiled loss)
COMPILE_S = {"cpu": 20.0, "cuda": 40.0}
# the GEMM of the rate measurement: at most this many FLOPs, so that it stays short on a CPU;
# the elementwise pass: this many fp32 values, more than the caches hold (passes over N x V
# logits run at memory speed)
CALIBRATION_FLOPS = {"cpu": 1e9, "cuda": 2e11}
CALIBRATION_VALUES = {"cpu": 2**24, "cuda": 2**27}


@dataclass(frozen=True)
class Rates:
    """This device's speed at one D and dtype: GEMM FLOP/s, fp32 elementwise values/s, and the
    latency of one small operation (seconds)."""

    gemm_flops: float
    elementwise: float
    latency: float

    def gemm_s(self, shape: Shape) -> float:
        return 2.0 * shape.n * shape.d * shape.v / self.gemm_flops

    def pass_s(self, shape: Shape) -> float:
        return shape.n * shape.v / self.elementwise

    def iteration_s(self, shape: Shape) -> float:
        """One forward+backward: 4 GEMMs, the elementwise passes, the small operations."""
        return 4 * self.gemm_s(shape) + PASSES_PER_ITERATION * self.pass_s(shape) + OPS_PER_ITERATION * self.latency


def measure_rates(device: torch.device, dtype: torch.dtype, d: int, v: int) -> Rates:
    """One small GEMM ``[n0, d] @ [d, v0]`` and one ``exp`` over :data:`CALIBRATION_VALUES` fp32
    values (best of 3), and a ``[16, d] @ [d, 16]`` GEMM for the latency (median of 5: it follows
    the machine's load)."""
    v0 = min(v, 4096 if device.type == "cpu" else 32768)
    n0 = int(max(16, min(4096, CALIBRATION_FLOPS[device.type] // (2 * d * v0))))
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n0, d, device=device, generator=gen).to(dtype)
    b = torch.randn(d, v0, device=device, generator=gen).to(dtype)
    z = torch.full((CALIBRATION_VALUES[device.type],), 0.5, device=device)
    with torch.no_grad():
        t_gemm = time_op(lambda: a @ b, device, warmup=1, repeats=3).min
        t_pass = time_op(lambda: torch.exp(z), device, warmup=1, repeats=3).min
        t_small = time_op(lambda: a[:16] @ b[:, :16], device, warmup=1, repeats=5).median
    return Rates(gemm_flops=2.0 * n0 * d * v0 / max(t_gemm * 1e-3, 1e-9),
                 elementwise=z.numel() / max(t_pass * 1e-3, 1e-9), latency=t_small * 1e-3)


def estimate_run(shapes: Sequence[Shape], impl_keys: Sequence[str], rates: dict[tuple[int, int], Rates], *,
                 device_type: str, warmup: int, repeats: int, accuracy: bool = True) -> dict:
    """Modelled seconds of a run: per shape the batch, the floor and every implementation.

    Per forward+backward iteration: 4 GEMMs, :data:`PASSES_PER_ITERATION` elementwise passes and
    :data:`OPS_PER_ITERATION` small-operation latencies; iterations per implementation: the first
    call (the first warm-up iteration), the rest of the warm-up, the timed repeats. Building a
    batch of realistic data also solves its entropy on :data:`bench.config.CALIBRATION_TOKENS`
    tokens (about 60 passes over their logits). ``rates`` maps (D, V) to :func:`measure_rates`.
    """
    iterations = warmup + repeats
    per_shape = []
    for shape in shapes:
        r = rates[(shape.d, shape.v)]
        gemm = r.gemm_s(shape)
        calibration = Shape(min(shape.n, CALIBRATION_TOKENS), shape.d, shape.v)
        batch = gemm + PASSES_PER_BATCH * r.pass_s(shape) + 60 * r.pass_s(calibration) + OPS_PER_ITERATION * r.latency
        floor = 3 * (gemm + r.latency) * (1 + max(3, repeats))
        impls = len(impl_keys) * iterations * r.iteration_s(shape)
        per_shape.append({"n": shape.n, "d": shape.d, "v": shape.v, "gemm_s": gemm, "seconds": batch + floor + impls})
    fixed = COMPILE_S[device_type] * sum(k in ("compiled", "liger-chunked") for k in impl_keys)
    if accuracy and shapes:
        fixed += len(impl_keys) * ACCURACY_ITERATIONS * OPS_PER_ITERATION * max(r.latency for r in rates.values())
    return {"seconds": sum(p["seconds"] for p in per_shape) + fixed, "per_shape": per_shape,
            "gemm_tflops": {f"{d}x{v}": r.gemm_flops / 1e12 for (d, v), r in rates.items()},
            "model": f"per iteration 4 GEMMs + {PASSES_PER_ITERATION} fp32 elementwise passes over N x V + "
                     f"{OPS_PER_ITERATION} small-op latencies; {iterations} iterations per implementation and "
                     "shape, plus the floor, the batch, the accuracy check and compilation"}


def memory_needed(shape: Shape, dtype: torch.dtype) -> int:
    """Bytes a shape needs before any implementation runs: inputs, their fp32 gradients, the
    floor's ``[N, V]`` product in the input dtype."""
    item = torch.empty((), dtype=dtype).element_size()
    n, d, v = shape.n, shape.d, shape.v
    return (n * d + v * d) * (item + 4) + n * v * item
