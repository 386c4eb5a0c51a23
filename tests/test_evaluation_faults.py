"""adm-fast evaluate against damaged inputs and failing outputs: every one is a
single error line that names the file or flag, given before the evaluation runs
where it can be known then, and no output is ever left half-written or replaced
without --overwrite.

The network is a stand-in here (FakeEvaluator), so that these tests time the
checks, not InceptionV3; the real one is in test_evaluation_cli.py. A full or
read-only disk is simulated under one folder (`disk`): new files there are
created (0 bytes, as on a real full disk) but every byte written fails with
ENOSPC, or nothing can be created (EROFS)."""

import builtins
import errno
import json
import os
import shutil
import struct
import zipfile

import numpy as np
import pytest

from adm_fast.evaluation import EvaluationError, cli
from adm_fast.evaluation import batches as B
from adm_fast.evaluation import evaluator as evaluator_module

METRICS = {"Inception Score": 1.5, "FID": 2.25, "sFID": 3.0, "Precision": 0.5, "Recall": 0.75}


def _images(seed, n=2, h=8, w=8):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


# The real statistics are 2048- and 2023-d (64 MiB a file); these tests check
# files, not features, so they take small ones (test_evaluation_cli.py writes
# and reads the real shapes).
SHAPES = {"mu": (4,), "sigma": (4, 4), "mu_s": (3,), "sigma_s": (3, 3)}


@pytest.fixture(autouse=True)
def small_statistics(monkeypatch):
    monkeypatch.setattr(B, "STAT_SHAPES", SHAPES)


def _stats(seed):
    rng = np.random.default_rng(seed)
    return {key: rng.standard_normal(shape) for key, shape in SHAPES.items()}


class FakeEvaluator:
    """The CLI's view of Evaluator, without the network: records what ran."""

    calls = []
    during_evaluate = None  # a function run inside evaluate (to fill the disk then)

    def __init__(self, *args, **kwargs):
        self.device = "cpu"
        FakeEvaluator.calls.append("init")

    def evaluate(self, ref, sample):
        FakeEvaluator.calls.append("evaluate")
        if FakeEvaluator.during_evaluate is not None:
            FakeEvaluator.during_evaluate()
        return dict(METRICS)

    def save_reference(self, source, out_path, image_size=None):
        FakeEvaluator.calls.append("save_reference")
        with B.open_images(source) as reader:
            def fill(write):
                for batch in reader.batches(3):
                    write(batch)
                return _stats(0)

            B.write_reference(out_path, reader.shape, fill)
            return len(reader)


@pytest.fixture
def fake(monkeypatch):
    FakeEvaluator.calls = []
    FakeEvaluator.during_evaluate = None
    monkeypatch.setattr(evaluator_module, "Evaluator", FakeEvaluator)
    return FakeEvaluator


