"""`adm-fast sample` end to end on tiny checkpoints, and `sample_images`."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import adm_fast
from adm_fast import cli
from adm_fast.sampling_api import batch_seed, iter_batches, sample_images, to_uint8_nhwc

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


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
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
    return paths, models


def run(capsys, *args):
    rc = cli.main(["sample", "--no-progress", "--device", "cpu", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def npz(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def check_run(out_dir, out, n, size, sampler, steps, labelled):
    name = f"samples_{n}x{size}x{size}x3"
    assert sorted(os.listdir(out_dir)) == [f"{name}.npz", f"{name}.png"]  # no temp files
    arrays = npz(os.path.join(out_dir, f"{name}.npz"))
    assert list(arrays) == (["arr_0", "arr_1"] if labelled else ["arr_0"])
    images = arrays["arr_0"]
    assert images.dtype == np.uint8 and images.shape == (n, size, size, 3)
    assert images.std() > 5  # real samples, not a constant
    from PIL import Image

    with Image.open(os.path.join(out_dir, f"{name}.png")) as png:
        assert png.mode == "RGB" and png.size[0] > size
    m = CLOSING.match(out.strip().splitlines()[-1])
    assert m, out
    assert m.groups() == (str(n), sampler, str(steps), "auto")
    return arrays


def test_ddpm_with_classifier_guidance(ckpt, tmp_path, capsys):
    paths, _ = ckpt
    rc, out, err = run(capsys, "--model_path", paths["cond"], "--classifier_path", paths["clf"],
                       "--classifier_scale", 5, "--timestep_respacing", 5,
                       "--num_samples", 3, "--batch_size", 2, "--out", tmp_path)
    assert rc == 0, err
    arrays = check_run(tmp_path, out, 3, 8, "ddpm", 5, labelled=True)
    labels = arrays["arr_1"]
    assert labels.shape == (3,) and labels.dtype.kind == "i"
    assert labels.min() >= 0 and labels.max() < 1000


def test_ddim_same_seed_same_samples(ckpt, tmp_path, capsys):
    paths, _ = ckpt
    results = []
    for i, seed in enumerate([1, 1, 2]):
        rc, out, err = run(capsys, "--model_path", paths["cond"], "--use_ddim", "True",
                           "--timestep_respacing", "ddim5", "--num_samples", 2,
                           "--batch_size", 2, "--seed", seed, "--out", tmp_path / str(i))
        assert rc == 0, err
        results.append(check_run(tmp_path / str(i), out, 2, 8, "ddim", 5, labelled=True))
    for key in ("arr_0", "arr_1"):
        np.testing.assert_array_equal(results[0][key], results[1][key])
    assert not np.array_equal(results[0]["arr_0"], results[2]["arr_0"])


def test_dpm_solver_unconditional(ckpt, tmp_path, capsys):
    paths, _ = ckpt
    rc, out, err = run(capsys, "--model_path", paths["uncond"], "--sampler", "dpm++",
                       "--steps", 4, "--num_samples", 2, "--batch_size", 2, "--out", tmp_path)
    assert rc == 0, err
    check_run(tmp_path, out, 2, 8, "dpm++", 4, labelled=False)


def test_super_resolution_from_base_samples(ckpt, tmp_path, capsys):
    paths, _ = ckpt
    rc, out, err = run(capsys, "--model_path", paths["sr"], "--base_samples", paths["base"],
                       "--timestep_respacing", 3, "--num_samples", 4, "--batch_size", 2,
                       "--out", tmp_path)
    assert rc == 0, err
    arrays = check_run(tmp_path, out, 4, 64, "ddpm", 3, labelled=True)
    # super_res_sample.py's order: base samples in turn, cycled when they run out
    np.testing.assert_array_equal(arrays["arr_1"], [5, 7, 9, 5])


def test_guided_diffusion_pt_with_flags(ckpt, tmp_path, capsys):
    """.pt files that fit no preset load with the flags given, as in
    guided-diffusion's scripts, and sample what their safetensors twins do."""
    paths, models = ckpt
    pt, clf_pt = tmp_path / "model.pt", tmp_path / "clf.pt"
    torch.save(models["cond"].state_dict(), pt)
    torch.save(models["clf"].state_dict(), clf_pt)
    common = ["--timestep_respacing", 3, "--num_samples", 2, "--batch_size", 2,
              "--classifier_scale", 50]
    flags = ["--image_size", 8, "--num_channels", 32, "--num_res_blocks", 1, "--channel_mult",
             "1,2", "--attention_resolutions", 4, "--class_cond", "True", "--learn_sigma", "True",
             "--num_heads", 1, "--use_scale_shift_norm", "False", "--classifier_width", 32,
             "--classifier_depth", 1, "--classifier_attention_resolutions", 4,
             "--classifier_channel_mult", "1,2"]
    rc, out, err = run(capsys, "--model_path", pt, "--classifier_path", clf_pt, *common,
                       "--out", tmp_path / "a")
    assert rc == 2 and "does not fit any released preset" in err
    rc, out, err = run(capsys, "--model_path", pt, "--classifier_path", clf_pt, *common, *flags,
                       "--out", tmp_path / "a")
    assert rc == 0, err
    rc, out, err = run(capsys, "--model_path", paths["cond"], "--classifier_path",
                       paths["clf"], *common, "--out", tmp_path / "b")
    assert rc == 0, err
    a, b = (npz(tmp_path / d / "samples_2x8x8x3.npz") for d in "ab")
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])


