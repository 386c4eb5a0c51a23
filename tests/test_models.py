"""Model construction, precision semantics and input errors."""

import math

import pytest
import torch
from helpers import build_case, load_case

import adm_fast
from adm_fast.models import timestep_embedding

SMALL = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2",
             attention_resolutions="16", num_head_channels=16)


def small_unet(**kw):
    return adm_fast.create_model(**{**SMALL, **kw})


@pytest.mark.parametrize("call, match", [
    (lambda: adm_fast.create_model(48, 32, 1), "unsupported image size: 48"),
    (lambda: adm_fast.create_classifier(32, False, 32, 1, "8", True, True, "attention"),
     "unsupported image size: 32"),
    (lambda: adm_fast.sr_create_model(128, 32, 32, 1, False, False, False, "16", 1, -1, -1,
                                      True, 0, True, False), "unsupported large size: 128"),
    (lambda: small_unet(num_head_channels=24), "num_head_channels=24 must be positive and divide"),
    (lambda: small_unet(num_head_channels=-1, num_heads=3), "num_heads=3 must be positive and divide"),
    (lambda: small_unet(num_channels=48), "not divisible by 32"),
    (lambda: small_unet(attention_resolutions="7"), "does not divide image size"),
    (lambda: small_unet(attention_resolutions="a"), "comma list of integers"),
    (lambda: small_unet(channel_mult="1,x"), "comma list of numbers"),
    (lambda: adm_fast.UNetModel(32, 3, 32, 3, 1, (2,), dims=3), "2-D image models only"),
    (lambda: adm_fast.UNetModel(32, 3, 32, 3, 1, (2,), dims=1), "2-D image models only"),
    (lambda: adm_fast.EncoderUNetModel(32, 3, 32, 10, 1, (), pool="max"), "unknown pool 'max'"),
    (lambda: adm_fast.EncoderUNetModel(32, 3, 32, 10, 1, (), pool="attention"),
     "needs num_head_channels"),
])
def test_invalid_constructor_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_unreached_attention_resolution_warns():
    with pytest.warns(UserWarning, match=r"\[8\] are never reached"):
        adm_fast.UNetModel(32, 3, 32, 3, 1, (2, 8), channel_mult=(1, 2))


def test_forward_input_errors():
    cond = small_unet(class_cond=True)
    uncond = small_unet()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([1.0, 500.0])
    with pytest.raises(ValueError, match="if and only if the model is class-conditional"):
        cond(x, t)
    with pytest.raises(ValueError, match="if and only if"):
        uncond(x, t, y=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"y must have shape \(2,\)"):
        cond(x, t, y=torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="timesteps must be a 1-D tensor of 2 values"):
        uncond(x, torch.tensor(3.0))
    with pytest.raises(ValueError, match=r"expected x of shape \[N, 3, H, W\]"):
        uncond(torch.randn(2, 4, 32, 32), t)
    with pytest.raises(ValueError, match="divisible by 2"):
        uncond(torch.randn(2, 3, 31, 32), t)
    sr = adm_fast.sr_create_model(64, 16, 32, 1, True, False, False, "16", 1, 16, -1, True, 0,
                                  True, False)
    with pytest.raises(ValueError, match="needs low_res"):
        sr(torch.randn(2, 3, 64, 64), t)
    clf = load_case("classifier_64")
    with pytest.raises(ValueError, match="must have the image_size it was built with"):
        build_case(clf)(torch.randn(2, 3, 32, 32), t)


def test_use_fp16_is_guided_diffusions_recipe():
    model = small_unet(use_fp16=True, class_cond=True)
    assert model.dtype == torch.float16
    convs = [m for m in model.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d))]
    torso = [m for part in (model.input_blocks, model.middle_block, model.output_blocks)
             for m in part.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d))]
    assert torso and all(m.weight.dtype == torch.float16 for m in torso)
    assert model.out[2].weight.dtype == torch.float32  # head stays fp32
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert all(m.weight.dtype == torch.float32 for m in norms + linears)
    assert len(convs) > len(torso)
    out = model(torch.randn(2, 3, 32, 32), torch.tensor([3.0, 900.0]), y=torch.tensor([1, 2]))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    model.convert_to_fp32()
    assert model.dtype == torch.float32 and all(m.weight.dtype == torch.float32 for m in convs)


@pytest.mark.parametrize("name", ["unet_cond_scaleshift_legacyattn", "classifier_64"])
def test_whole_model_bf16_and_autocast(name):
    case = load_case(name)
    kw = {"y": case["y"]} if "y" in case and "classifier" not in name else {}
    ref = build_case(case)(case["x"], case["t"], **kw)
    model = build_case(case).to(torch.bfloat16)
    out = model(case["x"], case["t"], **kw)
    assert out.dtype == torch.bfloat16
    scale = ref.abs().max()
    assert (out.float() - ref).abs().max() / scale < 0.1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = build_case(case)(case["x"], case["t"], **kw)
    assert (out.float() - ref).abs().max() / scale < 0.1


def test_timestep_embedding():
    t = torch.tensor([0.0, 1.5, 999.0])
    emb = timestep_embedding(t, 7)
    assert emb.shape == (3, 7) and torch.all(emb[:, -1] == 0)
    half = 3
    freqs = torch.tensor([math.exp(-math.log(10000) * i / half) for i in range(half)])
    expected = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], 1)
    torch.testing.assert_close(emb[:, :6], expected)


def test_script_defaults_are_guided_diffusions():
    d = adm_fast.model_and_diffusion_defaults()
    assert d["num_channels"] == 128 and d["num_heads"] == 4 and d["attention_resolutions"] == "16,8"
    assert d["use_scale_shift_norm"] is True and d["channel_mult"] == ""
    assert d["diffusion_steps"] == 1000 and d["noise_schedule"] == "linear"
    c = adm_fast.classifier_defaults()
    assert c == dict(image_size=64, classifier_use_fp16=False, classifier_width=128,
                     classifier_depth=2, classifier_attention_resolutions="32,16,8",
                     classifier_use_scale_shift_norm=True, classifier_resblock_updown=True,
                     classifier_pool="attention")
    s = adm_fast.sr_model_and_diffusion_defaults()
    assert s["large_size"] == 256 and s["small_size"] == 64
    assert "image_size" not in s and "channel_mult" not in s


def test_every_pool_runs():
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([0.0, 10.0])
    for pool in adm_fast.EncoderUNetModel.POOLS:
        m = adm_fast.EncoderUNetModel(32, 3, 32, 10, 1, (2,), channel_mult=(1, 2),
                                      num_head_channels=32, pool=pool)
        assert m(x, t).shape == (2, 10)
