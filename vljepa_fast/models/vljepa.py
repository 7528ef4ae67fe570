"""VL-JEPA: X-encoder -> predictor -> predicted embedding, trained against the Y-encoder's
embedding of the target text with vf.infonce_loss; tasks run on vf.topk_similarity.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vljepa_fast import _backends, functional
from vljepa_fast._backends import BackendSpec
from vljepa_fast.models.config import VLJEPAConfig
from vljepa_fast.models.predictor import Predictor
from vljepa_fast.models.tokenizer import ByteTokenizer
from vljepa_fast.models.x_encoder import XEncoder
from vljepa_fast.models.y_encoder import TextEncoder

__all__ = ["VLJEPA"]

#: text given as strings (tokenized by the model's tokenizer) or as (ids [B, L], mask [B, L])
Text = str | Sequence[str] | tuple[Tensor, Tensor | None]


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
        query_tokenizer: texts -> (ids, mask) for the predictor's queries (default: a
            :class:`ByteTokenizer`, matching the tiny config's vocabulary).
        text_tokenizer: texts -> (ids, mask) for the Y-encoder (default: ``y_encoder.tokenize``
            when it has one, else a ByteTokenizer).
    """

    def __init__(
        self,
        config: VLJEPAConfig,
        backend: BackendSpec = "auto",
        *,
        y_encoder: nn.Module | None = None,
        query_tokenizer: Callable[[Sequence[str]], tuple[Tensor, Tensor]] | None = None,
        text_tokenizer: Callable[[Sequence[str]], tuple[Tensor, Tensor]] | None = None,
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
        if config.learnable_temperature:
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.temperature)))
        else:
            self.register_parameter("logit_scale", None)
        if config.freeze_x_encoder:
            self.x_encoder.requires_grad_(False)
        self.query_tokenizer = query_tokenizer or ByteTokenizer(config.predictor.max_query_len)
        self.text_tokenizer = (
            text_tokenizer
            or getattr(self.y_encoder, "tokenize", None)
            or ByteTokenizer(config.y_encoder.max_len)
        )

    # ------------------------------------------------------------------ encoders

    def _tokens(self, text: Text, tokenizer, name: str) -> tuple[Tensor, Tensor | None]:
        if isinstance(text, tuple) and len(text) == 2 and isinstance(text[0], Tensor):
            return text
        if isinstance(text, str):
            text = [text]
        if not isinstance(text, Sequence) or not all(isinstance(t, str) for t in text):
            raise ValueError(
                f"{name}: expected a string, a list of strings or an (ids, mask) "
                f"tuple, got {type(text).__name__}"
            )
        if len(text) == 0:
            raise ValueError(f"{name}: expected at least one text, got an empty list")
        return tokenizer(list(text))

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
        if (video is None) == (x_features is None):
            raise ValueError("predict: give exactly one of video and x_features")
        visual = self.encode_video(video) if x_features is None else x_features
        ids, mask = self._tokens(query, self.query_tokenizer, "query")
        ids = ids.to(visual.device)
        mask = None if mask is None else mask.to(visual.device)
        if ids.shape[0] == 1 and visual.shape[0] > 1:  # one query shared by the batch
            ids = ids.expand(visual.shape[0], -1)
            mask = None if mask is None else mask.expand(visual.shape[0], -1)
        return self.predictor(visual, ids, mask)

    def encode_text(self, text: Text) -> Tensor:
        """[B, embed_dim] Y-encoder embeddings of target texts."""
        ids, mask = self._tokens(text, self.text_tokenizer, "text")
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
        tgt = self.encode_text(target)
        if tgt.shape != pred.shape:
            raise ValueError(f"target: {tgt.shape[0]} texts for {pred.shape[0]} videos")
        tgt = tgt.to(pred.dtype)
        return functional.infonce_loss(
            pred,
            tgt,
            temperature=self.temperature(),
            group=group,
            reduction=reduction,
            backend=self.backend,
        )

    def param_groups(self, lr: float, weight_decay: float = 0.0) -> list[dict]:
        """Optimizer parameter groups.

        The Y-encoder's body trains at ``lr * lr_multiplier`` (paper: 0.05, which protects a
        pretrained text encoder); its freshly initialised linear ``head`` to the shared space
        and everything else trainable train at ``lr``. Frozen parameters are left out.

        Returns:
            [{"name": "main", ...}, {"name": "y_encoder", ...}] for torch.optim.
        """
        mult = getattr(self.y_encoder, "lr_multiplier", self.config.y_encoder.lr_multiplier)
        head = getattr(self.y_encoder, "head", None)
        head_ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
        y = [p for p in self.y_encoder.parameters() if p.requires_grad and id(p) not in head_ids]
        y_ids = {id(p) for p in y}
        main = [p for p in self.parameters() if p.requires_grad and id(p) not in y_ids]
        return [
            {"params": main, "lr": lr, "weight_decay": weight_decay, "name": "main"},
            {"params": y, "lr": lr * mult, "weight_decay": weight_decay, "name": "y_encoder"},
        ]

    # ------------------------------------------------------------------ tasks

    def _search(self, queries: Tensor, bank: Tensor, k: int) -> tuple[Tensor, Tensor]:
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= bank.shape[0]:
            raise ValueError(f"k: expected an int in [1, {bank.shape[0]}], got {k!r}")
        q = F.normalize(queries.float(), dim=-1)
        b = F.normalize(bank.float(), dim=-1)
        return functional.topk_similarity(
            q.contiguous(), b.contiguous(), k, metric="ip", backend=self.backend
        )

    @torch.no_grad()
    def classify(
        self, video: Tensor, query: Text, label_texts: Sequence[str] | tuple, k: int = 1
    ) -> tuple[Tensor, Tensor]:
        """Open-vocabulary classification: nearest label embeddings (cosine) to each prediction.

        Returns:
            (scores [B, k] float32 descending, label indices [B, k] int64).

        Raises:
            ValueError: an empty label list, or k > number of labels.
        """
        if (
            isinstance(label_texts, Sequence)
            and not isinstance(label_texts, str | tuple)
            and len(label_texts) == 0
        ):
            raise ValueError("label_texts: expected at least one label, got an empty list")
        labels = self.encode_text(label_texts)
        return self._search(self.predict(video, query), labels, k)

    @torch.no_grad()
    def retrieve(
        self, text: Text, videos: Tensor, query: Text, k: int = 1
    ) -> tuple[Tensor, Tensor]:
        """Text-to-video retrieval: rank videos (embedded with ``query``, e.g. a captioning
        prompt) by cosine similarity to each text.

        Returns:
            (scores [n_texts, k], video indices [n_texts, k] int64).
        """
        return self._search(self.encode_text(text), self.predict(videos, query), k)

    @torch.no_grad()
    def answer(self, video: Tensor, question: Text, candidates: Sequence) -> Tensor:
        """Discriminative VQA: for each sample, the index of the candidate answer nearest to the
        predicted embedding of (video, question).

        Args:
            video: [B, ...] videos.
            question: B questions (or one shared).
            candidates: one list of answers shared by all samples, or B lists.

        Returns:
            [B] int64 candidate indices.
        """
        pred = self.predict(video, question)
        B = pred.shape[0]
        if len(candidates) == 0:
            raise ValueError("candidates: expected at least one candidate answer, got none")
        if all(isinstance(c, str) for c in candidates):
            return self._search(pred, self.encode_text(list(candidates)), 1)[1][:, 0]
        if len(candidates) != B:
            raise ValueError(
                f"candidates: expected one shared list or {B} lists, got {len(candidates)}"
            )
        out = []
        for i, cands in enumerate(candidates):
            if len(cands) == 0:
                raise ValueError(f"candidates[{i}]: expected at least one candidate, got none")
            out.append(self._search(pred[i : i + 1], self.encode_text(list(cands)), 1)[1][0, 0])
        return torch.stack(out)
