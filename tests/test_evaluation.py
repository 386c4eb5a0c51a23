"""adm_fast.evaluation: the evaluator's statistics against known answers, and the
network path on torch-fidelity's InceptionV3 with random weights (no download).

The CLI end to end (with the real 2048-d sqrtm) is in test_evaluation_cli.py."""

import importlib.util
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adm_fast.evaluation import (
    EvaluationError,
    Evaluator,
    feature_statistics,
    frechet_distance,
    inception_score,
    manifold_radii,
    network,
    pairwise_distances,
    precision_recall,
    random_weights,
)
from adm_fast.evaluation.batches import folder_images, read_stats
from adm_fast.image_files import center_crop_arr


def _spd(rng, d, floor=0.1):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + floor * np.eye(d)


def _psd_sqrt(s):
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _closed_form(mu1, s1, mu2, s2):
    """|mu1 - mu2|^2 + tr(s1 + s2 - 2 (s1 s2)^(1/2)), with tr (s1 s2)^(1/2) taken as
    tr (s1^(1/2) s2 s1^(1/2))^(1/2), a symmetric eigenproblem: no sqrtm."""
    r = _psd_sqrt(s1)
    w = np.linalg.eigvalsh(r @ s2 @ r)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2)
                 - 2 * np.sqrt(np.clip(w, 0, None)).sum())


# --- Fréchet distance -------------------------------------------------------

def test_fid_of_two_gaussians_matches_the_closed_form():
    rng = np.random.default_rng(1)
    d = 7
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d) + 0.5
    s1, s2 = _spd(rng, d), _spd(rng, d)
    fid, ref = frechet_distance(mu1, s1, mu2, s2), _closed_form(mu1, s1, mu2, s2)
    # Both routes are fp64 eigen/Schur computations of O(1) matrices: ~1e-14.
    assert abs(fid - ref) <= 1e-10 * ref, (fid, ref)
    # Diagonal covariances: tr(s1 + s2 - 2 sqrt(s1 s2)) = sum (sqrt a - sqrt b)^2.
    a, b = rng.uniform(0.2, 3, d), rng.uniform(0.2, 3, d)
    diag = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(diag, rel=1e-12)
    # Tensors in, the same number out.
    t = frechet_distance(*(torch.from_numpy(x) for x in (mu1, s1, mu2, s2)))
    assert t == pytest.approx(fid, rel=1e-14)


def test_fid_from_samples_converges_to_the_closed_form():
    rng = np.random.default_rng(2)
    d, n = 3, 200_000
    mu1, mu2 = np.zeros(d), np.array([1.0, -0.5, 0.25])
    s1, s2 = _spd(rng, d, 0.5), _spd(rng, d, 0.5)
    x = rng.multivariate_normal(mu1, s1, n).astype(np.float32)
    y = rng.multivariate_normal(mu2, s2, n).astype(np.float32)
    a, b = feature_statistics(x, device="cpu"), feature_statistics(y, device="cpu")
    assert a.mu.dtype == np.float32 and a.sigma.dtype == np.float64  # the evaluator's dtypes
    np.testing.assert_allclose(a.sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(a.mu, x.astype(np.float64).mean(0), rtol=0, atol=1e-6)
    # Sampling error: the |dmu|^2 term has std ~ 2 sqrt(dmu' (s1+s2) dmu / n) ~ 0.01
    # here and the bias is O(d / n); 0.06 is 6 of those standard deviations.
    assert a.frechet_distance(b) == pytest.approx(_closed_form(mu1, s1, mu2, s2), abs=0.06)


def test_fid_symmetry_and_invariances():
    rng = np.random.default_rng(3)
    d = 6
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _spd(rng, d), _spd(rng, d)
    fid = frechet_distance(mu1, s1, mu2, s2)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(fid, rel=1e-12)
    shift = rng.standard_normal(d) * 10
    assert frechet_distance(mu1 + shift, s1, mu2 + shift, s2) == pytest.approx(fid, rel=1e-10)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    assert frechet_distance(q @ mu1, q @ s1 @ q.T, q @ mu2, q @ s2 @ q.T) == \
        pytest.approx(fid, rel=1e-10)
    assert frechet_distance(3 * mu1, 9 * s1, 3 * mu2, 9 * s2) == pytest.approx(9 * fid, rel=1e-10)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) <= 1e-12 * np.trace(s1)


