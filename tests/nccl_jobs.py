"""The multi-GPU (NCCL) check, a top-level function so that spawned processes can import it
(CUDA cannot be forked). Each rank asserts against the one-process result it computes itself."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

import fused_pg


def _close(name: str, ref, got, tol: float) -> None:
    ref, got = ref.detach().double(), got.detach().double()
    err = float((got - ref).abs().max()) if ref.numel() else 0.0
    allowed = tol * (1.0 + float(ref.abs().max()) if ref.numel() else 1.0)
    assert err <= allowed, f"{name}: max abs error {err:.3e} > {allowed:.3e}"


def distributed_worker(rank: int, world: int, init: str, dist_backend: str = "nccl", device: str = "cuda",
                       backends=("triton", "torch")) -> None:
    if device == "cuda":
        torch.cuda.set_device(rank)
    dev = torch.device(device, rank) if device == "cuda" else torch.device("cpu")
    dist.init_process_group(dist_backend, rank=rank, world_size=world, init_method=init)
    try:
        g = torch.Generator().manual_seed(0)
        B, T, D, V = 4, 33, 96, 1001  # odd: tiles and shards end mid-block
        h = torch.randn(B, T, D, generator=g)
        W = torch.randn(V, D, generator=g) / math.sqrt(D) * 3
        b = 0.3 * torch.randn(V, generator=g)
        b[-7:] = -math.inf  # a padded vocabulary
        y = torch.randint(0, V - 7, (B, T), generator=g)
        adv = torch.randn(B, generator=g)
        old = -2 * torch.rand(B, T, generator=g) - 0.3
        mask = torch.rand(B, T, generator=g) > 0.2
        h, W, b, y, adv, old, mask = (x.to(dev) for x in (h, W, b, y, adv, old, mask))
        kw = dict(repo="decorrelate", repo_coef=0.8, entropy_coef=0.01, aggregation="seq-mean-token-mean")
        cuts = [0, *[V * k // world + 37 * (k % 2) for k in range(1, world)], V]  # unequal shards
        a, c = cuts[rank], cuts[rank + 1]
        rows = (B * rank // world, B * (rank + 1) // world)
        group = dist.group.WORLD
        for backend in backends:
            leaves = [x.clone().requires_grad_() for x in (h, W, b)]
            one = fused_pg.repo_loss(leaves[0], leaves[1], y, adv, old, mask, bias=leaves[2], backend=backend, **kw)
            one.loss.backward()
            dh1, dW1, db1 = (x.grad for x in leaves)

            # vocabulary parallel: this rank's rows [a, c)
            hh = h.clone().requires_grad_()
            w = W[a:c].clone().requires_grad_()
            bb = b[a:c].clone().requires_grad_()
            out = fused_pg.repo_loss(hh, w, y, adv, old, mask, bias=bb, backend=backend, process_group=group, **kw)
            out.loss.backward()
            _close(f"{backend} vocab-parallel loss", one.loss, out.loss, 1e-5)
            _close(f"{backend} vocab-parallel logprobs", one.logprobs, out.logprobs, 1e-5)
            _close(f"{backend} vocab-parallel entropy", one.entropy, out.entropy, 1e-5)
            _close(f"{backend} vocab-parallel d hidden", dh1, hh.grad, 1e-4)
            _close(f"{backend} vocab-parallel d weight", dW1[a:c], w.grad, 1e-4)
            _close(f"{backend} vocab-parallel d bias", db1[a:c], bb.grad, 1e-4)

            # data parallel: this rank's sequences; gradients summed over the group
            r0, r1 = rows
            hh = h[r0:r1].clone().requires_grad_()
            ww = W.clone().requires_grad_()
            out = fused_pg.repo_loss(hh, ww, y[r0:r1], adv[r0:r1], old[r0:r1], mask[r0:r1], bias=b,
                                     backend=backend, data_parallel_group=group, **kw)
            out.loss.backward()
            loss = out.loss.detach().clone()
            dist.all_reduce(loss, group=group)
            dist.all_reduce(ww.grad, group=group)
            _close(f"{backend} data-parallel loss", one.loss, loss, 1e-5)
            _close(f"{backend} data-parallel d hidden", dh1[r0:r1], hh.grad, 1e-4)
            _close(f"{backend} data-parallel d weight", dW1, ww.grad, 1e-4)
            _close(f"{backend} data-parallel entropy_mean", one.metrics["entropy_mean"],
                   out.metrics["entropy_mean"], 1e-5)
    finally:
        dist.destroy_process_group()
