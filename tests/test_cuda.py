"""GPU checks of the Triton backend with the real compiler (skipped without CUDA).

Shapes up to N=16384, D=4096, V=151936 (N*V > 2^31: the int32-overflow shape), bf16, fp16
and fp32, against fp64 references: materialised for medium shapes; row-sampled for the
large ones (a row's logp, entropy and dh depend on that row only), with dW checked against
the chunked fp32 torch backend or the same sweep on a row-major copy. Also: the backward
GEMMs on cuBLAS and on the Triton fallback, fp16 at a large loss normaliser, bias views,
a column-major weight with offsets past 2^31, bitwise determinism with cuBLAS, the tuning sweep.
"""

import pytest
import torch

from fused_pg import fused_logprobs_entropy, repo_loss
from fused_pg.reference.head import logprobs_entropy_ref
from fused_pg.reference.loss import repo_loss_ref
from helpers import GPU_TOLS, Tol, assert_close

pytestmark = pytest.mark.cuda

# pass rules: the GPU rows of the shared table (tests/helpers/tolerances.py says where and why
# they differ from the CPU property tests' rows)
TOL = {torch.float32: GPU_TOLS["fp32"], torch.bfloat16: GPU_TOLS["bf16"], torch.float16: GPU_TOLS["fp16"]}


def _problem(N, D, V, dtype, seed=0, bias=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    h = torch.randn(N, D, device="cuda", generator=g).to(dtype)
    W = (torch.randn(V, D, device="cuda", generator=g) / D**0.5 * 2).to(dtype)
    b = torch.randn(V, device="cuda", generator=g).to(dtype) if bias else None
    y = torch.randint(0, V, (N,), device="cuda", generator=g)
    y[::17] = -100
    u = torch.randn(N, device="cuda", generator=g)
    w = torch.randn(N, device="cuda", generator=g)
    return h, W, b, y, u, w


def _check_close(name, ref, got, tol: Tol):
    """logp / entropy: |d| <= tol.head elementwise, times (1 + |ref|) where the row is relative."""
    assert_close(name, ref, got, atol=tol.head, rtol=tol.head if tol.head_rel else 0.0)


def _check_grad(name, ref, got, tol: Tol):
    """cosine >= tol.cos_min and max|d| / max|ref| <= tol.grad_rel[dtype of the gradient]
    (no subnormal allowance, no noise-floor fallback: see GPU_TOLS)."""
    rel_max = tol.grad_rel[got.dtype]
    ref, got = ref.double().flatten(), got.double().flatten()
    cos = torch.nn.functional.cosine_similarity(ref, got, dim=0).item()
    rel = ((ref - got).abs().max() / ref.abs().max()).item()
    print(f"{name}: cos {cos:.7f}, max rel {rel:.2e}")
    assert cos >= tol.cos_min and rel <= rel_max, name


def _fused(h, W, b, y, u, w, **kw):
    # detach, not clone: a strided, expanded or column-major view reaches the kernels as it is
    hh = h.detach().requires_grad_()
    WW = W.detach().requires_grad_()
    bb = b.detach().requires_grad_() if b is not None else None
    lp, ent = fused_logprobs_entropy(hh, WW, y, bias=bb, backend="triton", validate=True, **kw)
    ((lp * u).sum() + (ent * w).sum()).backward()
    return lp, ent, hh.grad, WW.grad, bb.grad if bb is not None else None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1000, 512, 32003), (4097, 1024, 50257)])
def test_matches_fp64_reference(dtype, shape):
    h, W, b, y, u, w = _problem(*shape, dtype, bias=True)
    lp, ent, dh, dW, db = _fused(h, W, b, y, u, w, softcap=30.0, temperature=0.9)
    hh, WW, bb = (x.double().requires_grad_() for x in (h, W, b))
    lp_r, ent_r = logprobs_entropy_ref(hh, WW, y, bb, softcap=30.0, temperature=0.9)
    ((lp_r * u).sum() + (ent_r * w).sum()).backward()
    _check_close("logprobs", lp_r, lp, TOL[dtype])
    _check_close("entropy", ent_r, ent, TOL[dtype])
    for name, r, g in (("hidden", hh.grad, dh), ("weight", WW.grad, dW), ("bias", bb.grad, db)):
        _check_grad(f"{dtype} {shape} d{name}", r, g, TOL[dtype])


