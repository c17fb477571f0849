"""Measure the vocabulary-parallel head on CPU with gloo: time per fwd+bwd step and bytes sent
per rank, against one process holding the whole head. Used by docs/distributed.md.

    from fused_pg.bench.vocab_parallel import measure_vocab_parallel
    for row in measure_vocab_parallel((1, 2, 4), tokens=2048, hidden=256, vocab=32768):
        print(row["world_size"], row["median_s"], row["bytes_sent"], row["predicted"]["total"])
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fused_pg import VocabParallel, repo_loss
from fused_pg.comm import CommLog
from fused_pg.parallel import vocab_parallel_comm_bytes

from .measure import clock


def _bytes_written() -> int:
    """Bytes this process has passed to write-like system calls (Linux ``/proc/self/io``);
    gloo's TCP transport writes every byte it sends through them."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))


def _worker(rank: int, world: int, init: str, cfg: dict, out_path: str) -> None:
    """Time fwd+bwd steps of repo_loss on this rank's vocabulary shard (the whole head when
    ``world == 1``), with the collectives recorded and the bytes written measured."""
    torch.set_num_threads(cfg["threads"])
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=init)
    N, D, V = cfg["tokens"], cfg["hidden"], cfg["vocab"]
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, D, generator=g).requires_grad_()
    weight_full = torch.randn(V, D, generator=g) * D ** -0.5
    targets = torch.randint(0, V, (N,), generator=g)
    adv, old = torch.randn(N, generator=g), -torch.rand(N, generator=g) - 0.5
    lo, hi = V * rank // world, V * (rank + 1) // world
    weight = weight_full[lo:hi].clone().requires_grad_()
    kw = dict(parallel=VocabParallel(dist.group.WORLD)) if world > 1 else {}

    def step():
        hidden.grad = weight.grad = None
        repo_loss(hidden, weight, targets, adv, old, backend="torch", validate=False, **kw).loss.backward()
    try:
        for _ in range(cfg["warmup"]):
            step()
        times, sent, payload, comm = [], [], [], []
        for _ in range(cfg["steps"]):
            dist.barrier()
            with CommLog() as log:
                w0, t0 = _bytes_written(), clock()
                step()
                t1, w1 = clock(), _bytes_written()
            times.append(t1 - t0)
            sent.append(w1 - w0)
            payload.append(log.payload_bytes())
            comm.append(log.total_seconds())
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(dict(median_s=statistics.median_high(times), min_s=min(times),
                               comm_median_s=statistics.median_high(comm), bytes_sent=statistics.median_high(sent),
                               payload_bytes=payload[0], collectives=[op for op, _ in log.calls]), f)
    finally:
        dist.destroy_process_group()


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
    """
    cfg = dict(tokens=tokens, hidden=hidden, vocab=vocab, steps=steps, warmup=warmup, threads=threads)
    rows = []
    for world in world_sizes:
        with tempfile.TemporaryDirectory() as tmp:
            out_path = os.path.join(tmp, "result.json")
            mp.start_processes(_worker, args=(world, f"file://{os.path.join(tmp, 'store')}", cfg, out_path),
                               nprocs=world, start_method="fork")
            with open(out_path) as f:
                row = json.load(f)
        rows.append({**row, "world_size": world, "tokens": tokens, "hidden": hidden, "vocab": vocab,
                     "predicted": vocab_parallel_comm_bytes(tokens, hidden, world) if world > 1 else None})
    return rows