def evaluate(capsys, *args):
    rc = cli.main(["--no-progress", "--device", "cpu", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and err.startswith("adm-fast evaluate: error: "), err
    assert "Traceback" not in err
    return err


@pytest.fixture
def inputs(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    np.savez(d / "ref.npz", _images(0), **_stats(1))
    np.savez(d / "sample.npz", _images(2))
    return d


class Disk:
    """A simulated file system under `folder`: after fail(errno.ENOSPC) a new
    file there is created but every write to it fails (and disk_usage reports
    0 bytes free); after fail(errno.EROFS) nothing there can be opened for
    writing."""

    def __init__(self, monkeypatch, folder):
        self.folder, self.error, self._fds = os.path.abspath(folder), None, set()
        real_open, real_os_open = builtins.open, os.open
        real_write, real_fsync, real_usage = os.write, os.fsync, shutil.disk_usage

        def inside(path) -> bool:
            return (isinstance(path, (str, os.PathLike))
                    and os.path.abspath(os.fspath(path)).startswith(self.folder + os.sep))

        def fail(path=None):
            raise OSError(self.error, os.strerror(self.error), path)

        def fake_open(file, mode="r", *args, **kwargs):
            if not inside(file) or not set(mode) & set("wax+"):
                return real_open(file, mode, *args, **kwargs)
            if self.error not in (None, errno.ENOSPC):
                fail(file)
            return _Guarded(real_open(file, mode, *args, **kwargs), self)

        def fake_os_open(path, flags, *args, **kwargs):
            writing = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            if not inside(path) or not writing:
                return real_os_open(path, flags, *args, **kwargs)
            if self.error not in (None, errno.ENOSPC):
                fail(path)
            fd = real_os_open(path, flags, *args, **kwargs)
            self._fds.add(fd)
            return fd

        def fake_write(fd, data):
            if fd in self._fds and self.error == errno.ENOSPC:
                fail()
            return real_write(fd, data)

        def fake_fsync(fd):
            if fd in self._fds and self.error == errno.ENOSPC:
                fail()
            return real_fsync(fd)

        def fake_usage(path):
            usage = real_usage(path)
            if self.error == errno.ENOSPC and (inside(path) or os.path.abspath(path)
                                               == self.folder):
                return usage._replace(free=0)
            return usage

        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(os, "open", fake_os_open)
        monkeypatch.setattr(os, "write", fake_write)
        monkeypatch.setattr(os, "fsync", fake_fsync)
        monkeypatch.setattr(shutil, "disk_usage", fake_usage)

    def fail(self, error):
        self.error = error


class _Guarded:
    """A file on the simulated disk: once it is full, no byte written stays."""

    def __init__(self, f, disk):
        self._f, self._disk = f, disk

    def write(self, data):
        if self._disk.error == errno.ENOSPC:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


@pytest.fixture
def out(tmp_path, monkeypatch):
    d = tmp_path / "out"
    d.mkdir()
    return d, Disk(monkeypatch, d)


# --- a finished output is replaced only with --overwrite ---------------------

def test_json_is_not_replaced_without_overwrite(fake, inputs, out, capsys):
    d, _ = out
    path = d / "metrics.json"
    path.write_text("earlier metrics\n")
    rc, stdout, err = evaluate(capsys, inputs / "ref.npz", inputs / "sample.npz", "--json", path)
    assert rc == 2 and stdout == ""
    assert f"--json {path} exists: pass --overwrite to replace it" in one_line(err)
    assert fake.calls == [] and path.read_text() == "earlier metrics\n"

    rc, stdout, err = evaluate(capsys, inputs / "ref.npz", inputs / "sample.npz", "--json", path,
                               "--overwrite")
    assert rc == 0, err
    assert json.loads(path.read_text()) == METRICS and fake.calls == ["init", "evaluate"]
    assert sorted(os.listdir(d)) == ["metrics.json"]


def test_save_stats_is_not_replaced_without_overwrite(fake, inputs, out, capsys):
    d, _ = out
    path = d / "ref_stats.npz"
    path.write_bytes(b"an earlier reference batch")
    rc, stdout, err = evaluate(capsys, "--save_stats", path, inputs / "sample.npz")
    assert rc == 2 and stdout == ""
    assert f"--save_stats {path} exists: pass --overwrite to replace it" in one_line(err)
    assert fake.calls == [] and path.read_bytes() == b"an earlier reference batch"

    rc, stdout, err = evaluate(capsys, "--save_stats", path, inputs / "sample.npz", "--overwrite")
    assert rc == 0, err
    with np.load(path) as f:
        np.testing.assert_array_equal(f["arr_0"], _images(2))
    assert B.read_stats(str(path)).keys() == set(B.STAT_KEYS)
    assert sorted(os.listdir(d)) == ["ref_stats.npz"]


def test_an_output_that_is_a_folder_is_refused(fake, inputs, out, capsys):
    d, _ = out
    (d / "m.json").mkdir()
    rc, _, err = evaluate(capsys, inputs / "ref.npz", inputs / "sample.npz", "--json",
                          d / "m.json", "--overwrite")
    assert rc == 2 and "is a folder: expected a file name" in one_line(err)
    assert fake.calls == []


# --- a full or read-only disk: found before evaluating, nothing half-written -

@pytest.mark.parametrize("error, why", [(errno.ENOSPC, "disk full"),
                                        (errno.EROFS, "read-only file system"),
                                        (errno.EACCES, "permission denied")])
def test_unwritable_json_is_refused_before_evaluating(fake, inputs, out, capsys, error, why):
    d, disk = out
    disk.fail(error)
    path = d / "metrics.json"
    rc, stdout, err = evaluate(capsys, inputs / "ref.npz", inputs / "sample.npz", "--json", path)
    assert rc == 2 and stdout == ""
    assert f"--json: {why} writing {path}" in one_line(err)
    assert fake.calls == [] and os.listdir(d) == []


@pytest.mark.parametrize("error, why", [(errno.ENOSPC, "disk full"),
                                        (errno.EROFS, "read-only file system")])
def test_unwritable_save_stats_is_refused_before_evaluating(fake, inputs, out, capsys, error,
                                                            why):
    d, disk = out
    disk.fail(error)
    path = d / "ref_stats.npz"
    rc, stdout, err = evaluate(capsys, "--save_stats", path, inputs / "sample.npz")
    assert rc == 2 and stdout == ""
    assert f"--save_stats: {why} writing {path}" in one_line(err)
    assert fake.calls == [] and os.listdir(d) == []


def test_save_stats_without_room_for_the_reference_is_refused(fake, inputs, out, capsys,
                                                              monkeypatch):
    # The folder is writable but holds less than the reference needs (its
    # arr_0, 384 bytes, and the statistics, 4 * 7 + 8 * 25): refused with the
    # sizes, before any work.
    d, _ = out
    usage = shutil.disk_usage(d)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=600))
    path = d / "ref_stats.npz"
    rc, _, err = evaluate(capsys, "--save_stats", path, inputs / "sample.npz")
    assert rc == 2
    assert (f"disk full: {path} needs at least 612 bytes, 600 bytes are free on the device "
            f"holding {d}") in one_line(err)
    assert fake.calls == [] and os.listdir(d) == []


@pytest.mark.parametrize("earlier", [False, True])
def test_disk_full_at_the_end_leaves_the_old_json_and_no_partial_file(fake, inputs, out,
                                                                     capsys, earlier):
    # The disk fills while the evaluation runs (after the check): the numbers
    # are printed, the write fails with one line, and no 0-byte or partial file
    # is left (an earlier file, replaced with --overwrite, stays whole).
    d, disk = out
    path = d / "metrics.json"
    if earlier:
        path.write_text("earlier metrics\n")
    fake.during_evaluate = lambda: disk.fail(errno.ENOSPC)
    rc, stdout, err = evaluate(capsys, inputs / "ref.npz", inputs / "sample.npz", "--json", path,
                               *["--overwrite"] * earlier)
    assert rc == 2 and fake.calls == ["init", "evaluate"]
    assert stdout.splitlines() == [f"{k}: {v}" for k, v in METRICS.items()]
    progress, error = err.splitlines(keepends=True)  # the run's own line, then the error
    assert progress.startswith("adm-fast evaluate: ") and " against " in progress
    assert f"disk full writing {path}" in one_line(error)
    if earlier:
        assert path.read_text() == "earlier metrics\n" and os.listdir(d) == ["metrics.json"]
    else:
        assert os.listdir(d) == []


def test_a_reference_write_that_fails_leaves_nothing(out):
    d, disk = out
    path = d / "ref_stats.npz"
    path.write_bytes(b"an earlier reference batch")
    images = _images(3, n=5)

    def fill(write):
        write(images[:3])
        disk.fail(errno.ENOSPC)  # full from here on
        write(images[3:])
        return _stats(0)

    with pytest.raises(EvaluationError, match=f"^disk full writing {path}$"):
        B.write_reference(str(path), images.shape, fill)
    assert path.read_bytes() == b"an earlier reference batch"
    assert os.listdir(d) == ["ref_stats.npz"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_read_only_folder_is_refused_before_evaluating(fake, inputs, tmp_path, capsys):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    try:
        for args, flag in (([inputs / "ref.npz", inputs / "sample.npz", "--json",
                             d / "m.json"], "--json"),
                           (["--save_stats", d / "s.npz", inputs / "sample.npz"],
                            "--save_stats")):
            rc, _, err = evaluate(capsys, *args)
            assert rc == 2 and f"{flag}: permission denied writing {d}" in one_line(err)
        assert fake.calls == [] and os.listdir(d) == []
    finally:
        d.chmod(0o755)


# --- damaged NPZs: one line naming the file, before the network is built -----

def _with_stats(path, **stats):
    np.savez(path, _images(0), **{**_stats(1), **stats})


def _zip_member(path, name, payload: bytes):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(name, payload)


def _npy_header(shape, descr="|u1", fortran=False) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": fortran,
                                               "shape": shape})
    return buf.getvalue()


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _data_offset(path, name):
    """Where the member's bytes start in the file (past its local header)."""
    with zipfile.ZipFile(path) as zf:
        offset = zf.getinfo(name).header_offset
    with open(path, "rb") as f:
        f.seek(offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
    return offset + 30 + name_len + extra_len


def test_damaged_npz_inputs_are_one_line_errors(fake, inputs, tmp_path, capsys):
    ref, sample = inputs / "ref.npz", inputs / "sample.npz"
    t = tmp_path
    _with_stats(t / "object.npz", mu=np.array([1.0, "x", None] * 10, dtype=object))
    _with_stats(t / "string.npz", sigma=np.array("0.5"))
    _with_stats(t / "strings.npz", mu_s=np.array(["1.0"] * 3))
    _with_stats(t / "shape.npz", mu=np.zeros(10))
    _with_stats(t / "complex.npz", mu=np.zeros(4, np.complex128))
    nan = _stats(1)["sigma_s"]
    nan[1, 2] = np.nan
    _with_stats(t / "nan.npz", sigma_s=nan)
    _zip_member(t / "overflow.npz", "arr_0.npy", _npy_header((2**62, 2**62, 2**62, 3))
                + _images(0).tobytes())
    _zip_member(t / "long_header.npz", "arr_0.npy",
                b"\x93NUMPY\x02\x00" + (2**32 - 1).to_bytes(4, "little") + b"{")
    _zip_member(t / "garbage_header.npz", "arr_0.npy",
                b"\x93NUMPY\x01\x00" + (16).to_bytes(2, "little") + b"{'descr': print(1)")
    _zip_member(t / "negative.npz", "arr_0.npy", _npy_header((2, -8, -8, 3))
                + _images(0).tobytes())
    _zip_member(t / "version.npz", "arr_0.npy", b"\x93NUMPY\x09\x00" + b"\0" * 64)
    _zip_member(t / "fortran_short.npz", "arr_0.npy", _npy_header((9, 8, 8, 3), fortran=True)
                + _images(0).tobytes())
    shutil.copy(ref, t / "crc_sigma.npz")
    _flip(t / "crc_sigma.npz", _data_offset(t / "crc_sigma.npz", "sigma.npy") + 130)
    cases = [
        ("object.npz", "object.npz: mu is of dtype object: a reference batch's statistics "
                       "are real numbers"),
        ("string.npz", "string.npz: sigma is of dtype <U3"),
        ("strings.npz", "strings.npz: mu_s is of dtype <U3"),
        ("shape.npz", "shape.npz: mu has shape [10]: expected [4]"),
        ("complex.npz", "complex.npz: mu is of dtype complex128"),
        ("nan.npz", "nan.npz: sigma_s holds NaN or infinite values"),
        ("overflow.npz", "overflow.npz: arr_0 is truncated: 0 of 4611686018427387904 images "
                         "could be read"),
        ("long_header.npz", "long_header.npz: arr_0 has a damaged .npy header (4294967295 "
                            "bytes long; numpy writes at most 10000)"),
        ("garbage_header.npz", "garbage_header.npz: arr_0 has a damaged .npy header"),
        ("negative.npz", "negative.npz: arr_0 has a damaged .npy header (shape [2, -8, -8, 3])"),
        ("version.npz", "version.npz: arr_0 is a .npy of format version 9.0"),
        ("fortran_short.npz", "fortran_short.npz: arr_0 is truncated: 2 of 9 images"),
        ("crc_sigma.npz", "crc_sigma.npz: sigma is damaged (Bad CRC-32 for file 'sigma.npy')"),
    ]
    for name, message in cases:
        for args in ([t / name, sample], [ref, t / name]):
            rc, stdout, err = evaluate(capsys, *args, "--json", tmp_path / "m.json")
            assert rc == 2 and stdout == "" and message in one_line(err), (name, err)
        if "arr_0" in message:
            rc, _, err = evaluate(capsys, "--save_stats", tmp_path / "s.npz", t / name)
            assert rc == 2 and message in one_line(err), (name, err)
    assert fake.calls == [] and not (tmp_path / "m.json").exists()


def test_a_bad_crc_in_the_images_is_found_as_they_are_read(tmp_path):
    # Images are streamed (50,000 of them are never all in memory), so their
    # CRC is known only at the member's last byte: the read that reaches it fails.
    for save in (np.savez, np.savez_compressed):
        path = tmp_path / f"{save.__name__}.npz"
        save(path, _images(0, n=7), labels=np.arange(7))
        _flip(path, _data_offset(path, "arr_0.npy") + 150)
        with (pytest.raises(EvaluationError, match=f"^{path}: arr_0 is damaged \\("),
              B.open_images(str(path)) as reader):
            list(reader.batches(3))


def _read_all(path):
    with B.open_images(path) as reader:
        images = np.concatenate(list(reader.batches(2)))
    return images, B.read_stats(path)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_every_damaged_byte_is_an_error_or_changes_nothing(tmp_path, save):
    """Each byte of a small reference NPZ altered in turn (and the file cut at
    each length): reading it either gives exactly the original arrays or one
    EvaluationError; never other values, never another exception."""
    rng = np.random.default_rng(4)
    path = tmp_path / "ref.npz"
    save(path, _images(5, n=3, h=4, w=4), **_stats(6))
    images, want = _read_all(str(path))
    good = path.read_bytes()
    masks = rng.integers(1, 256, len(good))
    # Every byte of the zip's and the .npy's headers; of the arrays' values
    # (where any change is a CRC mismatch) every 8th, to keep this quick.
    values = set()
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            start = _data_offset(path, info.filename)
            values.update(range(start, start + info.compress_size))
            if info.compress_type == zipfile.ZIP_STORED:
                values.difference_update(range(start, start + 128))  # the .npy header
    positions = [i for i in range(len(good)) if i not in values or i % 8 == 0]
    outcomes = {"same": 0, "error": 0}
    variants = [good[:i] + bytes([good[i] ^ int(masks[i])]) + good[i + 1:]
                for i in positions] + [good[:i] for i in range(0, len(good), 7)]
    for data in variants:
        path.write_bytes(data)
        try:
            got_images, got = _read_all(str(path))
        except EvaluationError as e:
            assert "\n" not in str(e) and str(path) in str(e), str(e)
            outcomes["error"] += 1
            continue
        np.testing.assert_array_equal(got_images, images)
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
        outcomes["same"] += 1
    assert outcomes["error"] > len(variants) // 2, outcomes


def test_a_fortran_ordered_batch_larger_than_memory_is_refused(tmp_path, monkeypatch):
    # Fortran order cannot be streamed image by image, so it is read whole:
    # refused, with what to do, when it cannot fit instead of a MemoryError.
    path = tmp_path / "fortran.npz"
    np.savez(path, np.asfortranarray(_images(7)))
    monkeypatch.setattr(B, "_free_memory", lambda: 100)
    with pytest.raises(EvaluationError, match=(
            f"^{path}: arr_0 is Fortran-ordered, which is read whole, and 384 bytes: more than "
            r"the 100 bytes of memory free; save it C-ordered \(np.ascontiguousarray\)")), \
            B.open_images(str(path)):
        pass
    monkeypatch.setattr(B, "_free_memory", lambda: 384)
    with B.open_images(str(path)) as reader:
        np.testing.assert_array_equal(np.concatenate(list(reader.batches(1))), _images(7))
