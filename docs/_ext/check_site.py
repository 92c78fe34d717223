"""The built documentation site as a reader sees it, in headless Chromium with no network.

Serves a built site (``mkdocs build``) on 127.0.0.1 and loads every page found in its file
tree (every ``*.html``: a page added later is checked without being listed anywhere) in
Debian's ``chromium``, driven by Playwright for Python. The browser context blocks every
request that does not go to 127.0.0.1, and Chromium resolves no other host name, so a page
that needs the network reads here as it would on an air-gapped machine. A page fails on:

* not loading (no answer, or an HTTP error);
* a console error or an uncaught exception;
* a request that leaves 127.0.0.1 (it would read differently offline), or a local resource
  that does not load;
* an image that does not load;
* math left unrendered: raw ``\\(``, ``\\[`` or ``$$`` in the rendered text (code excepted), or
  a formula the renderer could not typeset;
* being wider than its viewport (1280 px);
* on the pages of ``CODE_FITS`` (the home page), a code block wider than the page (elsewhere
  such blocks are listed as notes, not problems).

The site search must also find ``GradCamConsistencyLoss``. Screenshots of the home page and
the Concepts page are written to the output folder, for a person to look at.

Usage (``make test`` runs it after building the site)::

    python docs/_ext/check_site.py build/site --out build/site-check

Exits 0 when every page passes, 1 with one line per problem (``page: problem``), 2 when the
check cannot run (no Chromium, no Playwright, no site).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple
from urllib.parse import urlsplit

#: Where Debian's ``chromium`` package puts the browser (``CHROMIUM`` overrides it).
CHROMIUM = "/usr/bin/chromium"
#: Chromium's flags: no sandbox (root in CI), no GPU, and none of its own traffic.
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    # no host name resolves but the server's: a request the routes miss still goes nowhere
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
)
VIEWPORT = {"width": 1280, "height": 900}
SEARCH_TERM = "GradCamConsistencyLoss"
#: Pages to photograph (site-relative file) -> PNG name in the output folder.
SCREENSHOTS = {"index.html": "home.png", "concepts/index.html": "concepts.png"}
#: Pages (site-relative URLs) whose code blocks must fit the page's width.
CODE_FITS = ("",)
#: Raw TeX delimiters that mean the renderer did not run.
RAW_MATH = ("\\(", "\\[", "$$")

#: How a blocked request fails (the browser's console names it ``net::ERR_...``).
_BLOCKED_CODE = "internetdisconnected"
_BLOCKED = "net::ERR_INTERNET_DISCONNECTED"

INSTALL_HINT = ("install Debian's `chromium` package (`apt-get install chromium`; `bash .ci/run` "
                "does it when it is missing) or set CHROMIUM to a Chromium binary")


class SiteCheckError(RuntimeError):
    """The check could not run (no browser, no client, no site): never a pass."""


@dataclass(frozen=True)
class Problem:
    """One thing a reader would see wrong: the page (site-relative URL) and what."""

    page: str
    what: str

    def __str__(self) -> str:
        return f"{self.page or '/'}: {self.what}"


def find_pages(site_dir: Path) -> List[str]:
    """Every page of a built site, as site-relative URLs (``concepts/``, ``404.html``), from
    its file tree: each ``*.html`` file, ``x/index.html`` served as ``x/``."""
    site_dir = Path(site_dir)
    if not (site_dir / "index.html").is_file():
        raise SiteCheckError(f"{site_dir} is not a built site (no index.html): run "
                             "`mkdocs build --site-dir {site_dir}` first")
    pages = []
    for path in sorted(site_dir.rglob("*.html")):
        rel = path.relative_to(site_dir).as_posix()
        pages.append(rel[: -len("index.html")] if path.name == "index.html" else rel)
    return pages


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002  (the base class's name)
        pass


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        # the browser closing a connection early (a page closed while loading) is no error
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@contextlib.contextmanager
def serve(site_dir: Path) -> Iterator[str]:
    """Serve ``site_dir`` on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(site_dir))
    server = _Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def find_chromium() -> str:
    """The Chromium binary (``CHROMIUM``, else Debian's ``/usr/bin/chromium``, else
    ``chromium`` on the PATH); raises :class:`SiteCheckError` saying how to install it."""
    wanted = os.environ.get("CHROMIUM")
    for candidate in ([wanted] if wanted else [CHROMIUM, shutil.which("chromium")]):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    where = f"CHROMIUM={wanted}" if wanted else f"{CHROMIUM} (or `chromium` on the PATH)"
    raise SiteCheckError(f"the site check needs Chromium and found none at {where}: "
                         + INSTALL_HINT)


