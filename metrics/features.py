"""Per-image features for the metrics, each from one model, cached per image (by the SHA-256 of its file).

    clip       open_clip image embedding, unit length                 CLIP-I = cosine
    dino       DINO ViT-S/16 CLS token (timm), unit length              DINO   = cosine
    face       ArcFace embedding of the largest SCRFD face, unit length, or NaN when no face is found
    inception  FID Inception-v3 pool3 (2048)                            FID
    artfid     ArtFID's Inception-v3 (art_inception.pth) pooled (2048)  FID (ArtFID); only with its file configured
"""
from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image

from faces import SCRFD, ArcFace, norm_crop, require_file
from faces.weights import eval_defaults, loading
from magicstyle.config import ConfigError
from magicstyle.images import limit_aspect, open_rgb
from magicstyle.output import write_atomic

Embedder = Callable[[Image.Image], np.ndarray]  # image -> (D,) float32


class FeatureCache:
    """Vectors by image digest in one ``.npz`` (keys, values); rewritten atomically by ``save``."""

    def __init__(self, path: Path):
        self.path, self.items = path, {}
        if path.is_file():
            try:
                with np.load(path) as data:
                    keys, values = data["keys"], data["values"]
                    if keys.ndim == 1 and values.ndim >= 2 and len(keys) == len(values):
                        self.items = dict(zip(keys.tolist(), values))
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
                pass  # a damaged cache (empty, cut short, not ours) is rebuilt

    def save(self) -> None:
        if not self.items:
            return
        buffer = io.BytesIO()
        keys = sorted(self.items)
        np.savez(buffer, keys=np.array(keys), values=np.stack([self.items[k] for k in keys]).astype(np.float32))
        write_atomic(self.path, buffer.getvalue(), overwrite=True, what="feature cache")


def _to_unit(x: torch.Tensor) -> np.ndarray:
    x = x.float()[0]
    return (x / x.norm().clamp_min(1e-12)).cpu().numpy()


def clip_embedder(entry: DictConfig, path: Path, device: torch.device) -> Embedder:
    import open_clip

    with loading(path, "clip"):
        model, _, preprocess = open_clip.create_model_and_transforms(entry.name, pretrained=str(path), device=device)
    model.eval()

    @torch.no_grad()
    def embed(img: Image.Image) -> np.ndarray:
        return _to_unit(model.encode_image(preprocess(limit_aspect(img))[None].to(device)))

    return embed


def dino_embedder(entry: DictConfig, path: Path, device: torch.device) -> Embedder:
    import timm
    from torchvision import transforms as T

    # the file has no classifier (num_classes 0), so that timm loads it strictly: another model's file is an error,
    # never a silently random network
    with loading(path, "dino"):
        model = timm.create_model(entry.name, pretrained=True, num_classes=0,
                                  pretrained_cfg_overlay={"file": str(path), "num_classes": 0})
    model.eval().to(device)
    preprocess = T.Compose([  # the (and DINO's evaluation) transform
        T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
        T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])

    @torch.no_grad()
    def embed(img: Image.Image) -> np.ndarray:
        return _to_unit(model(preprocess(limit_aspect(img))[None].to(device)))  # (1, D): the CLS token, final norm

    return embed


def face_embedder(detector_path: Path, arcface_path: Path) -> Embedder:
    detect, identify = SCRFD(detector_path), ArcFace(arcface_path)

    def embed(img: Image.Image) -> np.ndarray:
        faces = detect(img)
        if len(faces) == 0:
            return np.full(512, np.nan, np.float32)  # not found: never scored
        return identify(norm_crop(img, faces.points[0])[None])[0].astype(np.float32)

    return embed


def inception_embedder(path: Path, device: torch.device) -> Embedder:
    from .fid import load_inception

    model = load_inception(path).to(device)

    @torch.no_grad()
    def embed(img: Image.Image) -> np.ndarray:  # pytorch-fid's input: [0, 1] (the model resizes and rescales)
        x = torch.from_numpy(np.asarray(img, np.float32) / 255.0).permute(2, 0, 1)[None].to(device)
        return model(x)[0].float().cpu().numpy()

    return embed


def artfid_embedder(path: Path, device: torch.device) -> Embedder:
    from .artfid import load_art_inception, preprocess

    model = load_art_inception(path).to(device)

    @torch.no_grad()
    def embed(img: Image.Image) -> np.ndarray:  # StyleID's input: shorter side 512, [0, 1]
        return model(preprocess(img)[None].to(device))[0].float().cpu().numpy()

    return embed


