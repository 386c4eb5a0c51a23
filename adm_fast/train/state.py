"""Training checkpoints that survive being killed, and resume that heals.

A checkpoint at step N is a set of files in the log dir:
  model{N:06d}.safetensors          the weights (adm_fast.load_checkpoint reads it)
  ema_{rate}_{N:06d}.safetensors    one per EMA rate
  state{N:06d}.pt                   optimizer, loss scale, schedule sampler,
                                    every rank's RNG, class names, run identity
  latest.json                       {"step": N, "files": [...]}, written last
Every file goes to a temporary name, is fsync'ed and renamed (adm_fast.io: a
kill leaves at most a `.NAME.partialPID`, removed at the next start), and the
state file is written
after the weights. Resume takes the newest set that is intact: every part
present and loadable (the weights verified against their checksum and finite,
the state holding everything a resume reads, of the right types, shapes and
sizes, and finite); a damaged or incomplete newer set is skipped with a
warning saying why. latest.json is for people and tools; resume does not
trust it. state*.pt holds tensors and plain containers only and is read back
with torch.load(weights_only=True).

When no set is intact, what happens depends on why (train/run.py): weights
without a state file are a save cut short (the state is written last) and
are written again; a state file that is there but damaged marks a save that
finished, whose weights are kept: the run stops and says how to continue from
them (--resume_checkpoint, weights only) or start elsewhere, rather than train
from step 0 over them.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import re
from collections.abc import Iterable

import numpy as np
import torch

from ..checkpoint import CheckpointError, read_state_dict
from ..io import atomic_write

LATEST = "latest.json"
_MODEL_RE = re.compile(r"model(\d{6,})\.(safetensors|pt)$")
# What resume reads from a state file, and the type it must have.
_STATE_KEYS = {"step": int, "optimizer": dict, "precision": dict, "rng": list,
               "ema_rates": list, "global_batch": int, "world_size": int}
# What AdamW keeps per parameter (amsgrad adds max_exp_avg_sq).
_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


class StateError(CheckpointError):
    """A training state file (state<step>.pt) that is there but cannot be
    resumed from: unreadable, incomplete, or holding values of the wrong type,
    shape or size, or non-finite ones. Its weights may still be intact."""


def model_file(step: int) -> str:
    return f"model{step:06d}.safetensors"


def ema_file(rate: str, step: int) -> str:
    return f"ema_{rate}_{step:06d}.safetensors"


def state_file(step: int) -> str:
    return f"state{step:06d}.pt"


def save_state(obj: dict, path: str) -> None:
    atomic_write(path, lambda f: torch.save(obj, f), hint=True)


def mark_latest(log_dir: str, step: int, files: list[str]) -> None:
    missing = [f for f in files if not os.path.isfile(os.path.join(log_dir, f))]
    if missing:
        raise RuntimeError(f"refusing to mark step {step} as latest: {missing} not written")
    data = json.dumps({"step": step, "files": files}, indent=1).encode()
    atomic_write(os.path.join(log_dir, LATEST), lambda f: f.write(data), hint=True)


def parse_step(path: str) -> int:
    match = _MODEL_RE.search(os.path.basename(path))
    if not match:
        raise CheckpointError(f"{path}: a resume checkpoint must be named model<step>.safetensors "
                              "(as adm-fast train writes it) or model<step>.pt")
    return int(match.group(1))


def read_state(path: str, step: int) -> dict:
    """A state file, checked to hold everything resume reads, of the types,
    sizes and finite values resume needs (StateError if not)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, empty, not a zip, not a pickle of tensors
        # torch's own words run on with advice; the first sentence says what is wrong
        first = str(e).splitlines()[0].split(". ")[0] if str(e) else type(e).__name__
        raise StateError(f"{path} is not a readable training state: {first}") from None
    if not isinstance(state, dict):
        raise StateError(f"{path}: a training state is a dict, found {type(state).__name__}")
    missing = [k for k in _STATE_KEYS if k not in state]
    if missing:
        raise StateError(f"{path}: an incomplete training state, without "
                         f"{', '.join(missing)}")
    bad = [k for k, t in _STATE_KEYS.items()
           if not isinstance(state[k], t) or isinstance(state[k], bool)]
    if bad or not {"state", "param_groups"} <= set(state["optimizer"]) or not all(
            isinstance(r, dict) and isinstance(r.get("cpu"), torch.Tensor) for r in state["rng"]):
        raise StateError(f"{path}: a damaged training state (wrong types in "
                         f"{', '.join(bad) or 'optimizer or rng'})")
    if state["step"] != step:
        raise StateError(f"{path}: holds step {state['step']}, not {step}")
    why = _damage(state)
    if why:
        raise StateError(f"{path}: a damaged training state ({why})")
    return state


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _count(v, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _damage(state: dict) -> str | None:
    """Why the values of a well-formed state cannot be resumed from, or None.
    Everything _restore hands to torch is checked here, so that a damaged
    value is a skipped checkpoint, not a traceback at load or at the first step."""
    if state["global_batch"] < 1 or state["world_size"] < 1:
        return f"global_batch {state['global_batch']}, world_size {state['world_size']}"
    for name, value in (("ema_rates", state["ema_rates"]), ("classes", state.get("classes"))):
        if value is not None and not all(isinstance(v, str) and v for v in value):
            return f"{name} {value!r}"
    if not all(_rate(r) for r in state["ema_rates"]):
        return f"ema_rates {state['ema_rates']!r}"
    why = _optimizer_damage(state["optimizer"]) or _precision_damage(state["precision"])
    if why:
        return why
    if not state["rng"]:
        return "rng: no rank's state"
    for rank, r in enumerate(state["rng"]):
        for key, tensor in r.items():
            if key not in ("cpu", "cuda") or not isinstance(tensor, torch.Tensor):
                return f"rng of rank {rank}: {key!r}"
            if key == "cpu":
                shape = torch.get_rng_state().shape
            elif torch.cuda.is_available():
                shape = torch.cuda.get_rng_state().shape
            else:
                shape = tensor.shape  # never set on this machine: only its dtype matters
            if tensor.dtype != torch.uint8 or tensor.shape != shape:
                return (f"rng {key} of rank {rank} is {tensor.dtype} {list(tensor.shape)}, "
                        f"not uint8 {list(shape)}")
    sampler = state.get("sampler")
    if sampler is not None and not (isinstance(sampler, dict) and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sampler.items())):
        return "schedule sampler"
    names = state.get("param_names")
    if names is not None:
        ids = [i for g in state["optimizer"]["param_groups"] for i in g["params"]]
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)
                and len(names) == len(ids)):
            return "param_names"
    return None


