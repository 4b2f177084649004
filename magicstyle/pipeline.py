"""MagicStyle (Deng et al.), Sec. III: Content and Style DDIM Inversion (CSDI), then Feature Fusion Forward (FFF).

    z^C, z^S   = 0.18215 * E(I_C), 0.18215 * E(I_S)                     (VAE posterior means)
    CSDI:        DDIM-invert [z^C, z^S] in one batch, guidance 1; the ``record`` recipe keeps the content and style
                 inputs of the chosen self-attention layers per timestep (their Q/K/V, eq. 3).
    FFF:         z_T^CS = AdaIN(z_T^C, z_T^S)                            (eq. 4)
                 DDIM-sample z_T^CS with guidance 5; the ``ffa`` recipe replaces self-attention in the chosen layers
                 (Algorithm 1, eq. 5).
    result     = D(z_0^CS / 0.18215)

``csdi`` returns an ``Inversion`` that ``fff`` can use any number of times (a beta sweep inverts once).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import DictConfig
from PIL import Image

from attention import RECIPES, FeatureStore, Record, adain
from models import SD15, UNet, load_sd15, set_recipe
from models.conv import cpu_has_bf16, set_prepack
from sampling import cfg_eps_fn, ddim_invert, ddim_sample, ddim_timesteps

from .config import DTYPES, ROOT, ConfigError, load_config
from .images import open_rgb, square, to_image, to_rgb, to_tensor
from .progress import Progress

LATENT_SCALE = 0.18215  # SD1.x: latents are scaled to unit variance before diffusion


# ---------------------------------------------------------------------------------------------------------------------
# Model, device, dtype


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for, but no CUDA GPU is available; use --device cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device mps was asked for, but MPS is not available; use --device cpu or auto")
    return torch.device(name)


def resolve_dtypes(name: str, vae_name: str, device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """(UNet and text encoder dtype, VAE dtype).  ``auto``: bfloat16 on bf16-capable CPUs, float16 on CUDA/MPS."""
    if name == "auto":
        name = ("bfloat16" if cpu_has_bf16() else "float32") if device.type == "cpu" else "float16"
    dtype = DTYPES[name]
    if vae_name == "auto":  # fp16 SD VAEs overflow into black images: keep them in float32
        return dtype, torch.float32 if dtype == torch.float16 else dtype
    return dtype, DTYPES[vae_name]


def weights_path(value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() or path.exists() else ROOT / path


def load_model(cfg: DictConfig) -> SD15:
    device = resolve_device(cfg.model.device)
    dtype, vae_dtype = resolve_dtypes(cfg.model.dtype, cfg.model.vae_dtype, device)
    sd = load_sd15(
        weights_path(cfg.model.weights),
        device=device,
        dtype=dtype,
        vae_dtype=vae_dtype,
        vae=weights_path(cfg.model.vae) if cfg.model.vae else None,
        hparams=weights_path(cfg.model.hparams) if cfg.model.hparams else None,
    )
    for model in (sd.unet, sd.vae):
        set_prepack(model, cfg.model.prepack)
    return sd


# ---------------------------------------------------------------------------------------------------------------------
# Pieces


class CountedUNet:
    """The UNet as the samplers call it, counting calls and rows; returns float32 so guidance and DDIM stay in fp32."""

    def __init__(self, unet: UNet):
        self.unet, self.calls, self.rows = unet, 0, 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        self.calls, self.rows = self.calls + 1, self.rows + x.shape[0]
        return self.unet(x, t, context).float()


def with_reference_rows(model: CountedUNet, store: FeatureStore, context: torch.Tensor):
    """recompute mode: append the content and style latents of the current timestep to every UNet batch, as its last
    two rows with the inversion prompt, and drop their noise predictions (the store's ``mix`` reads their features)."""

    def run(x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        reference = store.reference_rows()
        if reference is None:
            return model(x, t, ctx)
        n = x.shape[0]
        x = torch.cat([x, reference.to(x.dtype)])
        t = torch.cat([t, t[:1].expand(2)])
        ctx = torch.cat([ctx, context.expand(2, -1, -1).to(ctx.dtype)])
        return model(x, t, ctx)[:n]

    return run


@contextmanager
def recipes(unet: UNet, paths: list[str], recipe) -> Iterator[None]:
    """Install ``recipe`` in the given self-attention layers for the duration of the block."""
    before = {path: unet.get_submodule(path).recipe for path in paths}
    try:
        for path in paths:
            set_recipe(unet, path, recipe)
        yield
    finally:
        for path, previous in before.items():
            set_recipe(unet, path, previous)


def select_layers(unet: UNet, spec: Any) -> list[str]:
    """``ffa.layers``: 'all', or path prefixes such as 'output_blocks.6' -> the attn1 paths they cover."""
    paths = [layer.path for layer in unet.self_attention_layers()]
    if spec == "all":
        return paths
    chosen = []
    for prefix in spec:
        hits = [p for p in paths if p == prefix or p.startswith(prefix + ".")]
        if not hits:
            raise ConfigError(f"ffa.layers: {prefix!r} holds no self-attention layer; layers are e.g. {paths[-1]}")
        chosen += [p for p in hits if p not in chosen]
    return chosen


def ffa_timesteps(timesteps: list[int], spec: Any) -> set[int]:
    """``ffa.timesteps``: 'all', or generation step indices (0 = first, noisiest) -> the DDIM timesteps."""
    return set(timesteps) if spec == "all" else {timesteps[i] for i in spec}


@torch.no_grad()
def encode_text(sd: SD15, prompts: list[str], layer: str = "last") -> torch.Tensor:
    """prompts -> (B, 77, D) in the UNet's dtype."""
    device = next(sd.text_encoder.parameters()).device
    return sd.text_encoder(sd.tokenizer(prompts).to(device), layer=layer)


@torch.no_grad()
def encode_images(sd: SD15, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> scaled latents (B, 4, H/8, W/8) float32: the posterior mean, or a sample."""
    device = next(sd.vae.parameters()).device
    posterior = sd.vae.encode(images.to(device))
    z = posterior.mean if generator is None else posterior.sample(generator)
    return LATENT_SCALE * z.float()


@torch.no_grad()
def decode_latents(sd: SD15, z: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> (B, 3, H, W) float32, not clamped."""
    return sd.vae.decode(z / LATENT_SCALE).float()


def load_image(image: str | Path | Image.Image, size: int) -> torch.Tensor:
    img = to_rgb(image) if isinstance(image, Image.Image) else open_rgb(image)
    return to_tensor(square(img, size))


# ---------------------------------------------------------------------------------------------------------------------
# CSDI and FFF


@dataclass
class Inversion:
    """The result of CSDI: keep it to run FFF again (other beta, prompt, recipe) without inverting again."""

    z_T: torch.Tensor  # (2, 4, h, w) float32: Z_T^C and Z_T^S
    timesteps: list[int]  # descending DDIM timesteps
    layers: list[str]  # the self-attention layers the store holds features for
    store: FeatureStore
    context: torch.Tensor  # (1, 77, D) embedding of the inversion prompt (recompute mode's reference rows use it)


@torch.no_grad()
def csdi(
    sd: SD15, z0: torch.Tensor, cfg: DictConfig, *, progress: Progress | None = None, stats: dict | None = None
) -> Inversion:
    """Content and Style DDIM Inversion (Sec. III-B) of z0 = [z^C, z^S] (2, 4, h, w), one batch, recording features.

    ``stats``, if given, is updated with ``invert_unet_calls`` and ``invert_unet_rows``.
    """
    timesteps = ddim_timesteps(cfg.steps)
    layers = select_layers(sd.unet, cfg.ffa.layers)
    store = FeatureStore(
        mode=cfg.store.mode, dtype=DTYPES[cfg.store.dtype], timesteps=ffa_timesteps(timesteps, cfg.ffa.timesteps)
    )
    context, uncond = encode_text(sd, [cfg.inversion.prompt, ""], cfg.model.clip_layer).chunk(2)
    model = CountedUNet(sd.unet)
    guided = cfg_eps_fn(model, context, uncond, cfg.inversion.guidance)

    def eps_fn(x: torch.Tensor, t: int) -> torch.Tensor:
        store.t = t
        store.record_latents(x)  # recompute mode only
        return guided(x, t)

    recording = layers if store.mode == "memory" else []
    if progress:
        progress.begin("invert", len(timesteps))
    with recipes(sd.unet, recording, Record(store)):
        z_T = ddim_invert(eps_fn, z0, timesteps, refine=cfg.inversion.refine,
                          callback=progress and (lambda s: progress.update(s["i"] + 1)))
    store.t = None
    if stats is not None:
        stats.update(invert_unet_calls=model.calls, invert_unet_rows=model.rows)
    return Inversion(z_T, timesteps, layers, store, context)


@torch.no_grad()
def fff(
    sd: SD15, inversion: Inversion, cfg: DictConfig, *, progress: Progress | None = None, stats: dict | None = None
) -> torch.Tensor:
    """Feature Fusion Forward (Sec. III-C): the stylized latent z_0^CS (1, 4, h, w), float32.

    ``stats``, if given, is updated with ``generate_unet_calls`` and ``generate_unet_rows``.
    """
    store, timesteps = inversion.store, inversion.timesteps
    if ddim_timesteps(cfg.steps) != timesteps:
        raise ConfigError(f"this inversion has {len(timesteps)} steps; FFF must use the same number, not {cfg.steps}")
    layers = select_layers(sd.unet, cfg.ffa.layers)
    if missing := [p for p in layers if p not in inversion.layers]:
        raise ConfigError(f"the inversion recorded no features for {missing[0]}; run CSDI with these ffa.layers")
    z_c, z_s = inversion.z_T.chunk(2)
    z_T = adain(z_c, z_s, dim=(2, 3)) if cfg.ffa.adain_latents else z_c  # eq. 4: per channel over the spatial axes
    cond, uncond = encode_text(sd, [cfg.generation.prompt, cfg.generation.negative_prompt], cfg.model.clip_layer).chunk(2)
    model = CountedUNet(sd.unet)
    guided = cfg_eps_fn(with_reference_rows(model, store, inversion.context), cond, uncond, cfg.generation.guidance)

    def eps_fn(x: torch.Tensor, t: int) -> torch.Tensor:
        store.t = t
        return guided(x, t)

    if progress:
        progress.begin("generate", len(timesteps))
    with recipes(sd.unet, layers, RECIPES[cfg.ffa.recipe](store, cfg)):
        z0 = ddim_sample(eps_fn, z_T, timesteps, callback=progress and (lambda s: progress.update(s["i"] + 1)))
    store.t = None
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
    if sd is None:
        start = time.perf_counter()
        sd = load_model(cfg)
        seconds["load"] = time.perf_counter() - start

    @contextmanager
    def phase(name: str, bar: bool = False) -> Iterator[None]:
        """Time a phase; ``bar``: a one-step progress bar (CSDI and FFF draw their own, per DDIM step)."""
        if progress and bar:
            progress.begin(name, 1)
        start = time.perf_counter()
        yield
        seconds[name] = time.perf_counter() - start
        if progress and bar:
            progress.update(1)

    counts: dict[str, int] = {}
    with phase("encode", bar=True):
        generator = torch.Generator().manual_seed(cfg.seed) if cfg.inversion.sample_posterior else None
        z0 = encode_images(sd, images, generator)
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
    return result
