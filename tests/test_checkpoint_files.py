"""Checkpoint files that are damaged, edited or foreign, and writes that fail:
each is one clear error naming the file; what adm_fast writes is verified
(a checksum of its tensors) and carries its diffusion flags and class names."""

import builtins
import errno
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import adm_fast
from adm_fast import checkpoint as ckpt
from adm_fast.checkpoint import CheckpointError, DiskFullError
from conftest import load_case

DEMO = Path(adm_fast.__file__).parent / "demo" / "weights" / "diffusion.safetensors"
FLAGS = dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2",
             attention_resolutions="4", num_head_channels=16, class_cond=True, num_classes=5,
             learn_sigma=True)


def _model(**kw):
    torch.manual_seed(0)
    return adm_fast.create_model(**{**FLAGS, **kw})


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "m.safetensors"
    model = _model()
    adm_fast.save_checkpoint(model, path, diffusion={**adm_fast.diffusion_defaults(),
                                                     "diffusion_steps": 100},
                             classes=["ant", "bee", "cat", "dog", "eel"])
    return model, path


def _header(path):
    raw = Path(path).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _rewrite(path, header, data):
    blob = json.dumps(header).encode()
    Path(path).write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def _one_line_error(fn, path, match=None):
    with pytest.raises(CheckpointError) as e:
        fn()
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg, msg
    if match:
        assert match in msg, msg
    return msg


# --- what is stored ----------------------------------------------------------

def test_diffusion_flags_and_classes_are_stored_and_read_back(saved):
    model, path = saved
    flags = ckpt.read_diffusion_flags(path)
    assert flags == {**adm_fast.diffusion_defaults(), "diffusion_steps": 100}
    assert set(flags) == {"diffusion_steps", "noise_schedule", "learn_sigma", "use_kl",
                          "predict_xstart", "rescale_timesteps", "rescale_learned_sigmas",
                          "timestep_respacing"}
    assert json.loads(ckpt.read_metadata(path)["adm_fast.diffusion"]) == flags
    assert ckpt.read_class_names(path) == ["ant", "bee", "cat", "dog", "eel"]
    again = adm_fast.load_checkpoint(path)
    assert again.num_classes == 5 and again.label_emb.weight.shape[0] == 5
    assert json.loads(ckpt.read_metadata(path)["adm_fast.config"])["num_classes"] == 5
    assert again.diffusion_flags == flags and again.class_names[2] == "cat"
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v)
    # A load/save round trip keeps them.
    adm_fast.save_checkpoint(again, path.with_name("again.safetensors"))
    assert ckpt.read_diffusion_flags(path.with_name("again.safetensors")) == flags


def test_files_without_metadata_read_as_none(tmp_path):
    pt = tmp_path / "gd.pt"
    torch.save(_model().state_dict(), pt)
    assert ckpt.read_diffusion_flags(pt) is None and ckpt.read_class_names(pt) is None
    bare = tmp_path / "bare.safetensors"  # safetensors, but not written by adm_fast
    save_file(_model().state_dict(), bare)
    assert ckpt.read_diffusion_flags(bare) is None and ckpt.read_class_names(bare) is None


def test_bad_diffusion_flags_or_classes_are_refused_on_save(tmp_path):
    model = _model()
    with pytest.raises(CheckpointError, match="diffusion flags lack learn_sigma, noise_schedule"):
        adm_fast.save_checkpoint(model, tmp_path / "a.safetensors",
                                 diffusion={"diffusion_steps": 100})
    with pytest.raises(CheckpointError, match="diffusion_steps must be a positive int"):
        adm_fast.save_checkpoint(model, tmp_path / "a.safetensors", diffusion={
            **adm_fast.diffusion_defaults(), "diffusion_steps": "100"})
    with pytest.raises(CheckpointError, match="6 class names for a model with 5"):
        adm_fast.save_checkpoint(model, tmp_path / "a.safetensors", classes=list("abcdef"))
    assert not os.listdir(tmp_path)


def test_a_model_without_labels_may_name_its_training_classes(tmp_path):
    """An unconditional UNet keeps the classes of the images it was trained on,
    for a sampler to check a guiding classifier against."""
    model = _model(class_cond=False)
    adm_fast.save_checkpoint(model, tmp_path / "u.safetensors", classes=["ant", "bee"])
    again = adm_fast.load_checkpoint(tmp_path / "u.safetensors")
    assert again.num_classes is None and again.class_names == ["ant", "bee"]