def _rate(r) -> bool:
    try:
        return 0.0 < float(r) < 1.0
    except (TypeError, ValueError):
        return False


def _optimizer_damage(opt: dict) -> str | None:
    groups, per = opt["param_groups"], opt["state"]
    if not isinstance(groups, list) or not groups or not isinstance(per, dict):
        return "optimizer param_groups or state"
    ref = torch.optim.AdamW([torch.zeros(1)]).param_groups[0]
    ids: list = []
    for g in groups:
        if not isinstance(g, dict) or not isinstance(g.get("params"), list) or not all(
                _count(i) for i in g["params"]):
            return "optimizer param_groups"
        ids += g["params"]
        for key, default in ref.items():
            if key == "params" or key not in g:
                continue
            v = g[key]
            if isinstance(default, bool):
                ok = isinstance(v, bool)
            elif default is None:
                ok = v is None or isinstance(v, bool)
            elif isinstance(default, tuple):
                ok = (isinstance(v, (tuple, list)) and len(v) == len(default)
                      and all(_number(b) and 0.0 <= b < 1.0 for b in v))
            elif isinstance(default, (int, float)):
                ok = _number(v) and v >= 0
            else:
                ok = True
            if not ok:
                return f"optimizer {key} {v!r}"
    if len(set(ids)) != len(ids):
        return "optimizer parameter ids repeat"
    known = set(ids)
    for i, s in per.items():
        if i not in known or not isinstance(s, dict):
            return f"optimizer state of an unknown parameter {i!r}"
        missing = [k for k in ("step", "exp_avg", "exp_avg_sq") if k not in s]
        if missing:
            return f"optimizer state of parameter {i} without {', '.join(missing)}"
        step = s["step"]
        if isinstance(step, torch.Tensor):
            step = float(step) if step.numel() == 1 and step.is_floating_point() else None
        if not (_number(step) and step >= 0):
            return f"optimizer step of parameter {i}: {s['step']!r}"
        moments = {k: s[k] for k in _MOMENTS if k in s}
        for key, t in moments.items():
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                return f"optimizer {key} of parameter {i} is not a float tensor"
        if len({t.shape for t in moments.values()}) > 1:
            shapes = ", ".join(f"{k} {list(t.shape)}" for k, t in moments.items())
            return f"optimizer moments of parameter {i} differ in shape ({shapes})"
        for key, t in moments.items():
            if not bool(torch.isfinite(t).all()):
                return f"optimizer {key} of parameter {i} holds NaN or infinite values"
    return None


def _precision_damage(prec: dict) -> str | None:
    from .precision import PRECISIONS

    if prec.get("precision") not in PRECISIONS:
        return f"precision {prec.get('precision')!r}"
    if not _number(prec.get("lg_loss_scale")) or not _count(prec.get("skipped_steps")):
        return (f"precision lg_loss_scale {prec.get('lg_loss_scale')!r}, skipped_steps "
                f"{prec.get('skipped_steps')!r}")
    return None


