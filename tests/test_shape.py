"""One shape for every paper, a floor of shared parts, and an engine API methods never reach around.

Read from the source (ast), nothing is run: every paper package has the same role files and exports
``PAPER``; no code under ``methods/`` touches ``accelerator``; no paper imports another; the imports
of every athanor module (module level and inside functions) form no cycle; no file under
``platform/`` or ``kernels/`` is over 500 lines; no function of ``engine/engine.py`` over 60.
"""
import ast
import importlib
from pathlib import Path

import pytest

from athanor.runner import Paper
from conftest import ROOT

LIB = ROOT / "platform" / "athanor"
METHODS = LIB / "methods"
ROLE_FILES = {"__init__.py", "config.py", "method.py", "stages.py", "report.py"}
PAPERS = sorted(p.name for p in METHODS.iterdir() if p.is_dir() and (p / "__init__.py").exists())


def module_name(path: Path) -> str:
    """athanor.x.y of a file under platform/athanor or kernels/ (athanor.kernels)."""
    if path.is_relative_to(ROOT / "kernels"):
        parts = ("athanor", "kernels", *path.relative_to(ROOT / "kernels").with_suffix("").parts)
    else:
        parts = ("athanor", *path.relative_to(LIB).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in [*LIB.rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]
           if "__pycache__" not in p.parts}


def imports(name: str) -> set[str]:
    """The athanor modules ``name`` imports anywhere in its file (module level, functions, classes):
    ``from a import b`` counts as importing ``a.b`` when that is a module, else ``a``."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # `import a.b.c` of a name inside a module
                target = target.rpartition(".")[0]
            if target.startswith("athanor") and target != name:
                out.add(target)
    return out


GRAPH = {name: imports(name) for name in MODULES}


def test_every_paper_is_a_package_with_the_same_role_files():
    assert set(PAPERS) >= {"codebook", "dmd2", "ilf", "o3", "pretrain", "send", "stability", "template"}
    assert not [p.name for p in METHODS.glob("*.py") if p.name != "__init__.py"], "a paper is a package"
    for paper in PAPERS:
        files = {p.name for p in (METHODS / paper).glob("*.py")}
        assert ROLE_FILES <= files, f"methods/{paper} lacks {sorted(ROLE_FILES - files)}"
        module = importlib.import_module(f"athanor.methods.{paper}")
        assert isinstance(module.PAPER, Paper) and "PAPER" in module.__all__, paper
        stages = importlib.import_module(f"athanor.methods.{paper}.stages")
        assert stages.PAPER is module.PAPER, f"{paper}: PAPER is declared in stages.py"


def test_no_code_under_methods_touches_the_accelerator():
    uses = [f"{p.relative_to(ROOT)}:{i}" for p in METHODS.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if "accelerator" in line]
    assert not uses, f"methods use the engine's API, not engine.accelerator: {uses}"


def test_no_paper_imports_another():
    for name, targets in GRAPH.items():
        if name.startswith("athanor.methods."):
            paper = name.split(".")[2]
            others = sorted(t for t in targets if t.startswith("athanor.methods.") and t.split(".")[2] != paper)
            assert not others, f"{name} imports {others}: move what two papers share to athanor.parts"


def test_shared_parts_import_no_paper():
    for name, targets in GRAPH.items():
        if name.startswith("athanor.parts"):
            assert not [t for t in targets if t.startswith("athanor.methods")], name


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (a list of modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_walker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert "athanor.parts.lm" in GRAPH["athanor.methods.send.stages"]  # `from ...parts.lm import x`
    assert "athanor.methods.codebook.analysis" in GRAPH["athanor.methods.codebook.report"]  # `from . import analysis`


def test_no_import_cycle_in_athanor():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_inside_functions_under_methods_and_parts_say_why():
    """A paper's imports sit at the top; one inside a function is for a heavy dependency few runs need,
    and its line says so (a comment)."""
    unexplained = []
    for path in [*METHODS.rglob("*.py"), *(LIB / "parts").rglob("*.py")]:
        lines = path.read_text().splitlines()
        for fn in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                unexplained += [f"{path.relative_to(ROOT)}:{node.lineno}" for node in ast.walk(fn)
                                if isinstance(node, (ast.Import, ast.ImportFrom)) and "#" not in lines[node.lineno - 1]]
    assert not unexplained, f"imports inside functions without a reason: {sorted(set(unexplained))}"


def test_no_file_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in [*LIB.rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]
            if (n := len(p.read_text().splitlines())) > 500}
    assert not long, f"files over 500 lines: {long}"


def long_functions(path: Path, limit: int = 60) -> dict[str, int]:
    return {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > limit}


def test_no_engine_function_over_60_lines():
    assert not long_functions(LIB / "engine" / "engine.py")
