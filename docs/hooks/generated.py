"""MkDocs hook: pages that show text kept elsewhere in the repository, so it is written in one place.

Markers (each on a line of its own in a page under docs/):

``<!-- include: PATH -->``
    the whole file ``PATH`` (relative to the repository root).
``<!-- include: PATH#NAME -->``
    a section of it: the lines between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` if the file has
    those markers, else the body of the heading whose text is ``NAME`` (up to the next heading of the same
    or a higher level; the heading line itself is left out).
``<!-- generated: options-table -->``
    every field of :class:`steering_opt.options.OptimizeOptions`: name, default and its ``help`` text.
``<!-- generated: exports-table -->``
    every public name of the ``steering_opt`` package with a link to its API reference entry.
``<!-- generated: api MODULE [NAME ...] -->``
    the mkdocstrings block of ``steering_opt.MODULE`` rendering its ``__all__``, the package's public names
    defined there, and the NAMEs given.
``<!-- generated: compat-modules -->``
    such a block for every module of ``steering_opt/compat/``.

A missing file, section or generator stops the build (``PluginError``), as ``mkdocs build --strict`` should.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

MARKER = re.compile(r"^<!-- (include|generated): (\S.*?) -->[ \t]*$", re.MULTILINE)
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$")


def _section(text: str, name: str, where: str) -> str:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if begin in text:
        start = text.index(begin) + len(begin)
        stop = text.find(end, start)
        if stop < 0:
            raise PluginError(f"{where}: {begin} has no matching {end}")
        return text[start:stop].strip("\n")
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = HEADING.match(line)
        if m and m.group(2) == name:
            level = len(m.group(1))
            body: list[str] = []
            in_code = False
            for nxt in lines[i + 1:]:
                in_code ^= nxt.startswith("```")
                h = HEADING.match(nxt)
                if h and not in_code and len(h.group(1)) <= level:
                    break
                body.append(nxt)
            return "\n".join(body).strip("\n")
    raise PluginError(f"{where}: no section {name!r} (neither <!-- {name}:begin --> nor a heading {name!r})")


def _include(root: Path, target: str, page: str) -> str:
    rel, _, name = target.partition("#")
    path = root / rel
    if not path.is_file():
        raise PluginError(f"{page}: include of {rel!r}: no such file")
    text = path.read_text(encoding="utf-8")
    return _section(text, name, f"{page}: {rel}") if name else text


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _options_table() -> str:
    from steering_opt.options import OptimizeOptions

    rows = ["| option | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(OptimizeOptions):
        default = f.default if f.default is not dataclasses.MISSING else None
        rows.append(f"| `{f.name}` | `{default!r}` | {_cell(f.metadata.get('help', ''))} |")
    return "\n".join(rows)


def _exports() -> dict[str, str]:
    """The package's table of public names: ``{name: submodule}`` (read from ``steering_opt/__init__.py``)."""
    import steering_opt

    return dict(vars(steering_opt)["_EXPORTS"])


def _exports_table() -> str:
    by_module: dict[str, list[str]] = {}
    for name, module in _exports().items():
        by_module.setdefault(module, []).append(name)
    rows = ["| module | public names (importable as `steering_opt.NAME`) |", "|---|---|"]
    for module in sorted(by_module):
        links = ", ".join(f"[`{n}`][steering_opt.{module}.{n}]" for n in sorted(by_module[module], key=str.lower))
        rows.append(f"| [`steering_opt.{module}`][steering_opt.{module}] | {links} |")
    return "\n".join(rows)


def _module_all(root: Path, module: str) -> list[str]:
    """The literal ``__all__`` of ``steering_opt.<module>`` (read without importing it), or []."""
    path = root / "steering_opt" / (module.replace(".", "/") + ".py")
    if not path.is_file():
        raise PluginError(f"no module steering_opt.{module} ({path} does not exist)")
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return [str(x) for x in ast.literal_eval(node.value)]
    return []


def _api(root: Path, module: str, *extra: str) -> str:
    """A mkdocstrings block for ``steering_opt.<module>``: its ``__all__``, the package's public names defined
    there and ``extra``, so that every public name has an entry (the exports table links to them)."""
    names = list(dict.fromkeys([*_module_all(root, module), *extra,
                                *(n for n, m in _exports().items() if m == module)]))
    lines = [f"::: steering_opt.{module}", "    options:"]
    lines.append(f"      members: [{', '.join(names)}]" if names else "      members: false")
    return "\n".join(lines)


def _compat_modules(root: Path) -> str:
    """One mkdocstrings block per module of ``steering_opt/compat/``."""
    modules = sorted(p.stem for p in (root / "steering_opt" / "compat").glob("*.py") if not p.stem.startswith("_"))
    return "\n\n".join(_api(root, f"compat.{m}") for m in modules)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Replace every marker of the page by the text it names."""
    root = Path(config["config_file_path"]).parent
    where = page.file.src_uri

    def replace(m: re.Match[str]) -> str:
        kind, target = m.group(1), m.group(2)
        if kind == "include":
            return _include(root, target, where)
        name, *args = target.split()
        if name == "options-table" and not args:
            return _options_table()
        if name == "exports-table" and not args:
            return _exports_table()
        if name == "api" and args:
            return _api(root, *args)
        if name == "compat-modules" and not args:
            return _compat_modules(root)
        raise PluginError(f"{where}: unknown marker <!-- generated: {target} -->")

    return MARKER.sub(replace, markdown)
