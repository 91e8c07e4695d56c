"""The project's structure holds: no import cycle anywhere, imports point one way, the core and
the DIMSE layer import nothing above them, the pull's DICOMweb path speaks no DIMSE, and every
user of `dicom` gets pydicom's safe settings.

Every import counts, at the top of a module or inside a function: a lazy import is still a
dependency. The rules are the README's.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gateway", "core", "processing", "deid", "storage", "dicom", "harness")

# Which of our packages each package may import (besides itself). README: "Layout".
ALLOWED = {
    "dicom": set(),
    "deid": {"dicom"},
    "storage": {"dicom"},
    "core": {"deid", "storage", "dicom"},
    "processing": {"core", "storage", "dicom"},
    "gateway": {"core", "processing", "deid", "storage", "dicom"},
    "harness": {"gateway", "core", "processing", "deid", "storage", "dicom"},
}
# What ships: every package but the test harness, which none of them imports (README: "Layout").
SHIPPED = tuple(p for p in PACKAGES if p != "harness")
EXCEPTIONS: set[tuple[str, str]] = set()


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """{module: modules of ours it imports}, every import statement included."""
    files = {module_name(p, root): p for pkg in packages for p in (root / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package this module is in
                    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    pkg = pkg[: len(pkg) - node.level + 1]
                    base = ".".join([*pkg, base] if base else pkg)
                names = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for name in names:
                # The longest prefix that is one of our modules.
                parts = name.split(".")
                while parts and ".".join(parts) not in files:
                    parts.pop()
                if parts and ".".join(parts) != mod:
                    deps.add(".".join(parts))
        graph[mod] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def parent_package_edges(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Drop edges to a module's own enclosing packages: importing `a.b.c` runs `a/__init__`,
    which may import `a.b.c` back; that is how packages re-export, not a cycle of design."""
    return {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}


def violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for mod, deps in graph.items():
        top = mod.split(".")[0]
        for dep in deps:
            dtop = dep.split(".")[0]
            if dtop != top and dtop not in ALLOWED[top] and (mod, dep) not in EXCEPTIONS:
                out.append(f"{mod} imports {dep}")
            own = dep.startswith("gateway.dimse") or dep.split(".")[0] == "dicom"
            if mod.startswith("gateway.dimse") and not own:
                out.append(f"{mod} (the policy-free DIMSE layer) imports {dep}")
    return sorted(out)


