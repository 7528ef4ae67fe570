"""A dependency-free byte-level tokenizer for the tiny model (tests, CPU examples)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["ByteTokenizer"]


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then PAD 256, BOS 257, EOS 258 (vocab 260, one spare).

    Args:
        max_len: the longest tokenisation accepted; longer text raises (no silent truncation).
    """

    vocab_size, pad_id, bos_id, eos_id = 260, 256, 257, 258

    def __init__(self, max_len: int = 48) -> None:
        self.max_len = max_len

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def __call__(self, texts: str | Sequence[str]) -> tuple[Tensor, Tensor]:
        """Right-padded batch.

        Returns:
            (ids [B, L] int64, mask [B, L] bool, True = a real token), L the longest text.

        Raises:
            ValueError: an empty list, or a text longer than ``max_len`` bytes (named).
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ValueError("texts: expected at least one text, got an empty list")
        rows = [self.encode(t) for t in texts]
        for t, r in zip(texts, rows):
            if len(r) > self.max_len:
                raise ValueError(
                    f"texts: {t[:30]!r}... is {len(r)} tokens, more than max_len ({self.max_len})"
                )
        L = max(1, max(len(r) for r in rows))
        ids = torch.full((len(rows), L), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), L, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = True
        return ids, mask
