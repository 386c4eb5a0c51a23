"""The fused sampling-step ops: argument checks and registration (their
numbers are checked against guided-diffusion in test_reference_diffusion)."""

import pytest
import torch
from helpers import CPU_EXT, DEVICE, REF, assert_lowp_close, launched_pointers, poisoned, rel_err

from adm_fast import ops

X = torch.randn(2, 3, 4, 4)


def args(**kw):
    base = dict(x=X, model_out=torch.randn(2, 6, 4, 4), noise=torch.randn_like(X),
                coefs=torch.rand(8, 2))
    base.update(kw)
    return base


@pytest.mark.parametrize("kw, err, match", [
    (dict(coefs=torch.rand(7, 2)), ValueError, r"coefs must be \[8, 2\]"),
    (dict(model_out=torch.randn(2, 3, 4, 4)), ValueError, r"model_out must be \[2, 6, 4, 4\]"),
    (dict(noise=torch.randn(2, 3, 4, 5)), ValueError, "noise must have x's shape"),
    (dict(grad=torch.randn(1, 3, 4, 4)), ValueError, "grad must have x's shape"),
    (dict(mean_type="v"), ValueError, "mean_type must be one of"),
    (dict(var_type="fixed_large"), ValueError, "var_type must be one of"),
    (dict(x=X.long()), TypeError, "x must be a floating-point tensor"),
    (dict(coefs=torch.rand(8, 2, device="meta")), ValueError, "coefs is on meta"),
])
def test_ddpm_step_bad_inputs(kw, err, match):
    with pytest.raises(err, match=match):
        ops.ddpm_step(**args(**kw))


def test_ddim_step_bad_inputs():
    with pytest.raises(ValueError, match=r"coefs must be \[7, 2\]"):
        ops.ddim_step(**args())
    with pytest.raises(ValueError, match="does not match x"):
        ops.ddim_step(**args(model_out=torch.randn(2, 4, 4, 4), coefs=torch.rand(7, 2)))


def test_fixed_variance_takes_c_channels_and_no_noise_at_t0():
    coefs = torch.rand(8, 2) + 0.1
    coefs[7] = torch.tensor([0.0, 1.0])  # sample 0 is at t = 0
    out = torch.randn(2, 3, 4, 4)
    a, _ = ops.ddpm_step(X, out, torch.randn_like(X), coefs, var_type="fixed")
    b, _ = ops.ddpm_step(X, out, torch.randn_like(X), coefs, var_type="fixed")
    assert a.shape == X.shape
    assert torch.equal(a[0], b[0])  # t = 0: the mean, no noise
    assert not torch.equal(a[1], b[1])


def test_steps_are_registered_and_explained():
    text = ops.explain("ddim_step", X, torch.randn(2, 6, 4, 4), torch.randn_like(X),
                       torch.rand(7, 2), None, "eps", True, 0.0)
    assert ("cpu: chosen" if CPU_EXT else "eager: chosen") in text


# --- the Triton step kernels ---------------------------------------------------------

import adm_fast  # noqa: E402
from adm_fast.diffusion import (  # noqa: E402
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    get_named_beta_schedule,  # noqa: E402
)

STEPS_ON_TRITON = {"ddpm_step": "triton", "ddim_step": "triton"}
FUSED = ["triton"] + (["cpu"] if CPU_EXT and DEVICE == "cpu" else []) + (
    ["cuda"] if DEVICE == "cuda" and not ops.backends()["cuda"].unavailable_reasons() else [])
CASES = sorted(p.stem for p in (REF / "diffusion").glob("*.pt"))


