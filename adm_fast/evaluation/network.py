"""The evaluator's network: torch-fidelity's port of TF's FID Inception-v3.

guided-diffusion's evaluator runs TF's 2015 Inception graph
(classify_image_graph_def.pb) and reads three things from it: `pool_3`
(2048-d), `mixed_6/conv` (17x17x192, the first 7 channels flattened, for
sFID), and the weight of `softmax/logits/MatMul` (2048 x 1008, no bias) for
the IS softmax. Its input replaces `ExpandDims`, so the graph's own
ResizeBilinear (TF1: align_corners=False without half-pixel centres) to
299x299 and (x - 128) / 128 run on the float [0, 255] images.

Why torch-fidelity (0.4.0) and not pytorch-fid: both port that graph with
the same weights (converted from the .pb), but
- torch-fidelity resizes with `interpolate_bilinear_2d_like_tensorflow1x`,
  TF1's ResizeBilinear sampling (source = dst * in/out, no half-pixel shift);
  pytorch-fid uses F.interpolate(align_corners=False), the half-pixel
  sampling of TF2, which moves every pixel of a 64/128/256 -> 299 resize;
- torch-fidelity normalises as the graph does, (x - 128) / 128 on [0, 255];
  pytorch-fid maps [0, 1] to 2x - 1, i.e. (x - 127.5) / 127.5;
- torch-fidelity keeps the 1008-class `fc` and exposes `logits_unbiased`,
  pool_3 @ fc.weight^T without the bias, which is exactly the evaluator's
  softmax/logits/MatMul; pytorch-fid's network stops at pool_3.

`mixed_6/conv` is `Mixed_6d.branch1x1` of the port: TF's blocks are named
mixed, mixed_1, ... mixed_10 in order, i.e. Mixed_5b..5d, 6a..6e, 7a..7c, so
mixed_6 is the third 17x17 InceptionC block (mixed_3 is the 6a reduction),
and torch-fidelity's converter (utils/util_convert_inception_weights.py) maps
mixed_6/conv/conv2d_params and mixed_6/conv/batchnorm to
Mixed_6d.branch1x1.conv and .bn. The tensor `mixed_6/conv:0` is the output of
the op named by that scope, after its Conv2D and batchnorm: the ReLU, i.e. the
output of BasicConv2d. A forward hook takes it; the evaluator slices NHWC
channels [..., :7] and flattens (H, W, C), so the hook permutes NCHW to NHWC
before flattening (the order must match released mu_s/sigma_s).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import io
import os
import sys

import numpy as np
import torch
from torch import nn

from .batches import EvaluationError

PORT_MODULE = "torch_fidelity.feature_extractor_inceptionv3"
SPATIAL_MODULE = "Mixed_6d.branch1x1"  # TF's mixed_6/conv
SPATIAL_CHANNELS = 7
INSTALL = "pip install --no-deps torch-fidelity==0.4.0 && pip install scipy"


def _import_without_package_init(name: str):
    """Import the submodule `name` of a package whose __init__ cannot run.

    torch_fidelity/__init__.py imports all its extractors, and the CLIP, VGG16
    and DINOv2 ones import torchvision; the InceptionV3 module needs only
    torch and three torch-fidelity helpers. The package module is created from
    its spec (which gives it the __path__ that finds the submodules) without
    executing it, the submodule is imported, and the bare package is removed
    again, so that a later `import torch_fidelity` fails or succeeds as it
    would have without us."""
    package = name.split(".")[0]
    spec = importlib.util.find_spec(package)
    if spec is None:
        return None
    sys.modules[package] = importlib.util.module_from_spec(spec)
    try:
        return importlib.import_module(name)
    finally:
        sys.modules.pop(package, None)


@functools.cache
def load_port():
    """torch-fidelity's InceptionV3 module: the ordinary import where torchvision
    works, else the module alone (see _import_without_package_init)."""
    try:
        return importlib.import_module(PORT_MODULE)
    except Exception as e:  # a broken torchvision raises RuntimeError, not ImportError
        first = e
    try:
        module = _import_without_package_init(PORT_MODULE)
    except ImportError as e:
        raise EvaluationError(f"torch-fidelity's InceptionV3 cannot be imported ({e}; before "
                              f"that: {first}); install it with: {INSTALL}") from None
    if module is None:
        raise EvaluationError(f"the evaluation needs torch-fidelity (its InceptionV3 port) "
                              f"and scipy: {INSTALL}")
    return module


def weights_url() -> str:
    return load_port().URL_INCEPTION_V3


def default_weights_path() -> str:
    """Where torch-fidelity's own download would put the weights (torch.hub's cache)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights_url()))


@functools.cache
def _port_class():
    base = load_port().FeatureExtractorInceptionV3

    class Port(base):
        # The library's constructor reads its weights itself, by download or by
        # torch.load(weights_only=False) of a path, which would unpickle a
        # user's file. It is handed an empty dict instead, which only this
        # load_state_dict accepts, and only while constructing; the weights
        # are then read with weights_only=True (or from safetensors).
        _built = False

        def load_state_dict(self, state_dict, strict=True, assign=False):
            if not self._built and not state_dict:
                return None
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

    return Port


