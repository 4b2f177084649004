"""The small-face pass (paper Fig. 3, used there "in conjunction with DIIR proposed in MagicID").

MagicID's DIIR is not public; this is our reading, as A1111's ADetailer does it: when the content's largest face
covers less than ``face.min_share`` of the image, stylize as usual, then cut a square around the face out of the
content (side (1 + 2 margin) x the face box's longer side), stylize that crop at ``size`` with the same style and
settings, shrink it back and paste it over the first result with a feathered mask.  Pixels outside the square are
those of the plain run, bit for bit.

``plan_small_face`` runs before the job (detection, so that a missing detector fails before any work);
``SmallFacePass.apply`` runs after it.  What happened goes to ``stats["face_refine"]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from faces.scrfd import SCRFD, Faces
from faces.weights import resolve

from .images import open_rgb, to_rgb


def load_detector(cfg: DictConfig) -> Callable[[Image.Image], Faces]:
    return SCRFD(resolve(cfg.face.detector), setting="face.detector")


def native_square(img: Image.Image) -> Image.Image:
    """The centred square of the image at its own resolution: what ``images.square`` resizes to ``size``."""
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    return img.crop((left, top, left + side, top + side))


def crop_square(box: np.ndarray, margin: float, side: int) -> tuple[float, float, float]:
    """(x0, y0, s): the square of side (1 + 2 margin) * max(w, h) centred on ``box``, moved inside [0, side]^2."""
    x0, y0, x1, y1 = (float(v) for v in box)
    s = min((1 + 2 * margin) * max(x1 - x0, y1 - y0), side)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return min(max(cx - s / 2, 0.0), side - s), min(max(cy - s / 2, 0.0), side - s), s


def feather_mask(n: int, feather: float) -> np.ndarray:
    """(n, n) weights: 1 inside, a linear ramp over ``feather * n`` pixels down towards 0 at each edge."""
    ramp = max(feather * n, 1.0)
    i = np.arange(n, dtype=np.float64) + 0.5
    edge = np.clip(np.minimum(i, n - i) / ramp, 0.0, 1.0)
    return np.minimum(edge[:, None], edge[None, :])


@dataclass
class SmallFacePass:
    content: Image.Image  # the content's native square
    crop: tuple[float, float, float, float]  # the square in native pixels, (left, top, right, bottom)
    box: tuple[int, int, int, int]  # the same square in output pixels
    info: dict

    def apply(self, result: Image.Image, style, cfg: DictConfig, *, stylize: Callable[..., Image.Image], sd=None,
              progress=None) -> Image.Image:
        """Stylize the crop with ``style`` and ``cfg`` (without this pass) and paste it into ``result``.  ``stylize``
        is ``magicstyle.pipeline.stylize``, handed in by the caller (the pipeline runs this pass, so this module does
        not import it)."""
        size = cfg.size
        inner = OmegaConf.merge(cfg, {"face": {"refine": False}})
        crop = self.content.resize((size, size), Image.Resampling.LANCZOS, box=self.crop)
        stylized = stylize(crop, style, inner, sd=sd, progress=progress)
        x0, y0, x1, y1 = self.box
        patch = np.asarray(stylized.resize((x1 - x0, y1 - y0), Image.Resampling.LANCZOS), dtype=np.float64)
        out = np.array(result)
        region = out[y0:y1, x0:x1].astype(np.float64)
        mask = feather_mask(x1 - x0, cfg.face.feather)[..., None]
        out[y0:y1, x0:x1] = np.clip(np.round(mask * patch + (1 - mask) * region), 0, 255).astype(np.uint8)
        return Image.fromarray(out, "RGB")


def plan_small_face(content: str | Path | Image.Image, cfg: DictConfig, stats: dict | None = None,
                    detector: Callable[[Image.Image], Faces] | None = None) -> SmallFacePass | None:
    """Detect the content's largest face; a ``SmallFacePass`` if it covers less than ``face.min_share``, else None.

    ``stats["face_refine"]`` gets ``ran`` (then ``box``: the pasted square in output pixels, x0, y0, x1, y1),
    ``face_share`` and ``reason``.
    """
    img = native_square(to_rgb(content) if isinstance(content, Image.Image) else open_rgb(content))
    faces = (detector or load_detector(cfg))(img)
    side, size = img.width, cfg.size
    info: dict = {"ran": False, "box": None, "face_share": None}
    plan = None
    if len(faces) == 0:
        info["reason"] = "no face found in the content"
    else:
        share = faces.area(0) / float(side * side)
        info["face_share"] = round(share, 6)
        if share >= cfg.face.min_share:
            info["reason"] = f"the largest face covers {share:.1%} of the image (face.min_share {cfg.face.min_share})"
        else:
            x, y, s = crop_square(faces.boxes[0], cfg.face.margin, side)
            r = size / side  # native -> output pixels
            n = max(min(round(s * r), size), 8)
            bx, by = min(round(x * r), size - n), min(round(y * r), size - n)
            info.update(ran=True, box=[bx, by, bx + n, by + n], reason="small face")
            plan = SmallFacePass(img, (bx / r, by / r, (bx + n) / r, (by + n) / r), (bx, by, bx + n, by + n), info)
    if stats is not None:
        stats["face_refine"] = info
    return plan
