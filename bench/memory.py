"""Peak memory of one forward+backward, *above the inputs* (what the loss itself costs).

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
  ``memory_allocated`` before the step (the inputs and anything else alive). Exact for
  PyTorch tensors; the caching allocator's reserve and the CUDA context are not counted.
* CPU (Linux): the process's resident-set high-water mark. Before the step, freed heap
  memory is returned to the OS (``malloc_trim(0)``) and the high-water mark is reset to
  the current RSS (``echo 5 > /proc/self/clear_refs``); the peak is then ``VmHWM`` after the
  step minus ``VmRSS`` before it. This sees every allocation (torch's CPU allocator has no
  statistics and ``tracemalloc`` sees none of its tensors), at page granularity; anything
  else the process touches meanwhile (a few MiB of Python objects) is included. Without
  ``/proc/self/clear_refs`` or glibc, CPU memory is reported as unavailable.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

import torch

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


def cpu_supported() -> str | None:
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


def method(device: torch.device) -> str:
    """One line saying how peak memory is measured on ``device``."""
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated() - memory_allocated() before the step"
    reason = cpu_supported()
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
        self._cpu_ok = device.type == "cuda" or cpu_supported() is None

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
