"""Sampling loops: DDPM (ancestral), DDIM and DPM-Solver++(2M).

Same seed, same images: the loops draw their Gaussian noise exactly as
guided-diffusion's do (`randn` of the full shape for x_T, then the steps'
own `randn_like(x)`), so on CPU in fp32 a given torch.manual_seed and the
same weights give guided-diffusion's samples.

A NaN or inf in the sample is recorded on the device as it happens (no host
synchronisation per step) and reported, with the step it appeared at, at the
next check (every `check_every` steps and at the end).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor


class NonFiniteSampleError(FloatingPointError):
    """A sampling loop produced NaN or inf; the message says at which step."""


class _FiniteWatch:
    """Remembers, on the device, the first loop step whose sample was not finite."""

    def __init__(self, num_steps: int, device, check_every: int):
        self.num_steps = num_steps
        self.check_every = max(1, int(check_every))
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def update(self, sample: Tensor, step: int) -> None:
        bad = ~torch.isfinite(sample).all()
        self.first_bad = torch.where(bad & (self.first_bad < 0),
                                     torch.full_like(self.first_bad, step), self.first_bad)
        if (step + 1) % self.check_every == 0 or step + 1 == self.num_steps:
            self.check()

    def check(self) -> None:
        step = int(self.first_bad)
        if step >= 0:
            raise NonFiniteSampleError(
                f"the sample became NaN or inf at step {step + 1} of {self.num_steps}; check "
                f"the model's precision, the guidance scale, and the inputs")


class SamplingLoops:
    """Loop methods of GaussianDiffusion (mixed in)."""

    check_every = 10  # steps between NaN/inf checks (each is one host sync)

    def _loop(self, step_fn, model, shape, noise, device, progress,
              indices=None) -> Iterator[dict[str, Tensor]]:
        if not isinstance(shape, (tuple, list)):
            raise TypeError(f"shape must be a tuple or list (N, C, H, W), got {type(shape).__name__}")
        if device is None:
            if noise is not None:
                device = noise.device
            else:
                params = getattr(model, "parameters", None)
                device = next(params()).device if params else torch.device("cpu")
        img = noise if noise is not None else torch.randn(*shape, device=device)
        if tuple(img.shape) != tuple(shape):
            raise ValueError(f"noise {list(img.shape)} does not have the shape {list(shape)}")
        if indices is None:
            indices = list(range(self.num_timesteps))[::-1]
        watch = _FiniteWatch(len(indices), img.device, self.check_every)
        # Every step's timesteps made on the device at once: torch.tensor of a
        # Python list per step is a host-to-device copy inside the loop.
        all_t = torch.tensor(list(indices), device=device).unsqueeze(1).expand(
            -1, shape[0]).contiguous()
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices)
        for step, i in enumerate(indices):
            t = all_t[step]
            with torch.no_grad():
                out = step_fn(img, t, i)
                watch.update(out["sample"], step)
                yield out
                img = out["sample"]

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                      cond_fn=None, model_kwargs=None, device=None, progress=False,
                      cuda_graph=False) -> Tensor:
        """Samples by ancestral sampling (Algorithm 1 with cond_fn). cuda_graph:
        replay each whole step (model, cond_fn, update) as one CUDA graph."""
        final = None
        for final in self.p_sample_loop_progressive(model, shape, noise, clip_denoised,  # noqa: B007 (the last is the result)
                                                    denoised_fn, cond_fn, model_kwargs,
                                                    device, progress, cuda_graph):
            pass
        return final["sample"]

    def p_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True,
                                  denoised_fn=None, cond_fn=None, model_kwargs=None,
                                  device=None, progress=False, cuda_graph=False):
        """Yields p_sample's output at every step, from t = T−1 down to 0."""
        if cuda_graph:
            return self._loop(self._graphed("ddpm", model, cond_fn, model_kwargs,
                                            clip_denoised, denoised_fn),
                              model, shape, noise, device, progress)

        def step(x, t, i):
            return self.p_sample(model, x, t, clip_denoised, denoised_fn, cond_fn, model_kwargs)
        return self._loop(step, model, shape, noise, device, progress)

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                         cond_fn=None, model_kwargs=None, device=None, progress=False,
                         eta=0.0, cuda_graph=False) -> Tensor:
        """Samples by DDIM (Algorithm 2 with cond_fn); cuda_graph as p_sample_loop."""
        final = None
        for final in self.ddim_sample_loop_progressive(model, shape, noise, clip_denoised,  # noqa: B007 (the last is the result)
                                                       denoised_fn, cond_fn, model_kwargs,
                                                       device, progress, eta, cuda_graph):
            pass
        return final["sample"]

    def ddim_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True,
                                     denoised_fn=None, cond_fn=None, model_kwargs=None,
                                     device=None, progress=False, eta=0.0, cuda_graph=False):
        if cuda_graph:
            return self._loop(self._graphed("ddim", model, cond_fn, model_kwargs,
                                            clip_denoised, denoised_fn, eta),
                              model, shape, noise, device, progress)

        def step(x, t, i):
            return self.ddim_sample(model, x, t, clip_denoised, denoised_fn, cond_fn,
                                    model_kwargs, eta)
        return self._loop(step, model, shape, noise, device, progress)

    def _graphed(self, kind, model, cond_fn, model_kwargs, clip_denoised, denoised_fn,
                 eta=0.0):
        if denoised_fn is not None:
            raise ValueError("cuda_graph=True runs the fused step; a denoised_fn (a Python "
                             "hook) cannot be part of the graph")
        from .graphed import GraphedStep
        return GraphedStep(self, kind, model, cond_fn, model_kwargs, clip_denoised, eta)

    def dpm_solver_sample_loop(self, model, shape, noise=None, clip_denoised=True,
                               denoised_fn=None, cond_fn=None, model_kwargs=None, device=None,
                               progress=False, steps=None, lower_order_final=True) -> Tensor:
        """Samples by DPM-Solver++(2M) (Lu et al., 2022): multistep, second
        order, on the data prediction; classifier guidance shifts the noise
        prediction as in DDIM.

        steps=None runs over this process's timesteps (respace it to 10–25);
        steps=N picks N of them uniformly in log-SNR, which suits the solver
        far better than uniform t: on the full 1000-step process, steps=20 is
        the recommended fast sampler. lower_order_final takes a first-order
        final update, which keeps few-step runs stable.
        """
        final = None
        for final in self.dpm_solver_sample_loop_progressive(  # noqa: B007 (the last is the result)
                model, shape, noise, clip_denoised, denoised_fn, cond_fn, model_kwargs, device,
                progress, steps, lower_order_final):
            pass
        return final["sample"]

    def log_snr_timesteps(self, steps: int):
        """`steps` indices of this process, uniform in log-SNR, T−1 first and 0 last."""
        ab = self.alphas_cumprod
        lam = 0.5 * np.log(ab) - 0.5 * np.log(1.0 - ab)  # decreasing in t
        if not 2 <= steps <= self.num_timesteps:
            raise ValueError(f"steps must be in [2, {self.num_timesteps}], got {steps}")
        picked = []
        for target in np.linspace(lam[-1], lam[0], steps):
            i = int(np.argmin(np.abs(lam - target)))
            if not picked or i != picked[-1]:
                picked.append(i)
        if len(picked) != steps:  # the grid is too coarse near the ends: fill in order
            rest = [i for i in range(self.num_timesteps - 1, -1, -1) if i not in picked]
            picked = sorted(set(picked) | set(rest[: steps - len(picked)]), reverse=True)
        return picked

    def dpm_solver_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True,
                                           denoised_fn=None, cond_fn=None, model_kwargs=None,
                                           device=None, progress=False, steps=None,
                                           lower_order_final=True):
        """Yields {"sample", "pred_xstart"} per model evaluation; the last sample
        is the data prediction at timestep index 0, as in DDIM."""
        indices = (list(range(self.num_timesteps))[::-1] if steps is None
                   else self.log_snr_timesteps(int(steps)))
        following = dict(zip(indices, indices[1:]))
        ab = self.alphas_cumprod
        history = {}

        def lam(i):  # log(α/σ) at timestep index i
            return 0.5 * math.log(ab[i]) - 0.5 * math.log(1.0 - ab[i])

        def step(x, t, i):
            out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
            if cond_fn is not None:
                out = self.condition_score(cond_fn, out, x, t, model_kwargs)
            x0 = out["pred_xstart"]
            if i not in following:
                return {"sample": x0, "pred_xstart": x0}
            j = following[i]
            h = lam(j) - lam(i)
            d = x0
            if history and not (lower_order_final and j == indices[-1]):
                r = history["h"] / h  # second order from the previous data prediction
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * history["x0"]
            history.update(x0=x0, h=h)
            sample = (math.sqrt((1 - ab[j]) / (1 - ab[i])) * x
                      - math.sqrt(ab[j]) * math.expm1(-h) * d)
            return {"sample": sample, "pred_xstart": x0}

        return self._loop(step, model, shape, noise, device, progress, indices)
