"""VL-JEPA: X-encoder -> predictor -> predicted embedding, trained against the Y-encoder's
embedding of the target text with vf.infonce_loss; tasks run on vf.topk_similarity, captions
come from the Y-decoder the model owns (:meth:`VLJEPA.decode`, :meth:`VLJEPA.caption_stream`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import chain

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vljepa_fast import _backends, functional
from vljepa_fast._backends import BackendSpec
from vljepa_fast.embedding_index import EmbeddingIndex
from vljepa_fast.models._layers import check_tokens
from vljepa_fast.models.config import VLJEPAConfig
from vljepa_fast.models.predictor import Predictor
from vljepa_fast.models.selective_decoding import (
    online_segment_starts,
    segment_embeddings,
    temporal_ward_segments,
)
from vljepa_fast.models.tokenizer import ByteTokenizer, as_tokenizer
from vljepa_fast.models.x_encoder import XEncoder
from vljepa_fast.models.y_decoder import YDecoder
from vljepa_fast.models.y_encoder import TextEncoder

__all__ = ["CAPTION_QUERY", "LabelBank", "StreamCaptions", "VLJEPA"]

#: text given as strings (tokenized by the model's tokenizer) or as (ids [B, L], mask [B, L])
Text = str | Sequence[str] | tuple[Tensor, Tensor | None]
Tokenizer = Callable[[Sequence[str]], tuple[Tensor, Tensor]]

#: the default captioning query of :meth:`VLJEPA.caption_stream` (pass the one the model was
#: trained to caption with)
CAPTION_QUERY = "what is happening?"


def _int(name: str, v: object, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
    return v


def _list(idx: list[int], shown: int = 8) -> str:
    more = f", ... ({len(idx)} in all)" if len(idx) > shown else ""
    return "[" + ", ".join(map(str, idx[:shown])) + more + "]"


def _not_finite(emb: Tensor, offset: int = 0) -> list[int]:
    """Rows (plus ``offset``) of [B, D] ``emb`` holding NaN or inf (one host sync)."""
    bad = ~torch.isfinite(emb).all(dim=-1)
    return (bad.nonzero().flatten() + offset).tolist() if bool(bad.any()) else []


def _check_predicted(name: str, emb: Tensor, offset: int = 0, what: str = "rows") -> None:
    """The NaN rule of the tasks: a predicted embedding that is not finite is refused."""
    bad = _not_finite(emb, offset)
    if bad:
        raise ValueError(
            f"{name}: the predicted embeddings of {what} {_list(bad)} are not finite (NaN or "
            "inf): check those inputs (and the model's weights) for NaN / inf"
        )


def _check_texts(name: str, emb: Tensor, texts: Sequence[str] | None = None) -> None:
    """The same rule for Y-encoder embeddings of labels / candidates / search texts."""
    bad = _not_finite(emb)
    if bad:
        said = "" if texts is None else f" ({', '.join(repr(texts[i][:30]) for i in bad[:4])})"
        raise ValueError(
            f"{name}: the Y-encoder embeddings of texts {_list(bad)}{said} are not finite (NaN "
            "or inf): check the Y-encoder's weights"
        )


def _short(t: object) -> str:
    if isinstance(t, Tensor):
        return f"Tensor({list(t.shape)}, {t.dtype}, {t.device})"
    return repr(t)


@dataclass(frozen=True, eq=False)
class LabelBank:
    """Label (or candidate answer) embeddings from :meth:`VLJEPA.encode_labels`, reused by
    :meth:`VLJEPA.classify` and :meth:`VLJEPA.answer` without re-encoding.

    A bank remembers the state of the Y-encoder that made it (each weight's identity, storage,
    dtype, device and autograd version counter, the train/eval flags, the text tokenizer); a
    model refuses a bank made by another Y-encoder state (an optimizer step, a
    ``load_state_dict``, ``.to()``, a ``train()``/``eval()`` switch since): ValueError, never a
    stale result. (Writes through ``param.data`` bypass the version counter: re-encode after
    them.) Weights that are inference tensors (made under ``torch.inference_mode``) track no
    version: the keyed cache is then bypassed and a bank refused.

    Attributes:
        texts: the N labels, in order.
        embeddings: [N, embed_dim] float32 unit rows (cosine space), on the Y-encoder's device.
    """

    texts: tuple[str, ...]
    embeddings: Tensor
    _fingerprint: tuple = field(repr=False)

    def __len__(self) -> int:
        return len(self.texts)

    def __repr__(self) -> str:
        shown = ", ".join(repr(t[:20] + ("..." if len(t) > 20 else "")) for t in self.texts[:3])
        more = ", ..." if len(self.texts) > 3 else ""
        return f"LabelBank({len(self)} texts [{shown}{more}], embeddings={_short(self.embeddings)})"


@dataclass(frozen=True, eq=False)
class StreamCaptions:
    """What :meth:`VLJEPA.caption_stream` returns.

    Attributes:
        window_starts: [W] int64 first frame of each window (0, stride, 2 * stride, ...).
        embeddings: [W, embed_dim] the predicted embedding of each window (float32).
        segment_starts: [S] int64 index of the first window of each segment, ascending, 0
            first.
        segments: S (first frame, end frame) spans, end exclusive: the frames the segment's
            windows cover (neighbouring spans overlap when window > stride).
        captions: S decoded captions, one per segment.
        decoder_calls: captions decoded (S).
        windows: W, the decoder calls of captioning every window.
    """

    window_starts: Tensor
    embeddings: Tensor
    segment_starts: Tensor
    segments: list[tuple[int, int]]
    captions: list[str]
    decoder_calls: int
    windows: int

    def __repr__(self) -> str:
        caps = ", ".join(repr(c[:30] + ("..." if len(c) > 30 else "")) for c in self.captions[:3])
        more = ", ..." if len(self.captions) > 3 else ""
        return (
            f"StreamCaptions(windows={self.windows}, segments={len(self.segments)}, "
            f"decoder_calls={self.decoder_calls}, embeddings={_short(self.embeddings)}, "
            f"captions=[{caps}{more}])"
        )

    @property
    def calls_saved(self) -> int:
        """Decoder calls saved against one call per window: windows - decoder_calls."""
        return self.windows - self.decoder_calls


class VLJEPA(_backends.HoldsBackend, nn.Module):
    """The VL-JEPA model.

    Args:
        config: sizes (:meth:`VLJEPAConfig.paper` or :meth:`VLJEPAConfig.tiny`).
        backend: a :data:`~vljepa_fast._backends.BackendSpec`, validated here and passed
            unchanged to every module and to every op the model calls (attention, rotary,
            infonce_loss, topk_similarity): "auto" (the fastest backend that serves each call;
            ``VLJEPA_FAST_BACKEND`` and ``VLJEPA_FAST_BACKEND_<OP>`` apply), a backend name for
            every op ("reference": eager everywhere), or a per-op mapping such as
            ``{"attention": "sdpa", "rotary": "reference"}`` (ops it leaves out run "auto").
            A single name that one of those ops does not have (e.g. "sdpa", which infonce_loss
            lacks) is refused here (ValueError naming the op), never substituted: pick per op
            with a mapping. Fixed at construction (the submodules hold it too).
        y_encoder: replaces the built-in text encoder, e.g. an
            :class:`~vljepa_fast.models.HFTextEncoder`; it maps (ids, mask) -> [B, embed_dim].
        query_tokenizer: texts -> (ids, mask) for the predictor's queries: an
            :class:`~vljepa_fast.models.HFTokenizer` (e.g. ``HFTokenizer.llama(path)``), a
            :class:`~vljepa_fast.models.ByteTokenizer`, a transformers tokenizer or a local
            tokenizer folder (wrapped by :func:`~vljepa_fast.models.as_tokenizer` with the
            predictor's ``max_query_len``, padded with its pad token, else the config's
            ``pad_id``), or any callable returning (ids, mask). Default: a ByteTokenizer when
            the predictor's vocabulary is the byte one (260 ids, the tiny config), else none:
            text queries then raise a ValueError naming ``query_tokenizer`` and (ids, mask)
            queries still work.
        text_tokenizer: the same for the Y-encoder's texts (default: ``y_encoder.tokenize``
            when it has one, else a ByteTokenizer for a byte vocabulary, else none).
        decoder_tokenizer: the same for the Y-decoder (its ``decode`` turns ids into text;
            its BOS / EOS, where it has them, must be the decoder config's). Default: a
            ByteTokenizer for a byte vocabulary with the ByteTokenizer's BOS / EOS, else none
            (:meth:`decode` then raises).
        y_decoder: True (default) builds :class:`~vljepa_fast.models.YDecoder` from
            ``config.y_decoder`` as ``self.y_decoder``; False builds none; or a YDecoder of
            ``config.embed_dim``.

    Tokenizers are checked here: a ByteTokenizer for a module whose vocabulary is not the
    byte one, or a tokenizer whose ids can reach past the module's vocabulary (its
    ``vocab_size`` is larger), or whose ``max_len`` is longer than the module accepts, is
    refused (ValueError naming the argument).
    """

    #: most label / candidate texts kept by the keyed embedding cache (0 disables it)
    label_cache_size: int = 4096

    def __init__(
        self,
        config: VLJEPAConfig,
        backend: BackendSpec = "auto",
        *,
        y_encoder: nn.Module | None = None,
        query_tokenizer: object | None = None,
        text_tokenizer: object | None = None,
        decoder_tokenizer: object | None = None,
        y_decoder: bool | nn.Module = True,
    ) -> None:
        super().__init__()
        self.config, self.backend = config, _backends.check_spec(backend, ops=_backends.MODEL_OPS)
        self.x_encoder = XEncoder(config.x_encoder, self.backend)
        self.predictor = Predictor(
            config.predictor, config.x_encoder.dim, config.embed_dim, self.backend
        )
        self.y_encoder = (
            TextEncoder(config.y_encoder, config.embed_dim, self.backend)
            if y_encoder is None
            else y_encoder
        )
        if y_decoder is True:
            self.y_decoder = YDecoder(config.y_decoder, config.embed_dim, self.backend)
        elif y_decoder is False or y_decoder is None:
            self.y_decoder = None
        elif isinstance(y_decoder, nn.Module):
            if getattr(y_decoder, "embed_dim", config.embed_dim) != config.embed_dim:
                raise ValueError(
                    f"y_decoder: decodes embeddings of width {y_decoder.embed_dim}, the model's "
                    f"are {config.embed_dim}"
                )
            self.y_decoder = y_decoder
        else:
            raise ValueError(f"y_decoder: expected a bool or a YDecoder, got {y_decoder!r}")
        if config.learnable_temperature:
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.temperature)))
        else:
            self.register_parameter("logit_scale", None)
        if config.freeze_x_encoder:
            self.x_encoder.requires_grad_(False)
        pc, yc, dc = config.predictor, config.y_encoder, config.y_decoder
        self.query_tokenizer = self._setup_tokenizer(
            query_tokenizer, "query_tokenizer", "predictor", pc.vocab_size, pc.max_query_len,
            pc.pad_id,
        )  # fmt: skip
        if y_encoder is None:
            y_vocab, y_len, y_pad = yc.vocab_size, yc.max_len, yc.pad_id
        else:
            inner = getattr(y_encoder, "cfg", None)
            y_vocab = getattr(y_encoder, "vocab_size", getattr(inner, "vocab_size", None))
            y_len = getattr(y_encoder, "max_len", getattr(inner, "max_len", yc.max_len))
            y_pad = getattr(inner, "pad_id", yc.pad_id)
        if text_tokenizer is None:
            text_tokenizer = getattr(self.y_encoder, "tokenize", None)
        # (vocab, max_len) the token tensors of each kind are checked against (None: unknown)
        self._token_spec = {"query": (pc.vocab_size, pc.max_query_len), "text": (y_vocab, y_len)}
        self.text_tokenizer = self._setup_tokenizer(
            text_tokenizer, "text_tokenizer", "Y-encoder", y_vocab, y_len, y_pad
        )
        self.decoder_tokenizer = None
        if self.y_decoder is not None:
            dcfg = getattr(self.y_decoder, "cfg", dc)
            pad = pc.pad_id if pc.pad_id < dcfg.vocab_size else None
            self.decoder_tokenizer = self._setup_tokenizer(
                decoder_tokenizer, "decoder_tokenizer", "Y-decoder", dcfg.vocab_size,
                dcfg.max_len, pad,
            )  # fmt: skip
            tok = self.decoder_tokenizer
            for what in ("bos_id", "eos_id"):
                have, want = getattr(tok, what, None), getattr(dcfg, what)
                if tok is not None and have is not None and have != want:
                    if decoder_tokenizer is None:  # the default ByteTokenizer does not fit
                        self.decoder_tokenizer = None
                        break
                    raise ValueError(
                        f"decoder_tokenizer: its {what} is {have}, the Y-decoder's "
                        f"(YDecoderConfig.{what}) is {want}"
                    )
        elif decoder_tokenizer is not None:
            raise ValueError("decoder_tokenizer: given, but the model has no Y-decoder")
        self._label_cache: OrderedDict[str, Tensor] = OrderedDict()
        self._label_cache_fp: tuple | None = None

    @staticmethod
    def _setup_tokenizer(
        tok: object, name: str, module: str, vocab: int | None, max_len: int, pad_id: int | None
    ) -> Tokenizer | None:
        byte = ByteTokenizer.vocab_size
        if tok is None:
            return ByteTokenizer(max_len) if vocab == byte else None
        tok = as_tokenizer(tok, max_len, name=name, pad_id=pad_id)
        if isinstance(tok, ByteTokenizer) and vocab is not None and vocab != byte:
            raise ValueError(
                f"{name}: a ByteTokenizer ({byte} ids) cannot feed the {module}, whose "
                f"vocabulary has {vocab} ids: pass the tokenizer of its weights (e.g. "
                "HFTokenizer.llama(path) for the predictor, HFTokenizer.gemma(path) for a "
                "Gemma Y-encoder)"
            )
        tv = getattr(tok, "vocab_size", None)
        if isinstance(tv, int) and vocab is not None and tv > vocab:
            raise ValueError(
                f"{name}: its ids reach {tv - 1}, beyond the {module}'s vocabulary [0, {vocab})"
            )
        tl = getattr(tok, "max_len", None)
        if isinstance(tl, int) and tl > max_len:
            raise ValueError(
                f"{name}: its max_len {tl} is longer than the {module} accepts ({max_len})"
            )
        return tok

    # ------------------------------------------------------------------ encoders

    def _check_ids(self, name: str, kind: str, ids: Tensor, mask: Tensor | None) -> None:
        vocab, max_len = self._token_spec[kind]
        if isinstance(vocab, int) and isinstance(max_len, int):
            check_tokens(name, ids, mask, vocab, max_len)

    def _tokens(
        self, text: Text, tokenizer, name: str, kind: str | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Strings (tokenized) or (ids, mask) -> (ids, mask), checked against the module of
        ``kind`` ("query": the predictor, "text": the Y-encoder); errors name ``name``."""
        kind = name if kind is None else kind
        if isinstance(text, tuple) and len(text) == 2 and isinstance(text[0], Tensor):
            self._check_ids(name, kind, text[0], text[1])
            return text
        if isinstance(text, str):
            text = [text]
        if not isinstance(text, Sequence):
            raise ValueError(
                f"{name}: expected a string, a list of strings or an (ids, mask) "
                f"tuple, got {type(text).__name__}"
            )
        for i, t in enumerate(text):
            if not isinstance(t, str):
                raise ValueError(f"{name}[{i}]: expected a string, got {type(t).__name__}")
        if len(text) == 0:
            raise ValueError(f"{name}: expected at least one text, got an empty list")
        arg = {"query": "query_tokenizer", "text": "text_tokenizer"}[kind]
        if tokenizer is None:
            module = "predictor" if arg == "query_tokenizer" else "Y-encoder"
            raise ValueError(
                f"{name}: texts given, but the model has no {arg}: the {module}'s vocabulary "
                f"is not (known to be) the ByteTokenizer's; build the model with {arg}=... (e.g. "
                "HFTokenizer.llama(path), a transformers tokenizer or a local tokenizer "
                "folder), or pass (ids, mask) tensors"
            )
        out = tokenizer(list(text))
        if not (
            isinstance(out, tuple | list)
            and len(out) == 2
            and isinstance(out[0], Tensor)
            and (out[1] is None or isinstance(out[1], Tensor))
        ):
            raise ValueError(
                f"{arg}: returned {type(out).__name__}, expected (ids [B, L] int64, mask "
                "[B, L] bool) (wrap a transformers tokenizer in HFTokenizer)"
            )
        self._check_ids(f"{arg} output", kind, out[0], out[1])
        if out[0].shape[0] != len(text):
            raise ValueError(f"{arg}: returned {out[0].shape[0]} rows for {len(text)} texts")
        return out[0], out[1]

    def encode_video(self, video: Tensor) -> Tensor:
        """[B, C, T, H, W] (or [B, C, H, W]) -> [B, N, x_dim] visual tokens.

        With a frozen X-encoder this runs without autograd, so the result can be cached and
        passed back as ``x_features``.
        """
        if self.config.freeze_x_encoder:
            with torch.no_grad():
                return self.x_encoder(video)
        return self.x_encoder(video)

    def predict(
        self, video: Tensor | None, query: Text, *, x_features: Tensor | None = None
    ) -> Tensor:
        """[B, embed_dim] predicted embeddings of (video, query); pass ``x_features`` (from
        :meth:`encode_video`) instead of ``video`` to skip the X-encoder."""
        return self._predict(video, query, x_features=x_features)

    def _predict(
        self, video: Tensor | None, query: Text, *, x_features: Tensor | None = None,
        name: str = "video",
    ) -> Tensor:  # fmt: skip
        """:meth:`predict`, its video errors naming ``name`` (the caller's argument)."""
        if (video is None) == (x_features is None):
            raise ValueError("predict: give exactly one of video and x_features")
        if x_features is None:
            if name != "video":  # errors name the caller's argument (videos, frames)
                self.x_encoder.check_video(video, name)
            visual = self.encode_video(video)
        else:
            visual, name = x_features, "x_features"
        ids, mask = self._tokens(query, self.query_tokenizer, "query")
        ids = ids.to(visual.device)
        mask = None if mask is None else mask.to(visual.device)
        B = visual.shape[0] if isinstance(visual, Tensor) and visual.dim() > 0 else None
        if ids.shape[0] == 1 and B is not None and B > 1:  # one query shared by the batch
            ids = ids.expand(B, -1)
            mask = None if mask is None else mask.expand(B, -1)
        elif B is not None and ids.shape[0] != B:
            raise ValueError(
                f"query: {ids.shape[0]} queries for {B} videos ({name} batch {B}); give one "
                "query per video, or one shared query"
            )
        return self.predictor(visual, ids, mask)

    def encode_text(self, text: Text) -> Tensor:
        """[B, embed_dim] Y-encoder embeddings of target texts."""
        return self._encode_text(text)

    def _encode_text(self, text: Text, name: str = "text") -> Tensor:
        ids, mask = self._tokens(text, self.text_tokenizer, name, "text")
        dev = next(self.y_encoder.parameters()).device
        return self.y_encoder(ids.to(dev), None if mask is None else mask.to(dev))

    # ------------------------------------------------------------------ training

    def temperature(self) -> float | Tensor:
        """The InfoNCE temperature: 1 / clamp(exp(logit_scale), max) or the fixed float."""
        if self.logit_scale is None:
            return self.config.temperature
        return 1.0 / self.logit_scale.exp().clamp(max=self.config.max_logit_scale)

    def forward(
        self,
        video: Tensor | None,
        query: Text,
        target: Text,
        *,
        x_features: Tensor | None = None,
        group: object | None = None,
        reduction: str = "mean",
    ) -> Tensor:
        """The training loss: bidirectional InfoNCE between predicted and target embeddings.

        Args:
            video: [B, C, T, H, W] or [B, C, H, W]; None when ``x_features`` is given.
            query: B query texts (or one shared), or (ids [B, L], mask [B, L]).
            target: B target texts, or (ids [B, L], mask [B, L]).
            x_features: cached [B, N, x_dim] X-encoder tokens (frozen X-encoder).
            group: torch.distributed group: negatives come from the global batch.
            reduction: "mean", "sum" or "none", as :func:`vljepa_fast.infonce_loss`.

        Returns:
            float32 loss (scalar, or [B] with reduction "none").
        """
        pred = self.predict(video, query, x_features=x_features)
        tgt = self._encode_text(target, "target")
        if tgt.shape != pred.shape:
            raise ValueError(f"target: {tgt.shape[0]} texts for {pred.shape[0]} videos")
        return self.embedding_loss(pred, tgt, group=group, reduction=reduction)

    def embedding_loss(
        self, pred: Tensor, target: Tensor, *, group: object | None = None,
        reduction: str = "mean",
    ) -> Tensor:  # fmt: skip
        """The loss of :meth:`forward` on embeddings already computed: bidirectional InfoNCE
        at the model's temperature (:meth:`temperature`) on the model's backend.

        Args:
            pred: [B, embed_dim] predicted embeddings (:meth:`predict`).
            target: [B, embed_dim] target embeddings (:meth:`encode_text`), cast to
                ``pred``'s dtype.
            group, reduction: as :meth:`forward`.
        """
        return functional.infonce_loss(
            pred,
            target.to(pred.dtype),
            temperature=self.temperature(),
            group=group,
            reduction=reduction,
            backend=self.backend,
        )

    def param_groups(self, lr: float, weight_decay: float = 0.0) -> list[dict]:
        """Optimizer parameter groups.

        The Y-encoder's body trains at ``lr * lr_multiplier`` (paper: 0.05, which protects a
        pretrained text encoder); its freshly initialised linear ``head`` to the shared space
        and everything else trainable train at ``lr``. Frozen parameters are left out, and so
        is the Y-decoder: the InfoNCE loss (:meth:`forward`) never reaches it; it is trained
        separately, on (predicted embedding, caption) pairs with :meth:`decoder_loss`, by an
        optimizer over ``model.y_decoder.parameters()``.

        Returns:
            [{"name": "main", ...}, {"name": "y_encoder", ...}] for torch.optim.
        """
        mult = getattr(self.y_encoder, "lr_multiplier", self.config.y_encoder.lr_multiplier)
        head = getattr(self.y_encoder, "head", None)
        head_ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
        y = [p for p in self.y_encoder.parameters() if p.requires_grad and id(p) not in head_ids]
        skip = {id(p) for p in y}
        if self.y_decoder is not None:
            skip |= {id(p) for p in self.y_decoder.parameters()}
        main = [p for p in self.parameters() if p.requires_grad and id(p) not in skip]
        return [
            {"params": main, "lr": lr, "weight_decay": weight_decay, "name": "main"},
            {"params": y, "lr": lr * mult, "weight_decay": weight_decay, "name": "y_encoder"},
        ]

    # ------------------------------------------------------------------ Y-decoder

    def _decoder(self) -> tuple[nn.Module, Tokenizer]:
        if self.y_decoder is None:
            raise ValueError("y_decoder: the model was built with y_decoder=False")
        if self.decoder_tokenizer is None:
            raise ValueError(
                "decoder_tokenizer: the Y-decoder's vocabulary is not the ByteTokenizer's; "
                "build the model with decoder_tokenizer=... (e.g. HFTokenizer.llama(path))"
            )
        return self.y_decoder, self.decoder_tokenizer

    def _decoder_input(self, embeddings: Tensor, dec: nn.Module) -> Tensor:
        if not isinstance(embeddings, Tensor) or not embeddings.is_floating_point():
            got = embeddings.dtype if isinstance(embeddings, Tensor) else type(embeddings)
            raise ValueError(f"embeddings: expected a floating [B, embed_dim] tensor, got {got}")
        if embeddings.dim() != 2 or embeddings.shape[1] != self.config.embed_dim:
            raise ValueError(
                f"embeddings: expected [B, {self.config.embed_dim}], got {tuple(embeddings.shape)}"
            )
        if embeddings.shape[0] == 0:
            raise ValueError(
                f"embeddings: expected at least one row (B >= 1), got {tuple(embeddings.shape)}"
            )
        w = next(dec.parameters())
        return embeddings.to(w.device, w.dtype)

    def decoder_loss(self, embeddings: Tensor, texts: Sequence[str]) -> Tensor:
        """Next-token cross-entropy of the Y-decoder on (embedding, caption) pairs.

        Args:
            embeddings: [B, embed_dim], B >= 1 (e.g. :meth:`predict` outputs, detached; a
                training loss: NaN / inf propagate, they are not refused).
            texts: B captions, tokenized by ``decoder_tokenizer`` (no special tokens) and framed
                as BOS, ids, EOS (the decoder config's ids).

        Returns:
            float32 scalar (mean over the real target tokens).

        Raises:
            ValueError: no Y-decoder or decoder tokenizer, B mismatch, or a caption longer
                than the decoder's ``max_len`` - 2 tokens (named).
        """
        dec, tok = self._decoder()
        c = dec.cfg
        emb = self._decoder_input(embeddings, dec)
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise ValueError(f"texts: expected a list of strings, got {type(texts).__name__}")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ValueError(f"texts[{i}]: expected a string, got {type(t).__name__}")
        if len(texts) != emb.shape[0]:
            raise ValueError(
                f"texts: {len(texts)} captions for {emb.shape[0]} embeddings (one per row)"
            )
        rows = []
        for t in texts:
            r = tok.encode(t)
            if len(r) > c.max_len - 2:
                raise ValueError(
                    f"texts: {t[:30]!r}... is {len(r)} tokens, more than the Y-decoder's "
                    f"max_len - 2 ({c.max_len - 2}: BOS and EOS are added)"
                )
            rows.append([c.bos_id, *r, c.eos_id])
        L = max(map(len, rows))
        pad = getattr(tok, "pad_id", None)
        pad = pad if isinstance(pad, int) and 0 <= pad < c.vocab_size else c.eos_id
        ids = torch.full((len(rows), L), pad, dtype=torch.long)  # padding is masked out
        mask = torch.zeros(len(rows), L, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), True
        return dec.loss(emb, ids.to(emb.device), mask.to(emb.device))

    @torch.no_grad()
    def decode(self, embeddings: Tensor, max_new_tokens: int = 32) -> list[str]:
        """Embeddings -> texts with the Y-decoder (greedy, KV cache) and ``decoder_tokenizer``.

        Args:
            embeddings: [B, embed_dim] floating, B >= 1 (any device and dtype: moved to the
                decoder's); every row finite.
            max_new_tokens: 1 .. decoder max_len - 1 tokens at most per text.

        Returns:
            B strings.

        Raises:
            ValueError: no Y-decoder, no decoder tokenizer, a malformed argument (named: an
                empty batch, ``embeddings`` rows holding NaN / inf are refused, listed).
        """
        dec, tok = self._decoder()
        emb = self._decoder_input(embeddings, dec)
        bad = _not_finite(emb)
        if bad:
            raise ValueError(f"embeddings: rows {_list(bad)} are not finite (NaN or inf)")
        rows = dec.generate(emb, max_new_tokens)
        return [tok.decode(r) for r in rows]

    @torch.no_grad()
    def caption_stream(
        self,
        frames: Tensor,
        window: int,
        stride: int,
        *,
        n_segments: int | None = None,
        threshold: float | None = None,
        query: Text = CAPTION_QUERY,
        variance_window: int = 4,
        mode: str = "mean",
        batch_size: int = 32,
        max_new_tokens: int = 32,
    ) -> StreamCaptions:
        """Caption a video stream with one decoder call per segment (selective decoding).

        The stream is cut into windows ``frames[:, s : s + window]`` for s = 0, stride, ...
        (frames after the last full window are not seen); each window is embedded with
        :meth:`predict` (``query``; ``batch_size`` windows per call); the [W, embed_dim] stream
        is split into contiguous segments, by :func:`~vljepa_fast.models.temporal_ward_segments`
        (``n_segments``: offline, exact constrained Ward) or
        :func:`~vljepa_fast.models.online_segment_starts` (``threshold`` and
        ``variance_window``: online, a new segment when the variance of the recent windows
        would exceed ``threshold``); each segment's embedding (:func:`segment_embeddings`,
        ``mode`` "mean" or "midpoint") is decoded once by :meth:`decode`.

        Args:
            frames: [C, T, H, W] floating, one stream.
            window: frames per window, a positive multiple of the X-encoder's tubelet.
            stride: frames between window starts (>= 1).
            n_segments, threshold: exactly one (n_segments in [1, W]; threshold > 0).

        Returns:
            A :class:`StreamCaptions` (segments, captions, decoder calls made and saved).

        NaN rule: each batch of windows is checked right after the predictor runs; a window
        whose predicted embedding is not finite (NaN / inf frames) raises a ValueError naming
        ``frames`` and those windows (and their first frames), before any later window is
        embedded or anything decoded.

        Raises:
            ValueError: a malformed argument (named), non-finite predictions (above), or no
                Y-decoder / decoder tokenizer.
        """
        if (n_segments is None) == (threshold is None):
            raise ValueError(
                "n_segments, threshold: give exactly one (n_segments: offline Ward "
                "segmentation; threshold: the online variant)"
            )
        if not isinstance(frames, Tensor) or frames.dim() != 4 or not frames.is_floating_point():
            got = (
                f"{frames.dtype} {tuple(frames.shape)}"
                if isinstance(frames, Tensor)
                else type(frames).__name__
            )
            raise ValueError(f"frames: expected a floating [C, T, H, W] stream, got {got}")
        tubelet = self.config.x_encoder.tubelet
        if (
            isinstance(window, bool)
            or not isinstance(window, int)
            or window < 1
            or window % tubelet
        ):
            raise ValueError(
                f"window: expected a positive multiple of the tubelet ({tubelet}) frames, "
                f"got {window!r}"
            )
        stride = _int("stride", stride, 1)
        batch_size = _int("batch_size", batch_size, 1)
        T = frames.shape[1]
        if T < window:
            raise ValueError(f"frames: the stream has {T} frames, fewer than window ({window})")
        if window > self.config.x_encoder.max_frames:
            raise ValueError(
                f"window: {window} frames, more than the X-encoder's max_frames "
                f"({self.config.x_encoder.max_frames})"
            )
        W = (T - window) // stride + 1
        if n_segments is not None and (
            isinstance(n_segments, bool) or not isinstance(n_segments, int)
            or not 1 <= n_segments <= W
        ):  # fmt: skip
            raise ValueError(
                f"n_segments: expected an int in [1, {W}] (the stream has {W} windows), got "
                f"{n_segments!r}"
            )
        if threshold is not None:
            variance_window = _int("variance_window", variance_window, 2)
            if isinstance(threshold, bool) or not isinstance(threshold, int | float):
                raise ValueError(f"threshold: expected a number > 0, got {threshold!r}")
            if not threshold > 0 or not math.isfinite(threshold):
                raise ValueError(f"threshold: expected a finite number > 0, got {threshold!r}")
        if mode not in ("mean", "midpoint"):
            raise ValueError(f"mode: expected 'mean' or 'midpoint', got {mode!r}")
        dec, _ = self._decoder()
        bad = isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
        if bad or not 1 <= max_new_tokens <= dec.cfg.max_len - 1:
            raise ValueError(
                f"max_new_tokens: expected 1..{dec.cfg.max_len - 1}, got {max_new_tokens!r}"
            )
        starts = torch.arange(W, dtype=torch.long) * stride
        emb = []
        for b in range(0, W, batch_size):
            clips = torch.stack([frames[:, s : s + window] for s in starts[b : b + batch_size]])
            pred = self._predict(clips, query, name="frames").float()
            bad = _not_finite(pred, b)
            if bad:
                raise ValueError(
                    f"frames: the predicted embeddings of windows {_list(bad)} (first frames "
                    f"{_list([int(starts[w]) for w in bad])}) are not finite (NaN or inf): "
                    "check those frames (and the model's weights) for NaN / inf"
                )
            emb.append(pred)
        emb = torch.cat(emb)
        if n_segments is not None:
            seg = temporal_ward_segments(emb, n_segments)
        else:
            seg = online_segment_starts(emb, variance_window, float(threshold))
        captions = self.decode(segment_embeddings(emb, seg.to(emb.device), mode), max_new_tokens)
        ends = seg.tolist()[1:] + [W]
        spans = [(int(starts[a]), int(starts[e - 1]) + window) for a, e in zip(seg.tolist(), ends)]
        return StreamCaptions(
            window_starts=starts,
            embeddings=emb,
            segment_starts=seg,
            segments=spans,
            captions=captions,
            decoder_calls=len(captions),
            windows=W,
        )

    # ------------------------------------------------------------------ tasks

    def _search(self, queries: Tensor, bank: Tensor, k: int) -> tuple[Tensor, Tensor]:
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= bank.shape[0]:
            raise ValueError(f"k: expected an int in [1, {bank.shape[0]}], got {k!r}")
        q = F.normalize(queries.float(), dim=-1)
        b = F.normalize(bank.float(), dim=-1).to(q.device)
        return functional.topk_similarity(
            q.contiguous(), b.contiguous(), k, metric="ip", backend=self.backend
        )

    def _y_fingerprint(self) -> tuple | None:
        """The Y-encoder state label embeddings depend on (see :class:`LabelBank`); None when
        it cannot be tracked (inference tensors, made under torch.inference_mode, have no
        version counter)."""
        y = self.y_encoder
        if any(t.is_inference() for t in chain(y.parameters(), y.buffers())):
            return None
        weights = tuple(
            (id(t), t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape))
            for t in chain(y.parameters(), y.buffers())
        )
        return weights, tuple(m.training for m in y.modules()), id(self.text_tokenizer)

    def _encode_units(self, texts: list[str], batch_size: int = 256) -> Tensor:
        rows = [
            self.encode_text(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)
        ]
        return F.normalize(torch.cat(rows).float(), dim=-1)

    def _label_embeddings(self, texts: list[str]) -> Tensor:
        """[N, embed_dim] float32 unit rows, through the keyed cache (bypassed in train mode)."""
        y = self.y_encoder
        fp = self._y_fingerprint()
        if self.label_cache_size <= 0 or fp is None or any(m.training for m in y.modules()):
            return self._encode_units(texts)
        cache = self._label_cache
        if fp != self._label_cache_fp:
            cache.clear()
            self._label_cache_fp = fp
        missing = list(dict.fromkeys(t for t in texts if t not in cache))
        if missing:
            for t, row in zip(missing, self._encode_units(missing)):
                cache[t] = row
        out = torch.stack([cache[t] for t in texts])
        for t in texts:
            cache.move_to_end(t)
        while len(cache) > self.label_cache_size:
            cache.popitem(last=False)
        return out

    def clear_label_cache(self) -> None:
        """Empty the keyed label / candidate embedding cache."""
        self._label_cache.clear()
        self._label_cache_fp = None

    @torch.no_grad()
    def encode_labels(self, texts: Sequence[str], batch_size: int = 256) -> LabelBank:
        """Embed label (or candidate answer) texts once, for :meth:`classify` / :meth:`answer`.

        Args:
            texts: N >= 1 strings.
            batch_size: texts per Y-encoder call (>= 1).

        Returns:
            A :class:`LabelBank` (refused later if the Y-encoder has changed since).
        """
        if isinstance(texts, str) or not isinstance(texts, Sequence) or len(texts) == 0:
            raise ValueError("texts: expected a non-empty list of strings")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ValueError(f"texts[{i}]: expected a string, got {type(t).__name__}")
        batch_size = _int("batch_size", batch_size, 1)
        emb = self._encode_units(list(texts), batch_size)
        _check_texts("texts", emb, texts)
        return LabelBank(tuple(texts), emb, self._y_fingerprint())

    def _bank(self, name: str, bank: LabelBank) -> Tensor:
        fp = self._y_fingerprint()
        if fp is None or bank._fingerprint is None:
            raise ValueError(
                f"{name}: a LabelBank cannot be checked against a Y-encoder whose weights are "
                "inference tensors (made under torch.inference_mode: no version counter); "
                "pass the label texts instead (encoded each call)"
            )
        if bank._fingerprint != fp:
            raise ValueError(
                f"{name}: this LabelBank is stale: the Y-encoder (its weights, device, dtype, "
                "train/eval mode or text tokenizer) changed since encode_labels, or the bank "
                "is another model's; call encode_labels again"
            )
        return bank.embeddings

    def _labels(self, name: str, labels: object) -> Tensor:
        """LabelBank | list[str] (cached) | (ids, mask) -> [N, embed_dim] label embeddings."""
        if isinstance(labels, LabelBank):
            return self._bank(name, labels)
        if isinstance(labels, tuple) and len(labels) == 2 and isinstance(labels[0], Tensor):
            emb = self._encode_text(labels, name).float()
            _check_texts(name, emb)
            return emb
        if isinstance(labels, str) or not isinstance(labels, Sequence):
            raise ValueError(
                f"{name}: expected a list of strings, a LabelBank or (ids, mask), got "
                f"{type(labels).__name__}"
            )
        if len(labels) == 0:
            raise ValueError(f"{name}: expected at least one label, got an empty list")
        for i, t in enumerate(labels):
            if not isinstance(t, str):
                raise ValueError(
                    f"{name}[{i}]: expected a string (a list of strings), got {type(t).__name__}"
                )
        emb = self._label_embeddings(list(labels))
        _check_texts(name, emb, labels)
        return emb

    @torch.no_grad()
    def classify(
        self, video: Tensor, query: Text, label_texts: Sequence[str] | LabelBank | tuple, k: int = 1
    ) -> tuple[Tensor, Tensor]:
        """Open-vocabulary classification: nearest label embeddings (cosine) to each prediction.

        Args:
            video: [B, ...] videos.
            query: B queries (or one shared).
            label_texts: N label strings (embedded through the keyed cache: re-encoded only
                when the Y-encoder changed, never cached in train mode), a :class:`LabelBank`
                from :meth:`encode_labels`, or (ids, mask) (encoded each call).
            k: 1 <= k <= N.

        Returns:
            (scores [B, k] float32 cosine, descending, label indices [B, k] int64; equal scores
            lowest index first).

        NaN rule (every task): a sample whose predicted embedding is not finite (NaN / inf in
        its input, or in the weights) is refused right after the predictor runs, with a
        ValueError naming ``video`` and those batch rows (never NaN scores or an arbitrary
        index); likewise a label whose embedding is not finite (naming ``label_texts``).

        Raises:
            ValueError: an empty label list, a stale LabelBank, k out of range, or the NaN
                rule.
        """
        labels = self._labels("label_texts", label_texts)
        pred = self.predict(video, query)
        _check_predicted("video", pred)
        return self._search(pred, labels, k)

    @torch.no_grad()
    def index_videos(
        self,
        videos: Tensor | Iterable[Tensor],
        query: Text,
        *,
        index: EmbeddingIndex | None = None,
        batch_size: int = 32,
    ) -> EmbeddingIndex:
        """Embed a video gallery into an :class:`~vljepa_fast.nn.EmbeddingIndex` (cosine) for
        :meth:`retrieve`; the index can be saved and grown.

        Args:
            videos: [N, C, T, H, W] (or [N, C, H, W]), or an iterable of such batches.
            query: the query the videos are embedded with (e.g. a captioning prompt).
            index: an index to add to (dim embed_dim, metric "cosine"); default a new one on
                the model's device with the model's backend. Ids continue its count (the
                first video of a new index is id 0).
            batch_size: videos per :meth:`predict` call when ``videos`` is one tensor.

        Returns:
            The index.

        NaN rule (as :meth:`classify`): each batch is checked right after the predictor runs;
        a video whose predicted embedding is not finite raises a ValueError naming ``videos``
        and its position in the gallery (counted over all batches from 0), before later
        batches are embedded; the batches before it stay added to ``index``.
        """
        batch_size = _int("batch_size", batch_size, 1)
        if index is None:
            dev = next(self.predictor.parameters()).device
            index = EmbeddingIndex(
                self.config.embed_dim, "cosine", device=dev, backend=self.backend
            )
        else:
            self._check_index(index)
        one = isinstance(videos, Tensor)
        if one:
            whole = videos
            videos = (whole[i : i + batch_size] for i in range(0, whole.shape[0], batch_size))
        seen = 0
        for j, batch in enumerate(videos):
            pred = self._predict(batch, query, name="videos" if one else f"videos (batch {j})")
            pred = pred.float()
            _check_predicted("videos", pred, seen, "videos")
            index.add(pred)
            seen += pred.shape[0]
        return index

    def _check_index(self, index: EmbeddingIndex) -> None:
        if index.dim != self.config.embed_dim or index.metric != "cosine":
            raise ValueError(
                f"index: expected an EmbeddingIndex of dim {self.config.embed_dim} and metric "
                f"'cosine', got dim {index.dim}, metric {index.metric!r}"
            )

    @torch.no_grad()
    def retrieve(
        self, text: Text, videos: Tensor | EmbeddingIndex, query: Text | None = None, k: int = 1
    ) -> tuple[Tensor, Tensor]:
        """Text-to-video retrieval: rank videos by cosine similarity to each text.

        Args:
            text: the search texts.
            videos: a [N, ...] video tensor (embedded here with ``query``, e.g. a captioning
                prompt), or an :class:`~vljepa_fast.nn.EmbeddingIndex` from :meth:`index_videos`
                (large galleries: embedded once; ``query`` must then be None).
            k: 1 <= k <= N.

        Returns:
            (scores [n_texts, k] float32 descending, video indices [n_texts, k] int64: positions
            in ``videos``, or the index's ids).

        NaN rule (as :meth:`classify`): a video whose predicted embedding is not finite is
        refused (ValueError naming ``videos`` and those rows), and so is a text whose
        embedding is not finite (naming ``text``).
        """
        if isinstance(videos, EmbeddingIndex):
            if query is not None:
                raise ValueError(
                    "query: not used with an EmbeddingIndex gallery (its videos were embedded "
                    "by index_videos with theirs); pass query=None"
                )
            self._check_index(videos)
            n = len(videos)
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
                raise ValueError(f"k: expected an int in [1, {n}], got {k!r}")
            t = self.encode_text(text).float()
            _check_texts("text", t)
            return videos.search(F.normalize(t, dim=-1), k)
        if query is None:
            raise ValueError("query: required to embed a video tensor (or pass an EmbeddingIndex)")
        t = self.encode_text(text).float()
        _check_texts("text", t)
        pred = self._predict(videos, query, name="videos")
        _check_predicted("videos", pred)
        return self._search(t, pred, k)

    @torch.no_grad()
    def answer(
        self, video: Tensor, question: Text, candidates: Sequence | LabelBank
    ) -> tuple[Tensor, Tensor]:
        """Discriminative VQA: for each sample, the candidate answer nearest (cosine) to the
        predicted embedding of (video, question).

        Args:
            video: [B, ...] videos.
            question: B questions (or one shared).
            candidates: one list of answers (or a :class:`LabelBank`) shared by all samples, or
                B of them (lists or LabelBanks; lengths may differ). Strings go through the
                keyed cache as :meth:`classify`'s labels.

        Returns:
            (scores [B] float32 cosine of the chosen answers, indices [B] int64 into each
            sample's candidates; equal scores lowest index first).

        NaN rule (as :meth:`classify`): a sample whose predicted embedding is not finite is
        refused right after the predictor runs (ValueError naming ``video`` and those batch
        rows), and so is a candidate whose embedding is not finite (naming ``candidates``).

        Raises:
            ValueError: no candidates, B mismatch, a stale LabelBank, or the NaN rule.
        """
        if isinstance(candidates, LabelBank) or (
            isinstance(candidates, Sequence)
            and not isinstance(candidates, str)
            and len(candidates) > 0
            and all(isinstance(c, str) for c in candidates)
        ):
            cands = self._labels("candidates", candidates)
            pred = self.predict(video, question)
            _check_predicted("video", pred)
            s, i = self._search(pred, cands, 1)
            return s[:, 0], i[:, 0]
        if isinstance(candidates, str) or not isinstance(candidates, Sequence):
            raise ValueError(
                "candidates: expected a list of strings, a LabelBank, or one of them per sample"
            )
        if len(candidates) == 0:
            raise ValueError("candidates: expected at least one candidate answer, got none")
        pred = self.predict(video, question)
        _check_predicted("video", pred)
        B = pred.shape[0]
        if len(candidates) != B:
            raise ValueError(
                f"candidates: expected one shared list or {B} lists, got {len(candidates)}"
            )
        texts = []
        for i, cands in enumerate(candidates):
            if isinstance(cands, LabelBank):
                continue
            if isinstance(cands, str) or not isinstance(cands, Sequence):
                raise ValueError(f"candidates[{i}]: expected a list of strings or a LabelBank")
            for j, c in enumerate(cands):
                if not isinstance(c, str):
                    raise ValueError(
                        f"candidates[{i}][{j}]: expected a string, got {type(c).__name__}"
                    )
            if len(cands) == 0:
                raise ValueError(f"candidates[{i}]: expected at least one candidate, got none")
            texts.extend(cands)
        unique = list(dict.fromkeys(texts))
        table = self._label_embeddings(unique) if texts else None
        bad = set(_not_finite(table)) if table is not None else set()
        if bad:
            where = [
                f"candidates[{i}][{j}] ({c[:30]!r})"
                for i, cands in enumerate(candidates)
                if not isinstance(cands, LabelBank)
                for j, c in enumerate(cands)
                if unique.index(c) in bad
            ]
            raise ValueError(
                f"candidates: the Y-encoder embeddings of {', '.join(where[:8])} are not finite "
                "(NaN or inf): check the Y-encoder's weights"
            )
        row = {t: j for j, t in enumerate(unique)}
        scores, idx = [], []
        for i, cands in enumerate(candidates):
            if isinstance(cands, LabelBank):
                emb = self._bank(f"candidates[{i}]", cands)
            else:
                emb = table[torch.tensor([row[t] for t in cands], device=table.device)]
            s, j = self._search(pred[i : i + 1], emb, 1)
            scores.append(s[0, 0])
            idx.append(j[0, 0])
        return torch.stack(scores), torch.stack(idx)
