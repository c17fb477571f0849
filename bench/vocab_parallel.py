"""Measure the vocabulary-parallel head on CPU with gloo: time per fwd+bwd step and bytes sent
per rank, against one process holding the whole head. Used by docs/distributed.md.

    from fused_pg.bench.vocab_parallel import measure_vocab_parallel
    for row in measure_vocab_parallel((1, 2, 4), tokens=2048, hidden=256, vocab=32768):
        print(row["world_size"], row["median_s"], row["bytes_sent"], row["predicted"]["total"])
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from fused_pg import VocabParallel, repo_loss
from fused_pg.comm import CommLog
from fused_pg.parallel import vocab_parallel_comm_bytes


def _bytes_written() -> int:
    """Bytes this process has passed to write-like system calls (Linux ``/proc/self/io``);
    gloo's TCP transport writes every byte it sends through them."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    raise RuntimeError("no wchar in /proc/self/io")


def _bench_worker(rank: int, world: int, init: str, cfg: dict, out_path: str) -> None:
    import json

    torch.set_num_threads(cfg["threads"])
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=init)
    try:
        result = _bench_steps(cfg, group=dist.group.WORLD if world > 1 else None)
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(result, f)
    finally:
        dist.destroy_process_group()


def _bench_steps(cfg: dict, group) -> dict:
    """Time fwd+bwd steps of repo_loss on this rank's shard (or the whole head when group is
    None), with the per-step collectives recorded and the bytes written measured."""
    N, D, V = cfg["tokens"], cfg["hidden"], cfg["vocab"]
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, D, generator=g).requires_grad_()
    weight_full = torch.randn(V, D, generator=g) * D ** -0.5
    targets = torch.randint(0, V, (N,), generator=g)
    adv = torch.randn(N, generator=g)
    old = -torch.rand(N, generator=g) - 0.5
    if group is None:
        weight = weight_full.clone().requires_grad_()
        kw = {}
    else:
        R, rank = dist.get_world_size(group), dist.get_rank(group)
        bounds = [V * k // R for k in range(R + 1)]
        weight = weight_full[bounds[rank]:bounds[rank + 1]].clone().requires_grad_()
        kw = dict(parallel=VocabParallel(group))

    def step():
        hidden.grad = weight.grad = None
        out = repo_loss(hidden, weight, targets, adv, old, backend="torch", validate=False, **kw)
        out.loss.backward()

    for _ in range(cfg["warmup"]):
        step()
    times, sent, payload, comm = [], [], [], []
    for _ in range(cfg["steps"]):
        if group is not None:
            dist.barrier(group)
        with CommLog() as log:
            w0, t0 = _bytes_written(), time.perf_counter()
            step()
            t1, w1 = time.perf_counter(), _bytes_written()
        times.append(t1 - t0)
        sent.append(w1 - w0)
        payload.append(log.payload_bytes())
        comm.append(log.total_seconds())
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return dict(median_s=median(times), min_s=min(times), comm_median_s=median(comm), bytes_sent=median(sent),
                payload_bytes=payload[0], collectives=[op for op, _ in log.calls])


def measure_vocab_parallel(world_sizes=(1, 2, 4), *, tokens: int = 2048, hidden: int = 256,
                           vocab: int = 32768, steps: int = 5, warmup: int = 1, threads: int = 1) -> list[dict]:
    """Measure the vocabulary-parallel head on CPU with gloo: time per fwd+bwd step and bytes
    sent per rank, against one process holding the whole head (``world_size == 1``, plain
    ``repo_loss`` without a process group).

    Each world size runs in fresh processes (``fork``), one thread each by default. Returns one
    dict per world size: ``world_size``, ``median_s``/``min_s`` (rank 0's step time),
    ``comm_median_s`` (rank 0's time inside the collectives, waiting for slower ranks included),
    ``bytes_sent`` (rank 0, measured from ``/proc/self/io``: gloo's TCP writes, Linux only),
    ``payload_bytes`` (rank 0's collective inputs, recorded by :class:`CommLog`),
    ``predicted`` (:func:`vocab_parallel_comm_bytes`), and the shape.

    Example::

        for row in measure_vocab_parallel((1, 2, 4), tokens=2048, hidden=256, vocab=32768):
            print(row["world_size"], row["median_s"], row["bytes_sent"], row["predicted"]["total"])
    """
    import json
    import tempfile

    import torch.multiprocessing as mp

    cfg = dict(tokens=tokens, hidden=hidden, vocab=vocab, steps=steps, warmup=warmup, threads=threads)
    rows = []
    for world in world_sizes:
        with tempfile.TemporaryDirectory() as tmp:
            out_path = os.path.join(tmp, "result.json")
            init = f"file://{os.path.join(tmp, 'store')}"
            mp.start_processes(_bench_worker, args=(world, init, cfg, out_path), nprocs=world,
                               start_method="fork")
            with open(out_path) as f:
                result = json.load(f)
        result.update(world_size=world, tokens=tokens, hidden=hidden, vocab=vocab,
                      predicted=vocab_parallel_comm_bytes(tokens, hidden, world) if world > 1 else None)
        rows.append(result)
    return rows
