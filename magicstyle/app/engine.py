"""One demo request, from two images to a PNG, the attention heat map and phase timings, with no browser involved.

The model is loaded once.  ``Demo.run`` serialises requests on it (a lock, besides the page's queue) and keeps the
last CSDI inversions, one per image, in a bounded LRU (``InversionCache``) keyed by the image's pixels and
``inversion_key(cfg)``: changing only beta, the recipe, the prompt or the guidance runs FFF alone (no second CSDI),
and a new style with the same portrait inverts the style alone.
"""
from __future__ import annotations

import atexit
import hashlib
import io
import re
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from ..smallface import plan_small_face
from models.errors import MagicStyleError, first_line

from ..config import ConfigError, one_minus, validate
from ..diagnostics import AttentionDiagnostics, heat_map
from models.hub import fetch_all
from ..images import ImageError, open_rgb, png_bytes, square, to_image, to_tensor
from ..output import write_atomic
from ..parameters import png_parameters
from ..pipeline import Inversion, csdi, decode_latents, encode_images, fff, inversion_key, load_model, stylize
from ..progress import Progress

KEEP_OUTPUTS = 64  # result PNGs kept in the output folder (the newest)
PhaseCallback = Callable[[str, int, int], None]  # (phase, steps done, steps in the phase)


@dataclass
class Request:
    """What the page sends: two image files and the settings a user may change (None: the app's configuration)."""

    content: str | Path | None
    style: str | Path | None
    recipe: str | None = None
    beta: float | None = None  # alpha follows: alpha = 1 - beta (eq. 5)
    steps: int | None = None
    guidance: float | None = None
    prompt: str | None = None
    seed: int | None = None
    store_mode: str | None = None
    heatmap: bool = True
    face_refine: bool | None = None  # the small-face pass (magicstyle/smallface.py)

    def overrides(self) -> dict:
        flags = {
            "steps": self.steps, "seed": self.seed,
            "ffa": {"recipe": self.recipe, "beta": self.beta, "alpha": one_minus(self.beta)},
            "generation": {"guidance": self.guidance, "prompt": self.prompt},
            "store": {"mode": self.store_mode},
            "face": {"refine": self.face_refine},
        }
        return {k: {kk: vv for kk, vv in v.items() if vv is not None} if isinstance(v, dict) else v
                for k, v in flags.items() if v is not None}


@dataclass
class Result:
    image: Image.Image
    png: Path  # the PNG with its ``parameters`` chunk (what the page offers for download)
    heatmap: Image.Image | None  # the attention diagnostics' layers x steps heat map; None when not asked for
    attention: dict | None  # the diagnostics' record (``style_share`` per layer and step, ``mean``); None likewise
    seconds: dict[str, float]  # per phase: encode, invert, generate, decode (0 for a reused inversion)
    unet_rows: dict[str, int]  # rows through the UNet: invert (0 when reused), generate
    reused: list[str]  # the images whose inversion came from the cache: "content", "style"
    face: dict | None  # the small-face pass: ``ran``, ``box``, ``face_share``, ``reason``; None when off
    parameters: str = field(repr=False)


class InversionCache:
    """The last inversions (one image each), least recently used first out: at most ``items`` of them and
    ``max_bytes`` of features (the newest is always kept, whatever its size)."""

    def __init__(self, items: int = 4, max_bytes: int = 4 << 30):
        self.items, self.max_bytes = items, max_bytes
        self.entries: OrderedDict[str, Inversion] = OrderedDict()

    def get(self, key: str) -> Inversion | None:
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        return None

    def put(self, key: str, inversion: Inversion) -> None:
        self.entries[key] = inversion
        self.entries.move_to_end(key)
        while len(self.entries) > 1 and (len(self.entries) > self.items or self.nbytes > self.max_bytes):
            self.entries.popitem(last=False)

    @property
    def nbytes(self) -> int:
        return sum(inv.store.nbytes + inv.z_T.numel() * inv.z_T.element_size() for inv in self.entries.values())


class _PageProgress(Progress):
    """The pipeline's per-phase progress, handed to a callback instead of drawn on stderr."""

    def __init__(self, callback: PhaseCallback):
        super().__init__(enabled=False)
        self.callback = callback

    def update(self, done: int) -> None:
        self.callback(self.phase, done, self.total)


