"""The test session's statistics, as a pytest plugin: what the property tests ran and how close
they came to their tolerances.

``STATS`` is registered by ``tests/conftest.py``. The helpers record into it: examples started
and completed (``budget.run_property``, ``budget.count_example``), the worst error / allowed
error per compared quantity (``tolerances``), and how many loss examples had each option value.
It prints them in the terminal summary (the details with ``-v``) and fails a run that completed
fewer hypothesis examples than ``FUSED_PG_MIN_EXAMPLES`` asks for, which guards CI against a
suite that silently stopped exercising them.
"""

from __future__ import annotations

import os
import sys
from collections import Counter


class SessionStats:
    """Counters of one pytest session, and the hooks that report them."""

    def __init__(self):
        self.examples_run = 0      # examples that passed every assume() and ran to completion
        self.examples_tried = 0    # examples started (the difference was rejected by assume())
        self.worst: dict[str, float] = {}   # "name[dtype]" -> worst (error / allowed) seen
        self.coverage: Counter = Counter()  # "option=value" -> completed loss examples with it

    def record_worst(self, key: str, ratio: float) -> None:
        self.worst[key] = max(self.worst.get(key, 0.0), ratio)

    # --- pytest hooks --------------------------------------------------------------------------

    def pytest_terminal_summary(self, terminalreporter, exitstatus, config):
        tr = terminalreporter
        tr.write_sep("-", f"hypothesis examples run by the property tests: {self.examples_run} "
                          f"({self.examples_tried - self.examples_run} more rejected by assume)")
        if config.getoption("verbose") > 0 and self.worst:
            tr.write_line("worst error / allowed error per compared quantity:")
            for key, ratio in sorted(self.worst.items()):
                tr.write_line(f"  {key:<48s} {ratio:9.3g}")
        if config.getoption("verbose") > 0 and self.coverage:
            tr.write_line("loss examples per option value:")
            for key, n in sorted(self.coverage.items()):
                tr.write_line(f"  {key:<48s} {n:6d}")

    def pytest_sessionfinish(self, session, exitstatus):
        """``FUSED_PG_MIN_EXAMPLES=200 pytest``: fail the run if fewer examples completed."""
        wanted = int(os.environ.get("FUSED_PG_MIN_EXAMPLES", "0"))
        if wanted and self.examples_run < wanted and session.exitstatus == 0:
            print(f"\nFUSED_PG_MIN_EXAMPLES={wanted}: only {self.examples_run} hypothesis examples ran",
                  file=sys.stderr)
            session.exitstatus = 1


STATS = SessionStats()
