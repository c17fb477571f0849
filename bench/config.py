"""What a benchmark run is and where it runs: shapes, model presets, the loss every
implementation computes, suite defaults, the benchmark data, and the device.

Everything here is plain data (frozen dataclasses and dicts) plus the few functions that
pick and name the device; the command line (:mod:`bench.cli`) builds a :class:`BenchConfig`
and the runner reads nothing else. Option names (REPO modes, precisions, KL estimators,
aggregations) are fused-pg's own, imported from :mod:`fused_pg.config`.
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import asdict, dataclass, field

import torch

from fused_pg.config import AGGREGATIONS, KL_ESTIMATORS, PRECISIONS, REPO_MODES

__all__ = ["AGGREGATIONS", "KL_ESTIMATORS", "PRECISIONS", "REPO_MODES"]  # re-exported option names

# LM-head shapes (hidden size D, vocabulary V) of real models, from their published configs.
MODEL_PRESETS: dict[str, tuple[int, int]] = {
    "qwen2.5-0.5b": (896, 151936),
    "qwen2.5-1.5b": (1536, 151936),
    "qwen2.5-3b": (2048, 151936),
    "qwen2.5-7b": (3584, 152064),
    "qwen2.5-14b": (5120, 152064),
    "qwen2.5-32b": (5120, 152064),
    "qwen2.5-72b": (8192, 152064),
    "qwen3-0.6b": (1024, 151936),
    "qwen3-1.7b": (2048, 151936),
    "qwen3-4b": (2560, 151936),
    "qwen3-8b": (4096, 151936),
    "qwen3-14b": (5120, 151936),
    "qwen3-32b": (5120, 151936),
    "llama3-8b": (4096, 128256),
    "llama3-70b": (8192, 128256),
    "llama3.2-1b": (2048, 128256),
    "llama3.2-3b": (3072, 128256),
    "gemma2-2b": (2304, 256000),
    "gemma2-9b": (3584, 256000),
    "mistral-7b": (4096, 32768),
}

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}

# Benchmark data (see bench.problem): "realistic" logits have the token entropy of an RL
# policy (mean DEFAULT_TARGET_ENTROPY nats, most tokens near 0, a tail of uncertain ones);
# "flat" logits are i.i.d. Gaussian (std 3), several nats of entropy, uniform targets.
DATA_KINDS = ("realistic", "flat")
DEFAULT_TARGET_ENTROPY = 1.0
CALIBRATION_TOKENS = 512  # tokens on which realistic data solves its entropy offset


@dataclass(frozen=True)
class Shape:
    """One LM-head problem: N tokens, hidden size D, vocabulary V."""

    n: int
    d: int
    v: int

    def __str__(self) -> str:
        return f"N={self.n} D={self.d} V={self.v}"


@dataclass(frozen=True)
class LossSpec:
    """The policy loss every implementation is asked to compute (DAPO-style by default).

    repo / repo_coef:  REPO advantage correction (see :func:`fused_pg.repo_loss`).
    kl_coef:           KL penalty to a reference policy (0: off, no reference log-probs),
                       estimator ``kl_estimator``.
    entropy_coef:      entropy bonus; > 0 makes the entropy *gradient* part of the work.
    eps_low, eps_high: asymmetric clip range (DAPO clip-higher).
    aggregation:       how per-token losses are reduced.

    :meth:`kwargs` is the one mapping to fused-pg's (and the oracle's) keyword arguments.
    """

    repo: str = "decorrelate"
    repo_coef: float = 1.0
    kl_coef: float = 0.0
    entropy_coef: float = 1e-3
    eps_low: float = 0.2
    eps_high: float = 0.28
    kl_estimator: str = "k3"
    aggregation: str = "token-mean"

    def __post_init__(self):
        for name, value, allowed in (("repo", self.repo, REPO_MODES),
                                     ("kl_estimator", self.kl_estimator, KL_ESTIMATORS),
                                     ("aggregation", self.aggregation, AGGREGATIONS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")

    def kwargs(self) -> dict:
        """Keyword arguments of :func:`fused_pg.repo_loss`, :func:`fused_pg.policy_loss_from_logprobs`
        and the fp64 oracle for this loss."""
        return dict(eps_low=self.eps_low, eps_high=self.eps_high, repo=self.repo, repo_coef=self.repo_coef,
                    kl_coef=self.kl_coef, kl_estimator=self.kl_estimator, entropy_coef=self.entropy_coef,
                    aggregation=self.aggregation)

    def describe(self) -> str:
        parts = [f"repo={self.repo}"]
        if self.repo != "none":
            parts.append(f"repo_coef={self.repo_coef:g}")
        kl = f"kl={self.kl_coef:g}" + (f" ({self.kl_estimator})" if self.kl_coef else "")
        parts += [kl, f"entropy_coef={self.entropy_coef:g}",
                  f"clip=[1-{self.eps_low:g}, 1+{self.eps_high:g}]", self.aggregation]
        return " ".join(parts)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Suite:
    """Defaults of a named suite (what ``python -m bench`` runs without shape options)."""

    name: str
    dtype: str
    ns: tuple[int, ...]
    dv: tuple[tuple[int, int], ...]
    impls: tuple[str, ...]
    warmup: int
    repeats: int


# CPU: about a minute on 2 idle cores. D and V are small because a 2-core CPU does ~30-50
# GFLOP/s. The torch backend holds [1024 x 8192] logit tiles, so its memory advantage shows
# once N exceeds 1024 tokens and V exceeds 8192: the quick suite uses N = 2048 and 3072 only.
# Five timed repeats: the median of five
# ignores two outliers (a shared CPU pre-empts some repeats).
CPU_SUITE = Suite("cpu", "fp32", (1024, 2048, 4096), ((64, 16384),), ("fused-torch", "naive"), 1, 5)
CPU_QUICK = Suite("cpu-quick", "fp32", (2048, 3072), ((64, 16384),), ("fused-torch", "naive"), 1, 5)
# CUDA: the GPU suite (Qwen3-8B and Llama-3-8B heads), bf16. fused-pg's torch backend is left
# out by default to keep the suite short (its tiles are upcast to fp32, so its GEMMs run
# without tensor cores); add it with --impl.
CUDA_IMPLS = ("fused-triton", "naive", "compiled", "verl", "trl", "liger-chunked", "liger-triton", "cce")
CUDA_SUITE = Suite("cuda", "bf16", (4096, 8192, 16384, 32768), ((4096, 151936), (4096, 128256)),
                   CUDA_IMPLS, 3, 10)
CUDA_QUICK = Suite("cuda-quick", "bf16", (4096, 16384), ((4096, 151936),), CUDA_IMPLS, 2, 5)


def default_suite(device_type: str, quick: bool) -> Suite:
    if device_type == "cuda":
        return CUDA_QUICK if quick else CUDA_SUITE
    return CPU_QUICK if quick else CPU_SUITE


@dataclass(frozen=True)
class BenchConfig:
    """A fully resolved benchmark run."""

    device: str                       # "cpu" or "cuda"
    dtype: str                        # key of DTYPES
    shapes: tuple[Shape, ...]
    impls: tuple[str, ...]            # implementation keys, in run order
    precisions: tuple[str, ...]       # precisions of the fused-pg implementations
    loss: LossSpec
    warmup: int
    repeats: int
    seq_len: int                      # longest sequence (see bench.problem.layout)
    out_dir: str
    suite: str                        # name of the suite the defaults came from
    quick: bool = False
    plot: bool = True
    accuracy: bool = True
    seed: int = 0
    data: str = "realistic"           # one of DATA_KINDS
    target_entropy: float = DEFAULT_TARGET_ENTROPY  # mean token entropy of "realistic" data, nats
    max_minutes: float = 15.0         # refuse a run estimated longer than this ...
    yes: bool = False                 # ... unless confirmed
    argv: tuple[str, ...] = field(default_factory=tuple)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def as_dict(self) -> dict:
        d = asdict(self)
        d["shapes"] = [asdict(s) for s in self.shapes]
        d["loss"] = self.loss.as_dict()
        return d


# --- the device ------------------------------------------------------------------------------------

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


# The source checkout this package lives in, when it does (``python -m bench`` from the
# repository root); None when installed elsewhere, e.g. as a console script.
# (realpath: the package is reached through the symlink fused_pg/bench -> ../bench)
_PARENT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
REPO_ROOT: str | None = _PARENT if os.path.isfile(os.path.join(_PARENT, "pyproject.toml")) else None


def default_out_dir(device: torch.device) -> str:
    """``results/local/<device>/`` in the source checkout, else under the current directory."""
    return os.path.join(REPO_ROOT or os.getcwd(), "results", "local", slug(device_name(device)))
