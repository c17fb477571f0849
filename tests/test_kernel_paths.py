"""The Triton backend's execution paths under the interpreter, each against the fp64 oracle:
grouped launch orders, vocabulary split counts, the cuBLAS-path orchestration (run on CPU with
fp32 torch GEMMs), fp16 dlogits scaling; and the CPU-testable parts of the config table, the
launch helper and the tuning sweep.
"""

import math

import pytest
import torch
import triton
import triton.language as tl

import fused_pg.kernels.configs as configs
import fused_pg.kernels.gemm as gemm_mod
import fused_pg.kernels.launch as launch_mod
import fused_pg.kernels.backward as backward_mod
from fused_pg.kernels.backward import (FP16_DLOGITS_MAX, SLAB_BYTES, default_chunks, dlogits_scale,
                                      logprobs_entropy_bwd, slab_traffic)
from fused_pg.kernels.forward import logprobs_entropy_fwd, num_vocab_splits, split_time
from fused_pg.kernels.tuning import Timing, candidates, describe, format_row, sweep
from fused_pg.kernels.utils import grouped_tile
from fused_pg.reference.head import logprobs_entropy_ref
from fused_pg.reference.head import logits_ref
from helpers import assert_close, check_grads, grad_floors, head_cases, run_property
from test_head import check_head_case

pytestmark = pytest.mark.interpreter


def _problem(N, D, V, dtype, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=gen).to(dtype)
    W = (2 * torch.randn(V, D, generator=gen) / math.sqrt(D)).to(dtype)
    b = (0.5 * torch.randn(V, generator=gen)).to(dtype) if bias else None
    y = torch.randint(0, V, (N,), generator=gen)
    y[::7] = -1
    u = torch.randn(N, generator=gen) * (y >= 0)
    w = torch.randn(N, generator=gen) * (y >= 0)
    return h, W, b, y, u, w


def _oracle(h, W, b, y, u, w, dlogits=None):
    """fp64 logp, entropy, gradients (upstream u, w) and their noise floors."""
    leaves = [None if x is None else x.double().requires_grad_() for x in (h, W, b)]
    lp, ent = logprobs_entropy_ref(leaves[0], leaves[1], torch.where(y >= 0, y, -100), leaves[2])
    ((lp * u.double()).sum() + (ent * w.double()).sum()).backward()
    with torch.no_grad():
        z = logits_ref(*leaves)
    floors = grad_floors(leaves[0], leaves[1], u.double(), w.double(), ent.detach(), z, temperature=1.0,
                         fp64=False, dlogits=dlogits)
    grads = {k: x.grad for k, x in zip(("hidden", "weight", "bias"), leaves) if x is not None}
    return lp.detach(), ent.detach(), grads, floors


FWD_OPTS = dict(inv_temperature=1.0, softcap=None, input_precision="ieee", deterministic=True)


# ---------------------------------------------------------------------------------------------
# launch order
# ---------------------------------------------------------------------------------------------

@triton.jit
def _order_kernel(out_ptr, num_m, num_n, GROUP: tl.constexpr):
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_tile(pid, num_m, num_n, GROUP)
    tl.store(out_ptr + 2 * pid, pid_m)
    tl.store(out_ptr + 2 * pid + 1, pid_n)


