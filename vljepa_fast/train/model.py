"""The model a training run builds: the same weights on every rank, in every process that asks
(the trainer, ``cache_features``), from the seed and the local checkpoints given."""

from __future__ import annotations

import os

import torch

from vljepa_fast._backends import BackendSpec
from vljepa_fast.models import VLJEPA, load_pretrained
from vljepa_fast.train.presets import Preset

__all__ = ["build_model"]

PathArg = str | os.PathLike | None


def build_model(
    preset: Preset,
    seed: int,
    backend: BackendSpec = "auto",
    *,
    x_encoder: PathArg = None,
    predictor: PathArg = None,
    y_encoder: PathArg = None,
    query_tokenizer: object | None = None,
    text_tokenizer: object | None = None,
) -> VLJEPA:
    """:class:`~vljepa_fast.models.VLJEPA` of ``preset.model``, initialised from ``seed``
    (``torch.manual_seed``), then the checkpoints given loaded by
    :func:`~vljepa_fast.models.load_pretrained` (strict).

    The Y-decoder is built (so that the random draws, and with them every other module's
    initial weights, do not depend on it) and then dropped: the InfoNCE loss never reaches it
    (``model.y_decoder`` is None; train it afterwards with ``VLJEPA.decoder_loss``).
    """
    torch.manual_seed(seed)
    paths = dict(x_encoder=x_encoder, predictor=predictor, y_encoder=y_encoder)
    tokenizers = dict(query_tokenizer=query_tokenizer, text_tokenizer=text_tokenizer)
    if any(p is not None for p in paths.values()):
        model, _ = load_pretrained(preset.model, backend=backend, **paths, **tokenizers)
    else:
        model = VLJEPA(preset.model, backend, **tokenizers)
    model.y_decoder, model.decoder_tokenizer = None, None
    return model
