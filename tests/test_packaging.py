"""The wheel ships every package of the source tree (the package list in pyproject.toml is
explicit, so a new sub-package that is not listed would be missing from a regular install)."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_directory_is_listed():
    if sys.version_info < (3, 11):
        pytest.skip("tomllib needs Python >= 3.11")
    import tomllib

    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setup["packages"])
    dirs = {name: Path(ROOT / path) for name, path in setup["package-dir"].items()}
    found = set()
    for name, path in dirs.items():
        for init in path.rglob("__init__.py"):
            rel = init.parent.relative_to(path)
            found.add(".".join([name, *rel.parts]) if rel.parts else name)
    assert found == listed, f"not listed: {sorted(found - listed)}; listed but absent: {sorted(listed - found)}"


def test_console_script_points_at_the_bench_cli():
    if sys.version_info < (3, 11):
        pytest.skip("tomllib needs Python >= 3.11")
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, func = scripts["fused-pg-bench"].split(":")
    assert module == "fused_pg.bench.cli"
    from bench import cli

    assert callable(getattr(cli, func))
