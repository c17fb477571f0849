"""``backend="auto"`` on CUDA: the Triton sweeps of :mod:`.triton_fused` with fail-safe dispatch.

A kernel that cannot be compiled or launched on the device makes that sweep, and every later
one of the same configuration, run on the torch backend, with one warning naming the reason.
"""

from __future__ import annotations

import functools

from . import triton_fused

forward_sweep = functools.partial(triton_fused.forward_sweep, fallback=True)
backward_sweep = functools.partial(triton_fused.backward_sweep, fallback=True)
