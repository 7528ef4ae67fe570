"""Training presets: the model's sizes, the clip shape and the default global batch.

=======  ==========================================  =========  ==========  =====
preset   model                                       clip       batch       query
=======  ==========================================  =========  ==========  =====
tiny     ``VLJEPAConfig.tiny()``, X-encoder frozen     4 x 32^2   32          bytes
small    4-layer predictor 256 wide (GQA 8/2, head     16 x 128^2 32          bytes
         dim 32), 4-layer ViT 256 wide, byte vocab
paper    ``VLJEPAConfig.paper()`` (1.6B)               16 x 256^2 128         Llama
=======  ==========================================  =========  ==========  =====

The small preset keeps the paper's regime at a width a CPU trains: 512 visual tokens per clip
(the paper: 2048) against queries of a few dozen, so that attention over the visual tokens (and
the memory an eager implementation spends on it) weighs as it does at the paper's size; with 64
visual tokens the step would be all MLP.

The batch is global (all ranks): the paper preset's 128 is the issue's 128 per GPU on one GPU;
on G GPUs pass ``--batch-size 128*G`` for 128 per GPU.

Every preset freezes the X-encoder, as the paper does (so its features can be cached: see
``python -m vljepa_fast.train.cache_features``). The tiny and small presets speak the byte
vocabulary (:class:`~vljepa_fast.models.ByteTokenizer`); the paper preset's predictor speaks
Llama-3's, so without a tokenizer its synthetic data are token ids.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from vljepa_fast.models.config import (
    PredictorConfig,
    VLJEPAConfig,
    XEncoderConfig,
    YDecoderConfig,
    YEncoderConfig,
)

__all__ = ["PRESETS", "Preset", "preset"]


@dataclass(frozen=True)
class Preset:
    """One training preset.

    Attributes:
        name: "tiny", "small" or "paper".
        model: the model's sizes (X-encoder frozen).
        frames: frames per clip (a multiple of the X-encoder's tubelet).
        batch_size: the default global batch (samples per optimizer step, all ranks).
        query: the query of the synthetic captioning data.
    """

    name: str
    model: VLJEPAConfig
    frames: int
    batch_size: int
    query: str = "what is happening?"

    @property
    def image_size(self) -> int:
        return self.model.x_encoder.image_size

    @property
    def visual_tokens(self) -> int:
        """X-encoder tokens per clip: (frames / tubelet) x (image_size / patch)^2."""
        x = self.model.x_encoder
        return (self.frames // x.tubelet) * (x.image_size // x.patch) ** 2


def _small() -> VLJEPAConfig:
    byte = dict(vocab_size=260, pad_id=256)
    return VLJEPAConfig(
        x_encoder=XEncoderConfig(
            dim=256, depth=4, heads=4, mlp_dim=1024, patch=16, tubelet=2, image_size=128,
            max_frames=16,
        ),
        predictor=PredictorConfig(
            dim=256, layers=4, heads=8, kv_heads=2, head_dim=32, mlp_dim=1024,
            max_query_len=48, first_llama_layer=0, **byte,
        ),
        y_encoder=replace(
            YEncoderConfig.tiny(max_len=48, **byte), dim=128, mlp_dim=512, dense=(256, 128)
        ),
        y_decoder=YDecoderConfig(
            dim=64, layers=1, heads=4, mlp_dim=128, prefix_tokens=2, bos_id=257, eos_id=258,
            max_len=48, vocab_size=260,
        ),
        embed_dim=256,
    )  # fmt: skip


PRESETS: dict[str, Preset] = {
    "tiny": Preset("tiny", VLJEPAConfig.tiny().replace(freeze_x_encoder=True), 4, 32),
    "small": Preset("small", _small(), 16, 32),
    "paper": Preset("paper", VLJEPAConfig.paper(), 16, 128),
}


def preset(name: str) -> Preset:
    """The preset called ``name`` (ValueError naming the known ones otherwise)."""
    if name not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name]
