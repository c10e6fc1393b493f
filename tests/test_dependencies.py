"""What pyproject.toml declares is what the code uses, and its upper bounds hold for their reasons."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPORT_NAMES = {"nvidia-ml-py": "pynvml", "pillow": "PIL", "lmms-eval": "lmms_eval", "flash-attn": "flash_attn"}


def _declared() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return [re.match(r"[A-Za-z0-9_.-]+", requirement).group(0) for requirement in requirements]


def test_every_declared_dependency_is_used_by_the_package_or_its_tests():
    sources = "\n".join(path.read_text() for folder in ("vtcbench", "tests") for path in (ROOT / folder).rglob("*.py"))
    unused = []
    for name in _declared():
        module = IMPORT_NAMES.get(name, name.replace("-", "_"))
        used = rf"^\s*(import|from) {module}\b|find_spec\(\"{module}\"\)"
        if not re.search(used, sources, re.M):
            unused.append(name)
    assert not unused, f"declared but never imported: {unused}"


def test_the_filelock_cap_keeps_the_module_lmms_eval_imports():
    """lmms-eval 0.7.3's evaluator imports `filelock._api` (removed in filelock 4) when it runs."""
    import importlib
    import inspect

    import filelock
    from lmms_eval import evaluator

    assert "import filelock._api" in inspect.getsource(evaluator._enable_reentrant_filelocks)
    assert int(filelock.__version__.split(".")[0]) < 4
    importlib.import_module("filelock._api")
