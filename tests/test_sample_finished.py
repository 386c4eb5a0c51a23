"""A finished `adm-fast sample` result is never lost or redone: the same
command again says it is done (without sampling), another one that would
write the same file is refused unless --overwrite, a second process is
refused while one samples into the folder, a run that finished no batch
blocks nothing, and no flag makes memory grow with --num_samples.
Also the Python API's side of it (save_samples, iter_batches)."""

import json
import math
import os
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from sample_helpers import make_checkpoints, npz, run, stop_after

import adm_fast
from adm_fast import io
from adm_fast.diffusion import NonFiniteSampleError
from adm_fast.sampling import cli as sample_cli
from adm_fast.sampling import shards
from adm_fast.sampling.api import iter_batches, sample_images, save_samples

NAME = "samples_5x8x8x3"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoints(tmp_path_factory.mktemp("ckpt"))


def flags(ckpt, *extra, seed=9, model="cond"):
    return ["--model_path", ckpt[0][model], "--timestep_respacing", 2, "--num_samples", 5,
            "--batch_size", 2, "--seed", seed, *extra]


def _never(*args, **kwargs):
    raise AssertionError("sampling started")


def _listing(out):
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))


def _one_error_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("adm-fast sample: error: "), err
    assert "Traceback" not in err
    return lines[0]


# --- D1: a finished file is kept -----------------------------------------------------

def test_another_run_never_replaces_a_finished_file(ckpt, tmp_path, capsys, monkeypatch):
    """The issue's repro: the same N and size from another model and seed, or
    another --classifier_scale, would write the same samples_5x8x8x3.npz."""
    rc, _, err = run(capsys, *flags(ckpt), "--out", tmp_path)
    assert rc == 0, err
    before = {p: (tmp_path / p).read_bytes() for p in _listing(tmp_path)}
    assert sorted(before) == [f"{NAME}.npz", f"{NAME}.png"]
    with zipfile.ZipFile(tmp_path / f"{NAME}.npz") as zf:  # the run it records
        assert json.loads(zf.comment)["run"]["args"]["seed"] == 9
    assert list(npz(tmp_path / f"{NAME}.npz")) == ["arr_0", "arr_1"]  # np.load sees no more
    with monkeypatch.context() as m:
        m.setattr(sample_cli, "iter_batches", _never)
        for argv, diff in ((flags(ckpt, model="uncond", seed=10),
                            "the --model_path file's sha256"),
                           (flags(ckpt, seed=10), "--seed: 9 there, 10 here"),
                           (flags(ckpt, "--classifier_path", ckpt[0]["clf"],
                                  "--classifier_scale", 3), "--classifier_scale")):
            rc, out, err = run(capsys, *argv, "--out", tmp_path)
            line = _one_error_line(err)
            assert rc == 2 and not out
            assert f"{tmp_path}/{NAME}.npz holds the finished samples of a run with other " \
                "arguments" in line and diff in line, line
            assert "pass --overwrite to replace it, or choose another --out" in line
            assert {p: (tmp_path / p).read_bytes() for p in _listing(tmp_path)} == before
    # --overwrite replaces it with what that run gives in an empty folder
    rc, _, err = run(capsys, *flags(ckpt, seed=10), "--overwrite", "--out", tmp_path)
    assert rc == 0, err
    rc, _, err = run(capsys, *flags(ckpt, seed=10), "--out", tmp_path / "fresh")
    assert rc == 0, err
    assert sorted(os.listdir(tmp_path)) == ["fresh", f"{NAME}.npz", f"{NAME}.png"]
    for ext in ("npz", "png"):
        assert (tmp_path / f"{NAME}.{ext}").read_bytes() == \
            (tmp_path / "fresh" / f"{NAME}.{ext}").read_bytes()
    assert (tmp_path / f"{NAME}.npz").read_bytes() != before[f"{NAME}.npz"]


