"""adm-fast evaluate: guided-diffusion's evaluations/evaluator.py in PyTorch.

    adm-fast evaluate REF_BATCH.npz SAMPLE_BATCH.npz [--json PATH] [--overwrite]
    adm-fast evaluate --save_stats OUT.npz SOURCE [--image_size N] [--overwrite]

prints `Inception Score`, `FID`, `sFID`, `Precision`, `Recall` as the evaluator
does (stdout holds only those lines), or writes a reference batch (arr_0 and
mu, sigma, mu_s, sigma_s) from a folder of images or an NPZ. The network
(torch-fidelity's InceptionV3) is imported only once the inputs are checked
and the output is known to be writable; an existing output is replaced only
with --overwrite, and always whole (written beside it, then renamed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .batches import (
    EvaluationError,
    check_output,
    open_images,
    positive_int,
    read_stats,
    reference_bytes,
    write_atomic,
)

PROG = "adm-fast evaluate"
ORDER = ("Inception Score", "FID", "sFID", "Precision", "Recall")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise EvaluationError(f"{message} (see {PROG} --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, allow_abbrev=False, description=__doc__.split("\n\n")[0],
                epilog="The weights: torch-fidelity's weights-inception-2015-12-05-6726825d.pth "
                       "(the URL is in the error when they are missing), in torch.hub's "
                       "cache ($TORCH_HOME/hub/checkpoints) or given with --inception.")
    p.add_argument("batches", nargs="*", metavar="NPZ",
                   help="REF_BATCH SAMPLE_BATCH (evaluator NPZs: arr_0 uint8 NHWC; a reference "
                        "batch's mu, sigma, mu_s, sigma_s are used when present); with "
                        "--save_stats, one SOURCE: a folder of images or an NPZ")
    p.add_argument("--json", metavar="PATH", help="also write the five numbers as JSON")
    p.add_argument("--save_stats", metavar="PATH",
                   help="write a reference batch NPZ from SOURCE instead of evaluating")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --json or --save_stats file (default: refuse, "
                        "before evaluating)")
    p.add_argument("--image_size", type=int, metavar="N",
                   help="--save_stats from a folder: resize and centre-crop every image to NxN "
                        "as guided-diffusion's data loader does (default: keep the images' "
                        "size, which must be one)")
    p.add_argument("--inception", metavar="PATH",
                   help="the InceptionV3 weights (.pth or .safetensors; default: "
                        "torch-fidelity's cache location)")
    p.add_argument("--batch_size", type=int, default=64, metavar="N",
                   help="images per forward (default 64, the evaluator's)")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="fp32 (default: the evaluator's arithmetic) or bf16 autocast (faster on "
                        "a GPU; not the paper's numbers)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="a progress bar on stderr (default on)")
    return p


def _check(args) -> None:
    positive_int(args.batch_size, "--batch_size")
    if args.save_stats:
        if len(args.batches) != 1:
            raise EvaluationError(f"--save_stats takes one SOURCE (a folder or an NPZ), got "
                                  f"{len(args.batches)}")
        if args.json:
            raise EvaluationError("--json is for evaluating; --save_stats writes a reference "
                                  "batch")
        if args.image_size is not None:
            positive_int(args.image_size, "--image_size")
        source, need = args.batches[0], 0
        if not os.path.isdir(source):
            if args.image_size is not None:
                raise EvaluationError("--image_size resizes the images of a folder; an NPZ's "
                                      "arr_0 is used as it is")
            with open_images(source) as reader:
                need = reference_bytes(reader.shape)
        check_output(args.save_stats, "--save_stats", args.overwrite, need)
    else:
        if len(args.batches) != 2:
            raise EvaluationError(f"expected REF_BATCH and SAMPLE_BATCH, got {len(args.batches)} "
                                  "NPZ path(s)")
        if args.image_size is not None:
            raise EvaluationError("--image_size is for --save_stats from a folder")
        for path in args.batches:
            with open_images(path):
                read_stats(path)
        if args.json:
            check_output(args.json, "--json", args.overwrite)


def _sizes_note(ref: str, sample: str) -> None:
    with open_images(ref) as r, open_images(sample) as s:
        if r.shape[1:3] != s.shape[1:3]:
            print(f"{PROG}: note: the reference images are {r.shape[2]}x{r.shape[1]} and the "
                  f"samples {s.shape[2]}x{s.shape[1]}; the network resizes both to 299x299, as "
                  "the evaluator's graph does", file=sys.stderr)


def _run(args) -> None:
    from .evaluator import Evaluator

    ev = Evaluator(args.inception, device=args.device, batch_size=args.batch_size,
                   dtype=args.dtype, progress=args.progress)
    if args.save_stats:
        n = ev.save_reference(args.batches[0], args.save_stats, args.image_size)
        print(f"wrote {args.save_stats}: {n} images with mu, sigma, mu_s, sigma_s")
        return
    ref, sample = args.batches
    _sizes_note(ref, sample)
    print(f"{PROG}: {ref} against {sample} on {ev.device}, {args.dtype}", file=sys.stderr)
    metrics = ev.evaluate(ref, sample)
    for name in ORDER:
        print(f"{name}:", metrics[name])
    if args.json:
        text = json.dumps({name: metrics[name] for name in ORDER}, indent=2) + "\n"
        write_atomic(args.json, lambda f: f.write(text.encode()))


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except EvaluationError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)
    try:
        _check(args)
        _run(args)
    except (EvaluationError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
