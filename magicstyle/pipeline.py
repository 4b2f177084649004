"""MagicStyle (Deng et al.), Sec. III: Content and Style DDIM Inversion (CSDI), then Feature Fusion Forward (FFF).

    z^C, z^S   = 0.18215 * E(I_C), 0.18215 * E(I_S)                     (VAE posterior means)
    CSDI:        DDIM-invert the images in one batch, guidance 1; the ``record`` recipe keeps each image's inputs of
                 the chosen self-attention layers per timestep (their Q/K/V, eq. 3).            (magicstyle/inversion.py)
    FFF:         z_T^CS = AdaIN(z_T^C, z_T^S)                            (eq. 4)
                 DDIM-sample z_T^CS with guidance 5; the ``ffa`` recipe replaces self-attention in the chosen layers
                 (Algorithm 1, eq. 5).
    result     = D(z_0^CS / 0.18215)

``csdi`` returns an ``Inversion`` of N images that ``fff`` can use any number of times (a beta sweep inverts once),
for any (content, style) pairs of those images, all pairs in one UNet batch.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Sequence

import torch
from omegaconf import DictConfig
from PIL import Image

from attention import RECIPES, FeatureStore, adain
from .smallface import plan_small_face
from models import SD15
from sampling import cfg_eps_fn, ddim_sample, ddim_timesteps

from .compiled import compile_seconds
from .config import ConfigError, load_config
from .images import to_image
from .inversion import CountedUNet, Inversion, csdi, ffa_timesteps, inversion_key, recipes, select_layers
from .model import (
    LATENT_SCALE, clock, decode_latents, encode_images, encode_text, load_image, load_model, resolve_device,
    resolve_dtypes,
)
from .progress import Progress

__all__ = [
    "LATENT_SCALE", "CountedUNet", "Inversion", "csdi", "decode_latents", "encode_images", "encode_text",
    "ffa_timesteps", "fff", "inversion_key", "load_image", "load_model", "recipes", "resolve_device",
    "resolve_dtypes", "select_layers", "stylize", "with_reference_rows",
]


def with_reference_rows(model: CountedUNet, store: FeatureStore, context: torch.Tensor):
    """recompute mode: append the latents of the images the pairs use (each once) at the current timestep to every
    UNet batch, as its last rows with the inversion prompt, and drop their noise predictions (the store's ``mix``
    reads their features)."""

    def run(x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        reference = store.reference_rows()
        if reference is None:
            return model(x, t, ctx)
        n, r = x.shape[0], reference.shape[0]
        x = torch.cat([x, reference.to(x.dtype)])
        t = torch.cat([t, t[:1].expand(r)])
        ctx = torch.cat([ctx, context.expand(r, -1, -1).to(ctx.dtype)])
        return model(x, t, ctx)[:n]

    return run


def check_pairs(pairs: Sequence[Sequence[int]] | None, images: int) -> list[tuple[int, int]]:
    """``pairs`` of image indices -> a list of (content, style) tuples, or a ConfigError naming the bad pair."""
    pairs = [(0, 1)] if pairs is None else [tuple(int(i) for i in pair) for pair in pairs]
    if not pairs:
        raise ConfigError("FFF needs at least one (content, style) pair")
    for pair in pairs:
        if len(pair) != 2 or not all(0 <= i < images for i in pair):
            raise ConfigError(f"pair {pair} is not a (content, style) pair of image indices in [0, {images})")
    return pairs


@torch.no_grad()
def fff(
    sd: SD15,
    inversion: Inversion,
    cfg: DictConfig,
    pairs: Sequence[tuple[int, int]] | None = None,
    diagnostics=None,
    *,
    progress: Progress | None = None,
    stats: dict | None = None,
) -> torch.Tensor:
    """Feature Fusion Forward (Sec. III-C): the stylized latents z_0^CS (P, 4, h, w), float32, one per pair.

    ``pairs``: (content, style) indices of the inversion's images, default [(0, 1)]; all pairs run as one batch (row
    i is pair i), each row with its own content and style features.  ``diagnostics``: a
    ``magicstyle.diagnostics.AttentionDiagnostics`` to fill (it does not change the result), or None.
    ``stats``, if given, is updated with ``generate_unet_calls`` and ``generate_unet_rows``.
    """
    timesteps = inversion.timesteps
    if ddim_timesteps(cfg.steps) != timesteps:
        raise ConfigError(f"this inversion has {len(timesteps)} steps; FFF must use the same number, not {cfg.steps}")
    pairs = check_pairs(pairs, len(inversion))
    layers = select_layers(sd.unet, cfg.ffa.layers)
    if missing := [p for p in layers if p not in inversion.layers]:
        raise ConfigError(f"the inversion recorded no features for {missing[0]}; run CSDI with these ffa.layers")
    used, recorded = ffa_timesteps(timesteps, cfg.ffa.timesteps), inversion.store.timesteps
    if recorded is not None and (missing := [i for i, t in enumerate(timesteps) if t in used and t not in recorded]):
        raise ConfigError(f"ffa.timesteps: the inversion recorded no features at steps {missing}; "
                          "run CSDI with these ffa.timesteps (or all)")
    model = CountedUNet(sd.unet, eager=diagnostics is not None)  # the observer is Python reading tensors
    # FFF's own view of the inversion's store: these pairs, these steps (the features are shared, not copied)
    store = replace(inversion.store, t=None, timesteps=used, pairs=pairs, cfg_rows=cfg.ffa.cfg_rows, observer=None,
                    buffers=model.store_buffers)
    if diagnostics is not None:
        store.observer = diagnostics.begin(layers, timesteps, pairs, size=inversion.z_T.shape[-1] * 8,
                                           recipe=cfg.ffa.recipe)
    content, style = (inversion.z_T[list(idx)] for idx in zip(*pairs))  # (P, 4, h, w) each
    z_T = adain(content, style, dim=(2, 3)) if cfg.ffa.adain_latents else content  # eq. 4: per channel, spatial axes
    cond, uncond = encode_text(sd, [cfg.generation.prompt, cfg.generation.negative_prompt], cfg.model.clip_layer).chunk(2)
    guided = cfg_eps_fn(with_reference_rows(model, store, inversion.context), cond, uncond, cfg.generation.guidance)

    def eps_fn(x: torch.Tensor, t: int) -> torch.Tensor:
        store.step(t)
        return guided(x, t)

    if progress:
        progress.begin("generate", len(timesteps))
    with recipes(sd.unet, layers, RECIPES[cfg.ffa.recipe](store, cfg)):
        z0 = ddim_sample(eps_fn, z_T, timesteps, callback=progress and (lambda s: progress.update(s["i"] + 1)))
    store.step(None)
    if stats is not None:
        stats.update(generate_unet_calls=model.calls, generate_unet_rows=model.rows)
    return z0


# ---------------------------------------------------------------------------------------------------------------------
# The whole job


def stylize(
    content: str | Path | Image.Image,
    style: str | Path | Image.Image,
    config: DictConfig | dict | str | Path | None = None,
    *,
    sd: SD15 | None = None,
    progress: Progress | None = None,
    stats: dict | None = None,
) -> Image.Image:
    """Paint ``content`` (a portrait) in the style of ``style``.  ``config``: a loaded config, overrides, or a YAML path.

    ``stats``, if given, receives ``seconds`` per phase, ``unet_evals`` (calls) and ``unet_rows``, and
    ``feature_store_bytes``.
    """
    if isinstance(config, DictConfig):
        cfg = config
    else:
        cfg = load_config(config) if config is None or isinstance(config, (str, Path)) else load_config(None, config)
    seconds: dict[str, float] = {}
    images = torch.cat([load_image(content, cfg.size), load_image(style, cfg.size)])  # (2, 3, size, size)
    face_pass = plan_small_face(content, cfg, stats) if cfg.face.refine else None  # Fig. 3; magicstyle/smallface.py
    if sd is None:
        start = time.perf_counter()
        sd = load_model(cfg)
        seconds["load"] = time.perf_counter() - start

    @contextmanager
    def phase(name: str, bar: bool = False) -> Iterator[None]:
        """Time a phase; ``bar``: a one-step progress bar (CSDI and FFF draw their own, per DDIM step).  Time spent
        compiling the UNet (``model.compile``) is also added up in ``seconds["compile"]``."""
        if progress and bar:
            progress.begin(name, 1)
        start, compiling = clock(sd), compile_seconds()
        yield
        seconds[name] = clock(sd) - start
        if compiled := compile_seconds() - compiling:
            seconds["compile"] = seconds.get("compile", 0.0) + compiled
        if progress and bar:
            progress.update(1)

    counts: dict[str, int] = {}
    with phase("encode", bar=True):
        z0 = encode_images(sd, images, cfg.seed if cfg.inversion.sample_posterior else None)
    with phase("invert"):
        inversion = csdi(sd, z0, cfg, progress=progress, stats=counts)
    with phase("generate"):
        z = fff(sd, inversion, cfg, progress=progress, stats=counts)
    with phase("decode", bar=True):
        result = to_image(decode_latents(sd, z))
    if stats is not None:
        stats.update(
            seconds=seconds,
            unet_evals=counts["invert_unet_calls"] + counts["generate_unet_calls"],
            unet_rows=counts["invert_unet_rows"] + counts["generate_unet_rows"],
            feature_store_bytes=inversion.store.nbytes,
        )
    if face_pass is not None:
        result = face_pass.apply(result, style, cfg, stylize=stylize, sd=sd, progress=progress)
    return result
