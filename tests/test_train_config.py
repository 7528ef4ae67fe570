"""python -m vljepa_fast.train's settings: presets, a config file under the flags, and every
refused value named by its flag (exit 2, argparse's way), never a run that does something
else than asked."""

from __future__ import annotations

import json

import pytest

from vljepa_fast.train import PRESETS, TrainConfig, Trainer, parse_args
from vljepa_fast.train.cli import main

pytestmark = pytest.mark.cpu


def _refused(capsys, argv: list[str], needle: str) -> None:
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert needle in err, err


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--preset", "huge"], "--preset: expected one of"),
        (["--steps", "0"], "--steps: expected an integer >= 1"),
        (["--steps", "ten"], "--steps: expected an integer"),
        (["--batch-size", "-4"], "--batch-size: expected an integer >= 1"),
        (["--lr", "nan"], "--lr: expected a finite number > 0"),
        (["--lr", "0"], "--lr: expected a finite number > 0"),
        (["--y-lr-mult", "-1"], "--y-lr-mult: expected a finite number >= 0"),
        (["--schedule", "linear"], "--schedule: expected one of"),
        (["--dist", "deepspeed"], "--dist: expected one of"),
        (["--precision", "fp16"], "--precision: expected one of"),
        (["--accum", "approx"], "--accum: expected one of"),
        (["--warmup", "5", "--steps", "5"], "--warmup: expected fewer than --steps"),
        (["--stop-at", "11", "--steps", "10"], "--stop-at: expected <= --steps"),
        (["--resume"], "--resume: needs --out"),
        (["--backend", "cuda-magic"], "--backend"),
        (["--grad-accum", "0"], "--grad-accum: expected an integer >= 1"),
        (["--out", ""], "--out: expected a path, got an empty string"),
        (["--y-encoder", " "], "--y-encoder: expected a path"),
        (["--lr", "1e308"], "--lr: expected at most 1"),
        (["--lr", "0.1", "--weight-decay", "10"], "lr x weight decay must be below 1"),
        (["--seed", str(2**32)], "--seed: expected an integer < 2**32"),
    ],
)
def test_bad_flags_are_refused_naming_the_flag(capsys, argv, needle):
    _refused(capsys, argv, needle)


def test_config_file_then_flags(tmp_path, capsys):
    """A .toml or .json file of settings (dashes or underscores), the flags over it; an
    unknown key or an unreadable file refused naming --config."""
    toml = tmp_path / "run.toml"
    toml.write_text('preset = "tiny"\nsteps = 7\nbatch-size = 16\nschedule = "cosine"\n')
    cfg = parse_args(["--config", str(toml), "--steps", "9"])
    assert (cfg.steps, cfg.global_batch, cfg.schedule) == (9, 16, "cosine")
    js = tmp_path / "run.json"
    js.write_text(json.dumps({"grad_accum": 2, "checkpointing": True}))
    cfg = parse_args(["--config", str(js), "--no-checkpointing"])
    assert (cfg.grad_accum, cfg.checkpointing) == (2, False)
    js.write_text(json.dumps({"learning_rate": 1.0}))
    _refused(capsys, ["--config", str(js)], "unknown setting 'learning_rate'")
    (tmp_path / "run.yaml").write_text("steps: 3\n")
    _refused(capsys, ["--config", str(tmp_path / "run.yaml")], "expected a .toml or .json")
    js.write_text(json.dumps({"batch_size": 16, "batch-size": 8}))
    _refused(capsys, ["--config", str(js)], "'batch-size' is set twice")
    toml.write_text("steps = [\n")
    _refused(capsys, ["--config", str(toml)], "--config: cannot read")


def test_presets_and_defaults():
    """Every preset freezes its X-encoder (the paper's recipe; what makes a cache valid) and
    the default batch is the preset's."""
    for name, p in PRESETS.items():
        assert p.model.freeze_x_encoder, name
        assert p.frames % p.model.x_encoder.tubelet == 0, name
        assert TrainConfig(preset=name).global_batch == p.batch_size
    assert PRESETS["tiny"].visual_tokens == 2 * 4 * 4
    assert PRESETS["paper"].visual_tokens == 8 * 16 * 16


def test_run_errors_name_the_flag(tmp_path, capsys, monkeypatch):
    """Settings valid alone but not together: exit 2 with the flag named, nothing trained."""
    out = tmp_path / "run"
    assert main(["--steps", "1", "--batch-size", "30", "--grad-accum", "4"]) == 2
    assert "--batch-size: the global batch 30 must divide by" in capsys.readouterr().err
    assert main(["--steps", "1", "--data", str(tmp_path / "nothing")]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["--steps", "1", "--data", "synthetic:8"]) == 2  # fewer samples than the batch
    assert "batch" in capsys.readouterr().err
    assert main(["--steps", "1", "--threads", "1", "--out", str(out)]) == 0
    assert main(["--steps", "2", "--threads", "1", "--out", str(out)]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert main(["--steps", "2", "--threads", "1", "--lr", "1e-3", "--resume", "--out",
                 str(out)]) == 2  # fmt: skip
    assert "lr: 0.0003 -> 0.001" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="--dist: none, but torchrun started 2 processes"):
        Trainer(TrainConfig(steps=1))


