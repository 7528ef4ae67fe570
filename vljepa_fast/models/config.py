"""VL-JEPA sizes: one dataclass per module and the model's, with the paper's and a tiny preset."""

from __future__ import annotations

import math
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
    """Video ViT (V-JEPA 2 layout): 3D patches of tubelet x patch x patch, three-axis RoPE.

    ``position_mode`` picks the RoPE coordinates of the tokens (the two agree at the crop size
    ``image_size``; see :class:`~vljepa_fast.models.XEncoder`): ``"original"`` (default) the
    (t, h, w) grid coordinates of the input at its own resolution, as facebookresearch/vjepa2;
    ``"transformers"`` the flat token index decomposed with the crop grid
    (``image_size // patch`` patches a row), as transformers' ``VJEPA2Model``.
    """

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
    #: "original" (facebookresearch/vjepa2) or "transformers" (VJEPA2Model) RoPE positions
    position_mode: str = "original"

    _POSITIVE = (
        "dim", "depth", "heads", "mlp_dim", "patch", "tubelet", "in_chans", "image_size",
        "max_frames",
    )  # fmt: skip
    POSITION_MODES: ClassVar[tuple[str, ...]] = ("original", "transformers")

    def _check(self) -> None:
        if self.position_mode not in self.POSITION_MODES:
            raise ValueError(
                f"XEncoderConfig.position_mode: expected one of {self.POSITION_MODES}, got "
                f"{self.position_mode!r}"
            )
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


