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

``SigLipLoss()(image_features, text_features, logit_scale, logit_bias)`` is open_clip's sigmoid
loss (features already normalised, ``logit_scale`` already exponentiated, mean = the N x N sum
divided by N) on :func:`vljepa_fast.sigmoid_loss` with ``normalize=False``: the same values and
gradients single-process (float32, float64; open_clip forms 16-bit logits in the features' dtype,
this one in float32, and returns float32). Across ranks (``world_size > 1``) every ``dist_impl``
("bidir", "shift", "reduce", "gather") computes the same pairs: each rank returns the global
loss (open_clip returns each rank's own rows' sum over its local batch size, whose mean over
ranks is the global loss for equal local sizes), and the DDP-averaged gradients are exactly
open_clip's.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from vljepa_fast import _backends, _validate, functional
from vljepa_fast._backends import BackendSpec
from vljepa_fast.nn import _flag, _integer

__all__ = ["ClipLoss", "SigLipLoss"]


def _check_one_element(name: str, t: Tensor, like: Tensor, alternative: str) -> None:
    """``t``: a floating one-element tensor on the features' device (``like``'s)."""
    if t.numel() != 1 or not t.is_floating_point():
        raise ValueError(
            f"{name}: expected {alternative}a floating one-element tensor, got {t.dtype} of shape "
            f"{tuple(t.shape)}"
        )
    if t.device != like.device:
        raise ValueError(f"{name}: expected device {like.device} (the features'), got {t.device}")


def _check_features(image_features: object, text_features: object) -> None:
    """[N, D] floating tensors of one shape, dtype and device (ClipLoss, SigLipLoss)."""
    _validate.tensor("image_features", image_features, ndim=2, layout="[N, D]")
    _validate.tensor("text_features", text_features, ndim=2, layout="[N, D]")
    if text_features.shape != image_features.shape:
        raise ValueError(
            f"text_features: expected the shape of image_features "
            f"{tuple(image_features.shape)}, got {tuple(text_features.shape)}"
        )
    _validate.same(("image_features", "text_features"), (image_features, text_features))
    _validate.same(("image_features", "text_features"), (image_features, text_features), "device")


def _world_group(world_size: int, rank: int) -> object | None:
    """None for one process, else the default process group, checked against the module's
    ``world_size`` and ``rank``."""
    if world_size == 1:
        return None
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("world_size: > 1 but torch.distributed is not initialised")
    if dist.get_world_size() != world_size:
        raise ValueError(
            f"world_size: {world_size} given, but the default process group has "
            f"{dist.get_world_size()} ranks"
        )
    if dist.get_rank() != rank:
        raise ValueError(f"rank: {rank} given, but this process is rank {dist.get_rank()}")
    return dist.group.WORLD


