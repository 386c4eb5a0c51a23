"""Image folders, listed and opened so that no file in them can hang or flood
the process, and guided-diffusion's resize-and-crop. Shared by training
(train/data.py) and evaluation's folders (evaluation/batches.py).

What a folder may hold besides images, and what happens to it:
  - a special file named like an image (a FIFO, a device, a socket): opening a
    FIFO blocks until something writes to it, forever in practice, and opening
    a device can act on it. The listing leaves such files out and says so once
    per folder (a warning on the `adm_fast` logger); one that appears after the
    listing is refused at open (opened non-blocking, checked to be a regular
    file before a byte is read).
  - an image too large to decode: a 420 KB PNG of 12000x12000 decodes to 1.38
    GB. Its size is read from the header, and above `max_pixels` (MAX_PIXELS
    by default) it is refused before decoding, naming the file and the limit.
    PIL's own guard (a warning above Image.MAX_IMAGE_PIXELS, an error above
    twice that) is silenced for the warning, since this limit decides, and its
    error is reported like this one.
  - a file named like an image in another format: only the formats PIL
    decodes by itself are tried (PNG, JPEG, GIF, WebP, BMP, TIFF), never EPS
    or PDF, which PIL hands to Ghostscript.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import warnings
from collections.abc import Iterator

import numpy as np
from PIL import Image

__all__ = ["IMAGE_EXTENSIONS", "MAX_PIXELS", "ImageFileError", "NotARegularFile",
           "ImageTooLarge", "UnreadableImage", "list_image_files", "open_image", "read_rgb",
           "fit_short_side", "center_crop_arr"]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif")
# 8192x8192: far above any image ADM trains or evaluates on (ImageNet's largest
# are about 5000 pixels wide), while an RGB decode stays under 0.2 GB per image
# (per data worker). PIL's own warning starts at 89.5M pixels.
MAX_PIXELS = 8192 * 8192
# PIL's decoders that run no external program (JPEG's also opens MPO, the
# multi-frame JPEG of many phone photos).
FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")

_log = logging.getLogger("adm_fast")
_warned: set = set()  # (folder, first skipped file): one warning per folder per process


class ImageFileError(ValueError):
    """A file of an image folder that is not read; the message names it."""

    def __init__(self, path: str, reason: str, message: str | None = None):
        super().__init__(message or f"{path}: {reason}")
        self.path, self.reason = path, reason


class NotARegularFile(ImageFileError):
    """A FIFO, device or socket (or a directory) where an image file was expected."""


class ImageTooLarge(ImageFileError):
    """An image whose header declares more pixels than the limit."""


class UnreadableImage(ImageFileError):
    """Not an image PIL can decode: truncated, corrupt, another format."""


def _is_image_name(name: str) -> bool:
    return "." in name and name.rsplit(".", 1)[1].lower() in IMAGE_EXTENSIONS


def list_image_files(data_dir: str | os.PathLike) -> list[str]:
    """The image files under `data_dir`, recursively, in guided-diffusion's order
    (each level sorted). Special files named like images are left out (one
    warning). ImageFileError when the folder is missing, unreadable or holds no
    image."""
    root = os.fspath(data_dir)
    if not os.path.exists(root):
        raise ImageFileError(root, "does not exist", f"data directory {root!r} does not exist")
    if not os.path.isdir(root):
        raise ImageFileError(root, "is not a directory",
                             f"data directory {root!r} is not a directory")
    found: list[str] = []
    special: list[str] = []
    _walk(root, found, special, set())
    if special and (root, special[0]) not in _warned:
        _warned.add((root, special[0]))
        _log.warning("%s: left out %d special file(s) named like images (FIFO, device or "
                     "socket; reading one can block forever), first %s", root, len(special),
                     special[0])
    if not found:
        exts = ", ".join("." + e for e in IMAGE_EXTENSIONS)
        raise ImageFileError(root, "no images", f"no images in {root!r} (looked recursively "
                             f"for {exts}, any case)")
    return found


def _walk(directory: str, out: list[str], special: list[str], seen: set) -> None:
    try:
        st = os.stat(directory)
        names = sorted(os.listdir(directory))
    except OSError as e:
        raise ImageFileError(directory, "cannot read it", f"cannot read directory "
                             f"{directory!r}: {e.strerror or e}") from None
    if (st.st_dev, st.st_ino) in seen:  # a symlink cycle would recurse forever
        return
    seen.add((st.st_dev, st.st_ino))
    # Per-level sorting (not one sort of full paths) is guided-diffusion's order,
    # and the order decides which rank gets which file.
    for name in names:
        full = os.path.join(directory, name)
        try:
            mode = os.stat(full).st_mode
        except OSError:
            # A dangling link or a file gone meanwhile: listed, so that reading it
            # fails with its name (or is skipped with the other unreadable ones).
            mode = stat.S_IFREG if _is_image_name(name) else 0
        if stat.S_ISDIR(mode):
            _walk(full, out, special, seen)
        elif _is_image_name(name):
            (out if stat.S_ISREG(mode) else special).append(full)


def _open_regular(path: str):
    """`path` opened for reading as a binary file, or NotARegularFile. Checked
    by stat before opening (opening a device can act on it) and by fstat after
    (it may have been swapped meanwhile); O_NONBLOCK keeps a FIFO's open from
    waiting for a writer."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise NotARegularFile(path, "not a regular file (a FIFO, device, socket or folder "
                                  "named like an image): not read")
        flags = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
                 | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
        fd = os.open(path, flags)
    except OSError as e:
        raise UnreadableImage(path, f"cannot open it: {e.strerror or e}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotARegularFile(path, "not a regular file (a FIFO, device or socket named "
                                  "like an image): not read")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


@contextlib.contextmanager
def open_image(path: str | os.PathLike, max_pixels: int | None = MAX_PIXELS,
               limit_hint: str = "") -> Iterator[Image.Image]:
    """The image at `path`, its header read and its size checked, not decoded yet
    (PIL decodes on load() or the first pixel access). Raises NotARegularFile,
    ImageTooLarge (more than max_pixels pixels; None: no limit but PIL's own;
    limit_hint ends the message: how to raise the limit) or UnreadableImage."""
    path = os.fspath(path)
    with _open_regular(path) as f:
        try:
            with warnings.catch_warnings():
                # This module's limit decides; PIL's warning would only be noise.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(f, formats=_formats())
        except Image.DecompressionBombError as e:
            raise ImageTooLarge(path, f"{e} (PIL's Image.MAX_IMAGE_PIXELS); refused before "
                                "decoding" + (f"; {limit_hint}" if limit_hint else "")) from None
        except (OSError, ValueError, SyntaxError, EOFError) as e:
            raise UnreadableImage(path, _reason(e)) from None
        with im:
            width, height = im.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageTooLarge(
                    path, f"{width}x{height} is {width * height:,} pixels, more than the limit "
                    f"of {max_pixels:,} an image may have here (checked from its header, "
                    "before decoding: a small file can decode to gigabytes)"
                    + (f"; {limit_hint}" if limit_hint else ""))
            yield im


def read_rgb(path: str | os.PathLike, max_pixels: int | None = MAX_PIXELS,
             limit_hint: str = "") -> Image.Image:
    """The image at `path` decoded, as RGB (open_image's checks and errors)."""
    path = os.fspath(path)
    with open_image(path, max_pixels, limit_hint) as im:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im.load()
                return im.convert("RGB")
        except (OSError, ValueError, SyntaxError, EOFError) as e:
            raise UnreadableImage(path, _reason(e)) from None


def _formats() -> list[str]:
    # A PIL built without one of them (WebP) would fail on the name.
    Image.init()
    return [f for f in FORMATS if f in Image.OPEN]


def _reason(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def fit_short_side(img: Image.Image, short: int) -> Image.Image:
    """`img` resized so that its shorter side is `short`, as guided-diffusion does."""
    # Halving with BOX first is what guided-diffusion does for quality; the
    # arithmetic (floor halving, Python round of each side) fixes output sizes.
    while min(img.size) >= 2 * short:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.Resampling.BOX)
    scale = short / min(img.size)
    return img.resize(tuple(round(d * scale) for d in img.size), resample=Image.Resampling.BICUBIC)


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """Resize the shorter side to `image_size` and take the central square, [S, S, C] uint8."""
    arr = np.asarray(fit_short_side(pil_image, image_size))
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]
