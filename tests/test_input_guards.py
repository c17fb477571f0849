"""Inputs the losses must tolerate on every backend: padding rows that hold NaN, autocast
around the head, small integer target dtypes, and bad values with ``validate=False`` (which
must never read out of bounds or be counted, and on which the backends agree)."""

import math

import pytest
import torch

import fused_pg
from fused_pg.reference.loss import repo_loss_ref
from helpers import BACKENDS, assert_close, assert_grad_close


def _batch(seed=0, B=3, T=7, D=9, V=31, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g).to(dtype)
    W = (torch.randn(V, D, generator=g) / 2).to(dtype)
    b = (0.3 * torch.randn(V, generator=g)).to(dtype)
    y = torch.randint(0, V, (B, T), generator=g)
    adv = torch.randn(B, T, generator=g)
    old = -3 * torch.rand(B, T, generator=g) - 0.2
    mask = torch.rand(B, T, generator=g) > 0.3
    return h, W, b, y, adv, old, mask


def _run(backend, h, W, b, y, adv, old, mask, **kw):
    hh, WW, bb = (x.detach().clone().requires_grad_() for x in (h, W, b))
    out = fused_pg.repo_loss(hh, WW, y, adv, old, mask, bias=bb, backend=backend, entropy_coef=0.01, **kw)
    out.loss.backward()
    return out, (hh.grad, WW.grad, bb.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("validate", [True, False])
def test_nan_hidden_rows_that_do_not_count_never_leak(backend, validate):
    """Padding rows of hidden may hold NaN/Inf (some attention kernels leave them): masked and
    ignored tokens must not touch loss, dW or db, and validation only checks rows that count."""
    h, W, b, y, adv, old, mask = _batch()
    y = y.clone()
    y[0, 1] = -100  # an ignored token (mask says it counts)
    mask[0, 1] = True
    clean, clean_g = _run(backend, h, W, b, y, adv, old, mask, validate=validate)
    dirty_h = h.clone()
    dirty_h[~mask] = math.nan
    dirty_h[0, 1] = math.inf
    dirty, dirty_g = _run(backend, dirty_h, W, b, y, adv, old, mask, validate=validate)
    assert torch.equal(clean.loss, dirty.loss)
    for name, a, c in zip(("hidden", "weight", "bias"), clean_g, dirty_g):
        assert torch.isfinite(c).all(), f"grad {name} not finite"
        assert torch.equal(a, c), name
    assert (dirty_g[0][~mask] == 0).all() and (dirty_g[0][0, 1] == 0).all()
    # a NaN in a row that counts is still refused by name
    if validate:
        bad = h.clone()
        bad[mask.nonzero()[0].tolist()] = math.nan
        with pytest.raises(ValueError, match="hidden"):
            fused_pg.repo_loss(bad, W, y, adv, old, mask, bias=b, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("backward_inside", [True, False])
def test_autocast_does_not_change_the_head(backend, backward_inside):
    """Under torch.autocast(bfloat16) the head runs on its inputs' own dtypes, forward and
    backward alike (inside or outside the autocast region): same result as without autocast."""
    h, W, b, y, adv, old, mask = _batch(1)
    ref, ref_g = _run(backend, h, W, b, y, adv, old, mask)
    hh, WW, bb = (x.detach().clone().requires_grad_() for x in (h, W, b))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_pg.repo_loss(hh, WW, y, adv, old, mask, bias=bb, backend=backend, entropy_coef=0.01)
        if backward_inside:
            out.loss.backward()
    if not backward_inside:
        out.loss.backward()
    assert out.loss.dtype == torch.float32
    assert_close("loss under autocast", ref.loss, out.loss, atol=1e-6, rtol=1e-6)
    for name, a, c in zip(("hidden", "weight", "bias"), ref_g, (hh.grad, WW.grad, bb.grad)):
        assert_grad_close(f"grad {name} under autocast", a.double(), c, cos_min=1 - 1e-9, rel_max=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_small_integer_target_dtypes(backend, dtype):
    """Targets of any integer dtype give the int64 result; with uint8, ignore_index=-100 must not
    wrap to 156 and drop that token; ids stay in range with a bias (no IndexError)."""
    V = 200 if dtype == torch.uint8 else 120
    h, W, b, _, adv, old, mask = _batch(2, V=V)
    g = torch.Generator().manual_seed(5)
    hi = min(V, torch.iinfo(dtype).max + 1)
    y64 = torch.randint(0, hi, mask.shape, generator=g)
    if dtype == torch.uint8:
        y64[0, :3] = 156  # the id that -100 wraps to in uint8
    a, a_g = _run(backend, h, W, b, y64, adv, old, mask)
    c, c_g = _run(backend, h, W, b, y64.to(dtype), adv, old, mask)
    assert torch.equal(a.loss, c.loss) and torch.equal(a.logprobs, c.logprobs)
    for x, z in zip(a_g, c_g):
        assert torch.equal(x, z)
    if dtype == torch.uint8:
        assert (c.logprobs[0, :3] != 0).all() == bool(mask[0, :3].all())
    lp, _ = fused_pg.fused_logprobs_entropy(h, W, y64.to(dtype), bias=b, backend=backend)
    lp64, _ = fused_pg.fused_logprobs_entropy(h, W, y64, bias=b, backend=backend)
    assert torch.equal(lp, lp64)


@pytest.mark.parametrize("bad_id", [-1, 31, 1000])
def test_unchecked_out_of_range_targets_do_not_count_on_any_backend(bad_id):
    """validate=False (the GPU default): a target outside [0, V) that is not ignore_index is
    neither read nor counted -- the same result as masking it -- on every backend."""
    h, W, b, y, adv, old, mask = _batch(3, V=31)
    y = y.clone()
    y[1, 2] = bad_id
    mask[1, 2] = True
    masked = mask.clone()
    masked[1, 2] = False
    results = []
    for backend in BACKENDS:
        out, grads = _run(backend, h, W, b, y, adv, old, mask, validate=False)
        want, want_g = _run(backend, h, W, b, y, adv, old, masked, validate=False)
        assert_close(f"{backend}: loss with a bad id", want.loss, out.loss, atol=1e-7, rtol=1e-6)
        assert float(out.metrics["n_tokens"]) == float(want.metrics["n_tokens"])
        for a, c in zip(want_g, grads):
            assert_grad_close(f"{backend}: grad", a.double(), c, cos_min=1 - 1e-9, rel_max=1e-5)
        results.append(out.loss)
    for r in results[1:]:
        assert_close("backends agree", results[0], r, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="targets"):
        fused_pg.repo_loss(h, W, y, adv, old, mask, bias=b, validate=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cu", [[0, 5, 40], [0, 30, 9], [-3, 4, 21], [0, 21, 21, 50]])
def test_unchecked_cu_seqlens_never_index_out_of_bounds(backend, cu):
    """cu_seqlens past N, decreasing or negative, unchecked: a finite result, no out-of-bounds
    read (offsets are clamped into [0, N] and pinned to 0 ... N)."""
    h, W, b, y, adv, old, mask = _batch(4)
    flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731
    out, grads = _run(backend, flat(h), W, b, flat(y), flat(adv), flat(old), flat(mask),
                      cu_seqlens=torch.tensor(cu), aggregation="seq-mean-token-mean",
                      importance_level="sequence", validate=False)
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(g).all() for g in grads)
    with pytest.raises(ValueError, match="cu_seqlens"):
        fused_pg.repo_loss(flat(h), W, flat(y), flat(adv), flat(old), flat(mask), bias=b,
                           cu_seqlens=torch.tensor(cu), aggregation="seq-mean-token-mean", validate=True)


def test_masked_nan_hidden_matches_the_oracle_on_clean_rows():
    """The NaN-padded run equals the fp64 oracle on the same batch with finite padding."""
    h, W, b, y, adv, old, mask = _batch(5)
    dirty = h.clone()
    dirty[~mask] = math.nan
    out, (dh, dW, db) = _run("torch", dirty, W, b, y, adv, old, mask)
    hh, WW, bb = (x.double().requires_grad_() for x in (h, W, b))
    ref = repo_loss_ref(hh, WW, y, adv, old, mask, bias=bb, entropy_coef=0.01)
    ref.loss.backward()
    assert_close("loss", ref.loss, out.loss, atol=1e-5, rtol=1e-5)
    assert_grad_close("grad weight", WW.grad, dW, cos_min=0.9999, rel_max=1e-4)
    assert_grad_close("grad bias", bb.grad, db, cos_min=0.9999, rel_max=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compacted_and_zeroed_rows_agree(backend):
    """Sweeping only the rows that count (compact_rows=True) and sweeping every row with the
    others zeroed (False) give the same loss and gradients, NaN padding or not."""
    h, W, b, y, adv, old, mask = _batch(6)
    mask[1] = False
    dirty = h.clone()
    dirty[~mask] = math.nan
    a, a_g = _run(backend, dirty, W, b, y, adv, old, mask, compact_rows=True)
    c, c_g = _run(backend, dirty, W, b, y, adv, old, mask, compact_rows=False)
    assert_close("loss compacted vs zeroed", c.loss, a.loss, atol=1e-6, rtol=1e-6)
    assert torch.equal(a.logprobs == 0, c.logprobs == 0)
    for name, x, z in zip(("hidden", "weight", "bias"), c_g, a_g):
        assert_grad_close(f"grad {name} compacted vs zeroed", x.double(), z, cos_min=1 - 1e-9, rel_max=1e-5)
