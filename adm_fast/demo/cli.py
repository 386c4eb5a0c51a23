"""adm-fast demo: its run (the flags and the text of --help are in flags.py)."""

from __future__ import annotations

import json
import math
import os
import sys
import time

import torch

from ..checkpoint import CheckpointError
from ..io import OutputError, atomic_write
from ..ops import current_backend
from . import digits, experiment
from .flags import PROG, DemoError, build_parser  # noqa: F401  (build_parser: the CLI's --help)

RESULTS = "results.json"  # written last: its presence marks a finished demo


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else format(value, fmt)


def format_table(rows) -> str:
    head = ["scale", "fidelity", "diversity", "images/s adm_fast", "images/s eager", "speed-up"]
    body = []
    for r in rows:
        speed = r.images_per_s / r.eager_images_per_s if r.eager_images_per_s else None
        body.append([f"{r.scale:g}", _cell(r.fidelity, ".3f"), _cell(r.diversity, ".3f"),
                     _cell(r.images_per_s, ".1f"), _cell(r.eager_images_per_s, ".1f"),
                     "-" if speed is None else f"{speed:.2f}x"])
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def _weights_dir(args) -> str:
    if args.train and args.weights:
        raise DemoError("--train writes its own weights into OUT/weights; drop --weights")
    if not args.train:
        return args.weights or experiment.WEIGHTS_DIR
    target = os.path.realpath(os.path.join(args.out, "weights"))
    if target == os.path.realpath(experiment.WEIGHTS_DIR):
        raise DemoError(f"--out {args.out} would overwrite the shipped weights; choose "
                        "another folder")
    from .train import TrainingFailed, train_all
    try:
        return train_all(args.out, log=lambda m: print(f"{PROG}: {m}", file=sys.stderr))
    except (digits.DigitsUnavailable, TrainingFailed) as e:
        raise DemoError(str(e)) from None


def _device(name: str) -> torch.device:
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DemoError(f"--device {name!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DemoError(f"--device {name}: this torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise DemoError(f"--device {name}: the demo runs on cpu or cuda")
    return device


def _where(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def _check_out(args) -> None:
    """A finished demo in --out is kept unless --overwrite: checked before
    anything is trained or sampled."""
    results = os.path.join(args.out, RESULTS)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise DemoError(f"--out {args.out} is a file, not a folder")
    if os.path.lexists(results) and not args.overwrite:
        raise DemoError(f"--out {args.out} holds a finished demo ({results}): pass --overwrite "
                        "to run it again there, or choose another --out")


def run(args) -> int:
    device = _device(args.device)
    _check_out(args)
    weights = _weights_dir(args)
    eager = experiment.load_models(weights, device)
    fast = experiment.engine_models(eager, device)
    diffusion = experiment.make_diffusion(args.steps)
    os.makedirs(args.out, exist_ok=True)
    batch = min(args.batch_size, args.num_samples)
    start = time.perf_counter()
    experiment.warm_up([(fast, "auto"), (eager, "eager")], diffusion, batch)
    shipped = os.path.realpath(weights) == os.path.realpath(experiment.WEIGHTS_DIR)
    print(f"{PROG}: {args.num_samples} samples per scale (the digits 0-9 in turn), "
          f"{args.steps} DDPM steps, batch {batch}, seed {args.seed}, backend "
          f"{current_backend()}, on {_where(device)}; weights: "
          f"{'shipped' if shipped else weights}", flush=True)
    rows, grids, rates = [], [], {}
    for scale in args.scales:
        row, images = experiment.run_scale(fast, eager, diffusion, scale, args.num_samples,
                                           batch, args.seed, args.eager_steps, rates)
        path = os.path.join(args.out, experiment.scale_name(scale))
        experiment.save_grid(images, experiment.demo_labels(args.num_samples).numpy(), path)
        rows.append(row)
        grids.append(path)
        print(f"{PROG}: scale {scale:g}: {args.num_samples} samples in {row.seconds:.1f} s -> "
              f"{path}", file=sys.stderr, flush=True)
    ref_fid, ref_div = experiment.heldout_reference(fast["clean"])
    total = time.perf_counter() - start
    print()
    print(format_table(rows))
    print()
    print(f"real held-out digits (reference): fidelity {ref_fid:.3f}, diversity {ref_div:.3f}")
    print("fidelity: share of samples the clean classifier (never used for guidance) reads "
          "as the digit asked for; chance 0.100")
    print("diversity: mean distance between the clean classifier's normalised features of "
          "samples asked for the same digit")
    if args.eager_steps:
        print(f"images/s: both columns measured alike, {min(args.eager_steps, args.steps)} "
              f"steps of one batch of {batch} after a warm-up, {experiment.ROUNDS} interleaved rounds "
              f"(medians), scaled "
              f"to {args.steps} steps; adm_fast: its default backend and the device's "
              f"layout, eager: guided-diffusion's computation (use_backend('eager'), NCHW); "
              f"once unguided and once guided (the work per step is the same at every "
              f"nonzero scale)")
    print(f"grids (row = digit asked for): {', '.join(grids)}")
    print(f"total {total:.0f} s")
    results = dict(num_samples=args.num_samples, steps=args.steps, batch_size=batch,
                   seed=args.seed, backend=current_backend(), device=_where(device),
                   weights=weights,
                   rows=[vars(r) for r in rows], grids=grids, seconds=total,
                   heldout=dict(fidelity=ref_fid, diversity=ref_div))
    text = json.dumps(results, indent=1)
    # atomically: a killed run leaves no half a results.json that looks finished
    atomic_write(os.path.join(args.out, RESULTS), lambda f: f.write(text.encode()))
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:  # --help
            return int(e.code or 0)
        return run(args)
    except (DemoError, CheckpointError, FileNotFoundError, OutputError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