def test_written_files_are_safetensors_with_every_dtype(tmp_path):
    """adm_fast streams the format itself: the safetensors library reads it back,
    for mixed dtypes (alignment) and empty tensors."""
    from safetensors import safe_open

    model = _model()
    sd = model.state_dict()
    mixed = {k: v.to([torch.float16, torch.bfloat16, torch.float32, torch.float64][i % 4])
             for i, (k, v) in enumerate(sd.items())}
    path = tmp_path / "mixed.safetensors"
    adm_fast.save_checkpoint(model, path, state_dict=mixed)
    with safe_open(str(path), "pt") as f:
        for k in f.keys():
            assert torch.equal(f.get_tensor(k), mixed[k]) and f.get_tensor(k).dtype == mixed[k].dtype


# --- a damaged or edited file ------------------------------------------------

def test_a_dtype_edited_header_is_refused(tmp_path):
    model = _model()
    path = tmp_path / "half.safetensors"
    adm_fast.save_checkpoint(model, path, state_dict={k: v.half() for k, v in
                                                      model.state_dict().items()})
    header, data = _header(path)
    for k, v in header.items():
        if k != "__metadata__":
            v["dtype"] = "BF16"  # same size: the safetensors library accepts it
    _rewrite(path, header, data)
    _one_line_error(lambda: adm_fast.load_checkpoint(path), path, "checksum")
    # Without adm_fast's checksum (a file from elsewhere), it still loads.
    del header["__metadata__"]["adm_fast.sha256"]
    _rewrite(path, header, data)
    assert adm_fast.load_checkpoint(path).input_blocks[0][0].weight.dtype == torch.float32


def test_damaged_data_is_refused(saved):
    _, path = saved
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    _one_line_error(lambda: adm_fast.load_checkpoint(path), path, "checksum")


@pytest.mark.parametrize("damage", ["empty", "truncated", "huge_header", "not_json",
                                    "cut_header"])
def test_unreadable_safetensors(saved, damage):
    _, path = saved
    raw = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": raw[:len(raw) // 2],
                      "huge_header": struct.pack("<Q", 1 << 40) + raw[8:],
                      "not_json": raw[:8] + b"{" + b"x" * (len(raw) - 9),
                      "cut_header": raw[:20]}[damage])
    _one_line_error(lambda: adm_fast.load_checkpoint(path), path)


@pytest.mark.parametrize("damage", ["empty", "truncated", "zeros"])
def test_unreadable_pt(tmp_path, damage):
    path = tmp_path / "gd.pt"
    torch.save(_model().state_dict(), path)
    raw = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": raw[:len(raw) // 3],
                      "zeros": b"\0" * 4096}[damage])
    _one_line_error(lambda: adm_fast.load_checkpoint(path), path, "not a readable")


@pytest.mark.parametrize("content, says", [
    (b"hello world\n", "it is text (it starts with 'hello world\\n'), not a torch.save zip"),
    ("été, 2024\n".encode() * 8, "it is text (it starts with 'été, 2024"),
    (b"", "the file is empty (0 bytes)"),
    (b"PK\x03\x04" + b"\0" * 60, "a damaged zip archive (PytorchStreamReader failed"),
    (b"\x80\x02}q\x00.", "a damaged pickle ("),
    (b"\x00\xff\x13" * 30, "an unknown format (it starts with b'\\x00\\xff"),
])
def test_an_unreadable_pt_says_what_the_file_is(tmp_path, content, says):
    """One line that says what the file holds, where torch.load's own message
    for a text file is a bare number ('101')."""
    path = tmp_path / "w.pth"
    path.write_bytes(content)
    msg = _one_line_error(lambda: ckpt.read_state_dict(path), path,
                          f"{path} is not a readable PyTorch checkpoint: {says}")
    assert "\n" not in msg and "If you are seeing" not in msg


def _with_meta(tmp_path, **changes):
    model = _model()
    path = tmp_path / "meta.safetensors"
    adm_fast.save_checkpoint(model, path)
    meta = ckpt.read_metadata(path)
    meta.update(changes)
    meta = {k: v for k, v in meta.items() if v is not None}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), meta)
    return path


CONFIG = json.dumps(_model().config)