def reached(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module `start` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for dep in graph.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def dimse_on_web_path(graph: dict[str, set[str]]) -> list[str]:
    """DIMSE modules the pull's DICOMweb retriever reaches (its receiver and types included)."""
    web = reached(graph, "gateway.pull.dicomweb")
    return sorted(m for m in web if m.startswith("gateway.dimse"))


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return parent_package_edges(import_graph(ROOT, PACKAGES))


def test_no_import_cycle_anywhere(graph):
    assert len(graph) > 40  # the whole tree was read
    assert cycles(graph) == []


def test_imports_point_one_way(graph):
    assert violations(graph) == []


def test_the_dicomweb_pull_path_imports_nothing_from_dimse(graph):
    web = reached(graph, "gateway.pull.dicomweb")
    assert {"gateway.pull.receiver", "gateway.pull.source", "dicom.received"} <= web
    assert dimse_on_web_path(graph) == []
    # Positive control: the receiver importing a DIMSE status again is caught, however deep.
    bad = {m: set(deps) for m, deps in graph.items()}
    bad["gateway.pull.layout"].add("gateway.dimse.common")
    assert dimse_on_web_path(bad) == ["gateway.dimse.common"]


def test_the_checks_catch_a_cycle_and_a_wrong_way_import(tmp_path):
    """Positive control: a small tree with both faults, in every import form."""
    (tmp_path / "dicom").mkdir()
    (tmp_path / "storage").mkdir()
    (tmp_path / "dicom" / "__init__.py").write_text("")
    (tmp_path / "storage" / "__init__.py").write_text("")
    (tmp_path / "dicom" / "a.py").write_text("def f():\n    from dicom import b\n")
    (tmp_path / "dicom" / "b.py").write_text("from . import c\n")
    (tmp_path / "dicom" / "c.py").write_text("import dicom.a\nimport storage.s\n")
    (tmp_path / "storage" / "s.py").write_text("x = 1\n")
    g = parent_package_edges(import_graph(tmp_path, ("dicom", "storage")))
    assert cycles(g) == [["dicom.a", "dicom.b", "dicom.c"]]
    assert violations(g) == ["dicom.c imports storage.s"]


def harness_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports of the harness by shipped modules (lazy ones included)."""
    return sorted(
        f"{mod} imports {dep}"
        for mod, deps in graph.items()
        if mod.split(".")[0] in SHIPPED
        for dep in deps
        if dep.split(".")[0] == "harness"
    )


def harness_names(root: Path, packages: tuple[str, ...]) -> dict[str, list[str]]:
    """Strings naming a harness module in shipped code: what a module loaded by name uses."""
    found: dict[str, list[str]] = {}
    for pkg in packages:
        for path in (root / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                value = node.value if isinstance(node, ast.Constant) else None
                if isinstance(value, str) and (value == "harness" or value.startswith("harness.")):
                    found.setdefault(module_name(path, root), []).append(value)
    return found


def test_no_shipped_package_imports_the_harness(graph):
    assert harness_imports(graph) == []
    # The one module loaded by name: `sphere demo`, which says when there is no harness.
    assert harness_names(ROOT, SHIPPED) == {"gateway.cli": ["harness.demo"]}


def test_the_harness_check_catches_an_import_and_a_lazy_one(tmp_path):
    """Positive control: shipped modules importing the harness, at the top and in a function."""
    for pkg in ("storage", "harness"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "harness" / "seaweed.py").write_text("x = 1\n")
    (tmp_path / "storage" / "a.py").write_text("from harness import seaweed\n")
    (tmp_path / "storage" / "b.py").write_text("def f():\n    import harness.seaweed\n")
    (tmp_path / "storage" / "c.py").write_text("NAME = 'harness.seaweed'\n")
    g = parent_package_edges(import_graph(tmp_path, ("storage", "harness")))
    assert {line.split()[0] for line in harness_imports(g)} == {"storage.a", "storage.b"}
    assert harness_names(tmp_path, ("storage",)) == {"storage.c": ["harness.seaweed"]}


def test_sphere_demo_without_the_harness_says_it_needs_a_development_install(tmp_path):
    code = (
        "import sys\n"
        "sys.modules['harness'] = None  # as an install without the checkout's harness/\n"
        "from gateway.cli import app\n"
        "app(['demo', '--workdir', sys.argv[1]])\n"
    )
    env = {**os.environ, "SPHERE_HOME": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    assert out.returncode == 2, out.stderr
    assert "needs a development install" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "demo").exists()


def test_the_core_imports_no_network_stack_web_framework_or_torch():
    code = (
        "import sys, core, core.projects\n"
        "bad = sorted({m.split('.')[0] for m in sys.modules} & {'pynetdicom', 'gateway',"
        " 'fastapi', 'starlette', 'torch', 'monai', 'harness'})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
    # Positive control: the same probe sees the DIMSE stack where it is imported.
    probe = code.replace("core.projects", "gateway.pull")
    seen = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert "pynetdicom" in seen.stdout


@pytest.mark.parametrize("package", ["dicom", "deid.engine", "storage.series", "processing"])
def test_every_user_of_dicom_gets_pydicoms_safe_settings(package):
    code = (
        "import pydicom.config as c\n"
        "before = c.settings.reading_validation_mode\n"
        f"import {package}\n"
        "s = c.settings\n"
        "print(before != c.IGNORE, s.reading_validation_mode == c.IGNORE,"
        " s.writing_validation_mode == c.IGNORE)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    # pydicom alone does not ignore (the control), and after the import it does.
    assert out.stdout.split() == ["True", "True", "True"], out.stderr
