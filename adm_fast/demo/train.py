"""How the demo's shipped weights were made: the digits as an image folder,
then three runs of adm_fast's own trainer, exactly these commands.

    python -m adm_fast.demo.train --out DIR          # all three, then DIR/weights
    python -m adm_fast.demo.train --print            # the commands as shell lines

  diffusion   `adm-fast train`: an unconditional 16×16 ADM (learned sigmas,
              cosine schedule), as guided-diffusion's unconditional 256×256
              model is: the label only ever enters through the classifier.
  classifier  `adm-fast train-classifier`: the noisy classifier, trained on
              q_sample(x, t) with the same schedule, the one guidance uses.
  clean       `adm-fast train-classifier --noised False`: the judge. Another
              architecture (twice as wide, attention only in the pooling
              head, no scale-shift norm, strided-conv downsampling), another
              seed, only clean images, and never used for guidance, so it
              scores samples independently of the classifier that steered them.

Flips are off everywhere (a mirrored digit is another glyph). Training needs
scikit-learn; the three runs take about 30 minutes on 2 CPU cores. A run
that is interrupted continues from its last checkpoint when started again
with the same --out (adm_fast's trainer resumes exactly).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

from . import digits

# Schedule flags shared by the diffusion model and the noisy classifier:
# guidance is only correct when both see the same q(x_t | x_0).
SCHEDULE = ["--learn_sigma", "True", "--noise_schedule", "cosine", "--diffusion_steps", "1000"]
# --num_classes 1000: the shipped classifiers have guided-diffusion's 1000-way
# head (train-classifier now infers 10 from the folder); the judge reads the 10
# digit logits only.
COMMON = ["--image_size", str(digits.IMAGE_SIZE), "--random_flip", "False", "--num_workers", "0",
          "--progress", "False", "--save_interval", "1000"]
CLASSES = ["--num_classes", "1000"]

COMMANDS: dict[str, list[str]] = {
    "diffusion": ["train", "--data_dir", "{train}", "--log_dir", "{log}", *COMMON, *SCHEDULE,
                  "--num_channels", "32", "--num_res_blocks", "1", "--channel_mult", "1,2,2",
                  "--attention_resolutions", "4", "--num_head_channels", "32",
                  "--use_scale_shift_norm", "True", "--resblock_updown", "False",
                  "--lr", "3e-4", "--batch_size", "64", "--ema_rate", "0.995",
                  "--max_steps", "3000", "--log_interval", "200", "--seed", "0"],
    "classifier": ["train-classifier", "--data_dir", "{train}", "--val_data_dir", "{heldout}",
                   "--log_dir", "{log}", *COMMON, *CLASSES, *SCHEDULE,
                   "--classifier_width", "32", "--classifier_depth", "1",
                   "--classifier_channel_mult", "1,2,2",
                   "--classifier_attention_resolutions", "4", "--classifier_pool", "attention",
                   "--classifier_use_scale_shift_norm", "True",
                   "--classifier_resblock_updown", "True",
                   "--lr", "3e-4", "--weight_decay", "0.05", "--anneal_lr", "True",
                   "--batch_size", "64", "--max_steps", "1500", "--log_interval", "200",
                   "--eval_interval", "50", "--seed", "1"],
    "clean": ["train-classifier", "--data_dir", "{train}", "--val_data_dir", "{heldout}",
              "--log_dir", "{log}", *COMMON, *CLASSES, "--noised", "False",
              "--classifier_width", "64", "--classifier_depth", "1",
              "--classifier_channel_mult", "1,2,2", "--classifier_attention_resolutions", "",
              "--classifier_pool", "attention", "--classifier_use_scale_shift_norm", "False",
              "--classifier_resblock_updown", "False",
              "--lr", "3e-4", "--weight_decay", "0.05", "--anneal_lr", "True",
              "--batch_size", "64", "--max_steps", "800", "--log_interval", "200",
              "--eval_interval", "50", "--seed", "2"],
}
PARTS = tuple(COMMANDS)


class TrainingFailed(RuntimeError):
    """One of the training commands exited with an error (it printed why)."""
# The file each part ships: the diffusion model's EMA (as guided-diffusion
# samples from), the classifiers' own weights (they keep no EMA).
SHIPPED = {"diffusion": "ema_0.995_{step:06d}.safetensors",
           "classifier": "model{step:06d}.safetensors", "clean": "model{step:06d}.safetensors"}


def _max_steps(argv: list[str]) -> int:
    return int(argv[argv.index("--max_steps") + 1])


def command(part: str, root: str) -> list[str]:
    """The `adm-fast` argv of one part, with its folders under `root`."""
    paths = dict(train=os.path.join(root, "data", "train"),
                 heldout=os.path.join(root, "data", "heldout"),
                 log=os.path.join(root, "logs", part))
    return [a.format(**paths) for a in COMMANDS[part]]


def shell_lines(root: str) -> list[str]:
    return [shlex.join(["adm-fast", *command(part, root)]) for part in PARTS]


def prepare_data(root: str) -> dict[str, int]:
    """Write the training and held-out image folders (and the held-out .npz)."""
    (train_x, train_y), (held_x, held_y) = digits.load_split()
    data = os.path.join(root, "data")
    n_train = digits.write_image_folder(os.path.join(data, "train"), train_x, train_y)
    n_held = digits.write_image_folder(os.path.join(data, "heldout"), held_x, held_y)
    digits.save_heldout(os.path.join(data, "heldout_digits.npz"), held_x, held_y)
    return {"train": n_train, "heldout": n_held}


def trained_with(part: str) -> tuple[dict, list[str]]:
    """(diffusion flags, class names) a part's file carries: the diffusion flags
    of its command as adm_fast's trainer stores them, and the digits as the
    trainer names them from the image folder (`{digit}_*.png`, sorted). The
    unconditional diffusion model has no labels; its names are the classes of
    its training images, for `adm-fast sample` to check a guiding classifier
    against."""
    from ..script_util import diffusion_defaults
    from ..train.config import parse

    argv = COMMANDS[part]
    flags = parse("diffusion" if argv[0] == "train" else "classifier", argv[1:])
    return ({k: flags[k] for k in diffusion_defaults()},
            sorted(str(d) for d in range(digits.NUM_DIGITS)))


def export(part: str, root: str, dest: str) -> str:
    """Copy a part's final weights to dest/{part}.safetensors in fp16 (half the
    size; load_checkpoint gives fp32 back), keeping the metadata that rebuilds it
    and adding what it was trained with (trained_with)."""
    from ..checkpoint import load_checkpoint, save_checkpoint

    src = os.path.join(root, "logs", part,
                       SHIPPED[part].format(step=_max_steps(COMMANDS[part])))
    model = load_checkpoint(src)
    half = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    os.makedirs(dest, exist_ok=True)
    out = os.path.join(dest, f"{part}.safetensors")
    diffusion, classes = trained_with(part)
    save_checkpoint(model, out, state_dict=half, diffusion=diffusion, classes=classes)
    return out


def train_all(root: str, parts=PARTS, log=print) -> str:
    """Prepare the data, run the parts' trainings, export to root/weights; returns that folder."""
    from ..train.cli import main as train_main
    from ..train.cli import main_classifier

    counts = prepare_data(root)
    log(f"digits: {counts['train']} training and {counts['heldout']} held-out images "
        f"in {os.path.join(root, 'data')}")
    weights = os.path.join(root, "weights")
    for part in parts:
        argv = command(part, root)
        log(f"[{part}] adm-fast {shlex.join(argv)}")
        start = time.perf_counter()
        run = train_main if argv[0] == "train" else main_classifier
        if run(argv[1:]) != 0:
            raise TrainingFailed(f"training {part} failed (see the error above and "
                                 f"{os.path.join(root, 'logs', part, 'log.txt')})")
        out = export(part, root, weights)
        log(f"[{part}] {time.perf_counter() - start:.0f} s -> {out}")
    return weights


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m adm_fast.demo.train",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="adm_fast_demo", help="folder for data, logs and weights")
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma list of parts to train (of {', '.join(PARTS)})")
    p.add_argument("--print", action="store_true", help="print the commands and exit")
    p.add_argument("--data_only", action="store_true", help="write the image folders and exit")
    args = p.parse_args(argv)
    parts = [s for s in args.parts.split(",") if s]
    bad = [s for s in parts if s not in PARTS]
    if bad or not parts:
        p.error(f"--parts takes a comma list of {', '.join(PARTS)}, got {args.parts!r}")
    if args.print:
        print("\n".join(shell_lines(args.out)))
        return 0
    try:
        if args.data_only:
            print(prepare_data(args.out))
            return 0
        train_all(args.out, parts)
    except (digits.DigitsUnavailable, TrainingFailed) as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
