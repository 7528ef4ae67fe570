"""Y-encoder: text -> target embedding. A built-in bidirectional Gemma-3 encoder, or any
transformers one.

:class:`TextEncoder` is transformers' ``Gemma3TextModel`` run bidirectionally (EmbeddingGemma's
backbone) on :func:`vljepa_fast.attention` and :func:`vljepa_fast.apply_rotary`, followed by
EmbeddingGemma's sentence-transformers modules (mean pooling over the real tokens, a Dense stack
without biases or activations, L2 normalisation) and the library's linear head to the shared
space. Its parameter names are transformers' (``embed_tokens``, ``layers.N.self_attn.q_proj``,
..., ``norm``), so :func:`load_gemma3_state_dict` maps a ``Gemma3TextModel`` state dict key for
key and :func:`load_gemma3_folder` reads a local EmbeddingGemma (sentence-transformers) folder.

:class:`HFTextEncoder` wraps any transformers encoder (e.g. all-MiniLM-L6-v2); loaded from a
sentence-transformers folder it keeps the folder's Dense stack and normalisation.

Both carry ``lr_multiplier`` (the paper trains the Y-encoder at 0.05x the learning rate; see
:meth:`vljepa_fast.models.VLJEPA.param_groups`).
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vljepa_fast import _backends
from vljepa_fast._backends import BackendSpec
from vljepa_fast.models._layers import (
    GatedMLP,
    LoadResult,
    Source,
    check_tokens,
    load_mapped,
    masked_mean,
)
from vljepa_fast.models.checkpoint_files import read_json, read_state_dict
from vljepa_fast.models.config import SLIDING, YEncoderConfig
from vljepa_fast.nn import PredictorAttention

__all__ = [
    "GEMMA3_LAYOUTS",
    "HFTextEncoder",
    "TextEncoder",
    "load_gemma3_folder",
    "load_gemma3_state_dict",
]


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: ``x / sqrt(mean(x^2) + eps) * (1 + weight)`` over the last dim.

    The weight starts at zero (a unit scale), as transformers' ``Gemma3RMSNorm``; the math runs
    in float32 (float64 for float64 inputs) and the result is cast back to x's dtype.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        ct = torch.float64 if x.dtype == torch.float64 else torch.float32
        scale = 1.0 + self.weight.to(ct)
        return F.rms_norm(x.to(ct), (x.shape[-1],), weight=scale, eps=self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class GeGLU(GatedMLP):
    """Gemma's MLP: ``down(gelu_tanh(gate(x)) * up(x))`` (transformers' Gemma3MLP)."""

    def act(self, x: Tensor) -> Tensor:
        return F.gelu(x, approximate="tanh")


class GemmaAttention(PredictorAttention):
    """Gemma-3 attention, bidirectional: q/k projections, RMSNorm of each query and key head
    (``q_norm``, ``k_norm`` over head_dim), RoPE (llama layout), vf.attention with scale
    ``query_pre_attn_scalar ** -0.5`` and, on sliding layers, ``window_size`` =
    (sliding_window // 2,) * 2, i.e. key j is seen from query i iff |i - j| <= sliding_window // 2.

    A :class:`~vljepa_fast.nn.PredictorAttention` (same projections, names and backend rules)
    with the Gemma additions; sliding layers use ``rope_local_theta``, global ones
    ``rope_theta``.
    """

    def __init__(self, cfg: YEncoderConfig, layer_type: str, backend: BackendSpec) -> None:
        sliding = layer_type == SLIDING
        super().__init__(
            cfg.dim,
            cfg.heads,
            cfg.kv_heads,
            cfg.head_dim,
            rope_theta=cfg.rope_local_theta if sliding else cfg.rope_theta,
            rope_scaling=None,
            max_position_embeddings=cfg.max_len,
            causal=False,
            backend=backend,
            window_size=cfg.window_size if sliding else (-1, -1),
        )
        self.layer_type = layer_type
        self.scaling = float(cfg.query_pre_attn_scalar) ** -0.5
        self.q_norm = GemmaRMSNorm(cfg.head_dim, eps=cfg.norm_eps)
        self.k_norm = GemmaRMSNorm(cfg.head_dim, eps=cfg.norm_eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, layer_type={self.layer_type!r}"

    def norm_qk(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """Gemma-3's RMSNorm of every query and key head (over head_dim), before RoPE."""
        return self.q_norm(q), self.k_norm(k)


class GemmaLayer(nn.Module):
    """One Gemma-3 layer with its four norms (transformers' ``Gemma3DecoderLayer`` names):
    ``x + post_attention_layernorm(attn(input_layernorm(x)))``, then
    ``x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))``."""

    def __init__(self, cfg: YEncoderConfig, layer_type: str, backend: BackendSpec) -> None:
        super().__init__()
        self.self_attn = GemmaAttention(cfg, layer_type, backend)
        self.mlp = GeGLU(cfg.dim, cfg.mlp_dim)
        self.input_layernorm = GemmaRMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.post_attention_layernorm = GemmaRMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, x: Tensor, mask: Tensor, rotary: tuple[Tensor, Tensor]) -> Tensor:
        a = self.self_attn(self.input_layernorm(x), mask, rotary=rotary)
        x = x + self.post_attention_layernorm(a)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class TextEncoder(_backends.HoldsBackend, nn.Module):
    """Built-in Y-encoder: a bidirectional Gemma-3 text encoder (EmbeddingGemma) on vf.attention.

    ids -> ``embed_tokens(ids) * sqrt(dim)`` (the factor rounded to float32, then to the
    weights' dtype, as transformers) -> ``layers`` (Gemma-3 layers, sliding or global per
    ``cfg.attention_types``) -> ``norm`` -> mean over the real tokens -> ``dense`` (Linear
    layers, identity activations) -> L2 normalisation (``cfg.normalize``) -> ``head`` (Linear to
    ``embed_dim``, with bias).

    Parameter names are transformers' ``Gemma3TextModel``'s plus ``dense.N`` and ``head``
    (see :func:`load_gemma3_state_dict`, :func:`load_gemma3_folder`). Random init: the token
    embeddings N(0, 1/dim) (unit-RMS scaled embeddings; the PAD row zero and without gradient,
    as transformers' ``padding_idx``), the norms' weights zero (unit scale), the Linear layers
    PyTorch's default.

    Args:
        cfg: sizes.
        embed_dim: the shared embedding space (1536 in the paper).
        backend: a :data:`~vljepa_fast._backends.BackendSpec` for every op the layers call
            (attention, rotary), as :class:`~vljepa_fast.models.Predictor`'s.
    """

    def __init__(self, cfg: YEncoderConfig, embed_dim: int, backend: BackendSpec = "auto") -> None:
        super().__init__()
        self.cfg, self.backend = cfg, _backends.check_spec(backend, ops=("attention", "rotary"))
        self.lr_multiplier = cfg.lr_multiplier
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim, padding_idx=cfg.pad_id)
        with torch.no_grad():
            nn.init.normal_(self.embed_tokens.weight, std=cfg.dim**-0.5)
            self.embed_tokens.weight[cfg.pad_id].zero_()
        # transformers keeps sqrt(hidden) in a float32 buffer cast to the weights' dtype
        self.register_buffer(
            "embed_scale", torch.tensor(cfg.dim**0.5, dtype=torch.float32), persistent=False
        )
        self.layers = nn.ModuleList(GemmaLayer(cfg, t, self.backend) for t in cfg.attention_types)
        self.norm = GemmaRMSNorm(cfg.dim, eps=cfg.norm_eps)
        dims = (cfg.dim, *cfg.dense)
        self.dense = nn.ModuleList(
            nn.Linear(a, b, bias=cfg.dense_bias) for a, b in zip(dims, dims[1:])
        )
        self.head = nn.Linear(cfg.out_dim, embed_dim)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, embed_dim: int, backend: BackendSpec = "auto", **kwargs
    ) -> TextEncoder:
        """:func:`load_gemma3_folder` (a local EmbeddingGemma / Gemma-3 folder)."""
        return load_gemma3_folder(path, embed_dim, backend=backend, **kwargs)

    def _mask(self, ids: Tensor, mask: Tensor | None) -> Tensor:
        c = self.cfg
        if mask is None and isinstance(ids, Tensor):
            mask = ids != c.pad_id
        return check_tokens("text ids", ids, mask, c.vocab_size, c.max_len)

    def last_hidden_state(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        """transformers' ``Gemma3TextModel(...).last_hidden_state``: ids [B, L] int64
        right-padded, mask [B, L] bool (None: from pad_id) -> [B, L, dim] in the weights' dtype.
        Rows at PAD positions attend the real keys of their window (zeros when it holds none)
        and are not part of any pooled output."""
        return self._hidden(ids, self._mask(ids, mask))

    def _hidden(self, ids: Tensor, mask: Tensor) -> Tensor:
        mask = mask.to(self.embed_tokens.weight.device)
        x = self.embed_tokens(ids)
        x = x * self.embed_scale.to(x.dtype)
        positions = torch.arange(ids.shape[1], device=x.device)
        tables: dict[str, tuple[Tensor, Tensor]] = {}
        for layer in self.layers:
            attn = layer.self_attn
            if attn.layer_type not in tables:
                tables[attn.layer_type] = attn.rotary_tables(positions, x.dtype)
            x = layer(x, mask, tables[attn.layer_type])
        return self.norm(x)

    def embed(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        """The sentence-transformers embedding (pooled, densed, normalised; before the head):
        [B, L] ids (mask as :meth:`last_hidden_state`) -> [B, cfg.out_dim]."""
        mask = self._mask(ids, mask)
        hidden = self._hidden(ids, mask)
        x = masked_mean(hidden, mask.to(hidden.device))
        for layer in self.dense:
            x = layer(x)
        return F.normalize(x, p=2.0, dim=-1) if self.cfg.normalize else x

    def forward(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        """ids [B, L] int64 right-padded, mask [B, L] bool (None: from pad_id) -> [B, embed_dim]."""
        return self.head(self.embed(ids, mask))


# ------------------------------------------------------------------------------------------
# loaders (local files only)
# ------------------------------------------------------------------------------------------

_GEMMA3_MARK = re.compile(r"layers\.\d+\.(self_attn\.q_norm|pre_feedforward_layernorm)\.weight")
_BACKBONE = ("embed_tokens.", "layers.", "norm.")
#: the layouts :func:`load_gemma3_state_dict` reads
GEMMA3_LAYOUTS = ("transformers", "vljepa_fast")


def _detect_gemma3(state: Mapping[str, Tensor]) -> tuple[str, str]:
    """(layout, key prefix) of a Gemma-3 state dict, or a ValueError naming what was seen."""
    prefixes = {
        p
        for p in ("model.", "")
        for k in state
        if k.startswith(p) and _GEMMA3_MARK.fullmatch(k[len(p) :])
    }
    if len(prefixes) == 1:
        (prefix,) = prefixes
        own = not prefix and any(k.startswith(("dense.", "head.")) for k in state)
        return ("vljepa_fast" if own else "transformers"), prefix
    if prefixes:
        raise ValueError(
            "Gemma-3 state dict: layers both with and without the 'model.' prefix; expected one"
        )
    shown = ", ".join(sorted(state)[:5]) or "(empty)"
    hint = ""
    if any(".language_model." in k or k.startswith("language_model.") for k in state):
        hint = (
            " (a multimodal Gemma3ForConditionalGeneration: keep its language model's keys, "
            "e.g. model.language_model.X -> X)"
        )
    raise ValueError(
        "Gemma-3 state dict: unknown layout; expected transformers' Gemma3TextModel keys "
        "(embed_tokens.weight, layers.N.self_attn.q_norm.weight, ..., norm.weight), "
        f"optionally under 'model.', or a TextEncoder's state_dict; got keys {shown}{hint}"
    )


def load_gemma3_state_dict(
    encoder: TextEncoder, state: Mapping[str, Tensor], *, layout: str = "auto"
) -> LoadResult:
    """Load a Gemma-3 text model's weights into the built-in encoder.

    Layouts (``layout="auto"`` detects which; name one to insist on it):

    * ``"transformers"``: ``Gemma3TextModel`` keys (EmbeddingGemma's model.safetensors:
      ``embed_tokens.weight``, ``layers.N.{self_attn,mlp,*_layernorm}.*``, ``norm.weight``), or
      the same under ``model.`` (``Gemma3ForCausalLM``); the backbone loads, ``dense`` and
      ``head`` keep their values.
    * ``"vljepa_fast"``: a :class:`TextEncoder`'s own ``state_dict()``: every key, ``dense``
      and ``head`` included (an exact round trip).

    Ignored (listed in the result): ``lm_head.weight`` (Gemma3ForCausalLM's, tied to the
    embeddings) and RoPE buffers (``*.inv_freq``). Any other key is unexpected. Values are
    copied into the encoder's dtype.

    Returns:
        :class:`~vljepa_fast.models.LoadResult`: the layout found and the ignored keys.

    Raises:
        ValueError: an unknown or mixed layout, an unknown ``layout``, or keys that do not fit:
            missing, unexpected, mis-shaped, each named in the checkpoint's naming. Nothing is
            loaded then.
    """
    if not isinstance(encoder, TextEncoder):
        raise ValueError(f"encoder: expected a TextEncoder, got {type(encoder).__name__}")
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise ValueError(f"state: expected a mapping of str keys, got {type(state).__name__}")
    if layout not in ("auto", *GEMMA3_LAYOUTS):
        raise ValueError(f"layout: expected 'auto' or one of {GEMMA3_LAYOUTS}, got {layout!r}")
    found, prefix = _detect_gemma3(state)
    if layout not in ("auto", found):
        raise ValueError(f"Gemma-3 state dict: layout {layout!r} requested, the keys are {found!r}")
    whole = found == "vljepa_fast"
    plan = {
        k: Source((prefix + k,), (tuple(v.shape),))
        for k, v in encoder.state_dict().items()
        if whole or k.startswith(_BACKBONE)
    }

    def ignore(key: str) -> bool:
        return key == "lm_head.weight" or key.endswith("inv_freq")

    ignored = load_mapped(
        encoder, state, plan, f"Gemma-3 state dict ({found} layout)", ignore=ignore
    )
    return LoadResult(found, ignored)


def _read_json(path: Path, kind: type = dict):
    """A JSON file's content (checkpoint_files.read_json), checked to be a ``kind`` (an object;
    a list for modules.json)."""
    d = read_json(path)
    if not isinstance(d, kind):
        want = "a JSON object" if kind is dict else "a JSON list"
        raise ValueError(f"{path}: expected {want}, got {type(d).__name__}")
    return d


@dataclass
class SentenceTransformersStack:
    """What a sentence-transformers folder's modules.json describes (the supported subset:
    Transformer, mean Pooling, Dense layers with identity activations, Normalize).

    Attributes:
        transformer: folder of the Transformer module (config.json, weights, tokenizer).
        dense: (folder, config.json dict) of each Dense module, in order.
        normalize: a Normalize module ends the stack.
        max_seq_length: sentence_bert_config.json's max_seq_length, if any.
    """

    transformer: Path
    dense: list[tuple[Path, dict]] = field(default_factory=list)
    normalize: bool = False
    max_seq_length: int | None = None

    def dense_dims(self, hidden: int) -> tuple[tuple[int, ...], bool]:
        """(out_features of each Dense, bias) after checking the chain starts at ``hidden``,
        is consistent, has identity activations and one bias setting."""
        dims, biases, prev = [], set(), hidden
        for folder, conf in self.dense:
            fin, fout = conf.get("in_features"), conf.get("out_features")
            act = str(conf.get("activation_function", "torch.nn.modules.activation.Tanh"))
            if fin != prev or not isinstance(fout, int):
                raise ValueError(
                    f"{folder}: Dense in_features {fin} / out_features {fout}; expected "
                    f"in_features {prev} (the previous module's width)"
                )
            if not act.endswith("Identity"):
                raise ValueError(
                    f"{folder}: activation_function {act!r} is not implemented (expected "
                    "torch.nn.modules.linear.Identity, as EmbeddingGemma)"
                )
            if conf.get("use_residual"):
                raise ValueError(f"{folder}: use_residual Dense layers are not implemented")
            dims.append(fout)
            biases.add(bool(conf.get("bias", True)))
            prev = fout
        if len(biases) > 1:
            raise ValueError(f"{self.transformer}: Dense layers mix bias and no bias")
        return tuple(dims), biases.pop() if biases else False


def read_sentence_transformers(path: str | Path) -> SentenceTransformersStack:
    """Parse a local sentence-transformers folder's modules.json (and the modules' configs).

    Raises:
        ValueError: no modules.json, a module type other than Transformer, Pooling, Dense,
            Normalize, a pooling mode other than mean, or modules out of that order (named).
    """
    root = Path(path)
    modules = _read_json(root / "modules.json", list)
    if not isinstance(modules, list) or not modules:
        raise ValueError(f"{root / 'modules.json'}: expected a non-empty list of modules")
    kinds = []
    for m in modules:
        if not isinstance(m, dict) or "type" not in m:
            raise ValueError(f"{root / 'modules.json'}: malformed entry {m!r}")
        kinds.append((str(m["type"]).rsplit(".", 1)[-1], root / str(m.get("path", ""))))
    names = [k for k, _ in kinds]
    supported = {"Transformer", "Pooling", "Dense", "Normalize"}
    bad = [t for t, (k, _) in zip((m["type"] for m in modules), kinds) if k not in supported]
    if bad:
        raise ValueError(
            f"{root}: sentence-transformers modules {bad} are not supported (expected "
            "Transformer, Pooling, Dense..., Normalize)"
        )
    order_ok = (
        len(names) >= 2
        and names[0] == "Transformer"
        and names[1] == "Pooling"
        and all(n == "Dense" for n in names[2:-1])
        and names[-1] in ("Dense", "Normalize", "Pooling")
        and names.count("Normalize") <= 1
    )
    if not order_ok:
        raise ValueError(
            f"{root}: modules {names}; expected Transformer, Pooling, then Dense layers, then "
            "optionally Normalize"
        )
    pool_dir = kinds[1][1]
    pool = _read_json(pool_dir / "config.json")
    mode = pool.get("pooling_mode")
    if mode is None:  # the pre-v5 flags
        flags = [k for k, v in pool.items() if k.startswith("pooling_mode_") and v]
        mode = "mean" if flags in ([], ["pooling_mode_mean_tokens"]) else flags
    if mode not in ("mean", ["mean"], ("mean",)):
        raise ValueError(f"{pool_dir}: pooling mode {mode!r} is not implemented (expected mean)")
    if pool.get("include_prompt", True) is False:
        warnings.warn(
            f"{pool_dir}: include_prompt is false: sentence-transformers leaves prompt tokens out "
            "of the mean; here every real token is pooled (equal when texts carry no prompt)",
            stacklevel=3,
        )
    transformer = kinds[0][1]
    sbert = transformer / "sentence_bert_config.json"
    max_seq = _read_json(sbert).get("max_seq_length") if sbert.is_file() else None
    dense = [(d, _read_json(d / "config.json")) for k, d in kinds if k == "Dense"]
    return SentenceTransformersStack(transformer, dense, names[-1] == "Normalize", max_seq)


def _load_dense(layer: nn.Linear, folder: Path) -> None:
    """A sentence-transformers Dense module's weights (``linear.weight``, ``linear.bias``);
    bad keys named as in the file."""
    plan = {k: Source((f"linear.{k}",), (tuple(v.shape),)) for k, v in layer.state_dict().items()}
    load_mapped(layer, read_state_dict(folder), plan, f"{folder} (sentence-transformers Dense)")


def load_gemma3_folder(
    path: str | Path,
    embed_dim: int,
    *,
    backend: BackendSpec = "auto",
    max_len: int | None = None,
    lr_multiplier: float = 0.05,
) -> TextEncoder:
    """A :class:`TextEncoder` from a local folder, its config built from the folder's files.

    Layouts (detected):
    - a sentence-transformers folder (EmbeddingGemma): modules.json naming a Transformer
      (its folder: config.json + model.safetensors / pytorch_model.bin), mean Pooling, Dense
      layers (config.json + model.safetensors or pytorch_model.bin), and optionally Normalize;
      the encoder gets the Dense stack and normalisation, and max_len from
      sentence_bert_config.json's max_seq_length;
    - a transformers Gemma3TextModel folder (config.json + weights, no modules.json): no Dense,
      no normalisation.
    The head to ``embed_dim`` is new (random). No hub access.

    Args:
        path: the folder.
        embed_dim: the shared embedding space.
        backend: as :class:`TextEncoder`.
        max_len: the longest token sequence accepted (default: max_seq_length, else the
            config's max_position_embeddings).
        lr_multiplier: as :class:`~vljepa_fast.models.YEncoderConfig`.

    Raises:
        ValueError: an unknown layout, an unsupported config or module, or weights whose keys
            do not match (missing, unexpected, mis-shaped keys named).
    """
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"path: expected a local folder, got {str(path)!r}")
    if (root / "modules.json").is_file():
        stack = read_sentence_transformers(root)
    elif (root / "config.json").is_file():
        stack = SentenceTransformersStack(root)
    else:
        raise ValueError(
            f"{root}: unknown layout; expected a sentence-transformers folder (modules.json) or "
            "a transformers Gemma3TextModel folder (config.json + model.safetensors)"
        )
    conf = _read_json(stack.transformer / "config.json")
    cfg = YEncoderConfig.from_gemma3_config(conf, lr_multiplier=lr_multiplier)
    dense, bias = stack.dense_dims(cfg.dim)
    changes = dict(dense=dense, dense_bias=bias, normalize=stack.normalize)
    length = max_len if max_len is not None else stack.max_seq_length
    if length is not None:
        if isinstance(length, int) and not isinstance(length, bool) and length > cfg.max_len:
            raise ValueError(
                f"max_len: {length}, more than the model's max_position_embeddings "
                f"({cfg.max_len}, {stack.transformer / 'config.json'})"
            )
        changes["max_len"] = length
    cfg = dataclasses.replace(cfg, **changes)
    encoder = TextEncoder(cfg, embed_dim, backend)
    load_gemma3_state_dict(encoder, read_state_dict(stack.transformer))
    for layer, (folder, _) in zip(encoder.dense, stack.dense):
        _load_dense(layer, folder)
    return encoder


# ------------------------------------------------------------------------------------------
# any transformers encoder
# ------------------------------------------------------------------------------------------


class HFTextEncoder(nn.Module):
    """Any transformers encoder (e.g. all-MiniLM-L6-v2, EmbeddingGemma) as the Y-encoder.

    ``model(...).last_hidden_state`` -> mean over the real tokens -> ``dense`` (Linear layers,
    identity activations; sentence-transformers' Dense modules) -> L2 normalisation
    (``normalize``) -> ``head`` (new Linear to ``embed_dim``). The wrapped model's attention
    follows its own ``attn_implementation``; route it through vf.attention with
    :mod:`vljepa_fast.integrations.transformers` if wanted.

    Args:
        model: a transformers ``PreTrainedModel`` returning ``last_hidden_state``.
        embed_dim: the shared embedding space (the head maps the last width -> embed_dim).
        tokenizer: optional transformers tokenizer, used by :meth:`tokenize`.
        max_len: the longest token sequence accepted (None: the model config's
            max_position_embeddings, else 512); more than max_position_embeddings is refused
            (ValueError). :meth:`tokenize` truncates longer texts.
        lr_multiplier: learning-rate multiplier of the wrapped model and the Dense stack
            (paper: 0.05); the new head trains at the full rate (see :meth:`VLJEPA.param_groups`).
        dense: Linear layers applied after the pooling, in order (sentence-transformers' Dense
            modules); the first reads hidden_size.
        normalize: L2-normalise before the head (sentence-transformers' Normalize).
        truncation: what :meth:`tokenize` does with a text longer than max_len: "warn" (cut it
            to max_len tokens with the tokenizer's own truncation, and warn) or "error"
            (ValueError naming the text).
    """

    def __init__(
        self,
        model: nn.Module,
        embed_dim: int,
        tokenizer=None,
        max_len: int | None = None,
        lr_multiplier: float = 0.05,
        *,
        dense: Sequence[nn.Linear] = (),
        normalize: bool = False,
        truncation: str = "warn",
    ) -> None:
        super().__init__()
        if truncation not in ("warn", "error"):
            raise ValueError(f"truncation: expected 'warn' or 'error', got {truncation!r}")
        self.model, self.tokenizer = model, tokenizer
        if max_len is None:
            max_len = getattr(model.config, "max_position_embeddings", None) or 512
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len: expected an int >= 1, got {max_len!r}")
        positions = getattr(model.config, "max_position_embeddings", None)
        if isinstance(positions, int) and max_len > positions:
            raise ValueError(f"max_len: {max_len}, more than max_position_embeddings ({positions})")
        self.max_len, self.lr_multiplier = max_len, lr_multiplier
        self.normalize, self.truncation = bool(normalize), truncation
        self._hf_tokenizer = None
        width = model.config.hidden_size
        for i, layer in enumerate(dense):
            if not isinstance(layer, nn.Linear) or layer.in_features != width:
                got = layer.in_features if isinstance(layer, nn.Linear) else type(layer).__name__
                raise ValueError(f"dense[{i}]: expected an nn.Linear reading {width}, got {got}")
            width = layer.out_features
        self.dense = nn.ModuleList(dense)
        self.vocab_size = model.config.vocab_size
        self.head = nn.Linear(width, embed_dim)

    @classmethod
    def from_pretrained(cls, path: str | Path, embed_dim: int, **kwargs) -> HFTextEncoder:
        """Load a local transformers model directory (no hub access: local_files_only; a path
        that is not an existing folder raises a ValueError naming ``path``).

        A sentence-transformers folder (modules.json) loads its Transformer module's model and
        tokenizer, its Dense layers and its Normalize, and max_len defaults to its
        max_seq_length; ``kwargs`` go to the constructor (they win over the folder's values).
        """
        import transformers

        root = Path(path)
        if not root.is_dir():
            what = "is a file, not a folder" if root.exists() else "does not exist"
            raise ValueError(
                f"path: the local model folder {str(root)!r} {what} (there is no model hub: "
                "pass an existing local folder)"
            )
        if (root / "modules.json").is_file():
            stack = read_sentence_transformers(root)
            model_dir = stack.transformer
            model = transformers.AutoModel.from_pretrained(str(model_dir), local_files_only=True)
            dims, bias = stack.dense_dims(model.config.hidden_size)
            dense, width = [], model.config.hidden_size
            for (folder, _), out in zip(stack.dense, dims):
                layer = nn.Linear(width, out, bias=bias)
                _load_dense(layer, folder)
                dense.append(layer)
                width = out
            kwargs.setdefault("dense", dense)
            kwargs.setdefault("normalize", stack.normalize)
            if stack.max_seq_length is not None:
                kwargs.setdefault("max_len", stack.max_seq_length)
        else:
            model_dir = root
            model = transformers.AutoModel.from_pretrained(str(root), local_files_only=True)
        tok = transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        return cls(model, embed_dim, tokenizer=tok, **kwargs)

    def tokenize(self, texts: str | Sequence[str]) -> tuple[Tensor, Tensor]:
        """(ids [B, L] int64, mask [B, L] bool) with the wrapped tokenizer, L <= max_len.

        Through :class:`~vljepa_fast.models.HFTokenizer` (right padding with the tokenizer's
        pad token): a text of more than max_len tokens (special tokens included) is cut to
        max_len by the tokenizer's own truncation with a
        :class:`~vljepa_fast.models.TruncationWarning` (``truncation="warn"``), or refused with
        a ValueError naming it (``"error"``).
        """
        if self.tokenizer is None:
            raise ValueError("HFTextEncoder.tokenize: no tokenizer was given")
        if self._hf_tokenizer is None or self._hf_tokenizer.tokenizer is not self.tokenizer:
            from vljepa_fast.models.tokenizer import HFTokenizer

            self._hf_tokenizer = HFTokenizer(
                self.tokenizer, self.max_len, truncation=self.truncation
            )
        return self._hf_tokenizer(texts)

    def forward(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        """ids [B, L], mask [B, L] bool (None: all real) -> [B, embed_dim]."""
        mask = check_tokens("text ids", ids, mask, self.vocab_size, self.max_len)
        dev = self.head.weight.device
        out = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev).long())
        x = masked_mean(out.last_hidden_state.to(self.head.weight.dtype), mask.to(dev))
        for layer in self.dense:
            x = layer(x)
        if self.normalize:
            x = F.normalize(x, p=2.0, dim=-1)
        return self.head(x)