def test_classifier_free_guidance(ckpt, tmp_path, capsys):
    paths, _ = ckpt
    rc, out, err = run(capsys, "--model_path", paths["cfg"], "--cfg_scale", 3,
                       "--timestep_respacing", 4, "--num_samples", 6, "--batch_size", 6,
                       "--out", tmp_path)
    assert rc == 0, err
    labels = check_run(tmp_path, out, 6, 8, "ddpm", 4, labelled=True)["arr_1"]
    assert labels.max() < 10 and len(set(labels.tolist())) > 1


def test_sample_images_guidance_and_draw_order(ckpt):
    _, models = ckpt
    model, clf = models["cond"], models["clf"]
    d = adm_fast.create_gaussian_diffusion(steps=1000, learn_sigma=True, timestep_respacing="5")
    kw = dict(num_samples=3, batch_size=3, seed=7)
    plain, y, stats = sample_images(model, d, **kw)
    zero, y0, _ = sample_images(model, d, classifier=clf, classifier_scale=0.0, **kw)
    guided, yg, _ = sample_images(model, d, classifier=clf, classifier_scale=500.0, **kw)
    np.testing.assert_array_equal(zero, plain)
    np.testing.assert_array_equal(y0, y)
    np.testing.assert_array_equal(yg, y)
    assert np.abs(guided.astype(int) - plain).max() > 10
    assert stats["steps"] == 5 and stats["batches"] == 1 and stats["ms_per_step"] > 0
    # guided-diffusion's order after manual_seed: the labels, then the loop's noise
    torch.manual_seed(batch_seed(7, 0))
    labels = torch.randint(0, 1000, (3,))
    x = d.p_sample_loop(model, (3, 3, 8, 8), model_kwargs={"y": labels},
                        cond_fn=adm_fast.classifier_cond_fn(clf, 500.0))
    np.testing.assert_array_equal(to_uint8_nhwc(x).numpy(), guided)
    np.testing.assert_array_equal(labels.numpy(), yg)