def test_fid_singular_product_takes_the_eps_fallback():
    from scipy import linalg

    # A rank-1 and a full-rank PSD matrix whose product scipy's sqrtm cannot root.
    s1 = np.array([[4.0, -2.0, 0.0], [-2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    s2 = np.array([[4.0, 2.0, 4.0], [2.0, 5.0, -2.0], [4.0, -2.0, 8.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert not np.isfinite(linalg.sqrtm(s1 @ s2)).all(), "no longer a singular case"
    mu1, mu2, eps = np.zeros(3), np.ones(3), 1e-6
    with pytest.warns(RuntimeWarning, match="singular product; adding 1e-06"):
        fid = frechet_distance(mu1, s1, mu2, s2, eps=eps)
    off = eps * np.eye(3)
    # The evaluator's fallback: the offset enters the root only, not the traces.
    r = _psd_sqrt(s1 + off)
    root = np.sqrt(np.clip(np.linalg.eigvalsh(r @ (s2 + off) @ r), 0, None)).sum()
    want = 3.0 + np.trace(s1) + np.trace(s2) - 2 * root
    assert fid == pytest.approx(want, rel=1e-6)


def test_fid_errors():
    with pytest.raises(EvaluationError, match="imaginary component"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), -np.eye(2))
    with pytest.raises(EvaluationError, match="means have shapes"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(EvaluationError, match="sigma2 has shape"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(3))
    with pytest.raises(EvaluationError, match="mu1 holds NaN"):
        frechet_distance(np.array([np.nan, 0]), np.eye(2), np.zeros(2), np.eye(2))
    with pytest.raises(EvaluationError, match="at least 2"):
        feature_statistics(np.zeros((1, 4)))


# --- Inception Score ----------------------------------------------------------

def _is_reference(p, split):
    """The evaluator's loop, in fp64, with 0 log 0 = 0."""
    scores = []
    for i in range(0, len(p), split):
        part = p[i:i + split]
        marg = part.mean(0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(marg)), 0.0)
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores))


def test_inception_score_of_uniform_and_one_hot_predictions():
    assert inception_score(np.full((12, 10), 0.1)) == pytest.approx(1.0, abs=1e-12)
    # One-hot over K classes, equally often: KL = log K for every row, IS = K.
    assert inception_score(np.eye(4)[np.arange(12) % 4]) == pytest.approx(4.0, rel=1e-12)
    # Splits of 4 over 10 rows cycling through 5 classes: the splits see 4, 4 and
    # 2 distinct classes (the last split is short), so IS = (4 + 4 + 2) / 3.
    p = np.eye(5)[np.arange(10) % 5]
    assert inception_score(p, split_size=4) == pytest.approx(10 / 3, rel=1e-12)
    assert inception_score(torch.from_numpy(p), split_size=4) == pytest.approx(10 / 3, rel=1e-12)


def test_inception_score_takes_0_log_0_as_0_where_the_evaluator_gives_nan():
    """README's one difference: a probability of exactly 0 gives the evaluator's
    numpy 0 * -inf = NaN, and so a NaN score; adm_fast's score stays defined."""
    p = np.eye(4)[np.arange(12) % 4]
    with np.errstate(divide="ignore", invalid="ignore"):  # evaluator.py's lines
        kl = p * (np.log(p) - np.log(np.expand_dims(np.mean(p, 0), 0)))
        evaluator = float(np.mean([np.exp(np.mean(np.sum(kl, 1)))]))
    assert np.isnan(evaluator)
    assert inception_score(p) == pytest.approx(4.0, rel=1e-12)


def test_inception_score_matches_the_evaluator_formula():
    rng = np.random.default_rng(4)
    p = rng.dirichlet(np.full(13, 0.3), size=37)
    assert inception_score(p, split_size=10) == pytest.approx(_is_reference(p, 10), rel=1e-12)
    assert inception_score(p.astype(np.float32)) == pytest.approx(_is_reference(p, 5000),
                                                                  rel=1e-5)


def test_inception_score_errors():
    with pytest.raises(EvaluationError, match="negative entries"):
        inception_score(np.array([[2.0, -1.0]]))
    with pytest.raises(EvaluationError, match="differs from 1"):
        inception_score(np.array([[0.5, 0.6]]))
    with pytest.raises(EvaluationError, match="split_size must be a positive integer"):
        inception_score(np.full((2, 2), 0.5), split_size=0)
    with pytest.raises(EvaluationError, match=r"expected \[N, D\]"):
        inception_score(np.full(4, 0.25))


# --- Precision / Recall -------------------------------------------------------

def test_precision_recall_on_a_set_derived_by_hand():
    # 1-D points; squared distances. Reference {0,1,2,3,8}: radii (3rd nearest
    # other point) 9, 4, 4, 9 and, for 8, 49 (its neighbours 3, 2, 1 at 25, 36, 49).
    # Samples {0,1,2,3,15,16,17,18}: radii 9, 4, 4, 9, 9, 4, 4, 9.
    # Precision: 0..3 coincide with reference points; 15 is at 49 from 8, which
    # is its radius (<= counts); 16, 17, 18 are beyond -> 5/8.
    # Recall: 0..3 coincide with samples; 8 is at 25 from 3 (radius 9) and 49
    # from 15 (radius 9) -> outside -> 4/5.
    ref = np.array([0, 1, 2, 3, 8.0])[:, None]
    sample = np.array([0, 1, 2, 3, 15, 16, 17, 18.0])[:, None]
    np.testing.assert_array_equal(manifold_radii(ref, k=3), [9, 4, 4, 9, 49])
    np.testing.assert_array_equal(manifold_radii(sample), [9, 4, 4, 9, 9, 4, 4, 9])
    assert precision_recall(ref, sample) == (5 / 8, 4 / 5)
    assert precision_recall(torch.from_numpy(ref), torch.from_numpy(sample)) == (5 / 8, 4 / 5)


def _brute_force(ref, sample, k):
    d = lambda a, b: ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)  # noqa: E731
    r_ref, r_sample = np.sort(d(ref, ref), 1)[:, k], np.sort(d(sample, sample), 1)[:, k]
    d_rs = d(ref, sample)
    precision = (d_rs <= r_ref[:, None]).any(0).mean()
    recall = (d_rs <= r_sample[None, :]).any(1).mean()
    return r_ref, r_sample, (float(precision), float(recall))


@pytest.mark.parametrize("k", [1, 3])
def test_precision_recall_matches_brute_force_in_blocks(k):
    # Integer features with every |norm|, dot product and distance below 2048:
    # exact in fp16, so the fp16 path must agree with exact arithmetic, ties included.
    rng = np.random.default_rng(5 + k)
    ref = rng.integers(-9, 10, (23, 3))
    sample = rng.integers(-9, 10, (17, 3))
    r_ref, r_sample, want = _brute_force(ref, sample, k)
    for rows, cols in [(10000, 10000), (5, 3), (1, 7)]:
        got = manifold_radii(ref.astype(np.float32), k=k, row_batch_size=rows,
                             col_batch_size=cols)
        np.testing.assert_array_equal(got, r_ref)
        assert precision_recall(ref.astype(np.float32), sample.astype(np.float32), k=k,
                                row_batch_size=rows, col_batch_size=cols) == want


def test_distances_are_fp16_then_fp32_where_fp16_overflows():
    rng = np.random.default_rng(7)
    u = torch.from_numpy(rng.standard_normal((9, 16)))
    v = torch.from_numpy(rng.standard_normal((5, 16)))
    exact = ((u[:, None] - v[None]) ** 2).sum(-1)
    d16 = pairwise_distances(u.float(), v.float())
    assert d16.dtype == torch.float32
    assert torch.equal(d16, d16.half().float())  # the values are fp16's
    # fp16 rounds each of |u|^2, -2uv, |v|^2 to 11 bits; the sum to ~30 carries that.
    assert (d16.double() - exact).abs().max() <= 2e-3 * exact.max()
    big = u * 300  # |u|^2 ~ 1.4e6 > 65504: the fp16 block is inf, computed in fp32
    d32 = pairwise_distances(big.float(), v.float())
    assert not torch.equal(d32, d32.half().float())
    exact_big = ((big[:, None] - v[None]) ** 2).sum(-1)
    # fp32: |u|^2 - 2uv + |v|^2 cancels to the distance; error ~ 16 eps |u|^2.
    assert (d32.double() - exact_big).abs().max() <= 16 * 2 ** -23 * (big ** 2).sum(1).max()
    # Precision/recall on such features follow the fp32 distances.
    ref, sample = (rng.standard_normal((20, 8)) * 300, rng.standard_normal((15, 8)) * 300)
    assert precision_recall(ref, sample, k=3) == _brute_force(ref, sample, 3)[2]


def test_precision_recall_errors():
    with pytest.raises(EvaluationError, match="need more than 3"):
        manifold_radii(np.zeros((3, 2)))
    with pytest.raises(EvaluationError, match="3-d but sample_features are 2-d"):
        precision_recall(np.zeros((5, 3)), np.zeros((5, 2)))
    with pytest.raises(EvaluationError, match="k must be a positive integer"):
        precision_recall(np.zeros((5, 3)), np.zeros((5, 3)), k=0)
    with pytest.raises(EvaluationError, match="NaN"):
        manifold_radii(np.full((5, 2), np.inf))


# --- the network ----------------------------------------------------------------

@pytest.fixture(scope="module")
def weights():
    return random_weights(0)


@pytest.fixture(scope="module")
def evaluator(weights):
    return Evaluator(weights, device="cpu", batch_size=3)


def _images(seed, n, h, w):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_port_loads_without_torchvision():
    port = network.load_port()
    assert port.FeatureExtractorInceptionV3.__name__ == "FeatureExtractorInceptionV3"
    try:
        import torchvision  # noqa: F401
    except Exception:  # absent here (or broken): the package itself must stay unimported
        assert "torch_fidelity" not in sys.modules
        with pytest.raises(ImportError):
            import torch_fidelity  # noqa: F401


def test_activations_shapes_and_batching(evaluator, weights):
    x = _images(0, 2, 20, 28)  # non-square, not 299: the network resizes
    pool, spatial = evaluator.compute_activations(x)
    assert pool.shape == (2, 2048) and spatial.shape == (2, 17 * 17 * 7)
    assert pool.dtype == spatial.dtype == np.float32
    assert (spatial >= 0).all() and (spatial > 0).mean() > 0.2  # after the ReLU
    # The same images one by one (a tensor) and as a stream of batches.
    one = Evaluator(weights, device="cpu", batch_size=1)
    pool1, spatial1 = one.compute_activations(torch.from_numpy(x))
    pool2, _ = evaluator.compute_activations(iter([x[:1], x[1:]]))
    # An fp64 run of the same network bounds fp32's own error; batching may
    # reorder sums within that.
    net64 = Evaluator(weights, device="cpu").network.double()
    net64.net.feature_extractor_internal_dtype = torch.float64
    with torch.no_grad():
        pool64, spatial64 = net64(torch.from_numpy(x))
    tol_p = 2 * np.abs(pool - pool64.numpy()).max() + 1e-6 * np.abs(pool).max()
    tol_s = 2 * np.abs(spatial - spatial64.numpy()).max() + 1e-6 * np.abs(spatial).max()
    assert np.abs(pool1 - pool).max() <= tol_p and np.abs(pool2 - pool).max() <= tol_p
    assert np.abs(spatial1 - spatial).max() <= tol_s


def test_spatial_features_are_mixed_6d_branch1x1(evaluator):
    """mixed_6/conv:0 = the ReLU output of Mixed_6d.branch1x1, NHWC, channels 0..6."""
    x = _images(1, 2, 32, 32)
    _, spatial = evaluator.compute_activations(x)
    port, net = network.load_port(), evaluator.network.net
    h = torch.from_numpy(x).permute(0, 3, 1, 2).float()
    h = port.interpolate_bilinear_2d_like_tensorflow1x(h, size=(299, 299), align_corners=False)
    h = (h - 128) / 128
    taps = {}
    with torch.no_grad():
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1",
                     "Conv2d_3b_1x1", "Conv2d_4a_3x3", "MaxPool_2", "Mixed_5b", "Mixed_5c",
                     "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d"):
            taps[name] = net.get_submodule(name).branch1x1(h) if name in (
                "Mixed_6c", "Mixed_6d") else None
            h = net.get_submodule(name)(h)
    flat = {k: v[:, :7].permute(0, 2, 3, 1).reshape(2, -1).numpy()
            for k, v in taps.items() if v is not None}
    assert flat["Mixed_6d"].shape == spatial.shape
    np.testing.assert_allclose(spatial, flat["Mixed_6d"], rtol=1e-5, atol=1e-5)
    assert np.abs(spatial - flat["Mixed_6c"]).max() > 1e-2
    # NCHW order would put all 289 positions of channel 0 first: not the evaluator's.
    nchw = taps["Mixed_6d"][:, :7].reshape(2, -1).numpy()
    assert np.abs(spatial - nchw).max() > 1e-2


def test_the_port_resizes_as_tf1_resize_bilinear():
    """TF1 ResizeBilinear (align_corners=False): source = dst * (in / out) in fp32,
    floor, upper index clamped, two lerps; PyTorch's align_corners=False (what
    pytorch-fid uses) samples at half-pixel centres instead."""
    port = network.load_port()
    x = np.random.default_rng(2).uniform(0, 255, (1, 3, 13, 21))

    def axis(n_in, n_out):
        src = np.arange(n_out, dtype=np.float32) * np.float32(n_in / n_out)
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), src.astype(np.float64) - lo

    (y0, y1, fy), (x0, x1, fx) = axis(13, 299), axis(21, 299)
    top = x[..., y0, :][..., x0] + (x[..., y0, :][..., x1] - x[..., y0, :][..., x0]) * fx
    bot = x[..., y1, :][..., x0] + (x[..., y1, :][..., x1] - x[..., y1, :][..., x0]) * fx
    tf1 = top + (bot - top) * fy[:, None]
    t = torch.from_numpy(x).float()
    out = port.interpolate_bilinear_2d_like_tensorflow1x(t, size=(299, 299), align_corners=False)
    assert np.abs(out.double().numpy() - tf1).max() <= 255 * 4 * 2 ** -23 * 4
    half_pixel = F.interpolate(t, size=(299, 299), mode="bilinear", align_corners=False)
    assert np.abs(half_pixel.double().numpy() - tf1).max() > 10


