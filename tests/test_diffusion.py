"""Loops, guidance, DPM-Solver++, schedule samplers and input errors."""


import numpy as np
import pytest
import torch
from helpers import build_case, load_case, rel_err

import adm_fast
from adm_fast.diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    NonFiniteSampleError,
    create_named_schedule_sampler,
    get_named_beta_schedule,
    space_timesteps,
)

SMALL = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2",
             attention_resolutions="16", num_head_channels=16, class_cond=True,
             learn_sigma=True)


@pytest.fixture(scope="module")
def unet():
    case = load_case("unet_cond_scaleshift_legacyattn")
    return build_case(case)


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(1)
    clf = adm_fast.EncoderUNetModel(32, 3, 32, 1000, 1, (2,), channel_mult=(1, 2),
                                    num_head_channels=32, use_scale_shift_norm=True,
                                    resblock_updown=True, pool="attention")
    for p in clf.parameters():  # zero-initialised heads would give zero gradients
        torch.nn.init.normal_(p, std=0.05)
    return clf.eval()


# --- same seed, same images -----------------------------------------------------

def reference_loop(d, model, shape, cond_fn, kw, ddim=False, eta=0.0):
    """guided-diffusion's loop order written out: randn(shape) for x_T, then per
    step the model, (DDPM) noise then cond_fn / (DDIM) cond_fn then noise."""
    img = torch.randn(*shape)
    for i in reversed(range(d.num_timesteps)):
        t = torch.tensor([i] * shape[0])
        with torch.no_grad():
            out = d.p_mean_variance(model, img, t, clip_denoised=True, model_kwargs=kw)
            nonzero = (t != 0).float().view(-1, 1, 1, 1)
            if not ddim:
                noise = torch.randn_like(img)
                if cond_fn is not None:
                    out["mean"] = d.condition_mean(cond_fn, out, img, t, model_kwargs=kw)
                img = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
            else:
                if cond_fn is not None:
                    out = d.condition_score(cond_fn, out, img, t, model_kwargs=kw)
                eps = d._predict_eps_from_xstart(img, t, out["pred_xstart"])
                ab = d._extract("alphas_cumprod", t, img.shape)
                abp = d._extract("alphas_cumprod_prev", t, img.shape)
                sigma = eta * torch.sqrt((1 - abp) / (1 - ab)) * torch.sqrt(1 - ab / abp)
                noise = torch.randn_like(img)
                img = (out["pred_xstart"] * torch.sqrt(abp)
                       + torch.sqrt(1 - abp - sigma ** 2) * eps + nonzero * sigma * noise)
    return img


@pytest.mark.parametrize("sampler", ["ddpm", "ddim_eta0.5"])
def test_same_seed_same_images(sampler, unet, classifier):
    """guided-diffusion's draw order: bit for bit on the eager backend, to
    rounding on the default (fused) backends; deterministic under a seed."""
    d = adm_fast.create_gaussian_diffusion(learn_sigma=True, timestep_respacing="6")
    cond_fn = adm_fast.classifier_cond_fn(classifier, 3.0)
    kw = {"y": torch.tensor([3, 7])}
    shape = (2, 3, 32, 32)
    ddim = sampler != "ddpm"
    loop = d.ddim_sample_loop if ddim else d.p_sample_loop
    extra = {"eta": 0.5} if ddim else {}
    with adm_fast.use_backend("eager"):
        torch.manual_seed(123)
        ref = reference_loop(d, unet, shape, cond_fn, kw, ddim=ddim, eta=0.5)
        torch.manual_seed(123)
        assert torch.equal(loop(unet, shape, cond_fn=cond_fn, model_kwargs=kw, **extra), ref)
    torch.manual_seed(123)
    ours = loop(unet, shape, cond_fn=cond_fn, model_kwargs=kw, **extra)
    # Fused steps round differently; x_0 = a·x − b·eps cancels (a, b ~ 100 near
    # t = T), so six steps drift by ~1e-5 of the sample's range.
    assert rel_err(ours, ref) <= 1e-4
    torch.manual_seed(123)
    assert torch.equal(loop(unet, shape, cond_fn=cond_fn, model_kwargs=kw, **extra), ours)
    torch.manual_seed(124)
    assert not torch.equal(loop(unet, shape, cond_fn=cond_fn, model_kwargs=kw, **extra), ours)


