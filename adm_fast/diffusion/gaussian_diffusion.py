"""Gaussian diffusion (Ho et al.; Nichol & Dhariwal's improvements; Dhariwal &
Nichol's guidance), with guided-diffusion's API and results.

Names, signatures and semantics are guided-diffusion's: `t` indexes this
(possibly respaced) process, the model and cond_fn receive the original
timesteps through `timestep_map`, tables are float64 and per-sample
coefficients are gathered then cast to fp32, as guided-diffusion does. The
arithmetic of a sampling step lives in adm_fast.ops.diffusion_step (the ops
ddpm_step and ddim_step, and the arithmetic they share with this file), so
fused backends replace it without touching this file.
"""

from __future__ import annotations

import enum

import numpy as np
import torch
from torch import Tensor

from .. import ops
from ..ops import diffusion_step as sm
from .loops import SamplingLoops
from .losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .schedules import get_named_beta_schedule, space_timesteps


class ModelMeanType(enum.Enum):
    PREVIOUS_X = enum.auto()  # the model predicts x_{t-1}
    START_X = enum.auto()  # the model predicts x_0
    EPSILON = enum.auto()  # the model predicts the noise


class ModelVarType(enum.Enum):
    LEARNED = enum.auto()  # the model outputs log Σ
    FIXED_SMALL = enum.auto()  # Σ = β̃_t (posterior variance)
    FIXED_LARGE = enum.auto()  # Σ = β_t
    LEARNED_RANGE = enum.auto()  # the model interpolates log β̃_t .. log β_t


class LossType(enum.Enum):
    MSE = enum.auto()  # MSE (+ VB for a learned variance: L_hybrid)
    RESCALED_MSE = enum.auto()  # MSE + VB·T/1000
    KL = enum.auto()  # the variational bound
    RESCALED_KL = enum.auto()  # the bound ×T, estimating the full VLB

    def is_vb(self) -> bool:
        return self in (LossType.KL, LossType.RESCALED_KL)


# The step ops' names for the model's parametrisation (their kernel codes:
# adm_fast/kernels/step_codes.py).
_MEAN = {ModelMeanType.EPSILON: "eps", ModelMeanType.START_X: "x_start",
         ModelMeanType.PREVIOUS_X: "x_prev"}
_VAR = {ModelVarType.LEARNED: "learned", ModelVarType.LEARNED_RANGE: "learned_range",
        ModelVarType.FIXED_SMALL: "fixed", ModelVarType.FIXED_LARGE: "fixed"}


