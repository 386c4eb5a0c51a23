"""adm-fast demo: the reduced run end to end, the shipped weights and held-out
digits, the metrics, the training commands, and the errors (exit 2)."""

from __future__ import annotations

import json
import os
import re
import sys

import numpy as np
import pytest
import torch

from adm_fast.checkpoint import read_state_dict
from adm_fast.demo import cli, digits, experiment, train
from adm_fast.models import EncoderUNetModel, UNetModel

COLUMNS = ["scale", "fidelity", "diversity", "images/s adm_fast", "images/s eager"]
REDUCED = ["--num_samples", "20", "--steps", "5", "--eager_steps", "2"]


@pytest.fixture(scope="module")
def models():
    return experiment.load_models()


def _table_rows(out: str):
    lines = out.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("scale"))
    rows = []
    for ln in lines[head + 1:]:
        if not ln.strip():
            break
        rows.append(ln.split())
    return lines[head], rows


def test_reduced_demo(tmp_path, capsys):
    out_dir = tmp_path / "demo"
    assert cli.main(["--out", str(out_dir), *REDUCED]) == 0
    out = capsys.readouterr().out
    header, rows = _table_rows(out)
    for col in COLUMNS:
        assert col in header
    assert [r[0] for r in rows] == ["0", "1", "3", "10"]
    for r in rows:
        fid, div, fast, eager = map(float, r[1:5])
        assert 0.0 <= fid <= 1.0 and div > 0 and fast > 0 and eager > 0
    # The trade-off, even at this size: over seeds 0-2 fidelity went from
    # <= 0.10 to >= 0.85 and diversity roughly halved, far from these bounds.
    fid0, div0 = map(float, rows[0][1:3])
    fid10, div10 = map(float, rows[-1][1:3])
    assert fid10 - fid0 >= 0.4 and div10 < 0.8 * div0
    assert "real held-out digits" in out
    for name in ("scale_0.png", "scale_1.png", "scale_3.png", "scale_10.png"):
        from PIL import Image
        with Image.open(out_dir / name) as im:  # 10 rows of 16px digits zoomed 4x, labelled
            width, height = im.size
            assert height == 10 * (64 + 2) + 2
            assert 2 * (64 + 2) + 2 < width < 2 * (64 + 2) + 2 + 64
    results = json.loads((out_dir / "results.json").read_text())
    assert [r["scale"] for r in results["rows"]] == [0, 1, 3, 10]
    assert results["num_samples"] == 20 and results["steps"] == 5


@pytest.mark.parametrize("extra", [[], ["--train"]])
def test_a_finished_demo_is_kept_unless_overwrite(extra, tmp_path, capsys, monkeypatch):
    """Refused before anything is trained or sampled; --overwrite runs again."""
    out_dir = tmp_path / "demo"
    out_dir.mkdir()
    (out_dir / "results.json").write_text('{"rows": []}\n')
    (out_dir / "scale_0.png").write_bytes(b"a grid")
    monkeypatch.setattr(experiment, "load_models", _never)
    monkeypatch.setattr(train, "train_all", _never)
    assert cli.main(["--out", str(out_dir), *extra, *REDUCED]) == 2
    err = capsys.readouterr().err
    assert err == (f"adm-fast demo: error: --out {out_dir} holds a finished demo "
                   f"({out_dir}/results.json): pass --overwrite to run it again there, or "
                   "choose another --out\n")
    assert sorted(os.listdir(out_dir)) == ["results.json", "scale_0.png"]
    assert (out_dir / "results.json").read_text() == '{"rows": []}\n'
    with pytest.raises(AssertionError, match="started"):  # --overwrite goes on to the work
        cli.main(["--out", str(out_dir), "--overwrite", *extra, *REDUCED])


def _never(*args, **kwargs):
    raise AssertionError("started")


