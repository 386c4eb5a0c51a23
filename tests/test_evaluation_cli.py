"""`adm-fast evaluate` end to end on NPZs written by `adm-fast sample` (a tiny random
UNet) with torch-fidelity's InceptionV3 architecture on random weights.

One full evaluation runs here: its two 2048-d scipy sqrtm calls are most of this
file's time. Bad inputs are refused before the network or scipy is needed."""

import json

import numpy as np
import pytest
import torch

import adm_fast
from adm_fast import cli
from adm_fast.evaluation import Evaluator, inception_score, precision_recall, random_weights

TINY = dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2",
            attention_resolutions="4", learn_sigma=True, class_cond=False)


def evaluate(capsys, *args):
    rc = cli.main(["evaluate", "--no-progress", "--device", "cpu", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    model = adm_fast.create_model(**TINY)
    for p in model.parameters():  # zero-initialised output layers would sample noise only
        torch.nn.init.normal_(p, std=0.05)
    adm_fast.save_checkpoint(model.eval(), str(d / "unet.safetensors"))
    paths = {"weights": str(d / "inception.safetensors")}
    save_file(random_weights(0), paths["weights"])
    for name, seed in (("ref", 0), ("sample", 1)):
        rc = cli.main(["sample", "--no-progress", "--device", "cpu", "--model_path",
                       str(d / "unet.safetensors"), "--timestep_respacing", "2",
                       "--num_samples", "4", "--batch_size", "4", "--seed", str(seed),
                       "--out", str(d / name)])
        assert rc == 0
        paths[name] = str(d / name / "samples_4x8x8x3.npz")
    return d, paths


def test_evaluate_end_to_end(files, capsys):
    d, paths = files
    # A reference batch of the sample's own statistics (built with --save_stats)
    # beside the reference images: FID and sFID must come out ~0, which shows that
    # the file's statistics are used, while Precision and Recall use the images.
    stats = d / "sample_stats.npz"
    rc, out, err = evaluate(capsys, "--save_stats", stats, paths["sample"],
                            "--inception", paths["weights"])
    assert rc == 0, err
    assert out.strip() == f"wrote {stats}: 4 images with mu, sigma, mu_s, sigma_s"
    with np.load(stats) as f, np.load(paths["sample"]) as s:
        np.testing.assert_array_equal(f["arr_0"], s["arr_0"])
        saved = {k: f[k] for k in ("mu", "sigma", "mu_s", "sigma_s")}
    with np.load(paths["ref"]) as f:
        ref_images = f["arr_0"]
    ref = d / "ref_with_sample_stats.npz"
    np.savez(ref, ref_images, **saved)

    rc, out, err = evaluate(capsys, ref, paths["sample"], "--inception", paths["weights"],
                            "--json", d / "metrics.json", "--batch_size", 3)
    assert rc == 0, err
    lines = out.strip().splitlines()
    names = ["Inception Score", "FID", "sFID", "Precision", "Recall"]
    assert [ln.split(":")[0] for ln in lines] == names
    printed = {ln.split(":")[0]: float(ln.split(": ")[1]) for ln in lines}
    written = json.loads((d / "metrics.json").read_text())
    assert list(written) == names and written == printed

    # tr sqrtm(S S) = tr S in exact arithmetic; the ~2044 zero eigenvalues of a
    # rank-3 S S carry roundoff ~ eps |S|^2, whose square roots add ~1e-8 |S| each.
    for key, sigma in (("FID", saved["sigma"]), ("sFID", saved["sigma_s"])):
        assert abs(printed[key]) <= 1e-4 * np.trace(sigma), (key, printed[key])
    ev = Evaluator(paths["weights"], device="cpu")
    ref_pool, _ = ev.compute_activations(ref_images)
    sample_pool, _ = ev.read_activations(paths["sample"])
    assert (printed["Precision"], printed["Recall"]) == precision_recall(ref_pool, sample_pool)
    assert printed["Inception Score"] == pytest.approx(inception_score(ev.softmax(sample_pool)),
                                                       rel=1e-6)


def test_bad_inputs_are_one_line_errors(files, capsys, tmp_path):
    _, paths = files
    rng = np.random.default_rng(0)
    bad = {
        "float": (rng.random((2, 8, 8, 3)), "is float64: the evaluator takes uint8"),
        "nchw": (rng.integers(0, 256, (2, 3, 8, 8), dtype=np.uint8), "looks like NCHW"),
        "gray": (rng.integers(0, 256, (2, 8, 8, 1), dtype=np.uint8), "expected 3 channels"),
    }
    for name, (array, message) in bad.items():
        np.savez(tmp_path / f"{name}.npz", array)
        rc, out, err = evaluate(capsys, paths["ref"], tmp_path / f"{name}.npz")
        assert rc == 2 and out == "" and message in err, err
        assert err.count("\n") == 1 and err.startswith("adm-fast evaluate: error: ")
    np.savez(tmp_path / "none.npz", labels=np.arange(3))
    np.savez(tmp_path / "partial.npz", rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8),
             mu=np.zeros(2048))
    (tmp_path / "text.npz").write_text("hello")
    cases = [
        ([tmp_path / "none.npz", paths["sample"]], "holds neither images nor statistics"),
        ([paths["ref"], tmp_path / "partial.npz"], "has mu but not sigma, mu_s, sigma_s"),
        ([paths["ref"], tmp_path / "text.npz"], "is not an NPZ file"),
        ([paths["ref"], tmp_path / "missing.npz"], "missing.npz: no such file"),
        ([paths["ref"]], "expected REF_BATCH and SAMPLE_BATCH, got 1"),
        ([paths["ref"], paths["sample"], "--inception", tmp_path / "w.pth"],
         "w.pth: no such file (the weights are https://github.com/toshas/torch-fidelity/"),
        ([paths["ref"], paths["sample"], "--inception", tmp_path / "text.npz"],
         f"--inception {tmp_path / 'text.npz'} is not a readable PyTorch checkpoint: it is "
         "text (it starts with 'hello'), not a torch.save zip archive or pickle"),
        ([paths["ref"], paths["sample"], "--batch_size", 0], "--batch_size must be a positive"),
        ([paths["ref"], paths["sample"], "--json", tmp_path / "no" / "m.json"],
         "no such folder for the output"),
        ([paths["ref"], paths["sample"], "--dtype", "fp16"], "invalid choice: 'fp16'"),
        ([paths["ref"], paths["sample"], "--jso", "m.json"], "unrecognized arguments: --jso"),
        ([paths["ref"], "--save_stats", tmp_path / "s.npz", "--image_size", 8],
         "--image_size resizes the images of a folder"),
        ([paths["ref"], paths["sample"], "--save_stats", tmp_path / "s.npz"],
         "--save_stats takes one SOURCE"),
    ]
    for args, message in cases:
        rc, out, err = evaluate(capsys, *args, "--inception", paths["weights"]) \
            if "--inception" not in args else evaluate(capsys, *args)
        assert rc == 2 and message in err, (args, err)
        assert err.count("\n") == 1, err


def test_missing_default_weights_say_what_to_get(files, capsys, monkeypatch, tmp_path):
    _, paths = files
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    rc, _, err = evaluate(capsys, paths["ref"], paths["sample"])
    assert rc == 2 and err.count("\n") == 1
    assert ("download https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
            f"weights-inception-2015-12-05-6726825d.pth to {tmp_path}/hub/checkpoints/") in err
    assert "or pass --inception PATH" in err


def test_different_image_sizes_are_resized_by_the_network(files, capsys, tmp_path):
    from adm_fast.evaluation import cli as evaluate_cli

    _, paths = files
    big = tmp_path / "big.npz"
    np.savez(big, np.random.default_rng(1).integers(0, 256, (2, 12, 20, 3), dtype=np.uint8))
    evaluate_cli._sizes_note(paths["ref"], str(big))
    err = capsys.readouterr().err
    assert "the reference images are 8x8 and the samples 20x12; the network resizes both" in err
    evaluate_cli._sizes_note(paths["ref"], paths["sample"])
    assert capsys.readouterr().err == ""
