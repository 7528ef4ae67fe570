"""VL-JEPA sizes: one dataclass per module and the model's, with the paper's and a tiny preset."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar

from vljepa_fast.ops.rotary import LLAMA3_ROPE_SCALING

__all__ = [
    "PredictorConfig",
    "VLJEPAConfig",
    "XEncoderConfig",
    "YDecoderConfig",
    "YEncoderConfig",
]


class _Checked:
    """Base of the configs: ``__post_init__`` checks that every field named in ``_POSITIVE`` is
    an int >= 1 (in that order), then runs the config's own :meth:`_check`."""

    _POSITIVE: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for name in self._POSITIVE:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{owner}.{name}: expected an int >= 1, got {v!r}")
        self._check()

    def _check(self) -> None:
        pass

    def _check_kv_heads(self) -> None:
        """GQA: kv_heads divides heads."""
        if self.heads % self.kv_heads:
            raise ValueError(
                f"{type(self).__name__}.kv_heads: must divide heads ({self.heads}), got "
                f"{self.kv_heads}"
            )

    def _check_even_head_dim(self) -> None:
        """dim / heads is an integer and even (RoPE pairs)."""
        if self.dim % self.heads or (self.dim // self.heads) % 2:
            raise ValueError(
                f"{type(self).__name__}.heads: dim {self.dim} / heads {self.heads} must be "
                "an even integer head dim"
            )


@dataclass(frozen=True)
class XEncoderConfig(_Checked):
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

    _POSITIVE = (
        "dim", "depth", "heads", "mlp_dim", "patch", "tubelet", "in_chans", "image_size",
        "max_frames",
    )  # fmt: skip

    def _check(self) -> None:
        self._check_even_head_dim()
        if (self.dim // self.heads) < 6:
            raise ValueError("XEncoderConfig: head dim must be >= 6 (three RoPE axes)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


@dataclass(frozen=True)
class PredictorConfig(_Checked):
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

    _POSITIVE = (
        "dim", "layers", "heads", "kv_heads", "head_dim", "mlp_dim", "vocab_size",
        "max_query_len",
    )  # fmt: skip

    def _check(self) -> None:
        self._check_kv_heads()
        if not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(
                f"PredictorConfig.pad_id: expected 0 <= pad_id < vocab_size "
                f"({self.vocab_size}), got {self.pad_id}"
            )


@dataclass(frozen=True)
class YEncoderConfig(_Checked):
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

    _POSITIVE = (
        "dim", "layers", "heads", "kv_heads", "head_dim", "mlp_dim", "vocab_size", "max_len",
    )  # fmt: skip
    _check = _Checked._check_kv_heads


@dataclass(frozen=True)
class YDecoderConfig(_Checked):
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

    _POSITIVE = (
        "dim", "layers", "heads", "mlp_dim", "prefix_tokens", "vocab_size", "max_len",
    )  # fmt: skip
    _check = _Checked._check_even_head_dim


@dataclass(frozen=True)
class VLJEPAConfig(_Checked):
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

    _POSITIVE = ("embed_dim",)

    def _check(self) -> None:
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
        # the predictor and the text encoder share their sizes
        text = dict(
            dim=64,
            layers=2,
            heads=4,
            kv_heads=2,
            head_dim=16,
            mlp_dim=128,
            vocab_size=vocab_size,
            pad_id=pad_id,
        )
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
            predictor=PredictorConfig(**text, max_query_len=48, first_llama_layer=2),
            y_encoder=YEncoderConfig(**text, max_len=48),
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
