"""MkDocs hook: every public name of captum_consistency must have an API reference entry.

A public name is one listed in the ``__all__`` of a documented module (see
``captum_style.DOCUMENTED_MODULES``); its entry is a ``::: module.name`` line on one of the
pages under ``docs/api/``. A missing entry (a name added to ``__all__`` without documenting
it) or an entry for a name that is not public is logged as a warning, so that
``mkdocs build --strict`` fails on it. The modules of
``captum_style.DOCUMENTED_MODULE_DOCSTRINGS`` also have an entry (their docstring only).
"""

from __future__ import annotations

import ast
import logging
import re
import sys
from pathlib import Path
from typing import Dict, Set

sys.path.insert(0, str(Path(__file__).resolve().parent))
from captum_style import (  # noqa: E402  (the extension beside this hook)
    DOCUMENTED_MODULE_DOCSTRINGS,
    DOCUMENTED_MODULES,
)

log = logging.getLogger("mkdocs.hooks.api_coverage")

_DIRECTIVE = re.compile(r"^:::\s+([\w.]+)\s*$", re.M)
#: Exported names documented in prose rather than with a ``:::`` entry (the two model
#: functions have theirs under the top-level package, which exports them too).
_PROSE_ONLY = {
    "captum_consistency.__version__",
    "captum_consistency.models.to_global_max_pool",
    "captum_consistency.models.fold_batch_norm",
    # the GC loss and its parts: documented under the top-level package, re-exported by losses
    "captum_consistency.losses.GradCamConsistencyLoss",
    "captum_consistency.losses.ConsistencyLossOutput",
    "captum_consistency.losses.LayerRecorder",
    "captum_consistency.losses.gc_consistency",
    # documented under captum_consistency.engine, which exports it too
    "captum_consistency.losses.ScaledBCEWithLogitsLoss",
}


def _all_of(path: Path) -> Set[str]:
    """The literal ``__all__`` of a module file (read without importing the package)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return {ast.literal_eval(elt) for elt in node.value.elts}
    return set()


def _module_file(root: Path, module: str) -> Path:
    base = root.joinpath(*module.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def public_names(root: Path) -> Dict[str, str]:
    names: Dict[str, str] = {}
    for module in DOCUMENTED_MODULES:
        for name in sorted(_all_of(_module_file(root, module))):
            names[f"{module}.{name}"] = module
    return names


def on_files(files, config, **kwargs):
    docs_dir = Path(config["docs_dir"])
    root = docs_dir.parent
    documented: Set[str] = set()
    for page in sorted((docs_dir / "api").glob("*.md")):
        documented.update(_DIRECTIVE.findall(page.read_text(encoding="utf-8")))
    public = (set(public_names(root)) - _PROSE_ONLY) | set(DOCUMENTED_MODULE_DOCSTRINGS)
    for name in sorted(public - documented):
        log.warning("API reference: public name %s has no '::: %s' entry under docs/api/", name, name)
    for name in sorted(documented - public):
        log.warning("API reference: '::: %s' is not in the __all__ of a documented module", name)
    return files
