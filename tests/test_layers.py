"""The package's shape: imports point downward only, modules stay small, and reading a
rollout file stays light (no JAX, no model)."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "drift_jax"

# Lowest first: a module may import from its own layer or any layer before it.
LAYERS = [
    ("drift_jax.data",),
    ("drift_jax.envs",),
    ("drift_jax.weights", "drift_jax.diagnostics", "drift_jax.methods"),
    ("drift_jax.parallel",),
    ("drift_jax.models",),
    ("drift_jax.rollout",),
    ("drift_jax.training",),
    ("drift_jax.evaluation",),
    ("drift_jax.aot",),
]


def module_name(path: pathlib.Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def layer_of(module: str) -> int | None:
    for rank, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None


def imported_modules(path: pathlib.Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out if m.startswith("drift_jax.")}


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_imports_point_downward(path):
    own = layer_of(module_name(path))
    assert own is not None, f"{module_name(path)} belongs to no layer of LAYERS"
    upward = sorted(m for m in imported_modules(path) if (layer_of(m) or 0) > own)
    assert not upward, f"{module_name(path)} (layer {own}) imports from a higher layer: {upward}"


def test_the_library_never_imports_the_runner():
    offenders = [module_name(p) for p in PACKAGE.rglob("*.py")
                 if any(m.startswith("experiments") for m in _all_imports(p))]
    assert not offenders


def _all_imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


@pytest.mark.parametrize("folder", ["drift_jax", "experiments", "benchmarks"])
def test_no_module_over_400_lines(folder):
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / folder).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"modules over 400 lines (each should be one concept): {long}"


@pytest.mark.parametrize("module", ["drift_jax.data.records", "drift_jax.data.chat", "drift_jax.data.batching"])
def test_reading_records_imports_neither_jax_nor_the_model(module):
    code = (f"import sys, {module}; bad = [m for m in ('jax', 'flax', 'drift_jax.models') if m in sys.modules]; "
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "", f"import {module} pulled in {out.stdout.strip()}"


def test_the_public_api_resolves_and_import_stays_light():
    code = ("import sys, drift_jax as dj; light = 'jax' not in sys.modules; "
            "missing = [n for n in dj.__all__ if getattr(dj, n, None) is None]; print(light, missing)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split(maxsplit=1) == ["True", "[]\n"], out.stdout + out.stderr
