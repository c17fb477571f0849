"""The loss traces into one torch.compile graph (no graph break: no host sync, no
data-dependent Python branching) and compiled results equal eager ones."""

import torch

from fused_pg import repo_loss
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
