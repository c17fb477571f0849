"""Every config of the kernels' table compiles for its GPUs as a real launch would, fits their
shared memory, uses the tensor cores, and keeps register spills out of the K loop -- checked
on a machine without a GPU.

The interpreter runs the kernels' Python, not Triton's compiler: it says nothing about shared
memory, registers or instructions. ``tests/compile_kernels.py`` (run in subprocesses, without
``TRITON_INTERPRET``) drives the real host launchers on ``meta`` tensors of the real shapes
through Triton's own launch path, so arguments are specialised exactly as on a GPU (16-byte
alignment and divisibility attributes, constant 1s, ``None`` pointers), compiles for sm90 and
sm80 with Triton's NVIDIA backend and bundled ptxas, and reports per kernel: shared memory,
registers, the local-memory frame, the spill instructions (STL/LDL) inside the K loop of the
SASS, and the MMA instructions. Without the specialisation a compile needs far less shared
memory than the launch (48 KiB instead of 192 KiB for the default bf16 tile): the controls
below show that a tile the GPU would refuse fails here.

Checks, for sm90 (227 KiB of shared memory per block) and sm80 (163 KiB), for every config
``kernels.configs.lookup`` returns there (every row of ``TABLE`` its family or the fallback
family serves):

* shared memory within the limit;
* bf16 / fp16 / tf32 operands on tensor cores: ``wgmma.mma_async`` in the PTX and HGMMA in
  the SASS on sm90, ``mma.sync`` / HMMA on sm80;
* no STL/LDL inside the K loop (the innermost loop holding the MMA instructions, or the FMAs
  of an IEEE fp32 dot). Attribution works from the SASS on both triton versions;
* spills elsewhere bounded by ``STACK_BOUND`` bytes per thread. They run once per output tile
  (between the K loops), not per K step; the default bf16 tile measured 0-8 B (triton 3.9 /
  3.6), the soft-cap epilogue on that tile 384 B (a control below).

Triton versions: CI runs this with its triton (3.9). The GPU machines have triton 3.6; the
same test runs there, on CPU, in a throw-away environment::

    python3 -m venv /tmp/venv-t36
    /tmp/venv-t36/bin/pip install torch==2.13.0 triton==3.6.0 numpy pytest hypothesis
    PYTHONPATH=$PWD /tmp/venv-t36/bin/python -m pytest tests/test_kernel_compile.py -q

Everything listed is checked on both versions; nothing is version-dependent but the figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fused_pg.kernels import configs

SCRIPT = Path(__file__).with_name("compile_kernels.py")
SHARED_LIMIT = {"sm90": 227 * 1024, "sm80": 163 * 1024}  # bytes one block may use (opt-in maximum)
STACK_BOUND = 64  # bytes of spill slots per thread, outside the K loop
KERNELS = {"fwd": {"_fwd_split_kernel", "_fwd_combine_kernel"}, "dlogits": {"_dlogits_kernel"},
           "matmul": {"_matmul_kernel"}}
TENSOR_CORE_OPERANDS = ("bf16", "fp16", "tf32")


def _run(*args: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SCRIPT.parent.parent), env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                         timeout=900)
    assert run.returncode == 0, f"compile_kernels.py {' '.join(args)} failed:\n{run.stderr[-6000:]}"
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def compiled() -> dict[str, list[dict]]:
    """Records per target (sm90, sm80) and of the controls, compiled in parallel processes."""
    jobs = {"sm90": ("sm90",), "sm80": ("sm80",), "controls": ("--controls",)}
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {name: pool.submit(_run, *args) for name, args in jobs.items()}
        records = {name: f.result() for name, f in futures.items()}
    print(f"triton {records['sm90'][0]['triton']}")
    for rs in records.values():
        for r in rs:
            print(_describe(r), f"shared {r['shared']} B, {r['registers']} registers, frame {r['stack']} B, "
                                f"{r['spill_instructions']} spill instructions ({r['k_loop_spills']} in the K loop), "
                                f"{r['dot_instructions']}")
    return records


def _describe(r: dict) -> str:
    c = r["config"]
    tile = "x".join(str(v) for k, v in c.items() if k.startswith("BLOCK"))
    return (f"{r['target']} {r['kind']}{'/' + r['product'] if 'product' in r else ''} {r['operands']} "
            f"{r['epilogue']} {tile}/w{c['num_warps']}/s{c['num_stages']} {r['kernel']}"
            f"{' (1 token)' if r.get('tokens') else ''}{' [control]' if r.get('control') else ''}")


def _served_rows(target: str):
    """(row, config) for every row of the table that ``lookup`` can hand to ``target``."""
    for row in configs.TABLE:
        if row.family in (target, "fallback"):
            yield row, configs.lookup(row.kind, target, row.dtype, row.D, row.V, row.epilogue)


def _k_is_one_token(r: dict) -> bool:
    """The one-token launch's dW product, whose reduction length K is the token count, 1: a
    constant after specialisation, so the K loop has one trip and the compiler removes it."""
    return r.get("tokens") == 1 and r["kernel"] == "_matmul_kernel" and r["k_loop"] is None


@pytest.mark.parametrize("target", ["sm90", "sm80"])
def test_every_config_of_the_table_is_compiled(compiled, target):
    records = compiled[target]
    for row, config in _served_rows(target):
        wanted = (row.kind, row.dtype, row.epilogue, config)
        found = {r["kernel"] for r in records if (r["kind"], r["operands"], r["epilogue"], r["config"]) == wanted}
        assert KERNELS[row.kind] <= found, f"{target}: {row} compiled only {found}"
    assert any(r.get("tokens") == 1 and r["kernel"] == "_matmul_kernel" for r in records)  # N = 1 constants


@pytest.mark.parametrize("target", ["sm90", "sm80"])
def test_shared_memory_fits(compiled, target):
    for r in compiled[target]:
        assert r["shared"] <= SHARED_LIMIT[target], f"{_describe(r)}: {r['shared']} B of shared memory"


@pytest.mark.parametrize("target", ["sm90", "sm80"])
def test_dots_run_on_tensor_cores(compiled, target):
    for r in compiled[target]:
        if r["kernel"] == "_fwd_combine_kernel" or r["operands"] not in TENSOR_CORE_OPERANDS:
            continue
        if target == "sm90":
            assert r["wgmma"] and all(d.startswith("HGMMA") for d in r["dot_instructions"]), _describe(r)
        else:
            assert r["mma_sync"] and all(d.startswith("HMMA") for d in r["dot_instructions"]), _describe(r)
        assert r["dot_instructions"], f"{_describe(r)}: no MMA instruction"
        if not _k_is_one_token(r):
            assert r["k_loop_dots"], f"{_describe(r)}: no MMA in the K loop"
        if r["operands"] == "tf32" and r["kernel"] != "_fwd_combine_kernel":
            assert any(".TF32" in d for d in r["dot_instructions"]), _describe(r)


@pytest.mark.parametrize("target", ["sm90", "sm80"])
def test_no_spills_in_the_k_loop(compiled, target):
    for r in compiled[target]:
        if r["kernel"] == "_fwd_combine_kernel":  # no dot, no K loop
            assert r["stack"] == 0, _describe(r)
            continue
        if _k_is_one_token(r):  # K = 1 is a compile-time constant: the loop is gone
            assert r["stack"] <= STACK_BOUND, _describe(r)
            continue
        assert r["k_loop"] is not None, f"{_describe(r)}: no K loop found in the SASS"
        assert r["k_loop_spills"] == 0, f"{_describe(r)}: {r['k_loop_spills']} spill instructions in the K loop"
        assert r["stack"] <= STACK_BOUND, f"{_describe(r)}: {r['stack']} B of spill slots per thread"


def test_the_checks_fail_where_a_gpu_would(compiled):
    """Controls (``CONTROLS`` in compile_kernels.py): configs that must fail one check each, so
    the checks above can fail."""
    split = {r["control"].split(":")[0]: r for r in compiled["controls"] if r["kernel"] == "_fwd_split_kernel"}
    assert set(split) == {"shared memory", "spills in the K loop", "epilogue spills"}, set(split)
    assert split["shared memory"]["shared"] > SHARED_LIMIT["sm90"]  # 240 KiB: out of resources on an H100
    assert split["spills in the K loop"]["k_loop_spills"] > 0       # IEEE fp32 on a large tile
    assert split["epilogue spills"]["k_loop_spills"] == 0 and split["epilogue spills"]["stack"] > STACK_BOUND
