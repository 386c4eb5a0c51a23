"""The training loop shared by diffusion models and noisy classifiers.

One iteration: this rank's slice of the global batch, split into
microbatches (gradients synchronised once, on the last), a mixed-precision
optimizer step, the EMAs, the learning-rate schedule, logs, checkpoints.

Randomness that shapes the gradient (timesteps, noise, label dropout) is drawn
for the whole global batch from a generator seeded by (seed, step), and each
rank takes its strided share, matching the data shards (file i of a global
batch lives on rank i % world_size). So a run on N processes computes the same
update as one process with the same global batch, and a resumed run the same
as one never interrupted.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import resource
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from .. import checkpoint as ckpt
from ..distributed import World, barrier
from . import state as st
from .config import TrainError
from .metrics import Metrics
from .precision import MixedPrecisionTrainer

log = logging.getLogger("adm_fast.train")


def parse_ema_rates(ema_rate) -> list[str]:
    if ema_rate in (None, ""):
        return []
    rates = [r.strip() for r in str(ema_rate).split(",") if r.strip()]
    for r in rates:
        try:
            ok = 0.0 < float(r) < 1.0
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"--ema_rate takes comma-separated rates in (0, 1), got {r!r}")
    return rates


class TrainLoop:
    """Subclasses define `losses(model, x, cond, t, weights, noise)` →
    (scalar loss for backward, {name: per-sample values} to log)."""

    def __init__(self, *, model, diffusion, data, world: World, log_dir: str, batch_size: int,
                 lr: float = 1e-4, weight_decay: float = 0.0, microbatch: int = -1,
                 ema_rate="", log_interval: int = 10, save_interval: int = 10000,
                 resume: dict | None = None, precision: str = "fp32",
                 fp16_scale_growth: float = 1e-3, initial_lg_loss_scale: float = 20.0,
                 schedule_sampler=None, lr_anneal_steps: int = 0, max_steps: int = 0,
                 seed: int = 0, max_grad_norm: float | None = None, progress: bool = True,
                 run_info: dict | None = None, diffusion_flags: dict | None = None,
                 classes: list[str] | None = None):
        self.world, self.log_dir = world, log_dir
        self.diffusion, self.data = diffusion, data
        if batch_size < 1 or batch_size % world.world_size:
            raise ValueError(f"--batch_size {batch_size} (the global batch) must be a positive "
                             f"multiple of the world size {world.world_size}")
        self.global_batch = batch_size
        self.local_batch = batch_size // world.world_size
        self.microbatch = microbatch if 0 < microbatch < self.local_batch else self.local_batch
        self.lr, self.lr_anneal_steps, self.max_steps = lr, lr_anneal_steps, max_steps
        self.log_interval, self.save_interval = max(1, log_interval), max(1, save_interval)
        self.ema_rates = parse_ema_rates(ema_rate)
        self.sampler, self.seed, self.progress = schedule_sampler, seed, progress
        self.run_info = dict(run_info or {})
        # Stored with every weights file: the diffusion it samples with, its labels.
        self.diffusion_flags, self.classes = diffusion_flags, classes
        self.model = model.to(world.device)
        self.mp = MixedPrecisionTrainer(self.model, precision=precision,
                                        initial_lg_loss_scale=initial_lg_loss_scale,
                                        fp16_scale_growth=fp16_scale_growth,
                                        max_grad_norm=max_grad_norm)
        self.opt = torch.optim.AdamW(self.mp.master_params, lr=lr, weight_decay=weight_decay)
        self.step = 0
        self.emas = [[p.detach().clone() for p in self.mp.master_params] for _ in self.ema_rates]
        if resume is not None:
            self._restore(resume)
        else:
            torch.manual_seed(seed + world.rank)  # dropout differs per rank, as it should
        self.ddp = self.model
        if world.distributed:
            self.ddp = DDP(self.model, device_ids=[world.device] if world.device.type == "cuda"
                           else None, broadcast_buffers=False, bucket_cap_mb=128,
                           find_unused_parameters=False)
        if world.is_main:
            os.makedirs(log_dir, exist_ok=True)
        self.metrics = Metrics(log_dir, enabled=world.is_main, start_step=self.step)

    # --- randomness -------------------------------------------------------
    def generator(self) -> torch.Generator:
        g = torch.Generator(self.world.device)
        g.manual_seed((self.seed * 1_000_003 + self.step * 7919 + 17) % (2 ** 63))
        return g

    def share(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's strided share of a tensor drawn for the global batch."""
        return x[self.world.rank::self.world.world_size]

    def draw_timesteps(self, gen: torch.Generator):
        num_t = self.diffusion.num_timesteps
        w = torch.as_tensor(self.sampler.weights(), dtype=torch.float64, device=self.world.device)
        p = w / w.sum()
        t = torch.multinomial(p, self.global_batch, replacement=True, generator=gen)
        weights = (1.0 / (num_t * p[t])).float()
        return self.share(t), self.share(weights)

    # --- one iteration ----------------------------------------------------
    def run_step(self, batch: torch.Tensor, cond: dict[str, torch.Tensor]) -> bool:
        dev = self.world.device
        gen = self.generator()
        t, weights = self.draw_timesteps(gen)
        noise = self.share(torch.randn((self.global_batch,) + tuple(batch.shape[1:]),
                                       generator=gen, device=dev))
        cond = self.prepare_cond(cond, gen)
        batch = batch.to(dev, non_blocking=True)
        if batch.shape[0] != self.local_batch:
            raise RuntimeError(f"data gave a batch of {batch.shape[0]}, expected the per-rank "
                               f"batch {self.local_batch}")
        self.mp.zero_grad()
        n = self.local_batch
        for i in range(0, n, self.microbatch):
            sl = slice(i, min(i + self.microbatch, n))
            last = sl.stop >= n
            micro_cond = {k: v[sl] for k, v in cond.items()}
            sync = last or not isinstance(self.ddp, DDP)
            ctx = self.ddp.no_sync() if not sync else contextlib.nullcontext()
            with ctx:
                with self.mp.autocast():
                    loss, terms = self.losses(self.ddp, batch[sl], micro_cond, t[sl],
                                              weights[sl], noise[sl])
                # weighting by the microbatch's share gives the same gradient as
                # one pass over the whole batch, whatever --microbatch is
                self.mp.backward(loss * ((sl.stop - sl.start) / n))
            self.metrics.add_losses(terms, t[sl], self.diffusion.num_timesteps)
            self.after_microbatch(t[sl], terms)
        took = self.mp.optimize(self.opt)
        if not math.isfinite(self.mp.param_norm):
            # param_norm is of the weights before this step: the last step (or
            # the weights resumed) made them non-finite. Nothing of it is saved.
            raise TrainError(self._non_finite_message(
                f"the weights are not finite (param norm {self.mp.param_norm}) after step "
                f"{self.step}"))
        if took:
            for rate, ema in zip(self.ema_rates, self.emas):
                torch._foreach_lerp_(ema, [p.detach() for p in self.mp.master_params],
                                     1.0 - float(rate))
        self.step += 1
        self._anneal_lr()
        self.metrics.add("grad_norm", self.mp.grad_norm)
        self.metrics.add("param_norm", self.mp.param_norm)
        if self.mp.precision == "fp16":
            self.metrics.add("lg_loss_scale", self.mp.lg_loss_scale)
        return took

    def prepare_cond(self, cond, gen):
        return {k: v.to(self.world.device, non_blocking=True) for k, v in cond.items()}

    def after_microbatch(self, t, terms):
        pass

    def losses(self, model, x, cond, t, weights, noise):
        raise NotImplementedError("TrainLoop subclasses define losses()")

    def _anneal_lr(self):
        if self.lr_anneal_steps:
            frac = min(self.step / self.lr_anneal_steps, 1.0)
            for group in self.opt.param_groups:
                group["lr"] = self.lr * (1.0 - frac)

    # --- the loop -----------------------------------------------------------
    def done(self) -> bool:
        if self.max_steps and self.step >= self.max_steps:
            return True
        return bool(self.lr_anneal_steps) and self.step >= self.lr_anneal_steps

    def run(self) -> int:
        """Train until --max_steps / --lr_anneal_steps (forever when neither is
        set), saving every save_interval steps and at the end. Returns the step."""
        with contextlib.ExitStack() as stack:
            if self.progress and self.world.is_main:
                from tqdm import tqdm
                from tqdm.contrib.logging import logging_redirect_tqdm

                total = self.max_steps or self.lr_anneal_steps or None
                bar = stack.enter_context(tqdm(total=total, initial=self.step, unit="step",
                                               dynamic_ncols=True))
                # Log lines go through tqdm.write while the bar is open: above
                # it, not glued to its end.
                stack.enter_context(logging_redirect_tqdm(
                    loggers=[logging.root, logging.getLogger("adm_fast")]))
            else:
                bar = None
            return self._run(bar)

    def _run(self, bar) -> int:
        log.info("training from step %d: global batch %d = %d rank(s) x %d per rank "
                 "(microbatch %d), precision %s, device %s", self.step, self.global_batch,
                 self.world.world_size, self.local_batch, self.microbatch, self.mp.precision,
                 self.world.device)
        start, start_step, last_saved = time.perf_counter(), self.step, None
        while not self.done():
            batch, cond = next(self.data)
            self.run_step(batch, cond)
            if bar is not None:
                bar.update(1)
            if self.step % self.log_interval == 0:
                now = time.perf_counter()
                self.log_row(now - start, self.step - start_step)
                start, start_step = now, self.step
            if self.step % self.save_interval == 0:
                self.save()
                last_saved = self.step
        if self.step != start_step:  # the tail since the last log line
            self.log_row(time.perf_counter() - start, self.step - start_step)
        if last_saved != self.step:
            self.save()
        return self.step

    def log_row(self, seconds: float, steps: int) -> dict:
        extra = {"samples": self.step * self.global_batch,
                 "samples_per_s": steps * self.global_batch / max(seconds, 1e-9),
                 "lr": self.opt.param_groups[0]["lr"], "skipped_steps": self.mp.skipped_steps}
        if self.world.device.type == "cuda":
            extra["peak_mem_mb"] = torch.cuda.max_memory_allocated(self.world.device) / 2 ** 20
        else:
            extra["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return self.metrics.dump(self.step, extra, self.world)

    # --- checkpoints --------------------------------------------------------
    def _non_finite_message(self, what: str) -> str:
        where = ""
        if self.world.is_main:
            latest = st.find_latest(self.log_dir)
            where = (f" (the newest intact checkpoint is {latest})" if latest else
                     f" ({self.log_dir} holds no intact checkpoint)")
        return (f"{what}: training stopped before saving anything non-finite{where}; "
                "lower --lr, or set --max_grad_norm, and resume")

    def check_finite(self) -> None:
        """TrainError unless the weights, the EMAs and the optimizer's moments are
        all finite: what a checkpoint would save. One host sync."""
        named = [(f"weight {n}", p) for n, p in zip(self.mp._names, self.mp.master_params)]
        for rate, ema in zip(self.ema_rates, self.emas):
            named += [(f"EMA {rate} of {n}", p) for n, p in zip(self.mp._names, ema)]
        for n, p in zip(self.mp._names, self.mp.master_params):
            named += [(f"optimizer {k} of {n}", v) for k, v in self.opt.state.get(p, {}).items()
                      if isinstance(v, torch.Tensor) and v.is_floating_point()]
        with torch.no_grad():
            ok = torch.stack([torch.isfinite(t).all() for _, t in named]).tolist()
        if not all(ok):
            bad = [name for (name, _), good in zip(named, ok) if not good]
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise TrainError(self._non_finite_message(
                f"step {self.step}: {bad[0]} holds NaN or infinite values{more}"))

    def save(self) -> None:
        self.check_finite()  # on every rank: they hold the same values and stop together
        rngs = self._gather_rng()
        if self.world.is_main:
            os.makedirs(self.log_dir, exist_ok=True)
            files = [st.model_file(self.step)]
            meta = dict(diffusion=self.diffusion_flags, classes=self.classes)
            ckpt.save_checkpoint(self.model, os.path.join(self.log_dir, files[0]),
                                 state_dict=self.mp.master_params_to_state_dict(
                                     self.mp.master_params), **meta)
            for rate, ema in zip(self.ema_rates, self.emas):
                files.append(st.ema_file(rate, self.step))
                ckpt.save_checkpoint(self.model, os.path.join(self.log_dir, files[-1]),
                                     state_dict=self.mp.master_params_to_state_dict(ema), **meta)
            files.append(st.state_file(self.step))
            st.save_state({
                "step": self.step, "optimizer": self.opt.state_dict(),
                "precision": self.mp.state_dict(), "sampler": st.sampler_state(self.sampler),
                "rng": rngs, "world_size": self.world.world_size,
                "global_batch": self.global_batch, "ema_rates": list(self.ema_rates),
                "classes": list(self.classes) if self.classes is not None else None,
                # optimizer state i is parameter param_names[i]: resume checks the
                # moments' shapes against the weights saved beside them
                "param_names": list(self.mp._names),
                "run": {k: v for k, v in self.run_info.items()
                        if isinstance(v, (str, int, float, bool))},
            }, os.path.join(self.log_dir, files[-1]))
            st.mark_latest(self.log_dir, self.step, files)
            log.info("saved checkpoint at step %d in %s", self.step, self.log_dir)
        barrier(self.world)

    def _gather_rng(self) -> list[dict[str, torch.Tensor]]:
        mine = st.rng_state(self.world.device)
        if not self.world.distributed:
            return [mine]
        out: list = [None] * self.world.world_size
        torch.distributed.all_gather_object(out, {k: v.cpu() for k, v in mine.items()})
        return out

    def _restore(self, resume: dict) -> None:
        ckpt.check_fits(resume["weights"], self.model, resume["path"],
                        "the model these flags build")
        self.mp.load_model_state_dict(resume["weights"])
        for i, rate in enumerate(self.ema_rates):
            sd = resume["emas"].get(rate)
            if sd is None:
                log.warning("no EMA %s at step %d: starting it from the model", rate,
                            resume["step"])
                continue
            ckpt.check_fits(sd, self.model, f"EMA {rate} of {resume['path']}",
                            "the model these flags build")
            self.emas[i] = [p.to(self.world.device)
                            for p in self.mp.state_dict_to_master_params(sd)]
        self.step = resume["step"]
        state = resume["state"]
        if state is None:
            log.warning("%s: RESUMING FROM THE WEIGHTS ONLY (%s): the optimizer moments, loss "
                        "scale, schedule sampler and RNG start fresh at step %d, so this run "
                        "will not match one never interrupted", resume["path"],
                        resume.get("weights_only") or "no training state beside it", self.step)
            torch.manual_seed(self.seed + self.world.rank + self.step)
            return
        self._check_state_fits(state, os.path.join(os.path.dirname(resume["path"]) or ".",
                                                   st.state_file(self.step)))
        if state.get("global_batch") not in (None, self.global_batch):
            log.warning("resuming with global batch %d, the run had %s", self.global_batch,
                        state["global_batch"])
        self.opt.load_state_dict(state["optimizer"])
        self.mp.load_state_dict(state["precision"])
        st.load_sampler_state(self.sampler, state.get("sampler"))
        rngs = state.get("rng") or []
        if len(rngs) == self.world.world_size:
            st.set_rng_state(rngs[self.world.rank], self.world.device)
        else:
            log.warning("the checkpoint holds RNG states of %d rank(s), this run has %d: "
                        "reseeding", len(rngs), self.world.world_size)
            torch.manual_seed(self.seed + self.world.rank + self.step)
        self._anneal_lr()

    def _check_state_fits(self, state: dict, path: str) -> None:
        """CheckpointError (one line) unless the optimizer state and the schedule
        sampler's state have the model's and the sampler's shapes: a state saved
        for other flags (a damaged one was skipped before this)."""
        ids = [i for g in state["optimizer"]["param_groups"] for i in g["params"]]
        params = self.mp.master_params
        if len(ids) != len(params) or len(state["optimizer"]["param_groups"]) != len(
                self.opt.param_groups):
            raise ckpt.CheckpointError(f"{path}: its optimizer state holds {len(ids)} "
                                       f"parameters, the model these flags build has "
                                       f"{len(params)}")
        for i, name, p in zip(ids, self.mp._names, params):
            for key, v in state["optimizer"]["state"].get(i, {}).items():
                if isinstance(v, torch.Tensor) and v.dim() and v.shape != p.shape:
                    raise ckpt.CheckpointError(
                        f"{path}: optimizer {key} of {name!r} has shape {list(v.shape)}, the "
                        f"parameter these flags build {list(p.shape)}")
        saved = state.get("sampler")
        if saved is not None and hasattr(self.sampler, "state_dict"):
            own = self.sampler.state_dict()
            if set(saved) != set(own) or any(tuple(saved[k].shape) != tuple(own[k].shape)
                                              for k in own):
                raise ckpt.CheckpointError(
                    f"{path}: its schedule sampler state does not fit --schedule_sampler "
                    f"{type(self.sampler).__name__} with {self.diffusion.num_timesteps} "
                    "timesteps")
