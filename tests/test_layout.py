"""The package's shape, checked statically (``ast``) and in fresh interpreters.

- no module imports a private name (``_x``) from another module of the package, nor reads ``module._x`` of one;
- no import cycles among the package's modules (module-level imports only: imports inside functions and under
  ``if TYPE_CHECKING:`` are not executed at import time and do not count);
- no module longer than ``MAX_LINES``;
- ``import steering_opt`` is lazy: it imports none of its submodules (and so neither torch nor transformers);
- the lazy table in ``__init__``, ``__all__`` and the ``TYPE_CHECKING`` imports agree, and every entry resolves;
- ``steering_opt.evaluate`` / ``steering_opt.sweep`` are the modules, and calling them calls the functions.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PACKAGE = "steering_opt"
PACKAGE_DIR = Path(__file__).resolve().parent.parent / PACKAGE
MAX_LINES = 700
HEAVY = ("torch", "transformers", "matplotlib", "scipy", "numpy", "accelerate", "safetensors", "gguf")


# ----------------------------------------------------------------------------------------------- parsing


@dataclass
class Module:
    name: str  # dotted, e.g. "steering_opt.hooks"
    path: Path
    is_package: bool
    tree: ast.Module = field(repr=False)

    @property
    def rel(self) -> str:
        return str(self.path.relative_to(PACKAGE_DIR.parent))


def _load_modules() -> dict[str, Module]:
    modules = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        name = ".".join(parts)
        modules[name] = Module(name, path, is_package, ast.parse(path.read_text(encoding="utf-8"), str(path)))
    return modules


MODULES = _load_modules()


def _resolve(module: Module, node: ast.ImportFrom) -> str:
    """The absolute module name of ``from <...> import``."""
    if not node.level:
        return node.module or ""
    base = module.name.split(".")
    if not module.is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(nodes: Iterable[ast.AST], *, in_functions: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements among ``nodes``, never those under ``if TYPE_CHECKING:``; those inside functions only
    with ``in_functions`` (module-level ones, class bodies included, run when the module is imported)."""
    for node in nodes:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and not in_functions:
            continue
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _imports(node.orelse, in_functions=in_functions)
        else:
            yield from _imports(ast.iter_child_nodes(node), in_functions=in_functions)


