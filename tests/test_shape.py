"""The package's shape: no class over 300 lines and no function over 80, and
a test file for every module (``tests/`` mirrors the package).

A long class is usually several jobs in one (issue: the Cluster subscriber
was a slot table, a placement and shard connections at 620 lines); a long
function, several steps that want names.  Lines count from the ``class`` or
``def`` statement through its last line, docstring included.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "marketstream"
MAX_CLASS = 300
MAX_FUNCTION = 80


def _lengths() -> list[tuple[str, str, int]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        where = str(path.relative_to(PACKAGE.parent))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno is not None
                kind = "class" if isinstance(node, ast.ClassDef) else "function"
                found.append(
                    (kind, "%s:%s" % (where, node.name), node.end_lineno - node.lineno + 1)
                )
    return found


def test_the_package_has_classes_and_functions_to_measure() -> None:
    kinds = {kind for kind, _, _ in _lengths()}
    assert kinds == {"class", "function"}


@pytest.mark.parametrize("kind,limit", [("class", MAX_CLASS), ("function", MAX_FUNCTION)])
def test_no_class_or_function_is_too_long(kind: str, limit: int) -> None:
    long = ["%s (%d lines)" % (name, n) for k, name, n in _lengths() if k == kind and n > limit]
    assert not long, "%ss over %d lines: %s" % (kind, limit, ", ".join(long))


def test_every_module_has_its_test_file() -> None:
    """``marketstream/<dir>/<name>.py`` is tested in ``tests/<dir>/test_<name>.py``."""
    tests = PACKAGE.parent / "tests"
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name in ("__init__.py", "__main__.py"):
            continue
        where = path.relative_to(PACKAGE)
        test = tests / where.parent / ("test_" + where.name)
        if not test.exists():
            missing.append("%s (%s)" % (where, test.relative_to(PACKAGE.parent)))
    assert not missing, "modules without a test file: " + ", ".join(missing)
