"""Shared test machinery for the test modules (``from helpers import ...``), one concern per module:

* ``backends``    the backends under test, their dtypes and per-backend limits
* ``budget``      hypothesis example budgets and ``run_property``
* ``tolerances``  the pass rules against the fp64 oracle and the named comparisons
* ``strategies``  hypothesis strategies of head and loss cases
* ``inputs``      the tensors of a case, reproducible from its seed
* ``oracle``      the fp64 oracle run of a loss case and the full check of one example
* ``plugin``      the session's counters and their report (registered by ``conftest.py``)
* ``multiproc``   groups of forked processes joined by torch.distributed (imported on its own)
* ``examples``    the scripts under examples/ loaded as modules (imported on its own)
"""

from .backends import BACKENDS, DTYPES, FP64_BACKENDS, LIMITS, LOW_PRECISION, TF32_BACKENDS, BackendLimits, limits
from .budget import count_example, n_examples, run_property
from .inputs import HeadInputs, LossInputs, make_head_inputs, make_loss_inputs, seq_index
from .oracle import (HEAD_OPTIONS, LogprobCase, check_loss_case, logprob_case, oracle_guards, run_oracle_loss,
                     zeta_conditioning_guard)
from .strategies import AGGREGATIONS, HeadCase, LossCase, effective_options, head_cases, head_fields, loss_cases
from .tolerances import (DLOGITS_DTYPE, ENTROPY_KEYS, FAIR_MARGIN, GPU_TOLS, GRAD_REL, ROLLOUT_KEYS, TOLS, Tol,
                         assert_close, assert_grad_close, check_grads, check_head_values, check_metric_convention,
                         check_metrics, check_per_token, dlogits_dtype, grad_floors, naive_logprobs_entropy,
                         same_number)

__all__ = [
    "AGGREGATIONS", "BACKENDS", "DLOGITS_DTYPE", "DTYPES", "ENTROPY_KEYS", "FAIR_MARGIN", "FP64_BACKENDS", "GPU_TOLS",
    "GRAD_REL", "HEAD_OPTIONS", "LIMITS", "LOW_PRECISION", "ROLLOUT_KEYS", "TF32_BACKENDS", "TOLS", "BackendLimits",
    "LogprobCase", "logprob_case",
    "HeadCase", "HeadInputs", "LossCase", "LossInputs", "Tol", "assert_close", "assert_grad_close", "check_grads",
    "check_head_values", "check_loss_case", "check_metric_convention", "check_metrics", "check_per_token",
    "count_example", "dlogits_dtype", "effective_options", "grad_floors", "head_cases", "head_fields", "limits",
    "loss_cases", "make_head_inputs", "make_loss_inputs", "n_examples", "naive_logprobs_entropy", "oracle_guards",
    "run_oracle_loss", "run_property", "same_number", "seq_index", "zeta_conditioning_guard",
]