class ClipLoss(_backends.HoldsBackend, torch.nn.Module):
    """open_clip.loss.ClipLoss with the same constructor and call signature.

    Args:
        local_loss, gather_with_grad, cache_labels: open_clip's options (bools; see module doc).
        rank, world_size: this process in the default process group, 0 <= rank < world_size
            (world_size > 1 needs torch.distributed initialised with that rank and size).
        use_horovod: must be False.
        backend: a :data:`~vljepa_fast._backends.BackendSpec` ("auto", a backend name, or
            {op name: name}) passed unchanged to :func:`vljepa_fast.infonce_loss`; a name that
            op does not have is refused here (ValueError).

    Shapes:
        forward(image_features [N, D], text_features [N, D] (same dtype and device),
        logit_scale (a positive finite number, or a floating one-element tensor on the features'
        device, value checked eagerly outside torch.compile), logit_bias=None (None, a finite
        number or a floating one-element tensor on the features' device),
        output_dict=False (bool)) -> scalar float32, or {"contrastive_loss": scalar}.

    Raises:
        ValueError: a malformed argument (named in the message).
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
        backend: BackendSpec = "auto",
    ) -> None:
        super().__init__()
        if _flag("use_horovod", use_horovod):
            raise ValueError("use_horovod: Horovod is not supported; use torch.distributed")
        self.local_loss = _flag("local_loss", local_loss)
        self.gather_with_grad = _flag("gather_with_grad", gather_with_grad)
        self.cache_labels = _flag("cache_labels", cache_labels)
        self.world_size = _integer("world_size", world_size, 1)
        self.rank = _integer("rank", rank, 0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank: expected in [0, {self.world_size}) (world_size), got {rank}")
        self.backend = _backends.check_spec(backend, ops=("infonce_loss",))

    def _temperature(self, logit_scale: object, like: Tensor) -> float | Tensor:
        """1 / logit_scale, with logit_scale checked (not 0, negative, NaN or inf)."""
        if isinstance(logit_scale, Tensor):
            _check_one_element("logit_scale", logit_scale, like, "")
            temperature = 1.0 / logit_scale.reshape(())
            if torch.compiler.is_compiling():
                return temperature
            value = float(logit_scale.detach().reshape(()))
        elif isinstance(logit_scale, numbers.Real) and not _validate.is_bool(logit_scale):
            value = float(logit_scale)
            temperature = None
        else:
            raise ValueError(
                f"logit_scale: expected a number or a one-element tensor, got {logit_scale!r}"
            )
        if not (math.isfinite(value) and value > 0 and math.isfinite(1.0 / value)):
            raise ValueError(f"logit_scale: expected a positive finite value, got {value}")
        if not value <= 2.0**60:  # 1 / MIN_TEMPERATURE: the range vf.infonce_loss serves
            raise ValueError(f"logit_scale: expected a value <= 2**60 (about 1.2e18), got {value}")
        return 1.0 / value if temperature is None else temperature

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: float | Tensor,
        logit_bias: float | Tensor | None = None,
        output_dict: bool = False,
    ) -> Tensor | dict[str, Tensor]:
        _check_features(image_features, text_features)
        temperature = self._temperature(logit_scale, image_features)
        if isinstance(logit_bias, Tensor):
            _check_one_element("logit_bias", logit_bias, image_features, "None or ")
        elif logit_bias is not None and (
            _validate.is_bool(logit_bias)
            or not isinstance(logit_bias, numbers.Real)
            or not math.isfinite(float(logit_bias))
        ):
            raise ValueError(
                f"logit_bias: expected None, a finite number or a one-element tensor, got "
                f"{logit_bias!r}"
            )
        output_dict = _flag("output_dict", output_dict)
        group = _world_group(self.world_size, self.rank)
        loss = functional.infonce_loss(
            image_features,
            text_features,
            temperature=temperature,
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


def _one_value(name: str, v: object, like: Tensor, none_ok: bool) -> float | Tensor:
    """A number, or a one-element floating tensor on the features' device (as a 0-dim view);
    None -> 0.0 where ``none_ok`` (open_clip adds no bias then)."""
    if v is None and none_ok:
        return 0.0
    if isinstance(v, Tensor):
        _check_one_element(name, v, like, "None or " if none_ok else "")
        return v.reshape(())
    if isinstance(v, numbers.Real) and not _validate.is_bool(v):
        return float(v)
    what = "None, a number or" if none_ok else "a number or"
    raise ValueError(f"{name}: expected {what} a one-element tensor, got {v!r}")


class SigLipLoss(_backends.HoldsBackend, torch.nn.Module):
    """open_clip.loss.SigLipLoss with the same constructor and call signature (module doc).

    Args:
        cache_labels: accepted for compatibility (there are no labels to cache).
        rank, world_size: this process in the default process group, 0 <= rank < world_size
            (world_size > 1 needs torch.distributed initialised with that rank and size).
        dist_impl: None, "bidir", "shift", "reduce" or "gather" (all compute the same loss
            here: one all-gather of the text features with exact gradients).
        backend: a :data:`~vljepa_fast._backends.BackendSpec` passed unchanged to
            :func:`vljepa_fast.sigmoid_loss`; a name that op does not have is refused here.

    Shapes:
        forward(image_features [N, D], text_features [N, D] (same dtype and device),
        logit_scale (the multiplier: a finite number or a floating one-element tensor on the
        features' device), logit_bias (None, a finite number or such a tensor),
        output_dict=False (bool)) -> scalar float32, or {"contrastive_loss": scalar}.

    Raises:
        ValueError: a malformed argument (named in the message).
    """

    DIST_IMPLS = ("bidir", "shift", "reduce", "gather")

    def __init__(
        self,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        dist_impl: str | None = None,
        *,
        backend: BackendSpec = "auto",
    ) -> None:
        super().__init__()
        self.cache_labels = _flag("cache_labels", cache_labels)
        self.world_size = _integer("world_size", world_size, 1)
        self.rank = _integer("rank", rank, 0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank: expected in [0, {self.world_size}) (world_size), got {rank}")
        if dist_impl is not None and dist_impl not in self.DIST_IMPLS:
            raise ValueError(f"dist_impl: expected None or one of {self.DIST_IMPLS}, got "
                             f"{dist_impl!r}")
        self.dist_impl = dist_impl or "bidir"
        self.backend = _backends.check_spec(backend, ops=("sigmoid_loss",))

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: float | Tensor,
        logit_bias: float | Tensor | None,
        output_dict: bool = False,
    ) -> Tensor | dict[str, Tensor]:
        _check_features(image_features, text_features)
        scale = _one_value("logit_scale", logit_scale, image_features, none_ok=False)
        bias = _one_value("logit_bias", logit_bias, image_features, none_ok=True)
        output_dict = _flag("output_dict", output_dict)
        group = _world_group(self.world_size, self.rank)
        loss = functional.sigmoid_loss(
            image_features,
            text_features,
            logit_scale=scale,
            logit_bias=bias,
            normalize=False,
            reduction="mean",
            group=group,
            backend=self.backend,
        )
        return {"contrastive_loss": loss} if output_dict else loss
