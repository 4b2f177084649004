"""The model side of the pipeline: device and dtype, loading SD1.5, and the VAE and text encoder as the pipeline
uses them (images <-> scaled latents, prompts -> embeddings)."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from PIL import Image

from models import SD15, DiagonalGaussian, load_sd15
from attention.core import set_cpu_attention
from models.layers import cpu_has_bf16, set_prepack
from models.cpu_tuning import fast_paths

from .compiled import compile_unet, use_compile
from .config import DTYPES, ConfigError
from models.hub import fetch_all
from .images import open_rgb, square, to_rgb, to_tensor

LATENT_SCALE = 0.18215  # SD1.x: latents are scaled to unit variance before diffusion


def resolve_device(name: str, *, mps: bool = True) -> torch.device:
    """``auto``: CUDA, else MPS (unless ``mps`` is False), else the CPU; a device asked for that is not there is a
    one-line ``ConfigError``."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps and torch.backends.mps.is_available():
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


def dtype_names(cfg: DictConfig) -> dict[str, str]:
    """``model.dtype`` and ``model.vae_dtype`` as this machine resolves them (``auto`` depends on the device and CPU):
    what resume compares and what keys an inversion, so that ``auto`` on a GPU and ``auto`` on a CPU never match.
    Empty where ``model.device`` names a device this machine lacks (nothing runs here then; the config's text
    stands)."""
    try:
        device = resolve_device(cfg.model.device)
    except ConfigError:
        return {}
    dtypes = resolve_dtypes(cfg.model.dtype, cfg.model.vae_dtype, device)
    return {key: str(dtype).removeprefix("torch.") for key, dtype in zip(("model.dtype", "model.vae_dtype"), dtypes)}


def load_model(cfg: DictConfig, jobs: int = 1) -> SD15:
    """The SD1.5 of ``cfg.model``: weights and VAE are paths or ``hf:`` references (fetched if not cached).  ``jobs``:
    how many pairs the model is loaded for (``model.compile: auto`` compiles only for many, magicstyle/compiled.py)."""
    device = resolve_device(cfg.model.device)
    dtype, vae_dtype = resolve_dtypes(cfg.model.dtype, cfg.model.vae_dtype, device)  # as dtype_names says
    files = fetch_all(cfg)
    sd = load_sd15(
        files["model.weights"],
        device=device,
        dtype=dtype,
        vae_dtype=vae_dtype,
        vae=files.get("model.vae"),
        hparams=Path(cfg.model.hparams).expanduser() if cfg.model.hparams else None,
    )
    # model.prepack / attention / cpu_compute: auto is timed once per CPU model and dtype, cached (models/cpu_tuning.py)
    paths, vae_paths = (fast_paths(cfg.model.prepack, cfg.model.attention, d, device, compute=cfg.model.cpu_compute)
                        for d in (dtype, vae_dtype))
    sd.unet.compute_dtype, sd.vae.compute_dtype = paths.compute, vae_paths.compute
    set_prepack(sd.unet, paths.prepack)
    set_prepack(sd.vae, vae_paths.prepack)
    set_cpu_attention(paths.attention)
    if use_compile(cfg.model.compile, device, jobs):
        compile_unet(sd.unet)  # compiles lazily, at the first call of each shape
    return sd


def device_of(sd: SD15) -> torch.device:
    """Where the model's UNet is (the CPU for a stand-in without one, as some tests use)."""
    unet = getattr(sd, "unet", None)
    return next(unet.parameters()).device if unet is not None else torch.device("cpu")


def clock(sd: SD15) -> float:
    """``time.perf_counter()`` once the model's queued GPU work is done, so that a phase's seconds are its own (a CUDA
    call returns before its kernels have run); on a CPU, the clock alone."""
    device = device_of(sd)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.no_grad()
def encode_text(sd: SD15, prompts: list[str], layer: str = "last") -> torch.Tensor:
    """prompts -> (B, 77, D) in the UNet's dtype."""
    device = next(sd.text_encoder.parameters()).device
    return sd.text_encoder(sd.tokenizer(prompts).to(device), layer=layer)


@torch.no_grad()
def encode_images(sd: SD15, images: torch.Tensor, seed: int | None = None) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> scaled latents (B, 4, H/8, W/8) float32: the posterior mean, or with ``seed``
    (``inversion.sample_posterior``) a sample whose noise is drawn for each image from ``seed`` alone, so that an
    image's latent does not depend on the batch it is encoded in (one pair, a sweep, the demo, the cache agree)."""
    device = next(sd.vae.parameters()).device
    posterior = sd.vae.encode(images.to(device))
    if seed is None:
        return LATENT_SCALE * posterior.mean.float()
    z = [DiagonalGaussian(mean[None], logvar[None]).sample(torch.Generator().manual_seed(seed))
         for mean, logvar in zip(posterior.mean, posterior.logvar)]
    return LATENT_SCALE * torch.cat(z).float()


@torch.no_grad()
def decode_latents(sd: SD15, z: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> (B, 3, H, W) float32, not clamped.  A float16 VAE that overflows (SD1.5's can, at 512 px and
    above: hence ``model.vae_dtype: auto`` keeps it in float32 on a GPU) is an error, not a black image."""
    images = sd.vae.decode(z / LATENT_SCALE).float()
    if next(sd.vae.parameters()).dtype == torch.float16 and not torch.isfinite(images).all():
        raise ConfigError("the VAE decoded infinite or NaN values in float16 (SD1.5's VAE overflows there); "
                          "use model.vae_dtype=float32 (or auto)")
    return images


def load_image(image: str | Path | Image.Image, size: int) -> torch.Tensor:
    img = to_rgb(image) if isinstance(image, Image.Image) else open_rgb(image)
    return to_tensor(square(img, size))
