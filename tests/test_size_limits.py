"""Flags that size an allocation are bounded, and checked before anything is
built: one line naming the flag and the limit, where `--diffusion_steps
100000000` was a MemoryError and `num_res_blocks 3000` minutes of building.
The limits are far above every released model's."""

import pytest
import torch

import adm_fast
from adm_fast import presets
from adm_fast.defaults import SIZE_LIMITS, size_problems
from adm_fast.diffusion import create_gaussian_diffusion, get_named_beta_schedule
from adm_fast.script_util import (
    create_classifier,
    create_model,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    sr_create_model,
)

TINY = dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2",
            attention_resolutions="4", num_head_channels=16)
TINY_CLS = dict(image_size=8, classifier_use_fp16=False, classifier_width=32,
                classifier_depth=1, classifier_attention_resolutions="4",
                classifier_use_scale_shift_norm=True, classifier_resblock_updown=True,
                classifier_pool="attention", classifier_channel_mult="1,2")


def _refused(build, match):
    with torch.device("meta"), pytest.raises(ValueError) as e:
        build()
    assert match in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("flags, match", [
    (dict(num_res_blocks=3000), "num_res_blocks 3000 is above adm_fast's limit of 32 "
                                "(the released models use at most 4)"),
    (dict(num_channels=10 ** 9), "num_channels 1000000000 is above adm_fast's limit of 4096"),
    (dict(image_size=10 ** 6, channel_mult="1"), "image_size 1000000 is above adm_fast's "
                                                 "limit of 4096"),
    (dict(num_heads=10 ** 6, num_head_channels=-1), "num_heads 1000000 is above"),
    (dict(num_heads_upsample=0), "num_heads_upsample 0 is below 1 (or -1)"),
    (dict(num_head_channels=10 ** 6), "num_head_channels 1000000 is above"),
    (dict(class_cond=True, num_classes=10 ** 9), "num_classes 1000000000 is above adm_fast's "
                                                 "limit of 100000"),
    (dict(channel_mult=",".join(["1"] * 20)), "channel_mult has 20 levels, above adm_fast's "
                                              "limit of 16"),
    (dict(channel_mult="1,1000"), "channel_mult 1000 gives num_channels 32 x 1000 channels at "
                                  "a level, outside adm_fast's limits of 1 to 16384"),
    (dict(channel_mult="1,0.001"), "outside adm_fast's limits of 1 to 16384"),
    (dict(attention_resolutions=",".join(["4"] * 100)), "attention_resolutions has 100 "
                                                        "entries, above adm_fast's limit of 64"),
])
def test_unet_flags_past_the_limits(flags, match):
    _refused(lambda: create_model(**{**TINY, **flags}), match)


@pytest.mark.parametrize("flags, match", [
    (dict(classifier_width=10 ** 5), "classifier_width 100000 is above adm_fast's limit"),
    (dict(classifier_depth=100), "classifier_depth 100 is above adm_fast's limit of 32"),
    (dict(num_classes=10 ** 7), "num_classes 10000000 is above"),
    (dict(classifier_channel_mult="1,4096"), "channel_mult 4096 gives classifier_width 32 x "
                                             "4096 channels"),
])
def test_classifier_flags_past_the_limits(flags, match):
    _refused(lambda: create_classifier(**{**TINY_CLS, **flags}), match)


def test_sr_flags_past_the_limits():
    sr = dict(large_size=64, small_size=16, num_channels=32, num_res_blocks=1,
              learn_sigma=False, class_cond=False, use_checkpoint=False,
              attention_resolutions="8", num_heads=1, num_head_channels=-1,
              num_heads_upsample=-1, use_scale_shift_norm=False, dropout=0.0,
              resblock_updown=False, use_fp16=False)
    _refused(lambda: sr_create_model(**{**sr, "large_size": 10 ** 5}),
             "large_size 100000 is above adm_fast's limit of 4096")
    _refused(lambda: sr_create_model(**{**sr, "num_res_blocks": 500}), "num_res_blocks 500")


def test_diffusion_steps_past_the_limit_allocate_nothing():
    """The tables are never allocated: 1e8 steps was a MemoryError."""
    for steps in (100_001, 100_000_000, 10 ** 12):
        for schedule in ("linear", "cosine"):
            with pytest.raises(ValueError, match=f"diffusion_steps {steps} is above adm_fast's "
                                                 "limit of 100000"):
                create_gaussian_diffusion(steps=steps, noise_schedule=schedule)
    assert len(get_named_beta_schedule("linear", 100_000)) == 100_000  # the limit itself


def test_diffusion_steps_are_checked_before_the_model_is_built(monkeypatch):
    built = []
    monkeypatch.setattr(adm_fast.script_util, "create_model", lambda *a, **k: built.append(1))
    flags = {**model_and_diffusion_defaults(), **TINY, "diffusion_steps": 10 ** 8}
    with pytest.raises(ValueError, match="diffusion_steps 100000000 is above"):
        create_model_and_diffusion(**flags)
    assert not built


def test_every_released_model_is_within_the_limits():
    """The limits leave every preset (flags and constructor arguments) room."""
    assert SIZE_LIMITS["diffusion_steps"][1] >= 100 * 1000
    for name in presets.names():
        preset = presets.get(name)
        assert size_problems(preset.flags) == [], name
        model = preset.build(device="meta")
        assert size_problems(model.config) == [], name
        for key, (_low, high, released) in SIZE_LIMITS.items():
            value = model.config.get(key, preset.flags.get(key))
            if isinstance(value, int) and value != -1:
                assert value <= released <= high / 8, (name, key, value)


@pytest.mark.parametrize("flags, match", [
    (["--diffusion_steps", "100000000"], "diffusion_steps 100000000 is above adm_fast's limit "
                                         "of 100000"),
    (["--num_res_blocks", "3000"], "num_res_blocks 3000 is above adm_fast's limit of 32"),
])
def test_sample_cli_says_the_limit_in_one_line(tmp_path, capsys, flags, match):
    from adm_fast import cli

    torch.manual_seed(0)
    model = create_model(**TINY)
    path = tmp_path / "m.safetensors"
    adm_fast.save_checkpoint(model, path)
    rc = cli.main(["sample", "--no-progress", "--device", "cpu", "--model_path", str(path),
                   "--num_samples", "1", "--out", str(tmp_path / "out"), *flags])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and match in err[0], err
