"""The resumable run folder of `adm-fast sample`.

Beside the final OUT/samples_NxHxWx3.npz, a run keeps OUT/samples_NxHxWx3.parts/:
  manifest.json     what determines the bytes: the model, classifier and base
                    samples files (size and a hash of their content), the
                    flags, seed, batch size, number of samples, device type,
                    dtype and backend; plus, for information, the world size
  batch_000000.npz  one per finished batch (images, and labels when there are),
                    each written atomically as the batch finishes
A rerun with the same arguments samples only the missing batches; one with
other arguments is refused (the message lists what differs), so two runs
never mix; a folder whose run finished no batch is taken over. The world size
is not part of it: batch b's images depend on the seed and b alone, so a run
may resume on more or fewer ranks. Once every batch is there, the final .npz
and .png are written (atomically) and the folder is removed, so a finished
run leaves only its two files; at the peak, during assembly, the shards and
the .npz each take the samples' size once (50,000 256x256 images: 9.8 GB each).

The final .npz records the manifest's run in its zip comment (np.load reads
no comment). A rerun with the same arguments finds it and stops at once (its
.png written and its folder removed, if a kill left them undone); another
run that would write the same file name is refused unless --overwrite, and
even then the old file stays until the new one is complete. One process at
a time samples into a folder (an flock on it, dropped when the process ends):
a second one is refused at once instead of racing the first.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import zipfile
from collections.abc import Callable, Iterator

import numpy as np

from ..io import (
    OutputError,
    OutputExists,
    atomic_write,
    describe_os_error,
    probe_write,
    remove_stale_temporaries,
    temp_name,
)
from .grid import GRID_MAX_IMAGES
from .npz import write_npz

try:
    import fcntl
except ImportError:  # Windows: no flock, one process per folder is up to the user
    fcntl = None

MANIFEST = "manifest.json"
_FORMAT = 1
_RECORD = "adm_fast sample"  # the key of the run record in a final .npz's zip comment
# What reading a damaged zip or .npy header raises (numpy parses the header
# as a Python literal: SyntaxError and friends for garbage there).
_UNREADABLE = (OSError, ValueError, KeyError, TypeError, SyntaxError, OverflowError, EOFError,
               zipfile.BadZipFile)


class RunMismatch(Exception):
    """OUT holds another run's unfinished batches, or (without --overwrite) a
    finished .npz of the same name that is not this run's."""


def prepare_out(out: str) -> None:
    """Make `out` a folder this process can write in, or raise OutputError."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise OutputError(f"--out {out} is a file, not a folder")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise OutputError(f"--out {out}: cannot create the folder "
                          f"({describe_os_error(e, out, 'creating')})") from None
    try:
        probe_write(os.path.join(out, "write_probe"))
    except OSError as e:
        raise OutputError(f"--out {out} is not writable ("
                          f"{describe_os_error(e, out, 'writing in')})") from None


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def _shown(key: str) -> str:
    """A manifest key as the user knows it: args.seed -> --seed,
    files.model_path.sha256 -> the --model_path file's sha256."""
    part = key.split(".")
    if part[0] == "args" and len(part) == 2:
        return f"--{part[1]}"
    if part[0] == "files" and len(part) == 3:
        return f"the --{part[1]} file's {part[2]}"
    if part[0] == "files" and len(part) == 2:  # a file given on one side only
        return f"the --{part[1]} file"
    return {"device_type": "device type", "adm_fast": "adm_fast version"}.get(key, key)


def _differences(stored: dict, now: dict) -> list[str]:
    a, b = _flatten(stored), _flatten(now)
    return [f"{_shown(k)}: {a.get(k, '(unset)')!r} there, {b.get(k, '(unset)')!r} here"
            for k in sorted(set(a) | set(b)) if a.get(k, "(unset)") != b.get(k, "(unset)")]


def batch_count(n: int, what: str = "") -> str:
    """'1 batch', '2 finished batches'."""
    return f"{n} {what + ' ' if what else ''}batch{'' if n == 1 else 'es'}"


def _read_header(zf: zipfile.ZipFile, name: str):
    with zf.open(name) as f:
        version = np.lib.format.read_magic(f)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read(f)
    return shape, dtype


class RunBusy(Exception):
    """Another process is sampling into the same run folder now."""


SAME = "same"  # RunFolder._final: OUT holds this run's finished .npz


