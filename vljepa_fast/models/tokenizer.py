"""Tokenizers of the model: texts -> (ids [B, L] int64, mask [B, L] bool), right-padded.

Two kinds share one small protocol (``__call__``, ``encode``, ``decode``, ``vocab_size``,
``pad_id``, ``bos_id``, ``eos_id``, ``max_len``, ``truncation``):

* :class:`ByteTokenizer`: UTF-8 bytes, no dependency (the tiny config's 260-id vocabulary);
* :class:`HFTokenizer`: an adapter over any ``transformers`` tokenizer (or a local tokenizer
  folder, loaded with ``local_files_only``: no model hub), with :meth:`HFTokenizer.llama`
  (Llama-3: a real pad token, ``<|finetune_right_pad_id|>`` = 128004, never EOS) and
  :meth:`HFTokenizer.gemma` (Gemma-3 / EmbeddingGemma: ``<pad>``) presets.

Texts longer than ``max_len`` tokens raise a ValueError (``truncation="error"``, the default)
or are cut to ``max_len`` with a :class:`TruncationWarning` (``truncation="warn"``).
:func:`as_tokenizer` is what :class:`~vljepa_fast.models.VLJEPA` applies to the tokenizers it
is given (a transformers tokenizer is wrapped, a path is loaded).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["ByteTokenizer", "HFTokenizer", "TruncationWarning", "as_tokenizer"]

_TRUNCATION = ("error", "warn")
LLAMA3_PAD_TOKEN = "<|finetune_right_pad_id|>"  # id 128004 in the Llama-3 vocabulary
GEMMA_PAD_TOKEN = "<pad>"  # id 0 in the Gemma-3 vocabulary


class TruncationWarning(UserWarning):
    """A text was cut to the tokenizer's ``max_len`` (``truncation="warn"``)."""


def _check_max_len(max_len: object) -> int:
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len: expected an int >= 1, got {max_len!r}")
    return max_len


def _check_truncation(truncation: object) -> str:
    if truncation not in _TRUNCATION:
        raise ValueError(f"truncation: expected 'error' or 'warn', got {truncation!r}")
    return truncation  # type: ignore[return-value]


def _texts(texts: str | Sequence[str]) -> list[str]:
    texts = [texts] if isinstance(texts, str) else texts
    if not isinstance(texts, Sequence):
        raise ValueError(
            f"texts: expected a string or a list of strings, got {type(texts).__name__}"
        )
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"texts[{i}]: expected a string, got {type(t).__name__}")
    if len(texts) == 0:
        raise ValueError("texts: expected at least one text, got an empty list")
    return list(texts)


def _fit(texts: list[str], rows: list[list[int]], max_len: int, truncation: str, cut) -> None:
    """Rows longer than ``max_len``: a ValueError (truncation "error") or, with a
    :class:`TruncationWarning`, replaced in place by ``cut(text, row)``."""
    for i, (t, r) in enumerate(zip(texts, rows)):
        if len(r) > max_len:
            if truncation == "error":
                raise ValueError(_too_long(t, len(r), max_len))
            warnings.warn(_too_long(t, len(r), max_len) + ": truncated", TruncationWarning,
                          stacklevel=3)  # fmt: skip
            rows[i] = cut(t, r)


def _too_long(text: str, n: int, max_len: int) -> str:
    return f"texts: {text[:30]!r}... is {n} tokens, more than max_len ({max_len})"


def _pad(rows: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    L = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.bool)
    for i, r in enumerate(rows):
        if r:
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = True
    return ids, mask


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then PAD 256, BOS 257, EOS 258 (vocab 260, one spare).

    Args:
        max_len: the longest tokenisation accepted (bytes).
        truncation: "error" (default: a longer text raises a ValueError naming it) or "warn"
            (cut to ``max_len`` bytes, possibly inside a multi-byte character, with a
            :class:`TruncationWarning`).
    """

    vocab_size, pad_id, bos_id, eos_id = 260, 256, 257, 258

    def __init__(self, max_len: int = 48, truncation: str = "error") -> None:
        self.max_len = _check_max_len(max_len)
        self.truncation = _check_truncation(truncation)

    def __repr__(self) -> str:
        return f"ByteTokenizer(max_len={self.max_len}, truncation={self.truncation!r})"

    def encode(self, text: str) -> list[int]:
        """The text's byte ids, no special tokens, not truncated."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        """Bytes back to text; special ids (>= 256) are dropped, bad UTF-8 is replaced."""
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def __call__(self, texts: str | Sequence[str]) -> tuple[Tensor, Tensor]:
        """Right-padded batch.

        Returns:
            (ids [B, L] int64, mask [B, L] bool, True = a real token), L the longest text
            (after truncation).

        Raises:
            ValueError: an empty list, or (truncation "error") a text longer than ``max_len``
                bytes (named).
        """
        texts = _texts(texts)
        rows = [self.encode(t) for t in texts]
        _fit(texts, rows, self.max_len, self.truncation, lambda t, r: r[: self.max_len])
        return _pad(rows, self.pad_id)


