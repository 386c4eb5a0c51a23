"""group_norm_act: the eager reference against GroupNorm from its definition
(fp64), the Triton kernels against the reference, fwd and bwd, and bad input."""

import pytest
import torch
from helpers import CPU_EXT, DEVICE, assert_lowp_close, launched_pointers, poisoned, rel_err

from adm_fast import ops


def gn_act_fp64(x, g, w, b, scale, shift, eps, act):
    """GroupNorm from its definition, in fp64."""
    x = x.double()
    n, c = x.shape[:2]
    xg = x.reshape(n, g, -1)
    mean = xg.mean(-1, keepdim=True)
    var = ((xg - mean) ** 2).mean(-1, keepdim=True)
    h = ((xg - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    bc = (1,) * (x.dim() - 2)
    h = h * w.double().reshape(c, *bc) + b.double().reshape(c, *bc)
    if scale is not None:
        h = h * (1 + scale.double().reshape(n, c, *bc)) + shift.double().reshape(n, c, *bc)
    return h * torch.sigmoid(h) if act else h


GN_SHAPES = [(2, 64, 8, 8), (1, 96, 7, 7), (3, 64, 5, 9), (2, 128, 16, 16), (4, 2048)]


@pytest.mark.parametrize("shape, channels_last",
                         [(s, False) for s in GN_SHAPES] + [(s, True) for s in GN_SHAPES[:4]])
@pytest.mark.parametrize("mode", ["adagn", "act", "plain"])
def test_group_norm_act_reference(shape, mode, channels_last):
    n, c = shape[:2]
    x = torch.randn(shape) * 3 + 1.5  # non-zero mean
    if channels_last:  # 4-D: channels_last; 3-D: the [N, C, T] view of one (C contiguous)
        x = (x.to(memory_format=torch.channels_last) if x.dim() == 4
             else x.movedim(1, -1).contiguous().movedim(-1, 1))
    w, b = torch.randn(c) + 1, torch.randn(c)
    scale = torch.randn(n, c) if mode == "adagn" else None
    shift = torch.randn(n, c) if mode == "adagn" else None
    act = mode != "plain"
    out = ops.group_norm_act(x, 32, w, b, scale, shift, act=act)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert rel_err(out, gn_act_fp64(x, 32, w, b, scale, shift, 1e-5, act)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_group_norm_statistics_in_fp32(dtype):
    # A large offset ruins E[x²]−E[x]² in low precision; fp32 statistics survive it.
    x = (torch.randn(2, 64, 8, 8) + 200).to(dtype)
    w, b = torch.ones(64), torch.zeros(64)
    out = ops.group_norm_act(x, 32, w, b, act=False)
    assert out.dtype == dtype
    ref = gn_act_fp64(x, 32, w, b, None, None, 1e-5, False)
    eps = torch.finfo(dtype).eps
    assert (out.double() - ref).abs().max() <= 8 * eps * ref.abs().max()


@pytest.mark.parametrize("kw, err, match", [
    (dict(scale=torch.zeros(2, 32), shift=torch.zeros(2, 32)), ValueError, r"scale must have shape \(2, 64\)"),
    (dict(num_groups=48), ValueError, "num_groups=48 must divide the 64 channels"),
    (dict(x=torch.zeros(2, 64, 4, 4, dtype=torch.int32)), TypeError, "floating-point"),
    (dict(weight=torch.zeros(32)), ValueError, r"weight must have shape \(64,\)"),
    (dict(weight=torch.zeros(64, device="meta")), ValueError, "weight is on meta but x is on cpu"),
    (dict(x=torch.zeros(64)), ValueError, r"must be \[N, C, \*spatial\]"),
    # one rule for every backend (the CPU kernel refused inf after the op took it)
    (dict(eps=float("inf")), ValueError, "eps must be a finite number > 0, got inf"),
    (dict(eps=float("nan")), ValueError, "eps must be a finite number > 0, got nan"),
    (dict(eps=0.0), ValueError, "eps must be a finite number > 0, got 0.0"),
    (dict(eps=-1e-5), ValueError, "eps must be a finite number > 0"),
])
def test_group_norm_act_bad_inputs(kw, err, match):
    args = dict(x=torch.randn(2, 64, 4, 4), num_groups=32, weight=torch.ones(64),
                bias=torch.zeros(64))
    args.update(kw)
    with pytest.raises(err, match=match):
        ops.group_norm_act(**args)


# --- the Triton kernels ------------------------------------------------------------

from adm_fast import use_backend  # noqa: E402


def make_inputs(shape, mode, dtype, channels_last=False, device=DEVICE):
    n, c = shape[:2]
    x = torch.randn(shape) * 2 + 1.5
    if channels_last:  # 4-D: channels_last; 3-D: the [N, C, T] view of one (C contiguous)
        x = (x.to(memory_format=torch.channels_last) if x.dim() == 4
             else x.movedim(1, -1).contiguous().movedim(-1, 1))
    w, b = torch.randn(c) * 0.5 + 1, torch.randn(c) * 0.5
    scale = shift = None
    if mode == "adagn":  # the halves of one embedding projection, as ResBlock makes them
        scale, shift = (torch.randn(n, 2 * c) * 0.5).chunk(2, dim=1)
    cast = lambda t: None if t is None else t.to(device=device)  # noqa: E731
    return dict(x=cast(x).to(dtype), weight=cast(w), bias=cast(b),
                scale=None if scale is None else cast(scale).to(dtype),
                shift=None if shift is None else cast(shift).to(dtype),
                act=mode != "plain")


def run(backend, inp, dy):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inp.items()
              if isinstance(v, torch.Tensor)}
    with use_backend({"group_norm_act": backend}):
        out = ops.group_norm_act(leaves["x"], 32, leaves["weight"], leaves["bias"],
                                 leaves.get("scale"), leaves.get("shift"), act=inp["act"])
    grads = torch.autograd.grad(out, list(leaves.values()), dy)
    return out, dict(zip(leaves, grads))


def fp64_reference(inp, dy):
    leaves = {k: v.detach().double().requires_grad_(True) for k, v in inp.items()
              if isinstance(v, torch.Tensor)}
    out = gn_act_fp64(leaves["x"], 32, leaves["weight"], leaves["bias"], leaves.get("scale"),
                      leaves.get("shift"), 1e-5, inp["act"])
    grads = torch.autograd.grad(out, list(leaves.values()), dy.double())
    return out, dict(zip(leaves, grads))


def use_triton_path(kind, monkeypatch):
    """Both kernel paths: one program per group in registers ("fused"), and the
    split statistics path with tiny tiles and many splits ("split"), so every
    loop, split combination and mask runs."""
    import adm_fast.kernels.group_norm_act as K

    if kind == "split":
        monkeypatch.setattr(K, "FUSED_MAX", {})
        monkeypatch.setattr(K, "TILE", {DEVICE: 64})
        monkeypatch.setattr(K, "TARGET_PROGRAMS", {DEVICE: 64})
    return kind


TRITON_CASES = [
    ((2, 128, 8, 8), "adagn", False),
    ((1, 96, 7, 7), "adagn", False),
    ((2, 64, 5, 9), "adagn", True),
    ((1, 256, 8, 8), "act", True),
    ((2, 64, 65), "plain", False),  # attention's norm: [N, C, T]
    ((3, 2048), "act", False),  # the spatial_v2 pool's norm: [N, C]
    ((1, 64, 16, 16), "act", False),  # split: several splits of several tiles
    ((2, 96, 65), "plain", True),  # attention's norm on a channels_last map: C contiguous
]


# Both paths on every case; the split path's tiny tiles take 10-20 s a case in
# the interpreter, so past the first three cases it is a slow test.
TRITON_FP32 = [pytest.param(kind, *case, id=f"{kind}-{i}",
                            marks=pytest.mark.slow if kind == "split" and i >= 3 else ())
               for kind in ("fused", "split") for i, case in enumerate(TRITON_CASES)]


@pytest.mark.parametrize("kind, shape, mode, channels_last", TRITON_FP32)
def test_triton_fp32(kind, shape, mode, channels_last, monkeypatch):
    use_triton_path(kind, monkeypatch)
    inp = make_inputs(shape, mode, torch.float32, channels_last)
    dy = torch.randn(shape, device=DEVICE)
    with poisoned():
        out, grads = run("triton", inp, dy)
    _check_fp32(inp, dy, out, grads)


def _check_fp32(inp, dy, out, grads):
    ref, ref_grads = fp64_reference(inp, dy)
    assert out.dtype == torch.float32 and out.stride() == inp["x"].stride()
    assert rel_err(out, ref) <= 1e-5
    for k in grads:
        assert rel_err(grads[k], ref_grads[k]) <= 1e-5, k


# NCHW and channels-last (the NHWC kernel), 4-D and the 3-D attention view.
CPU_CASES = TRITON_CASES + [((2, 256, 32, 32), "adagn", False), ((2, 256, 32, 32), "adagn", True),
                            ((2, 64, 65), "plain", True), ((1, 96, 7, 7), "act", True)]


@pytest.mark.skipif(not CPU_EXT, reason="the C++ CPU extension is not built")
@pytest.mark.parametrize("shape, mode, channels_last", CPU_CASES)
def test_cpu_fp32(shape, mode, channels_last):
    inp = make_inputs(shape, mode, torch.float32, channels_last, device="cpu")
    dy = torch.randn(shape)
    with poisoned():
        out, grads = run("cpu", inp, dy)
    _check_fp32(inp, dy, out, grads)
    assert grads["x"].stride() == inp["x"].stride()


@pytest.mark.skipif(not CPU_EXT, reason="the C++ CPU extension is not built")
@pytest.mark.parametrize("channels_last", [True, False])
def test_cpu_bytes_do_not_depend_on_the_thread_count(channels_last):
    """The NHWC kernel runs one of three schedules (one thread below 32K values;
    whole samples per task when they share out evenly among the threads; else
    chunks of rows across samples): the same arithmetic per sample, so the
    same bytes, fwd and bwd, whatever the thread count and batch."""
    torch.manual_seed(0)
    shapes = [(n, c, hw, hw) for n in (1, 2, 3, 4, 8) for c, hw in ((64, 4), (128, 16))]
    shapes += [(5, 96, 7, 7), (2, 256, 32, 32)]
    before = torch.get_num_threads()
    try:
        for shape in shapes:
            inp = make_inputs(shape, "adagn", torch.float32, channels_last, device="cpu")
            dy = torch.randn(shape)
            runs = []
            for threads in (1, 2, 3, 4):
                torch.set_num_threads(threads)
                out, grads = run("cpu", inp, dy)
                runs.append((threads, out, grads))
            _, out1, grads1 = runs[0]
            for threads, out, grads in runs[1:]:
                assert torch.equal(out, out1), (shape, threads)
                for k in grads:
                    assert torch.equal(grads[k], grads1[k]), (shape, threads, k)
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not CPU_EXT, reason="the C++ CPU extension is not built")
def test_cpu_backend_leaves_strided_x_to_eager():
    x = torch.randn(2, 64, 8, 16)[..., ::2]
    w, b = torch.ones(64), torch.zeros(64)
    with use_backend("cpu"), pytest.raises(ops.BackendNotSupported, match="it is strided"):
        ops.group_norm_act(x, 32, w, b)
    assert "eager: chosen" in ops.explain("group_norm_act", x, 32, w, b, None, None, 1e-5, True)


CUDA_EXT = DEVICE == "cuda" and not ops.backends()["cuda"].unavailable_reasons()


def _low_precision_cases():
    """(backend, shape, mode, channels_last) per backend that runs here, skipped
    cleanly where it does not."""
    cpu = pytest.mark.skipif(not CPU_EXT, reason="the C++ CPU extension is not built")
    cuda = [pytest.mark.gpu,
            pytest.mark.skipif(not CUDA_EXT, reason="needs a GPU and the CUDA extension")]
    cases = [pytest.param(f"triton-{kind}", case, id=f"triton-{kind}-{case[1]}")
             for kind in ("fused", "split") for case in (TRITON_CASES[0], TRITON_CASES[3])]
    # Attention's [N, C, T] view, with SiLU: Triton 3.6's interpreter truncates
    # fp32 -> bf16 (a GPU rounds to nearest), so where eager rounds once (a
    # plain norm's y and dx, AdaGN's Σ-sized dshift) the interpreter errs
    # twice eager's; SiLU's own bf16 roundings in eager leave room for it.
    cases += [pytest.param(f"triton-{kind}", ((2, 96, 65), "act", True),
                           id=f"triton-{kind}-ntc") for kind in ("fused", "split")]
    cases += [pytest.param("cpu", case, marks=cpu) for case in
              [((2, 128, 8, 8), "adagn", False), ((1, 96, 7, 7), "act", False),
               ((2, 64, 65), "plain", False), ((2, 128, 8, 8), "adagn", True),
               ((2, 64, 65), "plain", True)]]
    cases += [pytest.param("cuda", case, marks=cuda) for case in
              [TRITON_CASES[0], TRITON_CASES[3], ((4, 128, 64, 64), "adagn", True),
               TRITON_CASES[7], ((2, 512, 1024), "plain", True)]]
    return cases


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend, case", _low_precision_cases())
def test_low_precision(backend, case, dtype, monkeypatch):
    """Within twice torch's own error at that precision (the eager path run in
    that dtype), forward and every gradient, which keep their inputs' dtypes.
    Triton runs both kernel paths."""
    if backend.startswith("triton-"):
        use_triton_path(backend.split("-")[1], monkeypatch)
        backend = "triton"
    shape, mode, channels_last = case
    inp = make_inputs(shape, mode, dtype, channels_last,
                      device="cpu" if backend == "cpu" else DEVICE)
    dy = torch.randn(shape, device=inp["x"].device).to(dtype)
    with poisoned():
        out, grads = run(backend, inp, dy)
    lowp, lowp_grads = run("eager", inp, dy)
    ref, ref_grads = fp64_reference(inp, dy)
    assert out.dtype == dtype
    assert_lowp_close(out, ref, lowp, "y")
    for k in grads:
        assert grads[k].dtype == inp[k].dtype
        assert_lowp_close(grads[k], ref_grads[k], lowp_grads[k], k)




@pytest.mark.gpu
@pytest.mark.skipif(not CUDA_EXT, reason="needs a GPU and the CUDA extension")
@pytest.mark.parametrize("shape, mode, channels_last",
                         TRITON_CASES + [((2, 256, 32, 32), "adagn", True),
                                         ((2, 512, 1024), "plain", True)])
def test_cuda_fp32(shape, mode, channels_last):
    inp = make_inputs(shape, mode, torch.float32, channels_last)
    dy = torch.randn(shape, device=DEVICE)
    with poisoned():
        out, grads = run("cuda", inp, dy)
    _check_fp32(inp, dy, out, grads)
    assert grads["x"].stride() == inp["x"].stride()


@pytest.mark.parametrize("kind, shape", [("fused", (2, 64, 65)), ("split", (1, 64, 17))])
def test_triton_channels_last_1d_in_place(kind, shape, monkeypatch):
    """Attention's norm on a channels_last map: x and dy are read where they
    lie (no copy), y and dx come out in x's layout."""
    import adm_fast.kernels.group_norm_act as K

    use_triton_path(kind, monkeypatch)
    launches = launched_pointers(K, monkeypatch)
    inp = make_inputs(shape, "plain", torch.float32, channels_last=True)
    x = inp["x"].requires_grad_(True)
    dy = torch.randn(shape[0], shape[2], shape[1], device=DEVICE).transpose(1, 2)
    with use_backend({"group_norm_act": "triton"}), poisoned():
        y = ops.group_norm_act(x, 32, inp["weight"], inp["bias"], act=False)
        (dx,) = torch.autograd.grad(y, x, dy)
    assert x.stride()[1] == 1 and y.stride() == dx.stride() == x.stride()
    readers = {"gn_fwd_fused_kernel", "gn_stats_kernel", "gn_fwd_apply_kernel",
               "gn_bwd_reduce_kernel", "gn_bwd_apply_kernel"}
    assert readers & {name for name, _ in launches} >= {"gn_bwd_reduce_kernel"}
    for name, ptrs in launches:
        if name in readers:
            assert x.data_ptr() in ptrs, name
        if name.startswith("gn_bwd") and name != "gn_bwd_finalize_kernel":
            assert dy.data_ptr() in ptrs, name
    ref = gn_act_fp64(x.detach(), 32, inp["weight"], inp["bias"], None, None, 1e-5, False)
    assert rel_err(y, ref) <= 1e-5


def test_triton_statistics_survive_large_offsets():
    inp = make_inputs((2, 64, 16, 16), "plain", torch.float32)
    inp["x"] = inp["x"] + 1000.0  # E[x²] − E[x]² would lose every digit here
    dy = torch.randn(2, 64, 16, 16, device=DEVICE)
    out, grads = run("triton", inp, dy)
    ref, ref_grads = fp64_reference(inp, dy)
    assert rel_err(out, ref) <= 1e-4 and rel_err(grads["x"], ref_grads["x"]) <= 1e-3


def test_triton_rejects_strided_x_clearly():
    x = torch.randn(2, 64, 8, 16, device=DEVICE)[..., ::2]
    with use_backend("triton"), pytest.raises(ops.BackendNotSupported,
                                               match="neither contiguous nor channels_last"):
        ops.group_norm_act(x, 32, torch.ones(64, device=DEVICE), torch.zeros(64, device=DEVICE))
    out = ops.group_norm_act(x, 32, torch.ones(64, device=DEVICE), torch.zeros(64, device=DEVICE))
    assert torch.isfinite(out).all()  # auto falls back to eager


# Pre-activations across and beyond fp32 exp's range: SiLU's tails (e^-h under-
# and overflowing), the kernels' clamp at -87, ±inf (SiLU(-inf) is NaN in torch).
EXTREME_SHIFTS = [-float("inf"), -1e30, -200.0, -104.0, -88.0, -87.5, -87.0, -86.5, -30.0,
                  -5.0, -1e-3, 0.0, 1e-3, 5.0, 30.0, 87.0, 88.0, 100.0, 1e30, float("inf")]


# Triton's CPU interpreter runs on numpy, which warns where exp overflows.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", ["eager", "triton"] + (["cpu"] if CPU_EXT else []))
@pytest.mark.parametrize("channels_last", [False, True])
def test_silu_tails_and_infinities(backend, channels_last):
    c = 32 * 2  # one shift per channel, two channels per group
    shifts = torch.tensor(EXTREME_SHIFTS * 4)[:c].reshape(1, c)
    x = torch.randn(1, c, 4, 4) * 0.1 + 0.5
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.to(DEVICE).requires_grad_(True)
    shift, scale = shifts.to(DEVICE), torch.zeros(1, c, device=DEVICE)
    w, b = torch.ones(c, device=DEVICE), torch.zeros(c, device=DEVICE)
    with use_backend({"group_norm_act": backend}):
        out = ops.group_norm_act(x, 32, w, b, scale, shift, act=True)
    finite = torch.isfinite(shift).reshape(1, c, 1, 1).expand_as(out)
    dx, = torch.autograd.grad(out, x, torch.where(finite, 1.0, 0.0))
    x64 = x.detach().double().requires_grad_(True)
    ref = gn_act_fp64(x64, 32, w, b, scale, shift, 1e-5, True)
    dx_ref, = torch.autograd.grad(ref, x64, torch.where(finite, 1.0, 0.0).double())
    # Near h = 0 the normalisation's own fp32 error (~1e-7 of x̂) dominates; in
    # the tails (|h| >= 30) the error is relative, except that the true value
    # below fp32's smallest normal (h·e^h < 2e-36 for h < -87) may read as 0.
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6, equal_nan=True)
    tails = (shift.abs() >= 30).reshape(1, c, 1, 1).expand_as(out)
    torch.testing.assert_close(out.double()[tails], ref[tails], rtol=1e-5, atol=2e-36,
                               equal_nan=True)
    assert torch.equal(out.isnan(), ref.isnan())
    # dx: the groups without an infinite shift (0·SiLU'(±inf) is NaN, and the
    # normalisation's backward spreads it over the group).
    ok = torch.isfinite(shift).reshape(1, 32, 2).all(-1, keepdim=True).expand(1, 32, 2)
    ok = ok.reshape(1, c, 1, 1).expand_as(dx)
    torch.testing.assert_close(dx.double()[ok], dx_ref[ok], rtol=1e-4,
                               atol=1e-5 * dx_ref[ok].abs().max().item())