def test_progressive_yields_every_step(unet):
    d = adm_fast.create_gaussian_diffusion(learn_sigma=True, timestep_respacing="4")
    outs = list(d.p_sample_loop_progressive(unet, (1, 3, 32, 32),
                                            model_kwargs={"y": torch.tensor([1])}))
    assert len(outs) == 4 and all(set(o) == {"sample", "pred_xstart"} for o in outs)


def test_classifier_cond_fn_is_guided_diffusions(classifier):
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([10, 500]), torch.tensor([4, 9])
    with torch.no_grad():  # samplers call it under no_grad
        g = adm_fast.classifier_cond_fn(classifier, 2.5)(x, t, y=y)
    x_in = x.clone().requires_grad_(True)
    lp = torch.log_softmax(classifier(x_in, t), -1)[torch.arange(2), y].sum()
    (ref,) = torch.autograd.grad(lp, x_in)
    assert torch.equal(g, ref * 2.5) and g.abs().max() > 0
    with pytest.raises(ValueError, match="needs the class labels"):
        adm_fast.classifier_cond_fn(classifier, 1.0)(x, t)


def test_classifier_cond_fn_low_precision(classifier):
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([10, 500]), torch.tensor([4, 9])
    ref = adm_fast.classifier_cond_fn(classifier, 1.0)(x, t, y=y)
    import copy
    clf16 = copy.deepcopy(classifier).to(torch.bfloat16)
    g = adm_fast.classifier_cond_fn(clf16, 1.0)(x, t, y=y)
    assert g.dtype == torch.float32
    assert rel_err(g, ref) < 0.2  # bf16 everywhere: a coarse but faithful gradient


# --- the step op's reference == the composite path, for every mean and variance type --
# (the fused kernels are checked against the step op in test_diffusion_step.py)

@pytest.mark.parametrize("mean_type", list(ModelMeanType))
@pytest.mark.parametrize("var_type", list(ModelVarType))
@adm_fast.use_backend("eager")
def test_step_op_equals_composite(mean_type, var_type, monkeypatch):
    d = GaussianDiffusion(betas=get_named_beta_schedule("cosine", 50), model_mean_type=mean_type,
                          model_var_type=var_type, loss_type=LossType.MSE)
    learned = var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)
    x = torch.randn(3, 3, 8, 8) * 1.5
    out = torch.randn(3, 6 if learned else 3, 8, 8)
    if var_type == ModelVarType.LEARNED:
        out[:, 3:] = out[:, 3:] * 0.1 - 4  # a plausible log variance
    grad = torch.randn_like(x)
    noise = torch.randn_like(x)
    monkeypatch.setattr(torch, "randn_like", lambda v, **kw: noise.clone())
    t = torch.tensor([0, 17, 49])
    model, cond_fn = (lambda *a, **k: out), (lambda *a, **k: grad)
    for clip in (True, False):
        for guided in (None, cond_fn):
            fused = d.p_sample(model, x, t, clip, cond_fn=guided)
            comp = d.p_sample(model, x, t, clip, denoised_fn=lambda v: v, cond_fn=guided)
            for k in fused:
                assert torch.equal(fused[k], comp[k]), (k, clip, guided)
            fused = d.ddim_sample(model, x, t, clip, cond_fn=guided, eta=0.3)
            comp = d.ddim_sample(model, x, t, clip, denoised_fn=lambda v: v, cond_fn=guided,
                                 eta=0.3)
            for k in fused:
                assert torch.equal(fused[k], comp[k]), (k, clip, guided)


# --- DPM-Solver++ --------------------------------------------------------------------

class GaussianData:
    """The exact eps-prediction for data x_0 ~ N(mu, s²) per pixel: with the
    original timestep's ᾱ, E[eps | x_t] = √(1−ᾱ)(x_t − √ᾱ·mu) / (ᾱ·s² + 1 − ᾱ)."""

    def __init__(self, mu, s, alphas_cumprod):
        self.mu, self.s = mu, s
        self.ab = torch.from_numpy(alphas_cumprod)

    def __call__(self, x, t, **kw):
        ab = self.ab[t.long()].view(-1, 1, 1, 1)
        return ((1 - ab).sqrt() * (x.double() - ab.sqrt() * self.mu)
                / (ab * self.s ** 2 + 1 - ab)).float()


