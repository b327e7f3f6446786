"""The package's shape (docs/architecture.md): no import cycle, no stage importing another stage,
nothing below the stages importing one, the CLI importing stages lazily, and modules of a readable size.

Imports are read statically (``ast``), including those inside functions, so a lazy import cannot hide
a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "medssl_cli"
MAX_LINES = 420  # "no module over ~400 lines"
ORCHESTRATOR = "medssl_cli.stages.demo"  # runs the whole pipeline: the one module that calls stages


def _modules(root: Path = PACKAGE) -> dict[str, Path]:
    out = {}
    for p in root.rglob("*.py"):
        parts = p.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def imports(modules: dict[str, Path]) -> dict[str, dict[str, bool]]:
    """{module: {imported module: imported at module level?}} for imports inside the package."""
    graph: dict[str, dict[str, bool]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = {id(n) for n in tree.body} | {id(c) for n in tree.body if isinstance(n, ast.If) for c in n.body}
        deps: dict[str, bool] = {}
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                if t in modules and t != name:
                    deps[t] = deps.get(t, False) or id(node) in top
        graph[name] = deps
    return graph


def cycles(graph: dict[str, dict[str, bool]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def _stage(module: str) -> str | None:
    """``medssl_cli.stages.finetune.cell`` -> ``finetune``; None outside stages/."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "stages" else None


def stage_violations(graph: dict[str, dict[str, bool]]) -> list[str]:
    bad = []
    for mod, deps in graph.items():
        mine = _stage(mod)
        for dep in deps:
            theirs = _stage(dep)
            if theirs is None or theirs == mine or mod == ORCHESTRATOR:
                continue
            if mine is not None:
                bad.append(f"{mod} imports another stage: {dep}")
            elif not mod.startswith("medssl_cli.commands"):
                bad.append(f"{mod} (below the stages) imports a stage: {dep}")
            elif deps[dep]:
                bad.append(f"{mod} imports {dep} at module level (the CLI imports stages lazily)")
    return bad


def test_no_import_cycle() -> None:
    assert cycles(imports(_modules())) == []


def test_no_stage_imports_another_stage() -> None:
    assert stage_violations(imports(_modules())) == []


def test_modules_stay_readable() -> None:
    long = {n: len(p.read_text().splitlines()) for n, p in _modules().items()}
    assert {n: k for n, k in long.items() if k > MAX_LINES} == {}


def test_the_checks_see_what_they_are_meant_to(tmp_path: Path) -> None:
    """Planted: a cycle through a lazy import, a stage importing a sibling, a module below the stages
    importing one, and a command importing a stage at module level."""
    pkg = tmp_path / "medssl_cli"
    files = {
        "__init__.py": "",
        "a.py": "def f():\n    from medssl_cli import b\n",
        "b.py": "from medssl_cli import a\n",
        "stages/__init__.py": "",
        "stages/one.py": "from medssl_cli.stages import two\n",
        "stages/two.py": "",
        "low.py": "from medssl_cli.stages.two import x\n",
        "commands/__init__.py": "",
        "commands/c.py": (
            "from medssl_cli.stages import two\n\ndef g():\n    from medssl_cli.stages import one\n"
        ),
    }
    for rel, text in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    graph = imports(_modules(pkg))
    assert cycles(graph) == [["medssl_cli.a", "medssl_cli.b"]]
    assert sorted(stage_violations(graph)) == [
        "medssl_cli.commands.c imports medssl_cli.stages.two at module level (the CLI imports stages lazily)",
        "medssl_cli.low (below the stages) imports a stage: medssl_cli.stages.two",
        "medssl_cli.stages.one imports another stage: medssl_cli.stages.two",
    ]