def _check_state_fits_weights(state: dict, weights: dict, path: str) -> None:
    """A state's optimizer moments have the shapes of the weights saved with it
    (states that name their parameters; older ones are checked against the model
    at restore)."""
    names = state.get("param_names")
    if names is None:
        return
    ids = [i for g in state["optimizer"]["param_groups"] for i in g["params"]]
    for i, name in zip(ids, names):
        w = weights.get(name)
        if w is None:
            raise StateError(f"{path}: a damaged training state (parameter {name!r} is not in "
                             "the weights saved with it)")
        for key in _MOMENTS:
            t = state["optimizer"]["state"].get(i, {}).get(key)
            if t is not None and t.shape != w.shape:
                raise StateError(f"{path}: a damaged training state (optimizer {key} of "
                                 f"{name!r} has shape {list(t.shape)}, the weight "
                                 f"{list(w.shape)})")


def _check_finite_weights(weights: dict, path: str) -> None:
    for name, t in weights.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{path}: weight {name!r} holds NaN or infinite values")


def load_resume(path: str, ema_rates: Iterable[str] = (), require_state: bool = False,
                weights_only: bool = False) -> dict:
    """Everything needed to continue from model file `path`, verified: its
    step, the weights (and metadata), the EMAs and the training state.

    With a state file beside it, every EMA the state lists must be there and
    load; EMAs asked for in ema_rates beyond those are loaded when present
    (None otherwise: the loop starts them from the model, as guided-diffusion
    does). A bare guided-diffusion .pt has no state (state None) unless
    require_state, which makes a missing state an error; weights_only leaves
    the state file unread (state None). Raises CheckpointError (StateError for
    the state file) / FileNotFoundError naming the part that is wrong."""
    if not os.path.isfile(path):
        raise CheckpointError(f"resume checkpoint {path} does not exist")
    step = parse_step(path)
    log_dir = os.path.dirname(path) or "."
    state_path = os.path.join(log_dir, state_file(step))
    state = None
    if not weights_only and os.path.isfile(state_path):
        state = read_state(state_path, step)
    if state is None and require_state:
        raise StateError(f"{state_path} is missing (a save cut short?)")
    weights, meta = read_state_dict(path)
    _check_finite_weights(weights, path)
    if state is not None:
        _check_state_fits_weights(state, weights, state_path)
    own = [str(r) for r in state["ema_rates"]] if state else []
    emas = {}
    for rate in list(dict.fromkeys(own + list(ema_rates))):
        ema_path = os.path.join(log_dir, ema_file(rate, step))
        if not os.path.isfile(ema_path) and os.path.isfile(ema_path[:-len(".safetensors")] + ".pt"):
            ema_path = ema_path[:-len(".safetensors")] + ".pt"
        if os.path.isfile(ema_path):
            emas[rate] = read_state_dict(ema_path)[0]
            _check_finite_weights(emas[rate], ema_path)
        elif rate in own:
            raise CheckpointError(f"{ema_path} is missing, though {state_path} lists EMA {rate}")
        else:
            emas[rate] = None
    return {"step": step, "weights": weights, "meta": meta, "emas": emas, "state": state,
            "path": path}


def _steps(log_dir: str) -> list[int]:
    steps = set()
    for p in glob.glob(os.path.join(glob.escape(log_dir), "model*.safetensors")):
        with contextlib.suppress(CheckpointError):
            steps.add(parse_step(p))
    return sorted(steps, reverse=True)


def newest_intact(log_dir: str, ema_rates: Iterable[str] = ()) -> tuple[dict | None, list[str]]:
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


def finished_steps(log_dir: str) -> list[int]:
    """The steps, newest first, whose save finished (the state file, written
    last, is there), intact or not."""
    return [s for s in _steps(log_dir) if os.path.isfile(os.path.join(log_dir, state_file(s)))]


def newest_weights(log_dir: str, ema_rates: Iterable[str] = ()) -> str | None:
    """The model file of the newest step whose weights (and those EMAs of
    ema_rates that are there) are intact, its state read or not; None if none."""
    for step in _steps(log_dir):
        path = os.path.join(log_dir, model_file(step))
        try:
            load_resume(path, ema_rates, weights_only=True)
            return path
        except (CheckpointError, OSError):
            continue
    return None


def find_latest(log_dir: str) -> str | None:
    """The model file of the newest intact checkpoint in log_dir, or None."""
    found, _ = newest_intact(log_dir)
    return found["path"] if found else None


def sampler_state(sampler) -> dict | None:
    if not hasattr(sampler, "state_dict"):
        return None
    return {k: torch.from_numpy(np.asarray(v)) for k, v in sampler.state_dict().items()}


def load_sampler_state(sampler, state: dict | None) -> None:
    if state is not None and hasattr(sampler, "load_state_dict"):
        sampler.load_state_dict({k: v.numpy() for k, v in state.items()})


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
