"""The trainer's docs name only what exists: every ``--flag`` of docs/training.md and README's
Training section is a flag of the command it belongs to, the two flag tables list every flag of
``python -m vljepa_fast.train`` and ``cache_features`` (and the trainer's defaults), every
``vljepa_fast.X`` name imports, every file named exists, and the presets table, the resume
rule, the metrics fields and the cache.json keys are the code's. A rename that leaves the docs
behind fails here."""

from __future__ import annotations

import contextlib
import importlib
import io
import re
from dataclasses import fields
from pathlib import Path

import pytest
from torch.distributed.run import get_args_parser

from vljepa_fast.train import PRESETS, TrainConfig, Trainer, parse_args
from vljepa_fast.train import cache_features as cf
from vljepa_fast.train.data import CACHE_KEYS
from vljepa_fast.train.model import build_model
from vljepa_fast.train.trainer import RESUME_MUST_MATCH

pytestmark = pytest.mark.cpu

ROOT = Path(__file__).resolve().parents[1]
TRAINING = (ROOT / "docs/training.md").read_text(encoding="utf-8")
README = (ROOT / "README.md").read_text(encoding="utf-8")
README_TRAINING = README.split("\n## Training\n", 1)[1].split("\n## ", 1)[0]
DOCS = {"docs/training.md": TRAINING, "README.md (Training)": README_TRAINING}
FLAG = r"--[a-z][a-z0-9_-]*"


def _help(call) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        call(["--help"])
    return out.getvalue()


def _flags(text: str) -> set[str]:
    return set(re.findall(FLAG, text))


TRAIN_FLAGS = _flags(_help(parse_args))
CACHE_FLAGS = _flags(_help(cf.main))
TORCHRUN_FLAGS = _flags(get_args_parser().format_help())


def _section(title: str) -> str:
    return TRAINING.split(f"\n## {title}", 1)[1].split("\n## ", 1)[0]


def _table(text: str, header: str) -> list[list[str]]:
    """The rows (cells stripped) of the markdown table whose header row starts with ``header``."""
    lines = text[text.index(header) :].splitlines()
    rows = []
    for line in lines[2:]:  # header, separator
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split(" | ")])
    return rows


def test_every_flag_in_the_docs_exists():
    """A flag in the docs is one of the trainer's, cache_features' or torchrun's (in a torchrun
    command line); none is made up or left behind by a rename."""
    known = TRAIN_FLAGS | CACHE_FLAGS | TORCHRUN_FLAGS
    assert {"--preset", "--resume", "--grad-accum"} <= TRAIN_FLAGS, TRAIN_FLAGS
    for name, text in DOCS.items():
        found = _flags(text)
        assert len(found) >= (20 if name == "docs/training.md" else 4), (name, found)
        missing = sorted(found - known)
        assert not missing, f"{name} names flags no command has: {missing}"
    # a cache_features command line uses only cache_features flags
    for line in re.findall(r"python -m vljepa_fast\.train\.cache_features[^\n]*", TRAINING):
        bad = sorted(_flags(line) - CACHE_FLAGS)
        assert not bad, f"cache_features has no {bad}: {line}"


def test_the_flag_tables_are_complete_and_the_defaults_are_the_code_s():
    rows = _table(TRAINING, "| flag | default | meaning |")
    documented = {f for r in rows for f in re.findall(FLAG, r[0])}
    assert documented == TRAIN_FLAGS - {"--help"}, (
        sorted(TRAIN_FLAGS - documented), sorted(documented - TRAIN_FLAGS))  # fmt: skip
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    words = {"none": None, "off": False, "the preset's": None, "torch's default": None}
    checked = 0
    for cell, default in ((r[0], r[1]) for r in rows):
        for flag in re.findall(FLAG, cell):
            name = flag[2:].replace("-", "_")
            if name not in defaults:  # --config, --no-<bool>
                continue
            want = defaults[name]
            got = words[default] if default in words else default.strip("`")
            if isinstance(want, bool) or want is None:
                assert got == want, (flag, default, want)
            elif isinstance(want, int | float):
                assert type(want)(got) == want, (flag, default, want)
            else:
                assert got == want, (flag, default, want)
            checked += 1
    assert checked == len(defaults), (checked, len(defaults))
    cache_rows = _table(TRAINING, "| `cache_features` flag | default | meaning |")
    documented = {f for r in cache_rows for f in re.findall(FLAG, r[0])}
    assert documented == CACHE_FLAGS - {"--help"}, (
        sorted(CACHE_FLAGS - documented), sorted(documented - CACHE_FLAGS))  # fmt: skip


