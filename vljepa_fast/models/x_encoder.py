"""X-encoder: the V-JEPA 2 video ViT (3D patch embedding, three-axis RoPE) on vf.attention.

Parameter names follow V-JEPA 2's ``VisionTransformer`` (``patch_embed.proj``,
``blocks.{i}.norm1 / attn.qkv / attn.proj / norm2 / mlp.fc1 / mlp.fc2``, ``norm``), so a released
encoder state dict loads key by key once its wrapper prefixes (``module.``, ``backbone.``) are
stripped. Tokens are ordered (t, h, w) and rotated by their grid coordinates with the V-JEPA 2
channel layout of :func:`vljepa_fast.rotary_cos_sin` (``layout="vjepa2"``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vljepa_fast import _backends, functional
from vljepa_fast._backends import BackendSpec
from vljepa_fast.models._layers import PreNormBlock, load_checked
from vljepa_fast.models.config import XEncoderConfig
from vljepa_fast.ops.rotary import apply_rotary, rotary_cos_sin

__all__ = ["XEncoder", "load_vjepa2_state_dict"]

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

    def check_video(self, video: Tensor) -> Tensor:
        """Validate and return [B, C, T, H, W]; an image is repeated ``tubelet`` times in time."""
        c = self.cfg
        if not isinstance(video, Tensor) or not video.is_floating_point():
            got = video.dtype if isinstance(video, Tensor) else type(video).__name__
            raise ValueError(f"video: expected a floating tensor, got {got}")
        if video.dim() == 4:  # images: duplicate each frame to fill one tubelet
            video = video[:, :, None].expand(-1, -1, c.tubelet, -1, -1)
        if video.dim() != 5:
            raise ValueError(
                f"video: expected [B, C, T, H, W] (or an image [B, C, H, W]), got "
                f"rank {video.dim()} shape {tuple(video.shape)}"
            )
        B, C, T, H, W = video.shape
        if B == 0:
            raise ValueError("video: empty batch")
        if C != c.in_chans:
            raise ValueError(
                f"video: expected {c.in_chans} channels (dim 1 of [B, C, T, H, W]), got {C}"
            )
        if T == 0 or T % c.tubelet:
            raise ValueError(
                f"video: frame count {T} is not a positive multiple of the tubelet ({c.tubelet})"
            )
        if T > c.max_frames:
            raise ValueError(f"video: {T} frames, more than max_frames ({c.max_frames})")
        if H % c.patch or W % c.patch or H == 0 or W == 0:
            raise ValueError(
                f"video: frame size {H}x{W} is not a multiple of the patch ({c.patch})"
            )
        return video

    def grid_positions(self, T: int, H: int, W: int, device: torch.device) -> Tensor:
        """[N, 3] (t, h, w) grid coordinates of the tokens, in token order."""
        c = self.cfg
        t, h, w = T // c.tubelet, H // c.patch, W // c.patch
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
        cos, sin = rotary_cos_sin(
            pos, self.cfg.head_dim, layout="vjepa2", theta=self.cfg.rope_theta, dtype=torch.float32
        )
        for blk in self.blocks:
            x = blk(x, cos, sin)
        return self.norm(x)


def load_vjepa2_state_dict(encoder: XEncoder, state: Mapping[str, Tensor]) -> None:
    """Load a local V-JEPA 2 encoder state dict (no hub access).

    Accepts the encoder's own keys or a checkpoint's, with any of the wrapper prefixes
    ``module.``, ``backbone.``, ``encoder.``, ``target_encoder.`` (stripped repeatedly).
    A full checkpoint dict ``{"encoder": {...}}`` or ``{"target_encoder": {...}}`` is unwrapped.

    Raises:
        ValueError: keys missing from the checkpoint, unexpected keys, or shape mismatches
            (each listed by name).
    """
    for outer in ("target_encoder", "encoder"):
        if outer in state and isinstance(state[outer], Mapping):
            state = state[outer]
            break
    clean = {}
    for key, value in state.items():
        stripped = True
        while stripped:
            stripped = False
            for p in _VJEPA2_PREFIXES:
                if key.startswith(p):
                    key, stripped = key[len(p) :], True
        clean[key] = value
    load_checked(encoder, clean, "V-JEPA 2 encoder")
