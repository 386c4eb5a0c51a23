"""Timestep samplers for training (guided-diffusion's create_named_schedule_sampler).

A sampler draws t for each sample and a weight that keeps the loss an
unbiased estimate of the uniform-t objective (importance sampling).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch
import torch.distributed as dist


def create_named_schedule_sampler(name: str, diffusion):
    if name == "uniform":
        return UniformSampler(diffusion)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion)
    raise ValueError(f"unknown schedule sampler {name!r}; choose uniform or loss-second-moment")


class ScheduleSampler(ABC):
    @abstractmethod
    def weights(self) -> np.ndarray:
        """Unnormalised positive weights, one per diffusion step."""

    def sample(self, batch_size: int, device):
        """(timesteps [B] long, loss weights [B] float): t ~ p ∝ weights, weight 1/(T·p_t)."""
        w = self.weights()
        p = w / np.sum(w)
        indices_np = np.random.choice(len(p), size=(batch_size,), p=p)
        indices = torch.from_numpy(indices_np).long().to(device)
        weights = torch.from_numpy(1 / (len(p) * p[indices_np])).float().to(device)
        return indices, weights


class UniformSampler(ScheduleSampler):
    def __init__(self, diffusion):
        self.diffusion = diffusion
        self._weights = np.ones([diffusion.num_timesteps])

    def weights(self):
        return self._weights


class LossAwareSampler(ScheduleSampler):
    def update_with_local_losses(self, local_ts: torch.Tensor, local_losses: torch.Tensor):
        """Record this rank's (t, loss) pairs; under torch.distributed every rank
        gathers all ranks' pairs so that all keep identical weights."""
        if not (dist.is_available() and dist.is_initialized()):
            self.update_with_all_losses(local_ts.tolist(), local_losses.tolist())
            return
        world = dist.get_world_size()
        sizes = [torch.zeros(1, dtype=torch.int32, device=local_ts.device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([len(local_ts)], dtype=torch.int32,
                                            device=local_ts.device))
        sizes = [int(s) for s in sizes]
        max_bs = max(sizes)
        ts = [torch.zeros(max_bs).to(local_ts) for _ in sizes]
        losses = [torch.zeros(max_bs).to(local_losses) for _ in sizes]
        dist.all_gather(ts, torch.nn.functional.pad(local_ts, (0, max_bs - len(local_ts))))
        dist.all_gather(losses, torch.nn.functional.pad(local_losses,
                                                        (0, max_bs - len(local_losses))))
        self.update_with_all_losses(
            [x.item() for y, n in zip(ts, sizes) for x in y[:n]],
            [x.item() for y, n in zip(losses, sizes) for x in y[:n]])

    @abstractmethod
    def update_with_all_losses(self, ts, losses):
        """Update from every rank's (t, loss) pairs (identical on all ranks)."""


class LossSecondMomentResampler(LossAwareSampler):
    """p_t ∝ sqrt(E[L_t²]) over the last `history_per_term` losses per t, mixed
    with uniform_prob of uniform; uniform until every t has a full history."""

    def __init__(self, diffusion, history_per_term: int = 10, uniform_prob: float = 0.001):
        self.diffusion = diffusion
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self._loss_history = np.zeros([diffusion.num_timesteps, history_per_term],
                                      dtype=np.float64)
        self._loss_counts = np.zeros([diffusion.num_timesteps], dtype=np.int64)

    def weights(self):
        if not self._warmed_up():
            return np.ones([self.diffusion.num_timesteps], dtype=np.float64)
        weights = np.sqrt(np.mean(self._loss_history ** 2, axis=-1))
        weights /= np.sum(weights)
        weights *= 1 - self.uniform_prob
        weights += self.uniform_prob / len(weights)
        return weights

    def update_with_all_losses(self, ts, losses):
        for t, loss in zip(ts, losses):
            t = int(t)
            if self._loss_counts[t] == self.history_per_term:
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def _warmed_up(self):
        return (self._loss_counts == self.history_per_term).all()

    def state_dict(self):
        return {"loss_history": self._loss_history.copy(), "loss_counts": self._loss_counts.copy()}

    def load_state_dict(self, state):
        self._loss_history[...] = state["loss_history"]
        self._loss_counts[...] = state["loss_counts"]
