"""Reading and writing checkpoint files without running code: guided-diffusion
`.pt` files as released (torch.load with weights_only=True: a pickle carrying
anything but tensors and plain containers is refused) and safetensors, whose
header adm_fast reads and writes itself and whose tensors it verifies against
the checksum it wrote (metadata.py).

A file is opened once: `read_checkpoint` reads what it is, its metadata
(verified), its tensors (verified) and its identity from one open file, and
everything that looks at the checkpoint afterwards takes that CheckpointFile.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import struct
from collections.abc import Mapping
from typing import BinaryIO

import torch
from torch import Tensor

from .. import io
from .metadata import META_SHA256, CheckpointError, check_metadata


class UnsafeCheckpointError(CheckpointError):
    """A .pt file that holds Python objects other than tensors."""


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
              torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32",
              torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
_ST_READ = {**{v: k for k, v in _ST_DTYPES.items()},
            **{name: getattr(torch, attr) for name, attr in (
                ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
                ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")) if hasattr(torch, attr)}}


@dataclasses.dataclass
class CheckpointFile:
    """A checkpoint as read from its file, verified: what every later look at
    it (its kind, its flags, building and loading the model) takes instead of
    the path."""
    path: str
    format: str  # "safetensors" or "torch"
    state_dict: dict[str, Tensor]
    metadata: dict[str, str]
    identity: dict | None = None  # io.file_identity of what was read, when asked for


# --- reading -------------------------------------------------------------------

def _unwrap(obj, path: str) -> dict[str, Tensor]:
    if isinstance(obj, Mapping) and not all(isinstance(v, Tensor) for v in obj.values()):
        # A training checkpoint wrapping the weights beside other state.
        for key in ("state_dict", "model", "module"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path}: expected a state_dict (a mapping of names to "
                              f"tensors), found {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {', '.join(map(str, bad[:12]))}")
    keys = list(obj)
    if all(k.startswith("module.") for k in keys):  # saved from DistributedDataParallel
        return {k[len("module."):]: obj[k] for k in keys}
    return dict(obj)


def _tensor_bytes(t: Tensor):
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def digest(tensors: Mapping[str, Tensor]) -> str:
    """adm_fast.sha256 of these tensors (metadata.py says over what)."""
    names = sorted(tensors)
    h = hashlib.sha256(json.dumps(
        [[n, _ST_DTYPES.get(tensors[n].dtype, str(tensors[n].dtype)), list(tensors[n].shape)]
         for n in names]).encode())
    for n in names:
        h.update(_tensor_bytes(tensors[n]))
    return h.hexdigest()


def _header(f: BinaryIO, path: str) -> tuple[dict, int]:
    try:
        return io.read_safetensors_header(f)
    except io.HeaderError as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None


def _safetensors_tensors(f: BinaryIO, header: dict, start: int, path: str) -> dict[str, Tensor]:
    """The tensors the header lists, read from f: each entry's dtype known,
    its bytes its shape's, the entries covering the data without gaps or overlaps."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path} is not a readable safetensors file: {why}")

    size = os.fstat(f.fileno()).st_size - start
    entries = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _ST_READ[entry["dtype"]]
            shape = [int(s) for s in entry["shape"]]
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {name}: an entry without a known dtype, a shape and "
                      "data_offsets") from None
        count = 1
        for s in shape:
            count *= s
        if min(shape, default=0) < 0 or end - begin != count * dtype.itemsize:
            raise bad(f"tensor {name}: {end - begin} bytes for shape {shape} of {entry['dtype']}")
        entries.append((begin, end, name, dtype, shape))
    entries.sort()
    at = 0
    for begin, end, name, _, _ in entries:
        if begin != at:
            raise bad(f"tensor {name} starts at byte {begin} of the data, expected {at}")
        at = end
    if at != size:
        raise bad(f"the header lists {at} bytes of data, the file holds {size}")
    tensors = {}
    f.seek(start)
    for begin, end, name, dtype, shape in entries:
        raw = torch.empty(end - begin, dtype=torch.uint8)
        if f.readinto(raw.numpy()) != end - begin:
            raise bad(f"tensor {name} is cut short")
        tensors[name] = raw.view(dtype).reshape(shape)
    return {k: tensors[k] for k in sorted(tensors)}


