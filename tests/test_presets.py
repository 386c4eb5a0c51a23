"""Every released checkpoint's layout, from guided-diffusion's own manifests."""

import json

import pytest
import torch
from helpers import MANIFESTS, REF

import adm_fast
from adm_fast import presets


def manifest(name):
    return json.loads((REF / "manifests" / f"{name}.json").read_text())


@pytest.mark.parametrize("name", MANIFESTS)
def test_preset_layout_is_the_release(name):
    m = manifest(name)
    preset = presets.get(m["checkpoint"][: -len(".pt")])
    model = preset.build(device="meta")
    got = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert got == list(m["state_dict"].items())  # keys, shapes and order
    assert sum(p.numel() for p in model.parameters()) == m["num_params"]
    for flag, value in m["flags"].items():
        assert preset.model_flags()[flag] == value, flag


@pytest.mark.parametrize("name", MANIFESTS)
def test_preset_recognised_from_tensors(name, tmp_path):
    m = manifest(name)
    sd = {k: torch.empty(s, device="meta") for k, s in m["state_dict"].items()}
    expected = m["checkpoint"][: -len(".pt")]
    # lsun_bedroom shares its layout with lsun_cat/horse and the 256 uncond model.
    assert adm_fast.detect_preset(sd).name in [
        n for n in presets.names() if presets.layout(n) == presets.layout(expected)]
    assert adm_fast.detect_preset(sd, m["checkpoint"]).name == expected
    # A .pt file of that layout, as released (meta tensors keep it small).
    path = tmp_path / m["checkpoint"]
    torch.save(sd, path)
    model = adm_fast.load_checkpoint(path, device="meta")
    assert model.preset.name == expected


def test_all_released_checkpoints_are_presets():
    released = {manifest(n)["checkpoint"] for n in MANIFESTS}
    released |= {"lsun_cat.pt", "lsun_horse.pt"}
    assert released <= {p.checkpoint for p in presets.PRESETS.values()}


def test_shared_layout_picked_by_file_name():
    sd = {k: torch.empty(s, device="meta") for k, s in presets.layout("lsun_bedroom")}
    for name in ("lsun_cat", "lsun_horse", "lsun_bedroom", "256x256_diffusion_uncond"):
        assert adm_fast.detect_preset(sd, f"/models/{name}.pt").name == name


def test_unknown_preset_name():
    with pytest.raises(KeyError, match="unknown preset 'nope'.*64x64_diffusion"):
        presets.get("nope")


def test_model_additions_are_the_constructors_own_defaults():
    """adm_fast.defaults lists adm_fast's constructor additions without importing
    the models (for --help); they must be what the constructors take."""
    import inspect

    from adm_fast import script_util as su
    from adm_fast.defaults import MODEL_ADDITIONS

    tables = {**su.model_and_diffusion_defaults(), **su.classifier_defaults(),
              **su.sr_model_and_diffusion_defaults()}
    found = {}
    for fn in (su.create_model, su.sr_create_model, su.create_classifier):
        for name, p in inspect.signature(fn).parameters.items():
            if name not in tables and p.default is not inspect.Parameter.empty:
                found[name] = p.default
    assert found == MODEL_ADDITIONS