@pytest.mark.parametrize("num_m,num_n,group", [(1, 1, 1), (5, 3, 2), (7, 4, 3), (4, 6, 8), (3, 1, 2), (6, 5, 1)])
def test_grouped_order_visits_every_tile_once(num_m, num_n, group):
    out = torch.full((num_m * num_n, 2), -1, dtype=torch.int32)
    _order_kernel[(num_m * num_n,)](out, num_m, num_n, GROUP=group)
    tiles = [tuple(t) for t in out.tolist()]
    assert sorted(tiles) == [(m, n) for m in range(num_m) for n in range(num_n)]
    # consecutive programs walk one group's row blocks fastest
    for pid, (m, n) in enumerate(tiles):
        g, r = divmod(pid, group * num_n)
        rows = min(group, num_m - g * group)
        assert (m, n) == (g * group + r % rows, r // rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_launch_orders_and_splits(dtype):
    """Every grouping gives bitwise the same result (a tile's work does not depend on which
    program does it); every split count matches the oracle."""
    h, W, b, y, u, w = _problem(50, 24, 200, dtype)
    upcast = dtype == torch.bfloat16  # the interpreter's bf16 dot workaround
    ref_lp, ref_ent, _, _ = _oracle(h, W, b, y, u, w)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    results = {}
    # 4 token blocks x 7 vocabulary tiles; GROUP 3 leaves a one-block last group
    for group, splits in [(1, 3), (2, 3), (3, 3), (8, 3), (2, 1), (2, 7)]:
        cfg = configs.sweep_config(16, 32, 16, group, 4, 1)
        lp, ent, _ = logprobs_entropy_fwd(h, W, b, y, upcast_operands=upcast, config=cfg, splits=splits, **FWD_OPTS)
        assert_close(f"logprobs g{group} s{splits}", ref_lp, lp, atol=tol, rtol=tol)
        assert_close(f"entropy g{group} s{splits}", ref_ent, ent, atol=tol, rtol=tol)
        results[group, splits] = (lp, ent)
    for group in (2, 3, 8):
        assert torch.equal(results[group, 3][0], results[1, 3][0]), group
        assert torch.equal(results[group, 3][1], results[1, 3][1]), group


def test_default_split_count_takes_the_grouped_path():
    """The default config and split count under the interpreter: several groups and splits."""
    cfg = configs.INTERPRETER["fwd"]
    assert cfg["GROUP_N"] >= 2
    h, W, b, y, u, w = _problem(90, 16, 200, torch.float32)
    splits = num_vocab_splits(90, 200, cfg, programs=4)
    assert splits >= 2 and triton.cdiv(90, cfg["BLOCK_N"]) > cfg["GROUP_N"]
    lp, ent, _ = logprobs_entropy_fwd(h, W, b, y, upcast_operands=False, **FWD_OPTS)
    ref_lp, ref_ent, _, _ = _oracle(h, W, b, y, u, w)
    assert_close("logprobs", ref_lp, lp, atol=1e-5, rtol=1e-5)
    assert_close("entropy", ref_ent, ent, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("N,V,programs,group", [(16384, 151936, 132, 8), (16384, 151936, 132, 16), (1000, 151936, 132, 8),
                                                 (100, 50, 132, 8), (65536, 128256, 114, 8), (7, 3, 4, 2)])
def test_num_vocab_splits(N, V, programs, group):
    cfg = configs.sweep_config(128, 256, 64, group, 8, 4)
    splits = num_vocab_splits(N, V, cfg, programs)
    blocks, tiles = triton.cdiv(N, 128), triton.cdiv(V, 256)
    assert 1 <= splits <= tiles
    if splits < tiles:
        assert group * splits >= programs                      # the resident set is one group wide
        assert blocks * splits >= 2 * programs                 # two waves at least
    # no admissible split count (L2 and two-wave bounds, up to 4x the least, no idle split) is
    # modelled faster: cdiv(programs in the grid, resident programs) waves of cdiv(tiles, splits)
    lower = max(1, min(tiles, max(triton.cdiv(2 * programs, blocks), triton.cdiv(programs, group))))
    time = lambda s: triton.cdiv(blocks * s, programs) * triton.cdiv(tiles, s)  # noqa: E731
    for s in range(lower, min(4 * lower, tiles) + 1):
        if s == lower or triton.cdiv(tiles, s) * (s - 1) < tiles:
            assert time(splits) <= time(s), (splits, s)
    assert split_time(blocks, tiles, splits, programs) == time(splits)


@pytest.mark.parametrize("V", [151936, 128256])
@pytest.mark.parametrize("N", [4096, 8192, 16384])
def test_split_counts_fill_whole_waves(N, V):
    """H100 / H200 (132 SMs), the default sm90 tile: the grid keeps the SMs busy to the last
    wave. The split count before waves were modelled (17: L2 alone) ran N = 4096 in 5 waves
    where 4.12 were needed; at V = 151936 (594 tiles = 33 x 18) 33 splits make whole waves of
    equal programs at every N here."""
    cfg = configs.lookup("fwd", "sm90", "bf16", 4096, V)
    splits = num_vocab_splits(N, V, cfg, 132)
    blocks, tiles = triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(V, cfg["BLOCK_V"])
    ideal = blocks * tiles / 132
    modelled = split_time(blocks, tiles, splits, 132)
    assert ideal / modelled >= 0.96, (splits, ideal / modelled)
    assert modelled <= split_time(blocks, tiles, 17, 132)
    assert triton.cdiv(tiles, splits) * (splits - 1) < tiles  # no idle split
    if V == 151936:
        assert blocks * splits % 132 == 0 and tiles % splits == 0 and modelled == ideal
    if N == 4096:
        assert ideal / split_time(blocks, tiles, 17, 132) < 0.83  # what wave-blind 17 splits gave


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dlogits_and_matmul_launch_orders_agree(dtype):
    h, W, b, y, u, w = _problem(50, 20, 140, dtype)
    lp, ent, lse = logprobs_entropy_fwd(h, W, b, y, upcast_operands=False, **FWD_OPTS)
    ref = _oracle(h, W, b, y, u, w, dlogits=torch.float16 if dtype == torch.float16 else None)
    outs = []
    for group in (1, 2, 5):
        grads = logprobs_entropy_bwd(
            h, W, b, y, lse, ent, u, w, upcast_operands=False, operand_dtype=dtype, needs=(True, True, True),
            gemm_choice="triton", vocab_chunk=64, dlogits_config=configs.sweep_config(16, 32, 16, group, 4, 1),
            matmul_config=configs.matmul_config(16, 16, 32, group, 4, 1), **FWD_OPTS)
        outs.append(grads)
        got = dict(zip(("hidden", "weight", "bias"), grads))
        check_grads({k: (ref[2][k], got[k].to(dtype) if k != "bias" else got[k]) for k in got},
                    "fp32" if dtype == torch.float32 else "fp16", ref[3])
    for other in outs[1:]:
        for a, c in zip(outs[0], other):
            assert torch.equal(a, c)


# ---------------------------------------------------------------------------------------------
# GEMM choice and the cuBLAS path's orchestration
# ---------------------------------------------------------------------------------------------

def test_gemm_choice(monkeypatch):
    cuda = torch.device("cuda")
    bf16 = torch.bfloat16
    monkeypatch.delenv("FUSED_PG_GEMM", raising=False)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    # under the interpreter and on CPU: the Triton matmul
    assert gemm_mod.gemm_impl(bf16, torch.device("cpu"), False) == "triton"
    monkeypatch.setattr(gemm_mod, "interpreting", lambda: False)
    monkeypatch.setattr(gemm_mod, "cublas_fp32_output", lambda device, dtype: device.type == "cuda")
    assert gemm_mod.gemm_impl(bf16, cuda, False) == "cublas"
    assert gemm_mod.gemm_impl(torch.float16, cuda, False) == "cublas"
    assert gemm_mod.gemm_impl(torch.float32, cuda, False) == "triton"  # tf32 / ieee / mixed dtypes
    # deterministic: cuBLAS only when its multi-stream reproducibility is switched on
    assert gemm_mod.gemm_impl(bf16, cuda, True) == "triton"
    for value in (":4096:8", ":16:8"):
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", value)
        assert gemm_mod.gemm_impl(bf16, cuda, True) == "cublas"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    assert gemm_mod.gemm_impl(bf16, cuda, True) == "triton"
    # no out_dtype (old torch, ROCm): the Triton matmul
    monkeypatch.setattr(gemm_mod, "cublas_fp32_output", lambda device, dtype: False)
    assert gemm_mod.gemm_impl(bf16, cuda, False) == "triton"
    # FUSED_PG_GEMM overrides for 16-bit operands
    monkeypatch.setenv("FUSED_PG_GEMM", "torch-fp32")
    assert gemm_mod.gemm_impl(bf16, cuda, False) == "torch-fp32"
    assert gemm_mod.gemm_impl(torch.float32, cuda, False) == "triton"
    monkeypatch.setenv("FUSED_PG_GEMM", "cublas")
    with pytest.raises(ValueError, match="FUSED_PG_GEMM=cublas"):
        gemm_mod.gemm_impl(bf16, cuda, False)
    monkeypatch.setenv("FUSED_PG_GEMM", "magma")
    with pytest.raises(ValueError, match="FUSED_PG_GEMM must be one of"):
        gemm_mod.gemm_impl(bf16, cuda, False)


def test_cublas_probe_is_false_off_cuda():
    assert gemm_mod.cublas_fp32_output(torch.device("cpu"), torch.bfloat16) is False


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("token_chunk", [None, 17])
def test_torch_gemm_orchestration_matches_oracle(dtype, token_chunk):
    """The cuBLAS path's orchestration with fp32 torch GEMMs standing in for cuBLAS: all-token
    dlogits slabs, dW in one product over all tokens (or summed over token chunks) in the fp32
    scratch, rounded once; fp16 slabs scaled and unscaled."""
    h, W, b, y, u, w = _problem(45, 24, 150, dtype)
    upcast = dtype == torch.bfloat16
    lp, ent, lse = logprobs_entropy_fwd(h, W, b, y, upcast_operands=upcast, **FWD_OPTS)
    _, _, ref_grads, floors = _oracle(h, W, b, y, u, w, dlogits=dtype)
    kw = dict(upcast_operands=upcast, operand_dtype=dtype, needs=(True, True, True), token_chunk=token_chunk,
              vocab_chunk=64, **FWD_OPTS)
    dh, dW, db = logprobs_entropy_bwd(h, W, b, y, lse, ent, u, w, gemm_choice="torch-fp32", **kw)
    assert dh.dtype == torch.float32 and dW.dtype == dtype and db.dtype == torch.float32
    name = "bf16" if dtype == torch.bfloat16 else "fp16"
    check_grads({"hidden": (ref_grads["hidden"], dh.to(dtype)), "weight": (ref_grads["weight"], dW),
                 "bias": (ref_grads["bias"], db)}, name, floors)
    # the same sums as the Triton matmul, up to fp32 summation order
    dh_t, dW_t, db_t = logprobs_entropy_bwd(h, W, b, y, lse, ent, u, w, gemm_choice="triton", **kw)
    assert_close("dh torch vs triton", dh_t.double(), dh, atol=1e-6 * float(dh_t.abs().max()))
    assert torch.equal(db, db_t)


def test_property_head_through_torch_gemm(monkeypatch):
    """The head's property test, 16-bit inputs, through the cuBLAS path's orchestration."""
    monkeypatch.setenv("FUSED_PG_GEMM", "torch-fp32")
    run_property(head_cases("triton", dtypes=("bf16", "fp16")), lambda case: check_head_case(case, "triton"),
                 examples=16, backend="triton")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("token_chunk", [None, 17])
def test_dw_is_written_directly_with_one_token_chunk(dtype, token_chunk, monkeypatch):
    """dW of a 16-bit weight: one product per vocabulary chunk written in the weight's dtype
    when all tokens fit one chunk and the dlogits carry no scale (bf16); summed in an fp32
    scratch over token chunks (or to undo fp16's scale) otherwise."""
    products = []
    real = backward_mod.gemm

    def spy(a, b, out, *, accumulate, **kw):
        if b.shape[1] == out.shape[1] and a.shape[0] == out.shape[0] and a.stride(0) == 1:  # dlogits^T @ h
            products.append((out.dtype, accumulate))
        return real(a, b, out, accumulate=accumulate, **kw)

    monkeypatch.setattr(backward_mod, "gemm", spy)
    h, W, b, y, u, w = _problem(45, 24, 150, dtype)
    lp, ent, lse = logprobs_entropy_fwd(h, W, b, y, upcast_operands=dtype == torch.bfloat16, **FWD_OPTS)
    _, dW, _ = logprobs_entropy_bwd(h, W, b, y, lse, ent, u, w, upcast_operands=dtype == torch.bfloat16,
                                    operand_dtype=dtype, needs=(False, True, False), token_chunk=token_chunk,
                                    vocab_chunk=64, gemm_choice="torch-fp32", **FWD_OPTS)
    assert dW.dtype == dtype and products
    direct = token_chunk is None and dtype == torch.bfloat16
    assert all(out_dtype == (dtype if direct else torch.float32) for out_dtype, _ in products), products
    chunks = triton.cdiv(45, token_chunk or 45)
    assert [acc for _, acc in products] == [n > 0 for _ in range(triton.cdiv(150, 64)) for n in range(chunks)]


def test_cublas_writes_16bit_products_with_fp32_split_k_sums(monkeypatch):
    """A dW written straight into bf16 by cuBLAS: PyTorch lets cuBLAS sum split-K partials in
    bf16 by default; gemm switches that off for the call and restores the caller's setting."""
    flags = torch.backends.cuda.matmul
    seen = []

    def mm(a, b, *, out=None, **kw):
        seen.append((flags.allow_bf16_reduced_precision_reduction, flags.allow_fp16_reduced_precision_reduction,
                     kw.get("out_dtype")))
        return out.copy_(a.float() @ b.float())

    monkeypatch.setattr(gemm_mod.torch, "mm", mm)
    a, b = torch.randn(5, 3), torch.randn(3, 4)
    for dtype, flag in ((torch.bfloat16, "allow_bf16_reduced_precision_reduction"),
                        (torch.float16, "allow_fp16_reduced_precision_reduction")):
        before = getattr(flags, flag)
        out = torch.empty(5, 4, dtype=dtype)
        gemm_mod.gemm(a.to(dtype), b.to(dtype), out, accumulate=False, impl="cublas", upcast_operands=False,
                      input_precision="ieee", deterministic=False)
        assert getattr(flags, flag) == before
        assert torch.equal(out, (a.to(dtype).float() @ b.to(dtype).float()).to(dtype))
    assert seen[0][0] is False and seen[1][1] is False and seen[0][2] is None
    with pytest.raises(ValueError, match="accumulates into fp32"):
        gemm_mod.gemm(a, b, torch.empty(5, 4, dtype=torch.bfloat16), accumulate=True, impl="cublas",
                      upcast_operands=False, input_precision="ieee", deterministic=False)


def _previous_chunks(N, V, D, scratch):
    """The slab shape before the traffic model: all tokens x the columns that fit 2^26 elements."""
    n = min(N, (1 << 26) // 1024)
    v = max(1, (1 << 26) // n)
    if scratch:
        v = min(v, (1 << 26) // D)
    return n, min(v - v % 256 if v >= 256 else v, V)


@pytest.mark.parametrize("N", [45, 1024, 4096, 16384, 32768, 65536])
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("V", [151936, 128256])
def test_default_slabs(N, dtype, V):
    D = 4096
    nbytes = 4 if dtype == "fp32" else 2
    n, v = default_chunks(N, V, D, operand_bytes=nbytes, weight_bytes=nbytes, unscale_dw=dtype == "fp16")
    scratch = nbytes < 4 and (n < N or dtype == "fp16")
    # working memory: the dlogits slab plus the fp32 dW scratch within SLAB_BYTES
    assert 1 <= n <= N and 1 <= v <= V and n * v * nbytes + (v * D * 4 if scratch else 0) <= SLAB_BYTES
    assert v == V or v % 256 == 0  # whole tiles
    # the dh updates stay GEMM-bound: K = v >= 4096 columns (at 3.35 TB/s and ~700 TFLOP/s the
    # fp32 read-modify-write of dh costs <= ~20% of its GEMM's time), or the whole vocabulary
    assert v >= 4096 or v == V, (n, v)
    traffic = slab_traffic(N, V, D, n, v, weight_bytes=nbytes, dw_scratch=scratch)
    # the least traffic of every shape within the budget (all power-of-two widths, most tokens)
    for width in [V] + [256 << i for i in range(12) if (256 << i) < V]:
        for tokens in (N, *(t for t in (256, 1024, 4096, 8192, 16384) if t < N)):
            s = nbytes < 4 and (tokens < N or dtype == "fp16")
            if tokens * width * nbytes + (width * D * 4 if s else 0) <= SLAB_BYTES:
                assert traffic <= slab_traffic(N, V, D, tokens, width, weight_bytes=nbytes, dw_scratch=s)
    if dtype == "bf16":
        pn, pv = _previous_chunks(N, V, D, scratch=False)
        assert traffic <= slab_traffic(N, V, D, pn, pv, weight_bytes=2, dw_scratch=pn < N)
        if N <= 16384:  # all tokens in one chunk: dW straight into bf16, no scratch
            assert n == N and not scratch
    if N == 32768 and V == 151936 and dtype == "bf16":
        assert triton.cdiv(V, v) <= 38  # was 75 read-modify-writes of the fp32 dh


def test_explicit_chunks_are_kept():
    assert default_chunks(100, 500, 64, 17, 33) == (17, 33)
    assert default_chunks(100, 500, 64, 17, None)[0] == 17
    assert default_chunks(100, 500, 64, None, 33)[1] == 33
    assert default_chunks(10, 20, 64, 1000, 1000) == (10, 20)


def test_dlogits_scale():
    g = torch.tensor([1e-5, -3e-6, 0.0])
    e = torch.tensor([0.0, 2e-7, 0.0])
    H = torch.tensor([2.0, 4.5, 0.0])
    s = dlogits_scale(g, e, H, inv_temperature=1 / 0.7)
    k = torch.log2(s)
    assert s.shape == (1,) and s.dtype == torch.float32 and float(k) == round(float(k))
    bound = float(((g.abs() + e.abs() * (math.exp(-1) + H)) / 0.7).max())
    assert FP16_DLOGITS_MAX / 2 < bound * float(s) <= FP16_DLOGITS_MAX
    zero = torch.zeros(3)
    assert float(dlogits_scale(zero, zero, zero, 1.0)) == 1.0


# ---------------------------------------------------------------------------------------------
# config table, launch helper, tuning sweep
# ---------------------------------------------------------------------------------------------

def test_table_rows_are_well_formed():
    for row in configs.TABLE:
        assert row.family in configs.FAMILIES and row.kind in configs.KINDS and row.dtype in configs.OPERANDS
        assert row.epilogue in configs.EPILOGUES and (row.kind != "matmul" or row.epilogue == "plain"), row
        assert set(row.config) == set(configs.META_KEYS[row.kind]) | set(configs.LAUNCH_KEYS), row
        assert not configs.pathological(row.kind, row.config), row
        assert all(v & (v - 1) == 0 for k, v in row.config.items() if k.startswith("BLOCK")), row
        assert row.source, row
    for kind in configs.KINDS:
        for dtype in configs.OPERANDS:
            assert any(r.family == "fallback" and r.kind == kind and r.dtype == dtype for r in configs.TABLE)
    # Hopper has its own rows for fp32 operands (tensor cores and IEEE) and for the soft-cap epilogue
    for kind in configs.KINDS:
        for dtype in ("tf32", "fp32"):
            assert any(r.family == "sm90" and r.kind == kind and r.dtype == dtype for r in configs.TABLE)
    for kind in ("fwd", "dlogits"):
        assert any(r.family == "sm90" and r.kind == kind and r.epilogue == "softcap" for r in configs.TABLE)
    for kind, cfg in configs.INTERPRETER.items():
        assert set(cfg) == set(configs.META_KEYS[kind]) | set(configs.LAUNCH_KEYS)


def test_operand_kinds():
    assert configs.operand_kind(torch.bfloat16, "ieee") == "bf16"
    assert configs.operand_kind(torch.float16, "ieee") == "fp16"
    assert configs.operand_kind(torch.float32, "tf32x3") == "tf32"
    assert configs.operand_kind(torch.float32, "tf32") == "tf32"
    assert configs.operand_kind(torch.float32, "ieee") == "fp32"


def test_lookup(monkeypatch):
    h100 = configs.lookup("fwd", "sm90", "bf16", 4096, 151936)
    assert describe("fwd", h100) == "128x256x64/g8/w8/s4"
    assert describe("dlogits", configs.lookup("dlogits", "sm90", "bf16", 8192, 32000)) == "128x256x64/g8/w8/s4"
    fallback = configs.lookup("fwd", "fallback", "bf16", 4096, 151936)
    assert configs.lookup("fwd", "sm80", "bf16", 4096, 151936) == fallback  # no sm80 rows yet
    # epilogue rows: the soft-cap's own on sm90; the plain rows where a family has none
    softcap = configs.lookup("fwd", "sm90", "bf16", 4096, 151936, "softcap")
    assert softcap != h100 and softcap["BLOCK_V"] < h100["BLOCK_V"]
    assert configs.lookup("matmul", "sm90", "bf16", 4096, 151936, "softcap") == \
        configs.lookup("matmul", "sm90", "bf16", 4096, 151936)
    assert configs.lookup("fwd", "sm80", "bf16", 4096, 151936, "softcap") == fallback
    assert configs.lookup("fwd", "sm90", "tf32", 4096, 151936) != configs.lookup("fwd", "sm90", "fp32", 4096, 151936)
    # nearest measured shape in log2 (D, V)
    table = [configs.Row("sm90", "fwd", "bf16", 4096, 151936, configs.sweep_config(128, 256, 64, 8, 8, 4), "a"),
             configs.Row("sm90", "fwd", "bf16", 1024, 32000, configs.sweep_config(64, 128, 64, 4, 4, 4), "b")]
    monkeypatch.setattr(configs, "TABLE", table)
    assert configs.lookup("fwd", "sm90", "bf16", 2048, 50257)["BLOCK_N"] == 64
    assert configs.lookup("fwd", "sm90", "bf16", 4096, 128256)["BLOCK_N"] == 128
    with pytest.raises(ValueError):
        configs.lookup("bwd", "sm90", "bf16", 1, 1)
    with pytest.raises(ValueError):
        configs.lookup("fwd", "sm90", "bf16", 1, 1, "gelu")
    assert configs.default_config("fwd", torch.device("cpu"), "bf16", 8, 8, interpreter=True) == \
        configs.INTERPRETER["fwd"]


@pytest.mark.parametrize("kind", configs.KINDS)
def test_search_spaces_exclude_pathological_configs(kind):
    space = configs.search_space(kind, groups=(4, 8))
    assert space and len({tuple(sorted(c.items())) for c in space}) == len(space)
    wide = "BLOCK_N" if kind == "matmul" else "BLOCK_V"
    for c in space:
        assert not (c["num_warps"] == 4 and max(c[wide], c[configs.META_KEYS[kind][0]]) >= 256), c
    bad = dict(space[0], num_warps=4, **{wide: 256})
    assert configs.pathological(kind, bad)
    assert candidates(kind) == configs.search_space(kind, (4, 8, 16))


@triton.jit
def _echo_kernel(out_ptr, x, BLOCK: tl.constexpr):
    tl.store(out_ptr, x + BLOCK)


def test_launch_helper(monkeypatch):
    out = torch.zeros(1, dtype=torch.int32)
    kernel = launch_mod.Tunable(_echo_kernel, kind="fwd", key=("x",))
    grids = []

    def grid(meta):
        grids.append(meta["BLOCK"])
        return (1,)

    launch_mod.launch(kernel, grid, dict(out_ptr=out, x=1), config=dict(BLOCK=4, num_warps=4, num_stages=1),
                      deterministic=False)
    assert int(out) == 5 and grids == [4]
    calls = []

    class FakeAutotuned:
        def __getitem__(self, grid):
            return lambda **args: calls.append(args)

    kernel.__dict__["autotuned"] = FakeAutotuned()
    monkeypatch.setattr(launch_mod, "autotune_requested", lambda: True)
    cfg = dict(BLOCK=2, num_warps=4, num_stages=1)
    launch_mod.launch(kernel, grid, dict(out_ptr=out, x=1), config=cfg, deterministic=False)
    assert len(calls) == 1  # autotuned
    launch_mod.launch(kernel, grid, dict(out_ptr=out, x=1), config=cfg, deterministic=True)
    launch_mod.launch(kernel, grid, dict(out_ptr=out, x=1), config=cfg, deterministic=False, pinned=True)
    assert len(calls) == 1 and int(out) == 3  # deterministic and pinned launches keep the config


def test_autotuned_twin_uses_the_search_space():
    kernel = launch_mod.Tunable(_echo_kernel, kind="dlogits", key=("x",))
    tuned = kernel.autotuned
    assert kernel.autotuned is tuned
    space = configs.search_space("dlogits")
    assert [(c.kwargs, c.num_warps, c.num_stages) for c in tuned.configs] == \
        [({k: v for k, v in s.items() if k not in configs.LAUNCH_KEYS}, s["num_warps"], s["num_stages"]) for s in space]
    with pytest.raises(ValueError):
        launch_mod.Tunable(_echo_kernel).autotuned


def test_format_row_is_a_table_row():
    t = Timing(kind="fwd", family="sm90", dtype="bf16", N=16384, D=4096, V=151936,
               config=configs.sweep_config(128, 256, 64, 8, 8, 4), ms=38.3, device_name="NVIDIA H100 80GB HBM3")
    line = format_row(t)
    assert line.endswith(",")
    row = eval(line[:-1], {"__builtins__": {}},  # noqa: S307  (our own output)
               {"Row": configs.Row, "sweep_config": configs.sweep_config, "matmul_config": configs.matmul_config})
    assert row == configs.Row("sm90", "fwd", "bf16", 4096, 151936, t.config, row.source)
    assert "38.30 ms at N=16384" in row.source and "H100" in row.source
    m = Timing(kind="matmul", family="fallback", dtype="fp16", N=8, D=16, V=32,
               config=configs.matmul_config(64, 64, 32, 4, 4, 2), ms=1.0, device_name="x")
    assert "matmul_config(64, 64, 32, 4, 4, 2)" in format_row(m)


@pytest.mark.parametrize("kind", configs.KINDS)
def test_sweep_with_a_stand_in_timer(kind):
    """The sweep's loop under the interpreter: each candidate runs once, rows come back fastest
    first, a config that fails (here: the timer raises, as do_bench does for a config that is out
    of shared memory) is skipped."""
    outcomes = iter([3.0, RuntimeError("out of resource: shared memory"), 2.0])

    def timer(fn):
        fn()
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    make = configs.matmul_config if kind == "matmul" else configs.sweep_config
    cands = [make(32, 32, 16, g, 4, 1) for g in (1, 2, 4)]
    rows = sweep(kind, (20, 16, 100), torch.float32, "cpu", configs=cands, timer=timer, verbose=False)
    assert [r.ms for r in rows] == [2.0, 3.0]
    assert [r.config for r in rows] == [cands[2], cands[0]]
    # fp32 inputs: the tensor-core rows ("tf32": 3xTF32, what precision="native" multiplies fp32 with)
    assert all((r.kind, r.family, r.dtype, r.N, r.D, r.V) == (kind, "fallback", "tf32", 20, 16, 100) for r in rows)


def test_env_and_configs_import_without_triton():
    """fused_pg decides whether to load Triton code from kernels.env: it must import without it."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['triton'] = None\n"
            "import fused_pg.kernels.env as env, fused_pg.kernels.configs as configs\n"
            "env.interpreting(); env.autotune_requested(); env.gemm_requested()\n"
            "configs.lookup('fwd', 'sm90', 'bf16', 4096, 151936)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# dot precision of the Triton backend
# ---------------------------------------------------------------------------------------------

def test_dot_modes(monkeypatch):
    from fused_pg.backends import triton_fused
    from fused_pg.config import HeadConfig
    bf16, fp16, fp32 = (torch.empty(2, 3, dtype=d) for d in (torch.bfloat16, torch.float16, torch.float32))
    native, tf32, ieee = (HeadConfig(precision=p) for p in ("native", "tf32", "ieee"))
    assert triton_fused.dot_mode(fp16, fp16, native) == (False, "ieee", torch.float16)
    assert triton_fused.dot_mode(bf16, bf16, native)[1:] == ("ieee", torch.bfloat16)  # (upcast: interpreter only)
    for h, w in ((fp32, fp32), (bf16, fp32), (fp32, fp16)):  # fp32 operands: tensor cores, 3xTF32
        assert triton_fused.dot_mode(h, w, native) == (True, "tf32x3", torch.float32)
        assert triton_fused.dot_mode(h, w, tf32) == (True, "tf32", torch.float32)
        assert triton_fused.dot_mode(h, w, ieee) == (True, "ieee", torch.float32)
    assert configs.operand_kind(torch.float32, "tf32x3") == "tf32"  # its table rows: tensor-core tiles
    # precision="ieee" on a GPU: one warning per process that names the reason
    monkeypatch.setattr(triton_fused, "_WARNED_IEEE", False)
    monkeypatch.setattr(triton_fused, "interpreting", lambda: False)
    triton_fused._warn_ieee(torch.device("cpu"))
    with pytest.warns(UserWarning, match="CUDA cores.*no tensor-core instruction"):
        triton_fused._warn_ieee(torch.device("cuda"))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        triton_fused._warn_ieee(torch.device("cuda"))


def _tf32(x: torch.Tensor, rounding: str) -> torch.Tensor:
    """fp32 -> tf32 (10 mantissa bits) as fp32: "rna" (cvt.rna.tf32.f32) or "trunc" (what the
    tensor cores do with the 13 low bits of an fp32 operand)."""
    bits = x.view(torch.int32)
    if rounding == "rna":  # magnitude + half an ulp, then truncate: ties away from zero
        bits = bits + 0x1000
    return (bits & ~0x1FFF).view(torch.float32)


@pytest.mark.parametrize("a_dtype", [torch.float32, torch.bfloat16])
def test_3xtf32_precision_contract(a_dtype):
    """The bound dot_mode documents for precision="native" with fp32 operands, on an emulation
    of Triton's tf32x3 (hi = rna(x), lo = x - hi; the three products hi*hi, hi*lo, lo*hi with the
    low parts truncated to tf32 by the tensor cores): |a b - result| <= 2^-20 |a b|, 2^-21 when
    a is 16-bit (exact in tf32). The GPU's own results are not measured here."""
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(200000, generator=g) * torch.exp(4 * torch.randn(200000, generator=g))).to(a_dtype).float()
    b = torch.randn(200000, generator=g) * torch.exp(4 * torch.randn(200000, generator=g))
    a_hi, b_hi = _tf32(a, "rna"), _tf32(b, "rna")
    a_lo, b_lo = _tf32(a - a_hi, "trunc"), _tf32(b - b_hi, "trunc")
    result = a_hi.double() * b_hi.double() + a_hi.double() * b_lo.double() + a_lo.double() * b_hi.double()
    exact = a.double() * b.double()
    rel = ((result - exact).abs() / exact.abs()).max().item()
    bound = 2.0 ** (-21 if a_dtype == torch.bfloat16 else -20)
    print(f"3xTF32 max relative product error {rel:.3e} (bound {bound:.3e}; one tf32 product: ~2^-11)")
    assert rel <= bound
    one_tf32 = ((_tf32(a, "trunc").double() * _tf32(b, "trunc").double() - exact).abs() / exact.abs()).max().item()
    assert one_tf32 > 2.0 ** -12  # the check can fail: a single TF32 product is far outside the bound