@pytest.mark.parametrize("precision", ["native", "tf32", "ieee"])
def test_precisions_and_mixed_dtypes(precision):
    h, W, b, y, u, w = _problem(777, 640, 20011, torch.bfloat16)
    W32 = W.float()  # bf16 activations, fp32 master weight
    lp, ent, dh, dW, _ = _fused(h, W32, None, y, u, w, precision=precision)
    hh, WW = h.double().requires_grad_(), W32.double().requires_grad_()
    lp_r, ent_r = logprobs_entropy_ref(hh, WW, y)
    ((lp_r * u).sum() + (ent_r * w).sum()).backward()
    tol = GPU_TOLS["tf32" if precision == "tf32" else "bf16+fp32"]
    _check_close("logprobs", lp_r, lp, tol)
    _check_close("entropy", ent_r, ent, tol)
    _check_grad(f"{precision} dhidden", hh.grad, dh, tol)  # bf16
    _check_grad(f"{precision} dweight", WW.grad, dW, tol)  # fp32


def test_large_int32_overflow_shape():
    """N*V = 2.49e9 > 2^31 elements of (never materialised) logits."""
    N, D, V = 16384, 4096, 151936
    h, W, _, y, u, w = _problem(N, D, V, torch.bfloat16)
    lp, ent, dh, dW, _ = _fused(h, W, None, y, u, w)
    assert torch.isfinite(dh).all() and torch.isfinite(dW).all()
    rows = torch.randperm(N, device="cuda")[:256]
    rows = torch.cat([rows, torch.tensor([0, N - 1], device="cuda")])
    hh = h[rows].double().requires_grad_()
    lp_r, ent_r = logprobs_entropy_ref(hh, W.double(), y[rows])
    ((lp_r * u[rows]).sum() + (ent_r * w[rows]).sum()).backward()
    _check_close("logprobs", lp_r, lp[rows], TOL[torch.bfloat16])
    _check_close("entropy", ent_r, ent[rows], TOL[torch.bfloat16])
    _check_grad("large dhidden (rows)", hh.grad, dh[rows], TOL[torch.bfloat16])
    # dW sums over every token: compare with the chunked fp32 torch backend
    WW = W.clone().requires_grad_()
    lp_t, ent_t = fused_logprobs_entropy(h, WW, y, backend="torch", token_chunk=4096, vocab_chunk=16384)
    ((lp_t * u).sum() + (ent_t * w).sum()).backward()
    _check_grad("large dweight", WW.grad, dW, TOL[torch.bfloat16])


def test_deterministic_mode_is_bitwise_reproducible():
    h, W, b, y, u, w = _problem(4096, 1024, 32000, torch.bfloat16, bias=True)
    first = _fused(h, W, b, y, u, w, deterministic=True)
    second = _fused(h, W, b, y, u, w, deterministic=True)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


def test_autotuned_path_matches(monkeypatch):
    monkeypatch.setenv("FUSED_PG_AUTOTUNE", "1")
    h, W, b, y, u, w = _problem(2048, 1024, 32000, torch.bfloat16)
    lp, ent, dh, dW, _ = _fused(h, W, None, y, u, w)
    hh, WW = h.double().requires_grad_(), W.double().requires_grad_()
    lp_r, ent_r = logprobs_entropy_ref(hh, WW, y)
    ((lp_r * u).sum() + (ent_r * w).sum()).backward()
    _check_close("logprobs", lp_r, lp, TOL[torch.bfloat16])
    _check_grad("autotuned dhidden", hh.grad, dh, TOL[torch.bfloat16])
    _check_grad("autotuned dweight", WW.grad, dW, TOL[torch.bfloat16])


