"""examples/train_tiny.py at the reduced (CI) size: it trains, evaluates (classification,
retrieval over an EmbeddingIndex, VQA by answer()) and captions a stream (caption_stream).

The built-in text encoder keeps it within seconds; the MiniLM Y-encoder path is covered by
tests/test_models.py::test_transformers_encoder_as_y_encoder.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_tiny.py"


def test_train_tiny_reduced_runs_and_learns(capsys):
    spec = importlib.util.spec_from_file_location("train_tiny", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    threads = torch.get_num_threads()
    try:
        out = mod.main(["--reduced", "--seed", "1", "--text-encoder", "builtin"])
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    for line in (
        "loss: first",
        "classification accuracy",
        "R@1",
        "VQA by answer()",
        "selective decoding",
    ):
        assert line in printed, f"missing output line {line!r}"
    assert out["last_loss"] < 0.8 * out["first_loss"], "loss did not go down"
    assert out["accuracy"] > out["accuracy_chance"]
    assert out["r1"] > out["r1_chance"]
    assert out["vqa_accuracy"] > out["vqa_chance"]
    assert out["selective_calls"] == out["scenes"] == len(out["captions"])
    assert out["calls_saved"] == out["windows"] - out["selective_calls"] > 0
    assert out["online_calls"] >= 1
    assert 0 < out["recall"] <= 1 and out["uniform_calls"] >= 1