def _import_targets(module: Module, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The package modules an import statement imports (a module's parent packages are not counted: they are
    imported before the module itself, whatever it imports)."""
    targets = []
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        source = _resolve(module, node)
        for alias in node.names:
            sub = f"{source}.{alias.name}"
            targets.append(sub if sub in MODULES else source)
    return [t for t in dict.fromkeys(targets) if t in MODULES and t != module.name]


# ----------------------------------------------------------------------------------------------- static checks


def _private_uses(module: Module) -> list[str]:
    found = []
    # names bound to package modules: ``from . import arch``, ``import steering_opt.arch as arch``, ``import
    # steering_opt.arch`` (binds ``steering_opt``), so that ``arch._x`` / ``steering_opt.arch._x`` can be resolved
    aliases: dict[str, str] = {}
    for node in ast.walk(module.tree):
        if isinstance(node, ast.ImportFrom):
            source = _resolve(module, node)
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in MODULES:  # a submodule: importing it by a private name is a module import, allowed
                    aliases[alias.asname or alias.name] = sub
                elif source in MODULES and source != module.name and _is_private(alias.name):
                    found.append(f"{module.rel}:{node.lineno}: imports private name {alias.name!r} from {source}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES:
                    if alias.asname:
                        aliases[alias.asname] = alias.name
                    else:
                        top = alias.name.split(".")[0]
                        aliases[top] = top
    for node in ast.walk(module.tree):
        if not (isinstance(node, ast.Attribute) and _is_private(node.attr)):
            continue
        chain, value = [], node.value
        while isinstance(value, ast.Attribute):
            chain.append(value.attr)
            value = value.value
        if isinstance(value, ast.Name) and value.id in aliases:
            target = ".".join([aliases[value.id], *reversed(chain)])
            if target in MODULES and target != module.name:
                found.append(f"{module.rel}:{node.lineno}: reads private attribute {node.attr!r} of {target}")
    return found


def test_no_private_names_from_other_modules() -> None:
    found = [line for module in MODULES.values() for line in _private_uses(module)]
    assert not found, "private names used across modules (make them public, or move the code):\n" + "\n".join(found)


def _import_graph(*, in_functions: bool = False) -> dict[str, dict[str, int]]:
    """module -> {imported package module: line of the first such import}; module-level imports only unless
    ``in_functions``."""
    graph: dict[str, dict[str, int]] = {name: {} for name in MODULES}
    for module in MODULES.values():
        for node in _imports(module.tree.body, in_functions=in_functions):
            for target in _import_targets(module, node):
                graph[module.name].setdefault(target, node.lineno)
    return graph


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as sorted module names."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(components)


def _describe_cycles(graph: dict[str, dict[str, int]]) -> list[str]:
    messages = []
    for component in _cycles(graph):
        edges = [f"    {MODULES[a].rel}:{line} imports {b}"
                 for a in component for b, line in sorted(graph[a].items()) if b in component]
        messages.append("cycle among " + ", ".join(component) + ":\n" + "\n".join(edges))
    return messages


def test_no_import_cycles() -> None:
    messages = _describe_cycles(_import_graph())
    assert not messages, ("import cycles (module-level imports; move the shared code down, or import inside the "
                          "function that needs it):\n" + "\n".join(messages))


#: Deferred (in-function) imports that knowingly point up the layers, each with its reason. Keep this short.
ALLOWED_DEFERRED = {
    ("steering_opt.vector", "steering_opt.persist"):
        "SteeringVector.save_pretrained / from_pretrained: one-line conveniences over the persistence layer",
}


def test_no_cycles_through_deferred_imports() -> None:
    """Stricter than the above: an import inside a function that closes a loop (``optimize`` imports ``scale``
    in a function, ``scale`` imports ``optimize`` at the top) hides a two-way dependency; data should flow one
    way. Only ``if TYPE_CHECKING:`` imports and the documented :data:`ALLOWED_DEFERRED` edges are exempt."""
    deferred = _import_graph(in_functions=True)
    for a, b in ALLOWED_DEFERRED:
        assert b in deferred[a], f"{a} no longer imports {b}: drop it from ALLOWED_DEFERRED"
        del deferred[a][b]
    messages = _describe_cycles(deferred)
    assert not messages, ("two-way dependencies between modules, some hidden by imports inside functions (give "
                          "the shared code one home below both):\n" + "\n".join(messages))


#: The surfaces: modules allowed to build on the compatibility adapters (everything else is the core below them).
SURFACES = {"steering_opt", "steering_opt.steering_opt", "steering_opt.cli", "steering_opt.cli_args",
            "steering_opt.demo", "steering_opt.__main__"}


def test_the_core_does_not_import_the_compatibility_layer() -> None:
    """Compatibility adapters sit on top of the core: no core module imports ``steering_opt.compat``, even
    inside a function."""
    graph = _import_graph(in_functions=True)
    bad = [f"{MODULES[a].rel}:{line} imports {b}" for a, deps in graph.items() for b, line in deps.items()
           if b.startswith("steering_opt.compat") and not a.startswith("steering_opt.compat") and a not in SURFACES]
    assert not bad, "core modules importing the compatibility layer:\n" + "\n".join(bad)


def test_modules_are_small() -> None:
    too_long = []
    for module in MODULES.values():
        n = len(module.path.read_text(encoding="utf-8").splitlines())
        if n > MAX_LINES:
            too_long.append(f"{module.rel}: {n} lines")
    assert not too_long, f"modules over {MAX_LINES} lines (split them by concept):\n" + "\n".join(too_long)


def test_the_checks_catch_what_they_should() -> None:
    """The checkers themselves, on a small synthetic package layout."""
    fake = {
        "steering_opt.a": "from .b import _hidden, shown\nfrom . import b\nx = b._other\nimport steering_opt.b\n"
                          "y = steering_opt.b._third\nfrom .sub import _mod\n",
        "steering_opt.b": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import c\n"
                          "def f():\n    from . import a\nfrom . import __version__\n",
        "steering_opt.c": "from . import d\n",
        "steering_opt.d": "import steering_opt.c\n",
        "steering_opt.sub._mod": "",
        "steering_opt.sub": "",
    }
    saved = dict(MODULES)
    try:
        MODULES.clear()
        for name, source in fake.items():
            MODULES[name] = Module(name, PACKAGE_DIR / f"{name.replace('.', '/')}.py", name == "steering_opt.sub",
                                   ast.parse(source))
        found = _private_uses(MODULES["steering_opt.a"])
        assert [line.split(": ", 1)[1] for line in found] == [
            "imports private name '_hidden' from steering_opt.b",
            "reads private attribute '_other' of steering_opt.b",
            "reads private attribute '_third' of steering_opt.b",
        ]
        assert _private_uses(MODULES["steering_opt.b"]) == []  # dunders are not private
        assert _cycles(_import_graph()) == [["steering_opt.c", "steering_opt.d"]]  # not a<->b: lazy / TYPE_CHECKING
        assert _cycles(_import_graph(in_functions=True)) == [["steering_opt.a", "steering_opt.b"],
                                                             ["steering_opt.c", "steering_opt.d"]]
    finally:
        MODULES.clear()
        MODULES.update(saved)


# ----------------------------------------------------------------------------------------------- the package surface


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=600,
                          cwd=PACKAGE_DIR.parent)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_import_is_lazy() -> None:
    loaded = json.loads(_run("""
        import json, sys
        import steering_opt
        print(json.dumps(sorted(sys.modules)))
    """))
    heavy = [m for m in loaded if m.split(".")[0] in HEAVY]
    submodules = [m for m in loaded if m.startswith(f"{PACKAGE}.")]
    assert not heavy and not submodules, f"`import {PACKAGE}` imported {heavy + submodules}"


def _init_tables() -> tuple[dict[str, str], list[str], dict[str, str]]:
    """``_EXPORTS``, ``__all__`` and {name: absolute module} of the ``TYPE_CHECKING`` imports, read from source."""
    init = MODULES[PACKAGE]
    exports: dict[str, str] = {}
    all_: list[str] = []
    typed: dict[str, str] = {}
    for node in init.tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            target = node.targets[0] if isinstance(node, ast.Assign) else node.target
            if isinstance(target, ast.Name) and target.id == "_EXPORTS":
                exports = ast.literal_eval(node.value)
            elif isinstance(target, ast.Name) and target.id == "__all__":
                all_ = ast.literal_eval(node.value)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom), f"{init.rel}:{imp.lineno}: only `from .x import y` here"
                for alias in imp.names:
                    assert alias.name not in typed, f"{init.rel}:{imp.lineno}: {alias.name} imported twice"
                    typed[alias.asname or alias.name] = _resolve(init, imp)
    return exports, all_, typed


def test_exports_table_all_and_type_checking_block_agree() -> None:
    exports, all_, typed = _init_tables()
    assert exports, "no _EXPORTS table in __init__.py"
    assert len(all_) == len(set(all_)), "duplicates in __all__"
    assert set(all_) == set(exports), (f"in __all__ only: {sorted(set(all_) - set(exports))}; "
                                       f"in _EXPORTS only: {sorted(set(exports) - set(all_))}")
    wrong = {name: (f"{PACKAGE}.{module}", typed.get(name)) for name, module in exports.items()
             if typed.get(name) != f"{PACKAGE}.{module}"}
    assert not wrong, f"_EXPORTS vs TYPE_CHECKING imports (name: (table, TYPE_CHECKING)): {wrong}"
    assert set(typed) == set(exports), f"TYPE_CHECKING only: {sorted(set(typed) - set(exports))}"


def test_every_export_resolves_and_star_import_is_exact() -> None:
    out = json.loads(_run("""
        import json
        import steering_opt
        from steering_opt import _EXPORTS
        missing = [name for name in _EXPORTS if getattr(steering_opt, name, None) is None]
        # a name that is its module's name is the module: it must forward calls (see steering_opt.util)
        not_callable = [name for name, module in _EXPORTS.items()
                        if module.rpartition(".")[2] == name and not callable(getattr(steering_opt, name))]
        ns = {}
        exec("from steering_opt import *", ns)
        from steering_opt import steering_opt as tutorial
        print(json.dumps({"missing": missing, "not_callable": not_callable,
                          "star": sorted(k for k in ns if k != "__builtins__"),
                          "all": sorted(steering_opt.__all__), "dir": dir(steering_opt),
                          "tutorial": sorted(n for n in steering_opt.__all__
                                             if getattr(tutorial, n) is not getattr(steering_opt, n))}))
    """))
    assert out["missing"] == []
    assert out["not_callable"] == [], ("these modules share their name with a public function but cannot be called: "
                                       "end them with make_module_callable(__name__) (steering_opt.util)")
    assert out["star"] == out["all"]
    assert set(out["all"]) <= set(out["dir"]) and out["dir"] == sorted(out["dir"])
    assert {"arch", "hooks", "sweep", "evaluate", "steering_opt"} <= set(out["dir"])
    assert out["tutorial"] == [], "steering_opt.steering_opt must re-export the same objects"


@pytest.mark.parametrize("first", ["attribute", "import"])
def test_function_named_modules_are_modules_and_callable(first: str) -> None:
    out = json.loads(_run(f"""
        import json, types
        import steering_opt
        if {first!r} == "attribute":
            via_attribute = steering_opt.sweep, steering_opt.evaluate
        import steering_opt.evaluate as ev
        import steering_opt.sweep as sw
        from steering_opt.evaluate import evaluate
        from steering_opt.sweep import sweep
        sw.sweep = lambda *a, **k: ("sweep", a, k)
        ev.evaluate = lambda *a, **k: ("evaluate", a, k)
        print(json.dumps({{
            "modules": [isinstance(m, types.ModuleType) for m in (sw, ev)],
            "names": [sw.__name__, ev.__name__],
            "same": [steering_opt.sweep is sw, steering_opt.evaluate is ev],
            "functions": [callable(sweep) and not isinstance(sweep, types.ModuleType),
                          callable(evaluate) and not isinstance(evaluate, types.ModuleType)],
            "calls": [steering_opt.sweep(1, k=2), steering_opt.evaluate(3, k=4)],
            "attr": len(steering_opt.sweep.GENERIC_PROMPTS) > 0,
        }}))
    """))
    assert out == {
        "modules": [True, True],
        "names": ["steering_opt.sweep", "steering_opt.evaluate"],
        "same": [True, True],
        "functions": [True, True],
        "calls": [["sweep", [1], {"k": 2}], ["evaluate", [3], {"k": 4}]],
        "attr": True,
    }


def test_unknown_attribute_is_an_attribute_error() -> None:
    import steering_opt

    with pytest.raises(AttributeError, match="no_such_name"):
        steering_opt.no_such_name  # noqa: B018
    with pytest.raises(AttributeError):
        steering_opt.__no_such_dunder__  # noqa: B018
    assert not hasattr(steering_opt, "__main__")  # never imported by a probe (it would run the CLI)
