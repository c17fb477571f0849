"""Import a trainer's real modules whose CUDA-stack dependencies are not installed here.

verl's training engines and OpenRLHF's Ray actors import packages this CPU test environment
does not have (peft, deepspeed, vLLM, flash-attn, ...), at module level, for code paths the
drop-in tests never run. :func:`import_with_stand_ins` imports such a module with an empty
stand-in for each *missing* top-level package (installed packages are always the real ones),
then removes the stand-ins again, so that no other test can import them by accident. The
trainer's own code is the real, installed code: the drop-ins are checked and patched against it.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types


class _Placeholder:
    """What any attribute of a stand-in module is: a class that can be subclassed, instantiated,
    called and used as a decorator, doing nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return args[0] if len(args) == 1 and callable(args[0]) and not kwargs else _Placeholder()

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder()


class _StandIn(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        value = type(name, (_Placeholder,), {})
        setattr(self, name, value)
        return value


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, packages):
        self.packages = set(packages)

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.packages:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StandIn(spec.name)
        module.__path__ = []
        module.__version__ = "0"
        return module

    def exec_module(self, module):
        pass


@contextlib.contextmanager
def stand_ins(packages: tuple[str, ...]):
    """While inside: empty stand-ins for those of ``packages`` that are not installed."""
    missing = tuple(p for p in packages if p not in sys.modules and importlib.util.find_spec(p) is None)
    finder = _Finder(missing)
    sys.meta_path.append(finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n.split(".")[0] in missing]:
            del sys.modules[name]
        _forget_availability()


def _forget_availability() -> None:
    """Clear the cached "is <package> available" answers of the libraries' import utilities: a
    check that ran while the stand-ins were in place cached their packages as installed
    (transformers' ``is_peft_available`` is an ``lru_cache``), and later imports would follow it."""
    for name, module in list(sys.modules.items()):
        if module is None or not name.endswith(("import_utils", ".imports")):
            continue
        for value in list(vars(module).values()):
            if callable(getattr(value, "cache_clear", None)):
                value.cache_clear()


def import_with_stand_ins(module: str, packages: tuple[str, ...]):
    """Import ``module`` with stand-ins for those of ``packages`` that are not installed."""
    with stand_ins(packages):
        return importlib.import_module(module)


VERL_MISSING = ("peft", "uvicorn", "fastapi")
"""Packages verl's engine and worker modules import at module level that the CPU test
environment lacks (verl is installed without its dependencies, see .ci/run)."""

OPENRLHF_MISSING = ("deepspeed", "flash_attn", "vllm", "pylatexenc", "aiohttp", "peft", "torchdata")
"""The same for OpenRLHF's Ray actor and CLI modules."""
