"""What a benchmark run measures: shapes, model presets, loss options, suite defaults.

Everything here is plain data (frozen dataclasses and dicts); the command line
(:mod:`bench.cli`) builds a :class:`BenchConfig` from it and the runner reads nothing else.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

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

PRECISIONS = ("native", "tf32", "ieee")
REPO_MODES = ("none", "fixed", "decorrelate")


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
    """The policy loss every implementation is asked to compute (DAPO-style, token-mean).

    repo / repo_coef:  REPO advantage correction (see :func:`fused_pg.repo_loss`).
    kl_coef:           k3 KL penalty to a reference policy (0: off, no reference log-probs).
    entropy_coef:      entropy bonus; > 0 makes the entropy *gradient* part of the work.
    eps_low, eps_high: asymmetric clip range (DAPO clip-higher).
    """

    repo: str = "decorrelate"
    repo_coef: float = 1.0
    kl_coef: float = 0.0
    entropy_coef: float = 1e-3
    eps_low: float = 0.2
    eps_high: float = 0.28

    def describe(self) -> str:
        parts = [f"repo={self.repo}"]
        if self.repo != "none":
            parts.append(f"repo_coef={self.repo_coef:g}")
        parts += [f"kl={self.kl_coef:g}", f"entropy_coef={self.entropy_coef:g}",
                  f"clip=[1-{self.eps_low:g}, 1+{self.eps_high:g}]", "token-mean"]
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
CPU_SUITE = Suite("cpu", "fp32", (1024, 2048, 4096), ((64, 16384),), ("fused-torch", "naive"), 1, 3)
CPU_QUICK = Suite("cpu-quick", "fp32", (2048, 3072), ((64, 16384),), ("fused-torch", "naive"), 1, 2)
# CUDA: the GPU suite (Qwen3-8B and Llama-3-8B heads), bf16. fused-pg's torch backend
# is left out by default to keep the suite short (its tiles are upcast to fp32, so its GEMMs run
# without tensor cores); add it with --impl.
CUDA_IMPLS = ("fused-triton", "naive", "compiled", "liger-chunked", "liger-triton", "cce")
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
    seq_len: int                      # tokens per sequence (N = B * seq_len)
    out_dir: str
    suite: str                        # name of the suite the defaults came from
    quick: bool = False
    plot: bool = True
    accuracy: bool = True
    seed: int = 0
    argv: tuple[str, ...] = field(default_factory=tuple)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def as_dict(self) -> dict:
        d = asdict(self)
        d["shapes"] = [asdict(s) for s in self.shapes]
        d["loss"] = self.loss.as_dict()
        return d
