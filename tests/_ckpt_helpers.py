"""Shared helpers of tests/test_models.py and tests/test_loader.py: the tiny fixture, its reference outputs, and
small functions that write modified copies of the tiny checkpoint (variants) into a temporary folder."""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Callable, Mapping

import torch
from safetensors.torch import load_file, save_file

from conftest import FIXTURES, TINY_HPARAMS, TINY_WEIGHTS
from models.loader import TEXT_PREFIX, UNET_PREFIX, load_sd15

TINY, HPARAMS = TINY_WEIGHTS, TINY_HPARAMS
REFS = FIXTURES / "sd15_tiny_random.refs.safetensors"
FULL_MANIFEST = FIXTURES / "sd15_checkpoint_keys.json"
TINY_MANIFEST = FIXTURES / "sd15_tiny_random.keys.json"

CONV_IN = UNET_PREFIX + "input_blocks.0.0.weight"
POSITION_IDS = TEXT_PREFIX + "text_model.embeddings.position_ids"  # where the fixture (and SD1.5) keeps them
SCHEDULE_BUFFERS = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod"}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b|, in float32."""
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max()).item()


@functools.lru_cache(maxsize=None)
def refs() -> dict[str, torch.Tensor]:
    return load_file(REFS)


@functools.lru_cache(maxsize=None)
def _tiny_state() -> dict[str, torch.Tensor]:
    return load_file(TINY)


def tiny_state() -> dict[str, torch.Tensor]:
    """A fresh dict of the tiny checkpoint's tensors (shared, read-only tensors: replace entries, never edit them)."""
    return dict(_tiny_state())


def manifest(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    return {k: (tuple(shape), dtype) for k, (shape, dtype) in json.loads(path.read_text()).items()}


def load_tiny(path: str | Path = TINY, **kwargs):
    return load_sd15(path, hparams=HPARAMS, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Writing variants


def write(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def variant(folder: Path, name: str, edit: Callable[[dict[str, torch.Tensor]], object]) -> Path:
    """The tiny checkpoint after ``edit(state)`` (which changes the dict in place), saved as ``folder/name``."""
    state = tiny_state()
    edit(state)
    return write(folder / name, state)


def with_prefix(state: Mapping[str, torch.Tensor], prefix: str, new_prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors under ``prefix``, re-prefixed with ``new_prefix``."""
    return {new_prefix + k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def drop(state: dict[str, torch.Tensor], prefix: str) -> None:
    for k in [k for k in state if k.startswith(prefix)]:
        del state[k]


def cast_floats(state: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    for k, v in state.items():
        if v.is_floating_point():
            state[k] = v.to(dtype)


def small_file(folder: Path, name: str, shapes: Mapping[str, tuple[int, ...]]) -> Path:
    """A small safetensors file with zero tensors of the given shapes (for the 'which model is this' checks)."""
    return write(folder / name, {k: torch.zeros(s, dtype=torch.float16) for k, s in shapes.items()})


# ---------------------------------------------------------------------------------------------------------------------
# Outputs compared between a loaded model and the reference


@torch.no_grad()
def text_out(sd, layer: str = "last") -> torch.Tensor:
    return sd.text_encoder(refs()["text.tokens"], layer=layer)


@torch.no_grad()
def unet_out(sd) -> torch.Tensor:
    r = refs()
    return sd.unet(r["unet.x16"], r["unet.t16"], r["text.hidden"])


@torch.no_grad()
def vae_out(sd) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, logvar, decoded) on a 32x32 crop of the reference image / a 4x4 crop of the reference latent."""
    r = refs()
    post = sd.vae.encode(r["vae.img"][..., :32, :32])
    return post.mean, post.logvar, sd.vae.decode(r["vae.z"][..., :4, :4])
