"""Test configuration: Triton interpreter on CPU-only machines, hypothesis profiles, markers."""

import os

import torch

# Without a GPU, Triton kernels run under the interpreter. It must be set before triton is
# imported anywhere; on a CUDA machine the real compiler is used.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# The tests run thousands of tiny ops. On a busy 2-core machine, ops that go through ATen's
# OpenMP pool (log_softmax, max(dim)) stall ~10 ms per call on tensors of a few elements while
# the pool's second thread waits for a core; one intra-op thread keeps the suite fast and its
# timing stable. Tests that measure large runs (test_memory.py) use subprocesses with the
# default thread count. Override with FUSED_PG_TEST_THREADS.
torch.set_num_threads(int(os.environ.get("FUSED_PG_TEST_THREADS", "1")))

# "ci": reproducible (derandomized) and sized for 2 cores; "dev": a larger random hunt to run
# before resolving an issue:  HYPOTHESIS_PROFILE=dev pytest
settings.register_profile(
    "ci", derandomize=True, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "dev", max_examples=400, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible: torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
        # backend="triton" without a GPU runs under the interpreter: mark it (-m "not interpreter"
        # leaves the interpreter out; its example budget is helpers.backends.LIMITS["triton"])
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("backend") == "triton":
            item.add_marker(pytest.mark.interpreter)


def pytest_configure(config):
    """Register the session's statistics (hypothesis examples, worst errors, option coverage,
    the FUSED_PG_MIN_EXAMPLES gate): see tests/helpers/plugin.py."""
    from helpers.plugin import STATS

    config.pluginmanager.register(STATS, "fused-pg-session-stats")
