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
from helpers import load_case
from safetensors.torch import save_file

import adm_fast
import adm_fast.io
from adm_fast import checkpoint as ckpt
from adm_fast.checkpoint import CheckpointError, DiskFullError
from adm_fast.checkpoint.build import CONFIG_SCHEMA, MODEL_CLASSES, least_size

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
    # Without adm_fast's checksums (a file from elsewhere), it still loads.
    del header["__metadata__"]["adm_fast.sha256"]
    header["__metadata__"].pop("adm_fast.metadata_sha256", None)
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
    """A file as adm_fast wrote it before its metadata had a checksum (its
    tensors' checksum kept), with `changes` (None removes a key): every entry
    is still checked for what it says."""
    model = _model()
    path = tmp_path / "meta.safetensors"
    adm_fast.save_checkpoint(model, path)
    meta = ckpt.read_metadata(path)
    meta.pop("adm_fast.metadata_sha256", None)
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


# --- the metadata is under the checksum ----------------------------------------

def _edit_metadata(path, edit):
    """Edit the metadata in the header by hand, the tensors' bytes untouched."""
    header, data = _header(path)
    edit(header["__metadata__"])
    _rewrite(path, header, data)


def _set(key, **changes):
    def edit(meta):
        meta[key] = json.dumps({**json.loads(meta[key]), **changes})
    return edit


