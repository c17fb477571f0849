"""Every call fused-pg makes into ``torch.distributed``, recorded by :class:`CommLog`.

A leaf module: the parallel strategies (:mod:`fused_pg.parallel`), the mergeable REPO
statistics and the controllers communicate only through these helpers, so the volume a step
sends can be measured rather than assumed (``with CommLog() as log: ...``).
"""

from __future__ import annotations

import pickle
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

_LOGS: list["CommLog"] = []


@dataclass
class CommLog:
    """Records the collectives issued while active (``with CommLog() as log:``).

    calls:   ``(op, payload_bytes)`` per collective; the payload is this rank's input tensor
             (``numel * itemsize``; the pickled size for object gathers).
    seconds: the wall time spent in each (on GPU: to enqueue it, collectives being
             asynchronous there).
    """

    calls: list[tuple[str, int]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def __enter__(self) -> "CommLog":
        _LOGS.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _LOGS.remove(self)

    def payload_bytes(self, op: str | None = None) -> int:
        return sum(b for o, b in self.calls if op is None or o == op)

    def total_seconds(self) -> float:
        return sum(self.seconds)


@contextmanager
def _record(op: str, nbytes: int):
    start = time.perf_counter()
    yield
    elapsed = time.perf_counter() - start
    for log in _LOGS:
        log.calls.append((op, nbytes))
        log.seconds.append(elapsed)


def check_group(name: str, group) -> None:
    """A process-group argument: torch.distributed initialised, ``group`` usable, this process
    a member."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{name} needs torch.distributed to be initialised "
                           "(torch.distributed.init_process_group)")
    if group is not dist.group.WORLD and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{name} must be a torch.distributed ProcessGroup (e.g. dist.group.WORLD or "
                        f"one from dist.new_group), got {type(group).__name__}")
    if dist.get_rank(group) < 0:
        raise ValueError(f"{name}: this process (global rank {dist.get_rank()}) is not a member of the group")


def rank(group) -> int:
    return dist.get_rank(group)


def world_size(group) -> int:
    return dist.get_world_size(group)


def all_gather(x: Tensor, group) -> Tensor:
    """``[*shape]`` on every rank -> ``[R, *shape]``, in rank order."""
    R = world_size(group)
    x = x.contiguous()
    flat = x if x.dim() else x.reshape(1)
    out = torch.empty((R * flat.shape[0],) + tuple(flat.shape[1:]), dtype=x.dtype, device=x.device)
    # torch >= 2.13 names it all_gather_single (all_gather_into_tensor is deprecated there)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    with _record("all_gather", x.numel() * x.element_size()):
        gather(out, flat, group=group)
    return out.view((R,) + tuple(x.shape))


def all_reduce_sum(x: Tensor, group) -> None:
    """In-place sum over the ranks of ``group``."""
    with _record("all_reduce", x.numel() * x.element_size()):
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)


def all_gather_object(obj, group) -> list:
    """Every rank's picklable ``obj``, in rank order (a host synchronisation)."""
    out = [None] * world_size(group)
    with _record("all_gather_object", len(pickle.dumps(obj))):
        dist.all_gather_object(out, obj, group=group)
    return out
