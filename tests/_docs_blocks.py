"""The code blocks of the documentation pages, and how ``tests/test_docs.py`` runs them.

A page's fenced blocks are read in order: ```` ```python ```` blocks run in one namespace, as a
reader would paste them; ```` ```bash ```` blocks that call a recipe (``recipes/<name>.py``) run
in a shell, in a scratch folder. Shell blocks that call no recipe (``make``, ``pip``,
``benchmarks/``) are set-up commands with their own tests and are not run here. Other fences
(``text``, ...) are not code.

What the test must know beyond the reader's text, a page says in HTML comments that neither the
site nor GitHub shows, one directive each::

    <!-- docs-test: skip REASON -->
        before a block: do not run it (it needs real data, a GPU, ...). A Python block is
        still compiled; the options of a recipe command are still checked against the
        recipe's parser. A page never has all its Python blocks skipped.
    <!-- docs-test: data NAME PATH -->
        the page reads a data set at PATH: the test writes the tiny data set NAME (see
        ``test_docs.DATA_SETS``) and uses its folder in place of PATH in every block.
    <!-- docs-test: shrink OLD NEW -->
        the test replaces the text OLD (which must occur) by NEW in the page's blocks, to keep
        real sizes on the page and small ones in the test; ``DOCS_TEST_FULL_SIZE=1`` ignores
        these directives and runs the page as written.
    <!-- docs-test: setup
    PYTHON CODE
    -->
        hidden code run before the page's first block, in its namespace (e.g. the ``loader``
        that a fragment iterates over).

Arguments are split as by a shell (quote those with spaces). Errors and failures name the
page, the block and its line; tracebacks point at the page's lines.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple
from tests._recipes import load_recipe

__all__ = [
    "Block",
    "Page",
    "DocsTestError",
    "parse_page",
    "recipe_commands",
    "check_recipe_options",
    "run_python_page",
    "run_shell_block",
]

PYTHON_LANGS = {"python", "py", "python3"}
SHELL_LANGS = {"bash", "sh", "shell"}
DIRECTIVES = ("skip", "data", "shrink", "setup")
FULL_SIZE_ENV = "DOCS_TEST_FULL_SIZE"

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_MARKER = re.compile(r"^\s*<!--\s*docs-test:(?P<rest>.*)$")
_RECIPE = re.compile(r"(?:^|/)recipes/(?P<name>\w+)\.py$")
_SHELL_STOP = {";", "&&", "||", "|", "&"}


class DocsTestError(AssertionError):
    """A page's block failed, or its ``docs-test`` markers are wrong; the message names both."""


@dataclass
class Block:
    """One fenced code block: ``lang`` is ``"python"`` or ``"shell"``; ``line`` is the page line
    of its first code line; ``number`` counts the page's blocks of that language from 1."""

    page: str
    lang: str
    number: int
    line: int
    code: str
    skip: Optional[str] = None

    @property
    def name(self) -> str:
        return f"{self.page}, {self.lang} block {self.number} (line {self.line})"


@dataclass
class Page:
    """A Markdown page: its code blocks and its page-level ``docs-test`` directives."""

    path: Path
    rel: str
    blocks: List[Block] = field(default_factory=list)
    setup: List[Tuple[int, str]] = field(default_factory=list)  # (line, code)
    data: List[Tuple[str, str, int]] = field(default_factory=list)  # (name, path, line)
    shrink: List[Tuple[str, str, int]] = field(default_factory=list)  # (old, new, line)

    @property
    def python_blocks(self) -> List[Block]:
        return [b for b in self.blocks if b.lang == "python"]

    @property
    def shell_blocks(self) -> List[Block]:
        return [b for b in self.blocks if b.lang == "shell"]

    def runnable_shell_blocks(self) -> List[Block]:
        return [b for b in self.shell_blocks if b.skip is None and recipe_commands(b.code)]

    def prepared(self, code: str, data_roots: Dict[str, str], full_size: bool = False) -> str:
        """``code`` as the test runs it: data paths replaced, sizes shrunk (line count kept)."""
        for old, new, _ in [] if full_size else self.shrink:
            code = code.replace(old, new)
        # longest path first, so that /data/coco/x is not cut by a shorter /data/coco
        for name, path, _ in sorted(self.data, key=lambda d: -len(d[1])):
            code = code.replace(path, data_roots[name])
        return code


def _error(rel: str, line: int, message: str) -> DocsTestError:
    return DocsTestError(f"{rel}, line {line}: {message}")