EDITS = {
    "noise_schedule cosine": _set("adm_fast.diffusion", noise_schedule="cosine"),
    "predict_xstart true": _set("adm_fast.diffusion", predict_xstart=True),
    "config image_size 16": _set("adm_fast.config", image_size=16),
    "flags image_size 16": _set("adm_fast.flags", image_size=16),
    "classes reordered": lambda m: m.update(
        {"adm_fast.classes": json.dumps(["eel", "bee", "cat", "dog", "ant"])}),
    "preset added": lambda m: m.update({"adm_fast.preset": "64x64_diffusion"}),
    "diffusion removed": lambda m: m.pop("adm_fast.diffusion"),
    "tensor checksum removed": lambda m: m.pop("adm_fast.sha256"),
    "an entry added": lambda m: m.update({"note": "mine"}),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_edited_metadata_is_refused(saved, edit):
    """Every entry that rebuilds or runs the model is under the checksum: an
    edit is refused wherever the metadata is read."""
    _, path = saved
    _edit_metadata(path, EDITS[edit])
    says = "the metadata does not match the checksum adm_fast wrote (adm_fast.metadata_sha256)"
    for read in (lambda: adm_fast.load_checkpoint(path), lambda: ckpt.read_state_dict(path),
                 lambda: ckpt.read_metadata(path), lambda: ckpt.read_diffusion_flags(path),
                 lambda: ckpt.read_class_names(path)):
        _one_line_error(read, path, says)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """model000001.safetensors as `adm-fast train` writes it."""
    from adm_fast.train import make_image_folder, train

    root = tmp_path_factory.mktemp("trained")
    make_image_folder(root / "data", 8, 8, classes=("ant", "bee"), seed=3)
    train(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2",
          attention_resolutions="4", num_head_channels=16, diffusion_steps=50, num_workers=0,
          progress=False, batch_size=2, max_steps=1, ema_rate="0.9",
          data_dir=str(root / "data"), log_dir=str(root / "log"))
    return root / "log" / "model000001.safetensors"


@pytest.mark.parametrize("edit", ["noise_schedule cosine", "predict_xstart true",
                                  "config image_size 16"])
def test_a_trained_file_with_edited_metadata_is_refused_by_sample(trained, tmp_path, capsys,
                                                                   edit):
    """The issue's repro: adm-fast sample took 16x16 images with the wrong
    schedule from a file whose header was edited after adm-fast train wrote it."""
    from adm_fast import cli

    path = tmp_path / "model000001.safetensors"
    path.write_bytes(trained.read_bytes())
    assert adm_fast.load_checkpoint(path).image_size == 8  # as written, it loads
    _edit_metadata(path, EDITS[edit])
    rc = cli.main(["sample", "--no-progress", "--device", "cpu", "--model_path", str(path),
                   "--num_samples", "1", "--timestep_respacing", "1", "--out", str(tmp_path)])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1, err
    assert str(path) in err[0] and "does not match the checksum" in err[0], err
    assert not list(tmp_path.glob("samples_*"))


def test_a_file_from_before_the_metadata_checksum_still_loads(saved):
    """A file carrying adm_fast.sha256 alone (written before the metadata had a
    checksum): it loads, its tensors still verified."""
    model, path = saved
    header, data = _header(path)
    header["__metadata__"].pop("adm_fast.metadata_sha256", None)
    _rewrite(path, header, data)
    again = adm_fast.load_checkpoint(path)
    assert again.class_names == ["ant", "bee", "cat", "dog", "eel"]
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    _one_line_error(lambda: adm_fast.load_checkpoint(path), path,
                    "the tensors do not match the checksum")


# --- hostile files: sizes bounded before building, one line each ---------------

def _config(**changes):
    return json.dumps({**json.loads(CONFIG), **changes})


@pytest.mark.parametrize("changes, match", [
    # a 2.8 MB file whose model took a minute and a gigabyte to build
    (dict(**{"adm_fast.config": _config(num_res_blocks=3000)}),
     "does not build a UNetModel: num_res_blocks 3000 is above adm_fast's limit of 32"),
    # within the limits, but far more than the file holds: refused before building
    (dict(**{"adm_fast.config": _config(num_res_blocks=30, model_channels=4000,
                                        channel_mult=[4] * 16)}),
     "describes a UNetModel of at least 1,106,176,080,000 parameters in 4,804 tensors, but "
     "the file holds 704,006 in 129: the metadata does not describe these weights"),
    (dict(**{"adm_fast.config": _config(num_res_blocks=8)}),
     "describes a UNetModel of at least 385,664 parameters in 164 tensors, but the file holds "
     "704,006 in 129"),
    (dict(**{"adm_fast.config": _config(model_channels=10 ** 9)}),
     "model_channels 1000000000 is above adm_fast's limit of 4096"),
    (dict(**{"adm_fast.config": _config(model_channels=1e9)}),
     "model_channels=1000000000.0 (expected int)"),
    (dict(**{"adm_fast.config": _config(num_classes=-3)}), "num_classes -3 is below 1"),
    (dict(**{"adm_fast.config": _config(num_classes=10 ** 12)}),
     "num_classes 1000000000000 is above adm_fast's limit of 100000"),
    (dict(**{"adm_fast.config": _config(image_size=10 ** 12)}),
     "image_size 1000000000000 is above adm_fast's limit of 4096"),
    (dict(**{"adm_fast.config": _config(channel_mult=[1] * 40)}),
     "channel_mult has 40 levels, above adm_fast's limit of 16"),
    (dict(**{"adm_fast.config": _config(channel_mult=[1, 1e6])}),
     "outside adm_fast's limits of 1 to 16384"),
    (dict(**{"adm_fast.config": _config(attention_resolutions=[2] * 1000)}),
     "attention_resolutions has 1000 entries"),
    (dict(**{"adm_fast.config": _config(num_heads=0, num_head_channels=-1)}),
     "num_heads 0 is below 1"),
    # 1e12 steps asked numpy for 7.28 TiB when the diffusion was built
    (dict(**{"adm_fast.diffusion": json.dumps({"diffusion_steps": 10 ** 12})}),
     "diffusion flag diffusion_steps 1000000000000 is above adm_fast's limit of 100000"),
    # JSON nested past Python's recursion limit was a RecursionError
    (dict(**{"adm_fast.config": "[" * 100_000 + "]" * 100_000}),
     "adm_fast.config is not valid JSON (nested too deeply)"),
    (dict(**{"adm_fast.diffusion": '{"a": ' * 100_000 + "1" + "}" * 100_000}),
     "adm_fast.diffusion is not valid JSON (nested too deeply)"),
    (dict(**{"adm_fast.classes": "[" * 100_000 + "]" * 100_000}),
     "adm_fast.classes is not valid JSON (nested too deeply)"),
    (dict(**{"adm_fast.flags": "[" * 100_000 + "]" * 100_000}),
     "adm_fast.flags is not valid JSON (nested too deeply)"),
])
def test_hostile_metadata_is_one_line_before_anything_is_built(tmp_path, changes, match):
    path = _with_meta(tmp_path, **changes)
    _one_line_error(lambda: adm_fast.load_checkpoint(path), path, match)


def test_the_least_size_is_below_every_preset():
    """The check of a file's metadata against its weights never refuses a real
    model: its bound is below every released model's size."""
    for name in adm_fast.presets.names():
        model = adm_fast.presets.get(name).build(device="meta")
        least, tensors = least_size(model.config)
        sd = model.state_dict()
        assert least <= sum(v.numel() for v in sd.values()) and tensors <= len(sd), name
    assert least_size(_model().config) == (63_104, 24)  # the file: 704,006 in 129


def test_the_config_schema_covers_every_constructor_argument():
    """Each argument adm_fast.config may hold is typed in the schema: a new
    constructor argument without a type there would be refused in every file."""
    import inspect

    for name, cls in MODEL_CLASSES.items():
        init = (adm_fast.UNetModel if cls is adm_fast.SuperResModel else cls).__init__
        params = set(inspect.signature(init).parameters) - {"self"}
        assert set(CONFIG_SCHEMA[name]) == params, name


def test_sample_opens_each_checkpoint_once(tmp_path, monkeypatch):
    """adm-fast sample reads each checkpoint file once: what it reads to tell
    the model apart (tensors and metadata, both verified, and the file's
    identity for the run record) is what the model is built and loaded from."""
    import collections

    import safetensors

    from adm_fast import cli

    flags = dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                 attention_resolutions="4", learn_sigma=True, use_scale_shift_norm=True)
    model = tmp_path / "model.pt"  # guided-diffusion's format: no metadata
    torch.save(adm_fast.create_model(**flags).state_dict(), model)
    classifier = tmp_path / "classifier.safetensors"
    adm_fast.save_checkpoint(adm_fast.create_classifier(
        image_size=8, classifier_use_fp16=False, classifier_width=32, classifier_depth=1,
        classifier_attention_resolutions="4", classifier_use_scale_shift_norm=True,
        classifier_resblock_updown=True, classifier_pool="attention",
        classifier_channel_mult="1,2"), classifier,
        diffusion={**adm_fast.diffusion_defaults(), "diffusion_steps": 50})
    watched = {str(model), str(classifier)}
    opened = collections.Counter()

    def counting(real):
        def open_(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and os.path.abspath(file) in watched:
                opened[os.path.basename(file)] += 1
            return real(file, *args, **kwargs)
        return open_

    monkeypatch.setattr(builtins, "open", counting(builtins.open))
    monkeypatch.setattr(safetensors, "safe_open", counting(safetensors.safe_open))
    argv = ["sample", "--no-progress", "--device", "cpu", "--model_path", str(model),
            "--classifier_path", str(classifier), "--num_samples", "1",
            "--timestep_respacing", "2", "--out", str(tmp_path / "out")]
    for k, v in flags.items():
        argv += [f"--{k}", str(v)]
    assert cli.main(argv) == 0
    assert opened == {"model.pt": 1, "classifier.safetensors": 1}, opened


def test_nested_metadata_in_a_mismatch_message(tmp_path):
    """The mismatch error describes the file from its own config and flags:
    nested past the recursion limit, they are left out, not a RecursionError."""
    nested = "[" * 100_000 + "]" * 100_000
    path = _with_meta(tmp_path, **{"adm_fast.config": nested, "adm_fast.flags": nested})
    with pytest.raises(CheckpointError, match="does not fit the model described by the flags"):
        adm_fast.load_checkpoint(path, preset={**FLAGS, "kind": "unet", "num_channels": 64})


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_an_integer_tensor_is_one_line_naming_it(tmp_path, fmt):
    """An int64 tensor in a file without a checksum failed in load_state_dict
    with 129 lines (one per tensor)."""
    model = _model()
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    sd["input_blocks.0.0.bias"] = torch.arange(32)
    path = tmp_path / f"ints.{fmt}"
    if fmt == "pt":
        torch.save(sd, path)
        load = lambda: adm_fast.load_checkpoint(path, preset={**FLAGS, "kind": "unet"})  # noqa: E731
    else:
        meta = {"adm_fast.class": "UNetModel", "adm_fast.config": CONFIG}
        save_file(sd, str(path), meta)
        load = lambda: adm_fast.load_checkpoint(path)  # noqa: E731
    _one_line_error(load, path, "tensor input_blocks.0.0.bias has dtype int64; a model's "
                    "weights are float32, float16, bfloat16 or float64")
    sd["out.2.bias"] = torch.zeros(6, dtype=torch.bool)
    torch.save(sd, tmp_path / "two.pt")
    _one_line_error(lambda: adm_fast.load_checkpoint(tmp_path / "two.pt",
                                                     preset={**FLAGS, "kind": "unet"}),
                    tmp_path / "two.pt", "has dtype int64 (and 1 more)")


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
    """open() in adm_fast.io gives files that fail with ENOSPC after `after` bytes."""
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

    monkeypatch.setattr(adm_fast.io, "open", lambda *a, **k: Full(builtins.open(*a, **k)),  # noqa: SIM115 (Full closes it)
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
