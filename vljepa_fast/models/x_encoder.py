"""X-encoder: the V-JEPA 2 video ViT (3D patch embedding, three-axis RoPE) on vf.attention.

Parameter names follow V-JEPA 2's ``VisionTransformer`` (``patch_embed.proj``,
``blocks.{i}.norm1 / attn.qkv / attn.proj / norm2 / mlp.fc1 / mlp.fc2``, ``norm``).
:func:`load_vjepa2_state_dict` reads both public layouts, detecting which one it is given: the
original repository's (facebookresearch/vjepa2: ``encoder`` / ``target_encoder`` dicts with
``module.backbone.`` prefixes, fused ``attn.qkv``) and transformers' ``VJEPA2Model``
(``encoder.embeddings.patch_embeddings.proj``, ``encoder.layer.{i}.attention.query / key /
value / proj``, ``encoder.layernorm``); :func:`vjepa2_state_dict` writes either. Tokens are
ordered (t, h, w) and rotated by their grid coordinates with the V-JEPA 2 channel layout of
:func:`vljepa_fast.rotary_cos_sin` (``layout="vjepa2"``); :class:`XEncoder` says how the two
implementations place tokens at resolutions other than the crop size.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vljepa_fast import _backends, functional
from vljepa_fast._backends import BackendSpec
from vljepa_fast.models._layers import (
    LoadResult,
    PreNormBlock,
    Source,
    load_mapped,
    one_layout,
)
from vljepa_fast.models.config import XEncoderConfig
from vljepa_fast.ops.rotary import apply_rotary, rotary_cos_sin

__all__ = ["XEncoder", "load_vjepa2_state_dict", "vjepa2_state_dict"]

_VJEPA2_PREFIXES = ("module.", "backbone.", "encoder.", "target_encoder.")


class _Attention(_backends.HoldsBackend, nn.Module):
    def __init__(self, cfg: XEncoderConfig, backend: BackendSpec) -> None:
        super().__init__()
        self.heads, self.head_dim, self.backend = cfg.heads, cfg.head_dim, backend
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.heads, self.head_dim)
        q, k, v = qkv.unbind(dim=2)
        q, k = apply_rotary(q, k, cos, sin, layout="vjepa2", backend=self.backend)
        out = functional.attention(q, k, v.contiguous(), backend=self.backend)
        return self.proj(out.reshape(B, N, C))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(PreNormBlock):
    def __init__(self, cfg: XEncoderConfig, backend: BackendSpec) -> None:
        attn, mlp = _Attention(cfg, backend), _Mlp(cfg.dim, cfg.mlp_dim)
        super().__init__(nn.LayerNorm, cfg.dim, cfg.norm_eps, attn, mlp)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        return self.residual(x, self.attn(self.norm1(x), cos, sin))


class _PatchEmbed(nn.Module):
    def __init__(self, cfg: XEncoderConfig) -> None:
        super().__init__()
        k = (cfg.tubelet, cfg.patch, cfg.patch)
        self.proj = nn.Conv3d(cfg.in_chans, cfg.dim, kernel_size=k, stride=k)

    def forward(self, video: Tensor) -> Tensor:
        return self.proj(video).flatten(2).transpose(1, 2)  # [B, T' * H' * W', dim], (t, h, w)


class XEncoder(_backends.HoldsBackend, nn.Module):
    """Video ViT: [B, C, T, H, W] video (or [B, C, H, W] image) -> [B, N, dim] visual tokens.

    Token n of the T' x H' x W' patch grid (T' = T / tubelet, H' = H / patch, W' = W / patch,
    n in (t, h, w) order) is rotated by three coordinates, one per channel group of the head
    (see :func:`vljepa_fast.rotary_cos_sin`). Which coordinates depends on
    ``cfg.position_mode``, and the two public implementations differ only here:

    * ``"original"`` (default; facebookresearch/vjepa2, whose ``VisionTransformer.forward``
      passes the input's own T', H', W' to every block, ``handle_nonsquare_inputs=True``):
      the grid coordinates t = n // (H'W'), h = (n mod H'W') // W', w = n mod W'.
    * ``"transformers"`` (transformers' ``VJEPA2RopeAttention.get_position_ids``): the flat
      index decomposed with the crop grid g = ``cfg.image_size // cfg.patch`` whatever the
      input size: t = n // g^2, h = (n mod g^2) // g, w = n mod g.

    At the crop size (H' = W' = g) the two are the same. At any other resolution the
    transformers rule wraps rows (with W' > g the token at (h=0, w=g) gets (h=1, w=0)) and
    shifts frame boundaries, so its outputs leave the original's (the issue measured about
    3e-3 on a random model); the original repository with ``handle_nonsquare_inputs=False``
    behaves as transformers. Both use base ``rope_theta`` (10000) and the tiled frequencies
    of the released weights; the angles are formed in float64 here (the originals form them
    in the input dtype), so fp32 outputs agree to fp32 rounding.

    Args:
        cfg: sizes.
        backend: a :data:`~vljepa_fast._backends.BackendSpec` ("auto", a backend name, or
            {op name: name}) for every op the blocks call (attention, rotary); a name one of
            them does not have is refused here (ValueError naming the op).
    """

    def __init__(self, cfg: XEncoderConfig, backend: BackendSpec = "auto") -> None:
        super().__init__()
        self.cfg, self.backend = cfg, _backends.check_spec(backend, ops=("attention", "rotary"))
        self.patch_embed = _PatchEmbed(cfg)
        self.blocks = nn.ModuleList(_Block(cfg, self.backend) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    def check_video(self, video: Tensor, name: str = "video") -> Tensor:
        """Validate and return [B, C, T, H, W]; an image is repeated ``tubelet`` times in time.
        Errors name ``name`` (the caller's argument: ``video``, ``videos``, ``frames``)."""
        c = self.cfg
        if not isinstance(video, Tensor) or not video.is_floating_point():
            got = video.dtype if isinstance(video, Tensor) else type(video).__name__
            raise ValueError(f"{name}: expected a floating tensor, got {got}")
        if video.dim() == 4:  # images: duplicate each frame to fill one tubelet
            video = video[:, :, None].expand(-1, -1, c.tubelet, -1, -1)
        if video.dim() != 5:
            raise ValueError(
                f"{name}: expected [B, C, T, H, W] (or an image [B, C, H, W]), got "
                f"rank {video.dim()} shape {tuple(video.shape)}"
            )
        B, C, T, H, W = video.shape
        if B == 0:
            raise ValueError(f"{name}: empty batch")
        if C != c.in_chans:
            raise ValueError(
                f"{name}: expected {c.in_chans} channels (dim 1 of [B, C, T, H, W]), got {C}"
            )
        if T == 0 or T % c.tubelet:
            raise ValueError(
                f"{name}: frame count {T} is not a positive multiple of the tubelet ({c.tubelet})"
            )
        if T > c.max_frames:
            raise ValueError(f"{name}: {T} frames, more than max_frames ({c.max_frames})")
        if H % c.patch or W % c.patch or H == 0 or W == 0:
            raise ValueError(
                f"{name}: frame size {H}x{W} is not a multiple of the patch ({c.patch})"
            )
        return video

    def grid_positions(self, T: int, H: int, W: int, device: torch.device) -> Tensor:
        """[N, 3] int64 (t, h, w) RoPE coordinates of the tokens of a [.., T, H, W] input, in
        token order, by ``cfg.position_mode`` (see the class docstring)."""
        c = self.cfg
        t, h, w = T // c.tubelet, H // c.patch, W // c.patch
        if c.position_mode == "transformers":
            g = c.image_size // c.patch
            n = torch.arange(t * h * w, device=device)
            return torch.stack((n // (g * g), (n % (g * g)) // g, n % g), dim=-1)
        grid = torch.meshgrid(
            torch.arange(t, device=device),
            torch.arange(h, device=device),
            torch.arange(w, device=device),
            indexing="ij",
        )
        return torch.stack(grid, dim=-1).reshape(-1, 3)

    def forward(self, video: Tensor) -> Tensor:
        """Encode.

        Args:
            video: [B, C, T, H, W] (T a multiple of the tubelet, H and W of the patch) or an
                image [B, C, H, W]; floating, in the parameters' dtype.

        Returns:
            [B, (T / tubelet) * (H / patch) * (W / patch), dim] visual tokens.
        """
        video = self.check_video(video)
        _, _, T, H, W = video.shape
        x = self.patch_embed(video.to(self.patch_embed.proj.weight.dtype))
        pos = self.grid_positions(T, H, W, x.device)
        table_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        cos, sin = rotary_cos_sin(
            pos, self.cfg.head_dim, layout="vjepa2", theta=self.cfg.rope_theta, dtype=table_dtype
        )
        for blk in self.blocks:
            x = blk(x, cos, sin)
        return self.norm(x)


# ----------------------------------------------------------------------------- checkpoints

LAYOUTS = ("original", "transformers")

#: our names <-> transformers' VJEPA2Encoder names (the block-level ones, after "layer.{i}.")
_HF_BLOCK = {
    "norm1": "norm1",
    "attn.proj": "attention.proj",
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_HF_QKV = ("query", "key", "value")
#: the transformers encoder keys (after an optional "vjepa2." and "encoder." prefix)
_HF_ENCODER = re.compile(
    r"(?:vjepa2\.)?(?:encoder\.)?(?=embeddings\.patch_embeddings\.|layer\.\d+\.|layernorm\.)"
)
#: transformers' VJEPA2Model / VJEPA2ForVideoClassification parts that are not the encoder
_HF_NOT_OURS = re.compile(r"(?:vjepa2\.)?(?:predictor|pooler|classifier)\.")
_ORIGINAL_KEY = re.compile(r"(?:patch_embed\.|blocks\.\d+\.|norm\.)")
#: the keys that make a state dict V-JEPA 2's original layout (``norm.`` alone is in any model)
_ORIGINAL_BODY = re.compile(r"(?:patch_embed\.|blocks\.\d+\.)")


def _strip_original(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for p in _VJEPA2_PREFIXES:
            if key.startswith(p):
                key, stripped = key[len(p) :], True
    return key


def _detect(state: Mapping[str, Tensor]) -> str:
    hf = [k for k in state if _HF_ENCODER.match(k)]
    orig = [
        k for k in state if not _HF_ENCODER.match(k) and _ORIGINAL_KEY.match(_strip_original(k))
    ]
    if not any(_ORIGINAL_BODY.match(_strip_original(k)) for k in orig):
        orig = []  # e.g. a Llama or Gemma state dict: its "norm.weight" is not an encoder key
    return one_layout(
        "V-JEPA 2 state dict",
        [
            ("original", "the original layout", orig),
            ("transformers", "transformers' VJEPA2Model layout", hf),
        ],
        "no encoder keys of either layout (original: "
        "'[module.backbone.]blocks.{i}.attn.qkv.weight', ...; transformers: "
        "'encoder.layer.{i}.attention.query.weight', ...)",
        state,
    )


def _hf_prefix(state: Mapping[str, Tensor]) -> str:
    """The prefix before the transformers encoder names ("encoder.", "vjepa2.encoder.", "")."""
    prefixes = sorted({m.group(0) for k in state if (m := _HF_ENCODER.match(k))})
    if len(prefixes) > 1:
        raise ValueError(
            f"V-JEPA 2 state dict: transformers encoder keys under several prefixes {prefixes}"
        )
    return prefixes[0]


def load_vjepa2_state_dict(
    encoder: XEncoder, state: Mapping[str, Tensor], *, layout: str = "auto"
) -> LoadResult:
    """Load a local V-JEPA 2 encoder checkpoint (no hub access), detecting its layout.

    Layouts (``layout="auto"`` detects which; name one to insist on it):

    * ``"original"`` (facebookresearch/vjepa2): the encoder's own keys (``patch_embed.proj``,
      ``blocks.{i}.attn.qkv`` fused, ..., ``norm``) under any of the wrapper prefixes
      ``module.``, ``backbone.``, ``encoder.``, ``target_encoder.`` (stripped repeatedly); a
      full training checkpoint ``{"encoder": {...}, "target_encoder": {...}, "predictor":
      {...}, ...}`` is unwrapped to ``target_encoder`` (else ``encoder``), the other entries
      being ignored. Copied key by key.
    * ``"transformers"`` (``VJEPA2Model.state_dict()``, also under ``vjepa2.`` as in
      ``VJEPA2ForVideoClassification``, or a bare ``VJEPA2Encoder``):
      ``encoder.embeddings.patch_embeddings.proj`` -> ``patch_embed.proj``,
      ``encoder.layer.{i}.{norm1, attention.proj, norm2, mlp.fc1, mlp.fc2}`` ->
      ``blocks.{i}.{norm1, attn.proj, norm2, mlp.fc1, mlp.fc2}``,
      ``encoder.layer.{i}.attention.{query, key, value}`` concatenated (rows q, k, v) ->
      ``blocks.{i}.attn.qkv``, ``encoder.layernorm`` -> ``norm``. The ``predictor.*`` weights
      (V-JEPA 2's own masked-video predictor, not VL-JEPA's predictor) and a classifier's
      ``pooler.*`` / ``classifier.*`` are not this encoder's: they are ignored and listed in
      the result.

    The position rule is the config's (``position_mode``), not the checkpoint's: both layouts
    hold the same weights, and the two implementations differ only at resolutions other than
    the crop size (see :class:`XEncoder`); pick ``position_mode="transformers"`` to reproduce
    ``VJEPA2Model`` there.

    Returns:
        :class:`~vljepa_fast.models.LoadResult`: the layout found and the ignored keys.

    Raises:
        ValueError: the layout cannot be told (no encoder keys, or both layouts mixed), an
            unknown ``layout``, or the checkpoint does not fit: every key missing, unexpected
            or mis-shaped is listed by name (the checkpoint's name; for the original layout
            after its wrapper prefixes are stripped). Nothing is loaded then.
    """
    if not isinstance(state, Mapping):
        raise ValueError(f"state: expected a mapping of names to tensors, got {type(state)}")
    if layout not in ("auto", *LAYOUTS):
        raise ValueError(f"layout: expected 'auto', 'original' or 'transformers', got {layout!r}")
    outer_ignored: list[str] = []
    for outer in ("target_encoder", "encoder"):
        if isinstance(state.get(outer), Mapping):
            outer_ignored = sorted(k for k in state if k != outer)
            state = state[outer]
            break
    found = _detect(state)
    if layout != "auto" and layout != found:
        raise ValueError(
            f"V-JEPA 2 state dict: layout {layout!r} requested, the keys are {found!r}"
        )
    own = encoder.state_dict()
    if found == "original":
        clean, origin = {}, {}
        for k, v in state.items():
            short = _strip_original(k)
            if short in clean:
                raise ValueError(
                    f"V-JEPA 2 state dict: {origin[short]!r} and {k!r} both name {short!r} "
                    "once their wrapper prefixes are stripped"
                )
            clean[short], origin[short] = v, k
        plan = {k: Source((k,), (tuple(v.shape),)) for k, v in own.items()}
        ignored = load_mapped(encoder, clean, plan, "V-JEPA 2 encoder (original layout)")
    else:
        pre = _hf_prefix(state)
        plan = {}
        for key, value in own.items():
            shape = tuple(value.shape)
            if key.startswith("patch_embed."):
                src = pre + "embeddings.patch_embeddings." + key.removeprefix("patch_embed.")
            elif key.startswith("norm."):
                src = pre + "layernorm." + key.removeprefix("norm.")
            else:
                _, i, rest = key.split(".", 2)
                mod, param = rest.rsplit(".", 1)
                if mod == "attn.qkv":
                    part = (shape[0] // 3, *shape[1:])
                    keys = tuple(f"{pre}layer.{i}.attention.{n}.{param}" for n in _HF_QKV)
                    plan[key] = Source(keys, (part,) * 3, lambda t: torch.cat(t, dim=0))
                    continue
                src = f"{pre}layer.{i}.{_HF_BLOCK[mod]}.{param}"
            plan[key] = Source((src,), (shape,))
        ignored = load_mapped(
            encoder,
            state,
            plan,
            "V-JEPA 2 encoder (transformers VJEPA2Model layout)",
            ignore=lambda k: _HF_NOT_OURS.match(k) is not None,
        )
    return LoadResult(found, tuple(outer_ignored) + ignored)


def vjepa2_state_dict(encoder: XEncoder, layout: str = "original") -> dict[str, Tensor]:
    """The encoder's weights in a public layout (fresh tensors, detached): ``"original"``
    (facebookresearch/vjepa2's encoder keys, no wrapper prefix) or ``"transformers"`` (the
    ``encoder.*`` part of ``VJEPA2Model.state_dict()``, q/k/v split). The inverse of
    :func:`load_vjepa2_state_dict`."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected 'original' or 'transformers', got {layout!r}")
    own = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    if layout == "original":
        return own
    out = {}
    for key, value in own.items():
        if key.startswith("patch_embed."):
            out["encoder.embeddings.patch_embeddings." + key.removeprefix("patch_embed.")] = value
        elif key.startswith("norm."):
            out["encoder.layernorm." + key.removeprefix("norm.")] = value
        else:
            _, i, rest = key.split(".", 2)
            mod, param = rest.rsplit(".", 1)
            if mod == "attn.qkv":
                for n, part in zip(_HF_QKV, value.chunk(3, dim=0), strict=True):
                    out[f"encoder.layer.{i}.attention.{n}.{param}"] = part.clone()
            else:
                out[f"encoder.layer.{i}.{_HF_BLOCK[mod]}.{param}"] = value
    return out
