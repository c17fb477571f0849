"""No logit materialisation: no tensor of N x V elements is ever created by a fused sweep.

Every tensor produced by any ATen op during forward + backward is recorded with a
``TorchDispatchMode``; the largest must stay below N x V (and within the documented bound:
inputs, gradients, and one logits tile / dlogits slab). The materialised backend is the
positive control: the same probe must see its N x V logits.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fused_pg import repo_loss

N, D, V = 96, 16, 700  # N*V = 67,200 >> V*D = 11,200 >> N*D = 1,536
FP32 = 4  # bytes; the sweeps compute in fp32, the bound below is in fp32 elements


class LargestTensor(TorchDispatchMode):
    """Records the size in bytes of the largest tensor any op returns (the interpreter's own
    byte-typed staging copies of the inputs are measured in the same unit)."""

    def __init__(self):
        super().__init__()
        self.nbytes, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() * t.element_size() > self.nbytes:
                self.nbytes, self.op = t.numel() * t.element_size(), str(func)
        return out


def _inputs(dtype):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, D, generator=g).to(dtype).requires_grad_()
    W = (0.3 * torch.randn(V, D, generator=g)).to(dtype).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)
    adv = torch.randn(N, generator=g)
    old = -3 * torch.rand(N, generator=g)
    cu = torch.tensor([0, 40, 41, N])
    return h, W, y, adv, old, cu


def _largest(backend, dtype, **kw):
    h, W, y, adv, old, cu = _inputs(dtype)
    probe = LargestTensor()
    with probe:
        out = repo_loss(h, W, y, adv, old, cu_seqlens=cu, backend=backend, entropy_coef=0.01,
                        aggregation="seq-mean-token-mean", **kw)
        out.loss.backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(W.grad).all()
    return probe


def test_probe_sees_materialised_logits():
    probe = _largest("reference", torch.float32)
    assert probe.nbytes >= N * V * FP32, "the probe must catch an N x V tensor when there is one"


def test_torch_backend_holds_one_tile():
    tile = 32 * 128
    probe = _largest("torch", torch.float32, token_chunk=32, vocab_chunk=128)
    print(f"torch backend: largest tensor {probe.nbytes} B ({probe.op}); N*V*4 = {N * V * FP32} B")
    assert probe.nbytes <= max(V * D, tile) * FP32, probe.op
    assert probe.nbytes < N * V * FP32


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_backend_holds_one_slab(dtype, monkeypatch):
    import fused_pg.kernels.backward as bwd

    budget = 48 * 200  # dlogits slab (and dW scratch): 48 x 200 fp32 elements at most
    monkeypatch.setattr(bwd, "SLAB_BYTES", budget * FP32)
    probe = _largest("triton", dtype, token_chunk=48)
    print(f"triton backend ({dtype}): largest tensor {probe.nbytes} B ({probe.op}); N*V*4 = {N * V * FP32} B")
    assert probe.nbytes <= max(V * D, budget) * FP32, probe.op
    assert probe.nbytes < N * V * FP32
