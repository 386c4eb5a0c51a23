"""The training data pipeline: listing, labels, crops, sharding, errors, reproducibility."""

import itertools
import os

import numpy as np
import pytest
import torch
from PIL import Image

from adm_fast.image_files import center_crop_arr
from adm_fast.train import data as D
from adm_fast.train.data import DataError


def _img(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _take(stream, k):
    return list(itertools.islice(stream, k))


def _same(a, b):
    assert len(a) == len(b)
    for (xa, ca), (xb, cb) in zip(a, b):
        assert torch.equal(xa, xb)
        assert ca.keys() == cb.keys() and all(torch.equal(ca[k], cb[k]) for k in ca)


def _corrupt(path):
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n this is not an image")


# listing and labels


def test_listing_is_recursive_sorted_per_level_and_filters_extensions(tmp_path):
    for rel in ["b_1.png", "a_2.JPG", "sub/c_0.jpeg", "sub/deep/a_9.GiF", "notes.txt",
                "noext", "a.png_dir/x_1.png", "Z_up.Png"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    got = [os.path.relpath(p, tmp_path) for p in D.list_image_files(tmp_path)]
    # Each level sorted, directories expanded where they fall (guided-diffusion's order).
    assert got == ["Z_up.Png", "a.png_dir/x_1.png", "a_2.JPG", "b_1.png",
                   "sub/c_0.jpeg", "sub/deep/a_9.GiF"]


def test_listing_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        D.list_image_files(tmp_path / "missing")
    (tmp_path / "f.png").write_bytes(b"")
    with pytest.raises(DataError, match="is not a directory"):
        D.list_image_files(tmp_path / "f.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"no images in .*empty.*\.jpg, \.jpeg, \.png, \.gif"):
        D.list_image_files(tmp_path / "empty")
    with pytest.raises(DataError, match="data_dir is empty"):
        D.load_data(data_dir="", batch_size=1, image_size=8)


def test_class_names_and_labels_agree_across_shards(tmp_path):
    assert D.class_of("/x/y/dog_12_b.png") == "dog" and D.class_of("cat.png") == "cat.png"
    # Only one "a" image: shard 1 has none, yet numbers b and c as shard 0 does.
    files = D.make_image_folder(tmp_path, 1, 8, classes=("a",))
    files += D.make_image_folder(tmp_path, 6, 8, classes=("b", "c"), seed=1)
    files = D.list_image_files(tmp_path)
    assert D.class_names(files) == ["a", "b", "c"]
    shards = [D.ImageFolderDataset(tmp_path, 8, class_cond=True, shard=r, num_shards=2)
              for r in range(2)]
    assert sorted(shards[0].files + shards[1].files) == sorted(files)
    assert not set(shards[0].files) & set(shards[1].files)
    assert shards[0].files == files[0::2] and shards[1].files == files[1::2]
    for ds in shards:
        assert ds.classes == ["a", "b", "c"]
        assert [int(ds[i][1]["y"]) for i in range(len(ds))] == \
            [ds.classes.index(D.class_of(f)) for f in ds.files]
    assert 0 not in [int(shards[1][i][1]["y"]) for i in range(len(shards[1]))]


def test_classes_mapping_for_a_validation_folder(tmp_path):
    D.make_image_folder(tmp_path / "val", 4, 8, classes=("b", "c"))
    ds = D.ImageFolderDataset(tmp_path / "val", 8, class_cond=True, classes=["a", "b", "c"])
    assert [int(ds[i][1]["y"]) for i in range(4)] == [1, 1, 2, 2]
    D.make_image_folder(tmp_path / "val", 1, 8, classes=("zebra",))
    with pytest.raises(DataError, match=r"zebra_00000\.png: class 'zebra'.*\['a', 'b', 'c'\]"):
        D.ImageFolderDataset(tmp_path / "val", 8, class_cond=True, classes=["a", "b", "c"])
    many = [f"c{i:04d}" for i in range(1000)]
    with pytest.raises(DataError, match=r"'c0009', \.\.\. \(1000 in all\)\]$"):
        D.ImageFolderDataset(tmp_path / "val", 8, class_cond=True, classes=many)
    with pytest.raises(DataError, match="distinct"):
        D.ImageFolderDataset(tmp_path / "val", 8, class_cond=True, classes=["a", "a"])
    with pytest.raises(DataError, match="class_cond=False"):
        D.ImageFolderDataset(tmp_path / "val", 8, classes=["a"])
    assert D.ImageFolderDataset(tmp_path / "val", 8)[0][1] == {}
    listed = D.list_image_files(tmp_path / "val")
    assert D.ImageFolderDataset(listed[::-1], 8).files == listed[::-1]  # a list keeps its order
    with pytest.raises(DataError, match="list of image files is empty"):
        D.ImageFolderDataset([], 8)


# crops


@pytest.mark.parametrize("w,h", [(50, 37), (37, 50), (16, 16), (17, 200), (300, 100)])
def test_center_crop_shape(w, h):
    arr = center_crop_arr(_img(w, h), 16)
    assert arr.shape == (16, 16, 3) and arr.dtype == np.uint8


def test_center_crop_properties():
    img = _img(32, 32)
    assert np.array_equal(center_crop_arr(img, 32), np.asarray(img))
    # Twice the size: exactly one BOX halving, no resampling after it.
    big = _img(64, 64, seed=1)
    assert np.array_equal(center_crop_arr(big, 32),
                          np.asarray(big.resize((32, 32), Image.Resampling.BOX)))
    # Four times: two successive halvings (which round differently from one 4x BOX).
    huge = _img(128, 128, seed=2)
    twice = huge.resize((64, 64), Image.Resampling.BOX).resize((32, 32), Image.Resampling.BOX)
    assert np.array_equal(center_crop_arr(huge, 32), np.asarray(twice))
    assert not np.array_equal(np.asarray(twice),
                              np.asarray(huge.resize((32, 32), Image.Resampling.BOX)))
    # Non-square 2x: one halving, then the centred window.
    wide = _img(82, 64, seed=3)  # floor halving: 41x32, then offset (41-32)//2 = 4
    half = np.asarray(wide.resize((41, 32), Image.Resampling.BOX))
    assert np.array_equal(center_crop_arr(wide, 32), half[:, 4:36])
    tall = _img(64, 81, seed=4)  # floor halving: 32x40, then offset 4 vertically
    half = np.asarray(tall.resize((32, 40), Image.Resampling.BOX))
    assert np.array_equal(center_crop_arr(tall, 32), half[4:36])
    # 3x: one halving (48 < 2*32), then BICUBIC 48 -> 32.
    three = _img(96, 96, seed=5)
    ref = three.resize((48, 48), Image.Resampling.BOX).resize((32, 32), Image.Resampling.BICUBIC)
    assert np.array_equal(center_crop_arr(three, 32), np.asarray(ref))


def test_random_crop_is_seeded_and_in_bounds():
    img = _img(40, 30, seed=6)
    a = D.random_crop_arr(img, 24, rng=np.random.default_rng(3))
    b = D.random_crop_arr(img, 24, rng=np.random.default_rng(3))
    assert a.shape == (24, 24, 3) and np.array_equal(a, b)
    outs = {D.random_crop_arr(img, 24, rng=np.random.default_rng(s)).tobytes() for s in range(8)}
    assert len(outs) > 4
    # A crop fraction of exactly 1 on a square image leaves nothing to randomise.
    sq = _img(24, 24, seed=7)
    assert np.array_equal(D.random_crop_arr(sq, 24, 1.0, 1.0, np.random.default_rng(0)),
                          np.asarray(sq))
    with pytest.raises(DataError, match="min_crop_frac"):
        D.random_crop_arr(img, 24, min_crop_frac=0.0)


# items


def test_items_shape_dtype_range_and_scaling(tmp_path):
    D.make_image_folder(tmp_path, 4, (20, 16), classes=("a", "b"))
    ds = D.ImageFolderDataset(tmp_path, 16, class_cond=True, random_flip=False)
    x, cond = ds[1]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert cond["y"].dtype == torch.int64 and cond["y"].shape == ()
    raw = center_crop_arr(Image.open(ds.files[1]).convert("RGB"), 16)
    expect = torch.from_numpy(raw.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1)
    assert torch.equal(x, expect)
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0.05


def test_too_small_image_and_allow_upscale(tmp_path):
    D.make_image_folder(tmp_path, 2, (24, 12))
    ds = D.ImageFolderDataset(tmp_path, 16)
    with pytest.raises(DataError, match=r"a_00000\.png: the image is 24x12, smaller than "
                                        r"image_size=16.*allow_upscale"):
        ds[0]
    x, _ = D.ImageFolderDataset(tmp_path, 16, allow_upscale=True)[0]
    assert x.shape == (3, 16, 16)


def test_flip_mirrors_about_half_the_items(tmp_path):
    D.make_image_folder(tmp_path, 64, 8, classes=("a",))
    plain = D.ImageFolderDataset(tmp_path, 8, random_flip=False)
    flip = D.ImageFolderDataset(tmp_path, 8, random_flip=True, seed=5)
    flipped = 0
    for i in range(len(plain)):
        p, f = plain[i][0], flip[i][0]
        if not torch.equal(p, f):
            assert torch.equal(f, p.flip(-1))
            flipped += 1
    assert 20 <= flipped <= 44
    # An image's flip depends on the image, not on how the files are sharded.
    odd = D.ImageFolderDataset(tmp_path, 8, random_flip=True, seed=5, shard=1, num_shards=3)
    assert all(torch.equal(odd[i][0], flip[1 + 3 * i][0]) for i in range(len(odd)))
    # Another epoch draws new flips for the same image.
    assert [torch.equal(flip[(0, i)][0], flip[(1, i)][0]) for i in range(16)].count(False) > 0


def test_bad_arguments(tmp_path):
    D.make_image_folder(tmp_path, 3, 8)
    with pytest.raises(DataError, match="on_error"):
        D.ImageFolderDataset(tmp_path, 8, on_error="ignore")
    with pytest.raises(DataError, match="rank.*out of range"):
        D.ImageFolderDataset(tmp_path, 8, shard=2, num_shards=2)
    with pytest.raises(DataError, match="gets no images"):
        D.ImageFolderDataset(tmp_path, 8, shard=3, num_shards=4)
    with pytest.raises(DataError, match="image_size"):
        D.ImageFolderDataset(tmp_path, 0)
    with pytest.raises(DataError, match=r"3 images, fewer than one global batch \(batch_size=2 "
                       r"per rank x world_size=2\)"):
        D.load_data(data_dir=tmp_path, batch_size=2, image_size=8, rank=1, world_size=2)


# corrupt images


def test_corrupt_image_stop_names_the_file(tmp_path):
    files = D.make_image_folder(tmp_path, 4, 8)
    _corrupt(files[1])
    ds = D.ImageFolderDataset(tmp_path, 8)
    with pytest.raises(DataError, match=r"a_00002\.png: cannot decode.*on_error='skip'"):
        ds[1]
    stream = D.load_data(data_dir=tmp_path, batch_size=4, image_size=8, num_workers=2)
    with pytest.raises(DataError, match=r"a_00002\.png: cannot decode"):
        next(stream)


def test_corrupt_image_skip_substitutes_next_and_counts_across_workers(tmp_path):
    files = D.make_image_folder(tmp_path, 6, 8, classes=("a", "b"))
    _corrupt(files[2])  # a_00004: its substitute b_00001 is labelled b
    _corrupt(files[5])  # b_00005, the last: the substitute wraps round to a_00000
    ds = D.ImageFolderDataset(tmp_path, 8, class_cond=True, random_flip=False, on_error="skip")
    ref = D.ImageFolderDataset(tmp_path, 8, class_cond=True, random_flip=False)
    x, cond = ds[2]
    assert torch.equal(x, ref[3][0]) and int(cond["y"]) == 1
    x, cond = ds[5]
    assert torch.equal(x, ref[0][0]) and int(cond["y"]) == 0
    assert ds.skipped_count == 2 and ds.skipped_files == [files[2], files[5]]
    stream = D.load_data(data_dir=tmp_path, batch_size=3, image_size=8, num_workers=2,
                         deterministic=True, random_flip=False, on_error="skip")
    assert stream.skipped_count == 0
    batches = _take(stream, 4)  # two epochs, each file requested twice
    assert stream.skipped_count == 2 and stream.batches_done == 4
    assert torch.equal(batches[0][0][2], ref[3][0]) and torch.equal(batches[2][0], batches[0][0])
    stream.close()


# the stream


def test_deterministic_order_and_epochs(tmp_path):
    D.make_image_folder(tmp_path, 7, 8, classes=("a", "b", "c"))
    ds = D.ImageFolderDataset(tmp_path, 8, class_cond=True, random_flip=False)
    stream = D.load_data(data_dir=tmp_path, batch_size=3, image_size=8, class_cond=True,
                         deterministic=True, random_flip=False, num_workers=0)
    assert stream.num_images == 7 and stream.classes == ["a", "b", "c"]
    assert stream.batches_per_epoch == 2
    batches = _take(stream, 4)
    for b, (x, cond) in enumerate(batches):
        idx = [(b % 2) * 3 + j for j in range(3)]  # item 6 is the dropped remainder
        assert x.shape == (3, 3, 8, 8) and cond["y"].shape == (3,)
        assert torch.equal(x, torch.stack([ds[i][0] for i in idx]))
        assert cond["y"].tolist() == [ds.labels[i] for i in idx]


def test_shuffle_is_seeded_and_independent_of_workers(tmp_path):
    D.make_image_folder(tmp_path, 10, 8, classes=("a", "b"))
    kw = dict(data_dir=tmp_path, batch_size=4, image_size=8, class_cond=True, seed=3)
    a = _take(D.load_data(num_workers=0, **kw), 5)
    b = _take(D.load_data(num_workers=2, **kw), 5)
    _same(a, b)
    c = _take(D.load_data(num_workers=0, **{**kw, "seed": 4}), 5)
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c))
    # Each epoch (two batches of the 10 images) shows 8 distinct images, in a new order.
    ref = D.ImageFolderDataset(tmp_path, 8, random_flip=False)
    plain = _take(D.load_data(num_workers=0, **{**kw, "random_flip": False}), 4)
    def ids(batch):
        return [next(i for i in range(10) if torch.equal(x, ref[i][0])) for x in batch[0]]
    epoch0, epoch1 = ids(plain[0]) + ids(plain[1]), ids(plain[2]) + ids(plain[3])
    assert len(set(epoch0)) == 8 and len(set(epoch1)) == 8 and epoch0 != epoch1
    assert epoch0 != sorted(epoch0)


def test_start_batch_resumes_exactly_without_decoding_the_skipped(tmp_path, monkeypatch):
    D.make_image_folder(tmp_path, 10, 8, classes=("a", "b"))
    kw = dict(data_dir=tmp_path, batch_size=4, image_size=8, class_cond=True,
              random_crop=True, seed=1, num_workers=0)
    full = _take(D.load_data(**kw), 7)  # 2 batches per epoch: spans epochs 0..3
    decoded = []
    real = D._decode
    monkeypatch.setattr(D, "_decode", lambda p, *a: decoded.append(p) or real(p, *a))
    resumed = D.load_data(start_batch=3, **kw)
    tail = _take(resumed, 4)
    _same(tail, full[3:])
    assert len(decoded) == 16 and resumed.batches_done == 7
    resumed.close()  # a closed stream picks up where it stopped
    _same(_take(resumed, 1), _take(D.load_data(start_batch=7, **kw), 1))


@pytest.mark.parametrize("deterministic", [True, False])
def test_ranks_split_the_one_process_batches(tmp_path, deterministic):
    """The data do not depend on the world size: rank r of W gets items r::W of
    the batch one process gets (so both see the same samples, in the same
    places of the global batch), across epochs and from any start batch."""
    D.make_image_folder(tmp_path, 11, 8, classes=("a", "b", "c"))
    kw = dict(data_dir=tmp_path, image_size=8, class_cond=True, num_workers=0, seed=4,
              deterministic=deterministic, random_crop=True)
    one = _take(D.load_data(batch_size=4, **kw), 6)  # 2 global batches per epoch
    for start in (0, 3):
        ranks = [_take(D.load_data(batch_size=2, rank=r, world_size=2, start_batch=start,
                                   **kw), 6 - start) for r in range(2)]
        for b in range(6 - start):
            x, cond = one[start + b]
            for r in range(2):
                assert torch.equal(ranks[r][b][0], x[r::2]), (start, b, r)
                assert torch.equal(ranks[r][b][1]["y"], cond["y"][r::2])
    if deterministic:  # folder order: guided-diffusion's files[r::W] shards
        ds = D.ImageFolderDataset(tmp_path, 8, class_cond=True, random_flip=False)
        first = next(D.load_data(batch_size=2, rank=1, world_size=2,
                                 **{**kw, "random_crop": False, "random_flip": False}))
        assert torch.equal(first[0], torch.stack([ds[1][0], ds[3][0]]))


def test_make_image_folder_is_seeded_and_class_dependent(tmp_path):
    a = D.make_image_folder(tmp_path / "a", 4, 12, classes=("x", "y"), seed=2, ext="jpg")
    b = D.make_image_folder(tmp_path / "b", 4, 12, classes=("x", "y"), seed=2, ext="jpg")
    assert [os.path.basename(p) for p in a] == ["x_00000.jpg", "x_00002.jpg",
                                               "y_00001.jpg", "y_00003.jpg"]
    for p, q in zip(a, b):
        assert np.array_equal(np.asarray(Image.open(p)), np.asarray(Image.open(q)))
    mean = [np.asarray(Image.open(p), dtype=np.float64).mean((0, 1)) for p in a]
    # Same class: close mean colour; different classes: far apart.
    assert np.abs(mean[0] - mean[1]).max() < np.abs(mean[0] - mean[2]).max() / 2
    with pytest.raises(DataError, match="'_'"):
        D.make_image_folder(tmp_path / "c", 2, 8, classes=("a_b", "c"))
    with pytest.raises(DataError, match="ext"):
        D.make_image_folder(tmp_path / "c", 2, 8, ext="bmp")
