"""Timers and summary statistics.

One timed repeat runs the forward (``step()``), then the backward
(``torch.autograd.grad(loss, inputs)``), and records three marks: start, end of forward,
end of backward. ``fwd = m1 - m0``, ``bwd = m2 - m1``, ``fwd+bwd = m2 - m0``: the forward and
backward of the *same* iteration, with no host synchronisation between them on CUDA.

* CUDA: ``torch.cuda.Event(enable_timing=True)`` marks (GPU time), one synchronisation at
  the end of each repeat.
* CPU: ``time.perf_counter()`` (the work is synchronous).

Warm-up repeats (compilation, autotuning, allocator growth) run first and are not recorded.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Stats:
    """Median and spread (min, max) of repeated measurements, in milliseconds."""

    median: float
    min: float
    max: float
    samples: tuple[float, ...]

    @classmethod
    def of(cls, samples: list[float]) -> "Stats":
        if not samples:
            raise ValueError("no samples")
        return cls(statistics.median(samples), min(samples), max(samples), tuple(samples))

    def as_dict(self) -> dict:
        return {"median": self.median, "min": self.min, "max": self.max, "samples": list(self.samples)}


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
                 device: torch.device, repeats: int, on_repeat: Callable[[int], None] | None = None) -> StepTimes:
    """Time ``repeats`` forward+backward iterations (after the caller's warm-up)."""
    fwd, bwd, both = [], [], []
    for i in range(repeats):
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
        if on_repeat is not None:
            on_repeat(i)
    return StepTimes(Stats.of(fwd), Stats.of(bwd), Stats.of(both))


def time_op(op: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> Stats:
    """Median time of a single operation (used for the GEMM floor)."""
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