class Demo:
    """The model, the base configuration (the app's config file and ``key=value`` arguments), and the cache.
    ``files``: the model files as ``models.hub.fetch_all`` resolves them (resolved here if not given)."""

    def __init__(self, cfg: DictConfig, sd=None, *, files: dict[str, Path] | None = None,
                 cache: InversionCache | None = None, out_dir: Path | None = None):
        self.cfg = cfg
        self.files = files if files is not None else fetch_all(cfg)  # the model files (for the PNG's parameters)
        self.sd = sd if sd is not None else load_model(cfg)
        self.cache = cache if cache is not None else InversionCache()
        if out_dir is None:  # a folder of our own, removed when the process ends
            out_dir = tempfile.mkdtemp(prefix="magicstyle-app-")
            atexit.register(shutil.rmtree, out_dir, ignore_errors=True)
        self.out_dir = Path(out_dir)
        self.lock = threading.Lock()
        self.count = 0

    def config(self, request: Request) -> DictConfig:
        """The base configuration with the request's settings; a bad value is a ``ConfigError``."""
        cfg = self.cfg.copy()
        try:
            cfg.merge_with(OmegaConf.create(request.overrides()))
        except Exception as e:  # OmegaConf's type errors, e.g. a non-number where a number goes
            raise ConfigError(f"settings: {first_line(e)}") from None
        validate(cfg)
        return cfg

    def run(self, request: Request, progress: PhaseCallback | None = None) -> Result:
        """Stylize ``request.content`` in the style of ``request.style``.  Bad input raises a ``MagicStyleError``
        whose message is meant for the page, before the model is touched."""
        cfg = self.config(request)
        images = [_square_image(request.content, "content", cfg.size), _square_image(request.style, "style", cfg.size)]
        keys = [_image_key(img) + inversion_key(cfg) for img in images]
        face_info: dict = {}
        face_pass = plan_small_face(request.content, cfg, face_info) if cfg.face.refine else None  # detection first
        bar = _PageProgress(progress) if progress else None
        seconds, rows = dict.fromkeys(("encode", "invert", "generate", "decode"), 0.0), {"invert": 0}
        with self.lock, torch.no_grad():
            inversions = {key: self.cache.get(key) for key in keys}
            reused = [name for name, key in zip(("content", "style"), keys) if inversions[key] is not None]
            todo = [key for key, inv in inversions.items() if inv is None]  # each image once, even if both are one
            if todo:
                start = _phase(bar, "encode")
                batch = torch.cat([to_tensor(images[keys.index(key)]) for key in todo])
                z0 = encode_images(self.sd, batch, cfg.seed if cfg.inversion.sample_posterior else None)
                seconds["encode"] = _done(bar, start)
                start, counts = time.perf_counter(), {}
                inversion = csdi(self.sd, z0, cfg, progress=bar, stats=counts)  # the missing images in one batch
                seconds["invert"], rows["invert"] = time.perf_counter() - start, counts["invert_unet_rows"]
                for i, key in enumerate(todo):
                    inversions[key] = inversion if len(todo) == 1 else inversion.select([i])
                    self.cache.put(key, inversions[key])
            inversion = Inversion.cat([inversions[key] for key in keys])  # (content, style): fff's default pair
            start, counts = time.perf_counter(), {}
            diagnostics = AttentionDiagnostics.from_config(cfg) if request.heatmap else None
            z = fff(self.sd, inversion, cfg, diagnostics=diagnostics, progress=bar, stats=counts)
            seconds["generate"], rows["generate"] = time.perf_counter() - start, counts["generate_unet_rows"]
            start = _phase(bar, "decode")
            image = to_image(decode_latents(self.sd, z))
            seconds["decode"] = _done(bar, start)
            if face_pass is not None:  # Fig. 3: the face's crop stylized on its own (no cache) and pasted back
                start = time.perf_counter()
                image = face_pass.apply(image, request.style, cfg, stylize=stylize, sd=self.sd, progress=bar)
                seconds["face"] = time.perf_counter() - start
            attention = diagnostics.to_dict() if diagnostics else None
            self.count += 1
            number = self.count
        parameters = png_parameters(cfg, self.files, _name(request.content), _name(request.style))
        png = self.out_dir / f"{number:06d}_{_slug(request.content)}_{_slug(request.style)}.png"
        write_atomic(png, png_bytes(image, parameters))
        for old in sorted(self.out_dir.glob("[0-9]*_*.png"))[:-KEEP_OUTPUTS]:  # the page has fetched those long ago
            old.unlink(missing_ok=True)
        heat = Image.open(io.BytesIO(heat_map(attention, title=png.stem))) if attention else None
        face = face_info.get("face_refine") if cfg.face.refine else None
        return Result(image, png, heat, attention, seconds, rows, reused, face, parameters)


def _square_image(path: str | Path | None, name: str, size: int) -> Image.Image:
    if path is None or str(path) == "":
        raise ImageError(f"no {name} image: upload one, take one with the webcam, or pick an example")
    try:
        return square(open_rgb(path), size)
    except ImageError as e:  # the message names the server's temporary copy: name the uploaded file instead
        raise ImageError(f"the {name} image: {str(e).replace(str(path), Path(str(path)).name)}") from None


def _image_key(image: Image.Image) -> str:
    """A digest of the pixels the model sees (after orientation, RGB conversion and the square crop)."""
    return hashlib.sha256(image.tobytes()).hexdigest()[:32]


def _phase(bar: _PageProgress | None, name: str) -> float:
    if bar:
        bar.begin(name, 1)
    return time.perf_counter()


def _done(bar: _PageProgress | None, start: float) -> float:
    if bar:
        bar.update(1)
    return time.perf_counter() - start


def _name(path) -> str:
    return Path(str(path)).name


def _slug(path) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", Path(str(path)).stem)[:40] or "image"


__all__ = ["Demo", "InversionCache", "MagicStyleError", "Request", "Result"]
