"""adm-fast sample: guided-diffusion's image_sample.py, classifier_sample.py and
super_res_sample.py in one command, with their flags, defaults and output.

Model flags come, lowest to highest priority, from guided-diffusion's
defaults, the checkpoint (its preset, recognised from the tensors, or an
adm_fast safetensors file's own model and diffusion flags) or `--preset`,
and the flags given. Flags that change the layout make the checkpoint load
against them (and fail with the checkpoint's differences if it does not fit).

Each finished batch is written at once to OUT/samples_NxHxWx3.parts/; a
rerun of the same command continues from there, and an interrupted run
resumed gives the same bytes as one never interrupted (batch b is sampled
from its own seed, derived from --seed and b). Under torchrun the ranks
share the batches (rank r takes every world-th missing one) and rank 0
writes the final files in batch order. A finished OUT/samples_NxHxWx3.npz
is never replaced without --overwrite: the same command again says it is
done, another one that would write that name is refused (see sampling/shards.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import sys
import time

import torch

from .. import distributed
from ..diffusion import NonFiniteSampleError
from ..io import OutputError, file_identity
from ..models.layout import use_preferred_layout
from ..ops import BackendNotSupported, current_backend, use_backend
from .api import iter_batches, sample_images, save_samples, write_png
from .flags import DEFAULTS, PROG, SCRIPT_DEFAULTS, InputError, build_parser
from .job import Job, prepare
from .progress import Progress
from .shards import RunBusy, RunFolder, RunMismatch, batch_count, prepare_out

__all__ = ["main", "build_parser", "sample_images", "save_samples"]

# The ranks wait for each other once, at the end: a rank with one batch more
# than the others may take long (1000 steps at 256x256), the default 10 minutes
# of a collective's timeout is not enough.
_SYNC_TIMEOUT_S = 7 * 24 * 3600.0
_NOT_IN_MANIFEST = {"out", "progress", "device", "model_path", "classifier_path",
                    "base_samples", "overwrite"}


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


def _run_record(args: dict, job: Job, device: torch.device, backend: str) -> dict:
    """What determines the bytes of the samples (the manifest's "run")."""
    from .. import __version__

    return {"args": {k: v for k, v in sorted(args.items()) if k not in _NOT_IN_MANIFEST},
            "files": {**job.files, "base_samples": file_identity(args["base_samples"])},
            "device_type": device.type, "dtype": job.dtype, "backend": backend,
            "adm_fast": __version__}


def _open_folder(args, job: Job, world, backend: str, log):
    """Rank 0 checks --out and opens the run folder; every rank learns the
    outcome (an InputError on all ranks when it failed). Returns (folder,
    done): done when --out already holds this run's finished samples."""
    size = job.model.image_size
    n, bs = args["num_samples"], args["batch_size"]
    folder = RunFolder(args["out"], f"samples_{n}x{size}x{size}x3", n, bs, size, job.labelled,
                       overwrite=args["overwrite"])
    problem = done = None
    if world.is_main:
        try:
            prepare_out(args["out"])
            info = {"world_size": world.world_size, "model_path": args["model_path"],
                    "classifier_path": args["classifier_path"]}
            done = folder.open(_run_record(args, job, world.device, backend), info, log,
                               write_png)
        except (OutputError, RunMismatch, RunBusy) as e:
            folder.close()
            problem = str(e)
    problem, done = distributed.broadcast_object(world, (problem, done))
    if problem:
        raise InputError(problem)
    return folder, done


def _sample(args, job: Job, world, folder: RunFolder, progress: Progress) -> dict:
    """Sample this rank's missing batches into the folder; (images, seconds, batches)."""
    done = folder.finished()
    # One batch index at a time, never a list: --num_samples 1e9 --batch_size 1
    # would otherwise hold a billion of them before the first batch.
    mine = itertools.islice(folder.missing(done), world.rank, None, world.world_size)
    n = args["num_samples"]
    if world.is_main:
        steps = job.steps
        progress.log(f"{PROG}: {n} images of {job.model.image_size}x{job.model.image_size}, "
                     f"{job.kwargs['sampler']}, {steps} steps, seed {args['seed']}, "
                     f"{world.world_size} rank(s)")
        if done:
            progress.log(f"{PROG}: resuming: {len(done)} of {batch_count(folder.num_batches)} "
                         f"{'was' if len(done) == 1 else 'were'} finished in {folder.parts}")
    remaining = n - sum(folder.rows(b) for b in done)
    if world.distributed:  # rank 0's bar counts rank 0's images
        progress.total = _rank_images(folder, done, world.rank, world.world_size)
    else:
        progress.total, progress.initial = n, n - remaining
    batches = iter_batches(job.model, job.diffusion, num_samples=n,
                           batch_size=args["batch_size"], batches=mine, seed=args["seed"],
                           device=world.device, progress=progress, **job.kwargs)
    start, count = time.perf_counter(), 0
    with progress:
        for b, images, labels in batches:
            folder.write(b, images, labels)
            count += 1
    if world.device.type == "cuda":
        torch.cuda.synchronize(world.device)
    return dict(images=remaining, seconds=time.perf_counter() - start, batches=count)


def _rank_images(folder: RunFolder, done, rank: int, world_size: int) -> int:
    """The images rank `rank` samples: every world_size-th missing batch from
    its rank on, each of batch_size images but the last batch (counted, not listed)."""
    missing = folder.num_batches - len(done)
    mine = len(range(rank, missing, world_size))
    last = folder.num_batches - 1
    short = folder.batch_size - folder.rows(last)
    takes_last = last not in done and missing and (missing - 1) % world_size == rank
    return mine * folder.batch_size - (short if takes_last else 0)


def _report(args, job: Job, world, stats: dict, seconds: float, backend: str) -> None:
    if stats["images"] == 0:
        print(f"all {args['num_samples']} images were sampled before; assembled them")
        return
    if stats["images"] < args["num_samples"]:
        print(f"resumed: {args['num_samples'] - stats['images']} of {args['num_samples']} "
              "images were sampled before")
    per_step = (f"{1000.0 * stats['seconds'] / (stats['batches'] * job.steps):.1f}"
                if stats["batches"] else "-")
    print(f"sampled {stats['images']} images in {seconds:.2f} s: "
          f"{stats['images'] / seconds:.2f} images/s, {per_step} ms per step "
          f"({job.kwargs['sampler']}, {job.steps} steps, {backend}, {world.device}, {job.dtype})")


def _setup(args, explicit: dict, world):
    """Everything before the first batch: models, flags, --out and the run
    folder. Any problem here is the user's input (exit 2)."""
    job = prepare(args, explicit, world.device, world.world_size)
    if world.is_main:
        for line in job.warnings:
            print(f"{PROG}: warning: {line}", file=sys.stderr)
    backend = args["backend"] or current_backend()
    if backend != "eager":  # eager stays guided-diffusion's computation, layout included
        for model in (job.model, job.kwargs.get("classifier")):
            if model is not None:
                use_preferred_layout(model, world.device)
    progress = Progress(args["progress"] and world.is_main, total=0, steps=job.steps)
    log = progress.log if world.is_main else (lambda message: None)
    return (job, backend, progress, *_open_folder(args, job, world, backend, log))


def _execute(args, world, job: Job, backend: str, progress: Progress,
             folder: RunFolder) -> int:
    start = time.perf_counter()
    try:
        with use_backend(args["backend"]) if args["backend"] else contextlib.nullcontext():
            stats = _sample(args, job, world, folder, progress)
        distributed.barrier(world)
        seconds = time.perf_counter() - start  # the sampling, not the writing of the files
        if world.is_main:
            written = folder.assemble(write_png)
    except KeyboardInterrupt:
        if world.is_main:
            _error(f"interrupted; {_kept(folder)}")
        return 130
    except OutputError as e:  # a full disk: what is finished stays
        raise OutputError(f"{e}; {_kept(folder)}") from None
    if world.is_main:
        for path in written.values():
            print(f"wrote {path}")
        _report(args, job, world, stats, seconds, backend)
    return 0


def _kept(folder: RunFolder) -> str:
    done = len(folder.finished())
    return (f"{done} of {batch_count(folder.num_batches)} {'is' if done == 1 else 'are'} finished, "
            f"kept in {folder.parts}: rerun the same command to continue")


def _internal(e: Exception) -> int:
    if os.environ.get("ADM_FAST_TRACEBACK"):
        raise e
    _error(f"{type(e).__name__}: {e} (an internal error; ADM_FAST_TRACEBACK=1 shows where)")
    return 1


def _parse(argv):
    ns = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    explicit = {k: v for k, v in vars(ns).items() if k in DEFAULTS}
    args = {**SCRIPT_DEFAULTS, **vars(ns)}
    args["classifier_scale"] = explicit.get("classifier_scale")
    args["timestep_respacing"] = explicit.get("timestep_respacing")
    return args, explicit


def main(argv=None) -> int:
    try:
        args, explicit = _parse(argv)
    except InputError as e:
        _error(f"{e} (see {PROG} --help)")
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)
    world = folder = None
    try:
        try:
            _check_device(args["device"])
            world = distributed.setup(args["device"], timeout_s=_SYNC_TIMEOUT_S)
            if not world.distributed and args["device"]:
                # setup() puts a single process on cuda:LOCAL_RANK; honour "cuda:1"
                world = dataclasses.replace(world, device=torch.device(args["device"]))
            job, backend, progress, folder, done = _setup(args, explicit, world)
        except (ValueError, KeyError, OSError, RuntimeError) as e:
            _error(e.args[0] if isinstance(e, KeyError) and e.args else str(e))
            return 2
        except Exception as e:  # noqa: BLE001  one line, not a traceback
            return _internal(e)
        if done:
            if world.is_main:
                print(f"{folder.npz} holds this run's {args['num_samples']} samples already "
                      "(the same arguments): nothing to sample; --overwrite samples them again")
            return 0
        try:
            return _execute(args, world, job, backend, progress, folder)
        except BackendNotSupported as e:
            _error(str(e))
            return 2
        except (OutputError, NonFiniteSampleError) as e:
            _error(str(e))
            return 1
        except Exception as e:  # noqa: BLE001
            if _is_out_of_memory(e):
                _error(_out_of_memory(args, world, folder, e))
                return 1
            return _internal(e)
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    finally:
        if folder is not None:
            folder.close()
        if world is not None:
            distributed.cleanup(world)


def _check_device(name) -> None:
    if not name:
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "meta":
        raise InputError("--device meta holds shapes, not values: samples need a device that "
                         "computes (cpu, cuda, cuda:1, ...)")


def _is_out_of_memory(e: BaseException) -> bool:
    # torch's CPU allocator says so in a plain RuntimeError
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def _out_of_memory(args, world, folder: RunFolder, e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    message = (f"out of memory sampling a batch of {args['batch_size']} on {world.device} "
               f"({first}): lower --batch_size")
    # another --batch_size is another run: it takes over a folder with no batch finished
    return f"{message}; {_kept(folder)}" if folder.finished() else message


if __name__ == "__main__":
    sys.exit(main())
