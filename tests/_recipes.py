"""Loading a recipe script (``recipes/<name>.py``) as a module, for the tests that call its
``main`` or ``get_args_parser`` in-process."""

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]


def load_recipe(name: str, root: Optional[Path] = None, prefix: str = "_recipe") -> Optional[ModuleType]:
    """A fresh module object of ``<root>/recipes/<name>.py`` (``None`` if the file is missing),
    registered nowhere, so each test file patches its own copy."""
    path = Path(root or ROOT) / "recipes" / f"{name}.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location(f"{prefix}_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_recipe(module: ModuleType, argv) -> dict:
    """``module.main`` on parsed ``argv`` (any values, turned to strings)."""
    return module.main(module.get_args_parser().parse_args([str(a) for a in argv]))


def subprocess_env() -> dict:
    """The environment of a recipe run as a subprocess (torchrun or plain python): the
    package importable, one OpenMP thread, no inherited torchrun world."""
    import os

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("WORLD_SIZE", None)
    return env
