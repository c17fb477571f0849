"""Where a run happened: device, library versions, date, git commit."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import subprocess
import sys

import torch

from . import peers

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pick_device(requested: str | None) -> torch.device:
    """``requested`` ("cpu" / "cuda") or CUDA when available."""
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible (torch.cuda.is_available() is False)")
    return torch.device(requested)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {cpu_name()} ({torch.get_num_threads()} threads)"


def slug(text: str) -> str:
    """Folder-safe lower-case name: ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    text = re.sub(r"\(.*?\)", "", text.lower())
    return re.sub(r"[^a-z0-9.]+", "-", text).strip("-.") or "device"


def device_info(device: torch.device) -> dict:
    info = {"type": device.type, "name": device_name(device), "slug": slug(device_name(device)),
            "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(total_memory_bytes=props.total_memory, capability=f"{props.major}.{props.minor}",
                    cuda=torch.version.cuda)
    return info


def _module_version(name: str) -> str | None:
    try:
        module = __import__(name)
    except Exception:  # noqa: BLE001 -- absent or broken: no version
        return None
    return getattr(module, "__version__", None)


def versions() -> dict:
    import fused_pg
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "triton": _module_version("triton"),
        "fused_pg": fused_pg.__version__,
        "liger_kernel": peers.version(peers.LIGER),
        "cut_cross_entropy": peers.version(peers.CCE),
        "platform": platform.platform(),
    }


def git_commit() -> dict:
    """``{"commit": sha or None, "dirty": bool or None}`` of the repository the bench lives in."""
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", REPO_ROOT, *args], capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": sha, "dirty": None if status is None else bool(status)}


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