def _empty_port() -> nn.Module:
    """The port on the meta device: its layout, no values, nothing read or downloaded."""
    buf = io.BytesIO()
    torch.save({}, buf)
    buf.seek(0)
    with torch.device("meta"):
        net = _port_class()("inception-v3-compat", ["2048"], feature_extractor_weights_path=buf)
    net._built = True
    return net


def _layout(net: nn.Module) -> dict[str, tuple[int, ...]]:
    # BatchNorm fills in num_batches_tracked when a state dict lacks it, as the
    # converted weights do.
    return {k: tuple(v.shape) for k, v in net.state_dict().items()
            if not k.endswith("num_batches_tracked")}


def random_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict in the port's layout with seeded random values: the real
    architecture without the real weights (tests, benchmarks). Convolutions are
    He-normal so activations keep their scale through the 94 layers; BatchNorm
    statistics and affine parameters are drawn around the identity so that the
    normalisation is exercised."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in _layout(_empty_port()).items():
        if name.endswith("conv.weight"):
            fan_in = int(np.prod(shape[1:]))
            out[name] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
        elif name.endswith(("bn.weight", "bn.running_var")):
            out[name] = 0.5 + torch.rand(shape, generator=g)
        elif name == "fc.weight":
            out[name] = torch.randn(shape, generator=g) / shape[1] ** 0.5
        else:  # bn.bias, bn.running_mean, fc.bias
            out[name] = 0.1 * torch.randn(shape, generator=g)
    return out


def read_weights(path: str | None = None) -> dict[str, torch.Tensor]:
    """The weights at `path`, else at torch-fidelity's cache location; never downloaded."""
    from ..checkpoint import CheckpointError, read_state_dict

    if path is None:
        path = default_weights_path()
        if not os.path.isfile(path):
            raise EvaluationError(f"the InceptionV3 weights are not in torch-fidelity's cache: "
                                  f"download {weights_url()} to {path}, or pass --inception "
                                  "PATH")
    elif not os.path.isfile(path):
        raise EvaluationError(f"--inception {path}: no such file (the weights are "
                              f"{weights_url()})")
    try:
        state_dict, _ = read_state_dict(path)
    except CheckpointError as e:  # its message names the file
        said = str(e)
        raise EvaluationError(f"--inception {said if said.startswith(path) else f'{path}: {said}'}"
                              ) from None
    return state_dict


class InceptionV3(nn.Module):
    """The port with the evaluator's outputs: forward(uint8 [N, H, W, 3]) ->
    (pool_3 [N, 2048], mixed_6/conv[..., :7] flattened [N, 2023]), both fp32.
    `logits_weight` [1008, 2048] is softmax/logits/MatMul's weight."""

    def __init__(self, state_dict: dict[str, torch.Tensor], where: str = "the weights"):
        super().__init__()
        net = _empty_port()
        want, have = _layout(net), {k: tuple(v.shape) for k, v in state_dict.items()}
        missing = sorted(set(want) - set(have))
        unexpected = sorted(k for k in set(have) - set(want)
                            if not k.endswith("num_batches_tracked"))
        wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
        if missing or unexpected or wrong:
            shown = [f"{n} {what}: {', '.join(keys[:3])}" for n, what, keys in (
                (len(missing), "missing", missing), (len(unexpected), "unexpected", unexpected),
                (len(wrong), "with other shapes", wrong)) if keys]
            raise EvaluationError(f"{where} are not torch-fidelity's InceptionV3 weights "
                                  f"({'; '.join(shown)})")
        net.load_state_dict({k: v.float() if v.is_floating_point() else v
                             for k, v in state_dict.items()}, assign=True)
        self.net = net.eval().requires_grad_(False)
        self._spatial = None
        self.net.get_submodule(SPATIAL_MODULE).register_forward_hook(self._keep_spatial)
        self.eval()

    def train(self, mode: bool = True):
        # BatchNorm must keep its running statistics: this network only extracts.
        return super().train(False)

    def _keep_spatial(self, module, inputs, output):
        n = output.shape[0]
        self._spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(n, -1).float()

    @property
    def logits_weight(self) -> torch.Tensor:
        return self.net.fc.weight

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The port takes uint8 NCHW and resizes and normalises it itself.
        (pool,) = self.net(images.permute(0, 3, 1, 2))
        spatial, self._spatial = self._spatial, None
        return pool.float(), spatial


@contextlib.contextmanager
def ieee_fp32(device: torch.device):
    """fp32 convolutions in IEEE fp32 on CUDA (cuDNN's default is TF32 there)."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if device.type != "cuda":
        yield
    elif conv is not None and hasattr(conv, "fp32_precision"):
        old, conv.fp32_precision = conv.fp32_precision, "ieee"
        try:
            yield
        finally:
            conv.fp32_precision = old
    else:
        old, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32 = old
