"""A drop-in for open_clip's ``ClipLoss`` on the fused InfoNCE kernels.

``ClipLoss()(image_features, text_features, logit_scale)`` computes the same loss as open_clip
(features already L2-normalised by the model, ``logit_scale`` already exponentiated) without the
N x N logits. Differences, on purpose:

* Across ranks (``world_size > 1``) the gradients are always exact: they are those of
  open_clip's ``gather_with_grad=True`` (its ``gather_with_grad=False`` drops the remote terms of
  the gradient). The returned value is the global loss on every rank; with ``local_loss=True``
  open_clip returns each rank's share instead (whose mean over ranks is the same number), and
  both give the same gradients.
* ``cache_labels`` and ``use_horovod`` are accepted for signature compatibility; there are no
  labels to cache, and Horovod is not supported (ValueError).
* ``logit_bias`` (open_clip's fourth positional argument) must be None or a one-element tensor or
  number: open_clip adds it to every logit, which cancels in both softmaxes, so the loss does not
  depend on it and its gradient is exactly 0 (open_clip's is 0 up to rounding).
"""

from __future__ import annotations

import torch
from torch import Tensor

from vljepa_fast import functional

__all__ = ["ClipLoss"]


class ClipLoss(torch.nn.Module):
    """open_clip.loss.ClipLoss with the same constructor and call signature.

    Args:
        local_loss, gather_with_grad, cache_labels: open_clip's options (see module doc).
        rank, world_size: this process in the default process group (world_size > 1 needs
            torch.distributed initialised).
        use_horovod: must be False.
        backend: passed to :func:`vljepa_fast.infonce_loss`.

    Shapes:
        forward(image_features [N, D], text_features [N, D], logit_scale float or 0-dim tensor,
        logit_bias=None (None or one element), output_dict=False) -> scalar float32, or
        {"contrastive_loss": scalar}.
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if use_horovod:
            raise ValueError("use_horovod: Horovod is not supported; use torch.distributed")
        self.local_loss, self.gather_with_grad, self.cache_labels = (
            local_loss,
            gather_with_grad,
            cache_labels,
        )
        self.rank, self.world_size, self.backend = rank, world_size, backend

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: float | Tensor,
        logit_bias: float | Tensor | None = None,
        output_dict: bool = False,
    ) -> Tensor | dict[str, Tensor]:
        if isinstance(logit_bias, Tensor) and logit_bias.numel() != 1:
            raise ValueError(
                f"logit_bias: expected None or one element, got shape {tuple(logit_bias.shape)}"
            )
        group = None
        if self.world_size > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                raise ValueError("world_size: > 1 but torch.distributed is not initialised")
            group = dist.group.WORLD
        loss = functional.infonce_loss(
            image_features,
            text_features,
            temperature=1.0 / logit_scale,
            symmetric=True,
            normalize=False,
            group=group,
            backend=self.backend,
        )
        if isinstance(logit_bias, Tensor) and logit_bias.requires_grad:
            # A constant on every logit cancels in both softmaxes: exactly zero gradient, and
            # logit_bias stays in the graph (its .grad is 0, not None, as with open_clip).
            loss = loss + 0.0 * logit_bias.reshape(())
        return {"contrastive_loss": loss} if output_dict else loss
