"""The layer rule, read from the imports (ast): core <- boards <- hw_models <- toolchain <- export <- app.

* no module imports a module of a higher layer (function-level imports included);
* no private name (``_x``) is imported from another module;
* a backend's folder is imported from outside export/ only through its registered name, its
  ``__init__`` or its public modules (nothing private).
"""
import ast
from pathlib import Path

import pytest

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
#: source folder -> package it installs as
PACKAGES = {"toolchain/_bitfold": "bitfold", "toolchain": "bitfold.toolchain", "export": "bitfold.export",
            "hw_models": "bitfold.hw_models", "boards": "bitfold.boards"}
#: package prefix -> layer (higher may import lower, never the reverse)
LAYERS = [("bitfold.core", 0), ("bitfold.boards", 1), ("bitfold.hw_models", 2), ("bitfold.toolchain", 3),
          ("bitfold.export", 4), ("bitfold.app", 5), ("bitfold.cli", 5), ("bitfold", 5)]


def layer_of(module: str) -> int:
    for prefix, n in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return n
    raise AssertionError(f"{module} is in no layer")


def modules(root: Path):
    """(module name, file) of every package file under ``root``."""
    for src, pkg in sorted(PACKAGES.items(), key=lambda kv: -len(kv[0])):
        for f in sorted((root / src).rglob("*.py")):
            rel = f.relative_to(root / src)
            if src == "toolchain" and rel.parts[0] == "_bitfold":
                continue
            name = ".".join((pkg, *rel.with_suffix("").parts)).removesuffix(".__init__")
            yield name, f


def imports(name: str, path: Path):
    """(imported module, names, line) of every import in a file, relative imports resolved."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                mod = ".".join(base + ([mod] if mod else []))
            yield mod, [a.name for a in node.names], node.lineno


def violations(root: Path) -> list[str]:
    found = []
    for name, path in modules(root):
        mine = layer_of(name)
        for mod, names, line in imports(name, path):
            if not mod.startswith("bitfold"):
                continue
            where = f"{path.relative_to(root)}:{line}"
            if layer_of(mod) > mine:
                found.append(f"{where}: {name} (layer {mine}) imports {mod} (layer {layer_of(mod)})")
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private or any(p.startswith("_") for p in mod.split(".")[1:]):
                found.append(f"{where}: {name} imports private {mod} {private}")
    return found


def test_layer_rule_holds():
    assert violations(ROOT) == []


def test_layer_rule_catches_an_upward_import(tmp_path):
    import shutil
    for src in PACKAGES:
        if src != "toolchain/_bitfold":
            shutil.copytree(ROOT / src, tmp_path / src, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__", "tables", "rtl"))
    shutil.copytree(ROOT / "toolchain/_bitfold", tmp_path / "toolchain/_bitfold", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    assert violations(tmp_path) == []
    f = tmp_path / "hw_models" / "table.py"
    f.write_text(f.read_text() + "\n\ndef _late():\n    from bitfold.export.open_fpga.flow import generate\n")
    bad = violations(tmp_path)
    assert len(bad) == 1 and "bitfold.hw_models.table (layer 2) imports bitfold.export.open_fpga.flow" in bad[0]
    g = tmp_path / "toolchain" / "train.py"
    g.write_text(g.read_text() + "\nfrom bitfold.toolchain.convert import _private_helper\n")
    assert any("imports private" in v for v in violations(tmp_path))


@pytest.mark.parametrize("folder", ["tvm", "open_fpga", "finn"])
def test_a_backend_is_one_folder_with_one_registered_class(folder):
    from bitfold.core.registry import backend_names, get_backend
    from bitfold.export.backends import Backend
    assert (ROOT / "export" / folder / "__init__.py").is_file()
    owners = [n for n in backend_names() if type(get_backend(n)).__module__ == f"bitfold.export.{folder}"]
    assert len(owners) == 1 and isinstance(get_backend(owners[0]), Backend)
    # no other part of export/ reaches into this backend's modules
    for name, path in modules(ROOT):
        if name.startswith("bitfold.export.") and not name.startswith(f"bitfold.export.{folder}") \
                and name.count(".") == 2:
            for mod, _, line in imports(name, path):
                assert not mod.startswith(f"bitfold.export.{folder}"), f"{path}:{line} imports {mod}"
