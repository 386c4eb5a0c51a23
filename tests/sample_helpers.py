"""Tiny checkpoints and a runner for the `adm-fast sample` tests."""

import re
from pathlib import Path

import numpy as np
import torch

import adm_fast
from adm_fast import cli
from adm_fast.checkpoint import read_state_dict
from adm_fast.sampling import shards

TINY = dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2",
            attention_resolutions="4", learn_sigma=True)
CLOSING = re.compile(r"^sampled (\d+) images in [\d.]+ s: [\d.]+ images/s, [\d.]+ ms per step "
                     r"\((\S+), (\d+) steps, (\w+), cpu, fp32\)$")


def _randomise(model, seed):
    # Zero-initialised output layers would make every model predict 0 and every
    # classifier gradient vanish: the tests could not tell guidance from none.
    torch.manual_seed(seed)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def _classifier(size, seed):
    return _randomise(adm_fast.EncoderUNetModel(
        size, 3, 32, 1000, 1, (2,), channel_mult=(1, 2), num_head_channels=32,
        use_scale_shift_norm=True, resblock_updown=True, pool="attention"), seed)


def make_checkpoints(d):
    """Tiny random checkpoints of every kind in folder d (and base samples, and
    damaged files): (paths, models)."""
    models = {
        "cond": _randomise(adm_fast.create_model(**TINY, class_cond=True), 1),
        "uncond": _randomise(adm_fast.create_model(**TINY, class_cond=False), 2),
        "clf": _randomise(adm_fast.create_classifier(
            image_size=8, classifier_use_fp16=False, classifier_width=32, classifier_depth=1,
            classifier_attention_resolutions="4", classifier_use_scale_shift_norm=True,
            classifier_resblock_updown=True, classifier_pool="attention",
            classifier_channel_mult="1,2"), 3),
        "clf16": _classifier(16, 4),
        # ten classes and a null class: labels must come from the model's classes
        "cfg": _randomise(adm_fast.UNetModel(8, 3, 32, 6, 1, (2,), channel_mult=(1, 2),
                                             num_classes=10, null_class=True), 5),
        "sr": _randomise(adm_fast.sr_create_model(
            large_size=64, small_size=32, num_channels=32, num_res_blocks=1, learn_sigma=True,
            class_cond=True, use_checkpoint=False, attention_resolutions="8", num_heads=1,
            num_head_channels=-1, num_heads_upsample=-1, use_scale_shift_norm=True,
            dropout=0.0, resblock_updown=False, use_fp16=False), 6),
    }
    paths = {k: str(d / f"{k}.safetensors") for k in models}
    for k, m in models.items():
        adm_fast.save_checkpoint(m, paths[k])
    rng = np.random.default_rng(0)
    paths["base"] = str(d / "base.npz")
    np.savez(paths["base"], rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8),
             np.array([5, 7, 9]))
    paths["base16"] = str(d / "base16.npz")
    np.savez(paths["base16"], rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8),
             np.array([5, 7, 9]))
    _bad_files(d, paths)
    return paths, models


def with_metadata(src, dst, **extra):
    """A copy of an adm_fast safetensors file with more metadata keys, as a file
    written before the metadata had its own checksum (which would refuse the
    edit): its tensors still verified, its metadata read as it is."""
    from safetensors.torch import save_file

    sd, meta = read_state_dict(src)
    meta.pop("adm_fast.metadata_sha256", None)
    save_file(sd, str(dst), metadata={**meta, **extra})
    return str(dst)


def _bad_files(d, paths):
    (d / "hello.pt").write_text("hello\n")
    (d / "empty.pt").write_bytes(b"")
    paths["hello"], paths["empty"] = str(d / "hello.pt"), str(d / "empty.pt")
    paths["base0d"] = str(d / "base0d.npz")
    np.savez(paths["base0d"], np.array(5))
    whole = Path(paths["base"]).read_bytes()
    paths["base_cut"] = str(d / "base_cut.npz")
    Path(paths["base_cut"]).write_bytes(whole[:len(whole) // 2])
    paths["base_empty"] = str(d / "base_empty.npz")
    open(paths["base_empty"], "wb").close()
    paths["base_npy"] = str(d / "base.npy")
    np.save(paths["base_npy"], np.zeros((3, 32, 32, 3), np.uint8))
    paths["base_label_big"] = str(d / "base_label_big.npz")  # the sr model has 1000 classes
    np.savez(paths["base_label_big"], np.zeros((3, 32, 32, 3), np.uint8), np.array([5, 1000, 9]))
    paths["base_f32"] = str(d / "base_f32.npz")
    np.savez(paths["base_f32"], np.zeros((3, 32, 32, 3), np.float32))
    for name, value in (("diff_type", '{"diffusion_steps": "100"}'),
                        ("diff_key", '{"steps": 100}'), ("diff_json", "{100"),
                        ("diff_sigma", '{"learn_sigma": false}')):
        paths[name] = with_metadata(paths["cond"], d / f"{name}.safetensors",
                                    **{"adm_fast.diffusion": value})


def run(capsys, *args):
    rc = cli.main(["sample", "--no-progress", "--device", "cpu", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def npz(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def stop_after(monkeypatch, batches, exc):
    """Make the run fail (exc) when it is about to write its batches+1-th shard;
    returns the batch indices it was asked to write, in order."""
    real, calls = shards.RunFolder.write, []

    def write(self, b, images, labels):
        calls.append(b)
        if len(calls) > batches:
            raise exc
        real(self, b, images, labels)

    monkeypatch.setattr(shards.RunFolder, "write", write)
    return calls
