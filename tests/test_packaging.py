"""Packaging: the wheel ships every package of the source tree, and no folder of the checkout
shadows a package of the ecosystem.

``kernels/``, ``reference/`` and ``bench/`` are generic names (transformers >= 5.25 imports
Hugging Face's ``kernels``). They carry no ``__init__.py``, so from the checkout's root an
installed package of the same name wins; fused-pg reaches them as ``fused_pg.<name>`` through
the symlinks ``fused_pg/<name> -> ../<name>`` (see the comment in pyproject.toml).
"""

import ast
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GENERIC = ("kernels", "reference", "bench")


def _pyproject() -> dict:
    if sys.version_info < (3, 11):
        pytest.skip("tomllib needs Python >= 3.11")
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _run(args: list[str], *, env_extra: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python <args>`` from the checkout's root, as a user at a shell prompt would.

    Without PIP_BUILD_CONSTRAINT: pip refuses it together with ``--no-build-isolation`` (the wheel
    build below reuses the installed setuptools; nothing is resolved for it)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_BUILD_CONSTRAINT")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_every_package_directory_is_listed():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    found = set()
    for dirpath, dirnames, filenames in os.walk(ROOT / "fused_pg", followlinks=True):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        if any(f.endswith(".py") for f in filenames):
            rel = Path(dirpath).relative_to(ROOT)
            found.add(".".join(rel.parts))
    assert found == listed, f"not listed: {sorted(found - listed)}; listed but absent: {sorted(listed - found)}"


@pytest.mark.parametrize("name", GENERIC)
def test_generic_folders_are_not_top_level_packages(name):
    assert not (ROOT / name / "__init__.py").exists(), f"{name}/__init__.py makes {name}/ shadow a package"
    link = ROOT / "fused_pg" / name
    assert link.is_symlink() and os.readlink(link) == f"../{name}", f"fused_pg/{name} must link to ../{name}"


def test_no_code_imports_the_generic_names_bare():
    """fused-pg's own code and tests reach kernels/reference/bench only as fused_pg.<name>."""
    offenders = []
    for top in ("fused_pg", "tests", "examples", *GENERIC):
        for path in (ROOT / top).rglob("*.py"):
            if top == "fused_pg" and path.relative_to(ROOT / top).parts[0] in GENERIC:
                continue  # the symlinked folders, walked under their own names
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names
                              if n.split(".")[0] in GENERIC]
    assert not offenders, offenders


def test_library_layers_have_no_cycles():
    """The layers contract of pyproject.toml ([tool.importlinter]): every fused_pg module imports
    only from the layers below its own."""
    pytest.importorskip("importlinter", reason="import-linter is a test dependency (pip install -e '.[test]')")
    from importlinter.cli import lint_imports

    cwd = os.getcwd()
    try:
        os.chdir(ROOT)
        assert lint_imports(config_filename=str(ROOT / "pyproject.toml")) == 0, "run `lint-imports` for details"
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("folder", ["kernels", "reference"])
def test_kernels_and_the_oracle_import_nothing_from_the_library(folder):
    """An oracle that shares code with what it checks proves nothing; the kernels take plain
    tensors and options. Both may import torch, triton and their own folder only."""
    offenders = []
    for path in (ROOT / folder).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level >= 2:
                offenders.append(f"{path.name}:{node.lineno} relative import out of {folder}/")
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            offenders += [f"{path.name}:{node.lineno} {n}" for n in names if n.split(".")[0] == "fused_pg"]
    assert not offenders, offenders


def test_installed_packages_win_over_the_checkouts_folders(tmp_path):
    """With packages called kernels/reference/bench installed, importing them from the checkout's
    root gets the installed ones (PYTHONPATH comes after the working directory on sys.path, so a
    regular package in the checkout would win: this is the order that broke transformers)."""
    for name in GENERIC:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"WHO = 'installed {name}'\n")
    code = "import kernels, reference, bench; print(kernels.WHO, reference.WHO, bench.WHO, sep='|')"
    run = _run(["-c", code], env_extra={"PYTHONPATH": str(tmp_path)})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "installed kernels|installed reference|installed bench"


def test_real_hugging_face_kernels_wins_from_the_root():
    """(The environment may live inside the checkout, as CI's does: "outside" means not the
    checkout's own kernels/ folder.)"""
    spec = importlib.util.find_spec("kernels")
    if spec is None or spec.origin is None:
        pytest.skip("Hugging Face's `kernels` is not installed (CI installs it with transformers)")
    run = _run(["-c", "import kernels; print(kernels.__file__)"])
    assert run.returncode == 0, run.stderr
    assert not Path(run.stdout.strip()).resolve().is_relative_to(ROOT / "kernels"), run.stdout


def test_python_m_bench_runs_from_the_root():
    run = _run(["-m", "bench", "--help"])
    assert run.returncode == 0, run.stderr
    assert "usage:" in run.stdout


def test_trainer_integration_modules_import_from_the_root():
    """transformers >= 5.25 imports `kernels` while building a model: do it from the root."""
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed (CI installs it)")
    code = textwrap.dedent("""
        from transformers import Qwen2Config, Qwen2ForCausalLM
        Qwen2ForCausalLM(Qwen2Config(vocab_size=32, hidden_size=8, intermediate_size=16,
                                     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
        import fused_pg.integrations.trl
        print("ok")
    """)
    run = _run(["-c", code])
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().endswith("ok")


def test_console_script_points_at_the_bench_cli():
    scripts = _pyproject()["project"]["scripts"]
    module, func = scripts["fused-pg-bench"].split(":")
    assert module == "fused_pg.bench.cli"
    from fused_pg.bench import cli

    assert callable(getattr(cli, func))


def test_wheel_ships_the_license_and_the_type_marker(tmp_path):
    """The built wheel carries LICENSE (the license pyproject declares) and fused_pg/py.typed
    (PEP 561: type checkers read the package's annotations)."""
    import zipfile

    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()
    assert _pyproject()["project"]["license"] == "Apache-2.0"
    import shutil

    src = tmp_path / "src"  # a copy: an in-tree build would leave build/ in the checkout
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("fused_pg", *GENERIC):
        shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    build = _run(["-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)])
    if build.returncode != 0 and "No module named" in build.stderr:
        pytest.skip(f"cannot build a wheel here: {build.stderr.strip().splitlines()[-1]}")
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("fused_pg-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fused_pg/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), [n for n in names if "dist-info" in n]
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in metadata
