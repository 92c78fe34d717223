"""Griffe extension: renders Captum-style (Sphinx-flavoured Google) docstrings with mkdocstrings.

The library's docstrings follow Captum's conventions, which target Sphinx: ``Examples::``
sections, ``.. math::`` blocks, ``:math:`` and ``:class:`` / ``:func:`` / ``:meth:`` roles,
and reStructuredText simple tables. mkdocstrings renders docstrings as Markdown, so this
extension rewrites those constructs, once the package is loaded and before any docstring is
parsed:

* ``Examples::`` (and the other Google section names ending in ``::``) -> ``Examples:``;
* ``.. math::`` blocks -> ``$$ ... $$`` (``pymdownx.arithmatex``), ``:math:`x``` -> ``\\(x\\)``;
* roles -> a cross-reference ``[`name`][public.path]`` when the target is a public, documented
  name of ``captum_consistency`` (its path as the API reference renders it), otherwise a code
  span, so that ``mkdocs build --strict`` never sees a reference it cannot resolve;
* reStructuredText simple tables (``====  ====`` borders) -> Markdown tables;
* a paragraph ending in ``::`` before an indented literal block -> a single ``:``.

The docstrings in the source stay unchanged (and readable with ``help()``).
"""

from __future__ import annotations

import re
from typing import Dict, Iterator, List, Optional

import griffe

#: Modules whose ``__all__`` the API reference renders, in the order that picks the public
#: path of a name exported twice (``boxes_to_mask``: metrics before data).
DOCUMENTED_MODULES = (
    "captum_consistency",
    "captum_consistency.attr",
    "captum_consistency.losses",
    "captum_consistency.metrics",
    "captum_consistency.data",
    "captum_consistency.robust",
    "captum_consistency.engine",
    "captum_consistency.builders",
    "captum_consistency.models",
    "captum_consistency.report",
    "captum_consistency.claims",
    "captum_consistency.viz",
)

#: Modules whose own docstring the API reference renders (``:::`` with ``members: false``),
#: so that ``:mod:`` roles to them become links.
DOCUMENTED_MODULE_DOCSTRINGS = (
    "captum_consistency.data.synthetic",
    "captum_consistency.data.distractors",
    "captum_consistency.engine.checkpoint",
)