def test_softmax_uses_the_logits_weight_without_bias(evaluator):
    pool = np.random.default_rng(3).uniform(0, 2, (4, 2048)).astype(np.float32)
    w, b = evaluator.network.logits_weight, evaluator.network.net.fc.bias
    want = torch.softmax(torch.from_numpy(pool) @ w.T, 1).numpy()
    np.testing.assert_allclose(evaluator.softmax(pool), want, rtol=1e-6, atol=1e-9)
    with_bias = torch.softmax(torch.from_numpy(pool) @ w.T + b, 1).numpy()
    assert np.abs(with_bias - want).max() > 1e-4


def test_saved_stats_round_trip(evaluator, tmp_path):
    from PIL import Image

    x = _images(4, 3, 16, 16)
    src = tmp_path / "real.npz"
    np.savez(src, x)
    out = tmp_path / "ref.npz"
    assert evaluator.save_reference(str(src), str(out)) == 3
    acts = evaluator.compute_activations(x)
    with np.load(out) as f:
        np.testing.assert_array_equal(f["arr_0"], x)
    stats, spatial = evaluator.read_statistics(str(out), acts)  # read from the file
    want = feature_statistics(acts[0]), feature_statistics(acts[1])
    for got, ref in zip((stats, spatial), want):
        np.testing.assert_array_equal(got.mu, ref.mu)
        np.testing.assert_allclose(got.sigma, ref.sigma, rtol=1e-12, atol=1e-12)
    # A folder of images: the same images give the same reference batch.
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, img in enumerate(x):
        Image.fromarray(img).save(folder / f"{i}.png")
    out2 = tmp_path / "ref2.npz"
    evaluator.save_reference(str(folder), str(out2))
    a, b = read_stats(str(out)), read_stats(str(out2))
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-6, atol=1e-6)
    Image.fromarray(_images(5, 1, 20, 16)[0]).save(folder / "9.png")
    with pytest.raises(EvaluationError, match=r"9.png is 16x20 but .*0.png is 16x16.*--image_size"):
        evaluator.save_reference(str(folder), str(tmp_path / "bad.npz"))
    assert not (tmp_path / "bad.npz").exists()
    # --image_size: each image resized and centre-cropped as guided-diffusion's loader.
    shape, batches = folder_images(str(folder), image_size=8)
    assert shape == (4, 8, 8, 3)
    got = np.concatenate(list(batches(3)))
    with Image.open(folder / "9.png") as im:
        np.testing.assert_array_equal(got[-1], center_crop_arr(im.convert("RGB"), 8))
    (folder / "9.png").unlink()
    (folder / "broken.png").write_bytes(b"not a png")
    with pytest.raises(EvaluationError, match="broken.png: not a readable image"):
        folder_images(str(folder))