def _load(tokenizer: object) -> object:
    """A local tokenizer folder -> its transformers tokenizer (no hub); a transformers
    tokenizer unchanged; anything else is refused (a path that is not an existing folder
    too: ValueError, never a model-hub lookup)."""
    if isinstance(tokenizer, str | os.PathLike):
        import transformers

        path = os.fspath(tokenizer)
        if not os.path.isdir(path):
            what = "is a file, not a folder" if os.path.exists(path) else "does not exist"
            raise ValueError(
                f"tokenizer: the local tokenizer folder {path!r} {what} (there is no model "
                "hub: pass an existing local folder or a transformers tokenizer)"
            )

        tokenizer = transformers.AutoTokenizer.from_pretrained(
            os.fspath(tokenizer), local_files_only=True
        )
    if not _is_hf_tokenizer(tokenizer):
        raise ValueError(
            "tokenizer: expected a transformers PreTrainedTokenizer(Fast) or a local "
            f"tokenizer folder, got {type(tokenizer).__name__}"
        )
    return tokenizer


def _is_hf_tokenizer(obj: object) -> bool:
    try:
        from transformers import PreTrainedTokenizerBase
    except ImportError:  # pragma: no cover - transformers is optional
        return False
    return isinstance(obj, PreTrainedTokenizerBase)