def test_default_out_is_protected_too(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # --out defaults to .
    assert run(capsys, *flags(ckpt))[0] == 0
    data = (tmp_path / f"{NAME}.npz").read_bytes()
    rc, _, err = run(capsys, *flags(ckpt, model="uncond"))
    assert rc == 2 and f"./{NAME}.npz holds the finished samples" in _one_error_line(err)
    assert (tmp_path / f"{NAME}.npz").read_bytes() == data


def test_a_file_from_another_program_is_kept(ckpt, tmp_path, capsys, monkeypatch):
    foreign = tmp_path / f"{NAME}.npz"
    np.savez(foreign, np.zeros((5, 8, 8, 3), np.uint8))
    data = foreign.read_bytes()
    monkeypatch.setattr(sample_cli, "iter_batches", _never)
    rc, _, err = run(capsys, *flags(ckpt), "--out", tmp_path)
    line = _one_error_line(err)
    assert rc == 2 and "records no arguments" in line and "--overwrite" in line, line
    foreign.write_bytes(b"not a zip")
    rc, _, err = run(capsys, *flags(ckpt), "--out", tmp_path)
    assert rc == 2 and "is not a readable .npz" in _one_error_line(err)
    assert sorted(os.listdir(tmp_path)) == [f"{NAME}.npz"]
    foreign.write_bytes(data)
    monkeypatch.undo()
    rc, _, err = run(capsys, *flags(ckpt), "--overwrite", "--out", tmp_path)
    assert rc == 0, err
    assert npz(foreign)["arr_0"].std() > 5


def test_save_samples_keeps_a_file_unless_overwrite(tmp_path):
    rng = np.random.default_rng(2)
    first = rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    second = rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    written = save_samples(first, None, str(tmp_path))
    data = Path(written["npz"]).read_bytes()
    with pytest.raises(io.OutputExists, match="is already there: pass overwrite=True"):
        save_samples(second, None, str(tmp_path))
    assert Path(written["npz"]).read_bytes() == data
    assert sorted(os.listdir(tmp_path)) == ["samples_3x4x4x3.npz", "samples_3x4x4x3.png"]
    save_samples(second, None, str(tmp_path), overwrite=True)
    np.testing.assert_array_equal(npz(written["npz"])["arr_0"], second)


def test_no_clobber_write_keeps_a_file_that_appears_meanwhile(tmp_path):
    target = tmp_path / "x.npz"

    def write(f):
        target.write_bytes(b"another writer's")  # appears while this one writes
        f.write(b"mine")

    with pytest.raises(io.OutputExists):
        io.atomic_write(str(target), write, replace=False)
    assert target.read_bytes() == b"another writer's"
    assert os.listdir(tmp_path) == ["x.npz"]


# --- W1: the same command again is done at once ------------------------------------------

def test_same_command_again_says_it_is_done(ckpt, tmp_path, capsys, monkeypatch):
    rc, _, err = run(capsys, *flags(ckpt), "--out", tmp_path)
    assert rc == 0, err
    before = {p: (tmp_path / p).read_bytes() for p in _listing(tmp_path)}
    monkeypatch.setattr(sample_cli, "iter_batches", _never)
    rc, out, err = run(capsys, *flags(ckpt), "--out", tmp_path)
    assert rc == 0, err
    assert out == (f"{tmp_path}/{NAME}.npz holds this run's 5 samples already (the same "
                   "arguments): nothing to sample; --overwrite samples them again\n")
    assert {p: (tmp_path / p).read_bytes() for p in _listing(tmp_path)} == before


def test_killed_between_the_npz_and_exit_is_finished_without_sampling(ckpt, tmp_path, capsys,
                                                                      monkeypatch):
    """Stopped after the .npz, before its .png and the removal of the batches:
    the rerun writes the .png from the .npz and removes the folder, no sampling."""
    rc, _, err = run(capsys, *flags(ckpt), "--out", tmp_path / "ref")
    assert rc == 0, err

    def stop(images, path):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(sample_cli, "write_png", stop)
        rc, _, err = run(capsys, *flags(ckpt), "--out", tmp_path / "run")
    assert rc == 130, err
    out_dir = tmp_path / "run"
    assert f"{NAME}.png" not in os.listdir(out_dir) and (out_dir / f"{NAME}.parts").is_dir()
    monkeypatch.setattr(sample_cli, "iter_batches", _never)
    rc, out, err = run(capsys, *flags(ckpt), "--out", out_dir)
    assert rc == 0, err
    assert "nothing to sample" in out and "sampled" not in out
    assert f"wrote {out_dir}/{NAME}.png, which a killed run left unwritten" in err
    assert f"removed {out_dir}/{NAME}.parts, which a killed run left behind" in err
    assert sorted(os.listdir(out_dir)) == [f"{NAME}.npz", f"{NAME}.png"]
    for ext in ("npz", "png"):
        assert (out_dir / f"{NAME}.{ext}").read_bytes() == \
            (tmp_path / "ref" / f"{NAME}.{ext}").read_bytes()


# --- U5: one process at a time ---------------------------------------------------------

def test_a_second_process_is_refused_while_one_samples(ckpt, tmp_path, capsys, monkeypatch):
    fcntl = pytest.importorskip("fcntl")
    rc, _, err = run(capsys, *flags(ckpt), "--out", tmp_path / "ref")
    assert rc == 0, err
    with monkeypatch.context() as m:
        stop_after(m, 1, KeyboardInterrupt())
        assert run(capsys, *flags(ckpt), "--out", tmp_path)[0] == 130
    parts = tmp_path / f"{NAME}.parts"
    before = _listing(tmp_path)
    fd = os.open(parts, os.O_RDONLY)  # what a running process holds
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with monkeypatch.context() as m:
            m.setattr(sample_cli, "iter_batches", _never)
            rc, out, err = run(capsys, *flags(ckpt), "--out", tmp_path)
        line = _one_error_line(err)
        assert rc == 2 and not out
        assert f"another process is sampling into {parts} now: wait for it to finish " \
            f"(it writes {tmp_path}/{NAME}.npz), or choose another --out" in line, line
        assert _listing(tmp_path) == before
    finally:
        os.close(fd)
    rc, _, err = run(capsys, *flags(ckpt), "--out", tmp_path)  # the lock went with it
    assert rc == 0 and "resuming: 1 of 3 batches" in err, err
    for ext in ("npz", "png"):
        assert (tmp_path / f"{NAME}.{ext}").read_bytes() == \
            (tmp_path / "ref" / f"{NAME}.{ext}").read_bytes()


# --- a run that finished no batch blocks nothing ------------------------------------------

def test_a_run_that_failed_before_its_first_batch_is_taken_over(ckpt, tmp_path, capsys,
                                                               monkeypatch):
    def fail(self, b, images, labels):
        raise NonFiniteSampleError("the sample became non-finite at step 1")

    with monkeypatch.context() as m:
        m.setattr(shards.RunFolder, "write", fail)
        rc, _, err = run(capsys, *flags(ckpt), "--out", tmp_path)
    assert rc == 1, err
    assert os.listdir(tmp_path / f"{NAME}.parts") == ["manifest.json"]
    rc, _, err = run(capsys, *flags(ckpt, seed=4), "--out", tmp_path)
    assert rc == 0, err
    assert "held a run with other arguments that finished no batch: started this one" in err
    assert sorted(os.listdir(tmp_path)) == [f"{NAME}.npz", f"{NAME}.png"]


# --- R1: nothing sized by --num_samples ------------------------------------------------------

def test_a_million_batches_are_never_listed(ckpt, tmp_path, capsys, monkeypatch):
    """--num_samples 1000000 --batch_size 1, stopped at its second batch: the
    Python objects allocated stay far below one per batch (a list and a set of
    a million indices took over 70 MB)."""
    calls = stop_after(monkeypatch, 1, KeyboardInterrupt())
    tracemalloc.start()
    try:
        rc, _, err = run(capsys, "--model_path", ckpt[0]["uncond"], "--timestep_respacing", 1,
                         "--num_samples", 1_000_000, "--batch_size", 1, "--out", tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rc == 130 and "1 of 1000000 batches is finished" in err, err
    assert calls == [0, 1]
    assert peak < 16 << 20, f"{peak / 2**20:.1f} MiB"


def test_iter_batches_takes_batches_one_at_a_time(ckpt):
    model = ckpt[1]["uncond"]
    d = adm_fast.create_gaussian_diffusion(steps=1000, learn_sigma=True, timestep_respacing="1")
    b, images, _ = next(iter_batches(model, d, num_samples=10 ** 12, batch_size=1, seed=0))
    assert b == 0 and images.shape == (1, 8, 8, 3)
    last = next(iter_batches(model, d, num_samples=10 ** 12, batch_size=1, seed=0,
                             batches=iter([10 ** 12 - 1])))
    assert last[0] == 10 ** 12 - 1
    with pytest.raises(ValueError, match="batch index 7 is not in 0..4"):
        next(iter_batches(model, d, num_samples=5, batch_size=1, batches=iter([7])))
    with pytest.raises(ValueError, match="batch_size 65537 is over the limit of 65536"):
        iter_batches(model, d, num_samples=1, batch_size=65537)


@pytest.mark.parametrize("option, value", [("eta", math.nan), ("eta", math.inf),
                                           ("cfg_scale", math.nan),
                                           ("classifier_scale", -math.inf)])
def test_sample_images_refuses_non_finite_options(ckpt, option, value):
    _, models = ckpt
    d = adm_fast.create_gaussian_diffusion(steps=1000, learn_sigma=True, timestep_respacing="2")
    kw = dict(sampler="ddim") if option == "eta" else dict(classifier=models["clf"]) \
        if option == "classifier_scale" else {}
    model = models["cfg"] if option == "cfg_scale" else models["cond"]
    with pytest.raises(ValueError, match=f"{option} must be a finite number"):
        sample_images(model, d, num_samples=1, batch_size=1, **{option: value}, **kw)


def test_sample_images_refuses_super_resolution_labels_out_of_range(ckpt):
    _, models = ckpt
    d = adm_fast.create_gaussian_diffusion(steps=1000, learn_sigma=True, timestep_respacing="1")
    low = np.zeros((2, 32, 32, 3), np.uint8)
    for labels, bad in (([3, 1000], 1000), ([-1, 3], -1)):
        with pytest.raises(ValueError, match=f"low_res_labels holds label {bad}, out of range: "
                           r"the model has 1000 classes \(0-999\)"):
            sample_images(models["sr"], d, num_samples=1, batch_size=1, low_res=low,
                          low_res_labels=np.array(labels))
