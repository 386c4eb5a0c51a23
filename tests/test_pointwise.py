"""conv1x1 and conv1x1_token (adm_fast.models.fused): the attention projections
in the form each layout wants, and the attention pool's head evaluated at the
one token kept; tidy_strides (adm_fast.models.layout) at batch one."""

import pytest
import torch
from helpers import rel_err
from torch import nn

from adm_fast import ops
from adm_fast.models.fused import conv1x1, conv1x1_token


def channels_last_1d(x):
    return x.movedim(1, -1).contiguous().movedim(-1, 1)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last_1d"])
def test_conv1x1_is_the_module(layout):
    conv = nn.Conv1d(48, 96, 1)
    x = torch.randn(3, 48, 17) + 0.5
    if layout == "channels_last_1d":
        x = channels_last_1d(x)
    assert rel_err(conv1x1(conv, x), conv(x.contiguous())) <= 1e-6


@pytest.mark.parametrize("backend", ["eager", "auto"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last_1d"])
@pytest.mark.parametrize("index", [0, 16])
def test_conv1x1_token_is_one_column_of_the_projection(backend, layout, index):
    conv = nn.Conv1d(64, 1000, 1)
    x = torch.randn(5, 64, 17) + 0.5
    if layout == "channels_last_1d":
        x = channels_last_1d(x)
    x.requires_grad_(True)
    with ops.use_backend(backend):
        out = conv1x1_token(conv, x, index)
    ref = conv(x.detach().contiguous())[:, :, index]
    assert out.shape == (5, 1000) and rel_err(out, ref) <= 1e-6
    dy = torch.randn(5, 1000)
    dx, = torch.autograd.grad(out, x, dy)
    x64 = x.detach().double().requires_grad_(True)
    w, b = conv.weight.double(), conv.bias.double()
    dx_ref, = torch.autograd.grad(nn.functional.conv1d(x64, w, b)[:, :, index], x64, dy.double())
    assert rel_err(dx, dx_ref) <= 1e-6
    assert dx[:, :, [i for i in range(17) if i != index]].abs().max() == 0


def test_conv1x1_token_of_an_empty_batch():
    conv = nn.Conv1d(8, 10, 1)
    with ops.use_backend("auto"):
        assert conv1x1_token(conv, torch.randn(0, 8, 5), 0).shape == (0, 10)


def test_a_channels_last_unet_stays_channels_last_at_batch_one():
    """A batch of one: an elementwise op leaves the batch stride free, and cat
    then answered NCHW at the skip connections; every convolution of the
    UNet must see channels_last activations (the image itself aside)."""
    import adm_fast

    torch.manual_seed(0)
    model = adm_fast.create_model(image_size=16, num_channels=64, num_res_blocks=1,
                                  channel_mult="1,2", attention_resolutions="8",
                                  num_head_channels=32, learn_sigma=True)
    adm_fast.models.use_preferred_layout(model, "cpu")
    seen = []
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_pre_hook(lambda mod, inp: seen.append(
                (inp[0].shape[1], inp[0].is_contiguous(memory_format=torch.channels_last))))
    with torch.no_grad():
        model(torch.randn(1, 3, 16, 16), torch.tensor([10]))
    nchw = [c for c, cl in seen if not cl and c > 4]
    assert seen and not nchw, seen


def test_conv1x1_token_projects_every_token_only_when_eager_runs_every_op():
    """guided-diffusion's computation under the eager backend chosen for every
    op; conv1x1_token is no op of its own, so a per-op setting does not name it."""
    conv = nn.Conv1d(8, 10, 1)
    seen = []
    conv.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].shape[-1]))
    for setting in ("eager", "auto", {"qkv_attention": "eager"}):
        with ops.use_backend(setting):
            conv1x1_token(conv, torch.randn(2, 8, 5), 0)
    assert seen == [5, 1, 1]
