"""cpu tier: the native build system: libraries load, records are checked, failures are reasons."""

from __future__ import annotations

import json
import os
import stat

import pytest

from vljepa_fast import _ext, backends


def test_cpu_library_builds_and_loads():
    st = _ext.load("cpu")
    assert st.loaded, st.reasons
    rec = json.loads((st.path.parent / "build_info.json").read_text())
    assert rec["torch"] == _ext._fingerprint("cpu")["torch"]
    assert rec["source_hash"] == _ext._fingerprint("cpu")["source_hash"]


@pytest.mark.skipif(
    os.environ.get("CI") != "true", reason="CI requires the CUDA build; elsewhere optional"
)
def test_cuda_library_compiled_for_sm90a_in_ci():
    st = _ext.load("cuda")
    assert st.path is not None and st.path.is_file(), st.reasons
    rec = json.loads((st.path.parent / "build_info.json").read_text())
    assert "9.0a" in rec["archs"] and "8.0" in rec["archs"]


def test_stale_record_is_a_reason(tmp_path):
    so = tmp_path / "vljepa_fast_cpu.so"
    so.write_bytes(b"")
    rec = dict(_ext._fingerprint("cpu"), torch="0.0.1")
    (tmp_path / "build_info.json").write_text(json.dumps(rec))
    why = _ext._check_record("cpu", so)
    assert why and "stale cpu build" in why[0] and "0.0.1" in why[0]
    (tmp_path / "build_info.json").unlink()
    assert "no build_info.json" in _ext._check_record("cpu", so)[0]


def test_missing_sources_are_a_reason_not_a_crash(tmp_path, monkeypatch):
    (tmp_path / "sources.txt").write_text("[cpu]\nops.cpp\nmissing.cpp\n[cuda]\n")
    (tmp_path / "include").mkdir()
    monkeypatch.setattr(_ext, "source_root", lambda: tmp_path)
    monkeypatch.setattr(_ext, "_state", {})
    st = _ext.load("cpu", allow_build=False)
    assert not st.loaded and "cannot read the cpu sources" in st.reasons[0]


def test_cuda_home_follows_wrapper_script(tmp_path, monkeypatch):
    root = tmp_path / "toolkit"
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime.h").write_text("")
    (root / "bin" / "nvcc").write_text("")
    wrap_dir = tmp_path / "wrap"
    wrap_dir.mkdir()
    wrapper = wrap_dir / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {root}/bin/nvcc "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    for var in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", str(wrap_dir))
    assert _ext.find_cuda_home() == root


def test_backends_table_covers_every_op():
    rows = backends()
    ops = {r.op for r in rows}
    assert ops == {
        "attention", "attention_varlen", "infonce_loss", "topk_similarity", "rotary",
        "sigmoid_loss",
    }  # fmt: skip
    for r in rows:
        assert r.available or r.reasons, f"{r.op}/{r.backend}: unavailable without a reason"
    assert any(r.backend == "reference" and r.available for r in rows)


def test_info_prints_every_op_and_backend():
    from vljepa_fast import info

    text = info.report()
    for r in backends():
        assert r.op in text and r.backend in text
