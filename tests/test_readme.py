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


def test_options_table_names_real_parameters():
    table = README.split("## Options of `repo_loss`")[1].split("\n## ")[0]
    first_cells = re.findall(r"^\| (`[^|]+) \|", table, flags=re.M)  # the option column
    names = {n for cell in first_cells for n in re.findall(r"`([a-z_]+)`", cell)}
    params = set(inspect.signature(repo_loss).parameters)
    assert names and names <= params, names - params
    # every keyword option is documented
    positional = {"hidden", "weight", "targets", "advantages", "old_logprobs"}
    assert params - positional <= names, sorted(params - positional - names)


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