def _what_file(head: bytes, error: BaseException) -> str:
    """What a file torch.load failed on holds, by its first bytes: torch.save
    writes a zip archive (a pickle in its legacy format). torch.load's own
    message only helps for those (for text it can be a bare number)."""
    said = str(error).split(". ")[0].splitlines()[0].strip() if str(error).strip() else ""
    said = said or type(error).__name__
    if not head:
        return "the file is empty (0 bytes)"
    if head[:4] == b"PK\x03\x04":
        return f"a damaged zip archive ({said})"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return f"a damaged pickle ({said})"
    text = None
    for cut in range(4):  # the 64 bytes may end inside a character
        try:
            text = head[:len(head) - cut].decode("utf-8")
            break
        except UnicodeDecodeError:
            pass
    if text is not None and all(c.isprintable() or c in "\t\r\n" for c in text):
        return (f"it is text (it starts with {text[:32]!r}), not a torch.save zip archive "
                "or pickle")
    return (f"an unknown format (it starts with {head[:8]!r}), not a torch.save zip archive "
            "or pickle")


def _torch_state(f: BinaryIO, path: str, device) -> dict[str, Tensor]:
    f.seek(0)
    head = f.read(64)
    f.seek(0)
    try:
        obj = torch.load(f, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if "global" in ln.lower()]
        if lines:
            raise UnsafeCheckpointError(
                f"refusing to load {path}: it holds Python objects other than tensors, and "
                f"unpickling them could run code; adm_fast loads only plain state_dicts "
                f"({lines[0]})") from None
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: "
                              f"{_what_file(head, e)}") from None
    except Exception as e:  # zip, pickle and storage errors of a damaged file
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: "
                              f"{_what_file(head, e)}") from None
    return _unwrap(obj, path)


def sniff(f: BinaryIO, path: str) -> str | None:
    """'safetensors', 'torch' or None (neither) for the file open in f; a
    name ending in .safetensors is taken at its word."""
    if path.endswith(".safetensors"):
        return "safetensors"
    f.seek(0)
    return io.file_format(f.read(16))


def read_checkpoint(f: BinaryIO, path: str, kind: str | None = None,
                    identify: bool = False) -> CheckpointFile:
    """The checkpoint open in f (read from its start): its tensors on the cpu
    and its metadata, verified (adm_fast.metadata_sha256, then adm_fast.sha256),
    and with `identify` its identity. kind: what sniff said, when the caller
    asked already."""
    kind = kind or sniff(f, path)
    if kind == "safetensors":
        header, start = _header(f, path)
        meta = dict(header.get("__metadata__", {}))
        check_metadata(meta, path)
        sd = _safetensors_tensors(f, header, start, path)
        want = meta.get(META_SHA256)
        if want is not None and digest(sd) != want:
            raise CheckpointError(
                f"{path}: the tensors do not match the checksum adm_fast wrote ({META_SHA256}): "
                "the file was modified (a dtype or shape in its header?) or damaged")
        sd = _unwrap(sd, path)
    else:
        kind, sd, meta = "torch", _torch_state(f, path, "cpu"), {}
    return CheckpointFile(path, kind, sd, meta, io.file_identity(f) if identify else None)


def open_checkpoint(path: str | os.PathLike) -> CheckpointFile:
    """read_checkpoint of the file at path."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        return read_checkpoint(f, path)


def read_state_dict(path: str | os.PathLike, device="cpu") -> tuple[dict[str, Tensor], dict[str, str]]:
    """(state_dict, metadata) from a .pt or .safetensors file, without running code.
    A safetensors file with adm_fast's checksums is verified: its metadata
    (adm_fast.metadata_sha256), then its tensors (adm_fast.sha256)."""
    ckpt = open_checkpoint(path)
    sd = ckpt.state_dict
    if str(device) != "cpu":
        sd = {k: v.to(device) for k, v in sd.items()}
    return sd, ckpt.metadata


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """A safetensors file's metadata from its header alone ({} for a .pt file),
    verified against adm_fast.metadata_sha256 when the file has one (the
    tensors are verified when they are read: read_state_dict)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        if sniff(f, path) != "safetensors":
            return {}
        header, _ = _header(f, path)
    meta = dict(header.get("__metadata__", {}))
    check_metadata(meta, path)
    return meta


# --- writing -------------------------------------------------------------------

def write_safetensors(f: BinaryIO, tensors: Mapping[str, Tensor], meta: Mapping[str, str]) -> None:
    """The safetensors format, streamed: header length (u64 LE), the JSON header
    padded to 8 bytes, then the tensors back to back. Wider dtypes first keep
    every tensor aligned to its element size, as safetensors itself does."""
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header, offset = {}, 0
    for name in order:
        t = tensors[name]
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"save_checkpoint: {name} has dtype {t.dtype}, which safetensors "
                            "does not store")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = dict(meta)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name in order:
        f.write(_tensor_bytes(tensors[name]).data)