def _steps(d, model, cond, x, t):
    return {
        "p_sample": d.p_sample(model, x, t)["sample"],
        "p_sample_guided": d.p_sample(model, x, t, cond_fn=cond)["sample"],
        "ddim_guided_eta0": d.ddim_sample(model, x, t, cond_fn=cond)["sample"],
        "ddim_guided_eta05": d.ddim_sample(model, x, t, cond_fn=cond, eta=0.5)["sample"],
        "ddim_unclipped_eta0": d.ddim_sample(model, x, t, clip_denoised=False)["sample"],
    }


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("name", CASES)
def test_fused_steps_on_reference_cases(name, backend, monkeypatch):
    case = torch.load(REF / "diffusion" / f"{name}.pt", weights_only=True)
    case = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in case.items()}
    d = adm_fast.create_gaussian_diffusion(learn_sigma=case["learn_sigma"],
                                           noise_schedule=case["schedule"],
                                           timestep_respacing=case["respacing"])
    monkeypatch.setattr(torch, "randn_like", lambda x, **kw: case["noise"].clone())
    model = lambda x, t, **kw: case["model_out"]  # noqa: E731
    cond = lambda x, t, **kw: case["grad"]  # noqa: E731
    x, t = case["x"], case["t"].to(DEVICE)
    with adm_fast.use_backend("eager"):
        eager = _steps(d, model, cond, x, t)
    with adm_fast.use_backend({"ddpm_step": backend, "ddim_step": backend}), poisoned():
        fused = _steps(d, model, cond, x, t)
    for key, value in fused.items():
        assert rel_err(value, case[key]) <= 1e-5, key
        assert rel_err(value, eager[key]) <= 2e-6, key


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("mean_type", list(ModelMeanType))
@pytest.mark.parametrize("var_type", list(ModelVarType))
def test_fused_steps_every_mean_and_variance_type(mean_type, var_type, backend):
    d = GaussianDiffusion(betas=get_named_beta_schedule("linear", 40), model_mean_type=mean_type,
                          model_var_type=var_type, loss_type=LossType.MSE)
    learned = d.var_type_name != "fixed"
    x = torch.randn(3, 3, 5, 7, device=DEVICE)
    out = torch.randn(3, 6 if learned else 3, 5, 7, device=DEVICE)
    if var_type == ModelVarType.LEARNED:
        out[:, 3:] = out[:, 3:] * 0.1 - 5  # a plausible log variance
    noise, grad = torch.randn_like(x), torch.randn_like(x)
    t = torch.tensor([0, 7, 39], device=DEVICE)
    calls = [
        (ops.ddpm_step, (x, out, noise, d.step_coefs("ddpm", t), grad, d.mean_type_name,
                         d.var_type_name, True)),
        (ops.ddim_step, (x, out, noise, d.step_coefs("ddim", t), grad, d.mean_type_name,
                         True, 0.3)),
    ]
    for fn, args in calls:
        with adm_fast.use_backend("eager"):
            ref = fn(*args)
        with adm_fast.use_backend({"ddpm_step": backend, "ddim_step": backend}), poisoned():
            got = fn(*args)
        for a, b in zip(got, ref):
            assert a.dtype == b.dtype and rel_err(a, b) <= 2e-6, fn


def channels_last(t):
    return t.contiguous(memory_format=torch.channels_last)


