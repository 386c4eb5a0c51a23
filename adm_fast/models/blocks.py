"""ADM's blocks: BigGAN-style residual blocks with AdaGN, attention, resampling.

Attribute names and nesting follow guided-diffusion's modules so that
state_dict keys match released checkpoints (`in_layers.0.weight`,
`emb_layers.1.bias`, `qkv.weight`, ...). The arithmetic goes through
adm_fast.ops (directly, or through the adapters in fused.py); no backend is
named here.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from .fused import conv1x1, conv1x1_token, norm_act_conv
from .layout import prepend_token, tidy_strides
from .nn import maybe_checkpoint, normalization, zero_module


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second input."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def takes_embedding(layer: nn.Module) -> bool:
    """adm_fast's TimestepBlocks, and any other class whose ancestry has one so
    named (a guided-diffusion block that adm_fast.patch left as it was)."""
    return isinstance(layer, TimestepBlock) or any(
        c.__name__ == "TimestepBlock" for c in type(layer).__mro__)


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """A Sequential that hands the embedding to the children that take it."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        for layer in self:
            x = layer(x, emb) if takes_embedding(layer) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour ×2 upsampling, optionally followed by a 3×3 conv."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2,
                 out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """×2 downsampling: a strided 3×3 conv, or 2×2 average pooling."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2,
                 out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.op = nn.Conv2d(channels, self.out_channels, 3, stride=2, padding=1)
        else:
            if self.out_channels != channels:
                raise ValueError("Downsample without a conv cannot change the channel count")
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding.

    use_scale_shift_norm: AdaGN, out = GN(h)·(1 + scale) + shift with (scale,
    shift) from the embedding; otherwise the embedding is added before GN.
    up / down: BigGAN-style resampling inside the block (resblock_updown).
    use_conv: a 3×3 (not 1×1) skip conv when the channel count changes.
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float,
                 out_channels: int | None = None, use_conv: bool = False,
                 use_scale_shift_norm: bool = False, dims: int = 2,
                 use_checkpoint: bool = False, up: bool = False, down: bool = False):
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm
        out_ch = self.out_channels

        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_ch, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_ch if use_scale_shift_norm else out_ch))
        self.out_layers = nn.Sequential(
            normalization(out_ch), nn.SiLU(), nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1)))
        if out_ch == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, out_ch, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, out_ch, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return maybe_checkpoint(self.use_checkpoint, self._forward, x, emb)

    def _forward(self, x: Tensor, emb: Tensor) -> Tensor:
        # Inside a checkpointed block nothing is kept anyway: no recipes there.
        recompute = not self.use_checkpoint
        if self.updown:
            h = norm_act_conv(self.in_layers[0], x, self.in_layers[2], between=self.h_upd,
                              recompute=recompute)
            x = self.x_upd(x)
        else:
            h = norm_act_conv(self.in_layers[0], x, self.in_layers[2], recompute=recompute)
        emb_out = self.emb_layers(emb).to(h.dtype)
        scale = shift = None
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
        else:
            h = h + emb_out[:, :, None, None]
        out_norm, drop, conv = self.out_layers[0], self.out_layers[2], self.out_layers[3]
        h = norm_act_conv(out_norm, h, conv, scale, shift, recompute=recompute,
                          dropout=drop.p if drop.training else 0.0)
        return tidy_strides(self.skip_connection(x) + h)


class QKVAttentionLegacy(nn.Module):
    """Attention over qkv in the legacy channel order (heads, then q/k/v)."""

    legacy = True

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv: Tensor) -> Tensor:
        return ops.qkv_attention(qkv, self.n_heads, legacy=self.legacy)


class QKVAttention(QKVAttentionLegacy):
    """Attention over qkv in the new channel order (q/k/v, then heads)."""

    legacy = False


def heads_for(channels: int, num_heads: int, num_head_channels: int) -> int:
    if num_head_channels == -1:
        if num_heads <= 0 or channels % num_heads:
            raise ValueError(f"num_heads={num_heads} must be positive and divide the "
                             f"{channels} attention channels")
        return num_heads
    if num_head_channels <= 0 or channels % num_head_channels:
        raise ValueError(f"num_head_channels={num_head_channels} must be positive and divide "
                         f"the {channels} attention channels")
    return channels // num_head_channels


class AttentionBlock(nn.Module):
    """Self-attention over all spatial positions, with a residual connection."""

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1,
                 use_checkpoint: bool = False, use_new_attention_order: bool = False):
        super().__init__()
        self.channels = channels
        self.num_heads = heads_for(channels, num_heads, num_head_channels)
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        attention = QKVAttention if use_new_attention_order else QKVAttentionLegacy
        self.attention = attention(self.num_heads)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        return maybe_checkpoint(self.use_checkpoint, self._forward, x)

    def _forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, math.prod(spatial))  # not -1: an empty batch has no inferable size
        qkv = norm_act_conv(self.norm, x, lambda h: conv1x1(self.qkv, h), act=False,
                            recompute=not self.use_checkpoint)
        h = conv1x1(self.proj_out, self.attention(qkv))
        return tidy_strides((x + h).reshape(b, c, *spatial))


class AttentionPool2d(nn.Module):
    """CLIP-style attention pooling: the mean token attends to all positions.

    Tokens are the HW positions plus their mean (HW + 1), with a learned
    positional embedding; the output is the mean token's projection.
    """

    def __init__(self, spacial_dim: int, embed_dim: int, num_heads_channels: int,
                 output_dim: int | None = None):
        super().__init__()
        self.spacial_dim = spacial_dim
        # In place: an out-of-place div on the meta device (checkpoint loading
        # builds there) goes through torch._refs, whose import pulls in
        # torch._dynamo, seconds of the demo's start-up (docs/performance.md).
        # Same values either way.
        self.positional_embedding = nn.Parameter(
            torch.randn(embed_dim, spacial_dim ** 2 + 1).div_(embed_dim ** 0.5))
        self.qkv_proj = nn.Conv1d(embed_dim, 3 * embed_dim, 1)
        self.c_proj = nn.Conv1d(embed_dim, output_dim or embed_dim, 1)
        self.num_heads = heads_for(embed_dim, 1, num_heads_channels)
        self.attention = QKVAttention(self.num_heads)

    def forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        if tuple(spatial) != (self.spacial_dim, self.spacial_dim):
            raise ValueError(
                f"attention pooling was built for {self.spacial_dim}x{self.spacial_dim} "
                f"features, got {'x'.join(map(str, spatial))}: the classifier's input "
                f"must have the image_size it was built with")
        x = x.reshape(b, c, math.prod(spatial))
        x = prepend_token(x, x.mean(dim=-1, keepdim=True))
        x = x + self.positional_embedding[None].to(x.dtype)
        return conv1x1_token(self.c_proj, self.attention(conv1x1(self.qkv_proj, x)), 0)
