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
never mix. The world size is not part of it: batch b's images depend on the
seed and b alone, so a run may resume on more or fewer ranks. Once every
batch is there, the final .npz and .png are written (atomically) and the
folder is removed, so a finished run leaves only its two files; at the peak,
during assembly, the shards and the .npz each take the samples' size once
(50,000 256x256 images: 9.8 GB each).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from typing import Callable, Dict, List, Optional, Set

import numpy as np

from .files import (OutputError, atomic_write, describe_os_error, partial_name,
                    remove_stale_partials, write_npz)
from .grid import GRID_MAX_IMAGES

MANIFEST = "manifest.json"
_FORMAT = 1
_HASH_WHOLE = 64 << 20  # files up to this size are hashed whole; larger ones in 16 blocks
_BLOCK = 1 << 20


class RunMismatch(Exception):
    """OUT holds an unfinished run with other arguments."""


def file_identity(path: Optional[str]) -> Optional[Dict]:
    """Size and SHA-256 of a file's content (of 16 evenly spread 1 MiB blocks
    when it is large: a retrained checkpoint differs in all of them)."""
    if not path:
        return None
    size = os.path.getsize(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= _HASH_WHOLE:
            for block in iter(lambda: f.read(_BLOCK), b""):
                h.update(block)
        else:
            for i in range(16):
                f.seek((size - _BLOCK) * i // 15)
                h.update(f.read(_BLOCK))
    return {"size": size, "sha256": h.hexdigest()}


def prepare_out(out: str) -> None:
    """Make `out` a folder this process can write in, or raise OutputError."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise OutputError(f"--out {out} is a file, not a folder")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise OutputError(f"--out {out}: cannot create the folder "
                          f"({describe_os_error(e, out, 'creating')})") from None
    probe = partial_name(os.path.join(out, "write_probe"))
    try:
        with open(probe, "wb") as f:
            f.write(b"x")
        os.remove(probe)
    except OSError as e:
        raise OutputError(f"--out {out} is not writable ("
                          f"{describe_os_error(e, out, 'writing in')})") from None


def _flatten(d: Dict, prefix: str = "") -> Dict:
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


def _differences(stored: Dict, now: Dict) -> List[str]:
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


class RunFolder:
    """The shards of one output file: OUT/STEM.parts/."""

    def __init__(self, out: str, stem: str, num_samples: int, batch_size: int,
                 image_size: int, labelled: bool):
        self.out, self.stem = out, stem
        self.parts = os.path.join(out, stem + ".parts")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.image_size, self.labelled = image_size, labelled
        self.num_batches = -(-num_samples // batch_size)

    def shard(self, b: int) -> str:
        return os.path.join(self.parts, f"batch_{b:06d}.npz")

    def rows(self, b: int) -> int:
        return min(self.batch_size, self.num_samples - b * self.batch_size)

    def open(self, run: Dict, info: Dict, log: Callable[[str], None]) -> int:
        """Clean up after killed runs, then continue the run in OUT (same
        arguments) or start one; RunMismatch if OUT holds another. Returns the
        number of finished batches found. Rank 0 calls this, alone."""
        for folder in (self.out, self.parts):
            for name in remove_stale_partials(folder):
                log(f"removed {os.path.join(folder, name)}, left by a killed run")
        run = json.loads(json.dumps(run))  # as it reads back: tuples become lists
        manifest = os.path.join(self.parts, MANIFEST)
        if os.path.isfile(manifest):
            self._check_manifest(manifest, run)
        else:
            stray = [n for n in self._names() if n.startswith("batch_")]
            if stray:
                raise RunMismatch(f"{self.parts} holds {batch_count(len(stray))} but no {MANIFEST}: "
                                  "not a run this tool can continue; delete the folder or "
                                  "choose another --out")
            try:
                os.makedirs(self.parts, exist_ok=True)
            except OSError as e:
                raise OutputError(describe_os_error(e, self.parts, "creating")) from None
            text = json.dumps({"format": _FORMAT, "run": run, "info": info}, indent=1)
            atomic_write(manifest, lambda f: f.write(text.encode()))
        for b in sorted(self.finished()):
            problem = self._check_shard(b)
            if problem:
                os.remove(self.shard(b))
                log(f"{self.shard(b)} {problem}: removed, its batch is sampled again")
        return len(self.finished())

    def _check_manifest(self, manifest: str, run: Dict) -> None:
        try:
            with open(manifest, encoding="utf-8") as f:
                stored = json.load(f)
            stored_run = stored["run"]
        except (ValueError, KeyError, TypeError) as e:
            raise RunMismatch(f"{manifest} is not a manifest this tool wrote ({e}); delete "
                              f"{self.parts} or choose another --out") from None
        diff = _differences(stored_run, run)
        if diff:
            raise RunMismatch(
                f"{self.parts} holds {batch_count(len(self.finished()), 'finished')} of a run with "
                f"other arguments ({'; '.join(diff)}): rerun with that run's arguments to "
                f"finish it, choose another --out, or delete {self.parts}")

    def _names(self) -> List[str]:
        try:
            return os.listdir(self.parts)
        except FileNotFoundError:
            return []

    def finished(self) -> Set[int]:
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

    def _check_shard(self, b: int) -> Optional[str]:
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
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            return f"is damaged ({type(e).__name__}: {e})"
        return None

    def write(self, b: int, images: np.ndarray, labels: Optional[np.ndarray]) -> None:
        members = [("images", np.uint8, images.shape, [images])]
        if self.labelled:
            members.append(("labels", np.int64, labels.shape, [labels]))
        atomic_write(self.shard(b), lambda f: write_npz(f, members))

    def _load(self, b: int):
        try:
            with np.load(self.shard(b)) as z:
                return z["images"], (z["labels"] if self.labelled else None)
        except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as e:
            os.remove(self.shard(b))
            raise OutputError(f"{self.shard(b)} is damaged ({type(e).__name__}: {e}); it was "
                              "removed: rerun the same command to sample its batch again") \
                from None

    def assemble(self, write_png: Callable[[np.ndarray, str], Optional[str]]) -> Dict[str, str]:
        """The final .npz (and .png, by write_png(images, path)) from every shard,
        in batch order; then the folder goes. Returns the paths written."""
        missing = sorted(set(range(self.num_batches)) - self.finished())
        if missing:
            raise OutputError(f"{self.parts} lacks batches {missing[:8]}: cannot assemble")
        stem = os.path.join(self.out, self.stem)
        shape = (self.num_samples, self.image_size, self.image_size, 3)
        first, labels = [], []

        def images():
            for b in range(self.num_batches):
                imgs, labs = self._load(b)
                if sum(map(len, first)) < GRID_MAX_IMAGES:
                    first.append(imgs[:GRID_MAX_IMAGES])
                if labs is not None:
                    labels.append(labs)
                yield imgs

        def write(f):
            members = [("arr_0", np.uint8, shape, images())]
            if self.labelled:  # filled while arr_0 streams: it is written after it
                members.append(("arr_1", np.int64, (self.num_samples,), labels))
            write_npz(f, members)

        written = {"npz": stem + ".npz"}
        atomic_write(written["npz"], write)
        if write_png(np.concatenate(first), stem + ".png"):
            written["png"] = stem + ".png"
        self.remove()
        return written

    def remove(self) -> None:
        """Drop the folder: renamed first to a name a later run cleans up, so
        that a kill halfway through leaves no folder that looks resumable."""
        trash = partial_name(os.path.join(self.out, self.stem + ".parts"))
        os.replace(self.parts, trash)
        shutil.rmtree(trash, ignore_errors=True)
