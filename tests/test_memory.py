"""Peak host memory of forward + backward of repo_loss: the torch backend does not grow with N x V.

Measured honestly on CPU, by the kernel, with the benchmark's probe
(``fused_pg.bench.measure.PeakMemory``): in a fresh subprocess, each run allocates its inputs,
warms up on a tiny problem, resets the process's resident-set high-water mark
(``/proc/self/clear_refs``), runs one forward + backward and reads the high-water mark again
(``VmHWM``; it sees every allocator, unlike ``tracemalloc``, and torch's CPU allocator keeps no
statistics). ``peak above inputs = VmHWM - VmRSS before the run``. glibc's mmap threshold is
pinned (see ``peak_memory``) so that freed tiles go back to the system and the high-water mark
tracks live memory.

The acceptance measurement (N=4096, D=256, V=32768, fp32, default chunks, at least
3x below the materialising reference) is printed; run with ``-s`` to see the numbers. It is
marked ``slow`` (it runs ~100 GFLOP per backend: ~20-50 s on 2 cores) and runs by default;
``-m "not slow"`` leaves it out.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from fused_pg.bench.measure import cpu_memory_supported

PROBE = textwrap.dedent(r"""
    import json, sys, time
    import torch
    from fused_pg import repo_loss
    from fused_pg.bench.measure import PeakMemory

    def measure(backend, N, D, V, chunks):
        g = torch.Generator().manual_seed(0)
        h = torch.randn(N, D, generator=g).requires_grad_()
        W = (torch.randn(V, D, generator=g) / D ** 0.5).requires_grad_()
        y = torch.randint(0, V, (N,), generator=g)
        adv = torch.randn(N, generator=g)
        old = -10 * torch.rand(N, generator=g)
        kw = dict(aggregation="seq-mean-token-mean", entropy_coef=0.01, repo="decorrelate", backend=backend, **chunks)
        # warm-up on a tiny slice: lazily imported code, thread pools
        repo_loss(h[:8].detach().requires_grad_(), W[:64].detach().requires_grad_(), y[:8] % 64, adv[:8],
                  old[:8], cu_seqlens=torch.tensor([0, 8]), **kw).loss.backward()
        cu = torch.tensor([0, N // 3, N // 2, N])
        with PeakMemory("cpu") as peak:  # the benchmark's probe: VmHWM - VmRSS before the run
            t0 = time.perf_counter()
            out = repo_loss(h, W, y, adv, old, cu_seqlens=cu, **kw)
            out.loss.backward()
            seconds = time.perf_counter() - t0
        assert torch.isfinite(out.loss) and torch.isfinite(W.grad).all()
        return dict(backend=backend, N=N, D=D, V=V, peak_above_inputs=peak.peak_bytes, seconds=seconds)

    runs, threads = json.loads(sys.argv[1]), int(sys.argv[2])
    if threads > 0:
        torch.set_num_threads(threads)
    print(json.dumps([measure(*run) for run in runs]))
""")


def peak_memory(runs: list, threads: int = 0) -> list[dict]:
    """Measure ``runs`` = [(backend, N, D, V, chunks), ...] one after the other in one fresh
    interpreter; ``threads=0``: torch's default intra-op threads.

    The peak of each run is read from the kernel (``VmHWM - VmRSS`` after resetting the
    high-water mark through ``/proc/self/clear_refs``). ``MALLOC_MMAP_THRESHOLD_`` pins glibc's
    mmap threshold (it otherwise grows to the size of freed blocks, after which freed tiles
    stay in the heap): every large tensor is mapped on allocation and unmapped on free, so the
    resident set tracks live memory, for both backends alike.
    """
    reason = cpu_memory_supported()
    if reason:
        pytest.skip(f"the peak-memory probe does not work here: {reason}")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    res = subprocess.run([sys.executable, "-c", PROBE, json.dumps(runs), str(threads)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


MiB = 2**20


@pytest.mark.slow
def test_acceptance_peak_memory_torch_vs_reference():
    """N=4096, D=256, V=32768, fp32, CPU: torch backend's peak >= 3x below the reference's."""
    N, D, V = 4096, 256, 32768
    torch_run, ref_run = peak_memory([("torch", N, D, V, {}), ("reference", N, D, V, {})])
    ratio = ref_run["peak_above_inputs"] / torch_run["peak_above_inputs"]
    print(f"\npeak memory above inputs, forward+backward of repo_loss, N={N} D={D} V={V} fp32 CPU "
          f"(one N x V fp32 matrix = {N * V * 4 / MiB:.0f} MiB):\n"
          f"  backend='torch'     {torch_run['peak_above_inputs'] / MiB:8.1f} MiB  ({torch_run['seconds']:.1f} s)\n"
          f"  backend='reference' {ref_run['peak_above_inputs'] / MiB:8.1f} MiB  ({ref_run['seconds']:.1f} s)\n"
          f"  ratio {ratio:.1f}x")
    assert ratio >= 3, f"torch backend only {ratio:.2f}x below the materialising reference"
    assert torch_run["peak_above_inputs"] < N * V * 4, "the torch backend holds as much as one N x V logits matrix"


def test_torch_backend_peak_does_not_grow_with_n_times_v():
    """Same tile, N x V four times larger: the torch backend's peak grows only by the O(V*D + N*D)
    gradients, while the materialising reference at the larger size holds several N x V matrices."""
    D, tile = 32, dict(token_chunk=512, vocab_chunk=2048)  # tile: 512 x 2048 fp32 = 4 MiB
    (N1, V1), (N2, V2) = (1024, 4096), (2048, 8192)
    runs = peak_memory([("torch", N1, D, V1, tile), ("torch", N2, D, V2, tile), ("reference", N2, D, V2, {})],
                       threads=1)
    small, big, ref = (r["peak_above_inputs"] for r in runs)
    d_nv = (N2 * V2 - N1 * V1) * 4
    d_grads = 3 * ((V2 - V1) * D + (N2 - N1) * D) * 4  # grads, fp32 accumulators, their copies
    print(f"\ntorch backend, tile 512x2048, D={D}: peak {small / MiB:.1f} MiB at N={N1} V={V1}, "
          f"{big / MiB:.1f} MiB at N={N2} V={V2} (N x V fp32 grew by {d_nv / MiB:.0f} MiB); "
          f"reference at N={N2} V={V2}: {ref / MiB:.1f} MiB")
    assert ref >= N2 * V2 * 4, "the probe must see the reference's N x V logits"
    assert big - small <= d_grads + 2 * MiB, f"peak grew by {(big - small) / MiB:.1f} MiB"
    assert big < N2 * V2 * 4
