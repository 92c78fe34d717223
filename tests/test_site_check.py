"""The browser check of the documentation site (docs/_ext/check_site.py) fails, naming the page,
on what a reader would see wrong, and passes on a site built with the project's set-up.

A tiny site is built with the project's own mkdocs.yml (theme, Markdown extensions, the MathJax
shipped from its package), then broken copies of it are checked in headless Chromium. The
whole site is checked by `make test` after its build. Without Chromium these tests fail with
the check's message: they never pass silently.
"""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_site", ROOT / "docs/_ext/check_site.py")
check_site = sys.modules.setdefault("check_site", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(check_site)

WORD = "Zebrafinch"  # what the tiny site's search must find
PAGES = {
    "index.md": f"# Home\n\nA {WORD} and inline math \\(a^2 + b^2 = c^2\\).\n\n"
                "![a square](square.png)\n\n```python\nx = 1\n```\n",
    "math.md": "# Math\n\nDisplay math:\n\n"
               "\\[\n\\alpha^t_k = \\frac{1}{Z}\\sum_{i,j} x_{ij}\n\\]\n",
    "figure.md": "# Figure\n\n![a square](square.png)\n",
    "plain.md": "# Plain\n\nText.\n",
}


@pytest.fixture(scope="module")
def tiny_site(tmp_path_factory):
    """A site built by `mkdocs build` from PAGES with the project's mkdocs.yml, less its nav,
    the API pages' plugins and hooks (the MathJax hook is kept)."""
    root = tmp_path_factory.mktemp("tiny")
    docs = root / "docs"
    (docs / "javascripts").mkdir(parents=True)
    shutil.copy(ROOT / "docs/javascripts/mathjax.js", docs / "javascripts/mathjax.js")
    for name, text in PAGES.items():
        (docs / name).write_text(text)
    from PIL import Image
    Image.new("RGB", (40, 40), "green").save(docs / "square.png")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    for key in ("nav", "exclude_docs"):
        config.pop(key, None)
    config.update(docs_dir=str(docs), site_dir=str(root / "site"), plugins=["search"],
                  hooks=[str(ROOT / "docs/_ext/mathjax_assets.py")])
    (root / "mkdocs.yml").write_text(yaml.safe_dump(config))
    subprocess.run([sys.executable, "-m", "mkdocs", "build", "-q", "-f", str(root / "mkdocs.yml")],
                   check=True, env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))
    return root / "site"


def _by_page(problems):
    pages = {}
    for p in problems:
        pages.setdefault(p.page, []).append(p.what)
    return pages


def test_the_check_passes_on_a_site_built_with_the_projects_set_up(tiny_site, tmp_path):
    pages = check_site.find_pages(tiny_site)
    assert sorted(pages) == ["", "404.html", "figure/", "math/", "plain/"]
    shots = {"index.html": "home.png", "math/index.html": "math.png"}
    assert check_site.check_site(tiny_site, tmp_path, search_term=WORD, screenshots=shots) == []
    for name in shots.values():
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _edit(site: Path, rel: str, pattern: str, replacement: str):
    path = site / rel
    text, n = re.subn(pattern, replacement, path.read_text())
    assert n, f"{pattern} is not in {rel}"
    path.write_text(text)


def test_the_check_fails_naming_each_broken_page(tiny_site, tmp_path):
    site = tmp_path / "site"
    shutil.copytree(tiny_site, site)
    # the renderer removed from one page: its math stays raw TeX
    _edit(site, "math/index.html", r'<script src="[^"]*tex-mml-chtml\.js"></script>', "")
    _edit(site, "figure/index.html", r'src="(\.\./)?square\.png"', 'src="../no/such.png"')
    # pages added to the built site (found from its file tree): a console error, a page too
    # wide, a request to the outside
    added = {"noisy": '<script>console.error("boom")</script>',
             "wide": '<div style="width: 3000px">wide</div>',
             "online": '<script src="https://cdn.example.invalid/x.js"></script>'}
    for name, html in added.items():
        (site / name).mkdir()
        text = (site / "plain/index.html").read_text()
        (site / name / "index.html").write_text(text.replace("</body>", html + "</body>"))
    # a page of the file tree that the server cannot serve (a dangling link)
    (site / "gone.html").symlink_to(site / "nowhere.html")
    problems = _by_page(check_site.check_site(site, search_term="NoSuchWordAnywhere"))

    assert set(problems) == {"", "math/", "figure/", "noisy/", "wide/", "online/", "gone.html"}
    assert "the page does not load (HTTP 404)" in problems["gone.html"]
    assert any(p.startswith("math left unrendered: \"\\[ \\alpha^t_k = \\frac{1}{Z}")
               for p in problems["math/"]), problems["math/"]
    assert "image does not load: ../no/such.png" in problems["figure/"]
    assert "image does not load: /no/such.png (HTTP 404)" in problems["figure/"]
    assert problems["noisy/"] == ["console error: boom"]
    assert problems["wide/"] == ["page is 3000 px wide, wider than its 1280 px viewport"]
    assert problems["online/"] == [
        "requests the network (blocked): https://cdn.example.invalid/x.js"]
    assert problems[""] == [
        "the site search finds nothing for 'NoSuchWordAnywhere' ('No matching documents')"]


def test_without_chromium_the_check_fails_and_says_so(tiny_site, monkeypatch, capsys):
    monkeypatch.setenv("CHROMIUM", "/nonexistent/chromium")
    with pytest.raises(check_site.SiteCheckError, match="needs Chromium.*apt-get install chromium"):
        check_site.check_site(tiny_site)
    assert check_site.main([str(tiny_site)]) == 2
    assert "cannot run: the site check needs Chromium" in capsys.readouterr().err


def test_a_folder_without_a_built_site_is_an_error(tmp_path):
    with pytest.raises(check_site.SiteCheckError, match="not a built site"):
        check_site.find_pages(tmp_path)
