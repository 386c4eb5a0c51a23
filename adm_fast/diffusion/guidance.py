"""Guidance: the noisy classifier's gradient (classifier guidance) and
classifier-free guidance for models trained with label dropout."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def classifier_cond_fn(classifier: nn.Module, scale: float):
    """The cond_fn of guided-diffusion's classifier_sample.py:
    (x, t, y) -> s·∇x Σ_b log softmax(classifier(x_b, t_b))[y_b].

    Works when the sampler runs under torch.no_grad, with fp16/bf16
    classifiers (the log-softmax is taken in fp32), and returns x's dtype.
    """
    def cond_fn(x: Tensor, t: Tensor, y: Tensor | None = None, **unused) -> Tensor:
        if y is None:
            raise ValueError("classifier guidance needs the class labels: pass y in model_kwargs")
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            logits = classifier(x_in, t)
            log_probs = F.log_softmax(logits.float(), dim=-1)
            selected = log_probs[torch.arange(len(logits), device=logits.device), y.view(-1)]
            (grad,) = torch.autograd.grad(selected.sum(), x_in)
        return grad.to(x.dtype) * scale

    cond_fn.classifier, cond_fn.scale = classifier, scale
    return cond_fn


class ClassifierFreeGuidance(nn.Module):
    """eps = eps_uncond + w·(eps_cond − eps_uncond), from one batched call.

    The model must have a null class (built with null_class=True and trained
    with label dropout); w = 0 is the unconditional model, w = 1 the
    conditional one. A learned variance comes from the conditional half.
    Tensor keyword arguments with a batch dimension (e.g. low_res) are
    duplicated with x. Combine with classifier guidance by passing cond_fn to
    the sampler as usual.
    """

    def __init__(self, model: nn.Module, guidance_scale: float, null_label: int | None = None):
        super().__init__()
        if null_label is None:
            null_label = getattr(model, "null_label", None)
        if null_label is None:
            raise ValueError("classifier-free guidance needs a model with a null class: build it "
                             "with null_class=True and train it with label dropout")
        self.model = model
        self.guidance_scale = float(guidance_scale)
        self.null_label = int(null_label)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, **kwargs) -> Tensor:
        if y is None:
            raise ValueError("classifier-free guidance needs the class labels y")
        n = x.shape[0]
        twice = {k: torch.cat([v, v]) if isinstance(v, Tensor) and v.shape[:1] == (n,) else v
                 for k, v in kwargs.items()}
        out = self.model(torch.cat([x, x]), torch.cat([t, t]),
                         y=torch.cat([y, torch.full_like(y, self.null_label)]), **twice)
        cond, uncond = out[:n], out[n:]
        c = x.shape[1]
        eps = uncond[:, :c] + self.guidance_scale * (cond[:, :c] - uncond[:, :c])
        return torch.cat([eps, cond[:, c:]], dim=1)


def classifier_free_guidance(model: nn.Module, guidance_scale: float,
                             null_label: int | None = None) -> ClassifierFreeGuidance:
    return ClassifierFreeGuidance(model, guidance_scale, null_label)