_SECTIONS = (
    "Args|Arguments|Parameters|Params|Returns|Return|Yields|Raises|Exceptions|Examples|Example|"
    "Attributes|Note|Notes|Warning|Warnings|References|See Also|Other Parameters|Receives"
)
_SECTION_DOUBLE_COLON = re.compile(rf"^(\s*)({_SECTIONS})::\s*$")
_ROLE = re.compile(r":(class|func|meth|attr|mod|obj|data|exc|const|py:\w+):`([^`]+)`")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_TABLE_BORDER = re.compile(r"^(\s*)(=+)( +=+)+\s*$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _walk(obj: griffe.Object) -> Iterator[griffe.Object]:
    yield obj
    for member in obj.members.values():
        if member.is_alias:
            continue
        yield from _walk(member)


class CaptumStyle(griffe.Extension):
    """Rewrites the Sphinx constructs of Captum-style docstrings into mkdocstrings Markdown."""

    def __init__(self) -> None:
        super().__init__()
        self._public: Dict[str, str] = {}
        self._collection = None

    # griffe >= 2 calls on_package; griffe 1.x calls on_package_loaded.
    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        self._rewrite_package(pkg)

    def on_package_loaded(self, *, pkg: griffe.Module, **kwargs) -> None:  # griffe 1.x
        self._rewrite_package(pkg)

    def _rewrite_package(self, pkg: griffe.Module) -> None:
        if pkg.path != "captum_consistency":
            return
        self._collection = pkg.modules_collection
        self._public = self._public_paths(pkg)
        for obj in _walk(pkg):
            doc = obj.docstring
            if doc is None:
                continue
            new = self.rewrite(doc.value, obj)
            if new != doc.value:
                doc.value = new
                for cached in ("parsed", "lines"):
                    doc.__dict__.pop(cached, None)

    # -- public names -----------------------------------------------------------------------

    def _public_paths(self, pkg: griffe.Module) -> Dict[str, str]:
        public: Dict[str, str] = {}
        for module_path in DOCUMENTED_MODULES:
            try:
                module = pkg.modules_collection[module_path]
            except KeyError:
                continue
            for name in module.exports or ():
                if name.startswith("__") or name not in module.members:
                    continue
                member = module.members[name]
                try:
                    canonical = member.final_target.path if member.is_alias else member.path
                except Exception:  # an alias to something outside the package
                    continue
                public.setdefault(canonical, f"{module_path}.{name}")
        for module_path in DOCUMENTED_MODULE_DOCSTRINGS:
            public.setdefault(module_path, module_path)
        return public

    def _lookup(self, path: str) -> Optional[griffe.Object]:
        try:
            obj = self._collection[path]
        except Exception:
            return None
        try:
            return obj.final_target if obj.is_alias else obj
        except Exception:
            return None

    def _public_target(self, name: str, scope: griffe.Object) -> Optional[str]:
        """The path the API reference renders ``name`` under, or None if it does not."""
        candidates: List[str] = []
        if name.startswith("captum_consistency"):
            candidates.append(name)
        else:
            head, _, tail = name.partition(".")
            try:
                resolved = scope.resolve(head)
                candidates.append(resolved + ("." + tail if tail else ""))
            except Exception:
                pass
        for path in candidates:
            target = self._lookup(path)
            if target is None:
                continue
            canonical = target.path
            if canonical in self._public:
                return self._public[canonical]
            if target.is_module:
                continue
            # a member of a public class (a method or property with its own docstring)
            parent, _, member = canonical.rpartition(".")
            if (
                parent in self._public
                and not member.startswith("_")
                and target.docstring is not None
                and not target.is_module
            ):
                return f"{self._public[parent]}.{member}"
        return None

    def _role(self, match: "re.Match[str]", scope: griffe.Object) -> str:
        text = match.group(2).strip()
        explicit = re.match(r"^(.*?)\s*<([^>]+)>$", text)
        if explicit:
            title, target = explicit.group(1), explicit.group(2)
        else:
            target = text.lstrip("~!")
            title = target.rsplit(".", 1)[-1] if text.startswith("~") else target
        target = target.lstrip("~!")
        public = self._public_target(target, scope)
        if public is None:
            return f"`{title}`"
        return f"[`{title}`][{public}]"

    # -- text rewriting ---------------------------------------------------------------------

    def rewrite(self, text: str, scope: griffe.Object) -> str:
        lines = text.split("\n")
        lines = self._math_blocks(lines)
        lines = self._tables(lines)
        lines = self._literal_markers(lines)
        text = "\n".join(lines)
        text = _MATH_ROLE.sub(lambda m: "\\(" + m.group(1) + "\\)", text)
        text = _ROLE.sub(lambda m: self._role(m, scope), text)
        return text

    @staticmethod
    def _math_blocks(lines: List[str]) -> List[str]:
        out: List[str] = []
        i = 0
        while i < len(lines):
            line = lines[i]
            stripped = line.strip()
            if stripped.startswith(".. math::"):
                base = _indent(line)
                pad = " " * base
                body: List[str] = []
                first = stripped[len(".. math::"):].strip()
                if first:
                    body.append(first)
                i += 1
                while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > base):
                    body.append(lines[i].strip())
                    i += 1
                while body and not body[-1]:
                    body.pop()
                while body and not body[0]:
                    body.pop(0)
                if out and out[-1].strip():
                    out.append("")
                out.append(pad + "$$")
                out.extend(pad + b if b else "" for b in body)
                out.append(pad + "$$")
                if i < len(lines) and lines[i].strip():
                    out.append("")
                continue
            out.append(line)
            i += 1
        return out

    @staticmethod
    def _tables(lines: List[str]) -> List[str]:
        out: List[str] = []
        i = 0
        while i < len(lines):
            border = _TABLE_BORDER.match(lines[i])
            if not border:
                out.append(lines[i])
                i += 1
                continue
            pattern = lines[i].rstrip()
            spans = [(m.start(), m.end()) for m in re.finditer(r"=+", pattern)]
            base = border.group(1)
            j = i + 1
            borders = 1
            rows: List[List[str]] = []
            header_rows = 0
            while j < len(lines) and borders < 3:
                line = lines[j]
                if _TABLE_BORDER.match(line):
                    borders += 1
                    if borders == 2:
                        header_rows = len(rows)
                    j += 1
                    continue
                if not line.strip():
                    j += 1
                    continue
                cells = []
                for k, (start, end) in enumerate(spans):
                    stop = spans[k + 1][0] if k + 1 < len(spans) else len(line)
                    cells.append(line[start:stop].strip())
                # a row with an empty first cell continues the previous row of its part
                first_of_part = len(rows) == (header_rows if borders == 2 else 0)
                if not cells[0] and not first_of_part:
                    rows[-1] = [(a + " " + b).strip() for a, b in zip(rows[-1], cells)]
                else:
                    rows.append(cells)
                j += 1
            if borders < 3 or header_rows == 0:
                out.append(lines[i])  # not a table we understand: leave it
                i += 1
                continue
            header, body = rows[:header_rows], rows[header_rows:]
            header_cells = [" ".join(col).strip() for col in zip(*header)]

            def fmt(cells: List[str]) -> str:
                return base + "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

            if out and out[-1].strip():
                out.append("")
            out.append(fmt(header_cells))
            out.append(base + "|" + "|".join(" --- " for _ in spans) + "|")
            out.extend(fmt(r) for r in body)
            if j < len(lines) and lines[j].strip():
                out.append("")
            i = j
        return out

    @staticmethod
    def _literal_markers(lines: List[str]) -> List[str]:
        out = list(lines)
        for i, line in enumerate(lines):
            section = _SECTION_DOUBLE_COLON.match(line)
            if section:
                out[i] = f"{section.group(1)}{section.group(2)}:"
                continue
            if line.rstrip().endswith("::") and not line.strip().startswith(".."):
                # next non-blank line more indented: an rST literal block follows
                k = i + 1
                while k < len(lines) and not lines[k].strip():
                    k += 1
                if k < len(lines) and _indent(lines[k]) > _indent(line):
                    stripped = line.rstrip()[:-2].rstrip()
                    out[i] = (stripped + ":") if stripped.strip() else ""
        return out
