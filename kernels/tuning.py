"""Tile-config sweeps on the local GPU: time candidate configs of one kernel at one shape and
print the results as rows of ``kernels.configs.TABLE``.

    from fused_pg.kernels.tuning import sweep, format_row
    timings = sweep("fwd", (16384, 4096, 151936), torch.bfloat16, "cuda")   # fastest first
    print(format_row(timings[0]))          # paste into TABLE (kernels/configs.py)

What each kind times, at shape (N tokens, D hidden, V vocabulary) -- the work of one step:

* ``"fwd"``:     the forward sweep (split kernel + merge) with the candidate tile, its grouping
                 and the split count ``num_vocab_splits`` derives from them;
* ``"dlogits"``: the dlogits kernel over every vocabulary slab of the backward (default slabs);
* ``"matmul"``:  the Triton matmul's dh and dW products over every slab (the GEMM used where
                 cuBLAS is not).

Memory: the inputs of one step at that shape (hidden, weight, one dlogits slab, fp32 dh and an
fp32 dW slab for "matmul"). Timing needs a GPU (``triton.testing.do_bench``); ``timer=``
replaces it (the tests pass a stand-in and run the candidates under the interpreter).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Callable

import torch
import triton

from .backward import default_chunks, logprobs_entropy_bwd
from .configs import KINDS, META_KEYS, gpu_family, operand_kind, search_space
from .forward import logprobs_entropy_fwd
from .matmul import matmul

SWEEP_GROUPS = (4, 8, 16)  # GROUP_N / GROUP_M values a sweep tries for every tile


@dataclass(frozen=True)
class Timing:
    """One candidate config's time at one shape (``format_row`` turns it into a table row)."""

    kind: str
    family: str
    dtype: str
    N: int
    D: int
    V: int
    config: dict
    ms: float
    device_name: str


def candidates(kind: str, groups: tuple[int, ...] = SWEEP_GROUPS) -> list[dict]:
    """The configs ``sweep`` times by default: the autotune search space (pathological configs
    removed) with every GROUP value in ``groups``."""
    return search_space(kind, groups)


def _cuda_timer(fn: Callable[[], None]) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _runner(kind: str, shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device,
            seed: int) -> Callable[[dict], Callable[[], None]]:
    """Inputs at ``shape`` and a factory: config -> a zero-argument call that runs the kernel."""
    N, D, V = shape
    gen = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(N, D, device=device, generator=gen).to(dtype)
    W = (torch.randn(V, D, device=device, generator=gen) / D ** 0.5).to(dtype)
    y = torch.randint(0, V, (N,), device=device, generator=gen)
    common = dict(inv_temperature=1.0, softcap=None, upcast_operands=False, input_precision=_precision(dtype),
                  deterministic=True)
    if kind == "fwd":
        return lambda cfg: lambda: logprobs_entropy_fwd(h, W, None, y, config=cfg, **common)
    if kind == "dlogits":
        lse, ent = torch.zeros(N, device=device), torch.zeros(N, device=device)
        g, e = torch.randn(N, device=device, generator=gen), torch.randn(N, device=device, generator=gen)
        return lambda cfg: lambda: logprobs_entropy_bwd(
            h, W, None, y, lse, ent, g, e, operand_dtype=dtype, needs=(False, False, False),
            dlogits_config=cfg, **common)
    # matmul: dh[n] += dz @ W[v] and dW[v] = dz^T @ h over the default slabs
    n_chunk, v_chunk = default_chunks(N, V, D, operand_bytes=dtype.itemsize, weight_bytes=dtype.itemsize)
    dz = torch.randn(n_chunk, v_chunk, device=device, generator=gen).to(dtype)
    dh = torch.zeros(N, D, device=device)
    dW = torch.empty(v_chunk, D, device=device)

    def run(cfg):
        def step():
            for v0 in range(0, V, v_chunk):
                v1 = min(v0 + v_chunk, V)
                for n0 in range(0, N, n_chunk):
                    n1 = min(n0 + n_chunk, N)
                    a = dz[: n1 - n0, : v1 - v0]
                    matmul(a, W[v0:v1], dh[n0:n1], accumulate=v0 > 0, config=cfg, **opts)
                    matmul(a.T, h[n0:n1], dW[: v1 - v0], accumulate=n0 > 0, config=cfg, **opts)
        return step
    opts = dict(upcast_operands=False, input_precision=_precision(dtype), deterministic=True)
    return run


