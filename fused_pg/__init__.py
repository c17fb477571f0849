"""fused-pg: entropy-aware policy-gradient losses computed straight from hidden states.

    from fused_pg import repo_loss, adapo_loss, AdaptiveClip, fused_logprobs_entropy

``repo_loss`` (hidden states in), ``policy_loss_from_logprobs`` (per-token log-probs in),
``adapo_loss`` (``repo_loss`` with an entropy controller), ``RepoLoss`` (the same as a module
that holds its options and controller), ``fused_logprobs_entropy`` (the fused LM head on its
own), ``repo_statistics`` / ``RepoStats`` (REPO statistics shared across micro-batches and
ranks). Options are values: ``LossConfig`` and ``HeadConfig`` (any field also as a keyword);
scale-out is a strategy: ``VocabParallel`` / ``DataParallel``. See each docstring for shapes
and formulas.
"""

from .config import HeadConfig, LossConfig
from .control import AdaptiveClip, AdaptiveRepoCoef, EntropyController, NothingObservedWarning
from .epilogue import METRIC_KEYS, METRICS
from .head import fused_logprobs_entropy
from .loss import PolicyLossOutput, RepoLoss, adapo_loss, policy_loss_from_logprobs, repo_loss
from .parallel import DataParallel, Parallel, VocabParallel
from .stats import RepoStats, repo_statistics

__version__ = "0.1.0"

__all__ = [
    "repo_loss",
    "adapo_loss",
    "policy_loss_from_logprobs",
    "fused_logprobs_entropy",
    "RepoLoss",
    "repo_statistics",
    "RepoStats",
    "AdaptiveClip",
    "AdaptiveRepoCoef",
    "EntropyController",
    "NothingObservedWarning",
    "PolicyLossOutput",
    "HeadConfig",
    "LossConfig",
    "VocabParallel",
    "DataParallel",
    "Parallel",
    "METRICS",
    "METRIC_KEYS",
]
