"""One step of every sampler, p_mean_variance and the training losses against
values computed by guided-diffusion itself (tests/reference/diffusion)."""

import numpy as np
import pytest
import torch
from helpers import REF, rel_err

import adm_fast

CASES = sorted(p.stem for p in (REF / "diffusion").glob("*.pt"))
TOL = 1e-5


def load(name):
    return torch.load(REF / "diffusion" / f"{name}.pt", weights_only=True)


class Fixed:
    """A model returning the case's fixed output, recording the timesteps it sees."""

    def __init__(self, value):
        self.value, self.seen = value, []

    def __call__(self, x, t, **kw):
        self.seen.append(t.clone())
        return self.value


def setup(case, monkeypatch):
    diffusion = adm_fast.create_gaussian_diffusion(
        steps=1000, learn_sigma=case["learn_sigma"], noise_schedule=case["schedule"],
        timestep_respacing=case["respacing"])
    monkeypatch.setattr(torch, "randn_like", lambda x, **kw: case["noise"].clone())
    return diffusion, Fixed(case["model_out"]), Fixed(case["grad"])


@pytest.mark.parametrize("name", CASES)
def test_schedule_and_respacing(name):
    case = load(name)
    d = adm_fast.create_gaussian_diffusion(steps=1000, learn_sigma=case["learn_sigma"],
                                           noise_schedule=case["schedule"],
                                           timestep_respacing=case["respacing"])
    assert d.num_timesteps == case["num_timesteps"]
    assert d.timestep_map == case["timestep_map"].tolist()
    np.testing.assert_allclose(d.betas, case["betas"].numpy(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("path", ["fused", "composite"])
def test_sampler_steps(name, path, monkeypatch):
    case = load(name)
    d, model, cond = setup(case, monkeypatch)
    x, t = case["x"], case["t"]
    # denoised_fn (a Python hook) routes through the composite path.
    kw = {} if path == "fused" else {"denoised_fn": lambda v: v}

    pmv = d.p_mean_variance(model, x, t, clip_denoised=True)
    errs = {f"pmv_{k}": rel_err(pmv[k], case[f"pmv_{k}"])
            for k in ("mean", "variance", "log_variance", "pred_xstart")}
    errs["p_sample"] = rel_err(d.p_sample(model, x, t, **kw)["sample"], case["p_sample"])
    errs["p_sample_guided"] = rel_err(
        d.p_sample(model, x, t, cond_fn=cond, **kw)["sample"], case["p_sample_guided"])
    for eta, key in ((0.0, "ddim_guided_eta0"), (0.5, "ddim_guided_eta05")):
        errs[key] = rel_err(d.ddim_sample(model, x, t, cond_fn=cond, eta=eta, **kw)["sample"],
                            case[key])
    errs["ddim_unclipped_eta0"] = rel_err(
        d.ddim_sample(model, x, t, clip_denoised=False, **kw)["sample"],
        case["ddim_unclipped_eta0"])
    print(name, path, {k: f"{v:.2g}" for k, v in errs.items()})
    assert max(errs.values()) <= TOL, errs
    # What reached cond_fn and the model: the original (mapped) timesteps.
    assert all(torch.equal(s, case["cond_t"]) for s in cond.seen)
    assert all(torch.equal(s, case["cond_t"]) for s in model.seen)


@pytest.mark.parametrize("name", CASES)
def test_training_losses(name, monkeypatch):
    case = load(name)
    d, model, _ = setup(case, monkeypatch)
    terms = d.training_losses(model, case["loss_x_start"], case["loss_t"], noise=case["noise"])
    assert set(terms) == set(case["loss"])
    errs = {k: rel_err(terms[k], case["loss"][k]) for k in terms}
    print(name, {k: f"{v:.2g}" for k, v in errs.items()})
    assert max(errs.values()) <= TOL, errs
    assert torch.equal(model.seen[-1], case["model_t"])