@pytest.mark.parametrize("changes, match", [
    (dict(**{"adm_fast.config": "{not json"}), "adm_fast.config is not valid JSON"),
    (dict(**{"adm_fast.config": "[1, 2]"}), "adm_fast.config must be a JSON object"),
    (dict(**{"adm_fast.config": CONFIG[:-1] + ', "wings": 2}'}), "unknown arguments wings"),
    (dict(**{"adm_fast.config": CONFIG.replace('"model_channels": 32', '"model_channels": "32"')}),
     "model_channels='32'"),
    (dict(**{"adm_fast.config": CONFIG.replace('"num_res_blocks": 1, ', '')}),
     "missing arguments num_res_blocks"),
    (dict(**{"adm_fast.config": CONFIG.replace('"model_channels": 32', '"model_channels": -4')}),
     "does not build a UNetModel"),
    (dict(**{"adm_fast.class": "Transformer"}), "unknown model class 'Transformer'"),
    (dict(**{"adm_fast.config": None}), "no adm_fast.config"),
    (dict(**{"adm_fast.flags": "[]"}), "adm_fast.flags must be a JSON object"),
    (dict(**{"adm_fast.flags": "{"}), "adm_fast.flags is not valid JSON"),
    # A subset is read as it is (adm_fast writes all eight); unknown names are refused.
    (dict(**{"adm_fast.diffusion": '{"diffusion_step": 10}'}), "unknown diffusion flag"),
    (dict(**{"adm_fast.diffusion": "7"}), "adm_fast.diffusion must be a JSON object"),
    (dict(**{"adm_fast.classes": '{"a": 0}'}), "adm_fast.classes must be a JSON list"),
    (dict(**{"adm_fast.classes": '["a", "a"]'}), "distinct strings"),
])
def test_bad_metadata_is_one_clear_error(tmp_path, changes, match):
    path = _with_meta(tmp_path, **changes)
    _one_line_error(lambda: adm_fast.load_checkpoint(path), path, match)


def test_bad_preset_argument(saved):
    _, path = saved
    _one_line_error(lambda: adm_fast.load_checkpoint(path, preset=123), path, "got int 123")
    _one_line_error(lambda: adm_fast.load_checkpoint(path, preset="nope"), path,
                    "unknown preset 'nope'")


# --- what a mismatch says ------------------------------------------------------

def test_mismatch_says_what_the_checkpoint_is_and_suggests_no_other_kind():
    flags = json.loads(ckpt.read_metadata(DEMO)["adm_fast.flags"])
    with pytest.raises(CheckpointError) as e:
        adm_fast.load_checkpoint(DEMO, preset={**flags, "image_size": 32})
    msg = str(e.value)
    assert msg.startswith(f"{DEMO} holds a 16x16 UNet (32 channels, unconditional, "
                          "learned sigma)"), msg
    assert "--image_size 32 (the checkpoint's: 16)" in msg
    assert "classifier" not in msg and "closest preset" not in msg
    assert len(msg.splitlines()) <= 8


def test_a_bare_unet_is_compared_with_unet_presets_only(tmp_path):
    path = tmp_path / "mine.pt"
    torch.save(load_case("unet_cond_scaleshift_legacyattn")["state_dict"], path)
    with pytest.raises(CheckpointError) as e:
        adm_fast.load_checkpoint(path, preset="64x64_classifier")
    msg = str(e.value)
    assert "holds a UNet (32 channels, 1000 classes" in msg and "closest preset: " in msg
    closest = msg.split("closest preset: ")[1].split()[0]
    assert adm_fast.presets.get(closest).kind == "unet", msg
    assert len(msg.splitlines()) <= 10


def test_sample_cli_reports_the_mismatch_in_a_few_lines():
    proc = subprocess.run([sys.executable, "-m", "adm_fast.cli", "sample", "--model_path",
                           str(DEMO), "--image_size", "32", "--num_samples", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = [ln for ln in proc.stderr.splitlines() if "Warning" not in ln
           and not ln.startswith("  return")]
    text = "\n".join(err)
    assert "Traceback" not in text and "16x16 UNet" in text and str(DEMO) in text, text
    assert "--image_size 32" in text and "classifier" not in text, text
    assert len(err) <= 8, text


# --- writes that fail ------------------------------------------------------------

def _full_disk(monkeypatch, after=100):
    """open() in adm_fast.checkpoint gives files that fail with ENOSPC after `after` bytes."""
    class Full:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, data):
            self.n += len(memoryview(data).cast("B"))
            if self.n > after:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(ckpt, "open", lambda *a, **k: Full(builtins.open(*a, **k)),
                        raising=False)


@pytest.mark.parametrize("what", ["weights", "state"])
def test_a_full_disk_says_disk_full_and_keeps_the_old_file(tmp_path, monkeypatch, what):
    from adm_fast.train.state import save_state

    path = tmp_path / ("m.safetensors" if what == "weights" else "state000001.pt")
    path.write_bytes(b"the previous version")
    _full_disk(monkeypatch)
    with pytest.raises(DiskFullError) as e:
        if what == "weights":
            adm_fast.save_checkpoint(_model(), path)
        else:
            save_state({"optimizer": {"x": torch.zeros(10_000)}}, str(path))
    assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC
    assert str(e.value.strerror).startswith(f"disk full: cannot write {path}")
    assert path.read_bytes() == b"the previous version"
    assert os.listdir(tmp_path) == [path.name]  # no temporary left behind
