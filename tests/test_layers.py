"""The layering rules of docs/DESIGN.md, checked on the source (cpu tier).

* kernels/ imports Triton, torch and the standard library, never the vljepa_fast package;
* reference.py imports only torch (and math);
* nothing below the models (ops, functional, nn, integrations, ...) imports vljepa_fast.models;
* every document a file of the repository cites (a page under docs/, or an upper-case name
  such as DESIGN.md) exists (generated outputs such as report.md are not citations);
* every op in the registry has a reference record, a docs page and a stem shared by its layers.
"""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

import vljepa_fast  # noqa: F401  (registers every op's backends)
from vljepa_fast import _backends

pytestmark = pytest.mark.cpu

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    """Top-level module names a file imports (``from . import x`` counts as the package)."""
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                names.add("." * node.level + (node.module or ""))
            else:
                names.add(node.module or "")
    return names


def _tracked(pattern: str) -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", pattern],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [ROOT / p for p in out if (ROOT / p).is_file()]


def test_kernels_do_not_import_the_package() -> None:
    files = sorted((ROOT / "kernels").glob("*.py"))
    assert files
    for path in files:
        bad = {m for m in _imports(path) if m.split(".")[0] == "vljepa_fast" or m == ".."}
        assert not bad, f"{path.name} imports {bad}"


def test_reference_imports_only_torch() -> None:
    mods = {m.split(".")[0] for m in _imports(ROOT / "vljepa_fast" / "reference.py")}
    assert mods <= {"__future__", "math", "torch"}, mods


def test_nothing_below_the_models_imports_them() -> None:
    pkg = ROOT / "vljepa_fast"
    for path in pkg.rglob("*.py"):
        rel = path.relative_to(pkg)
        if rel.parts[0] in ("models", "eval", "train") or rel == Path("__init__.py"):  # above
            continue
        for m in _imports(path):
            assert not m.startswith("vljepa_fast.models"), f"{rel} imports {m}"
        text = path.read_text()
        assert not re.search(r"from vljepa_fast import [^\n]*\bmodels\b", text), rel


_CITE = re.compile(r"(?<![\w/.-])(docs/[A-Za-z_]+\.md|[A-Z][A-Z0-9_]+\.md)\b")


def test_every_cited_document_exists() -> None:
    missing = []
    for path in _tracked("*"):
        if path.suffix not in {".py", ".sh", ".md", ".toml", ".cpp", ".cu", ".h", ".cuh", ".txt"}:
            continue
        if "bench/results" in str(path):
            continue
        for cite in set(_CITE.findall(path.read_text(errors="replace"))):
            if cite in {"README.md"}:
                found = (ROOT / cite).exists()
            elif cite.startswith("docs/"):
                found = (ROOT / cite).exists()
            else:  # a bare name is resolved next to the citing file, then in docs/
                found = (path.parent / cite).exists() or (ROOT / "docs" / cite).exists()
            if not found:
                missing.append(f"{path.relative_to(ROOT)} cites {cite}")
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("op", _backends.OPS)
def test_every_op_has_a_reference_record_and_a_page(op: str) -> None:
    names = [r.name for r in _backends.records(op)]
    assert names and names[-1] == "reference", names
    # infonce_loss's files are infonce.*; sigmoid_loss's are sigmoid_loss.*
    stem = {"infonce_loss": "infonce"}.get(op, _backends.FAMILY.get(op, op))
    assert (ROOT / "docs" / f"{stem}.md").exists(), stem
    assert (ROOT / "kernels" / f"{stem}.py").exists(), stem
    assert list((ROOT / "tests").glob(f"test_{stem}*.py")), stem
    assert stem in (ROOT / "docs" / "DESIGN.md").read_text()


def test_backends_lists_every_op_with_reasons() -> None:
    rows = vljepa_fast.backends()
    assert {r.op for r in rows} == set(_backends.OPS)
    for r in rows:
        assert r.available == (not r.reasons), r