def test_each_batch_from_its_own_seed(ckpt):
    """Batch b is guided-diffusion's draw after manual_seed(batch_seed(seed, b)),
    whatever ran before it; the last batch is cut to num_samples."""
    model = ckpt[1]["cond"]
    d = adm_fast.create_gaussian_diffusion(steps=1000, learn_sigma=True, timestep_respacing="3")
    images, labels, stats = sample_images(model, d, num_samples=5, batch_size=2, seed=11)
    assert images.shape == (5, 8, 8, 3) and labels.shape == (5,) and stats["batches"] == 3
    for b in range(3):
        torch.manual_seed(batch_seed(11, b))
        y = torch.randint(0, 1000, (2,))
        x = to_uint8_nhwc(d.p_sample_loop(model, (2, 3, 8, 8), model_kwargs={"y": y})).numpy()
        keep = slice(2 * b, min(5, 2 * b + 2))
        np.testing.assert_array_equal(images[keep], x[:keep.stop - keep.start])
        np.testing.assert_array_equal(labels[keep], y.numpy()[:keep.stop - keep.start])
    # a subset of batches, in another order, gives the same images
    kw = dict(num_samples=5, batch_size=2, seed=11)
    got = {b: imgs for b, imgs, _ in iter_batches(model, d, batches=[2, 0], **kw)}
    np.testing.assert_array_equal(got[0], images[0:2])
    np.testing.assert_array_equal(got[2], images[4:5])
    assert batch_seed(0, 1) != batch_seed(1, 0) and batch_seed(3, 2) == batch_seed(3, 2)
    with pytest.raises(ValueError, match="batch index 3"):
        iter_batches(model, d, batches=[3], **kw)
    with pytest.raises(ValueError, match="seed must be"):
        sample_images(model, d, num_samples=1, batch_size=1, seed=-1)


def test_sample_images_classes(ckpt):
    """classes: labels drawn uniformly from the set, as classes[randint(0, len)]."""
    _, models = ckpt
    d = adm_fast.create_gaussian_diffusion(steps=1000, learn_sigma=True, timestep_respacing="2")
    kw = dict(num_samples=40, batch_size=20, seed=4)
    _, labels, _ = sample_images(models["cond"], d, classes=[7, 3, 0, 3], **kw)
    assert set(labels.tolist()) == {0, 3, 7}
    torch.manual_seed(batch_seed(4, 0))
    want = torch.tensor([0, 3, 7])[torch.randint(0, 3, (20,))]
    np.testing.assert_array_equal(labels[:20], want.numpy())
    # an unconditional model guided by a classifier draws among the classifier's
    _, labels, _ = sample_images(models["uncond"], d, classifier=models["clf"],
                                 classifier_scale=1.0, classes=range(995, 1000), **kw)
    assert set(labels.tolist()) <= set(range(995, 1000))
    _, cfg_labels, _ = sample_images(models["cfg"], d, classes=[9], **kw)
    assert set(cfg_labels.tolist()) == {9}
    for bad, model, match in (([10], "cfg", "class 10 is out of range: the model has 10"),
                              ([1], "uncond", "classes need"), ([], "cond", "empty"),
                              (["a"], "cond", "integers")):
        with pytest.raises(ValueError, match=match):
            sample_images(models[model], d, classes=bad, **kw)


def test_sample_images_unconditional_model_with_classifier(ckpt):
    _, models = ckpt
    d = adm_fast.create_gaussian_diffusion(steps=1000, learn_sigma=True, timestep_respacing="3")
    kw = dict(num_samples=2, batch_size=2, seed=3)
    plain, none, _ = sample_images(models["uncond"], d, **kw)
    guided, labels, _ = sample_images(models["uncond"], d, classifier=models["clf"],
                                      classifier_scale=500.0, **kw)
    assert none is None and labels.shape == (2,)  # classifier_sample.py writes its labels
    assert not np.array_equal(plain, guided)


