"""The house rules of the code's shape: dependencies flow calibration <- exporters <- edgecnn; no import
cycle between modules; inside edgecnn no package imports one that imports it; only runner modules open
inference sessions; options are typed (no string-keyed option bag)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"calibration": 0, "exporters": 1, "edgecnn": 2}


def _modules():
    out = {}
    for top in LAYERS:
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            if is_pkg:
                parts = parts[:-1]
            out[".".join(parts)] = (path, is_pkg)
    return out


def _imports(name: str, path: Path, is_pkg: bool, known) -> set:
    """Every project module ``name`` imports, at module level or inside functions."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if is_pkg else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rsplit(".", 1)[0] if "." in t else ""
            if t and t != name:
                found.add(t)
    return found


def _graph():
    mods = _modules()
    return {name: _imports(name, path, is_pkg, mods) for name, (path, is_pkg) in mods.items()}


def test_no_import_from_a_lower_layer_to_a_higher_one():
    wrong = [f"{a} imports {b}" for a, deps in _graph().items() for b in deps
             if LAYERS[b.split(".")[0]] > LAYERS[a.split(".")[0]]]
    assert wrong == []


def test_no_import_cycle_between_modules():
    graph = _graph()
    # a package's __init__ importing its own submodules is how packages expose names, not a cycle
    edges = {a: {b for b in deps if not a.startswith(b + ".") and not b.startswith(a + ".")} for a, deps in graph.items()}
    seen, stack, cycles = set(), [], []

    def visit(n):
        if n in stack:
            cycles.append(stack[stack.index(n):] + [n])
            return
        if n in seen:
            return
        seen.add(n)
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            visit(m)
        stack.pop()

    for n in sorted(edges):
        visit(n)
    assert cycles == [], cycles[:3]


def test_inside_edgecnn_no_package_imports_one_that_imports_it():
    graph = _graph()

    def pkg(mod):
        parts = mod.split(".")
        return ".".join(parts[:2]) if len(parts) > 1 else mod

    packages = {}
    for a, deps in graph.items():
        if a.startswith("edgecnn."):
            for b in deps:
                if b.startswith("edgecnn.") and pkg(a) != pkg(b):
                    packages.setdefault(pkg(a), set()).add(pkg(b))
    mutual = sorted({tuple(sorted((a, b))) for a, bs in packages.items() for b in bs if a in packages.get(b, ())})
    assert mutual == []


def test_only_runner_modules_open_an_inference_session():
    opening = re.compile(r"InferenceSession\(|ct\.models\.MLModel\(|deserialize_cuda_engine\(")
    allowed = {"exporters/onnx/runner.py", "exporters/coreml/runner.py", "exporters/tensorrt/device.py"}
    found = {str(p.relative_to(ROOT)) for top in LAYERS for p in (ROOT / top).rglob("*.py")
             if opening.search(p.read_text())}
    assert found <= allowed, found - allowed


def test_no_string_keyed_option_bag():
    bag = re.compile(r"\bextra\.get\(|options\.extra\b|ExportOptions\.extra")
    found = [str(p.relative_to(ROOT)) for top in LAYERS for p in (ROOT / top).rglob("*.py") if bag.search(p.read_text())]
    assert found == []
