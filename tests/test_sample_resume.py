"""`adm-fast sample` loses nothing: --out is checked before sampling, each
batch is kept as it finishes, a rerun continues (and gives the same bytes),
a rerun with other arguments is refused, a full disk says so."""

import errno
import json
import os

import numpy as np
import pytest
import torch
from sample_helpers import CLOSING, make_checkpoints, npz, run, stop_after

from adm_fast import io, load_checkpoint, save_checkpoint
from adm_fast.sampling import cli as sample_cli
from adm_fast.sampling import shards
from adm_fast.sampling.npz import write_npz

NAME = "samples_5x8x8x3"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoints(tmp_path_factory.mktemp("ckpt"))


def flags(ckpt, *extra, seed=9, model="cond"):
    path = ckpt[0].get(model, model)
    return ["--model_path", path, "--timestep_respacing", 2, "--num_samples", 5,
            "--batch_size", 2, "--seed", seed, *extra]


@pytest.fixture(scope="module")
def reference(ckpt, tmp_path_factory):
    """The bytes of an uninterrupted run."""
    out = tmp_path_factory.mktemp("reference")
    capsys = _Capture()
    rc, _, err = run(capsys, *flags(ckpt), "--out", out)
    assert rc == 0, err
    return {ext: (out / f"{NAME}.{ext}").read_bytes() for ext in ("npz", "png")}


class _Capture:
    """capsys for a module-scoped fixture: the output is not needed."""

    def readouterr(self):
        return "", ""


def same_as_reference(out, reference):
    assert sorted(os.listdir(out)) == [f"{NAME}.npz", f"{NAME}.png"]  # nothing left over
    for ext, data in reference.items():
        assert (out / f"{NAME}.{ext}").read_bytes() == data, ext


def test_interrupted_run_resumes_to_the_same_bytes(ckpt, reference, tmp_path, capsys,
                                                   monkeypatch):
    with monkeypatch.context() as m:
        stop_after(m, 2, KeyboardInterrupt())
        rc, _, err = run(capsys, *flags(ckpt), "--out", tmp_path)
    assert rc == 130
    assert f"interrupted; 2 of 3 batches are finished, kept in {tmp_path}/{NAME}.parts" in err
    parts = tmp_path / f"{NAME}.parts"
    assert sorted(os.listdir(parts)) == ["batch_000000.npz", "batch_000001.npz", "manifest.json"]
    manifest = json.loads((parts / "manifest.json").read_text())
    run_ = manifest["run"]
    assert run_["args"]["seed"] == 9 and run_["args"]["batch_size"] == 2
    assert run_["files"]["model_path"]["size"] == os.path.getsize(ckpt[0]["cond"])
    assert manifest["info"]["world_size"] == 1
    rc, out, err = run(capsys, *flags(ckpt), "--out", tmp_path)
    assert rc == 0, err
    assert "resuming: 2 of 3 batches were finished" in err
    assert "resumed: 4 of 5 images were sampled before" in out
    m = CLOSING.match(out.strip().splitlines()[-1])
    assert m and m.group(1) == "1", out
    same_as_reference(tmp_path, reference)


def test_other_arguments_are_refused(ckpt, tmp_path, capsys, monkeypatch):
    with monkeypatch.context() as m:
        stop_after(m, 1, KeyboardInterrupt())
        rc, _, err = run(capsys, *flags(ckpt), "--out", tmp_path)
    assert rc == 130 and "interrupted; 1 of 3 batches is finished, kept in" in err, err
    before = sorted(os.listdir(tmp_path / f"{NAME}.parts"))
    other_model = tmp_path / "other.safetensors"  # the same layout, one weight changed
    model = load_checkpoint(ckpt[0]["cond"])
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1.0
    save_checkpoint(model, other_model)
    for argv, diff in ((flags(ckpt, seed=10), "(--seed: 9 there, 10 here)"),
                       (flags(ckpt, "--classes", "1,2"), "(--classes: None there, [1, 2] here)"),
                       (flags(ckpt, "--eta", "0.5", "--use_ddim", "True"),
                        "--eta: 0.0 there, 0.5 here"),
                       (flags(ckpt, model=str(other_model)), "the --model_path file's sha256")):
        rc, out, err = run(capsys, *argv, "--out", tmp_path)
        assert rc == 2, err
        assert "holds 1 finished batch of a run with other arguments" in err and diff in err
        assert "args." not in err
        assert "Traceback" not in err and not out
    assert sorted(os.listdir(tmp_path / f"{NAME}.parts")) == before  # untouched


def test_a_file_as_out_is_refused_before_sampling(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sample_cli, "iter_batches", _never)
    target = tmp_path / "f"
    target.write_text("x\n")
    rc, _, err = run(capsys, *flags(ckpt), "--out", target)
    assert rc == 2 and f"--out {target} is a file, not a folder" in err, err
    assert target.read_text() == "x\n"


