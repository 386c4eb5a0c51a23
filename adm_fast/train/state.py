"""Training checkpoints that survive being killed, and resume that heals.

A checkpoint at step N is a set of files in the log dir:
  model{N:06d}.safetensors          the weights (adm_fast.load_checkpoint reads it)
  ema_{rate}_{N:06d}.safetensors    one per EMA rate
  state{N:06d}.pt                   optimizer, loss scale, schedule sampler,
                                    every rank's RNG, class names, run identity
  latest.json                       {"step": N, "files": [...]}, written last
Every file goes to a temporary name, is fsync'ed and renamed (a kill leaves at
most a `*.tmp<pid>`, removed at the next start), and the state file is written
after the weights. Resume takes the newest set that is intact: every part
present and loadable (the weights verified against their checksum, the state
holding everything a resume reads); a damaged or incomplete newer set is
skipped with a warning saying why. latest.json is for people and tools;
resume does not trust it. state*.pt holds tensors and plain containers only
and is read back with torch.load(weights_only=True).
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch

from ..checkpoint import CheckpointError, fsync_path, read_state_dict, write_atomic

LATEST = "latest.json"
_MODEL_RE = re.compile(r"model(\d{6,})\.(safetensors|pt)$")
# The temporaries write_atomic leaves when killed, for the files a run writes.
_TMP_RE = re.compile(r"^(model\d+\.safetensors|ema_.+_\d+\.safetensors|state\d+\.pt|"
                     r"latest\.json|progress\.(jsonl|csv))\.tmp(\d+)$")
# What resume reads from a state file, and the type it must have.
_STATE_KEYS = {"step": int, "optimizer": dict, "precision": dict, "rng": list,
               "ema_rates": list, "global_batch": int, "world_size": int}


def model_file(step: int) -> str:
    return f"model{step:06d}.safetensors"


def ema_file(rate: str, step: int) -> str:
    return f"ema_{rate}_{step:06d}.safetensors"


def state_file(step: int) -> str:
    return f"state{step:06d}.pt"


def save_state(obj: Dict, path: str) -> None:
    write_atomic(path, lambda f: torch.save(obj, f))


def mark_latest(log_dir: str, step: int, files: List[str]) -> None:
    missing = [f for f in files if not os.path.isfile(os.path.join(log_dir, f))]
    if missing:
        raise RuntimeError(f"refusing to mark step {step} as latest: {missing} not written")
    fsync_path(log_dir)
    data = json.dumps({"step": step, "files": files}, indent=1).encode()
    write_atomic(os.path.join(log_dir, LATEST), lambda f: f.write(data))
    fsync_path(log_dir)


def remove_stale_temporaries(log_dir: str) -> List[str]:
    """Delete the `*.tmp<pid>` files killed runs left in log_dir (those of a
    process still alive are kept: it may be writing them). Returns their names."""
    removed = []
    for name in sorted(os.listdir(log_dir)) if os.path.isdir(log_dir) else []:
        match = _TMP_RE.match(name)
        if match is None or _alive(int(match.group(3))):
            continue
        try:
            os.remove(os.path.join(log_dir, name))
            removed.append(name)
        except FileNotFoundError:
            pass
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a leftover of an earlier process that had our pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def parse_step(path: str) -> int:
    match = _MODEL_RE.search(os.path.basename(path))
    if not match:
        raise CheckpointError(f"{path}: a resume checkpoint must be named model<step>.safetensors "
                              "(as adm-fast train writes it) or model<step>.pt")
    return int(match.group(1))


def read_state(path: str, step: int) -> Dict:
    """A state file, checked to hold everything resume reads (CheckpointError if not)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, empty, not a zip, not a pickle of tensors
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} is not a readable training state: {first}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: a training state is a dict, found {type(state).__name__}")
    missing = [k for k in _STATE_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path}: an incomplete training state, without "
                              f"{', '.join(missing)}")
    bad = [k for k, t in _STATE_KEYS.items() if not isinstance(state[k], t)]
    if bad or not {"state", "param_groups"} <= set(state["optimizer"]) or not all(
            isinstance(r, dict) and isinstance(r.get("cpu"), torch.Tensor) for r in state["rng"]):
        raise CheckpointError(f"{path}: a damaged training state (wrong types in "
                              f"{', '.join(bad) or 'optimizer or rng'})")
    if state["step"] != step:
        raise CheckpointError(f"{path}: holds step {state['step']}, not {step}")
    return state


def load_resume(path: str, ema_rates: Iterable[str] = (), require_state: bool = False) -> Dict:
    """Everything needed to continue from model file `path`, verified: its
    step, the weights (and metadata), the EMAs and the training state.

    With a state file beside it, every EMA the state lists must be there and
    load; EMAs asked for in ema_rates beyond those are loaded when present
    (None otherwise: the loop starts them from the model, as guided-diffusion
    does). A bare guided-diffusion .pt has no state (state None) unless
    require_state, which makes a missing state an error. Raises
    CheckpointError / FileNotFoundError naming the part that is wrong."""
    if not os.path.isfile(path):
        raise CheckpointError(f"resume checkpoint {path} does not exist")
    step = parse_step(path)
    log_dir = os.path.dirname(path) or "."
    state_path = os.path.join(log_dir, state_file(step))
    state = read_state(state_path, step) if os.path.isfile(state_path) else None
    if state is None and require_state:
        raise CheckpointError(f"{state_path} is missing (a save cut short?)")
    weights, meta = read_state_dict(path)
    own = [str(r) for r in state["ema_rates"]] if state else []
    emas = {}
    for rate in list(dict.fromkeys(own + list(ema_rates))):
        ema_path = os.path.join(log_dir, ema_file(rate, step))
        if not os.path.isfile(ema_path) and os.path.isfile(ema_path[:-len(".safetensors")] + ".pt"):
            ema_path = ema_path[:-len(".safetensors")] + ".pt"
        if os.path.isfile(ema_path):
            emas[rate] = read_state_dict(ema_path)[0]
        elif rate in own:
            raise CheckpointError(f"{ema_path} is missing, though {state_path} lists EMA {rate}")
        else:
            emas[rate] = None
    return {"step": step, "weights": weights, "meta": meta, "emas": emas, "state": state,
            "path": path}


def _steps(log_dir: str) -> List[int]:
    steps = set()
    for p in glob.glob(os.path.join(glob.escape(log_dir), "model*.safetensors")):
        try:
            steps.add(parse_step(p))
        except CheckpointError:
            pass
    return sorted(steps, reverse=True)


def newest_intact(log_dir: str, ema_rates: Iterable[str] = ()) -> Tuple[Optional[Dict], List[str]]:
    """(load_resume of the newest intact checkpoint set in log_dir or None,
    [why each newer set was skipped])."""
    skipped = []
    for step in _steps(log_dir):
        try:
            return load_resume(os.path.join(log_dir, model_file(step)), ema_rates,
                               require_state=True), skipped
        except (CheckpointError, OSError) as e:
            skipped.append(f"step {step}: {e}")
    return None, skipped


def find_latest(log_dir: str) -> Optional[str]:
    """The model file of the newest intact checkpoint in log_dir, or None."""
    found, _ = newest_intact(log_dir)
    return found["path"] if found else None


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