# (x, model_out, noise, grad) channels_last or not: as a GPU sampler has them
# (the model output and the classifier's gradient channels_last, x and the
# noise drawn NCHW), all of them, and x alone.
MIXED_LAYOUTS = [(False, True, False, True), (True, True, True, True), (True, False, False, False)]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("mean_type", list(ModelMeanType))
@pytest.mark.parametrize("var_type", list(ModelVarType))
def test_fused_steps_mixed_layouts(mean_type, var_type, backend, monkeypatch):
    """Each input read in its own layout: the same bits as all-NCHW inputs, the
    outputs in x's layout (as the op's fake says), and on triton every input
    passed to the kernel where it lies (no copy)."""
    import adm_fast.kernels.diffusion_step as K

    launches = launched_pointers(K, monkeypatch)
    d = GaussianDiffusion(betas=get_named_beta_schedule("linear", 40), model_mean_type=mean_type,
                          model_var_type=var_type, loss_type=LossType.MSE)
    learned = d.var_type_name != "fixed"
    x = torch.randn(3, 3, 5, 7, device=DEVICE)
    out = torch.randn(3, 6 if learned else 3, 5, 7, device=DEVICE)
    if var_type == ModelVarType.LEARNED:
        out[:, 3:] = out[:, 3:] * 0.1 - 5  # a plausible log variance
    noise, grad = torch.randn_like(x), torch.randn_like(x)
    t = torch.tensor([0, 7, 39], device=DEVICE)
    ddpm, ddim = d.step_coefs("ddpm", t), d.step_coefs("ddim", t)

    def step_args(name, x, out, noise, grad):
        if name == "ddpm_step":
            return (x, out, noise, ddpm, grad, d.mean_type_name, d.var_type_name, True)
        return (x, out, noise, ddim, grad, d.mean_type_name, True, 0.3)

    for name, spec in (("ddpm_step", ops.DDPM_STEP), ("ddim_step", ops.DDIM_STEP)):
        with adm_fast.use_backend({name: backend}):
            nchw = spec(*step_args(name, x, out, noise, grad))
        for layouts in MIXED_LAYOUTS:
            tensors = [channels_last(v) if cl else v
                       for v, cl in zip((x, out, noise, grad), layouts)]
            args = step_args(name, *tensors)
            launches.clear()
            with adm_fast.use_backend({name: backend}), poisoned():
                got = spec(*args)
            with adm_fast.use_backend("eager"):
                ref = spec(*args)
            for a, r, base, fake in zip(got, ref, nchw, spec.fake(*args)):
                assert torch.equal(a, base), (name, layouts)
                assert a.dtype == r.dtype and rel_err(a, r) <= 2e-6, (name, layouts)
                assert a.stride() == fake.stride() == tensors[0].stride(), (name, layouts)
            if backend == "triton":
                ((_, pointers),) = launches
                assert {v.data_ptr() for v in tensors} <= pointers, (name, layouts)


def test_triton_step_low_precision_and_gradients():
    """bf16 model output: within twice the eager step's own error (fp64 reference)."""
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    out = torch.randn(2, 6, 4, 4, device=DEVICE, dtype=torch.bfloat16)
    noise, grad = torch.randn_like(x), torch.randn_like(x)
    d = adm_fast.create_gaussian_diffusion(learn_sigma=True, timestep_respacing="50")
    t = torch.tensor([3, 40], device=DEVICE)
    coefs, ddim_coefs = d.step_coefs("ddpm", t), d.step_coefs("ddim", t)
    with adm_fast.use_backend("eager"):
        eager = ops.ddpm_step(x, out, noise, coefs, grad)
    with adm_fast.use_backend("triton"):
        got = ops.ddpm_step(x, out, noise, coefs, grad)
    exact = ops.ddpm_step(x.double(), out.double(), noise.double(), coefs.double(), grad.double())
    assert [g.dtype for g in got] == [e.dtype for e in eager] == [torch.float32] * 2
    for g, e, r in zip(got, eager, exact):
        assert_lowp_close(g, r, e)
    # Differentiating through a fused step: unclipped, with the model output
    # held fixed, a DDIM step is affine in x, so a central difference in fp64
    # (no autograd) gives the exact directional derivative to compare with.
    xr = x.clone().requires_grad_(True)
    with adm_fast.use_backend("triton"):
        (gx,) = torch.autograd.grad(ops.ddim_step(xr, out.float(), noise, ddim_coefs, grad,
                                                  "eps", False, 0.2)[0].sum(), xr)
    v, h = torch.randn_like(x).double(), 1e-3
    with adm_fast.use_backend("eager"):
        step = [ops.ddim_step(x.double() + s * h * v, out.double(), noise.double(),
                              ddim_coefs.double(), grad.double(), "eps", False, 0.2)[0].sum()
                for s in (1, -1)]
    fd = ((step[0] - step[1]) / (2 * h)).item()
    got = (gx.double() * v).sum().item()
    assert torch.isfinite(gx).all() and abs(got - fd) <= 1e-5 * (abs(fd) + gx.abs().sum().item())
