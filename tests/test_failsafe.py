"""Fail-safe dispatch: backend="auto" on CUDA runs the Triton kernels and, where one cannot be
compiled or launched on the device, the torch backend -- once warned, then for good for that
configuration; backend="triton" raises the error.

No GPU here: the Triton kernels run under the interpreter, ``backends.AUTO_CUDA`` (what
"auto" resolves to on CUDA) is driven through ``head.sweep`` with CPU tensors, and a launch
failure is simulated by a launcher that raises Triton's ``OutOfResources`` for one kernel, as
a GPU with less shared memory than the tile needs does.
"""

import math

import pytest
import torch
from triton.runtime.errors import OutOfResources

import fused_pg.backends.triton_fused as triton_fused
import fused_pg.kernels.backward as backward_mod
import fused_pg.kernels.forward as forward_mod
from fused_pg import backends, fused_logprobs_entropy
from fused_pg.config import HeadConfig
from fused_pg.head import HeadInputs, sweep
from fused_pg.parallel import LOCAL
from fused_pg.reference.head import logprobs_entropy_ref
from helpers import assert_close, assert_grad_close

N, D, V = 13, 7, 45  # odd: exercises the masks


@pytest.fixture(autouse=True)
def no_failures_recorded(monkeypatch):
    monkeypatch.setattr(triton_fused, "_FAILED", {})


def _failing(module, kernel, monkeypatch):
    """Make ``module``'s launches of ``kernel`` raise OutOfResources; returns the launch counts."""
    calls = {"failed": 0, "ran": 0}
    real = module.launch

    def launch(k, grid, args, **kw):
        if k is kernel:
            calls["failed"] += 1
            raise OutOfResources(240 * 1024, 227 * 1024, "shared memory")
        calls["ran"] += 1
        return real(k, grid, args, **kw)

    monkeypatch.setattr(module, "launch", launch)
    return calls


def _inputs(seed=0, V=V):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g)
    W = 2 * torch.randn(V, D, generator=g) / math.sqrt(D)
    b = 0.5 * torch.randn(V, generator=g)
    y = torch.randint(0, V, (N,), generator=g)
    y[::4] = -1
    return h, W, b, y


def _run(backend, h, W, b, y, cfg=HeadConfig(softcap=10.0)):
    leaves = [x.clone().requires_grad_() for x in (h, W, b)]
    valid = y >= 0
    inputs = HeadInputs(hidden=leaves[0], weight=leaves[1], bias=leaves[2], targets=y, counted=valid,
                        vocab=LOCAL.bind(leaves[1]), backend=backend, cfg=cfg, validate=False)
    lp, ent, _ = sweep(inputs, valid)
    u = torch.linspace(-1, 1, N)
    ((lp * u).sum() + (ent * u.flip(0)).sum()).backward()
    return lp.detach(), ent.detach(), [x.grad for x in leaves], u


def _check_oracle(h, W, b, y, out):
    lp, ent, grads, u = out
    ref = [x.double().requires_grad_() for x in (h, W, b)]
    lp2, ent2 = logprobs_entropy_ref(ref[0], ref[1], torch.where(y >= 0, y, -100), ref[2], softcap=10.0)
    ((lp2 * u.double()).sum() + (ent2 * u.flip(0).double()).sum()).backward()
    assert_close("logprobs", lp2, lp, atol=1e-5, rtol=1e-5)
    assert_close("entropy", ent2, ent, atol=1e-5, rtol=1e-5)
    for name, r, got in zip(("hidden", "weight", "bias"), ref, grads):
        assert_grad_close(f"d{name}", r.grad, got, cos_min=0.9999, rel_max=1e-4)


def test_auto_resolves_to_the_failsafe_triton_backend_on_cuda():
    assert backends.resolve("auto", torch.device("cuda")) is backends.AUTO_CUDA
    assert backends.resolve("auto", torch.device("cpu")) is backends.REGISTRY["torch"]
    assert backends.resolve("triton", torch.device("cuda")) is backends.REGISTRY["triton"]


def test_auto_falls_back_once_and_keeps_the_torch_backend(monkeypatch, recwarn):
    calls = _failing(forward_mod, forward_mod.FWD_SPLIT, monkeypatch)
    h, W, b, y = _inputs()
    with pytest.warns(RuntimeWarning, match=r"OutOfResources.*shared memory.*torch backend for this configuration"):
        first = _run(backends.AUTO_CUDA, h, W, b, y)
    assert calls["failed"] == 1
    _check_oracle(h, W, b, y, first)
    # the torch backend's own results, bitwise
    torch_out = _run(backends.REGISTRY["torch"], h, W, b, y)
    for a, c in zip((*first[:2], *first[2]), (*torch_out[:2], *torch_out[2])):
        assert torch.equal(a, c)
    # later calls of this configuration: no new attempt, no new warning
    recwarn.clear()
    again = _run(backends.AUTO_CUDA, h, W, b, y)
    assert calls == {"failed": 1, "ran": 0}
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    assert torch.equal(again[0], first[0])
    # another configuration (here: V) tries the kernels again
    h2, W2, b2, y2 = _inputs(V=V + 3)
    with pytest.warns(RuntimeWarning):
        _run(backends.AUTO_CUDA, h2, W2, b2, y2)
    assert calls["failed"] == 2


def test_backward_failure_falls_back_too(monkeypatch):
    calls = _failing(backward_mod, backward_mod.DLOGITS, monkeypatch)
    forward_calls = _failing(forward_mod, None, monkeypatch)  # counts the forward's launches only
    h, W, b, y = _inputs(seed=1)
    with pytest.warns(RuntimeWarning, match="OutOfResources"):
        out = _run(backends.AUTO_CUDA, h, W, b, y)
    assert calls["failed"] == 1 and forward_calls["ran"] == 2  # the Triton forward ran (split + combine)
    _check_oracle(h, W, b, y, out)
    _run(backends.AUTO_CUDA, h, W, b, y)
    assert calls["failed"] == 1 and forward_calls["ran"] == 2  # now the torch backend, both sweeps


def test_triton_backend_raises(monkeypatch):
    _failing(forward_mod, forward_mod.FWD_SPLIT, monkeypatch)
    h, W, b, y = _inputs()
    with pytest.raises(OutOfResources, match="shared memory"):
        _run(backends.REGISTRY["triton"], h, W, b, y)
    with pytest.raises(OutOfResources):
        fused_logprobs_entropy(h, W, y, backend="triton", ignore_index=-1)
    assert not triton_fused._FAILED


def test_device_out_of_memory_is_not_a_kernel_failure(monkeypatch):
    def launch(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(forward_mod, "launch", launch)
    h, W, b, y = _inputs()
    with pytest.raises(torch.cuda.OutOfMemoryError):
        _run(backends.AUTO_CUDA, h, W, b, y)
    assert not triton_fused._FAILED
