"""Inputs as callers hand them over: any strides, offsets beyond 2^31, tiny fp16 gradients.

* Views: strided, expanded (stride 0) and offset views of every tensor argument of the head,
  on every backend, against the fp64 oracle on contiguous copies of the same values.
* 32-bit offsets: a column-major operand ``X.T.contiguous().T`` of a real model (D = 8192,
  V = 262400) puts ``d * stride`` past 2^31. Such a weight cannot be allocated on the CI
  machine, so the test builds views whose column stride is 2^30 + 64 elements over lazily
  allocated storage (only the touched pages become resident): the same offset arithmetic,
  with three columns. It runs in a subprocess because a 32-bit product there reads outside
  the tensor (a segmentation fault under the interpreter, an illegal address on a GPU).
* fp16: with a large loss normaliser dL/dlogit falls below fp16's smallest subnormal.
"""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fused_pg
from fused_pg.reference.head import logprobs_entropy_ref
from fused_pg.reference.head import logits_ref
from helpers import BACKENDS, assert_close, check_grads, grad_floors

N, D, V = 13, 7, 45


def _base(gen):
    h = torch.randn(N, D, generator=gen)
    W = torch.randn(V, D, generator=gen) * 2 / math.sqrt(D)
    b = 0.5 * torch.randn(V, generator=gen)
    y = torch.randint(0, V, (N,), generator=gen)
    return h, W, b, y


