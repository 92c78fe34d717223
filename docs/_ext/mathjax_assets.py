"""MkDocs hook: ship MathJax 3 with the site, from a Python package, so that equations render
with no network (an air-gapped cluster, ``mkdocs serve`` offline) exactly as online.

The files come from the ``django-static-mathjax`` wheel (in the ``docs`` extra; no Django
needed), which holds MathJax's own ``es5`` build. They are added to the site under
``assets/mathjax/``, keeping MathJax's layout, so ``mkdocs.yml`` loads
``assets/mathjax/tex-mml-chtml.js`` and MathJax finds its fonts and the components it loads on
demand beside it. ``docs/javascripts/mathjax.js`` is the configuration (Material for MkDocs'
MathJax set-up: only arithmatex's ``\\(...\\)`` and ``\\[...\\]`` are typeset).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

#: Where the files go in the site.
SITE_DIR = "assets/mathjax"
#: The combined component the pages load, and what it loads on demand: fonts, the TeX
#: extensions (autoload, \require), the menu and its accessibility tools.
PARTS = ("tex-mml-chtml.js", "output/chtml/fonts", "input/tex/extensions", "ui", "a11y", "sre")


def mathjax_dir() -> Path:
    """MathJax's ``es5`` folder inside the installed ``django-static-mathjax`` package."""
    spec = importlib.util.find_spec("mathjax")
    roots = list(spec.submodule_search_locations or []) if spec else []
    for root in roots:
        es5 = Path(root) / "static" / "mathjax" / "es5"
        if (es5 / PARTS[0]).is_file():
            return es5
    raise PluginError("MathJax is not installed, so the site's equations would not render: "
                      "pip install django-static-mathjax (in the `docs` extra: pip install "
                      "-e '.[docs]')")


def on_files(files, config):
    es5 = mathjax_dir()
    for part in PARTS:
        path = es5 / part
        for src in sorted([path] if path.is_file() else path.rglob("*")):
            if src.is_file():
                uri = f"{SITE_DIR}/{src.relative_to(es5).as_posix()}"
                files.append(File.generated(config, uri, abs_src_path=str(src)))
    return files
