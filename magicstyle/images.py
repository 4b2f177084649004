"""Reading the user's images and writing the result.

Any image Pillow reads is accepted: EXIF orientation is applied; RGBA, LA and palette transparency are composited
on white; greyscale, 16-bit, palette and CMYK are converted to 8-bit RGB; an animated file gives its first frame.
Non-square images are resized (shorter side to ``size``) and centre-cropped.  Images over ``MAX_PIXELS`` are refused
as possible decompression bombs.
"""
from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from models.errors import MagicStyleError

from .output import write_atomic

MAX_PIXELS = 64 * 1024 * 1024  # 64 megapixels
MAX_ASPECT = 8  # a longer side beyond 8x the shorter is cut to that before resizing (``limit_aspect``)


class ImageError(MagicStyleError):
    """An image that is missing, unreadable or too large."""


def open_rgb(path: str | Path) -> Image.Image:
    """Open an image file as 8-bit RGB, upright, first frame."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image {path} does not exist; check the path" if not path.exists()
                         else f"image {path} is not a file; give an image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise ImageError(f"image {path} is {img.width}x{img.height}: too large (limit {MAX_PIXELS} "
                                     f"pixels); make a smaller copy first (e.g. {math.isqrt(MAX_PIXELS)} px square at "
                                     "most: it is resized to --size anyway)")
                img.seek(0)  # first frame of an animation
                img.load()
                return to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"image {path} is too large to decode safely (a decompression bomb?)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"cannot read image {path} ({e}); use a PNG, JPEG or WebP file") from None


def to_rgb(img: Image.Image) -> Image.Image:
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16- and 32-bit greyscale: scale, do not clip
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def limit_aspect(img: Image.Image, most: int = MAX_ASPECT) -> Image.Image:
    """Centre-crop the longer side to at most ``most`` times the shorter.  The centre crops the pipeline and the
    metrics take lie inside it, so an image within the ratio is untouched, and a 1000:1 strip is not resized whole
    (its shorter side to 512 px would make it 512000 px long)."""
    w, h = img.size
    if max(w, h) <= most * min(w, h):
        return img
    keep = most * min(w, h)
    left, top = (w - keep) // 2 if w > h else 0, (h - keep) // 2 if h > w else 0
    return img.crop((left, top, left + min(w, keep), top + min(h, keep)))


def square(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` and centre-crop to size x size."""
    img = limit_aspect(img)
    scale = size / min(img.size)
    w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
    img = img.resize((w, h), Image.Resampling.LANCZOS)
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB image -> (1, 3, H, W) float32 in [-1, 1]."""
    a = torch.from_numpy(np.asarray(img, dtype=np.float32).copy())
    return (a / 127.5 - 1.0).permute(2, 0, 1)[None]


def to_image(x: torch.Tensor) -> Image.Image:
    """(1, 3, H, W) in [-1, 1] -> RGB image (values outside are clamped)."""
    a = ((x[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(a, "RGB")


def png_bytes(img: Image.Image, parameters: str) -> bytes:
    """The image as PNG, with a ``parameters`` text chunk (the run's settings, as JSON)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    img.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def save_png(img: Image.Image, path: str | Path, parameters: str, *, overwrite: bool = False) -> None:
    """Write a PNG with a ``parameters`` text chunk, atomically; an existing file only with ``overwrite``."""
    write_atomic(path, png_bytes(img, parameters), overwrite=overwrite)