@pytest.mark.parametrize("options", [
    dict(repo="decorrelate", kl_coef=0.05, entropy_coef=0.01, dual_clip=3.0),
    dict(repo="fixed", repo_coef=0.2, importance_level="sequence", aggregation="seq-mean-token-mean"),
])
def test_repo_loss_on_gpu(options):
    B, T, D, V = 8, 300, 768, 32003
    g = torch.Generator(device="cuda").manual_seed(1)
    h = torch.randn(B, T, D, device="cuda", generator=g).to(torch.bfloat16)
    W = (torch.randn(V, D, device="cuda", generator=g) / D**0.5 * 2).to(torch.bfloat16)
    y = torch.randint(0, V, (B, T), device="cuda", generator=g)
    adv = torch.randn(B, device="cuda", generator=g)
    old = -torch.rand(B, T, device="cuda", generator=g) * 4
    ref = -torch.rand(B, T, device="cuda", generator=g) * 4
    mask = torch.rand(B, T, device="cuda", generator=g) > 0.1
    kw = dict(ref_logprobs=ref, **options)
    hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()
    out = repo_loss(hh, WW, y, adv, old, mask, backend="triton", **kw)
    out.loss.backward()
    hr, Wr = h.double().requires_grad_(), W.double().requires_grad_()
    ref_out = repo_loss_ref(hr, Wr, y, adv, old, mask, **kw)
    ref_out.loss.backward()
    tol = TOL[torch.bfloat16]
    assert_close("loss", ref_out.loss, out.loss, atol=tol.value, rtol=tol.value)
    _check_grad("repo dhidden", hr.grad, hh.grad, tol)
    _check_grad("repo dweight", Wr.grad, WW.grad, tol)


# ---------------------------------------------------------------------------------------------
# backward GEMMs on cuBLAS, fp16 scaling, strides and 64-bit offsets, tuning (GPU side of
# tests/test_kernel_paths.py and tests/test_kernel_inputs.py)
# ---------------------------------------------------------------------------------------------

def _gemm_choice(dtype, deterministic=False):
    from fused_pg.kernels.gemm import gemm_impl
    return gemm_impl(dtype, torch.device("cuda"), deterministic)