class HFTokenizer:
    """A ``transformers`` tokenizer as a model tokenizer: (ids, mask), right-padded.

    Padding is done here (the wrapped tokenizer's ``padding_side`` and pad token are not
    used or changed); the mask is True on real tokens.

    Args:
        tokenizer: a ``PreTrainedTokenizer`` / ``PreTrainedTokenizerFast``, or a local folder
            (str or path) loaded with ``AutoTokenizer.from_pretrained(path,
            local_files_only=True)``.
        max_len: the longest tokenisation accepted (special tokens included).
        truncation: "error" (default: ValueError naming the text) or "warn" (the tokenizer
            cuts the text to ``max_len`` tokens, keeping its special tokens, and a
            :class:`TruncationWarning` is issued).
        pad_id: the id that fills the padding (masked out; it need not be in the tokenizer's
            vocabulary, e.g. a model config's pad id); default the tokenizer's pad token. A
            tokenizer without one (Llama-3) needs it given: use :meth:`llama`, or ``pad_id=``
            (never EOS silently).
        add_special_tokens: let the tokenizer add its BOS / EOS / CLS / SEP (default True).

    Attributes:
        vocab_size: one more than the largest id it can write (tokens and ``pad_id``).

    Raises:
        ValueError: a bad argument (a path that is not an existing local folder included: no
            model hub is ever tried), or no pad token and no ``pad_id``.
    """

    def __init__(
        self,
        tokenizer: object,
        max_len: int,
        *,
        truncation: str = "error",
        pad_id: int | None = None,
        add_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer = _load(tokenizer)
        self.max_len = _check_max_len(max_len)
        self.truncation = _check_truncation(truncation)
        self.add_special_tokens = bool(add_special_tokens)
        vocab = tokenizer.get_vocab()
        self.vocab_size = max(len(tokenizer), max(vocab.values(), default=-1) + 1)
        if pad_id is None:
            pad_id = tokenizer.pad_token_id
            if pad_id is None:
                raise ValueError(
                    f"pad_id: the tokenizer ({type(tokenizer).__name__}) has no pad token; "
                    "pass pad_id= (Llama-3: HFTokenizer.llama, which pads with "
                    f"{LLAMA3_PAD_TOKEN} = 128004; EOS is never used silently)"
                )
        if isinstance(pad_id, bool) or not isinstance(pad_id, int):
            raise ValueError(f"pad_id: expected an int, got {pad_id!r}")
        if pad_id < 0:
            raise ValueError(f"pad_id: expected an int >= 0, got {pad_id}")
        self.pad_id = pad_id
        self.vocab_size = max(self.vocab_size, pad_id + 1)  # every id it can write

    @classmethod
    def _preset(cls, tokenizer, max_len, truncation, pad_token, family) -> HFTokenizer:
        tokenizer = _load(tokenizer)
        vocab = tokenizer.get_vocab()
        if pad_token not in vocab:
            raise ValueError(
                f"pad_token: {pad_token!r} is not in this tokenizer's vocabulary (not a "
                f"{family} tokenizer?); pass pad_token= or use HFTokenizer(..., pad_id=)"
            )
        return cls(tokenizer, max_len, truncation=truncation, pad_id=vocab[pad_token])

    @classmethod
    def llama(
        cls,
        tokenizer: object,
        max_len: int = 512,
        *,
        truncation: str = "error",
        pad_token: str = LLAMA3_PAD_TOKEN,
    ) -> HFTokenizer:
        """Llama-3 (the predictor's vocabulary, 128256 ids): BOS ``<|begin_of_text|>`` added,
        padded with ``pad_token`` (default ``<|finetune_right_pad_id|>``, id 128004, what
        :class:`~vljepa_fast.models.PredictorConfig` expects; Llama-3 sets no pad token).

        Raises:
            ValueError: ``pad_token`` is not in the tokenizer's vocabulary.
        """
        return cls._preset(tokenizer, max_len, truncation, pad_token, "Llama-3")

    @classmethod
    def gemma(
        cls,
        tokenizer: object,
        max_len: int = 512,
        *,
        truncation: str = "error",
        pad_token: str = GEMMA_PAD_TOKEN,
    ) -> HFTokenizer:
        """Gemma-3 / EmbeddingGemma (the Y-encoder's vocabulary): the tokenizer's own special
        tokens, padded with ``pad_token`` (default ``<pad>``, id 0).

        Raises:
            ValueError: ``pad_token`` is not in the tokenizer's vocabulary.
        """
        return cls._preset(tokenizer, max_len, truncation, pad_token, "Gemma")

    def __repr__(self) -> str:
        return (
            f"HFTokenizer({type(self.tokenizer).__name__}, max_len={self.max_len}, "
            f"truncation={self.truncation!r}, pad_id={self.pad_id}, "
            f"vocab_size={self.vocab_size})"
        )

    @property
    def bos_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    @property
    def eos_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        """The text's ids without special tokens, not truncated (for decoder targets)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        """Ids back to text, special tokens (and padding) skipped."""
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def __call__(self, texts: str | Sequence[str]) -> tuple[Tensor, Tensor]:
        """Right-padded batch.

        Returns:
            (ids [B, L] int64, mask [B, L] bool, True = a real token), L the longest text
            (after truncation); padding holds ``pad_id``.

        Raises:
            ValueError: an empty list, or (truncation "error") a text longer than ``max_len``
                tokens (named).
        """
        texts = _texts(texts)
        tok, special = self.tokenizer, self.add_special_tokens
        rows = [list(r) for r in tok(texts, add_special_tokens=special)["input_ids"]]

        def cut(t: str, r: list[int]) -> list[int]:  # re-tokenised: special tokens kept
            out = tok(t, add_special_tokens=special, truncation=True, max_length=self.max_len)
            return list(out["input_ids"])

        _fit(texts, rows, self.max_len, self.truncation, cut)
        return _pad(rows, self.pad_id)


def as_tokenizer(
    tokenizer: object, max_len: int, *, name: str = "tokenizer", pad_id: int | None = None
) -> object:
    """What a model does with a tokenizer it is given.

    * a transformers tokenizer is wrapped in an :class:`HFTokenizer` of ``max_len`` (padded
      with its pad token, else with ``pad_id``, the model config's; else a ValueError);
    * a str / path is a local tokenizer folder, loaded and wrapped the same way;
    * a :class:`ByteTokenizer`, an :class:`HFTokenizer` or any other callable
      ``texts -> (ids, mask)`` is returned unchanged (its output is checked at each call).

    Raises:
        ValueError: anything else (the message uses ``name``).
    """
    if isinstance(tokenizer, str | os.PathLike) or _is_hf_tokenizer(tokenizer):
        try:
            tokenizer = _load(tokenizer)
            own = tokenizer.pad_token_id
            return HFTokenizer(tokenizer, max_len, pad_id=own if own is not None else pad_id)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    if callable(tokenizer):
        return tokenizer
    raise ValueError(
        f"{name}: expected a transformers tokenizer, a local tokenizer folder, a ByteTokenizer, "
        f"an HFTokenizer or a callable texts -> (ids, mask), got {type(tokenizer).__name__}"
    )
