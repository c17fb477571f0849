"""docs/integrations.md runs as written: its Python blocks execute in order in one namespace
(the first builds the stand-in model and data the others use). A block whose first line is
``# requires: <package>`` is skipped, with the reason, when that package is not installed."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"
BLOCKS = re.findall(r"```python\n(.*?)\n```", DOC.read_text(), flags=re.S)
NAMESPACE: dict = {"__name__": "docs_integrations"}


def test_the_section_is_ready_for_the_readme():
    text = DOC.read_text()
    assert text.startswith("## Use with TRL / verl / OpenRLHF / your own loop\n")
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=lambda i: f"block{i}")
def test_block_runs_as_written(index):
    code = BLOCKS[index]
    first = code.splitlines()[0]
    m = re.match(r"# requires: (\S+)", first)
    if m and importlib.util.find_spec(m.group(1)) is None:
        pytest.skip(f"needs {m.group(1)} (pip install 'fused-pg[{m.group(1)}]')")
    if m and m.group(1) == "verl":
        pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl's dependencies are not installed")
    exec(compile(code, f"{DOC.name}[python block {index}]", "exec"), NAMESPACE)


def test_the_trl_example_trains():
    """The TRL block's run learns something: its rewards differ within groups (non-zero
    advantages), REPO and ADAPO acted, and the policy's weights moved."""
    if "trainer" not in NAMESPACE or "before" not in NAMESPACE:
        pytest.skip("the TRL block did not run (trl is not installed)")
    logs = NAMESPACE["logs"]
    assert logs["reward_std"] > 0
    assert logs["fused_pg/repo_zeta"] != 0
    assert NAMESPACE["trainer"].fused_pg_controller.steps == 2
    moved = [not torch.equal(a, b.detach()) for a, b in zip(NAMESPACE["before"], NAMESPACE["policy"].parameters())]
    assert any(moved)
