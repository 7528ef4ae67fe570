"""Packaging: every Python package of the source tree is listed in setup.py.

setup.py names its packages explicitly (kernels/ and csrc/ are mapped under vljepa_fast), so a new
subpackage that is not added there works in an editable install and in the tests but is missing
from a built wheel. This test fails when a folder with an ``__init__.py`` under vljepa_fast/ is
not in the list.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _setup_packages() -> set[str]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "packages":
            return set(ast.literal_eval(node.value))
    raise AssertionError("setup.py: no packages=[...] keyword found")


@pytest.mark.cpu
def test_every_package_is_in_setup_py():
    listed = _setup_packages()
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "vljepa_fast").rglob("__init__.py")
    }
    assert found, "no package found under vljepa_fast/"
    missing = sorted(found - listed)
    assert not missing, f"packages missing from setup.py's packages=[...]: {missing}"
