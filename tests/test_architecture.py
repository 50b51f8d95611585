"""The layering rules of README "Architecture", checked on the import statements themselves.

* compute (everything in ``riverscape`` but the command line and the report) never imports
  ``riverscape.report`` or ``riverscape.cli``;
* ``riverscape.quant`` never imports ``riverscape.landscape`` (curvature it needs comes from
  ``riverscape.linalg``, which knows no model);
* ``riverscape.linalg`` imports no other riverscape module but ``errors``;
* the command line reaches the library by plain imports (no ``importlib`` indirection);
* a module-level constant is defined in one module only.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "riverscape"
FRONT = {"cli", "__main__", "_signals"}  # the command line and its entry point


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        dotted = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[dotted.removesuffix(".__init__")] = ast.parse(path.read_text(), str(path))
    return out


def _imports(name: str, tree: ast.Module, is_package: bool) -> set[str]:
    """Absolute names of every riverscape module ``name`` imports (at any depth of the file)."""
    here = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found |= {f"{module}.{a.name}" for a in node.names}
    return {m for m in found if m.startswith("riverscape")}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    packages = {p for p in modules if (PACKAGE.parent / p.replace(".", "/") / "__init__.py").exists()}
    return {name: _imports(name, tree, name in packages) for name, tree in modules.items()}


def _layer(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_compute_never_imports_the_report_or_the_cli():
    offenders = {
        name: sorted(m for m in imported if _layer(m) in ("report", "cli"))
        for name, imported in _graph().items()
        if _layer(name) not in FRONT | {"report", ""}
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_quant_never_imports_landscape():
    offenders = {name: sorted(m for m in imported if _layer(m) == "landscape") for name, imported in _graph().items() if _layer(name) == "quant"}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_linalg_knows_no_model():
    offenders = {
        name: sorted(m for m in imported if _layer(m) not in ("linalg", "errors", ""))
        for name, imported in _graph().items()
        if _layer(name) == "linalg"
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_cli_imports_the_library_directly():
    source = (PACKAGE / "cli.py").read_text()
    assert "importlib.import_module(f\"{__package__}.analysis\")" not in source
    tree = ast.parse(source)
    dynamic = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "import_module"]
    for call in dynamic:  # only the pre-import of the command's modules while signals are held
        assert isinstance(call.args[0], ast.Name) and call.args[0].id == "module"


def test_module_constants_are_defined_once():
    definitions = defaultdict(list)
    for name, tree in _modules().items():
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
            for target in targets:
                if isinstance(target, ast.Name) and target.id.isupper() and target.id not in ("__all__",):
                    definitions[target.id].append(name)
    repeated = {k: v for k, v in definitions.items() if len(v) > 1}
    assert repeated == {}, repeated
