"""The layout's promises: no import cycle among the project's modules; every module stays small and says its
job at its top; library code (data/, engine/, model/) never sees the raw config; test modules never import
each other."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("data", "engine", "model", "settings", "utils", "tools", "bench", "tests")
MAX_LINES = 450
LIBRARY = ("data.", "engine.", "model.")


def project_modules():
    """{dotted name: path} of every project .py file."""
    found = {}
    for top in os.listdir(ROOT):
        path = os.path.join(ROOT, top)
        if top.endswith(".py"):
            found[top[:-3]] = path
        elif top in PACKAGES:
            for folder, _, names in os.walk(path):
                for name in names:
                    if name.endswith(".py"):
                        rel = os.path.relpath(os.path.join(folder, name), ROOT)[:-3].replace(os.sep, ".")
                        found[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(folder, name)
    return found


def imports_of(path, name, modules):
    """Project modules imported anywhere in `path` (module level or inside functions)."""
    tree = ast.parse(open(path).read())
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    edges = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            candidates = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for c in candidates:
            while c and c not in modules:
                c = c.rpartition(".")[0]
            if c and c != name:
                edges.add(c)
    return edges


def find_cycle(graph):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_find_cycle_finds_a_cycle_and_accepts_a_chain():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_among_the_project_modules():
    modules = project_modules()
    graph = {name: imports_of(path, name, modules) for name, path in modules.items()}
    assert "data.buffer.producer" in graph and "data.transforms.scale_crop" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_transforms_import_neither_sources_nor_buffer():
    modules = project_modules()
    for name, path in modules.items():
        if name.startswith("data.transforms"):
            bad = {m for m in imports_of(path, name, modules) if m.startswith(("data.buffer", "data.sources"))}
            assert not bad, f"{name} imports {sorted(bad)}: transforms are pure functions of (image, draws)"


def test_test_modules_never_import_each_other():
    modules = project_modules()
    for name, path in modules.items():
        if name.startswith("tests.test_"):
            bad = {m for m in imports_of(path, name, modules) if m.startswith("tests.test_")}
            assert not bad, f"{name} imports {sorted(bad)}; move shared helpers to tests/helpers.py"


def test_library_code_never_imports_the_config_loader_or_the_settings_resolver():
    """data/, engine/ and model/ receive resolved settings (or plain values) from the scripts."""
    modules = project_modules()
    for name, path in modules.items():
        if name.startswith(LIBRARY) or name in ("data", "engine", "model"):
            bad = {m for m in imports_of(path, name, modules) if m == "utils.config" or m.startswith("settings")}
            assert not bad, f"{name} imports {sorted(bad)}; take the settings (or plain values) as arguments"


@pytest.mark.parametrize("name", sorted(project_modules()))
def test_each_module_is_small_and_says_its_job_first(name):
    path = project_modules()[name]
    source = open(path).read()
    assert len(source.splitlines()) <= MAX_LINES, f"{path} has grown past {MAX_LINES} lines: split it"
    docstring = ast.get_docstring(ast.parse(source))
    assert docstring and len(docstring.split()) >= 5, f"{path} does not say its job in its opening docstring"
