"""What a benchmark run is and where it runs: shapes, model presets, suites, the resolved run
(:class:`BenchConfig`) and the device. The loss every implementation computes is a
:class:`fused_pg.LossConfig` (the library's own option object, validated there)."""

from __future__ import annotations

import dataclasses
import os
import platform
import re
from dataclasses import dataclass, field

import torch

from fused_pg import LossConfig

# LM-head shapes (hidden size D, vocabulary V) of real models, from their published configs.
MODEL_PRESETS: dict[str, tuple[int, int]] = {
    "qwen2.5-0.5b": (896, 151936), "qwen2.5-1.5b": (1536, 151936), "qwen2.5-3b": (2048, 151936),
    "qwen2.5-7b": (3584, 152064), "qwen2.5-14b": (5120, 152064), "qwen2.5-32b": (5120, 152064),
    "qwen2.5-72b": (8192, 152064), "qwen3-0.6b": (1024, 151936), "qwen3-1.7b": (2048, 151936),
    "qwen3-4b": (2560, 151936), "qwen3-8b": (4096, 151936), "qwen3-14b": (5120, 151936),
    "qwen3-32b": (5120, 151936), "llama3-8b": (4096, 128256), "llama3-70b": (8192, 128256),
    "llama3.2-1b": (2048, 128256), "llama3.2-3b": (3072, 128256), "gemma2-2b": (2304, 256000),
    "gemma2-9b": (3584, 256000), "mistral-7b": (4096, 32768),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# "realistic" logits have an RL policy's token entropy; "flat" ones are i.i.d. (bench.problem)
DATA_KINDS = ("realistic", "flat")
DEFAULT_TARGET_ENTROPY = 1.0
CALIBRATION_TOKENS = 512  # tokens on which realistic data solves its entropy offset
# the benchmark's loss: fused-pg's defaults (DAPO clip-higher, REPO decorrelate, token-mean)
# with an entropy bonus, so that the entropy gradient is part of the work
DEFAULT_LOSS = LossConfig(entropy_coef=1e-3)


def loss_options(loss: LossConfig) -> dict:
    """``loss`` as the keyword options of :func:`fused_pg.repo_loss`,
    :func:`fused_pg.policy_loss_from_logprobs` and the fp64 oracle."""
    return {f.name: getattr(loss, f.name) for f in dataclasses.fields(loss)}


def describe_loss(loss: LossConfig) -> str:
    kl = f"kl={loss.kl_coef:g}" + (f" ({loss.kl_estimator})" if loss.kl_coef else "")
    return (f"repo={loss.repo} {kl} entropy_coef={loss.entropy_coef:g} "
            f"clip=[1-{loss.eps_low:g}, 1+{loss.eps_high:g}] {loss.aggregation}")


@dataclass(frozen=True)
class Shape:
    """One LM-head problem: N tokens, hidden size D, vocabulary V."""

    n: int
    d: int
    v: int

    def __str__(self) -> str:
        return f"N={self.n} D={self.d} V={self.v}"


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


# CPU: about a minute on 2 idle cores; D and V small (a 2-core CPU does ~30-50 GFLOP/s). The
# torch backend holds [1024 x 8192] logit tiles, so its memory advantage shows above N = 1024.
# Five repeats: their median ignores two pre-empted ones on a shared CPU.
CPU_SUITE = Suite("cpu", "fp32", (1024, 2048, 4096), ((64, 16384),), ("fused-torch", "naive"), 1, 5)
CPU_QUICK = Suite("cpu-quick", "fp32", (2048, 3072), ((64, 16384),), ("fused-torch", "naive"), 1, 5)
# CUDA: Qwen3-8B and Llama-3-8B heads in bf16. fused-pg's torch backend (fp32 tiles, no tensor
# cores) is left out by default to keep the suite short; add it with --impl.
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
    precisions: tuple[str, ...]       # dot-product precisions of the fused-pg implementations
    loss: LossConfig
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
    target_entropy: float = DEFAULT_TARGET_ENTROPY  # mean token entropy of realistic data, nats
    max_minutes: float = 15.0         # refuse a run estimated longer than this ...
    yes: bool = False                 # ... unless confirmed
    argv: tuple[str, ...] = field(default_factory=tuple)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "loss": loss_options(self.loss)}


# --- the device ------------------------------------------------------------------------------------

def pick_device(requested: str | None) -> torch.device:
    """``requested`` ("cpu" / "cuda") or CUDA when available."""
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible (torch.cuda.is_available() is False)")
    return torch.device(requested)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine() or "cpu"
    return f"CPU {cpu} ({torch.get_num_threads()} threads)"


def slug(text: str) -> str:
    """Folder-safe lower-case name: ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    text = re.sub(r"\(.*?\)", "", text.lower())
    return re.sub(r"[^a-z0-9.]+", "-", text).strip("-.") or "device"


# The source checkout this package lives in (realpath: it is reached through the symlink
# fused_pg/bench -> ../bench); None when installed elsewhere, e.g. as a console script.
_PARENT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
REPO_ROOT: str | None = _PARENT if os.path.isfile(os.path.join(_PARENT, "pyproject.toml")) else None


def default_out_dir(device: torch.device, acceptance: bool = False) -> str:
    """``results/local/<device>/`` (an acceptance run: ``results/<device>/acceptance/``) in the
    source checkout, else under the current directory."""
    name = slug(device_name(device))
    return os.path.join(REPO_ROOT or os.getcwd(), "results", *([name, "acceptance"] if acceptance else ["local", name]))
