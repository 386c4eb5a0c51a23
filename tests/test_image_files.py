"""Image folders read safely (adm_fast.image_files), by training and by
evaluation's --save_stats alike: special files named like images are left
out (a FIFO hung both forever), an image past the pixel limit is refused from
its header before decoding, and only PIL's own decoders are tried."""

import logging
import os
import signal
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from adm_fast import image_files as F
from adm_fast.evaluation.batches import EvaluationError, folder_images
from adm_fast.train import data as D

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")


def _png_header(path, width, height):
    """A PNG whose header says width x height (1-bit grey) and whose data is far
    too short: only a reader that trusts the header before decoding gets the
    size right; decoding it fails."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


def _images(folder, n=3, size=8):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            folder / f"a_{i}.png")
    return folder


def _hung(*_):
    raise TimeoutError("reading the folder hung")


@pytest.fixture
def alarm():
    """Fail instead of hanging: opening a FIFO blocks until a writer comes."""
    old = signal.signal(signal.SIGALRM, _hung)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture
def logged(caplog):
    logger = logging.getLogger("adm_fast")
    propagate = logger.propagate
    logger.propagate = False  # each record once, whether a training run set it up or not
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.WARNING, logger="adm_fast")
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.propagate = propagate


@needs_fifo
def test_special_files_are_left_out_once_and_refused_at_open(tmp_path, alarm, logged):
    folder = _images(tmp_path / "imgs")
    os.mkfifo(folder / "a_fifo.png")
    os.symlink(folder / "a_fifo.png", folder / "b_link.png")  # the link is followed
    os.symlink(folder / "gone.png", folder / "c_dangling.png")
    got = F.list_image_files(folder)
    assert [os.path.basename(p) for p in got] == ["a_0.png", "a_1.png", "a_2.png",
                                                  "c_dangling.png"]
    F.list_image_files(folder)  # said once per folder
    said = [r.getMessage() for r in logged.records]
    assert len(said) == 1 and "left out 2 special file(s)" in said[0], said
    assert str(folder / "a_fifo.png") in said[0]
    # A file that became a FIFO after the listing: refused, without waiting.
    with pytest.raises(F.NotARegularFile, match=r"a_fifo\.png: not a regular file"):
        F.read_rgb(folder / "a_fifo.png")
    with pytest.raises(F.UnreadableImage, match=r"c_dangling\.png: cannot open it"):
        F.read_rgb(folder / "c_dangling.png")


@needs_fifo
def test_training_and_evaluation_folders_skip_a_fifo(tmp_path, alarm):
    folder = _images(tmp_path / "imgs", n=4)
    os.mkfifo(folder / "a_fifo.png")
    ds = D.ImageFolderDataset(folder, 8, random_flip=False)
    assert len(ds) == 4 and all(ds[i][0].shape == (3, 8, 8) for i in range(4))
    shape, batches = folder_images(str(folder))
    assert shape == (4, 8, 8, 3)
    assert sum(len(b) for b in batches(3)) == 4


def test_the_pixel_limit_is_checked_from_the_header(tmp_path):
    bomb = _png_header(tmp_path / "bomb.png", 12000, 12000)  # 144 M pixels
    with pytest.raises(F.ImageTooLarge, match=r"bomb\.png: 12000x12000 is 144,000,000 pixels, "
                       r"more than the limit of 67,108,864 .*before decoding"):
        F.read_rgb(bomb)
    with F.open_image(bomb, max_pixels=12000 * 12000) as im:  # the header's size, not decoded
        assert im.size == (12000, 12000)
    small = _images(tmp_path / "small", n=1) / "a_0.png"
    with pytest.raises(F.ImageTooLarge, match=r"8x8 is 64 pixels, more than the limit of 63 "
                       r".*; raise it so"):
        F.read_rgb(small, max_pixels=63, limit_hint="raise it so")
    assert F.read_rgb(small, max_pixels=64).size == (8, 8)


def test_pils_own_bomb_error_is_one_line_with_the_file(tmp_path, recwarn):
    bomb = _png_header(tmp_path / "huge.png", 20000, 20000)  # past twice PIL's limit
    with pytest.raises(F.ImageTooLarge, match=r"huge\.png: .*Image\.MAX_IMAGE_PIXELS.*refused "
                       "before decoding"):
        F.read_rgb(bomb, max_pixels=None)
    # Between PIL's warning and its error, the limit given here decides, in silence.
    mid = _png_header(tmp_path / "mid.png", 10000, 10000)
    with F.open_image(mid, max_pixels=None) as im:
        assert im.size == (10000, 10000)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_evaluation_refuses_a_bomb_in_one_line(tmp_path):
    folder = _images(tmp_path / "imgs", n=2)
    _png_header(folder / "a_9.png", 12000, 12000)
    with pytest.raises(EvaluationError, match=r"a_9\.png: 12000x12000 is 144,000,000 pixels, "
                       "more than the limit of 67,108,864"):
        list(folder_images(str(folder), image_size=8)[1](2))
    with pytest.raises(EvaluationError, match=r"a_9\.png: 12000x12000 is 144,000,000 pixels"):
        folder_images(str(folder))  # without --image_size, every header is read first
    (folder / "a_9.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    with pytest.raises(EvaluationError, match=r"a_9\.png: not a readable image"):
        list(folder_images(str(folder), image_size=8)[1](2))


def test_training_refuses_or_skips_an_image_past_the_limit(tmp_path):
    folder = _images(tmp_path / "imgs", n=3)
    _png_header(folder / "a_1.png", 12000, 12000)
    ds = D.ImageFolderDataset(folder, 8, random_flip=False)
    with pytest.raises(D.DataError, match=r"a_1\.png: 12000x12000 .* limit of 67,108,864 .*"
                       r"--max_image_pixels.*--on_error skip"):
        ds[1]
    ds = D.ImageFolderDataset(folder, 8, random_flip=False, on_error="skip")
    x, _ = ds[1]
    assert ds.skipped_files == [str(folder / "a_1.png")]
    assert np.array_equal(x.numpy(), D.ImageFolderDataset(folder, 8, random_flip=False)[2][0]
                          .numpy())


def test_only_pils_own_decoders_are_tried(tmp_path):
    # An EPS named like a PNG: PIL would hand it to Ghostscript.
    eps = tmp_path / "a_0.png"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")
    with pytest.raises(F.UnreadableImage, match=r"a_0\.png: UnidentifiedImageError"), \
            F.open_image(eps):
        pass
    jpeg_named_png = tmp_path / "b_0.png"  # a common mislabel, still read
    Image.new("RGB", (8, 8), (10, 20, 30)).save(jpeg_named_png, format="JPEG")
    assert F.read_rgb(jpeg_named_png).size == (8, 8)
