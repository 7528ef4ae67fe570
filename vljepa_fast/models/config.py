"""VL-JEPA sizes: one dataclass per module and the model's, with the paper's and a tiny preset."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from vljepa_fast.ops.rotary import LLAMA3_ROPE_SCALING

__all__ = [
    "PredictorConfig",
    "VLJEPAConfig",
    "XEncoderConfig",
    "YDecoderConfig",
    "YEncoderConfig",
]


def _positive(owner: str, **values: int) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{owner}.{name}: expected an int >= 1, got {v!r}")


@dataclass(frozen=True)
class XEncoderConfig:
    """Video ViT (V-JEPA 2 layout): 3D patches of tubelet x patch x patch, three-axis RoPE."""

    dim: int = 1024
    depth: int = 24
    heads: int = 16
    mlp_dim: int = 4096
    patch: int = 16
    tubelet: int = 2
    in_chans: int = 3
    image_size: int = 256
    max_frames: int = 64
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        _positive(
            "XEncoderConfig",
            dim=self.dim,
            depth=self.depth,
            heads=self.heads,
            mlp_dim=self.mlp_dim,
            patch=self.patch,
            tubelet=self.tubelet,
            in_chans=self.in_chans,
            image_size=self.image_size,
            max_frames=self.max_frames,
        )
        if self.dim % self.heads or (self.dim // self.heads) % 2:
            raise ValueError(
                f"XEncoderConfig.heads: dim {self.dim} / heads {self.heads} must be "
                "an even integer head dim"
            )
        if (self.dim // self.heads) < 6:
            raise ValueError("XEncoderConfig: head dim must be >= 6 (three RoPE axes)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


@dataclass(frozen=True)
class PredictorConfig:
    """Llama-3.2 decoder layers used bidirectionally (the last 8 layers of Llama-3.2-1B)."""

    dim: int = 2048
    layers: int = 8
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 64
    mlp_dim: int = 8192
    vocab_size: int = 128256
    pad_id: int = 128004
    max_query_len: int = 512
    rms_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict | None = field(default_factory=lambda: dict(LLAMA3_ROPE_SCALING))
    #: index of the first Llama layer taken by the loader (16 layers - 8 = 8)
    first_llama_layer: int = 8

    def __post_init__(self) -> None:
        _positive(
            "PredictorConfig",
            dim=self.dim,
            layers=self.layers,
            heads=self.heads,
            kv_heads=self.kv_heads,
            head_dim=self.head_dim,
            mlp_dim=self.mlp_dim,
            vocab_size=self.vocab_size,
            max_query_len=self.max_query_len,
        )
        if self.heads % self.kv_heads:
            raise ValueError(
                f"PredictorConfig.kv_heads: must divide heads ({self.heads}), got {self.kv_heads}"
            )
        if not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(
                f"PredictorConfig.pad_id: expected 0 <= pad_id < vocab_size "
                f"({self.vocab_size}), got {self.pad_id}"
            )


@dataclass(frozen=True)
class YEncoderConfig:
    """Built-in bidirectional text encoder (EmbeddingGemma-300M sizes in the paper preset)."""

    dim: int = 768
    layers: int = 24
    heads: int = 3
    kv_heads: int = 1
    head_dim: int = 256
    mlp_dim: int = 1152
    vocab_size: int = 262144
    pad_id: int = 0
    max_len: int = 512
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    #: learning-rate multiplier of the Y-encoder's parameters (paper: 0.05)
    lr_multiplier: float = 0.05

    def __post_init__(self) -> None:
        _positive(
            "YEncoderConfig",
            dim=self.dim,
            layers=self.layers,
            heads=self.heads,
            kv_heads=self.kv_heads,
            head_dim=self.head_dim,
            mlp_dim=self.mlp_dim,
            vocab_size=self.vocab_size,
            max_len=self.max_len,
        )
        if self.heads % self.kv_heads:
            raise ValueError(
                f"YEncoderConfig.kv_heads: must divide heads ({self.heads}), got {self.kv_heads}"
            )


@dataclass(frozen=True)
class YDecoderConfig:
    """Small causal text decoder conditioned on an embedding through prefix tokens."""

    dim: int = 512
    layers: int = 4
    heads: int = 8
    mlp_dim: int = 2048
    prefix_tokens: int = 4
    vocab_size: int = 128256
    bos_id: int = 128000
    eos_id: int = 128001
    max_len: int = 128
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        _positive(
            "YDecoderConfig",
            dim=self.dim,
            layers=self.layers,
            heads=self.heads,
            mlp_dim=self.mlp_dim,
            prefix_tokens=self.prefix_tokens,
            vocab_size=self.vocab_size,
            max_len=self.max_len,
        )
        if self.dim % self.heads or (self.dim // self.heads) % 2:
            raise ValueError(
                f"YDecoderConfig.heads: dim {self.dim} / heads {self.heads} must be "
                "an even integer head dim"
            )


@dataclass(frozen=True)
class VLJEPAConfig:
    """The whole model.

    Attributes:
        x_encoder, predictor, y_encoder, y_decoder: per-module sizes.
        embed_dim: the shared embedding space (1536 in the paper).
        temperature: InfoNCE temperature (initial value when learnable).
        learnable_temperature: CLIP's learnable log-scale, init log(1 / temperature), the scale
            clamped at ``max_logit_scale``.
        max_logit_scale: clamp of exp(log-scale) (CLIP: 100).
        freeze_x_encoder: the paper freezes the V-JEPA 2 encoder (and may cache its features).
    """

    x_encoder: XEncoderConfig = field(default_factory=XEncoderConfig)
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    y_encoder: YEncoderConfig = field(default_factory=YEncoderConfig)
    y_decoder: YDecoderConfig = field(default_factory=YDecoderConfig)
    embed_dim: int = 1536
    temperature: float = 0.07
    learnable_temperature: bool = True
    max_logit_scale: float = 100.0
    freeze_x_encoder: bool = True

    def __post_init__(self) -> None:
        _positive("VLJEPAConfig", embed_dim=self.embed_dim)
        if not self.temperature > 0:
            raise ValueError(f"VLJEPAConfig.temperature: expected > 0, got {self.temperature}")

    @classmethod
    def paper(cls) -> VLJEPAConfig:
        """The sizes of the paper (1.6B parameters; the Y-decoder is the library's choice)."""
        return cls()

    @classmethod
    def tiny(
        cls, vocab_size: int = 260, pad_id: int = 256, bos_id: int = 257, eos_id: int = 258
    ) -> VLJEPAConfig:
        """A few hundred thousand parameters for tests and CPU examples (byte-level vocab).

        The defaults match :class:`vljepa_fast.models.ByteTokenizer`; 32x32 frames in 8x8
        patches, tubelet 2.
        """
        return cls(
            x_encoder=XEncoderConfig(
                dim=64,
                depth=2,
                heads=4,
                mlp_dim=128,
                patch=8,
                tubelet=2,
                image_size=32,
                max_frames=16,
            ),
            predictor=PredictorConfig(
                dim=64,
                layers=2,
                heads=4,
                kv_heads=2,
                head_dim=16,
                mlp_dim=128,
                vocab_size=vocab_size,
                pad_id=pad_id,
                max_query_len=48,
                first_llama_layer=2,
            ),
            y_encoder=YEncoderConfig(
                dim=64,
                layers=2,
                heads=4,
                kv_heads=2,
                head_dim=16,
                mlp_dim=128,
                vocab_size=vocab_size,
                pad_id=pad_id,
                max_len=48,
            ),
            y_decoder=YDecoderConfig(
                dim=64,
                layers=2,
                heads=4,
                mlp_dim=128,
                prefix_tokens=2,
                vocab_size=vocab_size,
                bos_id=bos_id,
                eos_id=eos_id,
                max_len=48,
            ),
            embed_dim=32,
            freeze_x_encoder=False,
        )

    def replace(self, **changes) -> VLJEPAConfig:
        """A copy with some fields changed (dataclasses.replace)."""
        return replace(self, **changes)
