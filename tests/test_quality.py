"""Lint and type checks run as part of the suite."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff():
    out = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "src", "tests", "bench", "scripts", "support", "examples"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_format():
    paths = ["src", "tests", "bench", "scripts", "support", "examples"]
    out = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", *paths], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy():
    # pyproject.toml names the files: src/activault, bench, support
    out = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """Every activault module -> the activault modules it imports (anywhere in the file), and
    every `from x import _private` across modules."""
    import ast

    src = ROOT / "src"
    graph: dict[str, set[str]] = {}
    private: list[str] = []
    modules = {
        ".".join(p.relative_to(src).with_suffix("").parts).removesuffix(".__init__"): p
        for p in (src / "activault").rglob("*.py")
    }
    for name, path in modules.items():
        graph[name] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for a in node.names:  # `from pkg import module` is an edge to the module only
                    sub = f"{node.module}.{a.name}"
                    target = sub if sub in modules else node.module
                    if target in modules and target != name:
                        graph[name].add(target)
                private += [
                    f"{name}: from {node.module} import {a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__") and node.module.startswith("activault")
                ]
            elif isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names if a.name in modules and a.name != name}
    return graph, private


def test_no_import_cycles_and_no_private_imports():
    graph, private = _import_graph()
    assert not private, private
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


# Subpackages are nodes of their own; the top-level modules (config, errors, dtypes, units, background,
# version) are "core"; `activault` is the package's public __init__, `cli` the command line.
PACKAGES = ("storage", "vault", "collection", "reading", "tools", "integrations", "evaluation", "cli", "__main__")


def _package(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "activault"
    return parts[1] if parts[1] in PACKAGES else "core"


def package_dependencies() -> dict[str, set[str]]:
    """Which package imports which, derived from every import in src/activault."""
    graph, _ = _import_graph()
    deps: dict[str, set[str]] = {}
    for module, targets in graph.items():
        deps.setdefault(_package(module), set())
        deps[_package(module)] |= {_package(t) for t in targets} - {_package(module)}
    return deps


def documented_dependencies() -> dict[str, set[str]]:
    """The `package -> packages` lines of docs/internals.md's dependency block."""
    text = (ROOT / "docs" / "internals.md").read_text()
    block = text.split("<!-- package-dependencies -->", 2)
    assert len(block) == 3, "docs/internals.md has no <!-- package-dependencies --> block"
    deps: dict[str, set[str]] = {}
    for line in block[1].splitlines():
        if "->" in line:
            name, _, targets = line.strip().partition("->")
            deps[name.strip()] = {t.strip() for t in targets.split(",") if t.strip() and t.strip() != "-"}
    return deps


def test_internals_doc_shows_every_package_dependency() -> None:
    """docs/internals.md's picture of the packages is the one the imports draw, edge for edge."""
    assert documented_dependencies() == package_dependencies()


def test_run_records_have_one_owner() -> None:
    """Only vault/ writes a record's text to a store or spells out a run format version (the SAELens
    sidecar's own version aside): records are written one way, so equal records are equal bytes."""
    src = ROOT / "src" / "activault"
    offenders = []
    for path in src.rglob("*.py"):
        rel = path.relative_to(src).as_posix()
        if rel.startswith(("vault/", "storage/")):
            continue
        text = path.read_text()
        if ".put_text(" in text:
            offenders.append(f"{rel}: put_text")
        if re.search(r"format_version\W{1,4}\d", text) and rel != "integrations/saelens_cache/exporter.py":
            offenders.append(f"{rel}: format_version")
    assert not offenders, offenders


def test_internals_doc_names_every_module() -> None:
    """Every module of src/activault has its row in docs/internals.md (`a/{b,c}.py` names both)."""
    text = (ROOT / "docs" / "internals.md").read_text()
    named = set(re.findall(r"`([\w/]+\.py)`", text))
    for stem, alts, ext in re.findall(r"`([\w/]*)\{([\w,]+)\}(\.py)`", text):
        named |= {f"{stem}{a}{ext}" for a in alts.split(",")}
    src = ROOT / "src" / "activault"
    modules = {p.relative_to(src).as_posix() for p in src.rglob("*.py")} - {"__main__.py", "__init__.py"}
    missing = sorted(m for m in modules if m not in named and not m.endswith("/__init__.py"))
    assert not missing, f"docs/internals.md does not name {missing}"


def test_every_module_has_its_test_file() -> None:
    """src/activault/<pkg>/<name>.py is tested in tests/<pkg>/test_<name>.py (a top-level module in
    tests/test_<name>.py), nested packages alike. A package's __init__.py is tested under the package's
    own name (tests/storage/test_storage.py) or by the tests of what it exports."""
    src = ROOT / "src" / "activault"
    missing = []
    for path in sorted(src.rglob("*.py")):
        if path.name in ("__init__.py", "__main__.py"):
            continue
        rel = path.relative_to(src)
        test = ROOT / "tests" / rel.parent / f"test_{rel.name}"
        if not test.is_file():
            missing.append(f"{rel.as_posix()} -> {test.relative_to(ROOT).as_posix()}")
    assert not missing, "modules without their test file:\n" + "\n".join(missing)


def test_test_files_have_distinct_names() -> None:
    """Test folders without an __init__.py import their files by basename (rootdir imports), so
    pytest refuses two of one name in such folders: a module name repeated across packages needs
    its test folder made a package (as tests/tools/launch is) or another name."""
    seen: dict[str, list[str]] = {}
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        if not (path.parent / "__init__.py").exists():
            seen.setdefault(path.name, []).append(path.relative_to(ROOT).as_posix())
    twice = {name: paths for name, paths in seen.items() if len(paths) > 1}
    assert not twice, f"test files sharing a name (rename a module or its test): {twice}"
