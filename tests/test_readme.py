"""The README's test command is what CI runs, its code blocks run as written, its options table
names real parameters, and it points only at files that exist."""

import inspect
import re
from pathlib import Path

import pytest

from fused_pg import repo_loss

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)\n```", README, flags=re.S)


def _test_command() -> str:
    blocks = re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)
    cmds = [b for b in blocks if "pytest" in b]
    assert len(cmds) == 1, "README must show exactly one test command"
    return cmds[0].strip()


def test_ci_runs_the_readme_test_command():
    cmd = _test_command()
    install_and_test = cmd.split("&& ", 2)[-1]  # after creating/activating the venv
    assert install_and_test in (ROOT / ".ci" / "run").read_text()


def test_options_tables_name_real_parameters():
    """The per-call argument table documents every keyword parameter of repo_loss that is not a
    config value, and nothing else; the config tables are generated from the fields (see
    tests/test_loss_options.py)."""
    section = README.split("## Options")[1].split("\n## ")[0]
    table = section.split("Per-call arguments")[1].split("`LossConfig`")[0]
    names = set(re.findall(r"^\| `([a-z_]+)` \|", table, flags=re.M))
    params = set(inspect.signature(repo_loss).parameters)
    positional = {"hidden", "weight", "targets", "advantages"}
    values = {"config", "head", "overrides"}
    assert names == params - positional - values, (names ^ (params - positional - values))


def test_links_and_images_point_at_files_that_exist():
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README):
        if "://" not in target:
            assert (ROOT / target).exists(), target


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_block_runs_as_written(index, tmp_path, monkeypatch):
    code = PYTHON_BLOCKS[index]
    if "transformers" in code:
        pytest.importorskip("transformers", reason="this README example builds a tiny Qwen2 with transformers")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README.md (python block {index + 1})", "exec"), {"__name__": "__readme__"})
