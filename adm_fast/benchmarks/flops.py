"""FLOPs of one classifier-guided sampling step, for model-FLOP utilisation.

Counted with torch.utils.flop_counter.FlopCounterMode on the eager backend:
the fused backends' custom ops are opaque to the counter, while the eager
path is plain convolutions, matmuls and einsums, the work any backend must do.
Only those are counted (norms, activations and the step update are
bandwidth, not FLOPs), which is the usual MFU convention.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from ..ops import use_backend


def step_flops(model: Callable[..., Tensor], x: Tensor, t: Tensor,
               model_kwargs: dict | None = None, classifier: torch.nn.Module | None = None,
               y: Tensor | None = None) -> dict[str, int]:
    """FLOPs of one guided step for the whole batch of x: "unet" (one forward),
    "classifier" (forward, and backward to the input as guidance takes it) and
    "total". The models run once each, on the eager backend."""
    counts = {"unet": 0, "classifier": 0}
    with use_backend("eager"):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x, t, **(model_kwargs or {}))
        counts["unet"] = int(counter.get_total_flops())
        if classifier is not None:
            if y is None:
                raise ValueError("counting the classifier's FLOPs needs the class labels y")
            # classifier_cond_fn's computation, with backward() in place of
            # autograd.grad(), which the counter's module hooks do not support.
            x_in = x.detach().requires_grad_(True)
            with FlopCounterMode(display=False) as counter, torch.enable_grad():
                log_probs = F.log_softmax(classifier(x_in, t).float(), dim=-1)
                selected = log_probs[torch.arange(len(log_probs), device=x.device), y.view(-1)]
                selected.sum().backward(inputs=[x_in])
            counts["classifier"] = int(counter.get_total_flops())
    counts["total"] = counts["unet"] + counts["classifier"]
    return counts
