"""One whole guided sampling step — UNet forward, the classifier's forward and
backward (cond_fn), the fused DDPM/DDIM update — replayed as a CUDA graph.

At 64×64 a step is hundreds of small kernels and the GPU waits on Python to
launch them; a graph launches the step at once. The step reads fixed
buffers: before each replay x_t, t, the step's noise and its coefficient rows
are copied in. The noise is still drawn eagerly with `randn_like(x)` in the
loop's order, so a seed gives the same samples with or without the graph.
Everything that synchronises with the host (the NaN watch) stays outside.

On a CPU device the same buffers run the step eagerly (that is how the
plumbing is tested without a GPU). If capturing fails — an op in the model
that cannot be captured — the step warns once and runs eagerly.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .. import ops


class GraphedStep:
    def __init__(self, diffusion, kind: str, model, cond_fn, model_kwargs: dict | None,
                 clip_denoised: bool, eta: float = 0.0, warmup: int = 2):
        if kind not in ("ddpm", "ddim"):
            raise ValueError(f"a graphed step is 'ddpm' or 'ddim', got {kind!r}")
        self.diffusion, self.kind, self.model, self.cond_fn = diffusion, kind, model, cond_fn
        self.model_kwargs = dict(model_kwargs or {})
        self.clip, self.eta, self.warmup = bool(clip_denoised), float(eta), warmup
        self.static: dict[str, Tensor] | None = None
        self.graph = None
        self.out = None

    def _body(self):
        d, s = self.diffusion, self.static
        model_output = d._run_model(self.model, s["x"], s["t"], self.model_kwargs)
        grad = None
        if self.cond_fn is not None:
            grad = d._cond_grad(self.cond_fn, s["x"], s["t"], self.model_kwargs)
        mean_type = d.mean_type_name
        if self.kind == "ddpm":
            return ops.ddpm_step(s["x"], model_output, s["noise"], s["coefs"], grad, mean_type,
                                 d.var_type_name, self.clip)
        return ops.ddim_step(s["x"], model_output, s["noise"], s["coefs"], grad, mean_type,
                             self.clip, self.eta)

    def __call__(self, x: Tensor, t: Tensor, i: int) -> dict[str, Tensor]:
        coefs = self.diffusion.step_coefs(self.kind, t)
        noise = torch.randn_like(x)  # both steps draw exactly this, once, per step
        if self.static is None:
            self.static = {"x": x.clone(), "t": t.clone(), "noise": noise, "coefs": coefs}
            self._capture()
        else:
            for name, value in (("x", x), ("t", t), ("noise", noise), ("coefs", coefs)):
                self.static[name].copy_(value)
        if self.graph is not None:
            self.graph.replay()
            sample, x0 = self.out
        else:
            sample, x0 = self._body()
        # The graph overwrites its outputs on the next replay; the loop (and a
        # progressive caller) keeps them longer.
        return {"sample": sample.clone(), "pred_xstart": x0.clone()}

    def _capture(self) -> None:
        # Not captured on a CPU, nor on CUDA tensors without a GPU (the fake ones
        # adm-fast bench plan traces the step on): the same buffers run eagerly.
        if self.static["x"].device.type != "cuda" or not torch.cuda.is_available():
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: lazy inits, autotuning, caches
            for _ in range(self.warmup):
                self._body()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.out = self._body()
        except Exception as e:  # noqa: BLE001 - any capture failure degrades to eager
            warnings.warn(f"the sampling step could not be captured as a CUDA graph ({e}); "
                          "running it without one", RuntimeWarning, stacklevel=3)
            torch.cuda.synchronize()
            self.graph = self.out = None
            return
        self.graph = graph