def test_unwritable_out_is_refused_before_sampling(ckpt, tmp_path, capsys, monkeypatch):
    """(root writes anywhere, so permission is simulated)"""
    monkeypatch.setattr(sample_cli, "iter_batches", _never)

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    with monkeypatch.context() as m:
        m.setattr(shards.os, "makedirs", denied)
        rc, _, err = run(capsys, *flags(ckpt), "--out", tmp_path / "new")
    assert rc == 2 and f"--out {tmp_path}/new: cannot create the folder (permission denied" \
        in err, err
    with monkeypatch.context() as m:
        m.setattr(shards, "probe_write", denied)
        rc, _, err = run(capsys, *flags(ckpt), "--out", tmp_path)
    assert rc == 2 and f"--out {tmp_path} is not writable (permission denied" in err, err


def _never(*args, **kwargs):
    raise AssertionError("sampling started")


def _disk_full_when(monkeypatch, condition):
    real = shards.write_npz

    def write_npz(f, members, **kwargs):
        if condition(members):
            f.write(b"some bytes first")
            raise OSError(errno.ENOSPC, "No space left on device")
        real(f, members, **kwargs)

    monkeypatch.setattr(shards, "write_npz", write_npz)


@pytest.mark.parametrize("where", ["shard", "assembly"])
def test_disk_full_says_so_and_keeps_the_batches(where, ckpt, reference, tmp_path, capsys,
                                                  monkeypatch):
    calls = []

    def condition(members):
        calls.append(members[0][0])
        return members[0][0] == "arr_0" if where == "assembly" else len(calls) == 2

    with monkeypatch.context() as m:
        _disk_full_when(m, condition)
        rc, _, err = run(capsys, *flags(ckpt), "--out", tmp_path)
    target = f"{NAME}.npz" if where == "assembly" else f"{NAME}.parts/batch_000001.npz"
    kept = 3 if where == "assembly" else 1
    assert rc == 1
    errors = [ln for ln in err.splitlines() if "error" in ln]
    assert errors == [err.splitlines()[-1]], err  # one line, the last
    assert errors[0].startswith(f"adm-fast sample: error: disk full writing {tmp_path}/{target}; "
                                f"{kept} of 3 batches {'is' if kept == 1 else 'are'} "
                                "finished, kept in"), err
    leftovers = [n for d in (tmp_path, tmp_path / f"{NAME}.parts") for n in os.listdir(d)
                 if ".partial" in n]
    assert not leftovers
    rc, _, err = run(capsys, *flags(ckpt), "--out", tmp_path)
    assert rc == 0, err
    same_as_reference(tmp_path, reference)


def test_stale_partials_are_removed_and_damaged_shards_resampled(ckpt, reference, tmp_path,
                                                                 capsys, monkeypatch):
    with monkeypatch.context() as m:
        stop_after(m, 2, KeyboardInterrupt())
        run(capsys, *flags(ckpt), "--out", tmp_path)
    parts = tmp_path / f"{NAME}.parts"
    dead = _dead_pid()
    stale = [tmp_path / f".{NAME}.npz.partial{dead}", parts / f".batch_000002.npz.partial{dead}",
             tmp_path / f".{NAME}.parts.partial{dead}"]
    for p in stale[:2]:
        p.write_bytes(b"half a file")
    stale[2].mkdir()
    (stale[2] / "batch_000000.npz").write_bytes(b"x")
    alive = tmp_path / f".other.npz.partial{os.getppid()}"  # a running writer's: kept
    alive.write_bytes(b"in progress")
    shard = parts / "batch_000001.npz"
    shard.write_bytes(shard.read_bytes()[:100])
    rc, _, err = run(capsys, *flags(ckpt), "--out", tmp_path)
    assert rc == 0, err
    for p in stale:
        assert f"removed {p}, left by a killed run" in err
    assert f"{shard} is damaged" in err and "its batch is sampled again" in err
    alive.unlink()
    same_as_reference(tmp_path, reference)


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_atomic_write_removes_its_temporary_on_failure(tmp_path):
    target = tmp_path / "x.npz"

    def fail(f):
        f.write(b"partial")
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    with pytest.raises(io.OutputError, match=f"disk quota exceeded writing {target}"):
        io.atomic_write(str(target), fail)
    assert os.listdir(tmp_path) == []


def test_npz_bytes_do_not_depend_on_the_clock_or_the_chunks(tmp_path, monkeypatch):
    import time

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (7, 4, 4, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 7)
    out = []
    for i, chunks in enumerate(([images], [images[:3], images[3:]])):
        monkeypatch.setattr(time, "time", lambda i=i: 1e9 + 1e6 * i)
        path = tmp_path / f"{i}.npz"
        io.atomic_write(str(path), lambda f, chunks=chunks: write_npz(
            f, [("arr_0", np.uint8, images.shape, chunks),
                ("arr_1", np.int64, labels.shape, [labels])]))
        out.append(path.read_bytes())
    assert out[0] == out[1]
    got = npz(tmp_path / "0.npz")
    np.testing.assert_array_equal(got["arr_0"], images)
    np.testing.assert_array_equal(got["arr_1"], labels)
    with open(tmp_path / "bad.npz", "wb") as f, pytest.raises(ValueError, match="chunks hold 3 rows"):
        write_npz(f, [("arr_0", np.uint8, images.shape, [images[:3]])])
