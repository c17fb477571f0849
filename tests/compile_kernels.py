"""Compile fused-pg's Triton kernels for a GPU on a machine without one, as real launches would.

    python tests/compile_kernels.py sm90 sm80 [--controls]   # one JSON line per compiled kernel

Run WITHOUT ``TRITON_INTERPRET`` (it refuses to start with it). Used by
``tests/test_kernel_compile.py``, which asserts on its output.

How a launch is reproduced:

* The host launchers themselves run (``logprobs_entropy_fwd``, ``logprobs_entropy_bwd``,
  ``matmul``), with the default table's configs, on ``meta`` tensors of the real shapes
  (N = 16384 tokens, the row's D and V; no memory is allocated). So every argument reaches
  the kernel exactly as on a GPU: same strides, sizes, ``None`` pointers, heuristics.
* Triton's own launch path binds and specialises those arguments (``JITFunction.run``): a
  pointer gets ``tt.divisibility = 16`` when its address is 16-byte aligned -- a meta
  tensor's ``data_ptr()`` is its storage offset in bytes, i.e. what a fresh 512-byte aligned
  CUDA allocation plus that view's offset gives -- and an integer when it is divisible by 16
  (or becomes the constant 1). Only the last step differs: a driver stand-in reports the
  target GPU, and ``run`` is called with ``warmup=True`` (compile, do not launch).
* The compiled kernel is inspected: shared memory from its metadata; registers and the
  per-thread local-memory frame (spill slots) from ``cuobjdump -res-usage``; the SASS from
  ``cuobjdump -sass`` (the binary bundled with triton), in which loops are backward branches
  (``BRA`` to an earlier address). The K loop is the innermost loop holding the dot's
  instructions (HGMMA/HMMA; FFMA for IEEE fp32), and every STL/LDL (local-memory store/load:
  a register spill) inside it is counted. The PTX tells whether the dot became ``wgmma``.

Works with triton 3.6 (the GPU machines) and 3.9 (CI): it uses ``JITFunction.run``,
``triton.runtime.driver.set_active``, ``GPUTarget`` and ``knobs.nvidia.cuobjdump``, present in
both.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("compile_kernels.py compiles for a GPU: run it without TRITON_INTERPRET")

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from fused_pg.kernels import configs  # noqa: E402
from fused_pg.kernels.backward import logprobs_entropy_bwd  # noqa: E402
from fused_pg.kernels.forward import logprobs_entropy_fwd  # noqa: E402
from fused_pg.kernels.matmul import matmul  # noqa: E402

TARGETS = {"sm90": 90, "sm80": 80}
N_TOKENS = 16384
META = torch.device("meta")


class CompileOnlyDriver:
    """What Triton's launch path asks the driver, answered for a GPU that is not there."""

    def __init__(self, capability: int):
        self.target = GPUTarget("cuda", capability, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        # one kernel cache per target: a kernel compiled for sm90 is never reused for sm80
        return self.target.arch

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return META

    def map_python_to_cpp_type(self, ty):
        return ty

    def is_active(self):
        return True


_COMPILED: list = []
_run = JITFunction.run


def _compile_only(self, *args, grid, warmup, **kwargs):
    kernel = _run(self, *args, grid=grid, warmup=True, **kwargs)
    _COMPILED.append(kernel)
    return kernel


JITFunction.run = _compile_only


# ---------------------------------------------------------------------------------------------
# inspection
# ---------------------------------------------------------------------------------------------

_DOT = re.compile(r"\b(?:HGMMA|HMMA|IMMA)\S*")
_SPILL = re.compile(r"\b(?:STL|LDL)\b")
_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA(?:\.\S+)?\s+(0x[0-9a-f]+)")


def _cuobjdump(cubin: bytes, *flags: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([knobs.nvidia.cuobjdump.path, *flags, f.name], capture_output=True, text=True,
                              check=True).stdout


def inspect(kernel) -> dict:
    """Shared memory, registers, spill slots, and where the spills and MMAs sit in the SASS.

    The SASS is read from ``cuobjdump -sass`` directly (``triton.tools.disasm`` stops at
    address 0xffff, i.e. truncates kernels of more than 4096 instructions)."""
    instrs = []  # (address, instruction)
    for m in _LINE.finditer(_cuobjdump(kernel.asm["cubin"], "-sass")):
        instrs.append((int(m.group(1), 16), m.group(2)))
    index = {addr: i for i, (addr, _) in enumerate(instrs)}
    loops = []  # (first, last) instruction index of every loop: a branch back to an earlier address
    for i, (addr, ins) in enumerate(instrs):
        m = _BRANCH.search(ins)
        if m and int(m.group(1), 16) < addr and int(m.group(1), 16) in index:
            loops.append((index[int(m.group(1), 16)], i))
    dots = [i for i, (_, ins) in enumerate(instrs) if _DOT.search(ins)]
    if dots:
        holding = [lp for lp in loops if lp[0] <= dots[0] <= lp[1]]
    else:  # IEEE fp32: the loops holding most of the FFMAs (the K loop and the loops around it)
        ffma = {lp: sum(" FFMA" in " " + ins for _, ins in instrs[lp[0]:lp[1] + 1]) for lp in loops}
        most = max(ffma.values(), default=0)
        holding = [lp for lp, n in ffma.items() if n and n >= most / 2]
    k_loop = min(holding, key=lambda lp: lp[1] - lp[0]) if holding else None
    spills = [i for i, (_, ins) in enumerate(instrs) if _SPILL.search(ins)]
    inside = (lambda i: k_loop[0] <= i <= k_loop[1]) if k_loop else (lambda i: False)
    usage = _cuobjdump(kernel.asm["cubin"], "-res-usage")
    return dict(
        kernel=kernel.metadata.name,
        shared=kernel.metadata.shared,
        num_warps=kernel.metadata.num_warps,
        registers=int(re.search(r"REG:(\d+)", usage).group(1)),
        stack=int(re.search(r"STACK:(\d+)", usage).group(1)),
        instructions=len(instrs),
        spill_instructions=len(spills),
        k_loop=list(k_loop) if k_loop else None,
        k_loop_spills=sum(map(inside, spills)) if k_loop else None,
        k_loop_dots=sum(map(inside, dots)) if k_loop else None,
        dot_instructions=sorted({_DOT.search(instrs[i][1]).group(0) for i in dots}),
        wgmma="wgmma.mma_async" in kernel.asm["ptx"],
        mma_sync="mma.sync" in kernel.asm["ptx"],
    )


# ---------------------------------------------------------------------------------------------
# the launches: every config the table gives a target, with the features that cost registers
# ---------------------------------------------------------------------------------------------

_DTYPES = {  # operand kind -> (hidden dtype, weight dtype, precision argument of the launchers)
    "bf16": (torch.bfloat16, torch.bfloat16, "ieee"),
    "fp16": (torch.float16, torch.float16, "ieee"),
    "tf32": (torch.bfloat16, torch.float32, "tf32x3"),  # mixed dtypes at precision="native"
    "fp32": (torch.float32, torch.float32, "ieee"),
}


def _empty(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device=META)


def launches(family: str):
    """(description, config, call) of every kernel launch to compile for ``family``: one per
    distinct config ``configs.lookup`` can return there, per kernel, operand kind and epilogue."""
    seen = set()
    for row in configs.TABLE:
        if row.family not in (family, "fallback"):
            continue
        config = configs.lookup(row.kind, family, row.dtype, row.D, row.V, row.epilogue)
        key = (row.kind, row.dtype, row.epilogue, tuple(sorted(config.items())), row.D, row.V)
        if key in seen:
            continue
        seen.add(key)
        h_dtype, w_dtype, precision = _DTYPES[row.dtype]
        upcast = h_dtype != w_dtype or h_dtype == torch.float32
        operand_dtype = torch.float32 if upcast else h_dtype
        D, V, N = row.D, row.V, N_TOKENS
        softcap = 30.0 if row.epilogue == "softcap" else None
        h, W = _empty(N, D, dtype=h_dtype), _empty(V, D, dtype=w_dtype)
        bias = _empty(V, dtype=w_dtype) if softcap is not None else None
        y, f = _empty(N, dtype=torch.int64), _empty(N)
        common = dict(inv_temperature=1.0, softcap=softcap, upcast_operands=upcast, input_precision=precision,
                      deterministic=True)
        what = dict(kind=row.kind, operands=row.dtype, epilogue=row.epilogue, D=D, V=V, config=config)
        if row.kind == "fwd":
            yield what, lambda h=h, W=W, b=bias, y=y, c=config, kw=common: logprobs_entropy_fwd(
                h, W, b, y, config=c, **kw)
        elif row.kind == "dlogits":  # with the entropy term (the larger kernel)
            yield what, lambda h=h, W=W, b=bias, y=y, f=f, c=config, kw=common, op=operand_dtype: logprobs_entropy_bwd(
                h, W, b, y, f, f, f, f, operand_dtype=op, needs=(False, False, False), dlogits_config=c, **kw)
        else:  # the backward's two products over one default slab: dh (+)= dz @ W, dW = dz^T @ h
            n_chunk, v_chunk = 16384, 4096
            dz = _empty(n_chunk, v_chunk, dtype=operand_dtype)
            w, hh = _empty(v_chunk, D, dtype=operand_dtype), _empty(n_chunk, D, dtype=operand_dtype)
            opts = dict(upcast_operands=upcast, input_precision=precision, deterministic=True, config=config)
            dw_dtype = torch.float32 if operand_dtype == torch.float32 else operand_dtype
            yield dict(what, product="dh"), lambda dz=dz, w=w, o=opts: matmul(
                dz, w, _empty(n_chunk, D), accumulate=True, **o)
            yield dict(what, product="dW"), lambda dz=dz, hh=hh, o=opts, dt=dw_dtype: matmul(
                dz.T, hh, _empty(v_chunk, D, dtype=dt), accumulate=False, **o)


def one_token(family: str):
    """A launch of one token: N = 1 (and the strides equal to 1) become compile-time constants."""
    h1, W1 = _empty(1, 4096, dtype=torch.bfloat16), _empty(151936, 4096, dtype=torch.bfloat16)
    y1, f1 = _empty(1, dtype=torch.int64), _empty(1)
    fwd = configs.lookup("fwd", family, "bf16", 4096, 151936)
    bwd = dict(dlogits_config=configs.lookup("dlogits", family, "bf16", 4096, 151936),
               matmul_config=configs.lookup("matmul", family, "bf16", 4096, 151936))
    common = dict(inv_temperature=1.0, softcap=None, upcast_operands=False, input_precision="ieee",
                  deterministic=True)
    what = dict(operands="bf16", epilogue="plain", D=4096, V=151936, tokens=1)
    yield dict(what, kind="fwd", config=fwd), lambda: logprobs_entropy_fwd(h1, W1, None, y1, config=fwd, **common)
    yield dict(what, kind="backward", config=bwd["dlogits_config"]), lambda: logprobs_entropy_bwd(
        h1, W1, None, y1, f1, f1, f1, None, operand_dtype=torch.bfloat16, needs=(True, True, False),
        gemm_choice="triton", **bwd, **common)


CONTROLS = [  # (what, table row) that must fail the checks: the test proves it can fail
    ("shared memory: 5 stages of the 128 x 256 x 64 bf16 tile (240 KiB)",
     configs.Row("sm90", "fwd", "bf16", 4096, 151936, configs.sweep_config(128, 256, 64, 8, 8, 5))),
    ("spills in the K loop: IEEE fp32 on a 256 x 128 x 64 tile",
     configs.Row("sm90", "fwd", "fp32", 4096, 151936, configs.sweep_config(256, 128, 64, 8, 8, 2))),
    ("epilogue spills: the soft-cap on the 128 x 256 x 64 bf16 tile",
     configs.Row("sm90", "fwd", "bf16", 4096, 151936, configs.sweep_config(128, 256, 64, 8, 8, 4),
                 epilogue="softcap")),
]


def controls():
    """The ``CONTROLS`` rows, each compiled for sm90 as the only row of its kind."""
    table = list(configs.TABLE)
    try:
        for name, row in CONTROLS:
            configs.TABLE[:] = [row]
            for what, call in launches("sm90"):
                yield dict(what, control=name), call
    finally:
        configs.TABLE[:] = table


def main(args: list[str]) -> None:
    for family in [a for a in args if a != "--controls"] or ([] if args else list(TARGETS)):
        driver.set_active(CompileOnlyDriver(TARGETS[family]))
        _report(family, launches(family))
        _report(family, one_token(family))
    if "--controls" in args:
        driver.set_active(CompileOnlyDriver(TARGETS["sm90"]))
        _report("sm90", controls())


def _report(family: str, calls) -> None:
    for what, call in calls:
        _COMPILED.clear()
        call()
        for kernel in dict.fromkeys(_COMPILED):  # (a launcher may compile one kernel many times)
            record = dict(target=family, triton=triton.__version__, **what, **inspect(kernel))
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