class GaussianDiffusion(SamplingLoops):
    """Training and sampling utilities for a diffusion with the given betas."""

    def __init__(self, *, betas, model_mean_type: ModelMeanType,
                 model_var_type: ModelVarType, loss_type: LossType,
                 rescale_timesteps: bool = False):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        # As ops.ddpm_step / ops.ddim_step name them.
        self.mean_type_name = _MEAN[model_mean_type]
        self.var_type_name = _VAR[model_var_type]
        self.loss_type = loss_type
        self.rescale_timesteps = rescale_timesteps

        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or not len(betas):
            raise ValueError("betas must be a non-empty 1-D sequence")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])
        if not hasattr(self, "timestep_map"):  # SpacedDiffusion sets its own
            self.timestep_map = list(range(self.num_timesteps))
            self.original_num_steps = self.num_timesteps

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        # Posterior q(x_{t-1} | x_t, x_0); its variance is 0 at t = 0, so the
        # log is clipped to the t = 1 value there. A one-step process (respacing
        # "1", "ddim1") has no t = 1: its only step takes β_0 there instead.
        self.posterior_variance = (
            betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod))
        at_t1 = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(
            np.append(at_t1, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = (
            betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod))
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod))
        # Tables guided-diffusion derives on the fly, kept so that they can be
        # cached on the device by name.
        self.log_betas = np.log(betas)
        self.one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self.nonzero_mask = (np.arange(self.num_timesteps) != 0).astype(np.float64)
        # Fixed-large uses β̃_1 at t = 0 for a better decoder likelihood.
        self.fixed_large_variance = np.append(at_t1, betas[1:])
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)
        self._fixed = {
            ModelVarType.FIXED_LARGE: ("fixed_large_variance", "fixed_large_log_variance"),
            ModelVarType.FIXED_SMALL: ("posterior_variance", "posterior_log_variance_clipped"),
        }
        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            self.xprev_a = 1.0 / self.posterior_mean_coef1
            self.xprev_b = self.posterior_mean_coef2 / self.posterior_mean_coef1
        self._device_tables: dict = {}

    # --- per-sample coefficients -------------------------------------------------

    def _tensor(self, key, device) -> Tensor:
        """A float64 table (a name, or a tuple of names stacked) on `device`, cached."""
        cache_key = (key, str(device))
        if cache_key not in self._device_tables:
            names = key if isinstance(key, tuple) else (key,)
            arr = np.stack([getattr(self, n) for n in names])
            self._device_tables[cache_key] = torch.from_numpy(
                arr if isinstance(key, tuple) else arr[0]).to(device)
        return self._device_tables[cache_key]

    def _check_t(self, t: Tensor, n: int | None = None) -> Tensor:
        """t, checked, with one entry per sample: a single timestep for a batch
        of n is broadcast to all of them, as guided-diffusion's indexing does."""
        if not isinstance(t, Tensor) or t.dtype.is_floating_point or t.dim() != 1:
            raise TypeError("t must be a 1-D integer tensor of indices into the "
                            f"{self.num_timesteps}-step process")
        if n is not None and t.shape[0] == 1 and n != 1:
            t = t.expand(n)
        if n is not None and t.shape[0] != n:
            raise ValueError(f"t has {t.shape[0]} entries for a batch of {n}")
        if t.device.type == "cpu":
            if len(t) and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
                raise IndexError(f"t must lie in [0, {self.num_timesteps}) for this "
                                 f"{self.num_timesteps}-step process, got "
                                 f"{t.min().item()}..{t.max().item()}")
        else:  # no host synchronisation: an asynchronous device-side check
            torch._assert_async(((t >= 0) & (t < self.num_timesteps)).all())
        return t

    def _extract(self, name: str, t: Tensor, shape) -> Tensor:
        """Table `name` at t, cast to fp32 and broadcast to `shape`
        (guided-diffusion's _extract_into_tensor)."""
        res = self._tensor(name, t.device)[t].float()
        return res.reshape(res.shape + (1,) * (len(shape) - 1)).expand(shape)

    def _x0_rows(self):
        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            return ("xprev_a", "xprev_b")
        return ("sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod")

    def step_coefs(self, kind: str, t: Tensor) -> Tensor:
        """The fp32 coefficient rows ops.ddpm_step ("ddpm") or ops.ddim_step
        ("ddim") read, for the timesteps t: [8, B] or [7, B]."""
        a, b = self._x0_rows()
        if kind == "ddpm":
            if self.model_var_type in self._fixed:
                var, log_var = self._fixed[self.model_var_type]
                lo, hi = log_var, log_var
            else:  # the variance row is unused
                lo, hi, var = "posterior_log_variance_clipped", "log_betas", "log_betas"
            tables, order = dict(a=a, b=b, c1="posterior_mean_coef1", c2="posterior_mean_coef2",
                                 lo=lo, hi=hi, var=var, nonzero="nonzero_mask"), sm.DDPM_ROWS
        elif kind == "ddim":
            tables, order = dict(a=a, b=b, recip="sqrt_recip_alphas_cumprod",
                                 recipm1="sqrt_recipm1_alphas_cumprod",
                                 alpha_bar="alphas_cumprod", alpha_bar_prev="alphas_cumprod_prev",
                                 nonzero="nonzero_mask"), sm.DDIM_ROWS
        else:
            raise ValueError(f"kind must be 'ddpm' or 'ddim', got {kind!r}")
        rows = tuple(tables[name] for name in sorted(order, key=order.get))
        return self._tensor(rows, t.device)[:, t].float()

    # --- timesteps the model sees ------------------------------------------------

    def _model_timesteps(self, t: Tensor) -> Tensor:
        """The original-process timesteps for indices t (rescaled to 0..1000
        when rescale_timesteps), what the model and cond_fn receive."""
        mapped = self._tensor("timestep_map", t.device)[t].to(t.dtype)
        if self.rescale_timesteps:
            return mapped.float() * (1000.0 / self.original_num_steps)
        return mapped

    def _scale_timesteps(self, t: Tensor) -> Tensor:
        return self._model_timesteps(t)

    def _run_model(self, model, x: Tensor, t: Tensor, model_kwargs) -> Tensor:
        t = self._check_t(t, x.shape[0])
        out = model(x, self._model_timesteps(t), **(model_kwargs or {}))
        b, c = x.shape[:2]
        learned = self.var_type_name != "fixed"
        want = (b, 2 * c if learned else c, *x.shape[2:])
        if tuple(out.shape) != want:
            what = ("a learned variance (learn_sigma=True): the model must output 2C = "
                    f"{2 * c} channels" if learned else
                    f"a fixed variance (learn_sigma=False): the model must output C = {c} "
                    "channels")
            raise ValueError(f"model output {list(out.shape)} does not fit this diffusion, "
                             f"which has {what} (expected {list(want)})")
        return out

    # --- q: the forward process --------------------------------------------------

    def q_mean_variance(self, x_start: Tensor, t: Tensor):
        """Mean, variance and log variance of q(x_t | x_0)."""
        t = self._check_t(t, x_start.shape[0])
        mean = self._extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
        variance = self._extract("one_minus_alphas_cumprod", t, x_start.shape)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """Sample x_t ~ q(x_t | x_0)."""
        t = self._check_t(t, x_start.shape[0])
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise {list(noise.shape)} must have x_start's shape "
                             f"{list(x_start.shape)}")
        return (self._extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
                + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start.shape) * noise)

    def q_posterior_mean_variance(self, x_start: Tensor, x_t: Tensor, t: Tensor):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        if x_start.shape != x_t.shape:
            raise ValueError("x_start and x_t must have the same shape")
        t = self._check_t(t, x_t.shape[0])
        mean = (self._extract("posterior_mean_coef1", t, x_t.shape) * x_start
                + self._extract("posterior_mean_coef2", t, x_t.shape) * x_t)
        variance = self._extract("posterior_variance", t, x_t.shape)
        log_variance = self._extract("posterior_log_variance_clipped", t, x_t.shape)
        return mean, variance, log_variance

    # --- p: the reverse process --------------------------------------------------

    def p_mean_variance(self, model, x: Tensor, t: Tensor, clip_denoised: bool = True,
                        denoised_fn=None, model_kwargs=None) -> dict[str, Tensor]:
        """Apply the model: mean, variance, log_variance of p(x_{t-1} | x_t) and
        pred_xstart, the prediction of x_0."""
        t = self._check_t(t, x.shape[0])
        out = self._run_model(model, x, t, model_kwargs)
        return self.p_mean_variance_from_output(out, x, t, clip_denoised, denoised_fn)

    def p_mean_variance_from_output(self, model_output: Tensor, x: Tensor, t: Tensor,
                                    clip_denoised: bool = True, denoised_fn=None):
        """p_mean_variance for an already computed model output."""
        var_type, mean_type = self.var_type_name, self.mean_type_name
        out, v = sm.split_output(model_output, x.shape[1], var_type != "fixed")
        if var_type == "fixed":
            var_table, log_table = self._fixed[self.model_var_type]
            variance = self._extract(var_table, t, x.shape)
            log_var = self._extract(log_table, t, x.shape)
        else:
            lo = self._extract("posterior_log_variance_clipped", t, x.shape)
            hi = self._extract("log_betas", t, x.shape)
            log_var = sm.log_variance(v, lo, hi, var_type)
            variance = torch.exp(log_var)
        a, b = (self._extract(r, t, x.shape) for r in self._x0_rows())
        x0 = sm.pred_xstart(x, out, a, b, mean_type)
        if denoised_fn is not None:
            x0 = denoised_fn(x0)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean = out if mean_type == "x_prev" else self.q_posterior_mean_variance(x0, x, t)[0]
        return {"mean": mean, "variance": variance, "log_variance": log_var, "pred_xstart": x0}

    # Unused here (the step math is sm.pred_xstart), kept under guided-diffusion's
    # name: code written against its GaussianDiffusion calls it.
    def _predict_xstart_from_eps(self, x_t, t, eps):
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t
                - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.shape) * eps)

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return sm.eps_from_xstart(
            x_t, pred_xstart, self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape),
            self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.shape))

    def _cond_grad(self, cond_fn, x, t, model_kwargs) -> Tensor:
        return cond_fn(x, self._model_timesteps(t), **(model_kwargs or {}))

    def condition_mean(self, cond_fn, p_mean_var, x, t, model_kwargs=None) -> Tensor:
        """The guided mean μ + Σ·∇x log p(y|x_t) (Sohl-Dickstein et al.), cond_fn
        returning the (scaled) gradient."""
        grad = self._cond_grad(cond_fn, x, t, model_kwargs)
        return sm.guide_mean(p_mean_var["mean"], p_mean_var["variance"], grad)

    def condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """p_mean_variance's output with the score guided (Song et al.):
        eps − √(1−ᾱ_t)·∇x log p(y|x_t)."""
        grad = self._cond_grad(cond_fn, x, t, model_kwargs)
        out = dict(p_mean_var)
        out["pred_xstart"] = sm.guide_eps(
            x, p_mean_var["pred_xstart"], grad,
            self._extract("sqrt_recip_alphas_cumprod", t, x.shape),
            self._extract("sqrt_recipm1_alphas_cumprod", t, x.shape),
            self._extract("alphas_cumprod", t, x.shape))
        out["mean"] = self.q_posterior_mean_variance(out["pred_xstart"], x, t)[0]
        return out

    def p_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None,
                 model_kwargs=None) -> dict[str, Tensor]:
        """x_{t-1} ~ p(x_{t-1} | x_t), guided by cond_fn when given."""
        t = self._check_t(t, x.shape[0])
        model_output = self._run_model(model, x, t, model_kwargs)
        noise = torch.randn_like(x)
        if denoised_fn is not None:  # a Python hook: the composite path
            out = self.p_mean_variance_from_output(model_output, x, t, clip_denoised,
                                                   denoised_fn)
            if cond_fn is not None:
                out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs)
            nonzero = self._extract("nonzero_mask", t, x.shape)
            sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
            return {"sample": sample, "pred_xstart": out["pred_xstart"]}
        grad = None if cond_fn is None else self._cond_grad(cond_fn, x, t, model_kwargs)
        sample, x0 = ops.ddpm_step(x, model_output, noise, self.step_coefs("ddpm", t), grad,
                                   self.mean_type_name, self.var_type_name,
                                   clip_denoised)
        return {"sample": sample, "pred_xstart": x0}

    def ddim_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None,
                    model_kwargs=None, eta=0.0) -> dict[str, Tensor]:
        """x_{t-1} by DDIM (eta = 0: deterministic), guided by cond_fn when given."""
        t = self._check_t(t, x.shape[0])
        model_output = self._run_model(model, x, t, model_kwargs)
        if denoised_fn is not None:  # a Python hook: the composite path
            out = self.p_mean_variance_from_output(model_output, x, t, clip_denoised,
                                                   denoised_fn)
            if cond_fn is not None:
                out = self.condition_score(cond_fn, out, x, t, model_kwargs)
            eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
            mean, sigma = sm.ddim_update(out["pred_xstart"], eps,
                                         self._extract("alphas_cumprod", t, x.shape),
                                         self._extract("alphas_cumprod_prev", t, x.shape),
                                         eta)
            nonzero = self._extract("nonzero_mask", t, x.shape)
            sample = mean + nonzero * sigma * torch.randn_like(x)
            return {"sample": sample, "pred_xstart": out["pred_xstart"]}
        grad = None if cond_fn is None else self._cond_grad(cond_fn, x, t, model_kwargs)
        noise = torch.randn_like(x)
        sample, x0 = ops.ddim_step(x, model_output, noise, self.step_coefs("ddim", t), grad,
                                   self.mean_type_name, clip_denoised, eta)
        return {"sample": sample, "pred_xstart": x0}

    def ddim_reverse_sample(self, model, x, t, clip_denoised=True, denoised_fn=None,
                            model_kwargs=None, eta=0.0) -> dict[str, Tensor]:
        """x_{t+1} by the deterministic DDIM ODE run forward (eta must be 0)."""
        if eta != 0.0:
            raise ValueError("ddim_reverse_sample runs the deterministic ODE: eta must be 0")
        t = self._check_t(t, x.shape[0])
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar_next = self._extract("alphas_cumprod_next", t, x.shape)
        sample = out["pred_xstart"] * torch.sqrt(alpha_bar_next) + torch.sqrt(
            1 - alpha_bar_next) * eps
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    # --- the variational bound and training losses -------------------------------

    def _vb_terms_from_output(self, model_output, x_start, x_t, t, clip_denoised=True):
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance_from_output(model_output, x_t, t, clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"]))
        kl = kl / np.log(2.0)
        nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
        nll = mean_flat(nll) / np.log(2.0)
        # The decoder NLL at the first step, KL(q ‖ p) elsewhere; in bits.
        return {"output": torch.where(t == 0, nll, kl), "pred_xstart": out["pred_xstart"]}

    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        model_output = self._run_model(model, x_t, t, model_kwargs)
        return self._vb_terms_from_output(model_output, x_start, x_t, t, clip_denoised)

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Per-sample losses at timesteps t: {"loss", and "mse"/"vb" where they apply}.
        With a learned variance and an MSE loss this is L_hybrid: the VB term
        trains the variance through a stop-gradient copy of the mean."""
        t = self._check_t(t, x_start.shape[0])
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        terms = {}
        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=False,
                                               model_kwargs=model_kwargs)["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms
        model_output = self._run_model(model, x_t, t, model_kwargs)
        if self.var_type_name != "fixed":
            c = x_t.shape[1]
            model_output, var_values = model_output[:, :c], model_output[:, c:]
            frozen = torch.cat([model_output.detach(), var_values], dim=1)
            terms["vb"] = self._vb_terms_from_output(frozen, x_start, x_t, t,
                                                     clip_denoised=False)["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            target = self.q_posterior_mean_variance(x_start, x_t, t)[0]
        elif self.model_mean_type == ModelMeanType.START_X:
            target = x_start
        else:
            target = noise
        terms["mse"] = mean_flat((target - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def _prior_bpd(self, x_start):
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, device=x_start.device,
                       dtype=torch.long)
        mean, _, log_var = self.q_mean_variance(x_start, t)
        return mean_flat(normal_kl(mean, log_var, 0.0, 0.0)) / np.log(2.0)

    def calc_bpd_loop(self, model, x_start, clip_denoised=True, model_kwargs=None):
        """The whole variational bound in bits per dim, with its terms:
        total_bpd, prior_bpd [N]; vb, xstart_mse, mse [N, T]."""
        vb, xstart_mse, mse = [], [], []
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((x_start.shape[0],), i, device=x_start.device, dtype=torch.long)
            noise = torch.randn_like(x_start)
            x_t = self.q_sample(x_start, t, noise=noise)
            with torch.no_grad():
                out = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised, model_kwargs)
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))
        vb = torch.stack(vb, dim=1)
        prior = self._prior_bpd(x_start)
        return {"total_bpd": vb.sum(dim=1) + prior, "prior_bpd": prior, "vb": vb,
                "xstart_mse": torch.stack(xstart_mse, dim=1), "mse": torch.stack(mse, dim=1)}


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion that takes only `use_timesteps` of a base process, with
    betas recomputed so that ᾱ at the kept steps is unchanged."""

    def __init__(self, use_timesteps, **kwargs):
        self.use_timesteps = set(use_timesteps)
        base = GaussianDiffusion(**kwargs)
        self.original_num_steps = base.num_timesteps
        self.timestep_map = []
        last, new_betas = 1.0, []
        for i, alpha_cumprod in enumerate(base.alphas_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1 - alpha_cumprod / last)
                last = alpha_cumprod
                self.timestep_map.append(i)
        if len(self.timestep_map) != len(self.use_timesteps):
            raise ValueError(f"use_timesteps must lie in [0, {base.num_timesteps})")
        super().__init__(**{**kwargs, "betas": np.array(new_betas)})


def create_gaussian_diffusion(*, steps=1000, learn_sigma=False, sigma_small=False,
                              noise_schedule="linear", use_kl=False, predict_xstart=False,
                              rescale_timesteps=False, rescale_learned_sigmas=False,
                              timestep_respacing="") -> SpacedDiffusion:
    """guided-diffusion's create_gaussian_diffusion: same arguments, same process."""
    betas = get_named_beta_schedule(noise_schedule, steps)
    if use_kl:
        loss_type = LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if learn_sigma:
        var_type = ModelVarType.LEARNED_RANGE
    else:
        var_type = ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(steps, timestep_respacing or [steps]),
        betas=betas,
        model_mean_type=ModelMeanType.START_X if predict_xstart else ModelMeanType.EPSILON,
        model_var_type=var_type,
        loss_type=loss_type,
        rescale_timesteps=rescale_timesteps,
    )