def _precision(dtype: torch.dtype) -> str:
    """What precision="native" multiplies with: 16-bit operands as they are, fp32 as 3xTF32."""
    return "ieee" if dtype in (torch.bfloat16, torch.float16) else "tf32x3"


def sweep(kind: str, shape: tuple[int, int, int], dtype: torch.dtype, device: str | torch.device = "cuda", *,
          configs: list[dict] | None = None, timer: Callable[[Callable[[], None]], float] | None = None,
          seed: int = 0, verbose: bool = True) -> list[Timing]:
    """Time every candidate config of ``kind`` at ``shape`` = (N, D, V) on ``device``.

    Args:
        kind: "fwd" | "dlogits" | "matmul".
        shape: (N tokens, D hidden size, V vocabulary size).
        dtype: input dtype (torch.bfloat16, torch.float16, or torch.float32: the "tf32" rows,
            3xTF32 as precision="native" multiplies fp32).
        configs: candidates (default: ``candidates(kind)``); a config that does not compile on
            this GPU (e.g. out of shared memory) is reported and skipped.
        timer: ms of a zero-argument call (default: ``triton.testing.do_bench``, median).
        verbose: print each timing and, at the end, the fastest config as a table row.
    Returns:
        ``Timing`` per config that ran, fastest first.

    Example:
        >>> rows = sweep("dlogits", (16384, 4096, 151936), torch.bfloat16)
        >>> print(format_row(rows[0]))
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    device = torch.device(device)
    timer = timer or _cuda_timer
    configs = candidates(kind) if configs is None else configs
    make = _runner(kind, shape, dtype, device, seed)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    N, D, V = shape
    timings = []
    for cfg in configs:
        try:
            ms = float(timer(make(cfg)))
        except Exception as err:  # noqa: BLE001  (triton's OutOfResources and compile errors vary by version)
            if verbose:
                print(f"{kind} {describe(kind, cfg)}: skipped ({type(err).__name__}: {err})")
            continue
        timings.append(Timing(kind, gpu_family(device), operand_kind(dtype, _precision(dtype)), N, D, V, dict(cfg), ms,
                              name))
        if verbose:
            print(f"{kind} {describe(kind, cfg)}: {ms:.3f} ms")
    timings.sort(key=lambda t: t.ms)
    if verbose and timings:
        print(format_row(timings[0]))
    return timings


def describe(kind: str, config: dict) -> str:
    """``128x256x64/g8/w8/s4``: tile, GROUP, warps, stages."""
    a, b, c, g = (config[k] for k in META_KEYS[kind])
    return f"{a}x{b}x{c}/g{g}/w{config['num_warps']}/s{config['num_stages']}"


def format_row(timing: Timing, date: datetime.date | None = None) -> str:
    """A ``kernels.configs.TABLE`` line for this timing (Python source, trailing comma)."""
    t = timing
    maker = "matmul_config" if t.kind == "matmul" else "sweep_config"
    args = ", ".join(str(t.config[k]) for k in META_KEYS[t.kind])
    date = date or datetime.date.today()
    source = f"{t.device_name}: {t.ms:.2f} ms at N={t.N} (kernels.tuning.sweep, {date.isoformat()})"
    return (f"Row({t.family!r}, {t.kind!r}, {t.dtype!r}, {t.D}, {t.V}, "
            f"{maker}({args}, {t.config['num_warps']}, {t.config['num_stages']}), {source!r}),")