def test_same_seed_same_samples_and_guidance_changes_them(models):
    diffusion = experiment.make_diffusion(4)
    y = experiment.demo_labels(10)
    a = experiment.sample(models, diffusion, 0.0, y, 10, seed=3)[0]
    b = experiment.sample(models, diffusion, 0.0, y, 10, seed=3)[0]
    c = experiment.sample(models, diffusion, 10.0, y, 10, seed=3)[0]
    d = experiment.sample(models, diffusion, 0.0, y, 10, seed=4)[0]
    assert a.shape == (10, 16, 16, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    for other in (c, d):
        assert np.abs(a.astype(int) - other.astype(int)).mean() > 1.0


def test_shipped_weights_layout():
    total = 0
    for part in experiment.PARTS:
        path = os.path.join(experiment.WEIGHTS_DIR, f"{part}.safetensors")
        total += os.path.getsize(path)
        sd, meta = read_state_dict(path)
        assert meta["adm_fast.class"] == ("UNetModel" if part == "diffusion"
                                          else "EncoderUNetModel")
        assert {v.dtype for v in sd.values() if v.is_floating_point()} == {torch.float16}
    assert total <= 20 * 2 ** 20
    m = experiment.load_models()
    unet, clf, clean = m["diffusion"], m["classifier"], m["clean"]
    assert isinstance(unet, UNetModel) and unet.num_classes is None
    assert unet.image_size == 16 and unet.out_channels == 6  # learned sigmas
    assert isinstance(clf, EncoderUNetModel) and clf.pool == "attention"
    assert isinstance(clean, EncoderUNetModel) and clean.pool == "attention"
    assert clf.out_channels == clean.out_channels == 1000
    # The judge is not the guide: another width and no attention in its trunk.
    assert clean.config["model_channels"] != clf.config["model_channels"]
    assert not clean.config["attention_resolutions"] and clf.config["attention_resolutions"]
    assert all(p.dtype == torch.float32 for p in unet.parameters())


def test_shipped_files_say_what_they_were_trained_with():
    """Each file carries the diffusion flags its training command used and the
    digits' names, as adm_fast's trainer writes them, under a checksum."""
    from adm_fast.checkpoint import read_class_names, read_diffusion_flags, read_metadata

    for part in experiment.PARTS:
        path = os.path.join(experiment.WEIGHTS_DIR, f"{part}.safetensors")
        diffusion, classes = train.trained_with(part)
        assert read_diffusion_flags(path) == diffusion
        assert read_class_names(path) == classes == [str(d) for d in range(10)]
        meta = read_metadata(path)  # verifies adm_fast.metadata_sha256
        assert "adm_fast.sha256" in meta  # read_state_dict verifies it
        assert "adm_fast.metadata_sha256" in meta  # an edited header is refused
    cosine = {"noise_schedule": "cosine", "learn_sigma": True, "diffusion_steps": 1000}
    for part in ("diffusion", "classifier"):  # guidance needs both on one schedule
        assert cosine.items() <= train.trained_with(part)[0].items()


def _sample_shipped(tmp_path, capsys, classifier, *flags):
    from adm_fast import cli as adm_cli

    out = tmp_path / "samples"
    rc = adm_cli.main(["sample", "--no-progress", "--device", "cpu", "--model_path",
                       os.path.join(experiment.WEIGHTS_DIR, "diffusion.safetensors"),
                       "--classifier_path", classifier, "--out", str(out), *flags])
    _, err = capsys.readouterr()
    assert rc == 0, err
    with np.load(out / f"samples_{flags[flags.index('--num_samples') + 1]}x16x16x3.npz") as f:
        return f["arr_0"], f["arr_1"], err


def test_sample_cli_on_shipped_weights_gives_digits(tmp_path, capsys, models):
    """`adm-fast sample` with no flags but the files, the scale and the demo's
    size: the cosine schedule and labels among the 10 digits come from the
    files. The judge read 19 of 20 as asked (0.95; 0.90 at 30 steps); with the
    files as they were before they said so (labels from 1000, linear schedule),
    none (0.0)."""
    from adm_fast.sampling.cli import _parse
    from adm_fast.sampling.job import prepare

    classifier = os.path.join(experiment.WEIGHTS_DIR, "classifier.safetensors")
    flags = ["--classifier_scale", "3", "--num_samples", "20", "--batch_size", "20",
             "--timestep_respacing", "20"]
    images, labels, err = _sample_shipped(tmp_path, capsys, classifier, *flags)
    assert "warning" not in err
    args, explicit = _parse(["--model_path", os.path.join(experiment.WEIGHTS_DIR,
                                                          "diffusion.safetensors"),
                             "--classifier_path", classifier, *flags])
    job = prepare(args, explicit, torch.device("cpu"), 1)
    np.testing.assert_array_equal(job.diffusion.betas, experiment.make_diffusion(20).betas)
    assert labels.min() >= 0 and labels.max() <= 9
    preds, _ = experiment.judge(models["clean"], images)
    assert experiment.fidelity(preds, labels) >= 0.6


def test_sample_cli_warns_of_a_classifier_that_names_no_classes(tmp_path, capsys, models):
    bare = models["classifier"]
    names, bare.class_names = bare.class_names, None
    try:
        from adm_fast.checkpoint import save_checkpoint

        path = str(tmp_path / "bare.safetensors")
        save_checkpoint(bare, path)
    finally:
        bare.class_names = names
    _, labels, err = _sample_shipped(tmp_path, capsys, path, "--classifier_scale", "3",
                                     "--num_samples", "2", "--timestep_respacing", "1")
    lines = [ln for ln in err.splitlines() if "warning" in ln]
    assert len(lines) == 1, err
    assert "1000 labels" in lines[0] and "trained on 10 classes" in lines[0]
    assert "--classes 0-9" in lines[0] and path in lines[0]


def test_heldout_digits_and_clean_classifier(models):
    images8, labels = digits.load_heldout()
    assert images8.shape == (digits.HELDOUT, 8, 8) and images8.max() <= 16
    assert sorted(set(labels.tolist())) == list(range(10))
    preds, feats = experiment.judge(models["clean"], digits.upsample(images8))
    assert experiment.fidelity(preds, labels) >= 0.9
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=1e-5)


