"""How the benchmark measures (docs/benchmark.md): one clock, the peak memory above the inputs
(the probe tests/test_memory.py uses too), the GEMM floor, and the run-time estimate.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import statistics
from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.utils.benchmark import timer as clock

from .config import Shape

NOISY_SPREAD = 0.10  # a measurement whose inter-quartile range exceeds this share of its median


def time_ms(fn: Callable[[], object]) -> float:
    """Milliseconds of one call of ``fn`` (the device drained before and after)."""
    start = clock()
    fn()
    return (clock() - start) * 1e3


def stats(samples: Sequence[float]) -> dict:
    """Median, min, max, spread (inter-quartile range / median) and the samples (ms)."""
    median = statistics.median(samples)
    spread = 0.0
    if len(samples) > 1 and median > 0:
        q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
        spread = (q3 - q1) / median
    return {"median": median, "min": min(samples), "max": max(samples), "spread": spread, "samples": list(samples)}


def time_fwd_bwd(forward: Callable[[], object], backward: Callable[[object], object], repeats: int) -> dict:
    """``{"fwd", "bwd", "fwd_bwd"}`` statistics of ``repeats`` repeats (after the caller's warm-up):
    three clock readings per repeat, before the forward, between forward and backward, after."""
    marks = []
    for _ in range(repeats):
        t0 = clock()
        out = forward()
        t1 = clock()
        backward(out)
        marks.append((t0, t1, clock()))
        del out
    return {k: stats([(b - a) * 1e3 for a, b in pairs]) for k, pairs in (
        ("fwd", [(t0, t1) for t0, t1, _ in marks]), ("bwd", [(t1, t2) for _, t1, t2 in marks]),
        ("fwd_bwd", [(t0, t2) for t0, _, t2 in marks]))}


# --- peak memory above the inputs ------------------------------------------------------------------

def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _reset_high_water_mark() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def cpu_memory_supported() -> str | None:
    """None when the CPU probe works here, else the reason it does not."""
    if not hasattr(_libc(), "malloc_trim"):
        return "no glibc malloc_trim"
    try:
        _reset_high_water_mark()
        _status_bytes("VmHWM")
    except (OSError, StopIteration) as exc:
        return f"cannot reset the RSS high-water mark ({exc!r})"
    return None


def memory_method(device: torch.device) -> str:
    """One line saying how peak memory is measured on ``device``."""
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated() - memory_allocated() before the step"
    reason = cpu_memory_supported()
    return (f"unavailable on this CPU host: {reason}" if reason else
            "process VmHWM - VmRSS before the step (after malloc_trim and clear_refs=5)")


class PeakMemory:
    """``with PeakMemory(device) as pm: step()`` then ``pm.peak_bytes`` (None where unavailable)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.peak_bytes: int | None = None
        self._cpu = self.device.type != "cuda" and cpu_memory_supported() is None

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self._cpu:
            _libc().malloc_trim(0)
            _reset_high_water_mark()
            self._base = _status_bytes("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = max(torch.cuda.max_memory_allocated(self.device) - self._base, 0)
        elif exc[0] is None and self._cpu:
            self.peak_bytes = max(_status_bytes("VmHWM") - self._base, 0)


def available_bytes(device: torch.device) -> int | None:
    """Memory free for new allocations on ``device`` (None if unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


# --- the GEMM floor ---------------------------------------------------------------------------------

def flops(shape: Shape) -> dict[str, float]:
    """FLOP counts of the floor model for ``fwd``, ``bwd`` and ``fwd_bwd``."""
    gemm = 2.0 * shape.n * shape.d * shape.v
    return {"fwd": gemm, "bwd": 3 * gemm, "fwd_bwd": 4 * gemm}


def measure_floor(hidden: Tensor, weight: Tensor, *, repeats: int) -> dict:
    """The three GEMM shapes timed on the benchmark's own operands (one warm-up each), as the
    report records them: ``{n, d, v, gemm_ms, floor_ms {fwd, bwd, fwd_bwd}, tflops}``. Allocates
    one ``[N, V]`` product in the input dtype, freed afterwards."""
    h, w = hidden.detach().reshape(-1, hidden.shape[-1]), weight.detach()
    shape = Shape(h.shape[0], h.shape[1], w.shape[0])
    z = torch.empty(shape.n, shape.v, device=h.device, dtype=h.dtype)
    ops = {"logits": lambda: torch.matmul(h, w.T, out=z), "grad_hidden": lambda: z @ w, "grad_weight": lambda: z.T @ h}
    with torch.no_grad():
        gemm = {name: stats([time_ms(op) for _ in range(repeats + 1)][1:]) for name, op in ops.items()}
    fwd = gemm["logits"]["median"]
    bwd = fwd + gemm["grad_hidden"]["median"] + gemm["grad_weight"]["median"]
    return {"n": shape.n, "d": shape.d, "v": shape.v, "gemm_ms": gemm,
            "floor_ms": {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd},
            "tflops": flops(shape)["fwd_bwd"] / ((fwd + bwd) * 1e-3) / 1e12}


def own_floor_ms(floor: dict, gemms: int) -> float:
    """Forward+backward floor of an implementation that does ``gemms`` GEMMs (3 or 4)."""
    if gemms not in (3, 4):
        raise ValueError(f"an exact LM-head loss does 3 or 4 GEMMs, got {gemms}")
    return floor["floor_ms"]["fwd_bwd"] - (4 - gemms) * floor["gemm_ms"]["logits"]["median"]


# --- the run-time estimate --------------------------------------------------------------------------

# Per forward+backward iteration: 4 GEMMs, PASSES fp32 elementwise passes over N x V (softmax,
# entropy and their gradients) and OPS small operations whose latency adds up (what dominates tiny
# shapes); the batch, the floor and the oracle cost about BATCH iterations per shape; compilation
# COMPILE_S seconds per compiled implementation.
PASSES, OPS, BATCH = 15, 40, 3
COMPILE_S = {"cpu": 20.0, "cuda": 40.0}


def measure_rates(device: torch.device, dtype: torch.dtype, d: int, v: int) -> dict:
    """GEMM FLOP/s at (d, dtype), fp32 elementwise values/s, latency of a tiny operation (s)."""
    v0 = min(v, 4096 if device.type == "cpu" else 32768)
    n0 = int(max(16, min(4096, (1e9 if device.type == "cpu" else 2e11) // (2 * d * v0))))
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n0, d, device=device, generator=gen).to(dtype)
    b = torch.randn(d, v0, device=device, generator=gen).to(dtype)
    z = torch.full((2**24 if device.type == "cpu" else 2**27,), 0.5, device=device)
    with torch.no_grad():
        gemm, exp = (min(time_ms(op) for _ in range(4)) for op in (lambda: a @ b, lambda: torch.exp(z)))
        latency = statistics.median(time_ms(lambda: a[:16] @ b[:, :16]) for _ in range(6))
    return {"gemm_flops": 2.0 * n0 * d * v0 / max(gemm * 1e-3, 1e-9),
            "elementwise": z.numel() / max(exp * 1e-3, 1e-9), "latency": latency * 1e-3}


def estimate_run(shapes: Sequence[Shape], impl_keys: Sequence[str], rates: dict[tuple[int, int], dict], *,
                 device_type: str, warmup: int, repeats: int) -> dict:
    """Modelled seconds of a run; ``rates`` maps (D, V) to :func:`measure_rates`."""
    per_shape = []
    for s in shapes:
        r = rates[(s.d, s.v)]
        gemm = 2.0 * s.n * s.d * s.v / r["gemm_flops"]
        iteration = 4 * gemm + PASSES * s.n * s.v / r["elementwise"] + OPS * r["latency"]
        seconds = (len(impl_keys) * (warmup + repeats) + BATCH) * iteration
        per_shape.append({"n": s.n, "d": s.d, "v": s.v, "gemm_s": gemm, "seconds": seconds})
    compile_s = COMPILE_S[device_type] * sum(k in ("compiled", "liger-chunked") for k in impl_keys)
    return {"seconds": sum(p["seconds"] for p in per_shape) + compile_s, "per_shape": per_shape,
            "gemm_tflops": {f"{d}x{v}": r["gemm_flops"] / 1e12 for (d, v), r in rates.items()},
            "model": f"per iteration 4 GEMMs + {PASSES} fp32 elementwise passes over N x V + {OPS} small-op "
                     f"latencies; warm-up + timed repeats per implementation and shape, {BATCH} more per shape "
                     "(batch, floor, oracle); compilation"}


def memory_needed(shape: Shape, dtype: torch.dtype) -> int:
    """Bytes a shape needs before any implementation runs: inputs, their fp32 gradients, the
    floor's ``[N, V]`` product in the input dtype."""
    item = torch.empty((), dtype=dtype).element_size()
    return (shape.n * shape.d + shape.v * shape.d) * (item + 4) + shape.n * shape.v * item
