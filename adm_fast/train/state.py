"""Training checkpoints that survive being killed.

A checkpoint at step N is a set of files in the log dir:
  model{N:06d}.safetensors          the weights (adm_fast.load_checkpoint reads it)
  ema_{rate}_{N:06d}.safetensors    one per EMA rate
  state{N:06d}.pt                   optimizer, loss scale, schedule sampler,
                                    every rank's RNG, data position, run identity
  latest.json                       {"step": N, "files": [...]}, written last
Every file goes to a temporary name, is fsync'ed and renamed, and latest.json
moves only after the whole set is on disk: a kill at any moment leaves the
previous checkpoint as the latest and intact. Earlier checkpoints are kept.
state*.pt holds tensors and plain containers only and is read back with
torch.load(weights_only=True).
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Dict, List, Optional

import numpy as np
import torch

from ..checkpoint import CheckpointError, fsync_path, read_state_dict

LATEST = "latest.json"
_MODEL_RE = re.compile(r"model(\d{6,})\.(safetensors|pt)$")


def model_file(step: int) -> str:
    return f"model{step:06d}.safetensors"


def ema_file(rate: str, step: int) -> str:
    return f"ema_{rate}_{step:06d}.safetensors"


def state_file(step: int) -> str:
    return f"state{step:06d}.pt"


def _atomic_json(obj, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_state(obj: Dict, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def mark_latest(log_dir: str, step: int, files: List[str]) -> None:
    missing = [f for f in files if not os.path.isfile(os.path.join(log_dir, f))]
    if missing:
        raise RuntimeError(f"refusing to mark step {step} as latest: {missing} not written")
    _fsync_dir(log_dir)
    _atomic_json({"step": step, "files": files}, os.path.join(log_dir, LATEST))


def find_latest(log_dir: str) -> Optional[str]:
    """The model file of the newest complete checkpoint in log_dir, or None."""
    pointer = os.path.join(log_dir, LATEST)
    if os.path.isfile(pointer):
        try:
            with open(pointer, encoding="utf-8") as f:
                info = json.load(f)
            files = [os.path.join(log_dir, name) for name in info["files"]]
            if all(os.path.isfile(p) for p in files):
                return os.path.join(log_dir, model_file(int(info["step"])))
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged pointer: fall back to scanning for complete sets
    steps = sorted((parse_step(p) for p in glob.glob(os.path.join(log_dir, "model*.safetensors"))),
                   reverse=True)
    for step in steps:
        if os.path.isfile(os.path.join(log_dir, state_file(step))):
            return os.path.join(log_dir, model_file(step))
    return None


def parse_step(path: str) -> int:
    match = _MODEL_RE.search(os.path.basename(path))
    if not match:
        raise CheckpointError(f"{path}: a resume checkpoint must be named model<step>.safetensors "
                              "(as adm-fast train writes it) or model<step>.pt")
    return int(match.group(1))


def load_resume(path: str, ema_rates: List[str]) -> Dict:
    """Everything needed to continue from model file `path`: its step, the
    weights, each EMA's weights (the model's when an EMA file is missing, as
    guided-diffusion does) and the training state (None for a bare .pt from
    guided-diffusion, which carries weights only)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"resume checkpoint {path} does not exist")
    step = parse_step(path)
    log_dir = os.path.dirname(path) or "."
    weights, _ = read_state_dict(path)
    emas = {}
    for rate in ema_rates:
        ema_path = os.path.join(log_dir, ema_file(rate, step))
        if not os.path.isfile(ema_path):
            ema_path = ema_path[: -len(".safetensors")] + ".pt"
        emas[rate] = read_state_dict(ema_path)[0] if os.path.isfile(ema_path) else None
    state = None
    state_path = os.path.join(log_dir, state_file(step))
    if os.path.isfile(state_path):
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    return {"step": step, "weights": weights, "emas": emas, "state": state, "path": path}


def sampler_state(sampler) -> Optional[Dict]:
    if not hasattr(sampler, "state_dict"):
        return None
    return {k: torch.from_numpy(np.asarray(v)) for k, v in sampler.state_dict().items()}


def load_sampler_state(sampler, state: Optional[Dict]) -> None:
    if state is not None and hasattr(sampler, "load_state_dict"):
        sampler.load_state_dict({k: v.numpy() for k, v in state.items()})


def rng_state(device: torch.device) -> Dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