def _trainer(tmp_path, **kw) -> Trainer:
    return Trainer(TrainConfig(steps=2, threads=1, progress="off", **kw))


def test_out_is_locked_checked_and_the_trainer_rechecks_its_config(tmp_path):
    """One run per --out (a second one, even in this process, is refused while the first
    holds the lock, and may start once it closed); --out that is a file, or whose
    metrics.jsonl is a folder, refused; a TrainConfig edited after its check is checked
    again by the Trainer; step() after close() or past --steps refused."""
    out = tmp_path / "run"
    first = _trainer(tmp_path, out=str(out))
    with pytest.raises(ValueError, match="is in use by another run"):
        _trainer(tmp_path, out=str(out))
    first.step()
    first.step()
    with pytest.raises(ValueError, match=r"step: the run's 2 steps \(--steps\) are done"):
        first.step()
    first.close()
    with pytest.raises(ValueError, match="step: the trainer is closed"):
        first.step()
    _trainer(tmp_path, out=str(out)).close()  # the lock went with close()
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(ValueError, match="--out: .* exists and is not a folder"):
        _trainer(tmp_path, out=str(afile))
    (tmp_path / "m" / "metrics.jsonl").mkdir(parents=True)
    with pytest.raises(ValueError, match="metrics.jsonl exists and is not a file"):
        _trainer(tmp_path, out=str(tmp_path / "m"))
    cfg = TrainConfig(steps=2)
    cfg.grad_accum = 0
    with pytest.raises(ValueError, match="--grad-accum: expected an integer >= 1"):
        Trainer(cfg)


def test_errors_found_at_a_step_name_the_data_and_stop_cleanly(tmp_path, monkeypatch, capsys):
    """A sample that cannot be read at step N, and a loss that is not finite, end the run with
    exit 2 and a message (--data ... step N / the loss), not a traceback; nothing is saved."""
    from vljepa_fast.train import data as data_mod

    def broken(self, indices):
        raise ValueError("clip 3.npy: contains NaN")

    monkeypatch.setattr(data_mod.SyntheticData, "batch", broken)
    out = tmp_path / "run"
    assert main(["--steps", "2", "--threads", "1", "--out", str(out)]) == 2
    assert "--data: clip 3.npy: contains NaN (step 1, rank 0)" in capsys.readouterr().err
    assert not (out / "checkpoint").exists()
    monkeypatch.undo()
    monkeypatch.setattr(Trainer, "_backward", lambda self, micro: float("nan"))
    assert main(["--steps", "2", "--threads", "1", "--out", str(tmp_path / "nan")]) == 2
    assert "the loss is nan at step 1: training diverged" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncated", "empty", "distcp", "rng"])
def test_a_damaged_checkpoint_is_refused_naming_it(tmp_path, capsys, damage):
    """A complete-looking checkpoint whose files are damaged: --resume exits 2 naming the
    folder (never a traceback, never a half-loaded run)."""
    out = tmp_path / "run"
    assert main(["--steps", "4", "--stop-at", "2", "--threads", "1", "--out", str(out)]) == 0
    folder = out / "checkpoint" / "step-00000002"
    state = folder / "trainer.json"
    if damage == "truncated":
        state.write_text(state.read_text()[:40])
    elif damage == "empty":
        state.write_text("{}")
    elif damage == "distcp":
        next(folder.glob("*.distcp")).unlink()
    else:
        (folder / "rng-0.pt").write_bytes(b"garbage")
    capsys.readouterr()
    assert main(["--steps", "4", "--resume", "--threads", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"the checkpoint {folder} is damaged" in err, err


def test_config_file_edge_cases(tmp_path, capsys):
    """A JSON key given twice, an empty --config, a binary file: refused naming --config."""
    dup = tmp_path / "dup.json"
    dup.write_text('{"lr": 0.001, "lr": 0.002}')
    _refused(capsys, ["--config", str(dup)], "'lr' is set twice")
    _refused(capsys, ["--config", ""], "--config: expected a path")
    binary = tmp_path / "bin.json"
    binary.write_bytes(bytes(range(128, 256)))
    _refused(capsys, ["--config", str(binary)], "--config: cannot read")


def test_latest_never_points_outside_the_checkpoint_folder(tmp_path, capsys):
    """A `latest` naming a path (here another run's checkpoint) is not followed: the newest
    complete folder of this run is taken; a `latest` that is a folder is refused up front."""
    from vljepa_fast.train import checkpoint as ckpt

    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["--steps", "2", "--threads", "1", "--checkpoint-every", "1", "--out", str(a)]) == 0
    assert main(["--steps", "3", "--threads", "1", "--out", str(b)]) == 0
    root = a / "checkpoint"
    (root / "latest").write_text("../../b/checkpoint/step-00000003")
    assert ckpt.latest(root) == root / "step-00000002"
    (root / "latest").unlink()
    (root / "latest").mkdir()
    capsys.readouterr()
    assert main(["--steps", "4", "--threads", "1", "--resume", "--out", str(a)]) == 2
    assert "latest exists and is not a file" in capsys.readouterr().err
