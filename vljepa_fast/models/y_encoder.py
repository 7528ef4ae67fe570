"""Y-encoder: text -> target embedding. A built-in bidirectional encoder, or any transformers one.

Both end in mean pooling over real tokens and a linear head to the shared space, and both
carry ``lr_multiplier`` (the paper trains the Y-encoder at 0.05x the learning rate; see
:meth:`vljepa_fast.models.VLJEPA.param_groups`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from vljepa_fast import _backends
from vljepa_fast._backends import BackendSpec
from vljepa_fast.models._layers import check_tokens, gqa_attention, masked_mean
from vljepa_fast.models.config import YEncoderConfig

__all__ = ["HFTextEncoder", "TextEncoder"]


class _Block(nn.Module):
    def __init__(self, cfg: YEncoderConfig, backend: BackendSpec) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = gqa_attention(
            cfg, backend, rope_scaling=None, max_position_embeddings=cfg.max_len, causal=False
        )
        self.norm2 = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.dim)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))


class TextEncoder(_backends.HoldsBackend, nn.Module):
    """Built-in bidirectional text encoder on vf.attention (GQA, RoPE, RMSNorm, GELU MLP).

    Args:
        cfg: sizes.
        embed_dim: the shared embedding space.
        backend: a :data:`~vljepa_fast._backends.BackendSpec` for every op the blocks call
            (attention, rotary), as :class:`~vljepa_fast.models.Predictor`'s.
    """

    def __init__(self, cfg: YEncoderConfig, embed_dim: int, backend: BackendSpec = "auto") -> None:
        super().__init__()
        self.cfg, self.backend = cfg, _backends.check_spec(backend, ops=("attention", "rotary"))
        self.lr_multiplier = cfg.lr_multiplier
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(_Block(cfg, self.backend) for _ in range(cfg.layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, embed_dim)

    def forward(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        """ids [B, L] int64 right-padded, mask [B, L] bool (None: from pad_id) -> [B, embed_dim]."""
        c = self.cfg
        if mask is None and isinstance(ids, Tensor):
            mask = ids != c.pad_id
        mask = check_tokens("text ids", ids, mask, c.vocab_size, c.max_len)
        x = self.embed_tokens(ids)
        for blk in self.blocks:
            x = blk(x, mask)
        return self.head(masked_mean(self.norm(x), mask))


class HFTextEncoder(nn.Module):
    """Any transformers encoder (e.g. all-MiniLM-L6-v2) as the Y-encoder.

    The wrapped model's attention follows its own ``attn_implementation``; route it through
    vf.attention with :mod:`vljepa_fast.integrations.transformers` if wanted.

    Args:
        model: a transformers ``PreTrainedModel`` returning ``last_hidden_state``.
        embed_dim: the shared embedding space (the head maps hidden_size -> embed_dim).
        tokenizer: optional transformers tokenizer, used by :meth:`tokenize`.
        max_len: the longest token sequence accepted.
        lr_multiplier: learning-rate multiplier of the wrapped model (paper: 0.05); the new
            head trains at the full rate (see :meth:`VLJEPA.param_groups`).
    """

    def __init__(
        self,
        model: nn.Module,
        embed_dim: int,
        tokenizer=None,
        max_len: int = 512,
        lr_multiplier: float = 0.05,
    ) -> None:
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.max_len, self.lr_multiplier = max_len, lr_multiplier
        hidden = model.config.hidden_size
        self.vocab_size = model.config.vocab_size
        self.head = nn.Linear(hidden, embed_dim)

    @classmethod
    def from_pretrained(cls, path: str, embed_dim: int, **kwargs) -> HFTextEncoder:
        """Load a local transformers model directory (no hub access: local_files_only)."""
        import transformers

        tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = transformers.AutoModel.from_pretrained(path, local_files_only=True)
        return cls(model, embed_dim, tokenizer=tok, **kwargs)

    def tokenize(self, texts: str | Sequence[str]) -> tuple[Tensor, Tensor]:
        """(ids [B, L] int64, mask [B, L] bool) with the wrapped tokenizer."""
        if self.tokenizer is None:
            raise ValueError("HFTextEncoder.tokenize: no tokenizer was given")
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ValueError("texts: expected at least one text, got an empty list")
        enc = self.tokenizer(texts, padding=True, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"].bool()

    def forward(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        """ids [B, L], mask [B, L] bool (None: all real) -> [B, embed_dim]."""
        mask = check_tokens("text ids", ids, mask, self.vocab_size, self.max_len)
        dev = self.head.weight.device
        out = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev).long())
        hidden = out.last_hidden_state.to(self.head.weight.dtype)
        return self.head(masked_mean(hidden, mask.to(dev)))