def run_comment(run: dict) -> bytes:
    """What the final .npz records of the run that wrote it (its zip comment,
    which np.load does not read): the manifest's run, or its hash when that
    is too long for a zip comment."""
    text = json.dumps({_RECORD: _FORMAT, "run": run}, sort_keys=True, separators=(",", ":"))
    if len(text.encode()) > 0xFFFF:
        text = json.dumps({_RECORD: _FORMAT, "run_sha256": _run_hash(run)}, sort_keys=True)
    return text.encode()


def _run_hash(run: dict) -> str:
    return hashlib.sha256(json.dumps(run, sort_keys=True).encode()).hexdigest()


def _recorded_run(comment: bytes) -> dict | None:
    """The record of run_comment (None: the file records no run)."""
    try:
        record = json.loads(comment.decode())
    except (ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and _RECORD in record else None


class RunFolder:
    """The shards of one output file: OUT/STEM.parts/.

    One process at a time samples into it: rank 0 holds an exclusive flock on
    the folder from open() to close() (the system drops it when the process
    dies), and a second process is refused (RunBusy) while it is held."""

    def __init__(self, out: str, stem: str, num_samples: int, batch_size: int,
                 image_size: int, labelled: bool, overwrite: bool = False):
        self.out, self.stem = out, stem
        self.parts = os.path.join(out, stem + ".parts")
        self.npz = os.path.join(out, stem + ".npz")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.image_size, self.labelled = image_size, labelled
        self.num_batches = -(-num_samples // batch_size)
        self.overwrite = overwrite
        self.run: dict | None = None
        self._lock_fd: int | None = None

    def shard(self, b: int) -> str:
        return os.path.join(self.parts, f"batch_{b:06d}.npz")

    def rows(self, b: int) -> int:
        return min(self.batch_size, self.num_samples - b * self.batch_size)

    def open(self, run: dict, info: dict, log: Callable[[str], None],
             write_png: Callable[[np.ndarray, str], str | None]) -> bool:
        """Clean up after killed runs, then continue the run in OUT (same
        arguments) or start one. Rank 0 calls this, alone.

        Returns True when OUT already holds this run's finished .npz (same
        arguments): nothing to sample; a .png or batch folder that a kill left
        undone is finished or removed first. Raises RunMismatch when OUT holds
        another run's finished .npz (unless overwrite) or unfinished batches,
        RunBusy when another process is sampling into the folder now."""
        for folder in (self.out, self.parts):
            for name in remove_stale_temporaries(folder):
                log(f"removed {os.path.join(folder, name)}, left by a killed run")
        self.run = json.loads(json.dumps(run))  # as it reads back: tuples become lists
        if self._already_done(log, write_png):
            return True
        locked = self._lock(create=True)
        if self._already_done(log, write_png):  # finished by another process meanwhile
            return True
        if not locked:
            raise RunBusy(f"another process is sampling into {self.parts} now: wait for it "
                          f"to finish (it writes {self.npz}), or choose another --out")
        manifest = os.path.join(self.parts, MANIFEST)
        if os.path.isfile(manifest):
            self._check_manifest(manifest, info, log)
        else:
            stray = [n for n in self._names() if n.startswith("batch_")]
            if stray:
                raise RunMismatch(f"{self.parts} holds {batch_count(len(stray))} but no {MANIFEST}: "
                                  "not a run this tool can continue; delete the folder or "
                                  "choose another --out")
            self._write_manifest(manifest, info)
        for b in sorted(self.finished()):
            problem = self._check_shard(b)
            if problem:
                os.remove(self.shard(b))
                log(f"{self.shard(b)} {problem}: removed, its batch is sampled again")
        return False

    def _write_manifest(self, manifest: str, info: dict) -> None:
        try:
            os.makedirs(self.parts, exist_ok=True)
        except OSError as e:
            raise OutputError(describe_os_error(e, self.parts, "creating")) from None
        text = json.dumps({"format": _FORMAT, "run": self.run, "info": info}, indent=1)
        atomic_write(manifest, lambda f: f.write(text.encode()))

    # --- the finished file ---------------------------------------------------------

    def _final(self) -> str | None:
        """None: no .npz at OUT yet; SAME: this run's finished samples are
        there; else why the file there is not this run's (a phrase)."""
        if not os.path.lexists(self.npz):
            return None
        want = (self.num_samples, self.image_size, self.image_size, 3)
        try:
            with zipfile.ZipFile(self.npz) as zf:
                comment = zf.comment
                shape, dtype = _read_header(zf, "arr_0.npy")
        except _UNREADABLE as e:
            return f"is already there and is not a readable .npz ({type(e).__name__}: {e})"
        record = _recorded_run(comment)
        if record is None:
            return ("is already there and records no arguments (written by another program, "
                    "or by an adm_fast from before sample files recorded them)")
        if shape != want or dtype != np.uint8:
            return f"is already there and holds {dtype} {shape}, not uint8 {want}"
        if "run" in record:
            diff = _differences(record["run"], self.run)
        else:
            diff = [] if record.get("run_sha256") == _run_hash(self.run) else \
                ["(the file records their hash only)"]
        if diff:
            return ("holds the finished samples of a run with other arguments "
                    f"({'; '.join(diff)})")
        return SAME

    def _already_done(self, log, write_png) -> bool:
        """True when this run's .npz is in OUT (and overwrite is off): the run is done."""
        state = self._final()
        if state is None or self.overwrite:
            return False
        if state != SAME:
            raise RunMismatch(f"{self.npz} {state}: pass --overwrite to replace it, or choose "
                              "another --out")
        png = os.path.join(self.out, self.stem + ".png")
        if not os.path.exists(png):  # killed between the .npz and the .png
            written = write_png(self._first_images(GRID_MAX_IMAGES), png)
            if written:
                log(f"wrote {png}, which a killed run left unwritten")
        if os.path.isdir(self.parts) and self._lock(create=False) and self._own_parts():
            self.remove()
            log(f"removed {self.parts}, which a killed run left behind")
        return True

    def _own_parts(self) -> bool:
        """Whether the batch folder is this run's (or holds no batch): safe to drop
        once the run's .npz is written."""
        manifest = os.path.join(self.parts, MANIFEST)
        if not os.path.isfile(manifest):
            return not any(n.startswith("batch_") for n in self._names())
        try:
            with open(manifest, encoding="utf-8") as f:
                return not _differences(json.load(f)["run"], self.run)
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def _first_images(self, k: int) -> np.ndarray:
        """The first k images of the finished .npz, reading only those."""
        with zipfile.ZipFile(self.npz) as zf, zf.open("arr_0.npy") as f:
            version = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            shape, _, _ = read(f)
            rows = min(k, shape[0])
            data = f.read(rows * int(np.prod(shape[1:])))
        return np.frombuffer(data, np.uint8).reshape((rows, *shape[1:]))

    # --- one process at a time -----------------------------------------------------

    def _lock(self, create: bool) -> bool:
        """Take the folder's lock (True), or False when another process holds it.
        Where the file system has no flock, True without a lock."""
        if self._lock_fd is not None:
            return True
        if fcntl is None:
            return True
        for _ in range(8):
            if create:
                try:
                    os.makedirs(self.parts, exist_ok=True)
                except OSError as e:
                    raise OutputError(describe_os_error(e, self.parts, "creating")) from None
            try:
                fd = os.open(self.parts, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            except FileNotFoundError:
                if not create:
                    return False
                continue  # removed as it was made: make it again
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            except OSError:  # no flock here (some network file systems): unguarded
                os.close(fd)
                return True
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.parts))
            except FileNotFoundError:
                same = False
            if same:
                self._lock_fd = fd
                return True
            os.close(fd)  # the folder was renamed away (its run finished) before the lock
            if not create:
                return False
        return False

    def close(self) -> None:
        """Let another process sample into the folder (the lock goes)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- the batches ---------------------------------------------------------------

    def _check_manifest(self, manifest: str, info: dict, log: Callable[[str], None]) -> None:
        try:
            with open(manifest, encoding="utf-8") as f:
                stored = json.load(f)
            stored_run = stored["run"]
        except (ValueError, KeyError, TypeError) as e:
            raise RunMismatch(f"{manifest} is not a manifest this tool wrote ({e}); delete "
                              f"{self.parts} or choose another --out") from None
        diff = _differences(stored_run, self.run)
        if not diff:
            return
        done = len(self.finished())
        if not done:  # a run that failed or was stopped before its first batch: nothing to keep
            log(f"{self.parts} held a run with other arguments that finished no batch: "
                "started this one in its place")
            self._write_manifest(manifest, info)
            return
        raise RunMismatch(
            f"{self.parts} holds {batch_count(done, 'finished')} of a run with "
            f"other arguments ({'; '.join(diff)}): rerun with that run's arguments to "
            f"finish it, choose another --out, or delete {self.parts}")

    def _names(self) -> list[str]:
        try:
            return os.listdir(self.parts)
        except FileNotFoundError:
            return []

    def finished(self) -> set[int]:
        done = set()
        for name in self._names():
            if name.startswith("batch_") and name.endswith(".npz"):
                try:
                    b = int(name[len("batch_"):-len(".npz")])
                except ValueError:
                    continue
                if 0 <= b < self.num_batches:
                    done.add(b)
        return done

    def missing(self, done: set[int]) -> Iterator[int]:
        """The batches not in `done`, in order, one at a time: a run of a billion
        batches is never listed."""
        return (b for b in range(self.num_batches) if b not in done)

    def _check_shard(self, b: int) -> str | None:
        """Why shard b cannot be used (None: its headers are as expected)."""
        want = {"images.npy": ((self.rows(b), self.image_size, self.image_size, 3), "u1")}
        if self.labelled:
            want["labels.npy"] = ((self.rows(b),), "i8")
        try:
            with zipfile.ZipFile(self.shard(b)) as zf:
                if sorted(zf.namelist()) != sorted(want):
                    return f"holds {zf.namelist()}, not {list(want)}"
                for name, (shape, kind) in want.items():
                    got_shape, dtype = _read_header(zf, name)
                    if got_shape != shape or dtype.str[1:] != kind:
                        return f"holds {name[:-4]} {dtype} {got_shape}, not {kind} {shape}"
        except _UNREADABLE as e:
            return f"is damaged ({type(e).__name__}: {e})"
        return None

    def write(self, b: int, images: np.ndarray, labels: np.ndarray | None) -> None:
        members = [("images", np.uint8, images.shape, [images])]
        if self.labelled:
            members.append(("labels", np.int64, labels.shape, [labels]))
        atomic_write(self.shard(b), lambda f: write_npz(f, members))

    def _load(self, b: int, member: str = "images") -> np.ndarray:
        try:
            with np.load(self.shard(b)) as z:
                return z[member]
        except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as e:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.shard(b))
            raise OutputError(f"{self.shard(b)} is damaged ({type(e).__name__}: {e}); it was "
                              "removed: rerun the same command to sample its batch again") \
                from None

    def assemble(self, write_png: Callable[[np.ndarray, str], str | None]) -> dict[str, str]:
        """The final .npz (and .png, by write_png(images, path)) from every shard,
        in batch order, the run recorded in the .npz's zip comment; then the
        folder goes. Returns the paths written. Memory: one shard at a time
        (images, then labels in a second pass), whatever num_samples."""
        done = self.finished()
        if len(done) < self.num_batches:
            first = list(itertools.islice(self.missing(done), 8))
            raise OutputError(f"{self.parts} lacks batches {first}: cannot assemble")
        shape = (self.num_samples, self.image_size, self.image_size, 3)
        first = []

        def images():
            for b in range(self.num_batches):
                imgs = self._load(b)
                if sum(map(len, first)) < GRID_MAX_IMAGES:
                    first.append(imgs[:GRID_MAX_IMAGES])
                yield imgs

        def write(f):
            members = [("arr_0", np.uint8, shape, images())]
            if self.labelled:
                members.append(("arr_1", np.int64, (self.num_samples,),
                                (self._load(b, "labels") for b in range(self.num_batches))))
            write_npz(f, members, comment=run_comment(self.run))

        written = {"npz": self.npz}
        try:
            atomic_write(self.npz, write, replace=self.overwrite)
        except OutputExists:
            raise OutputError(f"{self.npz} appeared while this run sampled; it was kept "
                              "(pass --overwrite to replace it)") from None
        png = os.path.join(self.out, self.stem + ".png")
        if write_png(np.concatenate(first), png):
            written["png"] = png
        self.remove()
        return written

    def remove(self) -> None:
        """Drop the folder: renamed first to a name a later run cleans up, so
        that a kill halfway through leaves no folder that looks resumable."""
        trash = temp_name(os.path.join(self.out, self.stem + ".parts"))
        os.replace(self.parts, trash)
        shutil.rmtree(trash, ignore_errors=True)
