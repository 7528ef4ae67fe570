"""The model layer's docs name only what exists: every ``M.<name>`` and ``model.<name>`` in
README.md and docs/models.md, the loaders and tokenizers of docs/models.md's tables, and the
functions of its evaluation table. A rename that leaves the docs behind fails here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import vljepa_fast.eval as E
import vljepa_fast.models as M

ROOT = Path(__file__).resolve().parents[1]
DOCS = {name: (ROOT / name).read_text(encoding="utf-8") for name in ("README.md", "docs/models.md")}


def _names(pattern: str) -> set[tuple[str, str]]:
    return {(doc, m) for doc, text in DOCS.items() for m in re.findall(pattern, text)}


@pytest.mark.cpu
def test_models_names_in_the_docs_exist():
    found = _names(r"\bM\.([A-Za-z_]\w*)")
    assert len(found) >= 4, found
    missing = sorted((d, n) for d, n in found if not hasattr(M, n))
    assert not missing, f"vljepa_fast.models has no: {missing}"


@pytest.mark.cpu
def test_model_methods_in_the_docs_exist():
    model = M.VLJEPA(M.VLJEPAConfig.tiny(), backend="reference")
    files = {"safetensors", "pt", "pth", "bin"}  # "model.safetensors" is a file name
    found = {(d, n) for d, n in _names(r"\bmodel\.([A-Za-z_]\w*)") if n not in files}
    assert len(found) >= 6, found
    missing = sorted((d, n) for d, n in found if not hasattr(model, n))
    assert not missing, f"VLJEPA has no: {missing}"
    fields = _names(r"\bout\.([A-Za-z_]\w*)")
    assert fields, "the caption_stream example lost its result fields"
    missing = sorted((d, n) for d, n in fields if not hasattr(M.StreamCaptions, n)
                     and n not in M.StreamCaptions.__dataclass_fields__)  # fmt: skip
    assert not missing, f"StreamCaptions has no: {missing}"


@pytest.mark.cpu
def test_the_tables_of_docs_models_name_existing_functions():
    text = DOCS["docs/models.md"]
    rows = re.findall(r"^\| `([A-Za-z_]\w*)(?:\(|`)", text, flags=re.MULTILINE)
    assert len(rows) >= 10, rows
    owners = (M, E, M.VLJEPA)
    missing = sorted({r for r in rows if not any(hasattr(o, r) for o in owners)})
    assert not missing, f"docs/models.md tables name what does not exist: {missing}"
    evaluation = text.split("## Evaluation", 1)[1].split("\n## ", 1)[0]
    first_cells = re.findall(r"^\| (.+?) \|", evaluation, flags=re.MULTILINE)[2:]  # header
    names = [n for cell in first_cells for n in re.findall(r"`([a-z_]\w*)", cell)]
    assert len(names) >= 6, names
    missing = sorted(n for n in names if not hasattr(E, n))
    assert not missing, f"vljepa_fast.eval has no: {missing}"