@pytest.mark.parametrize("gemm", ["auto", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backward_gemms_match_fp64(dtype, gemm, monkeypatch):
    """cuBLAS (auto, torch >= 2.8) and the Triton matmul fallback, both against fp64."""
    monkeypatch.setenv("FUSED_PG_GEMM", gemm)
    from fused_pg.kernels.gemm import cublas_fp32_output
    if gemm == "auto":
        expected = "cublas" if cublas_fp32_output(torch.device("cuda"), dtype) else "triton"
        print(f"auto GEMM for {dtype}: {_gemm_choice(dtype)} (torch {torch.__version__})")
        assert _gemm_choice(dtype) == expected
    h, W, b, y, u, w = _problem(4097, 1024, 50257, dtype, bias=True)
    lp, ent, dh, dW, db = _fused(h, W, b, y, u, w, softcap=30.0)
    hh, WW, bb = (x.double().requires_grad_() for x in (h, W, b))
    lp_r, ent_r = logprobs_entropy_ref(hh, WW, y, bb, softcap=30.0)
    ((lp_r * u).sum() + (ent_r * w).sum()).backward()
    _check_close("logprobs", lp_r, lp, TOL[dtype])
    _check_close("entropy", ent_r, ent, TOL[dtype])
    for name, r, g in (("hidden", hh.grad, dh), ("weight", WW.grad, dW), ("bias", bb.grad, db)):
        _check_grad(f"{gemm} {dtype} d{name}", r, g, TOL[dtype])


def test_cublas_and_triton_gemms_agree(monkeypatch):
    h, W, b, y, u, w = _problem(4096, 2048, 32000, torch.bfloat16, bias=True)
    runs = {}
    for gemm in ("auto", "triton"):
        monkeypatch.setenv("FUSED_PG_GEMM", gemm)
        runs[gemm] = _fused(h, W, b, y, u, w)
    for name, a, c in zip(("logprobs", "entropy", "dh", "dW", "db"), runs["auto"], runs["triton"]):
        if name in ("logprobs", "entropy"):
            assert torch.equal(a, c), name  # the forward does not depend on the GEMM choice
        else:
            _check_grad(f"cuBLAS vs Triton {name}", c, a, TOL[torch.bfloat16])


def test_fp16_gradients_at_a_large_normaliser():
    """num_items_in_batch = 65536: per-token gradients ~1.5e-5; fp16 dlogits must not flush
    (before the power-of-two scale: dh max rel error 2.4e-2 on an H100, torch backend 3.7e-4)."""
    h, W, _, y, u, w = _problem(4096, 1024, 32000, torch.float16)
    u, w = u / 65536, w * (0.01 / 65536)
    lp, ent, dh, dW, _ = _fused(h, W, None, y, u, w)
    hh, WW = h.double().requires_grad_(), W.double().requires_grad_()
    lp_r, ent_r = logprobs_entropy_ref(hh, WW, y)
    ((lp_r * u).sum() + (ent_r * w).sum()).backward()
    _check_grad("fp16 /65536 dhidden", hh.grad, dh, TOL[torch.float16])
    _check_grad("fp16 /65536 dweight", WW.grad, dW, TOL[torch.float16])


@pytest.mark.parametrize("view", ["strided", "expanded", "offset"])
def test_bias_views(view):
    """torch.randn(2V)[::2] (H100 before the fix: loss 0.2596 vs 0.2474), a stride-0 bias
    (read past its storage before), and an offset slice."""
    h, W, b, y, u, w = _problem(1000, 512, 32003, torch.bfloat16, bias=True)
    if view == "strided":
        bv = torch.zeros(2 * b.numel(), device="cuda", dtype=b.dtype)[::2]
        bv.copy_(b)
    elif view == "expanded":
        bv = b[3:4].expand(b.numel())
    else:
        bv = torch.cat([torch.zeros(5, device="cuda", dtype=b.dtype), b])[5:]
    lp, ent, dh, dW, db = _fused(h, W, bv, y, u, w)
    hh, WW, bb = h.double().requires_grad_(), W.double().requires_grad_(), bv.double().requires_grad_()
    lp_r, ent_r = logprobs_entropy_ref(hh, WW, y, bb)
    ((lp_r * u).sum() + (ent_r * w).sum()).backward()
    _check_close("logprobs", lp_r, lp, TOL[torch.bfloat16])
    _check_close("entropy", ent_r, ent, TOL[torch.bfloat16])
    _check_grad(f"{view} bias dhidden", hh.grad, dh, TOL[torch.bfloat16])
    _check_grad(f"{view} bias dbias", bb.grad, db, TOL[torch.bfloat16])


def _rows_fp64(h_rows, W, y_rows, u_rows, w_rows, chunk=16384):
    """logp, entropy and dh of a few rows in fp64, streaming W in vocabulary chunks."""
    z = torch.cat([h_rows.double() @ W[v0:v0 + chunk].double().T for v0 in range(0, W.shape[0], chunk)], 1)
    logp_all = torch.log_softmax(z, 1)
    p = logp_all.exp()
    H = -(p * logp_all).sum(1)
    lp = logp_all.gather(1, y_rows[:, None]).squeeze(1)
    onehot = torch.zeros_like(p).scatter_(1, y_rows[:, None], 1.0)
    dz = u_rows.double()[:, None] * (onehot - p) - w_rows.double()[:, None] * p * (logp_all + H[:, None])
    dh = sum(dz[:, v0:v0 + chunk] @ W[v0:v0 + chunk].double() for v0 in range(0, W.shape[0], chunk))
    return lp, H, dh


def test_column_major_weight_with_offsets_past_2_31():
    """W.T.contiguous().T with D = 8192, V = 262400 (bf16): d * stride_wd passes 2^31
    (H100 before the fix: illegal memory access)."""
    N, D, V = 256, 8192, 262400
    h, W, _, y, u, w = _problem(N, D, V, torch.bfloat16)
    y = y.clamp_min(0)
    W_col = W.T.contiguous().T
    assert W_col.stride() == (1, V) and (D - 1) * V >= 2**31
    lp, ent, dh, dW, _ = _fused(h, W_col, None, y, u, w)
    rows = torch.tensor([0, 1, 77, 128, 200, N - 1], device="cuda")
    lp_r, ent_r, dh_r = _rows_fp64(h[rows], W, y[rows], u[rows], w[rows])
    _check_close("logprobs", lp_r, lp[rows], TOL[torch.bfloat16])
    _check_close("entropy", ent_r, ent[rows], TOL[torch.bfloat16])
    _check_grad("column-major dhidden (rows)", dh_r, dh[rows], TOL[torch.bfloat16])
    del W_col
    _, _, _, dW_row, _ = _fused(h, W, None, y, u, w)  # the row-major weight: same sums
    _check_grad("column-major vs row-major dweight", dW_row, dW, TOL[torch.bfloat16])


def test_deterministic_cublas_path_in_a_fresh_process():
    """deterministic=True takes cuBLAS only with CUBLAS_WORKSPACE_CONFIG set before CUDA starts:
    two runs in such a process must be bitwise equal."""
    import os
    import subprocess
    import sys
    script = (
        "import torch, fused_pg\n"
        "from fused_pg.kernels.gemm import gemm_impl, cublas_fp32_output\n"
        "dev = torch.device('cuda')\n"
        "g = torch.Generator(device='cuda').manual_seed(0)\n"
        "h = torch.randn(4096, 1024, device='cuda', generator=g).bfloat16()\n"
        "W = (torch.randn(32000, 1024, device='cuda', generator=g) / 16).bfloat16()\n"
        "y = torch.randint(0, 32000, (4096,), device='cuda', generator=g)\n"
        "u = torch.randn(4096, device='cuda', generator=g)\n"
        "runs = []\n"
        "for _ in range(2):\n"
        "    hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()\n"
        "    lp, ent = fused_pg.fused_logprobs_entropy(hh, WW, y, backend='triton', deterministic=True)\n"
        "    ((lp * u).sum() + ent.sum()).backward()\n"
        "    runs.append((lp, ent, hh.grad, WW.grad))\n"
        "assert all(torch.equal(a, c) for a, c in zip(*runs))\n"
        "print(gemm_impl(torch.bfloat16, dev, True))\n"
        "assert gemm_impl(torch.bfloat16, dev, True) == ('cublas' if cublas_fp32_output(dev, torch.bfloat16) else 'triton')\n"
    )
    env = dict(os.environ, CUBLAS_WORKSPACE_CONFIG=":4096:8")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    print("deterministic GEMM with CUBLAS_WORKSPACE_CONFIG=:4096:8:", run.stdout.strip())


def test_deterministic_without_workspace_config_uses_triton(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.delenv("FUSED_PG_GEMM", raising=False)
    assert _gemm_choice(torch.bfloat16, deterministic=True) == "triton"


def test_tuning_sweep_on_the_gpu():
    from fused_pg.kernels.tuning import candidates, format_row, sweep
    for kind in ("fwd", "dlogits", "matmul"):
        rows = sweep(kind, (2048, 1024, 32000), torch.bfloat16, "cuda", configs=candidates(kind)[:2])
        assert rows and all(r.ms > 0 for r in rows) and rows == sorted(rows, key=lambda r: r.ms)
        print(format_row(rows[0]))


# ---------------------------------------------------------------------------------------------
# soft-cap range, entropy-gradient skip, torch.compile, the default table's tiles on this GPU
# (GPU side of tests/test_softcap.py, test_entropy_grad_skip.py, test_compile.py, test_kernel_compile.py)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("softcap", [1.0, 30.0, 1e4, 1e8])
def test_softcap_over_the_range_of_caps(softcap):
    """The kernels' tanh on the GPU (ex2.approx inside): fp32 inputs against fp64 for caps up
    to 1e8 (the former 1 - 2/(e^2x + 1) returned 0 for every logit at 1e8)."""
    h, W, b, y, u, w = _problem(1000, 512, 32003, torch.float32, bias=True)
    lp, ent, dh, dW, db = _fused(h, W, b, y, u, w, softcap=softcap)
    hh, WW, bb = (x.double().requires_grad_() for x in (h, W, b))
    lp_r, ent_r = logprobs_entropy_ref(hh, WW, y, bb, softcap=softcap)
    ((lp_r * u).sum() + (ent_r * w).sum()).backward()
    _check_close("logprobs", lp_r, lp, TOL[torch.float32])
    _check_close("entropy", ent_r, ent, TOL[torch.float32])
    _check_grad(f"softcap {softcap:g} dhidden", hh.grad, dh, TOL[torch.float32])
    _check_grad(f"softcap {softcap:g} dweight", WW.grad, dW, TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_entropy_gradient_skip_is_exact(dtype):
    """Entropy only logged (no gradient reaches it): the gradients equal, bitwise, those with a
    zero entropy gradient (the kernel compiled without the term vs with it times 0)."""
    h, W, b, y, u, _ = _problem(2048, 1024, 32000, dtype, bias=True)
    runs = []
    for weight in (None, 0.0):
        hh, WW = h.detach().requires_grad_(), W.detach().requires_grad_()
        lp, ent = fused_logprobs_entropy(hh, WW, y, bias=b, backend="triton", deterministic=True)
        loss = (lp * u).sum() + (0.0 if weight is None else weight * ent.sum())
        loss.backward()
        runs.append((hh.grad, WW.grad))
    for a, c in zip(*runs):
        assert torch.equal(a, c)


def test_triton_backend_under_torch_compile():
    h, W, _, y, u, w = _problem(4096, 1024, 32000, torch.bfloat16)
    y = y.clamp_min(0)

    def step(h, W):
        lp, ent = fused_logprobs_entropy(h, W, y, backend="triton", validate=False)
        return (lp * u).sum() + (ent * w).sum()

    grads = []
    for fn in (torch.compile(step, fullgraph=True), step):
        hh, WW = h.detach().requires_grad_(), W.detach().requires_grad_()
        fn(hh, WW).backward()
        grads.append((hh.grad, WW.grad))
    for a, c in zip(*grads):
        _check_grad("compiled vs eager", c.float(), a.float(), TOL[torch.bfloat16])


def test_default_tiles_launch_on_this_gpu(recwarn):
    """Every operand kind and epilogue with the table's tile for this GPU: launched, no fail-safe
    fallback (backend="auto" would warn), and the compile test's shared-memory figure is real."""
    for hd, wd, precision, softcap in ((torch.bfloat16, torch.bfloat16, "native", None),
                                       (torch.bfloat16, torch.bfloat16, "native", 30.0),
                                       (torch.float16, torch.float16, "native", 30.0),
                                       (torch.bfloat16, torch.float32, "native", None),
                                       (torch.float32, torch.float32, "tf32", None),
                                       (torch.float32, torch.float32, "ieee", None)):
        h, W, _, y, u, w = _problem(1024, 1024, 32000, torch.float32)
        hh, WW = h.to(hd).requires_grad_(), W.to(wd).requires_grad_()
        lp, ent = fused_logprobs_entropy(hh, WW, y, backend="auto", precision=precision, softcap=softcap)
        ((lp * u).sum() + (ent * w).sum()).backward()
        assert torch.isfinite(hh.grad).all() and torch.isfinite(WW.grad).all()
    assert not [str(x.message) for x in recwarn if "Triton kernels failed" in str(x.message)]
