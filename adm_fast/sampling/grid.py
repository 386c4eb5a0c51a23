"""PNG grids of samples: tiles enlarged by whole factors (nearest neighbour,
so no pixel is invented) until each is at least MIN_TILE_PX wide, and an
optional left margin with a label per row."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

GRID_MAX_IMAGES = 64  # a PNG of 10,000 samples would be gigapixels; the npz has them all
MIN_TILE_PX = 64  # a 16x16 sample shown at 16 px is a smudge
MAX_ZOOM = 8  # 8x8 samples reach 64 px; tinier ones stay small rather than huge
BACKGROUND = 0


def zoom_for(height: int, width: int, min_px: int = MIN_TILE_PX, max_zoom: int = MAX_ZOOM) -> int:
    """The whole factor that makes a height x width image at least min_px on
    its longer side, at most max_zoom (1 for images already that large)."""
    return max(1, min(max_zoom, math.ceil(min_px / max(height, width, 1))))


def tile(images: np.ndarray, rows: Sequence[Sequence[int]], cols: int, zoom: int = 1,
         pad: int = 2, fill: int = BACKGROUND) -> np.ndarray:
    """uint8 [N, H, W, C] images laid out as rows[r] = the indices shown in row
    r (at most `cols` of them), each enlarged `zoom` times, `pad` px apart."""
    _, h, w, c = images.shape
    th, tw = h * zoom, w * zoom
    out = np.full((len(rows) * (th + pad) + pad, cols * (tw + pad) + pad, c), fill,
                  dtype=np.uint8)
    for r, indices in enumerate(rows):
        for col, i in enumerate(list(indices)[:cols]):
            img = images[i]
            if zoom > 1:
                img = img.repeat(zoom, axis=0).repeat(zoom, axis=1)
            top, left = pad + r * (th + pad), pad + col * (tw + pad)
            out[top:top + th, left:left + tw] = img
    return out


def image_grid(images: np.ndarray, max_images: int = GRID_MAX_IMAGES, pad: int = 2,
               zoom: int | None = None) -> np.ndarray:
    """The first max_images of uint8 [N, H, W, 3] in a near-square grid, each
    enlarged by `zoom` (default zoom_for the image size)."""
    images = images[:max_images]
    n, h, w, _ = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = [range(r * cols, min(n, (r + 1) * cols)) for r in range(math.ceil(n / cols))]
    return tile(images, rows, cols, zoom_for(h, w) if zoom is None else zoom, pad)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: scalable
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()  # the small bitmap font


def label_rows(grid: np.ndarray, labels: Sequence[str], row_height: int, pad: int = 2,
               fill: int = BACKGROUND, color=(255, 255, 255)) -> np.ndarray:
    """`grid` with a left margin holding labels[r] beside row r (rows are
    row_height px, `pad` px apart from the top, as `tile` lays them out),
    drawn with PIL's default font on a `fill` grey margin."""
    from PIL import Image, ImageDraw

    font = _font(max(8, row_height // 2))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [probe.textbbox((0, 0), str(s), font=font) for s in labels]
    margin = max(b[2] - b[0] for b in boxes) + 4 * pad
    image = Image.new("RGB", (grid.shape[1] + margin, grid.shape[0]), (fill,) * 3)
    image.paste(Image.fromarray(grid).convert("RGB"), (margin, 0))
    draw = ImageDraw.Draw(image)
    for r, (text, box) in enumerate(zip(labels, boxes)):
        top = pad + r * (row_height + pad)
        x = (margin - (box[2] - box[0])) // 2 - box[0]
        y = top + (row_height - (box[3] - box[1])) // 2 - box[1]
        draw.text((x, y), str(text), font=font, fill=color)
    return np.asarray(image)