def parse_page(path: Path, root: Path) -> Page:
    """Reads the code blocks and the ``docs-test`` markers of the page at ``path``.

    Raises:
        DocsTestError: a malformed or stale marker, naming the page and the line.
    """
    path = Path(path)
    rel = path.resolve().relative_to(Path(root).resolve()).as_posix()
    lines = path.read_text(encoding="utf-8").splitlines()
    page = Page(path=path.resolve(), rel=rel)
    counts = {"python": 0, "shell": 0}
    pending_skip: Optional[Tuple[str, int]] = None
    i = 0
    while i < len(lines):
        text = lines[i]
        marker = _MARKER.match(text)
        fence = _FENCE.match(text)
        if marker:
            start = i + 1  # 1-based line of the marker
            rest = marker.group("rest")
            body: List[str] = []
            if "-->" in rest:
                rest = rest[: rest.index("-->")]
            else:  # a multi-line comment: the lines up to the one holding -->
                i += 1
                while i < len(lines) and "-->" not in lines[i]:
                    body.append(lines[i])
                    i += 1
                if i == len(lines):
                    raise _error(rel, start, "docs-test comment is never closed with -->")
                if lines[i].strip() != "-->":
                    raise _error(rel, i + 1, "put the closing --> of a docs-test comment on its own line")
            try:
                words = shlex.split(rest)
            except ValueError as exc:
                raise _error(rel, start, f"cannot split the docs-test directive: {exc}") from None
            if not words or words[0] not in DIRECTIVES:
                raise _error(rel, start, f"unknown docs-test directive {rest.strip()!r}; "
                             f"expected one of {', '.join(DIRECTIVES)}")
            kind, args = words[0], words[1:]
            if kind != "setup" and body:
                raise _error(rel, start, f"only 'setup' takes lines of code, not {kind!r}")
            if kind == "skip":
                if not args:
                    raise _error(rel, start, "'skip' needs a reason (e.g. needs the ImageNet data set)")
                if pending_skip is not None:
                    raise _error(rel, start, "two 'skip' markers for one block")
                pending_skip = (" ".join(args), start)
            elif kind == "data":
                if len(args) != 2:
                    raise _error(rel, start, "'data' takes NAME PATH, e.g. data imagenet /data/imagenet")
                page.data.append((args[0], args[1], start))
            elif kind == "shrink":
                if len(args) != 2:
                    raise _error(rel, start, "'shrink' takes OLD NEW (quote them if they hold spaces)")
                if "\n" in args[0] + args[1] or not args[0]:
                    raise _error(rel, start, "'shrink' replaces text within a line")
                page.shrink.append((args[0], args[1], start))
            else:  # setup
                if args or not body:
                    raise _error(rel, start, "'setup' holds its code on the lines that follow it")
                page.setup.append((start + 1, "\n".join(body)))
            i += 1
            continue
        if text.lstrip().startswith("<!--") and "-->" not in text:
            # any other multi-line comment: commented-out blocks are not the page's code
            while i < len(lines) and "-->" not in lines[i]:
                i += 1
            i += 1
            continue
        if fence:
            indent, marks = fence.group("indent"), fence.group("fence")
            info = fence.group("info").strip().lstrip("{").lstrip(".")
            lang_word = re.split(r"[\s{}]", info, maxsplit=1)[0].lower() if info else ""
            close = re.compile(rf"^[ \t]*{re.escape(marks[0])}{{{len(marks)},}}\s*$")
            first = i + 1
            j = first
            while j < len(lines) and not close.match(lines[j]):
                j += 1
            if j == len(lines):
                raise _error(rel, i + 1, "code block is never closed")
            code = "\n".join(l[len(indent):] if l.startswith(indent) else l.lstrip()
                             for l in lines[first:j])
            lang = "python" if lang_word in PYTHON_LANGS else "shell" if lang_word in SHELL_LANGS else None
            if lang is None:
                if pending_skip is not None:
                    raise _error(rel, pending_skip[1], f"'skip' before a {lang_word or 'plain'} "
                                 "block, which is never run")
            else:
                counts[lang] += 1
                page.blocks.append(Block(rel, lang, counts[lang], first + 1, code,
                                         pending_skip[0] if pending_skip else None))
            pending_skip = None
            i = j + 1
            continue
        if text.strip() and pending_skip is not None:
            raise _error(rel, pending_skip[1], "'skip' must come right before a code block")
        i += 1
    if pending_skip is not None:
        raise _error(rel, pending_skip[1], "'skip' must come right before a code block")
    _check_page(page)
    return page


def _check_page(page: Page) -> None:
    python = page.python_blocks
    if python and all(b.skip for b in python):
        raise DocsTestError(f"{page.rel}: every Python block is skipped; run the page against the "
                            "tiny data sets ('data') or with a 'setup' block instead")
    if (page.setup or page.data or page.shrink) and not page.blocks:
        raise DocsTestError(f"{page.rel}: docs-test directives but no Python or shell block")
    everything = "\n".join(b.code for b in page.blocks)
    for old, _, line in page.shrink:
        if old not in everything:
            raise _error(page.rel, line, f"'shrink' text {old!r} is in none of the page's blocks "
                         "(stale marker?)")
    for name, path, line in page.data:
        if path not in everything:
            raise _error(page.rel, line, f"'data' path {path!r} is in none of the page's blocks")