def test_sample_images_cfg_scale_one_is_conditional(ckpt):
    _, models = ckpt
    d = adm_fast.create_gaussian_diffusion(steps=1000, learn_sigma=True, timestep_respacing="4")
    kw = dict(num_samples=4, batch_size=4, seed=1)
    cond, y, _ = sample_images(models["cfg"], d, **kw)
    one, y1, _ = sample_images(models["cfg"], d, cfg_scale=1.0, **kw)
    strong, _, _ = sample_images(models["cfg"], d, cfg_scale=8.0, **kw)
    np.testing.assert_array_equal(y, y1)
    assert np.abs(one.astype(int) - cond).max() <= 1  # equal up to rounding
    assert np.abs(strong.astype(int) - cond).max() > 2
    with pytest.raises(ValueError, match="null class"):
        sample_images(models["cond"], d, cfg_scale=2.0, **kw)


BAD = {
    "missing model": (["--model_path", "{tmp}/nope.pt"], "not found"),
    "preset mismatch": (["--model_path", "{cond}", "--preset", "64x64_diffusion"],
                        "does not fit preset 64x64_diffusion"),
    "classifier size": (["--model_path", "{cond}", "--classifier_path", "{clf16}"],
                        "16x16 images but the model"),
    "num_samples": (["--model_path", "{cond}", "--num_samples", "0"], "--num_samples"),
    "batch_size": (["--model_path", "{cond}", "--batch_size", "0"], "--batch_size"),
    "cfg without null class": (["--model_path", "{cond}", "--cfg_scale", "2"], "null class"),
    "sr without base samples": (["--model_path", "{sr}"], "--base_samples is required"),
    "base samples of another size": (["--model_path", "{sr}", "--base_samples", "{base16}"],
                                     "16x16 but the model upsamples 32x32"),
    "unknown preset": (["--model_path", "{cond}", "--preset", "nope"], "unknown preset"),
    "flags against the checkpoint": (["--model_path", "{cond}", "--num_channels", "64"],
                                     "does not fit the model described by the flags given"),
    "classifier as model": (["--model_path", "{clf}"], "is a classifier"),
    "scale without classifier": (["--model_path", "{cond}", "--classifier_scale", "2"],
                                 "needs --classifier_path"),
    "steps without dpm++": (["--model_path", "{cond}", "--steps", "5"], "--steps"),
    "eta without ddim": (["--model_path", "{cond}", "--eta", "0.5"], "--eta"),
    "bad flag value": (["--model_path", "{cond}", "--num_samples", "many"], "--num_samples"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case, ckpt, tmp_path, capsys):
    paths, _ = ckpt
    args, expected = BAD[case]
    args = [a.format(tmp=tmp_path, **paths) for a in args]
    out_dir = tmp_path / "out"
    if "--num_samples" not in args:
        args += ["--num_samples", "1"]
    rc, out, err = run(capsys, *args, "--timestep_respacing", 2, "--out", out_dir)
    assert rc == 2
    assert err.startswith("adm-fast sample: error: ") and expected in err, err
    assert "Traceback" not in err
    assert not out_dir.exists()


def test_torchrun_two_ranks(ckpt, tmp_path, capsys):
    """Two ranks share the batches (rank r takes b = r mod 2) and give the same
    file, byte for byte, as one process: batch b's seed depends on b alone."""
    paths, _ = ckpt
    flags = ["--model_path", paths["cond"], "--timestep_respacing", "3", "--batch_size", "2",
             "--num_samples", "5", "--seed", "3", "--device", "cpu", "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", "-m", "adm_fast.cli", "sample", *flags,
                           "--out", str(tmp_path / "dist")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert CLOSING.match(proc.stdout.strip().splitlines()[-1]), proc.stdout
    assert sorted(os.listdir(tmp_path / "dist")) == ["samples_5x8x8x3.npz", "samples_5x8x8x3.png"]
    rc, _, err = run(capsys, *flags, "--out", tmp_path / "one")
    assert rc == 0, err
    for name in ("samples_5x8x8x3.npz", "samples_5x8x8x3.png"):
        assert (tmp_path / "dist" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
