"""Every code block of docs/distributed.md runs as written, with the number of processes its
first line names (``# torchrun --nproc-per-node K script.py``), gloo on CPU."""

import re
from pathlib import Path

import pytest
import torch._dynamo  # noqa: F401  (DDP imports it: once here, not in every forked rank)
import torch.distributed.fsdp  # noqa: F401

from helpers.multiproc import run_script

DOC = Path(__file__).resolve().parents[1] / "docs" / "distributed.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_every_block_names_its_launch():
    assert len(BLOCKS) >= 5
    for code in BLOCKS:
        assert re.match(r"# torchrun --nproc-per-node \d+ \w+\.py\n", code), code.splitlines()[0]


@pytest.mark.parametrize("code", BLOCKS, ids=[re.search(r"(\w+)\.py", b).group(1) for b in BLOCKS])
def test_block_runs(code):
    world = int(re.match(r"# torchrun --nproc-per-node (\d+)", code).group(1))
    run_script(code, world, filename=f"docs/distributed.md:{code.splitlines()[0]}")
