"""The import rules of docs/architecture.md, checked on the code: layers only import downwards,
the runtime never imports torch or the training package, and there are no import cycles."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the installed names of the repository's folders (pyproject.toml's package-dir)
FOLDERS = {"cxr_edge": "cxr_edge", "engines": "cxr_edge.engines", "train": "cxr_edge.train"}

# docs/architecture.md, "Layers": a module may import its own layer and the ones below it.
LAYERS = [
    ("foundations", ["cxr_edge", "cxr_edge.errors", "cxr_edge.limits", "cxr_edge.labels", "cxr_edge.atomic",
                     "cxr_edge.operating_points", "cxr_edge.findings", "cxr_edge.metrics", "cxr_edge.preprocess", "cxr_edge.outputs"]),
    ("parts", ["cxr_edge.sources", "cxr_edge.codestream", "cxr_edge.dicom_header", "cxr_edge.dicom_decoders",
               "cxr_edge.dicom_display", "cxr_edge.decode", "cxr_edge.prepare",
               "cxr_edge.manifest", "cxr_edge.calibration", "cxr_edge.backends*",
               "cxr_edge.records", "cxr_edge.sr_source", "cxr_edge.sr_codes", "cxr_edge.sr_highdicom",
               "cxr_edge.dicom_splice", "cxr_edge.sr_template", "cxr_edge.sr", "cxr_edge.heatmaps",
               "cxr_edge.heatmap_dicom", "cxr_edge.findings_table", "cxr_edge.path_lists"]),
    ("stages", ["cxr_edge.workers", "cxr_edge.sinks", "cxr_edge.heatmap_sink", "cxr_edge.resume"]),
    ("pipeline", ["cxr_edge.pipeline", "cxr_edge.labeled"]),
    ("applications", ["cxr_edge.infer_run", "cxr_edge.backfill", "cxr_edge.recalibrate", "cxr_edge.daemon*", "cxr_edge.bench*",
                      "cxr_edge.engines*"]),
    ("interfaces", ["cxr_edge.cli_options", "cxr_edge.console", "cxr_edge.cli", "cxr_edge.__main__",
                    "cxr_edge.train*"]),
]
TORCH = ("torch", "torchvision", "timm", "safetensors")
# The optional torch runner and the bench's production shapes (the gpu-torch extra): imported only
# when asked for (`--backend torch`, `bench --shape`), and they import torch inside functions.
TORCH_OPTIONAL = {"cxr_edge.backends.torch_runner", "cxr_edge.backends.torch_model", "cxr_edge.bench.shapes"}


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in (REPO / folder).rglob("*.py"):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            found[name] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every module (ours or not) that `name` imports, at any depth of its code."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in MODULES)
    return found


def _imported_at_load(name: str, path: Path) -> set[str]:
    """What importing `name` imports at once: imports outside function bodies."""
    class Visitor(ast.NodeVisitor):
        def __init__(self):
            self.found = set()

        def visit_FunctionDef(self, node):  # runs later, if ever
            pass

        visit_AsyncFunctionDef = visit_FunctionDef

        def visit_Import(self, node):
            self.found.update(alias.name for alias in node.names)

        def visit_ImportFrom(self, node):
            package = name if path.name == "__init__.py" else name.rpartition(".")[0]
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            self.found.add(target)
            self.found.update(f"{target}.{alias.name}" for alias in node.names)

    visitor = Visitor()
    visitor.visit(ast.parse(path.read_text()))
    return visitor.found


def _layer(module: str) -> int:
    for rank, (_, patterns) in enumerate(LAYERS):
        for pattern in patterns:
            if module == pattern or (pattern.endswith("*") and (module == pattern[:-1] or module.startswith(pattern[:-1] + "."))):
                return rank
    raise AssertionError(f"{module} is in no layer of docs/architecture.md")


def test_every_module_has_a_layer():
    for module in MODULES:
        _layer(module)


def test_imports_only_go_down_the_layers():
    upward = []
    for name, path in MODULES.items():
        for target in _imports(name, path):
            if target in MODULES and target != name and _layer(target) > _layer(name):
                upward.append(f"{name} ({LAYERS[_layer(name)][0]}) imports {target} ({LAYERS[_layer(target)][0]})")
    assert not upward, "\n".join(upward)


def test_the_runtime_never_imports_torch_or_the_training_package():
    offending = []
    for name, path in MODULES.items():
        if name.startswith("cxr_edge.train"):
            continue
        for target in _imports(name, path):
            if target.startswith(("cxr_edge.train", "train")):
                offending.append(f"{name} imports {target}")
            elif target.split(".")[0] in TORCH and name not in TORCH_OPTIONAL:
                offending.append(f"{name} imports {target}")
        for target in _imported_at_load(name, path):  # the optional modules: nothing loads them, or torch, at import
            if target in TORCH_OPTIONAL or (name in TORCH_OPTIONAL and target.split(".")[0] in TORCH):
                offending.append(f"{name} imports {target} when it is imported")
    assert not offending, "\n".join(offending)


def test_only_the_backfill_imports_ray():
    """`infer`, `watch` and `bench` never pay for Ray (DESIGN.md: optional runners and engines are
    imported when asked for); the table and path lists use pyarrow, which the ray extra brings."""
    offending = []
    for name, path in MODULES.items():
        for target in _imports(name, path):
            top = target.split(".")[0]
            if top == "ray" and name != "cxr_edge.backfill":
                offending.append(f"{name} imports {target}")
            if top == "pyarrow" and name not in ("cxr_edge.backfill", "cxr_edge.findings_table", "cxr_edge.path_lists"):
                offending.append(f"{name} imports {target}")
            if target == "cxr_edge.backfill" and name != "cxr_edge.cli":
                offending.append(f"{name} imports {target}")
    assert not offending, "\n".join(offending)


def test_no_import_cycles():
    graph = {name: {t for t in _imports(name, path) if t in MODULES and t != name} for name, path in MODULES.items()}
    # a package importing its own submodules (backends/__init__ -> backends.base) is not a cycle
    graph = {name: {t for t in targets if not t.startswith(name + ".")} for name, targets in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(trail[trail.index(target):] + [target]) if target in trail else target)
            elif target not in state:
                visit(target, trail + [target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_the_rules_fail_on_an_upward_import(tmp_path):
    """The checker itself: a foundation module importing the pipeline is caught."""
    bad = tmp_path / "errors.py"
    bad.write_text("from .pipeline import Pipeline\n")
    assert "cxr_edge.pipeline" in _imports("cxr_edge.errors", bad)
    assert _layer("cxr_edge.pipeline") > _layer("cxr_edge.errors")


def test_the_rules_fail_on_torch_imported_at_load(tmp_path):
    """The checker itself: an optional module importing torch at the top, or a runtime module
    importing the torch runner at the top, is caught; inside a function it is not."""
    top = tmp_path / "shapes.py"
    top.write_text("import torch\n")
    assert "torch" in _imported_at_load("cxr_edge.bench.shapes", top)
    lazy = tmp_path / "lazy.py"
    lazy.write_text("def f():\n    from .torch_runner import cuda_problem\n    import torch\n")
    assert _imported_at_load("cxr_edge.backends.x", lazy) == set()
    eager = tmp_path / "eager.py"
    eager.write_text("from .torch_runner import cuda_problem\n")
    assert "cxr_edge.backends.torch_runner" in _imported_at_load("cxr_edge.backends.x", eager)
