"""The hypothesis example budget: per-test example counts scaled by profile and backend, and
``run_property``, which runs a check over drawn examples and counts them in ``plugin.STATS``.
"""

from __future__ import annotations

from hypothesis import given, settings

from .backends import limits
from .plugin import STATS

# Per-test ``settings(max_examples=...)`` overrides a profile's value, so the scaling is
# explicit: the profile's own max_examples relative to hypothesis' default of 100
# ("ci": x1, "dev": x4 as registered in conftest.py).


def count_example() -> None:
    """For a plain ``@given`` test: count one completed example in the session summary."""
    STATS.examples_tried += 1
    STATS.examples_run += 1


def n_examples(base: int, backend: str | None = None) -> int:
    scale = settings.default.max_examples / 100
    if backend is not None:
        scale *= limits(backend).example_scale
    return max(1, round(base * scale))


def run_property(strategy, check, *, examples: int, backend: str | None = None) -> None:
    """Run ``check(case)`` over hypothesis examples drawn from ``strategy``.

    Runs inside the calling test so that one ``pytest.mark.parametrize("backend", BACKENDS)``
    can give each backend its own example budget. The inner test has no example database
    (the "ci" profile is derandomized; a failure prints the falsifying case).
    """

    @settings(max_examples=n_examples(examples, backend), database=None)
    @given(case=strategy)
    def run(case):
        STATS.examples_tried += 1
        check(case)
        STATS.examples_run += 1
        if hasattr(case, "features"):  # loss cases: which option values were exercised
            STATS.coverage.update(case.features())

    run()
