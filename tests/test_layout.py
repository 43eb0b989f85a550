"""The code's layout rules, checked on the source: one-way imports between packages, no private
name imported across modules, no module over 400 lines, no function over 80 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import mechfaith

SRC = Path(mechfaith.__file__).parent
# each package may import only from those before it; top-level helper modules sit below them all
ORDER = ["coders", "training", "faithfulness", "toy", "lm", "circuits", "studies", "reports", "cli"]
HELPERS = {"errors", "configs", "atomic", "perf", "jsonio"}


def _modules() -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text(encoding="utf-8"))) for p in sorted(SRC.rglob("*.py"))]


def _rank(module: str) -> int:
    parts = module.split(".")
    if len(parts) < 2 or parts[0] != "mechfaith":
        return -2
    if parts[1] in HELPERS or parts[1] == "__init__":
        return -1
    if parts[1] == "__main__":  # ``python -m mechfaith``: the command line, above everything
        return len(ORDER)
    return ORDER.index(parts[1]) if parts[1] in ORDER else -1


def _imports(tree: ast.Module) -> list[tuple[str, list[str]]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out.extend((a.name, []) for a in node.names)
    return out


def test_every_package_is_listed():
    packages = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages == set(ORDER)
    assert " -> ".join(f"``{p}``" for p in ORDER) in (mechfaith.__doc__ or "")


def test_imports_go_one_way():
    bad = []
    for path, tree in _modules():
        own = _rank("mechfaith." + ".".join(path.relative_to(SRC).with_suffix("").parts))
        for module, _ in _imports(tree):
            if module.startswith("mechfaith.") and _rank(module) > own:
                bad.append(f"{path.relative_to(SRC)} imports {module}")
    assert not bad, bad


def test_no_private_name_is_imported_across_modules():
    bad = [f"{path.relative_to(SRC)}: {module}.{name}" for path, tree in _modules()
           for module, names in _imports(tree) if module.startswith("mechfaith")
           for name in names if name.startswith("_") and not name.startswith("__")]
    assert not bad, bad


def test_modules_and_functions_stay_small():
    long_modules = [f"{p.relative_to(SRC)} ({n})" for p, _ in _modules()
                    if (n := len(p.read_text(encoding="utf-8").splitlines())) > 400]
    long_functions = [f"{p.relative_to(SRC)}:{node.name} ({node.end_lineno - node.lineno + 1})"
                      for p, tree in _modules() for node in ast.walk(tree)
                      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.end_lineno is not None and node.end_lineno - node.lineno + 1 > 80]
    assert not long_modules, long_modules
    assert not long_functions, long_functions
