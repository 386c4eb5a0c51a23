"""`adm-fast sample` end to end on tiny checkpoints, and `sample_images`."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from sample_helpers import CLOSING, make_checkpoints, npz, run, with_metadata  # noqa: F401

import adm_fast
from adm_fast import cli
from adm_fast.sampling.api import batch_seed, iter_batches, sample_images, to_uint8_nhwc


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoints(tmp_path_factory.mktemp("ckpt"))


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
    # the one size rule the command line checks too (there naming the files)
    with pytest.raises(ValueError, match="^the classifier is for 16x16 images but the model "
                                         "samples 8x8$"):
        sample_images(model, d, classifier=models["clf16"], classifier_scale=1.0, **kw)


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
    "a text file as model": (["--model_path", "{hello}"],
                             "hello.pt is not a checkpoint: neither safetensors nor a "
                             "torch.save (.pt) file (it starts with b'hello\\n')"),
    "an empty model file": (["--model_path", "{empty}"], "empty.pt is empty (0 bytes)"),
    "base samples 0-d": (["--model_path", "{sr}", "--base_samples", "{base0d}"],
                         "base0d.npz: arr_0 is a 0-d array (one int64 value)"),
    "base samples truncated": (["--model_path", "{sr}", "--base_samples", "{base_cut}"],
                               "base_cut.npz is truncated or not a readable .npz"),
    "base samples empty": (["--model_path", "{sr}", "--base_samples", "{base_empty}"],
                           "base_empty.npz is empty (0 bytes)"),
    "base samples .npy": (["--model_path", "{sr}", "--base_samples", "{base_npy}"],
                          "base.npy is a .npy file (one array, no labels); it must be an .npz"),
    "base samples float": (["--model_path", "{sr}", "--base_samples", "{base_f32}"],
                           "base_f32.npz: arr_0 must be a non-empty uint8 array"),
    "stored diffusion flag type": (["--model_path", "{diff_type}"],
                                   "(adm_fast.diffusion): diffusion flag diffusion_steps must be a positive int, "
                                   "got '100'"),
    "stored diffusion flag unknown": (["--model_path", "{diff_key}"],
                                      "(adm_fast.diffusion): unknown diffusion flag(s) 'steps'"),
    "stored diffusion not json": (["--model_path", "{diff_json}"],
                                  "metadata adm_fast.diffusion is not valid JSON"),
    "stored learn_sigma against the model": (["--model_path", "{diff_sigma}"],
                                             "stores learn_sigma=False but its model outputs 6"),
    "classes out of range": (["--model_path", "{cond}", "--classes", "998-1000"],
                             "--classes: class 1000 is out of range: the model"),
    "classes reversed range": (["--model_path", "{cond}", "--classes", "5-2"],
                               "'5-2' is not a class number or a range like 0-9"),
    "classes unconditional": (["--model_path", "{uncond}", "--classes", "1"],
                              "--classes needs a class-conditional model or classifier guidance"),
    "classes beyond the classifier": (["--model_path", "{uncond}", "--classifier_path", "{clf}",
                                       "--classes", "1000"],
                                      "has 1000 classes (0-999)"),
    "classes for super-resolution": (["--model_path", "{sr}", "--base_samples", "{base}",
                                      "--classes", "1"], "takes its labels from --base_samples"),
    "negative seed": (["--model_path", "{cond}", "--seed", "-1"],
                      "must be a non-negative integer, got -1"),
    # refused at the flag check: no run folder, nothing to block a later run
    "eta nan": (["--model_path", "{cond}", "--use_ddim", "True", "--eta", "nan"],
                "--eta must be a finite number, got nan"),
    "eta inf": (["--model_path", "{cond}", "--use_ddim", "True", "--eta", "inf"],
                "--eta must be a finite number, got inf"),
    "cfg_scale nan": (["--model_path", "{cfg}", "--cfg_scale", "nan"],
                      "--cfg_scale must be a finite number, got nan"),
    "classifier_scale inf": (["--model_path", "{cond}", "--classifier_path", "{clf}",
                              "--classifier_scale", "inf"],
                             "--classifier_scale must be a finite number, got inf"),
    "batch_size over the limit": (["--model_path", "{cond}", "--batch_size", "65537"],
                                  "--batch_size 65537 is over the limit of 65536 images a batch"),
    "device meta": (["--model_path", "{cond}", "--device", "meta"],
                    "--device meta holds shapes, not values"),
    "device not a device": (["--model_path", "{cond}", "--device", "gpu0"],
                            "--device 'gpu0' is not a device (cpu, cuda, cuda:1, ...)"),
    "base samples labels out of range": (["--model_path", "{sr}", "--base_samples",
                                          "{base_label_big}"],
                                         "base_label_big.npz: arr_1 holds label 1000, out of "
                                         "range: the model has 1000 classes (0-999)"),
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
    assert rc == 2, err
    assert err.startswith("adm-fast sample: error: ") and expected in err, err
    assert "Traceback" not in err
    assert not out_dir.exists()


def test_torchrun_two_ranks(ckpt, tmp_path, capsys, monkeypatch):
    """Two ranks share the missing batches (rank r takes every other one) and
    give the same file, byte for byte, as one process: batch b's seed depends
    on b alone. Here they continue a single process's interrupted run."""
    from adm_fast.sampling.shards import RunFolder

    paths, _ = ckpt
    flags = ["--model_path", paths["cond"], "--timestep_respacing", "3", "--batch_size", "2",
             "--num_samples", "7", "--seed", "3", "--device", "cpu", "--no-progress"]
    with monkeypatch.context() as m:
        real = RunFolder.write

        def write_one(self, b, images, labels):
            if self.finished():
                raise KeyboardInterrupt
            real(self, b, images, labels)
        m.setattr(RunFolder, "write", write_one)
        assert run(capsys, *flags, "--out", tmp_path / "dist")[0] == 130
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", "-m", "adm_fast.cli", "sample", *flags,
                           "--out", str(tmp_path / "dist")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert CLOSING.match(proc.stdout.strip().splitlines()[-1]), proc.stdout
    assert "resuming: 1 of 4 batches" in proc.stderr
    assert sorted(os.listdir(tmp_path / "dist")) == ["samples_7x8x8x3.npz", "samples_7x8x8x3.png"]
    rc, _, err = run(capsys, *flags, "--out", tmp_path / "one")
    assert rc == 0, err
    for name in ("samples_7x8x8x3.npz", "samples_7x8x8x3.png"):
        assert (tmp_path / "dist" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()


def test_stored_diffusion_flags(ckpt, tmp_path, capsys):
    """A checkpoint's "adm_fast.diffusion" metadata (as save_checkpoint will
    write it) sets the diffusion: flags given > stored > preset > defaults."""
    paths, models = ckpt
    stored = {"diffusion_steps": 100, "noise_schedule": "cosine", "timestep_respacing": "4",
              "learn_sigma": True}
    model_path = with_metadata(paths["cond"], tmp_path / "m.safetensors",
                               **{"adm_fast.diffusion": json.dumps(stored)})
    common = ["--model_path", model_path, "--num_samples", 2, "--batch_size", 2]

    def expect(out_dir, steps, schedule, respacing):
        d = adm_fast.create_gaussian_diffusion(steps=steps, learn_sigma=True,
                                               noise_schedule=schedule,
                                               timestep_respacing=respacing)
        want, labels, _ = sample_images(models["cond"], d, num_samples=2, batch_size=2, seed=0)
        got = npz(out_dir / "samples_2x8x8x3.npz")
        np.testing.assert_array_equal(got["arr_0"], want)
        np.testing.assert_array_equal(got["arr_1"], labels)

    for extra, want in (([], (100, "cosine", "4")),
                        (["--timestep_respacing", 3], (100, "cosine", "3")),
                        (["--diffusion_steps", 50, "--noise_schedule", "linear",
                          "--timestep_respacing", 2], (50, "linear", "2"))):
        out_dir = tmp_path / str(len(extra))
        rc, out, err = run(capsys, *common, *extra, "--out", out_dir)
        assert rc == 0, err
        assert CLOSING.match(out.strip().splitlines()[-1]).group(3) == want[2]
        expect(out_dir, *want)
    # without the key: guided-diffusion's defaults (1000 steps, linear)
    rc, out, err = run(capsys, "--model_path", paths["cond"], *common[2:],
                       "--timestep_respacing", 3, "--out", tmp_path / "plain")
    assert rc == 0, err
    expect(tmp_path / "plain", 1000, "linear", "3")


def test_classes_flag(ckpt, tmp_path, capsys):
    paths, _ = ckpt
    rc, out, err = run(capsys, "--model_path", paths["cond"], "--classes", "3,5-6,5",
                       "--timestep_respacing", 2, "--num_samples", 12, "--batch_size", 6,
                       "--out", tmp_path)
    assert rc == 0, err
    labels = npz(tmp_path / "samples_12x8x8x3.npz")["arr_1"]
    assert set(labels.tolist()) <= {3, 5, 6} and len(set(labels.tolist())) > 1


def test_parse_classes():
    from adm_fast.sampling.classes import parse_classes

    assert parse_classes("0,3,7") == [0, 3, 7]
    assert parse_classes("0-9") == list(range(10))
    assert parse_classes(" 7, 0-2 ,2,") == [0, 1, 2, 7]
    for bad in ("", ",", "a", "1-", "-1", "3-1", "1.5"):
        with pytest.raises(ValueError, match="class number or a range|no classes"):
            parse_classes(bad)


@pytest.mark.parametrize("size, zoom", [(8, 8), (16, 4), (24, 3), (64, 1), (128, 1), (2, 8)])
def test_grid_is_enlarged_to_a_readable_size(size, zoom):
    """Each tile is at least 64 px (nearest: whole pixel blocks), at most 8x."""
    from adm_fast.sampling.grid import image_grid

    rng = np.random.default_rng(size)
    images = rng.integers(0, 256, (5, size, size, 3), dtype=np.uint8)
    grid = image_grid(images)
    tile = size * zoom
    assert grid.shape == (2 * (tile + 2) + 2, 3 * (tile + 2) + 2, 3)  # 3 columns, 2 rows
    np.testing.assert_array_equal(grid[2:2 + tile, 2:2 + tile],
                                  images[0].repeat(zoom, 0).repeat(zoom, 1))
    r, c = 2 + tile + 2, 2 + tile + 2  # image 4: row 1, column 1
    np.testing.assert_array_equal(grid[r:r + tile, c:c + tile],
                                  images[4].repeat(zoom, 0).repeat(zoom, 1))


def test_png_of_16px_samples(ckpt, tmp_path):
    from PIL import Image

    from adm_fast.sampling.api import save_samples

    images = np.random.default_rng(0).integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)
    written = save_samples(images, None, str(tmp_path))
    with Image.open(written["png"]) as im:
        assert im.size == (4 * (64 + 2) + 2,) * 2  # was 4 * (16 + 2) + 2 = 74


