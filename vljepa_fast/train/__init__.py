"""Training VL-JEPA: ``python -m vljepa_fast.train`` (one process, or torchrun with DDP or
FSDP2), feature caches (``python -m vljepa_fast.train.cache_features``), presets.

    from vljepa_fast.train import TrainConfig, Trainer
    trainer = Trainer(TrainConfig(preset="tiny", steps=20, out="runs/tiny"))
    metrics = trainer.fit()      # or trainer.step() one optimizer step at a time
    trainer.close()

See docs/training.md.
"""

from vljepa_fast.train.config import TrainConfig, parse_args
from vljepa_fast.train.presets import PRESETS, Preset, preset
from vljepa_fast.train.trainer import Trainer

__all__ = ["PRESETS", "Preset", "TrainConfig", "Trainer", "parse_args", "preset"]
