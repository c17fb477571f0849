"""fused-pg: entropy-aware policy-gradient losses computed straight from hidden states.

    from fused_pg import repo_loss, adapo_loss, AdaptiveClip, fused_logprobs_entropy

See README.md for the options and ``SPEC``-level formulas in each function's docstring.
"""

from .config import HeadConfig, LossConfig
from .control import AdaptiveClip, AdaptiveRepoCoef, EntropyController
from .head import fused_logprobs_entropy
from .loss import PolicyLossOutput, adapo_loss, repo_loss

__version__ = "0.1.0"

__all__ = [
    "repo_loss",
    "adapo_loss",
    "fused_logprobs_entropy",
    "AdaptiveClip",
    "AdaptiveRepoCoef",
    "EntropyController",
    "PolicyLossOutput",
    "HeadConfig",
    "LossConfig",
]
