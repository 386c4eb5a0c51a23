"""ADM's UNet, its super-resolution variant and the noisy classifier's encoder.

Constructor arguments, defaults and state_dict layout are guided-diffusion's.
Precision follows guided-diffusion's use_fp16 recipe, generalised: the
torso's convolutions run in `model.dtype` (fp16 after `convert_to_fp16()`,
bf16 after `convert_to_bf16()`), embeddings, normalisation parameters and the
head keep theirs, and the op layer keeps statistics and softmax in fp32.
`model.to(torch.bfloat16)` and autocast work as well.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .blocks import (
    AttentionBlock,
    AttentionPool2d,
    Downsample,
    ResBlock,
    TimestepEmbedSequential,
    Upsample,
)
from .fused import norm_act, norm_act_conv
from .nn import (
    check_dims,
    convert_torso,
    normalization,
    param_dtype,
    timestep_embedding,
    zero_module,
)


def constructor_config(args: dict) -> dict:
    """The constructor arguments (JSON-friendly) a model can be rebuilt from."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in args.items()
            if k not in ("self", "__class__")}


class _Trunk(nn.Module):
    """The encoder half (embeddings, input blocks, middle block) that both the
    UNet and the classifier are built on, and their shared configuration."""

    def __init__(self, image_size, in_channels, model_channels, out_channels,
                 num_res_blocks, attention_resolutions, dropout, channel_mult,
                 conv_resample, dims, num_classes, use_checkpoint, num_heads,
                 num_head_channels, num_heads_upsample, use_scale_shift_norm,
                 resblock_updown, use_new_attention_order, null_class=False):
        super().__init__()
        check_dims(dims)
        if model_channels <= 0 or num_res_blocks < 0 or not channel_mult:
            raise ValueError("model_channels must be positive, num_res_blocks >= 0 and "
                             "channel_mult non-empty")
        rates = {2 ** level for level in range(len(channel_mult))}
        unreached = sorted(set(attention_resolutions) - rates)
        if unreached:
            warnings.warn(
                f"attention_resolutions (downsample rates) {unreached} are never reached by "
                f"a UNet with {len(channel_mult)} levels (rates {sorted(rates)}); no "
                f"attention is placed there", stacklevel=3)
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads if num_heads_upsample == -1 else num_heads_upsample
        self.use_scale_shift_norm = use_scale_shift_norm
        self.resblock_updown = resblock_updown
        self.use_new_attention_order = use_new_attention_order

        emb_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # With null_class, row num_classes is the "no label" embedding that
        # classifier-free guidance conditions the unconditional half on.
        self.null_label = num_classes if null_class else None
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes + int(null_class), emb_dim)

        ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        chans, ds = [ch], 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                out_ch = int(mult * model_channels)
                layers = [self._res(ch, out_ch)]
                ch = out_ch
                if ds in attention_resolutions:
                    layers.append(self._attn(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(channel_mult) - 1:
                down = (self._res(ch, ch, down=True) if resblock_updown
                        else Downsample(ch, conv_resample, out_channels=ch))
                self.input_blocks.append(TimestepEmbedSequential(down))
                chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(
            self._res(ch, ch), self._attn(ch, num_heads), self._res(ch, ch))
        self._feature_size = sum(chans) + ch
        # Where the trunk ends: channels, downsampling, skip channels.
        self._trunk_out = (ch, ds, chans)

    def _res(self, ch_in, ch_out, **kw):
        return ResBlock(ch_in, self.model_channels * 4, self.dropout, out_channels=ch_out,
                        use_checkpoint=self.use_checkpoint,
                        use_scale_shift_norm=self.use_scale_shift_norm, **kw)

    def _attn(self, ch, heads):
        return AttentionBlock(ch, use_checkpoint=self.use_checkpoint, num_heads=heads,
                              num_head_channels=self.num_head_channels,
                              use_new_attention_order=self.use_new_attention_order)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the torso computes in (guided-diffusion's `model.dtype`)."""
        return self.input_blocks[0][0].weight.dtype

    def _torso(self):
        return [self.input_blocks, self.middle_block]

    def set_checkpointing(self, resblocks: bool = True, attention: bool | None = None):
        """Recompute residual and/or attention blocks in backward to save memory
        (attention defaults to the same choice as resblocks)."""
        attention = resblocks if attention is None else attention
        for m in self.modules():
            if isinstance(m, ResBlock):
                m.use_checkpoint = resblocks
            elif isinstance(m, AttentionBlock):
                m.use_checkpoint = attention
        self.use_checkpoint = resblocks or attention
        return self

    def convert_to_fp16(self):
        """Run the torso's convolutions in fp16 (guided-diffusion's use_fp16)."""
        for part in self._torso():
            convert_torso(part, torch.float16)

    def convert_to_bf16(self):
        """As convert_to_fp16, in bf16."""
        for part in self._torso():
            convert_torso(part, torch.bfloat16)

    def convert_to_fp32(self):
        for part in self._torso():
            convert_torso(part, torch.float32)

    def _embed(self, timesteps: Tensor, n: int) -> Tensor:
        if timesteps.dim() == 1 and timesteps.shape[0] == 1 and n != 1:
            # One timestep for the whole batch: guided-diffusion broadcasts it.
            timesteps = timesteps.expand(n)
        if timesteps.dim() != 1 or timesteps.shape[0] != n:
            raise ValueError(f"timesteps must be a 1-D tensor of {n} values (one per sample) "
                             f"or of one, got shape {tuple(timesteps.shape)}")
        t_emb = timestep_embedding(timesteps, self.model_channels)
        return self.time_embed(t_emb.to(param_dtype(self.time_embed)))

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected x of shape [N, {self.in_channels}, H, W], "
                             f"got {tuple(x.shape)}")
        factor = 2 ** (len(self.channel_mult) - 1)
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"H and W must be divisible by {factor} for "
                             f"{len(self.channel_mult)} levels, got {tuple(x.shape[2:])}")


class UNetModel(_Trunk):
    """ADM's UNet with timestep (and optional class) conditioning.

    attention_resolutions are downsample rates (1, 2, 4, ...), as in
    guided-diffusion's UNetModel; the script-level create_model takes pixel
    resolutions instead.
    """

    def __init__(self, image_size: int, in_channels: int, model_channels: int,
                 out_channels: int, num_res_blocks: int, attention_resolutions: Sequence[int],
                 dropout: float = 0, channel_mult: Sequence[float] = (1, 2, 4, 8),
                 conv_resample: bool = True, dims: int = 2,
                 num_classes: int | None = None, use_checkpoint: bool = False,
                 use_fp16: bool = False, num_heads: int = 1, num_head_channels: int = -1,
                 num_heads_upsample: int = -1, use_scale_shift_norm: bool = False,
                 resblock_updown: bool = False, use_new_attention_order: bool = False,
                 null_class: bool = False):
        config = constructor_config(locals())
        if null_class and num_classes is None:
            raise ValueError("null_class needs a class-conditional model (num_classes)")
        super().__init__(image_size, in_channels, model_channels, out_channels,
                         num_res_blocks, attention_resolutions, dropout, channel_mult,
                         conv_resample, dims, num_classes, use_checkpoint, num_heads,
                         num_head_channels, num_heads_upsample, use_scale_shift_norm,
                         resblock_updown, use_new_attention_order, null_class)
        self.config = config
        ch, ds, chans = self.__dict__.pop("_trunk_out")
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                out_ch = int(model_channels * mult)
                layers = [self._res(ch + chans.pop(), out_ch)]
                ch = out_ch
                if ds in attention_resolutions:
                    layers.append(self._attn(ch, self.num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(self._res(ch, ch, up=True) if resblock_updown
                                  else Upsample(ch, conv_resample, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
                self._feature_size += ch

        input_ch = int(channel_mult[0] * model_channels)
        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(),
            zero_module(nn.Conv2d(input_ch, out_channels, 3, padding=1)))
        if use_fp16:
            self.convert_to_fp16()

    def _torso(self):
        return [self.input_blocks, self.middle_block, self.output_blocks]

    def forward(self, x: Tensor, timesteps: Tensor, y: Tensor | None = None) -> Tensor:
        """x [N, C, H, W], timesteps [N] (float ok), y [N] class labels if
        class-conditional (null_label for "no label" with null_class).
        Returns [N, out_channels, H, W]."""
        self._check_input(x)
        if (y is None) != (self.num_classes is None):
            raise ValueError("pass y (class labels) if and only if the model is "
                             f"class-conditional (num_classes={self.num_classes})")
        emb = self._embed(timesteps, x.shape[0])
        if y is not None:
            if y.shape != (x.shape[0],):
                raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
            emb = emb + self.label_emb(y)

        h = x.to(self.dtype)
        skips = []
        for module in self.input_blocks:
            h = module(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, skips.pop()], dim=1), emb)
        h = h.to(param_dtype(self.out))
        # the full-resolution map the out conv reads is kept as a recipe, as in the blocks
        return norm_act_conv(self.out[0], h, self.out[2])


class SuperResModel(UNetModel):
    """A UNet conditioned on a low-resolution image, bilinearly upsampled to
    x's size and concatenated to x along channels."""

    def __init__(self, image_size: int, in_channels: int, *args, **kwargs):
        super().__init__(image_size, in_channels * 2, *args, **kwargs)
        self.config["in_channels"] = in_channels

    def forward(self, x: Tensor, timesteps: Tensor, low_res: Tensor | None = None,
                **kwargs) -> Tensor:
        if low_res is None:
            raise ValueError("SuperResModel needs low_res, the [N, C, h, w] image to upsample")
        if low_res.dim() != 4 or low_res.shape[0] != x.shape[0]:
            raise ValueError(f"low_res must be [N, C, h, w] with N={x.shape[0]}, "
                             f"got {tuple(low_res.shape)}")
        upsampled = F.interpolate(low_res, x.shape[2:], mode="bilinear", align_corners=False)
        return super().forward(torch.cat([x, upsampled], dim=1), timesteps, **kwargs)


class EncoderUNetModel(_Trunk):
    """The half UNet used as ADM's noisy classifier: the UNet's encoder and
    middle block, then a pooling head.

    pool: "adaptive" (GN, SiLU, global average, 1×1 conv), "attention"
    (GN, SiLU, attention pooling; needs num_head_channels), "spatial" and
    "spatial_v2" (means of every block's features, then an MLP).
    """

    POOLS = ("adaptive", "attention", "spatial", "spatial_v2")

    def __init__(self, image_size: int, in_channels: int, model_channels: int,
                 out_channels: int, num_res_blocks: int, attention_resolutions: Sequence[int],
                 dropout: float = 0, channel_mult: Sequence[float] = (1, 2, 4, 8),
                 conv_resample: bool = True, dims: int = 2, use_checkpoint: bool = False,
                 use_fp16: bool = False, num_heads: int = 1, num_head_channels: int = -1,
                 num_heads_upsample: int = -1, use_scale_shift_norm: bool = False,
                 resblock_updown: bool = False, use_new_attention_order: bool = False,
                 pool: str = "adaptive"):
        config = constructor_config(locals())
        if pool not in self.POOLS:
            raise ValueError(f"unknown pool {pool!r}; choose one of {', '.join(self.POOLS)}")
        if pool == "attention" and num_head_channels == -1:
            raise ValueError("pool='attention' needs num_head_channels (heads of fixed width)")
        super().__init__(image_size, in_channels, model_channels, out_channels,
                         num_res_blocks, attention_resolutions, dropout, channel_mult,
                         conv_resample, dims, None, use_checkpoint, num_heads,
                         num_head_channels, num_heads_upsample, use_scale_shift_norm,
                         resblock_updown, use_new_attention_order)
        self.pool = pool
        self.config = config
        ch, ds, _ = self.__dict__.pop("_trunk_out")
        if pool == "adaptive":
            self.out = nn.Sequential(
                normalization(ch), nn.SiLU(), nn.AdaptiveAvgPool2d((1, 1)),
                zero_module(nn.Conv2d(ch, out_channels, 1)), nn.Flatten())
        elif pool == "attention":
            if image_size % ds:
                raise ValueError(f"image_size {image_size} is not divisible by the total "
                                 f"downsampling {ds}")
            self.out = nn.Sequential(
                normalization(ch), nn.SiLU(),
                AttentionPool2d(image_size // ds, ch, num_head_channels, out_channels))
        elif pool == "spatial":
            self.out = nn.Sequential(
                nn.Linear(self._feature_size, 2048), nn.ReLU(), nn.Linear(2048, out_channels))
        else:
            self.out = nn.Sequential(
                nn.Linear(self._feature_size, 2048), normalization(2048), nn.SiLU(),
                nn.Linear(2048, out_channels))
        if use_fp16:
            self.convert_to_fp16()

    def forward(self, x: Tensor, timesteps: Tensor) -> Tensor:
        """x [N, C, H, W], timesteps [N]. Returns logits [N, out_channels]."""
        self._check_input(x)
        emb = self._embed(timesteps, x.shape[0])
        head_dtype = param_dtype(self.out)
        spatial = self.pool.startswith("spatial")
        means = []
        h = x.to(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            if spatial:
                means.append(h.to(head_dtype).mean(dim=(2, 3)))
        h = self.middle_block(h, emb)
        if spatial:
            means.append(h.to(head_dtype).mean(dim=(2, 3)))
            h = torch.cat(means, dim=-1)
            if self.pool == "spatial":
                return self.out(h)
            h = norm_act(self.out[1], self.out[0](h))
            return self.out[3](h)
        h = norm_act(self.out[0], h.to(head_dtype))
        for layer in self.out[2:]:
            h = layer(h)
        return h