def check_name(kind: str, cfg: DictConfig) -> None:
    """``models.clip.name`` / ``models.dino.name``: a model that open_clip / timm knows (one-line ``ConfigError``)."""
    name = cfg.models[kind].name
    if kind == "clip":
        import open_clip as library

        known = isinstance(name, str) and (name in library.list_models() or name.startswith(("hf-hub:", "local-dir:")))
    else:
        import timm as library

        known = isinstance(name, str) and library.is_model(name)
    if not known:
        default = eval_defaults().models[kind].name
        raise ConfigError(f"models.{kind}.name {name!r} is not a model {library.__name__} knows (see "
                          f"{library.__name__}.list_models()); configs/eval.yaml has {default}")


# The models.* entries each feature kind needs, in the order its loader takes them
ENTRIES = {"clip": ("clip",), "dino": ("dino",), "face": ("scrfd", "arcface"), "inception": ("fid_inception",),
           "artfid": ("artfid_inception",), "lpips": ("lpips_alexnet", "lpips_linear")}


def model_files(kind: str, cfg: DictConfig) -> list[Path]:
    """The checked model files of a feature kind (missing file: one-line ``FaceModelError``), and for CLIP and DINO
    the model's name.  ``evaluate`` resolves them once, before any work, and hands them to ``compute``."""
    if kind in ("clip", "dino"):
        check_name(kind, cfg)
    return [require_file(None, entry, cfg) for entry in ENTRIES[kind]]


def embedder(kind: str, cfg: DictConfig, files: list[Path], device: torch.device) -> Embedder:
    if kind == "clip":
        return clip_embedder(cfg.models.clip, files[0], device)
    if kind == "dino":
        return dino_embedder(cfg.models.dino, files[0], device)
    if kind == "face":
        return face_embedder(*files)
    if kind == "artfid":
        return artfid_embedder(files[0], device)
    return inception_embedder(files[0], device)


def cache_name(kind: str, cfg: DictConfig, files: list[Path]) -> str:
    """One cache per feature kind and model (name and file), so that another model never reads stale vectors.
    ArtFID's name carries its input size (``s512``; its caches from before ArtFID had its own network are orphaned)."""
    stems = "-".join(p.stem for p in files)
    name = cfg.models.get(kind, {}).get("name", "") if kind in ("clip", "dino") else ""
    if kind == "artfid":
        from .artfid import SHORTER_SIDE

        name = f"s{SHORTER_SIDE}"
    return f"{kind}-{name}-{stems}.npz".replace("/", "_")


def compute(kind: str, images: dict[str, Path], files: list[Path], cfg: DictConfig, device: torch.device,
            cache_dir: Path, progress=None) -> dict[str, np.ndarray]:
    """Features of ``images`` (digest -> file) for ``kind`` with its model ``files`` (``model_files``); only images
    missing from the cache are embedded."""
    cache = FeatureCache(cache_dir / cache_name(kind, cfg, files))
    todo = [d for d in images if d not in cache.items]
    if todo:
        embed = embedder(kind, cfg, files, device)
        if progress:
            progress.begin(kind, len(todo))
        for i, digest in enumerate(todo):
            cache.items[digest] = embed(open_rgb(images[digest]))
            if progress:
                progress.update(i + 1)
        cache.save()
    return {d: cache.items[d] for d in images}


def compute_lpips(pairs: dict[str, tuple[Path, Path]], files: list[Path], cfg: DictConfig, device: torch.device,
                  cache_dir: Path, progress=None) -> dict[str, float]:
    """LPIPS of (output, content) pairs, keyed ``output digest + content digest``.  The content is brought to the
    output's size as the pipeline does (shorter side resized, centre crop)."""
    from magicstyle.images import square, to_tensor

    from .lpips import load_lpips

    cache = FeatureCache(cache_dir / cache_name("lpips", cfg, files))
    todo = [k for k in pairs if k not in cache.items]
    if todo:
        model = load_lpips(*files).to(device)
        if progress:
            progress.begin("lpips", len(todo))
        for i, key in enumerate(todo):
            output = open_rgb(pairs[key][0])
            content = square(open_rgb(pairs[key][1]), output.width) if output.width == output.height else \
                open_rgb(pairs[key][1]).resize(output.size, Image.Resampling.LANCZOS)
            with torch.no_grad():
                d = model(to_tensor(output).to(device), to_tensor(content).to(device))
            cache.items[key] = d.float().cpu().numpy()
            if progress:
                progress.update(i + 1)
        cache.save()
    return {k: float(cache.items[k][0]) for k in pairs}