def _resolve(dotted: str) -> object:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def test_every_dotted_name_in_the_docs_imports():
    found = {(d, m) for d, t in DOCS.items() for m in re.findall(r"\bvljepa_fast(?:\.\w+)+", t)}
    assert len(found) >= 10, found
    missing = []
    for doc, name in sorted(found):
        try:
            _resolve(name)
        except (ModuleNotFoundError, AttributeError):
            missing.append((doc, name))
    assert not missing, f"these names do not exist: {missing}"


def test_every_file_named_in_the_docs_exists():
    path = r"`((?:vljepa_fast|tests|docs|bench|scripts)/[\w/.-]+\.(?:py|md))"
    found = set(re.findall(path, TRAINING))
    found |= {"docs/" + m for m in re.findall(r"\]\(([\w.-]+\.md)(?:#[\w-]*)?\)", TRAINING)}
    assert len(found) >= 5, found
    missing = sorted(f for f in found if not (ROOT / f).is_file())
    assert not missing, f"docs/training.md names missing files: {missing}"
    for path, test in re.findall(r"`(tests/\w+\.py)::(\w+)`", TRAINING):
        assert f"def {test}(" in (ROOT / path).read_text(), f"{path} has no {test}"
    for anchor in re.findall(r"\]\(#([\w-]+)\)", TRAINING):
        titles = re.findall(r"^#+ (.+)$", TRAINING, flags=re.MULTILINE)
        slugs = {re.sub(r"[^\w\- ]", "", t.lower()).replace(" ", "-") for t in titles}
        assert anchor in slugs, f"no section for #{anchor}: {sorted(slugs)}"


def test_the_presets_table_is_the_code_s():
    rows = _table(TRAINING, "| preset | X-encoder (frozen) |")
    assert [r[0].strip("`") for r in rows] == list(PRESETS)
    for r in rows:
        p = PRESETS[r[0].strip("`")]
        clip = [3, p.frames, p.image_size, p.image_size]
        assert r[4] == str(p.model.embed_dim), (r[0], r[4])
        assert r[5] == str(clip), (r[0], r[5], clip)
        assert r[6] == str(p.visual_tokens), (r[0], r[6])
        assert r[7] == str(p.batch_size), (r[0], r[7])
        assert p.model.freeze_x_encoder, r[0]
    for name in ("tiny", "small"):
        said = re.search(
            rf"{name}\s+has\s+([\d,]+),\s+of\s+which\s+([\d,]+)\s+are\s+trainable", TRAINING
        )
        assert said, name
        model = build_model(PRESETS[name], 0)
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert [int(s.replace(",", "")) for s in said.groups()] == [total, trainable], name


def test_the_resume_rule_is_the_code_s():
    text = TRAINING.split("**`--resume` requires the same**", 1)[1].split(". With", 1)[0]
    named = [w.strip().replace(" ", "_") for w in re.split(r",|\band\b", text) if w.strip()]
    assert sorted(named) == sorted(RESUME_MUST_MATCH), (named, RESUME_MUST_MATCH)
    assert "vljepa_fast.train.trainer.RESUME_MUST_MATCH" in TRAINING


def test_the_metrics_fields_and_trainer_names_are_the_code_s():
    rows = _table(_section("`metrics.jsonl`"), "| field | unit | meaning |")
    fields_doc = {r[0].strip("`") for r in rows}
    t = Trainer(TrainConfig(preset="tiny", steps=1, batch_size=4, data="synthetic:4", threads=1,
                            progress="off"))  # fmt: skip
    try:
        m = t.step()
        assert fields_doc == set(m), (sorted(fields_doc), sorted(m))
        # trainer.json and trainer.py are files; vljepa_fast.train.trainer.X a module's names
        names = set(re.findall(r"(?<![\w.])trainer\.(\w+)", TRAINING)) - {"json", "py"}
        assert {"step", "fit", "save", "close", "model"} <= names, names
        missing = sorted(n for n in names if not hasattr(t, n))
        assert not missing, f"Trainer has no: {missing}"
        dist = set(re.findall(r"`(\w+)`", TRAINING.split("`trainer.dist` gives", 1)[1][:80]))
        missing = sorted(n for n in dist if not hasattr(t.dist, n))
        assert dist and not missing, (dist, missing)
    finally:
        t.close()


def test_the_cache_json_keys_are_the_code_s():
    para = TRAINING.split("`cache.json` holds", 1)[1].split(". A folder", 1)[0]
    said = set(re.findall(r"`(\w+)`", para))
    written = set(CACHE_KEYS) | {"x_encoder_path", "backend"}  # cache_features' info
    assert said == written, (sorted(said - written), sorted(written - said))
    assert "x_encoder_fingerprint" in dir(cf) and "write_cache" in dir(cf)


def test_a_quoted_error_is_the_code_s(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--lr", "nan"])
    err = capsys.readouterr().err
    quoted = "--lr: expected a finite number > 0.0, got nan"
    assert quoted in TRAINING and quoted in err, err
