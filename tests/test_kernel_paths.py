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
from fused_pg.kernels.backward import FP16_DLOGITS_MAX, dlogits_scale, logprobs_entropy_bwd
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
