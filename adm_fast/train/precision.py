"""Mixed-precision training: fp32 master weights, fp16 loss scaling, bf16 autocast.

`MixedPrecisionTrainer` follows guided-diffusion's `fp16_util.MixedPrecisionTrainer`
(lg_loss_scale starting at 20, +fp16_scale_growth per good step, -1 and a
skipped step on overflow, fp32 master params the optimizer is built on, grad
and param norms) and fixes what its users ran into (guided-diffusion issues
#44, #50): every gradient, including those of parameters that stayed fp32, is
unscaled before the step, and a step whose gradients are not all finite is
skipped in every precision, so no NaN or inf reaches the weights.

Precisions:
  - "fp32": the model's parameters are the master params; no scaling.
  - "fp16": `model.convert_to_fp16()` (guided-diffusion's use_fp16); every
    parameter has an fp32 master copy, made before the conversion so that an
    fp32-built model loses nothing; dynamic loss scaling.
  - "bf16": fp32 weights, forward under `torch.autocast(..., torch.bfloat16)`;
    bf16 has fp32's exponent range, so no loss scaling.

Master params are one fp32 tensor per model parameter, in
`model.named_parameters()` order (guided-diffusion flattens them into two
buffers; per-parameter lists keep EMA and checkpoint code independent of the
precision). Under DistributedDataParallel, build the trainer on the bare model
first and wrap it afterwards: DDP must see the final parameter dtypes, and it
all-reduces the model's gradients before `optimize` copies them.
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch
from torch import Tensor, nn
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

__all__ = ["MixedPrecisionTrainer", "PRECISIONS"]

PRECISIONS = ("fp32", "fp16", "bf16")

logger = logging.getLogger("adm_fast.train")


def _check_bf16_autocast(device_type: str) -> None:
    # torch.autocast only warns and disables itself for an unsupported dtype,
    # which would silently train in fp32; refuse up front instead.
    if not torch.amp.is_autocast_available(device_type):
        raise RuntimeError(f"precision='bf16' needs torch.autocast on the model's device "
                           f"type {device_type!r}, which this PyTorch build does not offer")
    if device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise RuntimeError("precision='bf16': this CUDA device does not support bfloat16; "
                           "use precision='fp16'")


class MixedPrecisionTrainer:
    """Owns the master params, the loss scale and the optimizer step of a model.

    Per training step: `zero_grad()`, forward under `autocast()`,
    `backward(loss)` (once per micro-batch), then `optimize(opt)` with `opt`
    built on `master_params`. After `optimize`, `grad_norm` (of the unscaled
    gradients, before clipping) and `param_norm` (before the step) are set and
    no gradients are left behind.

    min_lg_loss_scale (default 0, i.e. a loss scale of 1) is the floor of the
    fp16 loss scale. An overflow that persists at scale 1 is a non-finite loss
    or model, not a range problem; without a floor the scale would sink until
    2**lg_loss_scale underflows to 0, after which every gradient is a "finite"
    zero and the optimizer keeps stepping on momentum alone. At the floor,
    overflowing steps keep being skipped and warned about.
    """

    def __init__(self, model: nn.Module, *, precision: str = "fp32",
                 initial_lg_loss_scale: float = 20.0, fp16_scale_growth: float = 1e-3,
                 min_lg_loss_scale: float = 0.0, max_grad_norm: float | None = None):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            raise TypeError("pass the bare model to MixedPrecisionTrainer and wrap it in "
                            "DistributedDataParallel afterwards (DDP must see the final "
                            "parameter dtypes)")
        if not fp16_scale_growth >= 0:
            raise ValueError(f"fp16_scale_growth must be >= 0, got {fp16_scale_growth}")
        if not initial_lg_loss_scale >= min_lg_loss_scale:
            raise ValueError(f"initial_lg_loss_scale ({initial_lg_loss_scale}) must be >= "
                             f"min_lg_loss_scale ({min_lg_loss_scale})")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be a positive number or None, "
                             f"got {max_grad_norm}")
        self.model = model
        self.precision = precision
        self.fp16_scale_growth = float(fp16_scale_growth)
        self.min_lg_loss_scale = float(min_lg_loss_scale)
        self.max_grad_norm = max_grad_norm
        self.lg_loss_scale = float(initial_lg_loss_scale)
        self.skipped_steps = 0
        self.grad_norm = float("nan")
        self.param_norm = float("nan")

        self._names = [name for name, _ in model.named_parameters()]
        if not self._names:
            raise ValueError("the model has no parameters to train")
        if precision == "fp16":
            if not callable(getattr(model, "convert_to_fp16", None)):
                raise TypeError(f"precision='fp16' needs a model with convert_to_fp16() "
                                f"(adm_fast's UNetModel, EncoderUNetModel); "
                                f"{type(model).__name__} has none")
            # Copy before converting, so an fp32-built model keeps full-precision
            # masters; converting is idempotent for a model built with use_fp16.
            self.master_params = [nn.Parameter(p.detach().to(torch.float32, copy=True))
                                  for p in model.parameters()]
            model.convert_to_fp16()
        else:
            bad = [(n, p.dtype) for n, p in model.named_parameters()
                   if p.dtype != torch.float32]
            if bad:
                raise ValueError(f"precision={precision!r} trains fp32 weights, but parameter "
                                 f"{bad[0][0]!r} is {bad[0][1]} ({len(bad)} non-fp32 in all); "
                                 f"build the model with use_fp16=False or use precision='fp16'")
            self.master_params = list(model.parameters())
        self.model_params = list(model.parameters())
        self._master_ids = {id(p) for p in self.master_params}
        self._device_type = self.model_params[0].device.type
        if precision == "bf16":
            _check_bf16_autocast(self._device_type)

    # -- the training step ---------------------------------------------------

    @property
    def loss_scale(self) -> float:
        return 2.0 ** self.lg_loss_scale if self.precision == "fp16" else 1.0

    def autocast(self):
        """Context manager for the forward pass (and the loss)."""
        if self.precision == "bf16":
            return torch.autocast(self._device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def zero_grad(self) -> None:
        for p in self.model_params:
            p.grad = None
        for p in self.master_params:
            p.grad = None

    def backward(self, loss: Tensor) -> None:
        if self.precision == "fp16":
            (loss * self.loss_scale).backward()
        else:
            loss.backward()

    def optimize(self, opt: torch.optim.Optimizer) -> bool:
        """Take the optimizer step from the accumulated gradients.

        Returns False, leaving every parameter untouched, when a gradient is not
        finite (fp16: the loss scale then drops by a factor of 2).
        """
        self._check_optimizer(opt)
        if all(p.grad is None for p in self.model_params):
            raise RuntimeError("optimize() found no gradients: call backward(loss) first")
        if self.precision == "fp16":
            self._master_grads_from_model()
        grads = [p.grad for p in self.master_params if p.grad is not None]
        with torch.no_grad():
            grad_norm = get_total_norm(grads, 2.0)
            param_norm = get_total_norm(self.master_params, 2.0)
            # One host sync for both norms.
            self.grad_norm, self.param_norm = torch.stack(
                [grad_norm.float(), param_norm.float()]).tolist()
            if not math.isfinite(self.grad_norm):
                self._skip()
                return False
            if self.max_grad_norm is not None:
                clip_grads_with_norm_(self.master_params, self.max_grad_norm, grad_norm)
        opt.step()
        if self.precision == "fp16":
            with torch.no_grad():
                for p, m in zip(self.model_params, self.master_params):
                    p.copy_(m)
            self.lg_loss_scale += self.fp16_scale_growth
        self.zero_grad()
        return True

    def _master_grads_from_model(self) -> None:
        inv_scale = 1.0 / self.loss_scale
        for p, m in zip(self.model_params, self.master_params):
            # A parameter without a gradient gets zeros, as in guided-diffusion's
            # fp16 trainer, so weight decay and momentum still apply to it.
            m.grad = (torch.zeros_like(m) if p.grad is None
                      else p.grad.detach().to(torch.float32, copy=True))
        torch._foreach_mul_([m.grad for m in self.master_params], inv_scale)

    def _skip(self) -> None:
        self.skipped_steps += 1
        if self.precision == "fp16":
            self.lg_loss_scale = max(self.lg_loss_scale - 1.0, self.min_lg_loss_scale)
            logger.warning("non-finite fp16 gradient (grad norm %s): skipped the step, "
                           "lg_loss_scale is now %.3f (%d steps skipped so far)",
                           self.grad_norm, self.lg_loss_scale, self.skipped_steps)
        else:
            logger.warning("non-finite %s gradient (grad norm %s): skipped the step "
                           "(%d steps skipped so far)",
                           self.precision, self.grad_norm, self.skipped_steps)
        self.zero_grad()

    def _check_optimizer(self, opt: torch.optim.Optimizer) -> None:
        for group in opt.param_groups:
            for p in group["params"]:
                if id(p) not in self._master_ids:
                    raise ValueError(
                        f"the optimizer holds a {p.dtype} tensor of shape {tuple(p.shape)} "
                        f"that is not one of this trainer's master_params; build it on "
                        f"trainer.master_params (precision={self.precision!r})")

    # -- trainer state -------------------------------------------------------

    def state_dict(self) -> dict[str, object]:
        return {"precision": self.precision, "lg_loss_scale": self.lg_loss_scale,
                "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, object]) -> None:
        missing = [k for k in ("precision", "lg_loss_scale", "skipped_steps")
                   if k not in state]
        if missing:
            raise KeyError(f"trainer state is missing {missing}; expected the dict "
                           f"MixedPrecisionTrainer.state_dict() returns")
        if state["precision"] != self.precision:
            raise ValueError(f"trainer state was saved with precision="
                             f"{state['precision']!r}, this trainer uses "
                             f"precision={self.precision!r}")
        self.lg_loss_scale = float(state["lg_loss_scale"])
        self.skipped_steps = int(state["skipped_steps"])

    # -- master params <-> model state dicts (EMA, checkpoints) --------------

    def master_params_to_state_dict(self, params: list[Tensor]) -> dict[str, Tensor]:
        """A full model state_dict whose parameters are `params` (fp32, aligned
        with master_params, e.g. EMA params) and whose buffers are the model's."""
        self._check_aligned(params, "params")
        state = self.model.state_dict()
        for name, value in zip(self._names, params):
            state[name] = value.detach()
        return state

    def state_dict_to_master_params(self, state_dict: dict[str, Tensor]) -> list[Tensor]:
        """fp32 copies of a model state_dict's parameters, aligned with master_params."""
        missing = [n for n in self._names if n not in state_dict]
        if missing:
            raise KeyError(f"state_dict lacks {len(missing)} of the model's parameters, "
                           f"first {missing[0]!r}")
        params = [state_dict[n] for n in self._names]
        self._check_aligned(params, "state_dict")
        return [v.detach().to(device=m.device, dtype=torch.float32, copy=True)
                for v, m in zip(params, self.master_params)]

    def load_model_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Load weights into both the model and the master params; with fp16, loading
        into the model alone would leave stale masters that the next step restores."""
        values = self.state_dict_to_master_params(state_dict)
        self.model.load_state_dict(state_dict)
        with torch.no_grad():
            for m, v in zip(self.master_params, values):
                m.copy_(v)

    def _check_aligned(self, params: list[Tensor], what: str) -> None:
        if len(params) != len(self.master_params):
            raise ValueError(f"{what} has {len(params)} parameters, the model has "
                             f"{len(self.master_params)}")
        for name, v, m in zip(self._names, params, self.master_params):
            if tuple(v.shape) != tuple(m.shape):
                raise ValueError(f"{what}: parameter {name!r} has shape {tuple(v.shape)}, "
                                 f"the model's is {tuple(m.shape)}")