def test_dpm_solver_20_steps_matches_1000_step_ddim():
    """On Gaussian data (exact eps known), DPM-Solver++ with 20 model calls lands
    close to 1000-step DDIM, far closer than 20-step DDIM does."""
    torch.manual_seed(0)
    mu = torch.rand(1, 3, 8, 8).double() * 0.8 - 0.4
    s = 0.3
    full = adm_fast.create_gaussian_diffusion(noise_schedule="linear")
    model = GaussianData(mu, s, full.alphas_cumprod)
    x_t = torch.randn(4, 3, 8, 8)
    ref = full.ddim_sample_loop(model, x_t.shape, noise=x_t, clip_denoised=False)
    results = {}
    for steps in (10, 20):
        results[f"dpm++{steps}"] = full.dpm_solver_sample_loop(model, x_t.shape, noise=x_t,
                                                               clip_denoised=False, steps=steps)
        spaced = adm_fast.create_gaussian_diffusion(timestep_respacing=str(steps))
        results[f"dpm++{steps} respaced"] = spaced.dpm_solver_sample_loop(
            model, x_t.shape, noise=x_t, clip_denoised=False)
        results[f"ddim{steps}"] = spaced.ddim_sample_loop(model, x_t.shape, noise=x_t,
                                                          clip_denoised=False)
    err = {k: (v - ref).abs().max().item() for k, v in results.items()}
    print("max |x - DDIM-1000|:", {k: f"{v:.2e}" for k, v in err.items()})
    assert err["dpm++20"] < 0.03
    assert err["dpm++20"] < err["ddim20"] / 5
    assert err["dpm++10"] < err["ddim10"] / 5
    assert err["dpm++20 respaced"] < err["ddim20"]


def test_log_snr_timesteps():
    d = adm_fast.create_gaussian_diffusion()
    idx = d.log_snr_timesteps(20)
    assert len(idx) == 20 and idx[0] == 999 and idx[-1] == 0
    assert all(a > b for a, b in zip(idx, idx[1:]))
    small = adm_fast.create_gaussian_diffusion(timestep_respacing="12")
    assert small.log_snr_timesteps(12) == list(range(11, -1, -1))
    with pytest.raises(ValueError, match=r"steps must be in \[2, 12\]"):
        small.log_snr_timesteps(13)


def test_dpm_solver_with_guidance_and_determinism(unet, classifier):
    d = adm_fast.create_gaussian_diffusion(learn_sigma=True, timestep_respacing="ddim5")
    cond_fn = adm_fast.classifier_cond_fn(classifier, 2.0)
    kw = {"y": torch.tensor([1, 2])}
    torch.manual_seed(5)
    a = d.dpm_solver_sample_loop(unet, (2, 3, 32, 32), cond_fn=cond_fn, model_kwargs=kw)
    torch.manual_seed(5)
    b = d.dpm_solver_sample_loop(unet, (2, 3, 32, 32), cond_fn=cond_fn, model_kwargs=kw)
    torch.manual_seed(5)
    c = d.dpm_solver_sample_loop(unet, (2, 3, 32, 32), model_kwargs=kw)
    assert torch.equal(a, b) and not torch.equal(a, c) and torch.isfinite(a).all()


# --- classifier-free guidance ----------------------------------------------------------

def test_cfg_endpoints_and_null_class():
    torch.manual_seed(0)
    model = adm_fast.create_model(**SMALL, null_class=True).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    assert model.label_emb.weight.shape[0] == 1001 and model.null_label == 1000
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([5, 600]), torch.tensor([3, 8])
    with torch.no_grad():
        cond = model(x, t, y=y)
        uncond = model(x, t, y=torch.full_like(y, 1000))
        w0 = adm_fast.classifier_free_guidance(model, 0.0)(x, t, y=y)
        w1 = adm_fast.classifier_free_guidance(model, 1.0)(x, t, y=y)
        w3 = adm_fast.classifier_free_guidance(model, 3.0)(x, t, y=y)
    assert rel_err(w0[:, :3], uncond[:, :3]) < 1e-5 and rel_err(w0[:, 3:], cond[:, 3:]) < 1e-5
    assert rel_err(w1, cond) < 1e-5
    expected = uncond[:, :3] + 3.0 * (cond[:, :3] - uncond[:, :3])
    assert rel_err(w3[:, :3], expected) < 1e-5
    # CFG and classifier guidance together, through a sampler.
    d = adm_fast.create_gaussian_diffusion(learn_sigma=True, timestep_respacing="3")
    cfg = adm_fast.classifier_free_guidance(model, 2.0)
    out = d.ddim_sample_loop(cfg, (2, 3, 32, 32), model_kwargs={"y": y},
                             cond_fn=lambda x, t, y=None: torch.ones_like(x) * 0.01)
    assert torch.isfinite(out).all()