# In the page: the problems a reader sees once it has loaded, as strings.
_INSPECT = r"""
async (rawMath) => {
  const problems = [], wideCode = [];
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    await MathJax.startup.promise;
    if (MathJax.typesetPromise) await MathJax.typesetPromise();
  }
  for (const img of Array.from(document.images)) {
    img.loading = "eager";
    try { await img.decode(); } catch (e) {}
    if (!img.complete || img.naturalWidth === 0)
      problems.push("image does not load: " + (img.getAttribute("src") || "(no src)"));
  }
  const skip = "pre, code, script, style, noscript, textarea, mjx-assistive-mml";
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  const seen = new Set();
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const parent = node.parentElement;
    if (!parent || parent.closest(skip)) continue;
    for (const raw of rawMath) {
      const at = node.data.indexOf(raw);
      if (at >= 0) {
        const text = node.data.slice(Math.max(0, at - 10), at + 50).replace(/\s+/g, " ").trim();
        if (!seen.has(text)) problems.push(`math left unrendered: "${text}"`);
        seen.add(text);
      }
    }
  }
  for (const err of Array.from(document.querySelectorAll("mjx-merror")).slice(0, 5))
    problems.push(`math the renderer could not typeset: "${
      err.getAttribute("data-mjx-error") || err.textContent}"`);
  const width = document.documentElement.scrollWidth;
  if (width > window.innerWidth)
    problems.push(`page is ${width} px wide, wider than its ${window.innerWidth} px viewport`);
  for (const code of Array.from(document.querySelectorAll("pre > code"))) {
    const over = code.scrollWidth - code.clientWidth;
    if (over > 1) {
      const longest = code.innerText.split("\n").reduce((a, b) => b.length > a.length ? b : a);
      wideCode.push(`code block ${over} px wider than the page: "${longest.trim()}"`);
    }
  }
  return [problems, wideCode];
}
"""


def _check_search(page, base: str, term: str, timeout_s: float) -> List[str]:
    """Type ``term`` into the site search of the home page; the problems (none if a result
    shows the term)."""
    page.goto(base, wait_until="load")
    query = page.locator("input[data-md-component=search-query]")
    if query.count() == 0:
        return ["the home page has no search box"]
    # typed key by key as a reader does (the search reads key events; a value set at once
    # after a click is not searched); the index is built in a web worker, the query waits
    meta = page.locator(".md-search-result__meta").first
    before = meta.text_content()  # "Type to start searching", in the site's language
    query.click()
    query.press_sequentially(term, delay=10)
    results = page.locator(".md-search-result__item")
    deadline = time.monotonic() + timeout_s
    while results.count() == 0:
        now = meta.text_content()
        if now != before or time.monotonic() > deadline:  # searched and found nothing
            return [f"the site search finds nothing for {term!r} ({now.strip()!r})"]
        page.wait_for_timeout(100)
    if term.lower() not in results.first.inner_text().lower():
        return [f"the site search's first result for {term!r} does not show it"]
    return []


