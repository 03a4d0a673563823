"""The import graph points one way: read from the source with `ast`, not from what happens to be loaded.

Matrix: every module under convt_cli/, its relative and absolute imports of convt_cli.* at any depth (inside
functions too); `from .engine import x` counts as an import of convt_cli.engine.x when that is a module, else of
the package convt_cli.engine. Asserted:
- engine/forward.py (the conv verify checks against) reaches nothing under engine/strategies/;
- verify.py reaches no strategy and not engine/execute.py: it holds conv_transpose against its own conv;
- the engine reaches no I/O, no stream, no cli; nothing but __main__ imports convt_cli.cli;
- only cli.py imports click.
"""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "convt_cli")


def _modules() -> dict:
    """module name -> path, for every .py under convt_cli/."""
    found = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, os.path.join(ROOT, ".."))[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(module: str) -> tuple[set, set]:
    """(convt_cli modules it imports, top-level names of the other packages it imports)."""
    path = MODULES[module]
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    ours, others = set(), set()
    with open(path) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "convt_cli":
                    ours.add(alias.name)
                else:
                    others.add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "convt_cli":
                others.add(target.split(".")[0])
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                ours.add(sub if sub in MODULES else target)
    return {m for m in ours if m in MODULES}, others


def _reach(start: str) -> set:
    seen, todo = set(), [start]
    while todo:
        module = todo.pop()
        for target in _imports(module)[0] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def test_the_graph_is_read():
    # the parser must see the imports that do exist, or every assertion below would pass on nothing
    assert "convt_cli.engine.strategies.winograd" in _reach("convt_cli.engine.execute")
    assert "convt_cli.engine.dtypes" in _imports("convt_cli.verify")[0]
    assert "click" in _imports("convt_cli.cli")[1]


def test_forward_conv_reaches_no_strategy():
    reached = _reach("convt_cli.engine.forward")
    assert not {m for m in reached if m.startswith("convt_cli.engine.strategies")}, reached
    assert "convt_cli.engine.execute" not in reached


def test_verify_reaches_neither_the_strategies_nor_the_transposed_engine():
    reached = _reach("convt_cli.verify")
    bad = {m for m in reached if m.startswith("convt_cli.engine.strategies") or m in
           ("convt_cli.engine.execute", "convt_cli.engine.choose", "convt_cli.engine.grid")}
    assert not bad, bad


def test_the_engine_reaches_no_io_stream_or_cli():
    for module in MODULES:
        if module.startswith("convt_cli.engine"):
            reached = _reach(module)
            assert not {m for m in reached if m.split(".")[1] in ("io", "formats", "stream", "cli", "verify")}, \
                (module, reached)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_nothing_but_main_imports_the_cli(module):
    if module != "convt_cli.__main__":
        assert "convt_cli.cli" not in _imports(module)[0]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_only_the_cli_imports_click(module):
    if module != "convt_cli.cli":
        assert "click" not in _imports(module)[1]
