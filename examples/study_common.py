"""Helpers the entropy studies share (``entropy_dynamics.py``, ``entropy_transformer.py``):
the unbiased pass@k estimator, NaN-aware means, ``--set FIELD=VALUE`` overrides of a Config
dataclass, the machine's name, and small PNGs."""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path

import torch
from torch import Tensor


def pass_at_k(n: int, c: Tensor, k: int) -> Tensor:
    """Unbiased pass@k from n samples with c successes: 1 - C(n-c, k) / C(n, k)."""
    return torch.tensor([1.0 - math.comb(n - int(ci), k) / math.comb(n, k) for ci in c])


def mean(xs) -> float:
    """Mean of the values that are neither None nor NaN (NaN when none is left)."""
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else float("nan")


def std(xs) -> float:
    """Sample standard deviation of the values that are not None (0 for fewer than two)."""
    xs = [x for x in xs if x is not None]
    if len(xs) < 2:
        return 0.0
    mu = mean(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1))


def parse_overrides(config_cls, items: list[str]) -> dict:
    """``["field=value", ...]`` -> {field: value}, each value parsed as its default's type
    (bools from 1/true/yes, tuples comma-separated)."""
    fields = config_cls.__dataclass_fields__
    defaults = config_cls()
    out = {}
    for item in items:
        key, _, text = item.partition("=")
        if key not in fields:
            raise SystemExit(f"--set: unknown Config field {key!r}")
        default = getattr(defaults, key)
        if isinstance(default, bool):
            out[key] = text.lower() in ("1", "true", "yes")
        elif isinstance(default, tuple):
            out[key] = tuple(type(default[0])(v) for v in text.split(","))
        else:
            out[key] = type(default)(text)
    return out


def machine(threads: int) -> str:
    """E.g. ``x86_64 Intel(R) Xeon(R) ... x2 cpus, 1 torch thread(s)``."""
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{platform.machine()} {model} x{os.cpu_count()} cpus, {threads} torch thread(s)".replace("  ", " ")


def shrink_png(path: Path) -> None:
    """Re-save with a 256-colour palette (about 3x smaller; the committed figures stay small)."""
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)