#: transformers' names of the two attention kinds of a Gemma-3 layer
SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass(frozen=True)
class YEncoderConfig(_Checked):
    """Built-in bidirectional Gemma-3 text encoder (EmbeddingGemma-300M's sizes by default).

    The backbone is transformers' ``Gemma3TextModel`` with ``use_bidirectional_attention``;
    after it come sentence-transformers' mean pooling, the Dense stack and the L2 normalisation
    (EmbeddingGemma's modules), then the library's linear head to the shared space.

    Attributes:
        dim, layers, heads, kv_heads, head_dim, mlp_dim, vocab_size: the backbone's sizes
            (hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim,
            intermediate_size, vocab_size).
        pad_id: the padding token (a mask derived from it when none is given; the embedding
            row takes no gradient, as transformers' ``padding_idx``).
        max_len: the longest token sequence accepted (= max_position_embeddings).
        norm_eps: rms_norm_eps of every RMSNorm.
        rope_theta: RoPE base of the global (full-attention) layers.
        rope_local_theta: RoPE base of the sliding-window layers (rope_local_base_freq).
        sliding_window: transformers' ``sliding_window`` as written in config.json (512). A
            sliding layer of the bidirectional model lets query i see key j iff
            |i - j| <= sliding_window // 2 (transformers halves the window when bidirectional).
        layer_types: "sliding_attention" / "full_attention" per layer; None: every
            ``sliding_window_pattern``-th layer is full, the others sliding (Gemma-3's rule).
        sliding_window_pattern: the period of that rule (6).
        query_pre_attn_scalar: the attention scale is query_pre_attn_scalar ** -0.5.
        dense: out_features of the sentence-transformers Dense layers after the pooling, in
            order ((3072, 768) for EmbeddingGemma; () for none). Identity activations.
        dense_bias: whether those Dense layers have biases (EmbeddingGemma: no).
        normalize: L2-normalise the pooled (and densed) embedding before the head.
        lr_multiplier: learning-rate multiplier of the Y-encoder's parameters (paper: 0.05).
    """

    dim: int = 768
    layers: int = 24
    heads: int = 3
    kv_heads: int = 1
    head_dim: int = 256
    mlp_dim: int = 1152
    vocab_size: int = 262144
    pad_id: int = 0
    max_len: int = 2048
    norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_local_theta: float = 10_000.0
    sliding_window: int = 512
    layer_types: tuple[str, ...] | None = None
    sliding_window_pattern: int = 6
    query_pre_attn_scalar: float = 256.0
    dense: tuple[int, ...] = (3072, 768)
    dense_bias: bool = False
    normalize: bool = True
    #: learning-rate multiplier of the Y-encoder's parameters (paper: 0.05)
    lr_multiplier: float = 0.05

    _POSITIVE = (
        "dim", "layers", "heads", "kv_heads", "head_dim", "mlp_dim", "vocab_size", "max_len",
        "sliding_window", "sliding_window_pattern",
    )  # fmt: skip

    def _check(self) -> None:
        self._check_kv_heads()
        name = "YEncoderConfig"
        if self.head_dim % 2:
            raise ValueError(f"{name}.head_dim: expected an even head dim, got {self.head_dim}")
        if not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(
                f"{name}.pad_id: expected 0 <= pad_id < vocab_size ({self.vocab_size}), got "
                f"{self.pad_id}"
            )
        for f in ("rope_theta", "rope_local_theta"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 1 < v < math.inf:
                raise ValueError(f"{name}.{f}: expected a finite number > 1, got {v!r}")
        for f in ("norm_eps", "query_pre_attn_scalar"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
                raise ValueError(f"{name}.{f}: expected a finite number > 0, got {v!r}")
        if self.layer_types is not None:
            if not isinstance(self.layer_types, tuple) or len(self.layer_types) != self.layers:
                raise ValueError(
                    f"{name}.layer_types: expected a tuple of {self.layers} (layers) names, got "
                    f"{self.layer_types!r}"
                )
            bad = sorted({t for t in self.layer_types if t not in (SLIDING, FULL)}, key=str)
            if bad:
                raise ValueError(
                    f"{name}.layer_types: expected {SLIDING!r} or {FULL!r}, got {bad!r}"
                )
        if not isinstance(self.dense, tuple) or any(
            isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in self.dense
        ):
            raise ValueError(f"{name}.dense: expected a tuple of ints >= 1, got {self.dense!r}")

    @property
    def attention_types(self) -> tuple[str, ...]:
        """Each layer's kind, ``layer_types`` or the Gemma-3 rule (layer i is full iff
        (i + 1) % sliding_window_pattern == 0)."""
        if self.layer_types is not None:
            return self.layer_types
        p = self.sliding_window_pattern
        return tuple(FULL if (i + 1) % p == 0 else SLIDING for i in range(self.layers))

    @property
    def window_size(self) -> tuple[int, int]:
        """vf.attention's window of a sliding layer: (sliding_window // 2,) * 2."""
        return (self.sliding_window // 2, self.sliding_window // 2)

    @property
    def out_dim(self) -> int:
        """Width of the sentence embedding the head reads (the last Dense, else dim)."""
        return self.dense[-1] if self.dense else self.dim

    @classmethod
    def paper(cls) -> YEncoderConfig:
        """EmbeddingGemma-300M (google/embeddinggemma-300m's config.json and its
        sentence-transformers modules: mean pooling, Dense 768 -> 3072 -> 768, Normalize)."""
        return cls()

    @classmethod
    def tiny(cls, vocab_size: int = 260, pad_id: int = 256, max_len: int = 48) -> YEncoderConfig:
        """Two layers, one sliding (reach 8 tokens each side) and one global, GQA 4/2,
        a Dense 64 -> 128 -> 64 stack: for tests and CPU examples (byte-level vocab)."""
        return cls(
            dim=64,
            layers=2,
            heads=4,
            kv_heads=2,
            head_dim=16,
            mlp_dim=128,
            vocab_size=vocab_size,
            pad_id=pad_id,
            max_len=max_len,
            sliding_window=16,
            layer_types=(SLIDING, FULL),
            query_pre_attn_scalar=16.0,
            dense=(128, 64),
        )

    @classmethod
    def from_gemma3_config(cls, config: object, **changes) -> YEncoderConfig:
        """The config of a transformers ``Gemma3TextConfig`` (or its config.json as a dict).

        ``changes`` override fields afterwards (e.g. ``dense``, ``normalize``, ``max_len``;
        by default no Dense layer and no normalisation: a bare Gemma3TextModel).

        Raises:
            ValueError: a config the built-in encoder does not implement (named): not
                bidirectional, attention biases, logit soft-capping, an activation other than
                gelu_pytorch_tanh, a RoPE type other than "default", a missing field.
        """
        d = config.to_dict() if hasattr(config, "to_dict") else dict(config)  # type: ignore
        return cls(**{**_gemma3_fields(d), "dense": (), "normalize": False, **changes})


def _gemma3_fields(d: dict) -> dict:
    """YEncoderConfig fields from a Gemma3TextConfig dict (config.json), refusing what the
    built-in encoder does not implement."""
    where = "Gemma-3 config"
    if d.get("model_type", "gemma3_text") != "gemma3_text":
        raise ValueError(f"{where}: expected model_type 'gemma3_text', got {d['model_type']!r}")
    if not d.get("use_bidirectional_attention", False):
        raise ValueError(
            f"{where}: use_bidirectional_attention is not true: a causal Gemma-3; the built-in "
            "encoder is bidirectional (EmbeddingGemma). Build a YEncoderConfig by hand and load "
            "the weights with load_gemma3_state_dict to use causal weights bidirectionally"
        )
    unsupported = {
        "attention_bias": (False, None),
        "attn_logit_softcapping": (None,),
        "hidden_activation": ("gelu_pytorch_tanh", None),
    }
    for key, fine in unsupported.items():
        if key in d and d[key] not in fine:
            raise ValueError(f"{where}: {key}={d[key]!r} is not implemented (expected {fine[0]!r})")
    required = (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "head_dim", "intermediate_size", "vocab_size", "max_position_embeddings",
    )  # fmt: skip
    absent = [k for k in required if d.get(k) is None]
    if absent:
        raise ValueError(f"{where}: missing fields {absent}")
    theta, local = d.get("rope_theta", 1_000_000.0), d.get("rope_local_base_freq", 10_000.0)
    rope = d.get("rope_parameters") or {}
    if rope:
        for kind in (FULL, SLIDING):
            p = rope.get(kind) or {}
            if p.get("rope_type", "default") != "default":
                raise ValueError(
                    f"{where}: rope_parameters[{kind!r}] rope_type {p['rope_type']!r} is not "
                    "implemented (expected 'default')"
                )
        theta = (rope.get(FULL) or {}).get("rope_theta", theta)
        local = (rope.get(SLIDING) or {}).get("rope_theta", local)
    elif d.get("rope_scaling") is not None:
        raise ValueError(f"{where}: rope_scaling {d['rope_scaling']!r} is not implemented")
    layer_types = d.get("layer_types")
    fields = dict(
        dim=d["hidden_size"],
        layers=d["num_hidden_layers"],
        heads=d["num_attention_heads"],
        kv_heads=d["num_key_value_heads"],
        head_dim=d["head_dim"],
        mlp_dim=d["intermediate_size"],
        vocab_size=d["vocab_size"],
        pad_id=d.get("pad_token_id", 0) if d.get("pad_token_id") is not None else 0,
        max_len=d["max_position_embeddings"],
        norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_local_theta=float(local),
        query_pre_attn_scalar=d.get("query_pre_attn_scalar", 256),
        layer_types=None if layer_types is None else tuple(layer_types),
        sliding_window_pattern=d.get("sliding_window_pattern", d.get("_sliding_window_pattern", 6)),
    )
    types = layer_types or ()
    if d.get("sliding_window") is None:
        if SLIDING in types or layer_types is None:
            raise ValueError(f"{where}: sliding layers but no sliding_window")
    else:
        fields["sliding_window"] = d["sliding_window"]
    return fields


@dataclass(frozen=True)
class YDecoderConfig(_Checked):
    """Small causal text decoder conditioned on an embedding through prefix tokens.

    :class:`~vljepa_fast.models.VLJEPA` builds it as ``model.y_decoder`` (trained separately
    from the InfoNCE loss, see ``VLJEPA.decoder_loss``). The paper preset speaks Llama-3's
    vocabulary: BOS ``<|begin_of_text|>`` = 128000, EOS ``<|end_of_text|>`` = 128001 (the
    library's choice: the paper does not specify its decoder).
    """

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

    def _check(self) -> None:
        self._check_even_head_dim()
        for name in ("bos_id", "eos_id"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < self.vocab_size:
                raise ValueError(
                    f"YDecoderConfig.{name}: expected an int in [0, vocab_size = "
                    f"{self.vocab_size}), got {v!r}"
                )
        if self.bos_id == self.eos_id:
            raise ValueError(f"YDecoderConfig.eos_id: must differ from bos_id ({self.bos_id})")
        if self.max_len < 2:
            raise ValueError(
                f"YDecoderConfig.max_len: expected >= 2 (BOS, EOS), got {self.max_len}"
            )


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
            y_encoder=YEncoderConfig.tiny(vocab_size=vocab_size, pad_id=pad_id, max_len=48),
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