def test_messages_never_land_inside_a_bar(ckpt, tmp_path, capsys, monkeypatch):
    """A warning raised while the bars are open starts a line of its own and
    ends it; the step bar leaves nothing behind."""
    import warnings

    from adm_fast.sampling import api as sampling_api

    real = sampling_api.to_uint8_nhwc

    def noisy(x):
        warnings.warn("probe warning from inside a batch", stacklevel=1)
        return real(x)

    monkeypatch.setattr(sampling_api, "to_uint8_nhwc", noisy)
    paths, _ = ckpt
    rc = cli.main(["sample", "--progress", "--device", "cpu", "--model_path", paths["cond"],
                   "--timestep_respacing", "2", "--num_samples", "4", "--batch_size", "2",
                   "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 0, err
    err = err.replace("\x1b[A", "")  # tqdm's cursor-up (to the first bar's line, after a \r)
    hits = [i for i in range(len(err)) if err.startswith(f"{__file__}:", i)]  # the warnings
    assert hits, err
    for i in hits:  # the message starts at the start of a line (or after tqdm's \r clear)
        assert i == 0 or err[i - 1] in "\r\n", repr(err[max(0, i - 80):i + 40])
        end = err.index("probe warning", i) + len("probe warning from inside a batch")
        assert err[end] == "\n"
    last = err.rstrip("\n").split("\n")[-1].split("\r")[-1]
    assert not last.strip().startswith("steps"), repr(err[-300:])


@pytest.mark.parametrize("flags", [["--timestep_respacing", "1"],
                                   ["--use_ddim", "True", "--timestep_respacing", "ddim1"]])
def test_single_step_respacing_reports_one_line(flags, ckpt, tmp_path, capsys):
    """Whatever the diffusion does with one step, the CLI never shows a traceback."""
    rc, out, err = run(capsys, "--model_path", ckpt[0]["cond"], *flags, "--num_samples", 1,
                       "--out", tmp_path)
    assert "Traceback" not in err
    if rc != 0:
        assert err.startswith("adm-fast sample: error: ") and err.count("\n") == 1, err


@pytest.mark.parametrize("flags, sampler", [(["--timestep_respacing", "1"], "ddpm"),
                                            (["--use_ddim", "True", "--timestep_respacing",
                                              "ddim1"], "ddim")])
def test_single_step_respacing_samples(flags, sampler, ckpt, tmp_path, capsys):
    rc, out, err = run(capsys, "--model_path", ckpt[0]["cond"], *flags, "--num_samples", 2,
                       "--batch_size", 2, "--out", tmp_path)
    assert rc == 0, err
    check_run(tmp_path, out, 2, 8, sampler, 1, labelled=True)
