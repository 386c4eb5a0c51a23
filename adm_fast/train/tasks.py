"""What is trained: the diffusion model (L_simple / L_hybrid at sampled t) and
the noisy classifier (cross-entropy on q_sample(x, t), as the paper trains it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..diffusion.resample import LossAwareSampler
from .loop import TrainLoop


def _fp32_out(model):
    """The model with its output in fp32: under bf16 autocast the last conv
    emits bf16, and the loss terms (log-variances, KL) want fp32."""
    def run(*args, **kwargs):
        return model(*args, **kwargs).float()
    return run


class DiffusionTrainLoop(TrainLoop):
    """guided-diffusion's TrainLoop objective. class_dropout_prob > 0 trains
    for classifier-free guidance: that share of labels becomes the model's
    null label (a model built with null_class=True)."""

    def __init__(self, *, class_dropout_prob: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= class_dropout_prob < 1.0:
            raise ValueError(f"--class_dropout_prob must be in [0, 1), got {class_dropout_prob}")
        if class_dropout_prob > 0 and getattr(self.model, "null_label", None) is None:
            raise ValueError("--class_dropout_prob needs a class-conditional model with a null "
                             "label: build it with --class_cond True --null_class True")
        self.class_dropout_prob = class_dropout_prob

    def prepare_cond(self, cond, gen):
        cond = super().prepare_cond(cond, gen)
        if self.class_dropout_prob > 0 and "y" in cond:
            drop = self.share(torch.rand(self.global_batch, generator=gen,
                                         device=self.world.device)) < self.class_dropout_prob
            cond["y"] = torch.where(drop, torch.full_like(cond["y"], self.model.null_label),
                                    cond["y"])
        return cond

    def losses(self, model, x, cond, t, weights, noise):
        loss, terms = diffusion_loss(self.diffusion, model, x, cond, t, weights, noise)
        if isinstance(self.sampler, LossAwareSampler):
            self.sampler.update_with_local_losses(t, terms["loss"].detach())
        return loss, {k: v.detach() * weights for k, v in terms.items()}


def diffusion_loss(diffusion, model, x, cond, t, weights, noise):
    """(the loss a diffusion model's training step differentiates, the per-sample
    terms): guided-diffusion's training_losses at timesteps t, weighted by the
    schedule sampler's importance weights. Shared with the benchmarks."""
    terms = diffusion.training_losses(_fp32_out(model), x, t, model_kwargs=cond, noise=noise)
    return (terms["loss"] * weights).mean(), terms


def _top_k(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.shape[-1])
    return (logits.topk(k, dim=-1).indices == labels[:, None]).any(dim=-1).float()


class ClassifierTrainLoop(TrainLoop):
    """guided-diffusion's classifier_train.py objective, with validation."""

    def __init__(self, *, noised: bool = True, val_data=None, eval_interval: int = 5,
                 **kwargs):
        super().__init__(**kwargs)
        self.noised, self.val_data = noised, val_data
        self.eval_interval = max(1, eval_interval)
        self._prefix = "train"

    def losses(self, model, x, cond, t, weights, noise):
        if "y" not in cond:
            raise ValueError("classifier training needs labels (a class-conditional dataset)")
        labels = cond["y"]
        if self.noised:
            x = self.diffusion.q_sample(x, t, noise=noise)
        else:
            t = torch.zeros_like(t)
        logits = model(x, timesteps=self.diffusion._model_timesteps(t)).float()
        loss = F.cross_entropy(logits, labels, reduction="none")
        p = self._prefix
        terms = {f"{p}_loss": loss.detach(), f"{p}_acc@1": _top_k(logits.detach(), labels, 1),
                 f"{p}_acc@5": _top_k(logits.detach(), labels, 5)}
        return loss.mean(), terms

    def run_step(self, batch, cond) -> bool:
        took = super().run_step(batch, cond)
        if self.val_data is not None and (self.step - 1) % self.eval_interval == 0:
            self.evaluate()
        return took

    @torch.no_grad()
    def evaluate(self) -> dict | None:
        batch, cond = next(self.val_data)
        batch = batch.to(self.world.device)
        cond = {k: v.to(self.world.device) for k, v in cond.items()}
        gen = torch.Generator(self.world.device)
        gen.manual_seed(self.seed * 31 + self.step + 2 ** 40)
        t = torch.randint(0, self.diffusion.num_timesteps, (batch.shape[0],), generator=gen,
                          device=self.world.device)
        noise = torch.randn(batch.shape, generator=gen, device=self.world.device)
        self.model.eval()
        self._prefix = "val"
        try:
            with self.mp.autocast():
                _, terms = self.losses(self.model, batch, cond, t, None, noise)
        finally:
            self._prefix = "train"
            self.model.train()
        self.metrics.add_losses(terms, t, self.diffusion.num_timesteps)
        return terms
