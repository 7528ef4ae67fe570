"""Y-decoder: a small causal transformer that turns an embedding into text.

The embedding is mapped to ``prefix_tokens`` prefix vectors that precede the text tokens; the
decoder is trained with next-token cross-entropy on (embedding, text) pairs and decodes
greedily with a KV cache (each new token attends to the cached keys through vf.attention's
bottom-right-aligned causal mask, so prefill and single-token steps share one code path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vljepa_fast import _backends, functional
from vljepa_fast._backends import BackendSpec
from vljepa_fast.models._layers import PreNormBlock, RMSNorm, SwiGLU, check_tokens
from vljepa_fast.models.config import YDecoderConfig
from vljepa_fast.ops.rotary import apply_rotary, rotary_cos_sin

__all__ = ["YDecoder"]

KVCache = list[tuple[Tensor, Tensor]]


class _Attention(_backends.HoldsBackend, nn.Module):
    def __init__(self, cfg: YDecoderConfig, backend: BackendSpec) -> None:
        super().__init__()
        self.heads, self.head_dim, self.backend = cfg.heads, cfg.dim // cfg.heads, backend
        self.q_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.o_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        cache: tuple[Tensor, Tensor] | None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        B, L, C = x.shape
        q = self.q_proj(x).view(B, L, self.heads, self.head_dim)
        k = self.k_proj(x).view(B, L, self.heads, self.head_dim)
        v = self.v_proj(x).view(B, L, self.heads, self.head_dim)
        q, k = apply_rotary(q, k, cos, sin, layout="llama", backend=self.backend)
        if cache is not None:
            k, v = torch.cat((cache[0], k), dim=1), torch.cat((cache[1], v), dim=1)
        out = functional.attention(
            q, k, v, key_padding_mask=mask, causal=True, backend=self.backend
        )
        return self.o_proj(out.reshape(B, L, C)), (k, v)


class _Block(PreNormBlock):
    def __init__(self, cfg: YDecoderConfig, backend: BackendSpec) -> None:
        attn, mlp = _Attention(cfg, backend), SwiGLU(cfg.dim, cfg.mlp_dim)
        super().__init__(RMSNorm, cfg.dim, cfg.norm_eps, attn, mlp)

    def forward(self, x, cos, sin, mask, cache):
        h, kv = self.attn(self.norm1(x), cos, sin, mask, cache)
        return self.residual(x, h), kv


class YDecoder(_backends.HoldsBackend, nn.Module):
    """Embedding -> text decoder.

    Args:
        cfg: sizes and special token ids (BOS starts every text, EOS ends it).
        embed_dim: width of the embeddings it decodes.
        backend: a :data:`~vljepa_fast._backends.BackendSpec` for every op the blocks call
            (attention, rotary), as :class:`~vljepa_fast.models.XEncoder`'s.
    """

    def __init__(self, cfg: YDecoderConfig, embed_dim: int, backend: BackendSpec = "auto") -> None:
        super().__init__()
        self.cfg, self.backend = cfg, _backends.check_spec(backend, ops=("attention", "rotary"))
        self.embed_dim = embed_dim
        self.prefix = nn.Linear(embed_dim, cfg.prefix_tokens * cfg.dim)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(_Block(cfg, self.backend) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def _check_embedding(self, embedding: Tensor) -> None:
        if (
            not isinstance(embedding, Tensor)
            or embedding.dim() != 2
            or embedding.shape[1] != self.embed_dim
        ):
            got = tuple(embedding.shape) if isinstance(embedding, Tensor) else type(embedding)
            raise ValueError(f"embedding: expected [B, {self.embed_dim}], got {got}")

    def _run(
        self, x: Tensor, start: int, mask: Tensor | None, cache: KVCache | None
    ) -> tuple[Tensor, KVCache]:
        pos = torch.arange(start, start + x.shape[1], device=x.device)
        cos, sin = rotary_cos_sin(
            pos, self.cfg.dim // self.cfg.heads, rope_scaling=None, theta=10000.0
        )
        new = []
        for i, blk in enumerate(self.blocks):
            x, kv = blk(x, cos, sin, mask, None if cache is None else cache[i])
            new.append(kv)
        return self.lm_head(self.norm(x)), new

    def forward(self, embedding: Tensor, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        """Teacher-forced logits.

        Args:
            embedding: [B, embed_dim].
            ids: [B, L] int64 text tokens, right-padded; ids[:, 0] is BOS.
            mask: [B, L] bool, True = a real token (None: all real).

        Returns:
            [B, L, vocab] float logits; position t predicts ids[:, t + 1].
        """
        self._check_embedding(embedding)
        c = self.cfg
        mask = check_tokens("ids", ids, mask, c.vocab_size, c.max_len)
        B = ids.shape[0]
        if B != embedding.shape[0]:
            raise ValueError(f"ids: batch {B} != embedding batch {embedding.shape[0]}")
        prefix = self.prefix(embedding).view(B, c.prefix_tokens, c.dim)
        x = torch.cat((prefix, self.embed_tokens(ids)), dim=1)
        full = torch.cat((mask.new_ones(B, c.prefix_tokens), mask), dim=1)
        logits, _ = self._run(x, 0, full, None)
        return logits[:, c.prefix_tokens :]

    def loss(self, embedding: Tensor, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        """Mean next-token cross-entropy over the real tokens after BOS."""
        if mask is None:
            mask = torch.ones_like(ids, dtype=torch.bool)
        logits = self(embedding, ids, mask)[:, :-1]
        tgt = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1))

    @torch.no_grad()
    def generate(
        self, embedding: Tensor, max_new_tokens: int = 32, use_cache: bool = True
    ) -> list[list[int]]:
        """Greedy decoding from BOS until EOS or ``max_new_tokens``.

        Args:
            embedding: [B, embed_dim].
            max_new_tokens: tokens generated at most (the EOS not included in the output).
            use_cache: keep keys and values (one token per step); False recomputes the whole
                sequence each step (the check of the cache).

        Returns:
            B lists of token ids (without BOS and EOS).
        """
        self._check_embedding(embedding)
        c = self.cfg
        bad = isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
        if bad or not 1 <= max_new_tokens <= c.max_len - 1:
            raise ValueError(f"max_new_tokens: expected 1..{c.max_len - 1}, got {max_new_tokens}")
        B = embedding.shape[0]
        prefix = self.prefix(embedding).view(B, c.prefix_tokens, c.dim)
        ids = torch.full((B, 1), c.bos_id, dtype=torch.long, device=embedding.device)
        x = torch.cat((prefix, self.embed_tokens(ids)), dim=1)
        logits, cache = self._run(x, 0, None, None)
        done = torch.zeros(B, dtype=torch.bool, device=embedding.device)
        out: list[Tensor] = []
        for _ in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1)
            done = done | (nxt == c.eos_id)
            if done.all():
                break
            out.append(nxt.masked_fill(done, c.eos_id))
            ids = torch.cat((ids, nxt[:, None]), dim=1)
            if use_cache:
                step = self.embed_tokens(nxt[:, None])
                logits, cache = self._run(step, x.shape[1] + len(out) - 1, None, cache)
            else:
                full = torch.cat((prefix, self.embed_tokens(ids)), dim=1)
                logits, _ = self._run(full, 0, None, None)
        rows = torch.stack(out, 1).tolist() if out else [[] for _ in range(B)]
        return [[t for t in r if t != c.eos_id] for r in rows]