def test_cfg_needs_null_class():
    with pytest.raises(ValueError, match="null_class=True"):
        adm_fast.classifier_free_guidance(adm_fast.create_model(**SMALL), 2.0)
    with pytest.raises(ValueError, match="null_class needs a class-conditional"):
        adm_fast.create_model(**{**SMALL, "class_cond": False}, null_class=True)


# --- losses, bpd, samplers -----------------------------------------------------------------

@pytest.mark.parametrize("kw, keys", [
    (dict(), {"loss", "mse"}),
    (dict(learn_sigma=True), {"loss", "mse", "vb"}),
    (dict(learn_sigma=True, rescale_learned_sigmas=True), {"loss", "mse", "vb"}),
    (dict(learn_sigma=True, use_kl=True), {"loss"}),
    (dict(predict_xstart=True), {"loss", "mse"}),
])
def test_training_losses_variants(kw, keys):
    d = adm_fast.create_gaussian_diffusion(timestep_respacing="100", **kw)
    x0 = torch.rand(3, 3, 8, 8) * 2 - 1
    c = 6 if kw.get("learn_sigma") else 3
    out = torch.randn(3, c, 8, 8, requires_grad=True)
    t = torch.tensor([0, 50, 99])
    noise = torch.randn_like(x0)
    terms = d.training_losses(lambda *a, **k: out, x0, t, noise=noise)
    assert set(terms) == keys and all(v.shape == (3,) for v in terms.values())
    if kw.get("rescale_learned_sigmas"):
        plain = adm_fast.create_gaussian_diffusion(timestep_respacing="100", learn_sigma=True)
        vb = plain.training_losses(lambda *a, **k: out, x0, t, noise=noise)["vb"]
        torch.testing.assert_close(terms["vb"], vb * 100 / 1000)
    if "vb" in terms:  # L_hybrid: the vb term must not push on the mean
        (g,) = torch.autograd.grad(terms["vb"].sum(), out)
        assert g[:, :3].abs().max() == 0 and g[:, 3:].abs().max() > 0
    if kw.get("predict_xstart"):
        torch.testing.assert_close(terms["mse"], ((x0 - out) ** 2).mean(dim=(1, 2, 3)))


def test_calc_bpd_loop_shapes_and_total():
    d = adm_fast.create_gaussian_diffusion(learn_sigma=True, timestep_respacing="5")
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    res = d.calc_bpd_loop(lambda x, t: torch.zeros(2, 6, 8, 8), x0)
    assert res["vb"].shape == res["mse"].shape == res["xstart_mse"].shape == (2, 5)
    torch.testing.assert_close(res["total_bpd"], res["vb"].sum(1) + res["prior_bpd"])


def test_ddim_reverse_then_forward_returns():
    full = adm_fast.create_gaussian_diffusion()
    model = GaussianData(torch.zeros(1, 3, 8, 8).double(), 0.5,
                         adm_fast.create_gaussian_diffusion().alphas_cumprod)
    x0 = torch.randn(2, 3, 8, 8) * 0.5
    x = x0
    for i in range(full.num_timesteps - 1):
        x = full.ddim_reverse_sample(model, x, torch.tensor([i, i]), clip_denoised=False)["sample"]
    back = x
    for i in reversed(range(full.num_timesteps - 1)):
        back = full.ddim_sample(model, back, torch.tensor([i + 1, i + 1]),
                                clip_denoised=False)["sample"]
    err = (back - x0).abs().max().item()
    print(f"DDIM inversion round trip, 1000 steps: max |err| {err:.2e}")
    assert err < 0.02
    with pytest.raises(ValueError, match="eta must be 0"):
        full.ddim_reverse_sample(model, x0, torch.tensor([1, 1]), eta=0.5)


