"""A stand-in for guided-diffusion's module classes, to test adm_fast.patch
without importing guided-diffusion (never a dependency, never imported).

The classes carry guided-diffusion's names, attributes and eager arithmetic
(GroupNorm upcast to fp32, SiLU as a separate module, q and k scaled by
C^-1/4, fp32 softmax, `dtype` as an instance attribute), written here from its
documented semantics. `foreign(model)` re-types an adm_fast model's modules as
these classes; tests check that the result reproduces guided-diffusion's own
reference outputs before using it as patch()'s input.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


class GroupNorm32(nn.GroupNorm):
    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


class TimestepBlock(nn.Module):
    pass


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    def forward(self, x):
        return self.op(x)


class ResBlock(TimestepBlock):
    def forward(self, x, emb):
        if self.updown:
            h = self.in_layers[:-1](x)
            h, x = self.h_upd(h), self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        e = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = torch.chunk(e, 2, dim=1)
            h = self.out_layers[1:](self.out_layers[0](h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


def _attend(q, k, v):
    ch = q.shape[1]
    s = 1 / math.sqrt(math.sqrt(ch))
    w = torch.einsum("bct,bcs->bts", q * s, k * s)
    w = torch.softmax(w.float(), dim=-1).type(w.dtype)
    return torch.einsum("bts,bcs->bct", w, v)


class QKVAttentionLegacy(nn.Module):
    def forward(self, qkv):
        b, width, t = qkv.shape
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.reshape(b * self.n_heads, ch * 3, t).split(ch, dim=1)
        return _attend(q, k, v).reshape(b, -1, t)


class QKVAttention(nn.Module):
    def forward(self, qkv):
        b, width, t = qkv.shape
        ch = width // (3 * self.n_heads)
        q, k, v = (p.reshape(b * self.n_heads, ch, t) for p in qkv.chunk(3, dim=1))
        return _attend(q, k, v).reshape(b, -1, t)


class AttentionBlock(nn.Module):
    def forward(self, x):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        return (x + h).reshape(b, c, *spatial)


class AttentionPool2d(nn.Module):
    def forward(self, x):
        b, c, *_ = x.shape
        x = x.reshape(b, c, -1)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)
        x = x + self.positional_embedding[None, :, :].to(x.dtype)
        return self.c_proj(self.attention(self.qkv_proj(x)))[:, :, 0]


def _embed(model, timesteps):
    half = model.model_channels // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = timesteps[:, None].float() * freqs[None]
    return model.time_embed(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class UNetModel(nn.Module):
    def forward(self, x, timesteps, y=None):
        emb = _embed(self, timesteps)
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        hs, h = [], x.type(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h.type(x.dtype))


class SuperResModel(UNetModel):
    def forward(self, x, timesteps, low_res=None, **kwargs):
        up = F.interpolate(low_res, x.shape[2:], mode="bilinear")
        return super().forward(torch.cat([x, up], dim=1), timesteps, **kwargs)


class EncoderUNetModel(nn.Module):
    def forward(self, x, timesteps):
        emb = _embed(self, timesteps)
        h = x.type(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb)
        return self.out(self.middle_block(h, emb).type(x.dtype))


_CLASSES = {c.__name__: c for c in (
    GroupNorm32, TimestepEmbedSequential, Upsample, Downsample, ResBlock, QKVAttentionLegacy,
    QKVAttention, AttentionBlock, AttentionPool2d, UNetModel, SuperResModel, EncoderUNetModel)}


def foreign(model: nn.Module) -> nn.Module:
    """Re-type an adm_fast model's modules as the look-alike classes above."""
    for m in model.modules():
        cls = _CLASSES.get(type(m).__name__)
        if cls is not None and type(m).__module__.startswith("adm_fast"):
            dtype = m.dtype if type(m).__name__.endswith("Model") else None
            m.__class__ = cls
            if dtype is not None:  # guided-diffusion keeps it as an attribute
                m.dtype = dtype
    return model