def _view(kind: str, x: torch.Tensor) -> torch.Tensor:
    """A view of ``kind`` with x's shape (its values differ from x for "expanded")."""
    if kind == "strided":  # every dimension strided: a slice of a larger tensor
        big = torch.zeros(*[3 * s for s in x.shape], dtype=x.dtype)
        v = big[tuple(slice(None, None, 3) for _ in x.shape)]
    elif kind == "offset":  # storage offset, then a column slice (row stride > row length)
        big = torch.zeros(*[s + 2 for s in x.shape], dtype=x.dtype)
        v = big[tuple(slice(1, 1 + s) for s in x.shape)]
    elif kind == "expanded":  # stride 0 along the last dimension, inside a larger storage
        base = torch.zeros(*x.shape[:-1], 4, dtype=x.dtype)
        base[..., 1] = x[..., 0]
        return base[..., 1:2].expand(x.shape)
    else:
        raise ValueError(kind)
    v.copy_(x)
    return v


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arg", ["hidden", "weight", "bias", "targets"])
@pytest.mark.parametrize("kind", ["strided", "offset", "expanded"])
def test_views_of_every_argument(backend, arg, kind):
    gen = torch.Generator().manual_seed(0)
    inputs = dict(zip(("hidden", "weight", "bias", "targets"), _base(gen)))
    inputs[arg] = _view(kind, inputs[arg])
    h, W, b, y = (inputs[k] for k in ("hidden", "weight", "bias", "targets"))
    x = inputs[arg]
    assert {"strided": not x.is_contiguous(), "offset": x.storage_offset() > 0, "expanded": 0 in x.stride()}[kind]
    leaves = [x.detach().requires_grad_() for x in (h, W, b)]  # views stay views: they are leaves
    lp, ent = fused_pg.fused_logprobs_entropy(leaves[0], leaves[1], y, bias=leaves[2], backend=backend,
                                              softcap=5.0, vocab_chunk=16, token_chunk=8)
    u = torch.randn(N, generator=gen)
    w = torch.randn(N, generator=gen)
    ((lp * u).sum() + (ent * w).sum()).backward()

    ref = [x.detach().contiguous().double().requires_grad_() for x in (h, W, b)]
    lp2, ent2 = logprobs_entropy_ref(ref[0], ref[1], y.contiguous(), ref[2], softcap=5.0)
    ((lp2 * u.double()).sum() + (ent2 * w.double()).sum()).backward()
    assert_close("logprobs", lp2, lp, atol=1e-5, rtol=1e-5)
    assert_close("entropy", ent2, ent, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        z = logits_ref(ref[0], ref[1], ref[2], softcap=5.0)
    floors = grad_floors(ref[0], ref[1], u.double(), w.double(), ent2.detach(), z, temperature=1.0, fp64=False)
    check_grads({name: (r.grad, g.grad) for name, r, g in zip(("hidden", "weight", "bias"), ref, leaves)},
                "fp32", floors)


_OFFSETS_SCRIPT = textwrap.dedent("""
    import os, resource, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import fused_pg
    from fused_pg.reference.head import logprobs_entropy_ref

    S = 2**30 + 64                  # column stride: column 2 starts 2^31 + 128 elements in
    N, D, V = 5, 3, 7

    def column_major(rows, cols, values):
        # rows x cols view with strides (1, S) over lazily allocated storage (~4 GiB virtual)
        storage = torch.empty(S * (cols - 1) + rows, dtype=values.dtype)
        view = storage.as_strided((rows, cols), (1, S))
        view.copy_(values)          # touches 3 pages
        return view

    def strided_vector(values):
        storage = torch.empty(S * (values.numel() - 1) + 1, dtype=values.dtype)
        view = storage.as_strided((values.numel(),), (S,))
        view.copy_(values)
        return view

    gen = torch.Generator().manual_seed(0)
    h0 = torch.randn(N, D, generator=gen).bfloat16()
    W0 = torch.randn(V, D, generator=gen).bfloat16()
    b0 = torch.randn(V, generator=gen).bfloat16()
    y = torch.randint(0, V, (N,), generator=gen)
    h = column_major(N, D, h0).requires_grad_()
    W = column_major(V, D, W0).requires_grad_()
    b = strided_vector(b0).requires_grad_()
    assert W.stride(1) * (D - 1) >= 2**31 and b.stride(0) * (V - 1) >= 2**31
    lp, ent = fused_pg.fused_logprobs_entropy(h, W, y, bias=b, backend="triton")
    (lp.sum() + 0.5 * ent.sum()).backward()

    ref = [x.double().requires_grad_() for x in (h0, W0, b0)]
    lp2, ent2 = logprobs_entropy_ref(ref[0], ref[1], y, ref[2])
    (lp2.sum() + 0.5 * ent2.sum()).backward()
    errs = dict(logprobs=(lp - lp2).abs().max().item(), entropy=(ent - ent2).abs().max().item())
    for name, r, g in zip(("hidden", "weight", "bias"), ref, (h, W, b)):
        errs[name] = ((g.grad.double() - r.grad).abs().max() / r.grad.abs().max()).item()
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(errs, f"max RSS {rss_mib:.0f} MiB")
    assert errs["logprobs"] < 2e-3 and errs["entropy"] < 2e-3, errs
    assert max(errs[k] for k in ("hidden", "weight", "bias")) < 2e-2, errs   # bf16 gradients
    assert rss_mib < 2048, f"the lazily allocated storage became resident: {rss_mib:.0f} MiB"
""")


def test_offsets_past_2_31_along_every_operand_dimension():
    """Column-major hidden and weight and a strided bias whose element offsets pass 2^31."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", _OFFSETS_SCRIPT], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0, (f"exit status {run.returncode} (-11: segmentation fault)\n"
                                 f"stdout: {run.stdout}\nstderr: {run.stderr[-3000:]}")
    print(run.stdout)


@pytest.mark.parametrize("gemm", ["auto", "torch-fp32"])
def test_fp16_small_gradients_survive_a_large_normaliser(gemm, monkeypatch):
    """token-mean over num_items_in_batch = 65536: g = dL/dlogp ~ 1.5e-5 per token and most
    p_v ~ 1e-3 .. 1e-6, so dL/dz_v ~ 1e-8 .. 1e-11 lies below fp16's subnormals (6e-8)."""
    monkeypatch.setenv("FUSED_PG_GEMM", gemm)
    gen = torch.Generator().manual_seed(0)
    n, d, v = 24, 32, 150
    h = (0.3 * torch.randn(n, d, generator=gen)).half()
    W = (4 * torch.randn(v, d, generator=gen) / math.sqrt(d)).half()  # entropy ~4 nats: many small p_v
    b = torch.randn(v, generator=gen).half()
    y = torch.randint(0, v, (n,), generator=gen)
    u = torch.randn(n, generator=gen) / 65536
    w = -0.01 * torch.rand(n, generator=gen) / 65536
    leaves = [x.clone().requires_grad_() for x in (h, W, b)]
    lp, ent = fused_pg.fused_logprobs_entropy(*leaves[:2], y, bias=leaves[2], backend="triton")
    ((lp * u).sum() + (ent * w).sum()).backward()
    ref = [x.double().requires_grad_() for x in (h, W, b)]
    lp2, ent2 = logprobs_entropy_ref(ref[0], ref[1], y, ref[2])
    ((lp2 * u.double()).sum() + (ent2 * w.double()).sum()).backward()
    with torch.no_grad():
        z = logits_ref(ref[0], ref[1], ref[2])
    floors = grad_floors(ref[0], ref[1], u.double(), w.double(), ent2.detach(), z, temperature=1.0,
                         fp64=False, dlogits=torch.float16)
    check_grads({name: (r.grad, g.grad) for name, r, g in zip(("hidden", "weight", "bias"), ref, leaves)},
                "fp16", floors)