def test_noisy_classifier_reads_lightly_noised_digits(models):
    images8, labels = digits.load_heldout()
    x = digits.to_model_input(digits.upsample(images8))
    diffusion = experiment.make_diffusion(1000)
    torch.manual_seed(0)
    t = torch.full((len(x),), 50, dtype=torch.long)
    with torch.no_grad():
        logits = models["classifier"](diffusion.q_sample(x, t), t)
    acc = (logits[:, :10].argmax(1).numpy() == labels).mean()
    assert acc >= 0.8


def test_heldout_file_is_the_split():
    pytest.importorskip("sklearn")
    _, (held_x, held_y) = digits.load_split()
    images8, labels = digits.load_heldout()
    np.testing.assert_array_equal(images8, held_x)
    np.testing.assert_array_equal(labels, held_y)


def test_grid_is_enlarged_and_rows_labelled(tmp_path):
    """16x16 digits are shown at 64 px (nearest: each pixel a 4x4 block), one row
    per digit, and a margin on the left names each row's digit."""
    from PIL import Image

    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (23, 16, 16, 3), dtype=np.uint8)
    labels = experiment.demo_labels(23).numpy()
    tiles = experiment.grid(images, labels)
    assert tiles.shape == (10 * (64 + 2) + 2, 3 * (64 + 2) + 2, 3)
    np.testing.assert_array_equal(tiles[2:66, 2:66], images[0].repeat(4, 0).repeat(4, 1))
    third_of_3 = 2 + 3 * 66, 2 + 2 * 66  # row 3 (digit 3), column 2: sample 23 is absent
    assert (tiles[third_of_3[0]:third_of_3[0] + 64, third_of_3[1]:third_of_3[1] + 64]
            == experiment.GRID_FILL).all()
    np.testing.assert_array_equal(tiles[2 + 66:2 + 66 + 64, 2 + 66:2 + 66 + 64],
                                  images[11].repeat(4, 0).repeat(4, 1))
    path = experiment.save_grid(images, labels, str(tmp_path / "g.png"))
    with Image.open(path) as im:
        saved = np.asarray(im.convert("RGB"))
    margin = saved.shape[1] - tiles.shape[1]
    assert saved.shape[0] == tiles.shape[0] and 8 <= margin <= 64
    np.testing.assert_array_equal(saved[:, margin:], tiles)
    cells = [saved[2 + r * 66:2 + r * 66 + 64, :margin] for r in range(10)]
    for cell in cells:  # white text on the grey margin, in every row
        assert (cell > 200).any() and (cell == experiment.GRID_FILL).mean() > 0.5
    assert len({c.tobytes() for c in cells}) == 10  # ten different labels


