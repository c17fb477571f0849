"""Run test jobs in a group of processes joined by torch.distributed (gloo on CPU).

Process start-up dominates multi-process tests, so the processes are *forked* from the test
process (torch already imported: ~0.1 s per group instead of seconds per process), and one
group runs many jobs. Each job is ``job(rank, world) -> dict`` (tensors, floats, strings); the
results come back to the test process, where the assertions run with the usual helpers.
A job that raises fails the test with its traceback; the other ranks are terminated.
"""

from __future__ import annotations

import os
import socket
import tempfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT = timedelta(seconds=60)  # a deadlock fails the test instead of hanging CI


def requires_fork():
    if "fork" not in mp.get_all_start_methods():
        pytest.skip("multi-process tests fork the test process (start method 'fork' unavailable here)")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this build")


def _worker(rank: int, world: int, init: str, jobs, out_dir: str, env: dict, timeout: timedelta) -> None:
    os.environ.update(env)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=init, timeout=timeout)
    try:
        results = {name: job(rank, world) for name, job in jobs}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_group(world: int, jobs: list[tuple[str, object]], env: dict | None = None,
              timeout: timedelta = COLLECTIVE_TIMEOUT) -> list[dict]:
    """Run ``jobs`` (``[(name, job)]``, in order) on ``world`` forked gloo processes; returns one
    ``{name: result}`` per rank. ``env``: variables set in the workers (e.g. MASTER_PORT);
    ``timeout``: how long a collective waits for a missing peer before it fails."""
    requires_fork()
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{os.path.join(tmp, 'store')}"
        mp.start_processes(_worker, args=(world, init, jobs, tmp, env or {}, timeout), nprocs=world,
                           start_method="fork")
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _script_worker(rank: int, world: int, code: str, port: int, filename: str) -> None:
    # what torchrun sets for each process
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    exec(compile(code, filename, "exec"), {"__name__": "__main__"})


def run_script(code: str, world: int, filename: str = "<script>") -> None:
    """Run a script as ``torchrun --nproc-per-node world`` would (environment variables set,
    ``__name__ == "__main__"``), in forked processes; an exception in any rank fails."""
    requires_fork()
    mp.start_processes(_script_worker, args=(world, code, free_port(), filename), nprocs=world,
                       start_method="fork")
