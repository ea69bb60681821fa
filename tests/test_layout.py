"""The package layout: layers import only downwards, every public name the
README uses resolves, and module paths from before the regrouping still import."""

import ast
import functools
import importlib
import os
import re

import pytest

import memboost

ROOT = os.path.join(os.path.dirname(__file__), "..")
PACKAGE = os.path.join(ROOT, "memboost")

# Lowest first. A module may import from its own layer and the ones before it.
LAYERS = [
    ["memboost._version", "memboost.errors", "memboost._native", "memboost._threads", "memboost._progress",
     "memboost._build_info", "memboost._C", "memboost._slices"],
    ["memboost.ops", "memboost.reference"],
    ["memboost.formats"],
    ["memboost.nn"],
    ["memboost.model"],
    ["memboost.io"],
    ["memboost.runtime"],
    ["memboost.train", "memboost.integrations"],
    ["memboost.tritter", "memboost.testbed", "memboost.compare", "memboost.cli", "memboost.__main__", "memboost"],
]


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best is None:
        raise AssertionError(f"{module} belongs to no layer in tests/test_layout.py: add it")
    return best


def module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def imported_modules(path: str):
    """Every memboost module a file imports, at any depth (function-level imports included)."""
    name = module_name(path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "memboost":
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "memboost":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"  # `from pkg import sub` names a submodule where one exists
                yield node.lineno, sub if sub in NATIVE or sub in _memboost_submodules() else target


NATIVE = {"memboost._C", "memboost._build_info"}  # built, not in the source tree


@functools.lru_cache(maxsize=None)
def _memboost_submodules():
    names = set()
    for dirpath, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                names.add(module_name(os.path.join(dirpath, f)))
    return names


def python_files():
    for dirpath, _, files in os.walk(PACKAGE):
        for f in sorted(files):
            if f.endswith(".py"):
                yield os.path.join(dirpath, f)


def test_no_module_imports_from_a_layer_above_it():
    violations = []
    for path in python_files():
        importer = module_name(path)
        for lineno, target in imported_modules(path):
            if layer_of(target) > layer_of(importer):
                violations.append(f"{importer}:{lineno} imports {target} (layer {layer_of(target)} > "
                                  f"{layer_of(importer)})")
    assert not violations, "\n".join(violations)


def test_every_import_of_a_memboost_module_resolves():
    """Function-level imports run only when called: check that each names a module that exists."""
    known = _memboost_submodules() | NATIVE
    broken = [f"{module_name(path)}:{lineno} imports {target}" for path in python_files()
              for lineno, target in imported_modules(path) if target not in known]
    assert not broken, "\n".join(broken)


def readme_names():
    text = open(os.path.join(ROOT, "README.md")).read()
    names = set(re.findall(r"\bmemboost(?:\.[A-Za-z_][A-Za-z0-9_]*)+", text))
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "memboost":
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return sorted(names)


def resolve(dotted: str):
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=1):
        if hasattr(obj, part):
            obj = getattr(obj, part)
        else:
            obj = importlib.import_module(".".join(parts[: i + 1]))
    return obj


def test_readme_names_resolve():
    names = readme_names()
    assert len(names) > 30  # the README is the API tour; far fewer means the pattern broke
    missing = []
    for name in names:
        if name.endswith(("_py", ".py", ".md", ".json", ".lort", ".gguf")):
            continue
        try:
            resolve(name)
        except (ImportError, AttributeError) as exc:
            missing.append(f"{name}: {exc}")
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("old,new", [
    ("tensor", "formats.tensor"), ("mixed", "formats.mixed"), ("ternary", "formats.ternary"),
    ("nf4", "formats.nf4"), ("lort", "formats.lort"), ("allocate", "model.plan"),
    ("serialization", "io.serialization"), ("checkpoint", "io.checkpoint"), ("gguf", "io.gguf.export"),
    ("gguf_quants", "io.gguf.quants"), ("qlora", "train.qlora"), ("vsa", "train.vsa"),
    ("distributed", "train.distributed"),
])
def test_module_paths_from_before_the_regrouping_import(old, new):
    assert importlib.import_module(f"memboost.{old}") is importlib.import_module(f"memboost.{new}")
    assert getattr(memboost, old) is importlib.import_module(f"memboost.{new}")


def test_old_model_module_names_import():
    from memboost.model import calibrate, quantize_model, QuantizationReport  # noqa: F401

    assert memboost.quantize_model is quantize_model


def test_all_names_exist():
    for name in memboost.__all__:
        assert hasattr(memboost, name), name
