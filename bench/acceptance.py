"""The GPU acceptance run: ``python -m bench --acceptance`` (about 8 minutes on one H100/H200).

Five stages (:data:`STAGES`, each described in docs/benchmark.md), each in its own process (a
crashed CUDA context or a hung compile cannot take the next stage with it) and time-boxed:
SIGINT at its deadline, SIGKILL :data:`GRACE_S` later. Every stage writes its files as results
come in, so a stage cut short keeps what finished. ``--device cpu`` runs the same stages at tiny
shapes with any GPU hidden: a test of the command.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback

STAGES = ("env", "tests", "table", "profile", "probes")
# seconds each stage keeps at least: a stage's deadline leaves these to the stages after it, and
# what a stage leaves unused goes to the later ones (450 s in all, plus grace periods)
RESERVE_S = {"env": 30, "tests": 120, "table": 200, "profile": 45, "probes": 55}
BUDGET_S = sum(RESERVE_S.values())
GRACE_S = 10
IMPLS = ("fused-triton", "verl", "naive", "compiled", "cce", "trl", "liger-triton", "liger-chunked", "fused-torch")
TABLE_ARGS = {  # the benchmark's arguments: the acceptance shapes on CUDA, tiny ones on CPU
    "cuda": ["--dtype", "bf16", "--d", "4096", "--v", "151936,128256", "--n", "4096,8192,16384,32768",
             "--warmup", "2", "--repeats", "3"],
    "cpu": ["--dtype", "fp32", "--d", "128", "--v", "1531,1000", "--n", "256", "--seq-len", "64",
            "--warmup", "1", "--repeats", "2"],
}
PROFILE_SHAPE = {"cuda": (16384, 4096, 151936), "cpu": (64, 64, 512)}
PROBE_SHAPE = (2048, 1024, 32000)


# --- the driver ------------------------------------------------------------------------------------

def run_stage(name: str, cmd: list[str], timeout: float, log_path: str, **popen) -> dict:
    """Run ``cmd`` (its output streamed to the console and ``log_path``); at ``timeout`` seconds
    send its process group SIGINT, and SIGKILL :data:`GRACE_S` later."""
    t0 = time.monotonic()
    timed_out = threading.Event()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, **popen)

        def stop():
            timed_out.set()
            for sig, wait in ((signal.SIGINT, GRACE_S), (signal.SIGKILL, 0)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(wait)
                    return
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
        timer = threading.Timer(timeout, stop)
        timer.start()
        try:
            for line in proc.stdout:
                print(f"[{name}] {line}", end="", flush=True)
                log.write(line)
            rc = proc.wait()
        except KeyboardInterrupt:  # the stage runs in its own session: Ctrl-C here must stop it
            stop()
            raise
        finally:
            timer.cancel()
    status = "timeout" if timed_out.is_set() else "ok" if rc == 0 else "failed"
    return {"stage": name, "status": status, "returncode": rc, "seconds": round(time.monotonic() - t0, 1),
            "timeout_s": round(timeout), "log": os.path.basename(log_path)}


def main(device_type: str, out_dir: str | None, impls: tuple[str, ...] | None, budget_s: float,
         stages: tuple[str, ...]) -> int:
    """Run the acceptance stages; returns 0 when every stage that ran finished in time."""
    import torch

    import fused_pg

    from .config import REPO_ROOT, default_out_dir
    absent = [m for m in ("rich", "matplotlib", "pytest") if not _importable(m)]
    if absent:  # every stage would fail: say it once
        print(f"the acceptance run needs {', '.join(absent)} (pip install 'fused-pg[test,bench]'; without a package "
              "index, their pure-Python wheels)", file=sys.stderr)
        return 2
    out_dir = os.path.abspath(out_dir or default_out_dir(torch.device(device_type), acceptance=True))
    os.makedirs(out_dir, exist_ok=True)
    root = REPO_ROOT or os.getcwd()
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
        filter(None, [os.path.dirname(os.path.dirname(fused_pg.__file__)), os.environ.get("PYTHONPATH")])))
    # the suite's minimum-examples gate is for a whole test run; the tests stage runs only the GPU
    # file, which draws no hypothesis example where it skips (a CPU run)
    env.pop("FUSED_PG_MIN_EXAMPLES", None)
    if device_type == "cpu":  # a CPU run hides any GPU; its profile runs the Triton kernels interpreted
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    deadline, scale, records = time.monotonic() + budget_s, budget_s / BUDGET_S, []
    print(f"acceptance run on {device_type}: stages {', '.join(stages)}; budget {budget_s:.0f} s; "
          f"results in {out_dir}", flush=True)
    for i, name in enumerate(STAGES):
        if name not in stages:
            records.append({"stage": name, "status": "skipped", "reason": "not in --stages"})
            continue
        later = sum(RESERVE_S[s] for s in STAGES[i + 1:] if s in stages) * scale
        timeout = max(10.0, deadline - time.monotonic() - later - GRACE_S)
        if name == "tests":
            if not os.path.isfile(os.path.join(root, "tests", "test_cuda.py")):
                records.append({"stage": name, "status": "skipped", "reason": "needs the source checkout's tests/"})
                continue
            cmd = [sys.executable, "-m", "pytest", "tests/test_cuda.py", "-v", "-rA", "-p", "no:cacheprovider",
                   "--junitxml", os.path.join(out_dir, "pytest-junit.xml")]
            if device_type == "cuda" and _importable("xdist"):
                cmd += ["-n", "4"]  # parallel Triton compilation
        else:
            cmd = [sys.executable, "-m", "fused_pg.bench.acceptance", name, "--device", device_type, "--out", out_dir,
                   "--seconds", str(int(timeout))] + (["--impl", ",".join(impls)] if impls else [])
        print(f"== stage {name} (time box {timeout:.0f} s)", flush=True)
        records.append(run_stage(name, cmd, timeout, os.path.join(out_dir, f"{name}.log"), cwd=root, env=env))
        print(f"== stage {name}: {records[-1]['status']} in {records[-1]['seconds']} s", flush=True)
        _write_json(os.path.join(out_dir, "acceptance.json"), {"device": device_type, "budget_s": budget_s,
                                                                "stages": records})
    text = summary(out_dir, records)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(text + "\n")
    print("\n" + text)
    return 0 if all(r["status"] in ("ok", "skipped") for r in records) else 1


def _importable(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1, default=str)


def _load(out_dir: str, name: str) -> dict | None:
    try:
        with open(os.path.join(out_dir, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def summary(out_dir: str, records: list[dict]) -> str:
    """The key results of a run, from the files its stages wrote."""
    from .report import fmt_bytes, fmt_err, format_table
    lines = ["# fused-pg acceptance run", ""] + [
        f"- stage {r['stage']}: {r['status']}" + (f" in {r['seconds']} s (time box {r['timeout_s']} s, exit "
                                                 f"{r['returncode']})" if "seconds" in r else f" ({r['reason']})")
        for r in records]
    env = _load(out_dir, "env.json")
    if env:
        lines += ["", f"device: {env['device']['name']}; driver {env['driver']}; torch {env['versions']['torch']} "
                      f"(CUDA {env['cuda']}); triton {env['versions']['triton']}; git {env['git']['commit']}"]
    if os.path.exists(os.path.join(out_dir, "tests.log")):
        with open(os.path.join(out_dir, "tests.log")) as f:
            tail = re.findall(r"^=+ (.*(?:passed|failed|skipped|error).*?) =+$", f.read(), re.M)
        lines.append("tests/test_cuda.py: " + (tail[-1] if tail else "no pytest summary line (cut short?)"))
    bench = _load(out_dir, "bench.json")
    if bench:
        rows = [[c["label"], str(c["n"]), str(c["v"])] + (
            [f"{c['fwd_bwd_ms']['median']:.1f}", f"{c['floor_ratio']['fwd_bwd']:.3f}", fmt_bytes(c["peak_mem_bytes"]),
             fmt_err(c["logprobs_max_abs"])] if c["status"] == "ok" else [f"{c['status'].upper()}: {c['reason']}",
                                                                         "", "", ""]) for c in bench["results"]]
        lines += ["", format_table(["implementation", "N", "V", "fwd+bwd ms", "time / floor", "peak above inputs",
                                    "logp err"], rows, markdown=True)]
        lines += [f"- skipped {s['label']}: {s['reason']}" for s in bench["skipped"]]
        if bench["interrupted"]:
            lines.append("- (the table was cut short: the rows above are the ones that finished)")
    prof = _load(out_dir, "profile.json")
    if prof:
        lines += ["", f"profile N={prof['shape'][0]}: fwd+bwd {prof['step_ms']:.2f} ms = "
                      f"{prof['step_ms'] / prof['floor_ms']:.3f} x the 4-GEMM floor ({prof['floor_ms']:.2f} ms); "
                      "per group: " + ", ".join(f"{k} {v:.2f} ms" for k, v in prof["groups_ms"].items())]
    probes = _load(out_dir, "probes.json") or {}
    lines += [f"- probe {k}: {json.dumps(v, default=str)[:300]}" for k, v in probes.items()]
    return "\n".join(lines)


# --- the stages (each runs in its own process) -------------------------------------------------------

def stage_env(device, out_dir: str, **_) -> None:
    import torch

    from .report import device_info, git_commit, versions
    info = {"device": device_info(device), "versions": versions(), "git": git_commit(), "cuda": torch.version.cuda,
            "driver": None, "env": {k: v for k, v in os.environ.items()
                                    if k.startswith(("FUSED_PG", "CUDA_", "CUBLAS", "TRITON", "TORCH"))}}
    if device.type == "cuda":
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                                             "--format=csv,noheader"], capture_output=True, text=True,
                                            timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            info["driver"] = f"nvidia-smi failed: {exc}"
    print(json.dumps(info, indent=1, default=str), flush=True)
    _write_json(os.path.join(out_dir, "env.json"), info)


def stage_table(device, out_dir: str, impls: tuple[str, ...] | None, **_) -> int:
    from .cli import main as bench_main
    argv = ["--device", device.type, *TABLE_ARGS[device.type], "--impl", ",".join(impls or IMPLS), "--yes",
            "--out", out_dir]
    print("python -m bench " + " ".join(argv), flush=True)
    return bench_main(argv)


def _fused_loss(shape: tuple[int, int, int], device):
    """A batch of the benchmark's data and fused-pg's loss on it: ``(problem, loss(backend))``."""
    import torch

    from .config import DEFAULT_LOSS, Shape
    from .impls import fused_loss
    from .problem import make_problem
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    problem = make_problem(Shape(*shape), dtype, device, DEFAULT_LOSS, seq_len=min(1024, shape[0]))
    return problem, lambda backend="triton": fused_loss(problem, DEFAULT_LOSS, backend).loss


def _fwd_bwd(problem, loss_fn, backend: str = "triton") -> tuple:
    """(loss, d hidden, d weight) of one forward+backward."""
    import torch
    loss = loss_fn(backend)
    return (loss.detach(), *torch.autograd.grad(loss, problem.grad_inputs()))


def kernel_group(name: str) -> str:
    """Profile group of a CUDA kernel: cuBLAS GEMMs, each of fused-pg's Triton kernels by name
    (``_<what>_kernel``), the rest together."""
    if any(p in name.lower() for p in ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "cublas", "ampere_")):
        return "cublas gemm"
    return f"triton {name}" if re.fullmatch(r"_\w+_kernel", name) else "other"


def stage_profile(device, out_dir: str, **_) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from .measure import measure_floor, time_ms
    shape, cuda = PROFILE_SHAPE[device.type], device.type == "cuda"
    problem, loss_fn = _fused_loss(shape, device)
    first = time_ms(lambda: _fwd_bwd(problem, loss_fn)) / 1e3
    floor = measure_floor(problem.hidden, problem.weight, repeats=3)
    step_ms = statistics.median(time_ms(lambda: _fwd_bwd(problem, loss_fn)) for _ in range(3 if cuda else 1))
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        _fwd_bwd(problem, loss_fn)
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    # on CUDA the GPU kernels (device time); on CPU the aten operators stand in (a test of the plumbing)
    kernels = sorted(((e.key, (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3, e.count)
                      for e in events if (e.device_type == torch.autograd.DeviceType.CUDA if cuda
                                          else e.key.startswith("aten::"))), key=lambda k: -k[1])
    rows, groups = [], {}
    for name, ms, count in kernels:
        group = kernel_group(name) if cuda else "cpu operators"
        groups[group] = groups.get(group, 0.0) + ms
        rows.append({"name": name[:160], "group": group, "ms": ms, "count": count})
    gemm = floor["gemm_ms"]["logits"]["median"]
    _write_json(os.path.join(out_dir, "profile.json"), {
        "shape": shape, "device": device.type, "first_call_s": first, "step_ms": step_ms,
        "floor_ms": floor["floor_ms"]["fwd_bwd"], "gemm_ms": gemm, "groups_ms": groups,
        "groups_in_gemms": {k: v / gemm for k, v in groups.items()}, "kernels": rows[:40]})
    with open(os.path.join(out_dir, "profile.txt"), "w") as f:
        f.write(events.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=30))
    print(f"fwd+bwd {step_ms:.2f} ms, 4-GEMM floor {floor['floor_ms']['fwd_bwd']:.2f} ms; per group (ms): "
          + ", ".join(f"{k} {v:.2f}" for k, v in groups.items()), flush=True)
    for r in rows[:15]:
        print(f"  {r['ms']:9.3f} ms  x{r['count']:<4d} {r['group']:24s} {r['name'][:100]}", flush=True)


def _probe_sync(problem, loss_fn) -> dict:
    import torch
    out = {}
    for backend in ("triton", "torch"):
        _fwd_bwd(problem, loss_fn, backend)  # compiled and autotuned before the check
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            _fwd_bwd(problem, loss_fn, backend)
            out[backend] = "no host synchronisation"
        except RuntimeError as exc:
            frames = [f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}" for f in traceback.extract_tb(exc.__traceback__)
                      if "fused_pg" in f.filename or "/kernels/" in f.filename]
            out[backend] = {"synchronises": str(exc).splitlines()[0][:200], "where": frames[-3:]}
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return out


def _probe_graph(problem, loss_fn) -> dict:
    import torch
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            eager = _fwd_bwd(problem, loss_fn)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = _fwd_bwd(problem, loss_fn)
    graph.replay()
    torch.cuda.synchronize()
    return {"captured": True, "bitwise_equal": all(torch.equal(a, b) for a, b in zip(static, eager)),
            "max_abs_diff_loss_dh_dw": [float((a.float() - b.float()).abs().max()) for a, b in zip(static, eager)]}


def _probe_compile(problem, loss_fn) -> dict:
    """The loss compiled (``torch.compile``), its backward through autograd, against eager."""
    import torch
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    eager = _fwd_bwd(problem, loss_fn)
    compiled = _fwd_bwd(problem, torch.compile(loss_fn))
    breaks = {str(k)[:150]: v for k, v in counters["graph_break"].items()}
    return {"compiled": True, "graph_breaks": sum(breaks.values()), "break_reasons": dict(list(breaks.items())[:5]),
            "max_rel_diff_loss_dh_dw": [float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(
                1e-30)) for a, b in zip(compiled, eager)]}


PROBES = {"host_syncs": (_probe_sync, 40), "cuda_graph": (_probe_graph, 40), "torch_compile": (_probe_compile, 120)}


def stage_probes(device, out_dir: str, seconds: int, **_) -> None:
    path, results = os.path.join(out_dir, "probes.json"), {}
    if device.type != "cuda":
        reason = "needs CUDA (sync debug mode, CUDA graphs, torch.compile over backend='triton')"
        results = {name: {"skipped": reason} for name in PROBES}
        _write_json(path, results)
        print(json.dumps(results), flush=True)
        return
    end = time.monotonic() + seconds
    problem, loss_fn = _fused_loss(PROBE_SHAPE, device)

    def alarm(signum, frame):
        raise TimeoutError("probe time limit")
    signal.signal(signal.SIGALRM, alarm)
    for name, (probe, limit) in PROBES.items():
        left = int(end - time.monotonic()) - 3
        if left < 5:
            results[name] = {"skipped": "out of time"}
            continue
        signal.alarm(min(limit, left))
        try:
            results[name] = probe(problem, loss_fn)
        except Exception as exc:  # noqa: BLE001 -- recorded; the next probe runs
            results[name] = {"error": f"{type(exc).__name__}: {str(exc)[:400]}",
                             "where": traceback.format_exc().strip().splitlines()[-3:]}
        finally:
            signal.alarm(0)
        print(f"probe {name}: {results[name]}", flush=True)
        _write_json(path, results)


STAGE_FUNCTIONS = {"env": stage_env, "table": stage_table, "profile": stage_profile, "probes": stage_probes}


def stage_main(argv: list[str] | None = None) -> int:
    """``python -m fused_pg.bench.acceptance STAGE --device D --out DIR [--seconds S] [--impl LIST]``."""
    import torch
    p = argparse.ArgumentParser(prog="python -m fused_pg.bench.acceptance", description="one acceptance stage")
    p.add_argument("stage", choices=tuple(STAGE_FUNCTIONS))
    p.add_argument("--device", choices=("cpu", "cuda"), required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seconds", type=int, default=BUDGET_S)
    p.add_argument("--impl", type=lambda text: tuple(text.split(",")))
    args = p.parse_args(argv)
    return STAGE_FUNCTIONS[args.stage](device=torch.device(args.device), out_dir=args.out, impls=args.impl,
                                       seconds=args.seconds) or 0


if __name__ == "__main__":
    raise SystemExit(stage_main())