def test_metrics():
    labels = np.array([0, 0, 1, 1, 2])
    same = np.tile(np.array([[1.0, 0.0]]), (5, 1))
    assert experiment.diversity(same, labels) == 0.0
    apart = np.array([[1.0, 0], [-1.0, 0], [0, 1.0], [0, 1.0], [1.0, 0]])
    assert experiment.diversity(apart, labels) == pytest.approx(1.0)  # (2 + 0) / 2
    assert experiment.fidelity(np.array([0, 1, 1, 1, 0]), labels) == pytest.approx(0.6)
    assert experiment.demo_labels(12).tolist() == list(range(10)) + [0, 1]


def test_training_commands_parse():
    from adm_fast.train.cli import parse

    lines = train.shell_lines("ROOT")
    assert len(lines) == 3 and all(ln.startswith("adm-fast train") for ln in lines)
    for part in train.PARTS:
        argv = train.command(part, "ROOT")
        kind = "diffusion" if argv[0] == "train" else "classifier"
        flags = parse(kind, argv[1:])
        assert flags["image_size"] == digits.IMAGE_SIZE and flags["random_flip"] is False
        assert flags["max_steps"] > 0
    assert parse("classifier", train.command("clean", "R")[1:])["noised"] is False


@pytest.mark.parametrize("argv, message", [
    (["--scales", "-1"], "scales must be finite and >= 0"),
    (["--scales", "1,x"], "comma list of numbers"),
    (["--num_samples", "0"], "must be at least 20"),
    (["--steps", "0"], "must be at least 1"),
    (["--batch_size", "two"], "expected an integer"),
    (["--bogus"], "unrecognized arguments"),
    (["--num_sam", "20"], "unrecognized arguments: --num_sam"),  # no abbreviations
])
def test_bad_arguments_exit_2(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("adm-fast demo: error:") and message in err


def test_missing_weights_exit_2(tmp_path, capsys):
    assert cli.main(["--weights", str(tmp_path), "--out", str(tmp_path / "o"), *REDUCED]) == 2
    err = capsys.readouterr().err
    assert re.match(r"adm-fast demo: error: missing .*diffusion\.safetensors", err)


def test_train_without_sklearn_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    assert cli.main(["--train", "--out", str(tmp_path)]) == 2
    assert "pip install scikit-learn" in capsys.readouterr().err


def test_train_refuses_to_overwrite_shipped_weights(capsys):
    package = os.path.dirname(experiment.WEIGHTS_DIR)
    assert cli.main(["--train", "--out", package]) == 2
    assert "overwrite the shipped weights" in capsys.readouterr().err


def test_train_end_to_end_tiny(tmp_path, monkeypatch, capsys):
    """--train's whole path (data folders, the three adm_fast trainings, fp16
    export, sampling with the new weights) at 2 steps per training."""
    pytest.importorskip("sklearn")
    for part, argv in list(train.COMMANDS.items()):
        argv = list(argv)
        argv[argv.index("--max_steps") + 1] = "2"
        monkeypatch.setitem(train.COMMANDS, part, argv)
    out = tmp_path / "run"
    assert cli.main(["--train", "--out", str(out), "--num_samples", "20", "--steps", "2",
                     "--eager_steps", "1", "--scales", "0,3"]) == 0
    assert len(list((out / "data" / "train").glob("*.png"))) == 1797 - digits.HELDOUT
    for part in train.PARTS:
        sd, _ = read_state_dict(out / "weights" / f"{part}.safetensors")
        assert all(v.dtype == torch.float16 for v in sd.values() if v.is_floating_point())
    results = json.loads((out / "results.json").read_text())
    assert results["weights"] == str(out / "weights") and len(results["rows"]) == 2
    assert "weights: shipped" not in capsys.readouterr().out
