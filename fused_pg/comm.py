"""Every call fused-pg makes into ``torch.distributed``, recorded by :class:`CommLog`.

A leaf module: the parallel strategies (:mod:`fused_pg.parallel`), the mergeable REPO
statistics and the controllers communicate only through these helpers, so the volume a step
sends can be measured rather than assumed (``with CommLog() as log: ...``).

:func:`agreement` keeps one rank's local error from leaving its peers waiting in a collective:
every call that communicates first runs its local part (argument checks, value checks that
need no peer) inside it, and the group agrees on the outcome before the first collective.
"""

from __future__ import annotations

import builtins
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


# ---------------------------------------------------------------------------------------------
# agreeing on local errors before the first collective
# ---------------------------------------------------------------------------------------------

_HOST_GROUPS: dict = {}
_AGREED_TYPES = ("ValueError", "TypeError", "RuntimeError", "NotImplementedError", "ImportError")


def _runs_on_cpu(group) -> bool:
    """Whether ``group``'s backend has a CPU implementation (gloo, or "cpu:gloo,cuda:nccl")."""
    return "gloo" in str(dist.get_backend(group))


def _host_group(group):
    """A group that runs collectives on CPU tensors for the members of ``group``: the group
    itself when its backend has a CPU implementation (gloo), else a gloo group over the same
    ranks, created once (``use_local_synchronization``: only the members take part), or None
    when this build has no gloo."""
    if _runs_on_cpu(group):
        return group
    if not dist.is_gloo_available():
        return None
    if group not in _HOST_GROUPS:
        _HOST_GROUPS[group] = dist.new_group(dist.get_process_group_ranks(group), backend="gloo",
                                             use_local_synchronization=True)
    return _HOST_GROUPS[group]


def _exchange(group, failure: tuple | None) -> tuple | None:
    """The failure of the lowest global rank among the members of ``group`` (each passes its
    own, or None), the same on every member; None when no member failed.

    One all-reduce of a 4-byte flag on the host (a second collective, an all-gather of the
    failures, only when some member failed). On a group without a CPU backend and without gloo
    the flag travels on the group's device and is read back: a host synchronisation."""
    host = _host_group(group)
    device = torch.device("cpu")
    if host is None:
        host = group
        device = torch.device("cuda", torch.cuda.current_device())
    flag = torch.full((1,), 0 if failure is None else 1, dtype=torch.int32, device=device)
    with _record("agree", 4):
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=host)
    if not int(flag.item()):
        return None
    failures = [None] * world_size(group)
    with _record("all_gather_object", len(pickle.dumps(failure))):
        dist.all_gather_object(failures, failure, group=host)
    return min((f for f in failures if f is not None), key=lambda f: f[0])


def blame(error: Exception, group, rank_in_group: int) -> Exception:
    """Mark ``error`` as caused by the given rank of ``group`` (every rank raises it, after a
    collective check): :func:`agreement` then names that rank, by its global rank."""
    error.failing_rank = dist.get_global_rank(group, rank_in_group)
    return error


@contextmanager
def agreement(where: str, groups: list[tuple[str, object]]):
    """Run the local part of a call that communicates over ``groups`` (``[(argument name,
    process group)]``), then agree on its outcome before the first collective.

    If the block raises on any rank, every rank of every group raises the same error, of the
    same type (``ValueError``, ``TypeError``, ... else ``RuntimeError``), naming the global rank
    that failed first and carrying its message (which names the argument)::

        repo_loss: rank 1 refused its arguments: advantages must have shape ...

    Groups are agreed in order and a failure learned from one group is passed on to the next,
    so that ranks that share no group with the failing rank (the other corner of a
    vocabulary x data mesh) learn it too. The block must not communicate. Cost per call: one
    host-side all-reduce of 4 bytes per group (see :func:`_exchange`), no device
    synchronisation.
    """
    if not groups:
        yield
        return
    for name, group in groups:
        check_group(name, group)
    error = None
    try:
        yield
    except Exception as err:  # every local failure is agreed on, then raised again
        error = err
    failure = None
    if error is not None:
        kind = type(error).__name__
        rank = getattr(error, "failing_rank", dist.get_rank())
        failure = (rank, kind if kind in _AGREED_TYPES else "RuntimeError", str(error))
    for _, group in groups:
        learned = _exchange(group, failure)
        if learned is not None:
            failure = learned if failure is None else min(failure, learned, key=lambda f: f[0])
    if failure is None:
        return
    rank, kind, message = failure
    agreed = getattr(builtins, kind)(f"{where}: rank {rank} refused its arguments: {message}")
    raise agreed from error
