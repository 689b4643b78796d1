"""The metadata says which Pythons are supported, only --tool=ray needs ray (the install drops RecBole's pin), and the
package's modules import each other without cycles and never touch sys.argv."""

import ast
import configparser
import os
import subprocess
import sys

import pytest
from packaging.specifiers import SpecifierSet

from helpers import REPO


# What README's Set-up promises; .ci/run dry-runs the install on every classified version the machine has.
PROMISED = ["3.10", "3.11", "3.12", "3.13"]


def test_python_requires_admits_exactly_the_classified_versions():
    metadata = configparser.ConfigParser()
    metadata.read(os.path.join(REPO, "setup.cfg"))
    classified = [
        line.rsplit("::", 1)[1].strip() for line in metadata["metadata"]["classifiers"].splitlines() if line.startswith("Programming Language :: Python :: 3.")
    ]
    requires = SpecifierSet(metadata["options"]["python_requires"])
    admitted = [f"3.{minor}" for minor in range(0, 30) if f"3.{minor}.0" in requires]
    assert classified == admitted and set(PROMISED) <= set(classified)


@pytest.mark.spawns
@pytest.mark.slow
def test_no_entry_point_or_module_imports_ray():
    """RecBole 1.2.1 pins ray<=2.6.3 (no wheels past 3.11); pyproject.toml's override leaves ray out
    unless the ``ray`` extra asks for it, and only a ``--tool=ray`` search imports it (ray_search.py).

    Besides, ``recbole.quick_start`` imports ray, so importing every module of the package, both scripts and
    hyperopt (which a search loads) must leave it out of ``sys.modules``.
    """
    probe = (
        "import importlib, pkgutil, sys\n"
        "import recbole_t2diff, hyperopt, run_recbole, run_hyper\n"
        "for module in pkgutil.walk_packages(recbole_t2diff.__path__, 'recbole_t2diff.'):\n"
        "    importlib.import_module(module.name)\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] == 'ray' or name.startswith('recbole.quick_start')))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def package_modules():
    """{dotted name: path} of every module of the package (a package by its ``__init__.py``)."""
    modules = {}
    for folder, _, files in os.walk(os.path.join(REPO, "recbole_t2diff")):
        for file in sorted(files):
            if file.endswith(".py"):
                path = os.path.join(folder, file)
                modules[os.path.relpath(path, REPO)[:-3].replace(os.sep, ".").removesuffix(".__init__")] = path
    return modules


def package_import_graph():
    """{module: modules of the package it imports}, from every import statement, at module level or in a
    function (an import moved into a function to break a cycle is still an edge of it)."""
    modules = package_modules()
    graph = {}
    for name, path in modules.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package, one folder up per extra dot
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                # `from package import module` imports the module; `from module import name`, the module
                imported |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names}
        graph[name] = sorted(imported & set(modules) - {name})
    return graph


def import_cycles(graph):
    """One cycle (a list of modules, first repeated last) per strongly connected group of ``graph``'s modules."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def connect(node):  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = set()
            while node not in group:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    cycles = []
    for group in groups:
        start = min(group)
        path, seen = [start], {start}
        while True:  # walk inside the group until a module repeats: every module in it has an edge in it
            following = next(t for t in graph[path[-1]] if t in group and (t == start or t not in seen))
            path.append(following)
            if following == start:
                break
            seen.add(following)
        cycles.append(path)
    return sorted(cycles)


def test_the_package_import_graph_has_no_cycles():
    graph = package_import_graph()
    assert {"recbole_t2diff.config", "recbole_t2diff.settings", "recbole_t2diff.model.t2diff"} <= set(graph)
    assert "recbole_t2diff.settings" in graph["recbole_t2diff.config"]
    assert import_cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c", "a"]]  # the detector itself
    assert import_cycles(graph) == [], "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in import_cycles(graph))


def test_nothing_in_the_package_reads_or_writes_sys_argv():
    """A script hands its command line to the Config (``argv=``): no module reaches for the process's own."""
    for name, path in package_modules().items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        uses = [
            node.lineno
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr == "argv" and isinstance(node.value, ast.Name) and node.value.id == "sys"
        ]
        assert not uses, f"{name} uses sys.argv at line(s) {uses}"


def test_every_module_of_the_package_and_the_benchmarks_stays_under_400_lines():
    """A module that outgrows 400 lines holds more than one thing: split it by what its parts are."""
    modules = [*package_modules().values(), *(os.path.join(REPO, "benchmarks", f) for f in os.listdir(os.path.join(REPO, "benchmarks")) if f.endswith(".py"))]
    assert len(modules) > 30
    long = {os.path.relpath(path, REPO): n for path in modules if (n := sum(1 for _ in open(path, encoding="utf-8"))) >= 400}
    assert long == {}
