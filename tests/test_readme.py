"""The README's test command is what CI runs, and its examples name real options."""

import inspect
import re
from pathlib import Path

from fused_pg import repo_loss

ROOT = Path(__file__).resolve().parents[1]


def _test_command() -> str:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    cmds = [b for b in blocks if "pytest" in b]
    assert len(cmds) == 1, "README must show exactly one test command"
    return cmds[0].strip()


def test_ci_runs_the_readme_test_command():
    cmd = _test_command()
    install_and_test = cmd.split("&& ", 2)[-1]  # after creating/activating the venv
    assert install_and_test in (ROOT / ".ci" / "run").read_text()


def test_options_table_names_real_parameters():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Options of `repo_loss`")[1].split("\n## ")[0]
    names = set(re.findall(r"^\| `([a-z_]+)`", table, flags=re.M))
    names |= set(re.findall(r"^\| `[a-z_]+`, `([a-z_]+)`", table, flags=re.M))
    params = set(inspect.signature(repo_loss).parameters)
    assert names and names <= params, names - params