def check_site(site_dir: Path, out_dir: Optional[Path] = None,
               search_term: Optional[str] = SEARCH_TERM,
               screenshots: Dict[str, str] = SCREENSHOTS, code_fits: Sequence[str] = CODE_FITS,
               timeout_s: float = 30.0, search_timeout_s: float = 60.0, log=None,
               notes: Optional[List[Problem]] = None) -> List[Problem]:
    """Every page of the built site ``site_dir`` in headless Chromium without network; the
    problems found (empty: the site passes).

    Args:
        site_dir (Path): a built site (``mkdocs build --site-dir``).
        out_dir (Path, optional): where the screenshots go (``screenshots``); none if None.
        search_term (str): what the site search must find (``None``: no search check).
        screenshots (dict): site-relative file -> PNG name, for the pages to photograph.
        code_fits (sequence of str): pages whose code blocks must fit the page's width.
        timeout_s (float): per page load.
        search_timeout_s (float): for the search's first result (its index is built in the
            browser).
        log (callable, optional): called with one line per page checked.
        notes (list, optional): receives what is not a problem but worth reading (code
            blocks wider than the page, elsewhere than ``code_fits``).

    Returns:
        list of Problem: one per page and problem (the page names the problem's place).

    Raises:
        SiteCheckError: no Chromium, no Playwright or no site: the check did not run.
    """
    site_dir = Path(site_dir)
    pages = find_pages(site_dir)
    chromium = find_chromium()
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError as err:
        raise SiteCheckError("the site check needs Playwright for Python: pip install "
                             "playwright (the `docs` extra has it; never `playwright install`: "
                             "it drives Debian's chromium)") from err
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    problems: List[Problem] = []
    with serve(site_dir) as base, sync_playwright() as pw:
        try:
            browser = pw.chromium.launch(executable_path=chromium, headless=True,
                                         args=list(CHROMIUM_ARGS))
        except PlaywrightError as err:
            raise SiteCheckError(f"Chromium at {chromium} does not start ({err}); "
                                 + INSTALL_HINT) from err
        host = urlsplit(base).netloc
        context = browser.new_context(viewport=VIEWPORT, service_workers="block")
        context.set_default_timeout(timeout_s * 1000)
        current: List[str] = []  # the page being checked, for the handlers below

        def route(r):
            if urlsplit(r.request.url).netloc == host or r.request.url.startswith("data:"):
                r.continue_()
            else:
                problems.append(Problem(current[0], "requests the network (blocked): "
                                        + r.request.url))
                r.abort(_BLOCKED_CODE)

        context.route("**/*", route)
        for rel in pages:
            current[:] = [rel]
            start = time.perf_counter()
            file = rel + "index.html" if rel == "" or rel.endswith("/") else rel
            found, wide_code = _check_page(context, base, rel, out_dir, screenshots.get(file))
            found += wide_code if rel in code_fits else []
            problems += [Problem(rel, p) for p in found]
            if notes is not None and rel not in code_fits:
                notes += [Problem(rel, p) for p in wide_code]
            if log:
                n = sum(p.page == rel for p in problems)
                log(f"{rel or '/'}: {f'{n} problem(s)' if n else 'ok'} "
                    f"({time.perf_counter() - start:.1f} s)")
        if search_term:
            current[:] = [""]
            page = context.new_page()
            try:
                found = _check_search(page, base, search_term, search_timeout_s)
                problems += [Problem("", p) for p in found]
            finally:
                page.close()
        context.close()
        browser.close()
    return problems


def _check_page(context, base: str, rel: str, out_dir: Optional[Path],
                screenshot: Optional[str]) -> Tuple[List[str], List[str]]:
    """One page's problems (not the blocked requests, which the route records), and its code
    blocks wider than the page."""
    found: List[str] = []
    wide_code: List[str] = []
    page = context.new_page()

    def console(m):
        # a blocked request is reported with its URL by the route, not again as Chromium's
        # "Failed to load resource" line
        if m.type == "error" and _BLOCKED not in m.text:
            found.append(f"console error: {m.text}")

    page.on("console", console)
    page.on("pageerror", lambda e: found.append(f"uncaught exception: {e}"))
    local = urlsplit(base).netloc

    def response(r):
        if r.status >= 400 and urlsplit(r.url).netloc == local:
            found.append(f"{r.request.resource_type} does not load: "
                         f"{urlsplit(r.url).path} (HTTP {r.status})")

    page.on("response", response)
    try:
        answer = page.goto(base + rel, wait_until="load")
        if answer is None or not answer.ok:
            found.append(f"the page does not load (HTTP {answer.status if answer else '-'})")
            return found, wide_code
        page.wait_for_load_state("networkidle")
        seen, wide_code = page.evaluate(_INSPECT, list(RAW_MATH))
        found += seen
        if out_dir is not None and screenshot:
            page.screenshot(path=str(Path(out_dir) / screenshot), full_page=True)
    except Exception as err:  # noqa: BLE001  (a timeout or a crash: the page does not load)
        found.append(f"the page does not load: {str(err).splitlines()[0]}")
    finally:
        page.close()
    return found, wide_code


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site_dir", type=Path, help="the built site (mkdocs build --site-dir)")
    parser.add_argument("--out", type=Path, default=Path("build/site-check"),
                        help="where the screenshots go (default: build/site-check)")
    parser.add_argument("--notes", action="store_true",
                        help="list the code blocks wider than the page (notes, not failures)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    notes: List[Problem] = []
    try:
        problems = check_site(args.site_dir, args.out, log=print, notes=notes)
    except SiteCheckError as err:
        print(f"site check: cannot run: {err}", file=sys.stderr)
        return 2
    pages = len(find_pages(args.site_dir))
    took = f"{time.perf_counter() - start:.0f} s"
    if notes:
        pages_of = sorted({n.page or "/" for n in notes})
        print(f"site check: note (not a failure): {len(notes)} code block(s) wider than the page, "
              f"on {', '.join(pages_of)}" + (":" if args.notes else " (--notes lists them)"))
        for n in notes if args.notes else []:
            print(f"  {n}")
    if problems:
        print(f"site check: {len(problems)} problem(s) on {len({p.page for p in problems})} of "
              f"{pages} page(s) ({took}):", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    print(f"site check: {pages} pages pass in headless Chromium with no network, and the "
          f"search finds {SEARCH_TERM} ({took}); screenshots in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