def test_weights_errors(tmp_path, monkeypatch, weights):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    cache = tmp_path / "home" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    with pytest.raises(EvaluationError, match="download https://github.com/toshas/torch-"
                       f"fidelity/.*weights-inception-2015-12-05-6726825d.pth to {cache}"):
        Evaluator(device="cpu")
    with pytest.raises(EvaluationError, match="--inception .*nope.pth: no such file"):
        Evaluator(tmp_path / "nope.pth", device="cpu")
    bad = dict(weights)
    bad.pop("fc.bias")
    bad["fc.weight"] = bad["fc.weight"][:1000]
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(EvaluationError, match="not torch-fidelity's InceptionV3 weights "
                       r"\(1 missing: fc.bias; 1 with other shapes: fc.weight\)"):
        Evaluator(tmp_path / "bad.pth", device="cpu")
    torch.save({"net": torch.nn.Linear(2, 2)}, tmp_path / "pickle.pth")
    with pytest.raises(EvaluationError, match="refusing to load"):
        Evaluator(tmp_path / "pickle.pth", device="cpu")
    with pytest.raises(EvaluationError, match="dtype must be one of fp32, bf16"):
        Evaluator(weights, dtype="fp16")


def test_bad_images(evaluator):
    with pytest.raises(EvaluationError, match="is float32: the evaluator takes uint8"):
        evaluator.compute_activations(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(EvaluationError, match="looks like NCHW"):
        evaluator.compute_activations(np.zeros((2, 3, 8, 8), np.uint8))
    with pytest.raises(EvaluationError, match=r"expected 4-D"):
        evaluator.compute_activations(np.zeros((8, 8, 3), np.uint8))


def test_npz_images_are_streamed_in_batches(tmp_path):
    import zipfile

    from adm_fast.evaluation.batches import open_images

    x = _images(6, 7, 5, 4)
    for name, save in (("plain", np.savez), ("compressed", np.savez_compressed)):
        save(tmp_path / f"{name}.npz", x, arr_1=np.arange(7))
        with open_images(str(tmp_path / f"{name}.npz")) as reader:
            assert reader.shape == x.shape and len(reader) == 7
            parts = list(reader.batches(3))
        assert [len(p) for p in parts] == [3, 3, 1]
        np.testing.assert_array_equal(np.concatenate(parts), x)
    np.savez(tmp_path / "fortran.npz", np.asfortranarray(x))  # loaded whole, as the evaluator
    with open_images(str(tmp_path / "fortran.npz")) as reader:
        np.testing.assert_array_equal(np.concatenate(list(reader.batches(4))), x)
    # A header that promises 9 images over the bytes of 7: refused when the file
    # is opened (from the header and the zip's sizes), before any image is read.
    with zipfile.ZipFile(tmp_path / "short.npz", "w") as zf, zf.open("arr_0.npy", "w") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False,
                                                 "shape": (9, 5, 4, 3)})
        f.write(x.tobytes())
    with (pytest.raises(EvaluationError, match="short.npz: arr_0 is truncated: 7 of 9"),
          open_images(str(tmp_path / "short.npz"))):
        pass


def test_cli_imports_neither_the_network_nor_scipy():
    import subprocess

    code = ("import sys; from adm_fast.evaluation import cli; rc = cli.main(['--help']); "
            "heavy = ('scipy', 'torch_fidelity.feature_extractor_inceptionv3', "
            "'adm_fast.evaluation.network', 'adm_fast.evaluation.stats'); "
            "print(rc, [m for m in heavy if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip().splitlines()[-1] == "0 []"
    assert importlib.util.find_spec("adm_fast.evaluation.cli") is not None
