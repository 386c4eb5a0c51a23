"""Checkpoint loading: formats, recognition, errors, and refusing code."""

import json
import os

import pytest
import torch
from helpers import build_case, load_case, rel_err, run_case

import adm_fast
from adm_fast import presets

UNET = "unet_cond_scaleshift_legacyattn"


@pytest.fixture
def unet_pt(tmp_path):
    path = tmp_path / "mine.pt"
    torch.save(load_case(UNET)["state_dict"], path)
    return path


def test_wrong_preset_one_error_listing_keys(unet_pt):
    with pytest.raises(adm_fast.CheckpointError) as e:
        adm_fast.load_checkpoint(unet_pt, preset="64x64_diffusion")
    msg = str(e.value)
    assert "does not fit preset 64x64_diffusion" in msg
    assert "missing keys" in msg and "unexpected keys" in msg and "mis-shaped keys" in msg
    assert "time_embed.0.weight: checkpoint [128, 32] vs model [768, 192]" in msg
    assert "closest preset:" in msg


def test_released_layout_under_the_wrong_name_names_the_right_one(tmp_path):
    layout = presets.layout("64x64_classifier")
    path = tmp_path / "clf.pt"
    torch.save({k: torch.empty(s, device="meta") for k, s in layout}, path)
    with pytest.raises(adm_fast.CheckpointError) as e:
        adm_fast.load_checkpoint(path, preset="128x128_classifier", device="meta")
    assert "closest preset: 64x64_classifier (the checkpoint fits it exactly)" in str(e.value)


def test_unknown_layout_without_preset(unet_pt):
    with pytest.raises(adm_fast.CheckpointError, match="does not fit any released preset"):
        adm_fast.load_checkpoint(unet_pt)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_payload_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"input_blocks.0.0.weight": torch.zeros(1), "x": _Payload(marker)}, path)
    with pytest.raises(adm_fast.UnsafeCheckpointError, match="refusing to load"):
        adm_fast.load_checkpoint(path)
    assert not marker.exists()


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        adm_fast.load_checkpoint(tmp_path / "absent.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(adm_fast.CheckpointError, match="not a readable PyTorch checkpoint"):
        adm_fast.load_checkpoint(junk)
    odd = tmp_path / "odd.pt"
    torch.save({"a": 1, "b": torch.zeros(2)}, odd)
    with pytest.raises(adm_fast.CheckpointError, match="not tensors: a"):
        adm_fast.load_checkpoint(odd)


def test_wrapped_and_ddp_state_dicts(tmp_path):
    case = load_case(UNET)
    flags = dict(case["flags"])
    ddp = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in case["state_dict"].items()}, ddp)
    wrapped = tmp_path / "train.pt"
    torch.save({"model": case["state_dict"], "step": 7}, wrapped)
    for path in (ddp, wrapped):
        out, _ = run_case(adm_fast.load_checkpoint(path, preset=flags), case)
        assert rel_err(out, case["out"]) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_load_in_reduced_precision(dtype, unet_pt):
    case = load_case(UNET)
    model = adm_fast.load_checkpoint(unet_pt, preset=dict(case["flags"]), dtype=dtype)
    assert model.dtype == dtype
    assert model.input_blocks[1][0].in_layers[2].weight.dtype == dtype
    assert model.input_blocks[1][0].in_layers[0].weight.dtype == torch.float32  # GN
    assert model.time_embed[0].weight.dtype == torch.float32
    assert model.out[2].weight.dtype == torch.float32  # head
    with torch.no_grad():
        out, _ = run_case(model, case)
    assert out.dtype == torch.float32
    assert rel_err(out, case["out"]) <= (1e-2 if dtype == torch.float16 else 6e-2)


def test_bad_dtype(unet_pt):
    with pytest.raises(ValueError, match="dtype must be"):
        adm_fast.load_checkpoint(unet_pt, preset=dict(load_case(UNET)["flags"]),
                                 dtype=torch.int8)


def test_safetensors_keeps_preset_and_is_atomic(tmp_path):
    layout_model = build_case(load_case(UNET))
    layout_model.preset = None
    path = tmp_path / "m.safetensors"
    adm_fast.save_checkpoint(layout_model, path)
    assert os.listdir(tmp_path) == ["m.safetensors"]
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["adm_fast.class"] == "UNetModel"
    assert json.loads(meta["adm_fast.config"])["model_channels"] == 32
    with pytest.raises(TypeError, match="adm_fast model"):
        adm_fast.save_checkpoint(torch.nn.Linear(2, 2), tmp_path / "x.safetensors")


def test_preset_and_flags_survive_safetensors(tmp_path):
    model = presets.get("64x64_classifier").build()
    assert model.flags["kind"] == "classifier" and model.flags["classifier_depth"] == 4
    path = tmp_path / "c.safetensors"
    adm_fast.save_checkpoint(model, path)
    again = adm_fast.load_checkpoint(path)
    assert again.preset.name == "64x64_classifier"
    assert again.flags == model.flags
