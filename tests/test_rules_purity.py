"""The rules stay pure Array API code: no backend named, nothing imported but the package's own.

The rules live in a package (`xpoptim._rules`, one module per family); this reads every
module of it, so a new family file is checked without being listed here.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import xpoptim._rules

RULES = sorted(Path(xpoptim._rules.__file__).parent.glob("*.py"))
BACKENDS = re.compile(r"\b(numpy|np|cupy|cp|torch|jax|jnp|dask|da|numba|array_api_strict)\b")


def test_the_rules_package_has_its_modules():
    names = {path.name for path in RULES}
    assert {"__init__.py", "_sgd.py", "_rmsprop.py", "_adam.py"} <= names, names


@pytest.mark.parametrize("path", RULES, ids=[path.name for path in RULES])
def test_a_rule_module_imports_only_xpoptims_compat_and_its_siblings(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            pytest.fail(f"{path.name}:{node.lineno} imports {[a.name for a in node.names]}")
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            assert node.level >= 1, f"{path.name}:{node.lineno} imports {node.module}"
            assert node.level == 1 or node.module == "_compat", (
                f"{path.name}:{node.lineno} imports ..{node.module}"
            )


@pytest.mark.parametrize("path", RULES, ids=[path.name for path in RULES])
def test_a_rule_module_names_no_backend_in_its_code(path):
    tree = ast.parse(path.read_text())
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    attributes = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    found = sorted(n for n in names | attributes if BACKENDS.fullmatch(n))
    assert not found, f"{path.name} names {found}"
