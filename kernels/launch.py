"""The one way every kernel of fused-pg is launched: a given config, or the autotuned twin.

    launch(kernel, grid, args, config=..., deterministic=...)

* ``kernel``: a :class:`Tunable`, i.e. the ``@triton.jit`` function (with its heuristics), the
  name of its search space in ``kernels.configs`` and its autotune key;
* ``grid(meta) -> tuple``: the launch grid from the meta-parameters (``meta`` holds the
  kernel arguments and the config, as under ``triton.autotune``);
* ``config``: the default from ``kernels.configs.default_config`` (or a caller's choice).

Autotuning replaces ``config`` only when asked for (``FUSED_PG_AUTOTUNE=1``), never for
``deterministic=True`` (timing could pick another tile on the next run, and with it another
reduction order), never under the interpreter, and never when the caller pinned the config
(``pinned=True``: a tuning sweep timing one candidate, or a test).

Memory: none; the autotuned twin is built on first use and cached on the ``Tunable``.
"""

from __future__ import annotations

import functools
from typing import Callable

import triton
from triton.errors import TritonError

from .configs import LAUNCH_KEYS, search_space
from .env import autotune_requested


# What a kernel that cannot run on this GPU raises: Triton's compile errors, OutOfResources
# (shared memory or registers beyond the device's limit), PTXASError; the driver's launch
# errors are RuntimeErrors ("Triton Error [CUDA]: ...").
KERNEL_ERRORS = (TritonError, RuntimeError)


class Tunable:
    """A kernel and what autotuning it needs.

    Args:
        fn: the ``@triton.jit`` function (``@triton.heuristics`` applied).
        kind: its search space in ``kernels.configs`` ("fwd", "dlogits", "matmul"), or None
              for a kernel that always runs with the config it is given.
        key: argument names whose values select a separately tuned config.
        restore_value: pointer arguments the kernel reads and writes (reset between trials).
    """

    def __init__(self, fn, kind: str | None = None, key: tuple[str, ...] = (),
                 restore_value: tuple[str, ...] = ()):
        self.fn, self.kind, self.key, self.restore_value = fn, kind, tuple(key), tuple(restore_value)

    @functools.cached_property
    def autotuned(self):
        if self.kind is None:
            raise ValueError("this kernel has no search space")
        return triton.autotune(configs=[triton_config(c) for c in search_space(self.kind)],
                               key=list(self.key), restore_value=list(self.restore_value))(self.fn)


def triton_config(config: dict) -> triton.Config:
    """``{..meta.., num_warps, num_stages}`` -> ``triton.Config``."""
    meta = {k: v for k, v in config.items() if k not in LAUNCH_KEYS}
    return triton.Config(meta, num_warps=config["num_warps"], num_stages=config["num_stages"])


def launch(kernel: Tunable, grid: Callable[[dict], tuple[int, ...]], args: dict, *, config: dict,
           deterministic: bool, pinned: bool = False) -> None:
    """Launch ``kernel[grid](**args)`` with ``config``, or autotuned (see the module docstring)."""
    if kernel.kind is not None and not pinned and not deterministic and autotune_requested():
        kernel.autotuned[grid](**args)
    else:
        kernel.fn[grid({**args, **config})](**args, **config)