# --------------------------------------------------------------------------- shell blocks


def _logical_lines(code: str) -> List[str]:
    return code.replace("\\\n", " ").splitlines()


def recipe_commands(code: str) -> List[Tuple[str, List[str]]]:
    """The recipe calls of a shell block: ``(recipe name, its arguments)`` per call.

    ``...`` (an elision on the page) and shell words after the call (``;``, ``&&``, ``|``, ...)
    are left out.
    """
    calls = []
    for line in _logical_lines(code):
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        for k, word in enumerate(words):
            match = _RECIPE.search(word)
            if not match:
                continue
            args = []
            for arg in words[k + 1:]:
                if arg in _SHELL_STOP or arg.startswith((">", "2>", "<")):
                    break
                end = arg.endswith(";")
                arg = arg.rstrip(";")
                if arg and arg != "...":
                    args.append(arg)
                if end:
                    break
            calls.append((match.group("name"), args))
            break
    return calls


def _load_recipe_parser(root: Path, name: str):
    module = load_recipe(name, root, prefix="_docs_recipe")
    return None if module is None else module.get_args_parser()


def check_recipe_options(root: Path, block: Block) -> List[str]:
    """Problems of the recipe command lines of ``block``: a recipe that does not exist, an option
    its parser does not define, a value outside an option's choices (shell variables and
    ``...`` are not judged)."""
    problems = []
    for name, args in recipe_commands(block.code):
        parser = _load_recipe_parser(root, name)
        if parser is None:
            problems.append(f"{block.name}: recipes/{name}.py does not exist")
            continue
        actions = {s: a for a in parser._actions for s in a.option_strings}
        k = 0
        while k < len(args):
            arg = args[k]
            k += 1
            if not arg.startswith("-") or arg == "-":
                continue
            option, _, inline = arg.partition("=")
            action = actions.get(option)
            if action is None:
                problems.append(f"{block.name}: recipes/{name}.py has no option {option}")
                continue
            if action.nargs == 0:
                continue
            value = inline or (args[k] if k < len(args) else None)
            if not inline:
                k += 1
            if action.choices is not None and value is not None and "$" not in value:
                if value not in action.choices:
                    problems.append(f"{block.name}: {option} {value!r} of recipes/{name}.py is not "
                                    f"one of {sorted(action.choices)}")
    return problems


def run_shell_block(block: Block, code: str, cwd: Path, env: Dict[str, str], timeout: float) -> str:
    """Runs ``code`` (the block as prepared) with ``bash -euo pipefail``; returns its output.

    Raises:
        DocsTestError: non-zero exit or timeout, with the block's name and the output's tail.
    """
    __tracebackhide__ = True
    try:
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise DocsTestError(f"{block.name} did not finish within {timeout:.0f} s") from None
    if proc.returncode != 0:
        raise DocsTestError(f"{block.name} exited with status {proc.returncode}\n"
                            f"--- stdout (tail)\n{proc.stdout[-3000:]}\n"
                            f"--- stderr (tail)\n{proc.stderr[-3000:]}")
    return proc.stdout


# -------------------------------------------------------------------------- python blocks


def _compile(page: Page, line: int, code: str):
    # Padding keeps the page's line numbers: tracebacks show the page's own lines.
    return compile("\n" * (line - 1) + code, str(page.path), "exec")


def _failure(what: str, exc: BaseException) -> DocsTestError:
    # the page's frames and the library's, not this module's exec or compile frame
    frames = [] if isinstance(exc, SyntaxError) else traceback.extract_tb(exc.__traceback__)[1:]
    lines = traceback.format_list(frames) + traceback.format_exception_only(type(exc), exc)
    return DocsTestError(f"{what} failed: {type(exc).__name__}: {exc}\n"
                         "Traceback (most recent call last):\n" + "".join(lines))


def run_python_page(page: Page, data_roots: Dict[str, str], full_size: bool = False) -> dict:
    """Runs the page's hidden setup, then its Python blocks in order, in one namespace.

    Skipped blocks are compiled, not run. Returns the namespace.

    Raises:
        DocsTestError: naming the page, the block and its line, with the traceback.
    """
    __tracebackhide__ = True
    namespace: dict = {"__name__": "__main__"}
    for line, code in page.setup:
        try:
            exec(_compile(page, line, page.prepared(code, data_roots, full_size)), namespace)
        except Exception as exc:
            raise _failure(f"{page.rel}, hidden setup (line {line})", exc) from None
    for block in page.python_blocks:
        code = page.prepared(block.code, data_roots, full_size)
        try:
            compiled = _compile(page, block.line, code)
        except SyntaxError as exc:
            raise _failure(block.name, exc) from None
        if block.skip:
            continue
        try:
            exec(compiled, namespace)
        except Exception as exc:
            raise _failure(block.name, exc) from None
    return namespace


def full_size_requested() -> bool:
    return os.environ.get(FULL_SIZE_ENV, "") not in ("", "0")