def test_schedule_samplers():
    d = adm_fast.create_gaussian_diffusion(timestep_respacing="10")
    uni = create_named_schedule_sampler("uniform", d)
    t, w = uni.sample(64, "cpu")
    assert t.min() >= 0 and t.max() < 10 and torch.all(w == 1)
    lsm = create_named_schedule_sampler("loss-second-moment", d)
    assert np.all(lsm.weights() == 1)
    for _ in range(10):  # fill every history: loss t for timestep t
        lsm.update_with_local_losses(torch.arange(10), torch.arange(10).double() + 1)
    w = lsm.weights()
    assert w[9] > w[0] and abs(w.sum() - 1) < 1e-9
    np.random.seed(0)
    t, weights = lsm.sample(1000, "cpu")
    p = w / w.sum()
    torch.testing.assert_close(weights, torch.from_numpy(1 / (10 * p[t.numpy()])).float())
    with pytest.raises(ValueError, match="unknown schedule sampler"):
        create_named_schedule_sampler("nope", d)


# --- bad input -------------------------------------------------------------------------

@pytest.mark.parametrize("kw, err, match", [
    (dict(noise_schedule="quadratic"), ValueError, "unknown beta schedule 'quadratic'"),
    (dict(timestep_respacing="25x"), ValueError, "malformed timestep respacing '25x'"),
    (dict(timestep_respacing="1,,2"), ValueError, "malformed timestep respacing"),
    (dict(timestep_respacing="ddimx"), ValueError, "malformed timestep respacing 'ddimx'"),
    (dict(timestep_respacing="ddim0"), ValueError, "malformed timestep respacing"),
    (dict(timestep_respacing="2000"), ValueError, "cannot take 2000 steps from a section of 1000"),
    (dict(timestep_respacing="ddim1001"), ValueError, "no integer stride gives exactly 1001"),
    (dict(timestep_respacing="0"), ValueError, "positive step counts"),
    (dict(steps=0), ValueError, "diffusion steps must be >= 1"),
])
def test_bad_diffusion_arguments(kw, err, match):
    with pytest.raises(err, match=match):
        adm_fast.create_gaussian_diffusion(**kw)


def test_respacing_sections_are_guided_diffusions():
    assert sorted(space_timesteps(300, "10,15,20"))[:3] == [0, 11, 22]
    assert len(space_timesteps(300, "10,15,20")) == 45
    assert sorted(space_timesteps(1000, "ddim25"))[:3] == [0, 40, 80]
    assert space_timesteps(1000, [1000]) == set(range(1000))


def test_bad_timesteps_and_outputs():
    d = adm_fast.create_gaussian_diffusion(learn_sigma=True, timestep_respacing="50")
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(IndexError, match=r"t must lie in \[0, 50\)"):
        d.q_sample(x, torch.tensor([0, 50]))
    with pytest.raises(IndexError, match=r"t must lie in \[0, 50\)"):
        d.p_sample(lambda *a: torch.zeros(2, 6, 8, 8), x, torch.tensor([-1, 3]))
    with pytest.raises(TypeError, match="1-D integer tensor"):
        d.q_sample(x, torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="t has 3 entries for a batch of 2"):
        d.q_sample(x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"learned variance \(learn_sigma=True\).*2C = 6"):
        d.p_sample(lambda *a: torch.zeros(2, 3, 8, 8), x, torch.tensor([1, 2]))
    fixed = adm_fast.create_gaussian_diffusion(timestep_respacing="50")
    with pytest.raises(ValueError, match=r"fixed variance \(learn_sigma=False\)"):
        fixed.ddim_sample(lambda *a: torch.zeros(2, 6, 8, 8), x, torch.tensor([1, 2]))


def test_nan_reported_with_its_step():
    d = adm_fast.create_gaussian_diffusion(timestep_respacing="30")
    calls = {"n": 0}

    def model(x, t):
        calls["n"] += 1
        out = torch.zeros_like(x)
        return out + float("nan") if calls["n"] == 13 else out

    with pytest.raises(NonFiniteSampleError, match="NaN or inf at step 13 of 30"):
        d.ddim_sample_loop(model, (1, 3, 8, 8), clip_denoised=False)
    # Checked every few steps, not every step: the error surfaces at the next check.
    assert calls["n"] == 20
