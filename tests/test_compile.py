"""The loss traces into one torch.compile graph (no graph break: no host sync, no
data-dependent Python branching) and compiled results equal eager ones."""

import torch

from fused_pg import fused_logprobs_entropy, repo_loss
from fused_pg.reference.head import logprobs_entropy_ref
from fused_pg.reference.loss import repo_loss_ref


def test_repo_loss_compiles_fullgraph():
    g = torch.Generator().manual_seed(0)
    B, T, D, V = 2, 9, 16, 100
    h = torch.randn(B, T, D, generator=g)
    W = torch.randn(V, D, generator=g) / 2
    y = torch.randint(0, V, (B, T), generator=g)
    adv = torch.randn(B, generator=g)
    old = -3 * torch.rand(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2

    # the per-state centre and the entropy monitor (rollout metrics included) trace too
    kw = dict(entropy_coef=0.01, aggregation="seq-mean-token-mean", repo_center="state", rollout_logprobs=old - 0.1)

    def step(h, W):
        out = repo_loss(h, W, y, adv, old, mask, backend="torch", validate=False, vocab_chunk=32, **kw)
        return out.loss, out.metrics["entropy_mean"], out.metrics["entropy_drive"], out.metrics["clip_low_p_mean"]

    compiled = torch.compile(step, fullgraph=True)
    grads = []
    for fn in (compiled, step):
        hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()
        loss, *monitored = fn(hh, WW)
        loss.backward()
        grads.append((loss.detach(), *monitored, hh.grad, WW.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    ref = repo_loss_ref(h.double(), W.double(), y, adv, old, mask, **kw)
    torch.testing.assert_close(grads[0][0].double(), ref.loss, rtol=1e-5, atol=1e-6)


def test_triton_backend_compiles_fullgraph():
    """backend="triton" inside torch.compile(fullgraph=True): the sweeps are custom operators
    (fused_pg::triton_forward_sweep / triton_backward_sweep), opaque to the compiler, so neither
    the kernel launches nor the backward's cuBLAS calls are traced (``addmm`` with
    ``out_dtype=``/``out=`` trips a fake-tensor bug of torch 2.8-2.12). Under the interpreter
    here; the same test passed on torch 2.11 + triton 3.6 (the GPU machines' versions) on CPU."""
    g = torch.Generator().manual_seed(0)
    N, D, V = 18, 16, 100
    h = torch.randn(N, D, generator=g)
    W = torch.randn(V, D, generator=g) / 2
    y = torch.randint(0, V, (N,), generator=g)
    u = torch.randn(N, generator=g)

    def step(h, W):
        lp, ent = fused_logprobs_entropy(h, W, y, backend="triton", validate=False, softcap=20.0)
        return (lp * u).sum() + 0.1 * ent.sum()

    results = []
    for fn in (torch.compile(step, fullgraph=True), step):
        hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()
        loss = fn(hh, WW)
        loss.backward()
        results.append((loss.detach(), hh.grad, WW.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    hh, WW = h.double().requires_grad_(), W.double().requires_grad_()
    lp, ent = logprobs_entropy_ref(hh, WW, y, softcap=20.0)
    ((lp * u.double()).sum() + 0.1 * ent.sum()).backward()
    torch.testing.assert_close(results[0][0].double(), ((lp * u.double()).sum() + 0.1 * ent.sum()).detach(),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0][1].double(), hh.grad, rtol=1e-4, atol=1e-5)


def test_triton_custom_operators_pass_opcheck():
    """Schema and fake (shape-only) implementations of the Triton sweeps agree with the real ones,
    for every combination of needed gradients and an absent entropy gradient."""
    g = torch.Generator().manual_seed(0)
    N, D, V = 9, 8, 40
    h = torch.randn(N, D, generator=g).to(torch.bfloat16)
    W = torch.randn(V, D, generator=g).to(torch.bfloat16)
    b = torch.randn(V, generator=g).to(torch.bfloat16)
    y = torch.randint(0, V, (N,), generator=g)
    options = dict(temperature=1.0, softcap=None, precision="native", deterministic=True, token_chunk=None,
                   vocab_chunk=16)
    tests = ("test_schema", "test_faketensor")
    fwd = torch.ops.fused_pg.triton_forward_sweep
    torch.library.opcheck(fwd, (h, W, b, y), dict(options, fallback=False), test_utils=tests)
    _, entropy, lse = fwd(h, W, b, y, **options, fallback=False)
    grad = torch.randn(N, generator=g)
    for needs in ((True, True, True), (True, False, False), (False, True, False)):
        for grad_entropy in (grad, None):
            torch.library.opcheck(
                torch.ops.fused_pg.triton_backward_sweep, (h, W, b, y, lse, entropy, grad, grad_entropy),
                dict(options, need_dh=needs[0], need_dw=needs[1], need_db=needs[2], fallback=True), test_utils=tests)
