"""Content and Style DDIM Inversion (paper Sec. III-B) of N >= 1 images, and the pieces CSDI and FFF share.

``csdi`` inverts any number of images in one batch and keeps, per image, what FFF needs: z_T and the features of the
chosen self-attention layers per step (``store.mode=memory``) or the latent each step saw (``recompute``).  An
``Inversion`` can be cut (``select``) and merged (``Inversion.cat``), so that each image is inverted once however many
pairs use it; ``inversion_key`` names what an inversion depends on, to reuse one in memory or on disk.
"""
from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from attention import FeatureStore, Record
from models import SD15, UNet, set_recipe
from sampling import cfg_eps_fn, ddim_invert, ddim_timesteps

from .compiled import runner
from .config import DTYPES, ConfigError
from models.filehash import file_sha256
from models.hub import file_name, is_hub_ref, model_refs, parse_ref
from .model import dtype_names, encode_text
from .progress import Progress


class CountedUNet:
    """The UNet as the samplers call it, counting calls and rows; returns float32 so guidance and DDIM stay in fp32.

    It runs the UNet's compiled runner when ``model.compile`` attached one (magicstyle/compiled.py), unless ``eager``.
    """

    def __init__(self, unet: UNet, *, eager: bool = False):
        self.unet, self.calls, self.rows = unet, 0, 0
        self.run = runner(unet, eager=eager)
        self.store_buffers = getattr(self.run, "store_buffers", None)  # a compiled runner's (FeatureStore.buffers)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        self.calls, self.rows = self.calls + 1, self.rows + x.shape[0]
        return self.run(x, t, context).float()


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


@dataclass
class Inversion:
    """The result of CSDI: keep it to run FFF again (other pairs, beta, prompt, recipe) without inverting again."""

    z_T: torch.Tensor  # (N, 4, h, w) float32: Z_T of each image
    timesteps: list[int]  # descending DDIM timesteps
    layers: list[str]  # the self-attention layers FFF can run a recipe in
    store: FeatureStore  # per-image features (memory) or latents (recompute)
    context: torch.Tensor  # (1, 77, D) embedding of the inversion prompt (recompute mode's reference rows use it)

    def __len__(self) -> int:
        return self.z_T.shape[0]

    def select(self, indices: Sequence[int]) -> Inversion:
        """The inversion of the images ``indices`` only, in that order (the same feature tensors, nothing copied)."""
        indices = list(indices)
        if not indices or any(not 0 <= i < len(self) for i in indices):
            raise IndexError(f"image indices must lie in [0, {len(self)}), not {indices}")
        return Inversion(self.z_T[indices], self.timesteps, self.layers, self.store.select(indices), self.context)

    @classmethod
    def cat(cls, inversions: Sequence[Inversion]) -> Inversion:
        """The images of ``inversions`` one after the other, e.g. to run pairs across images inverted separately (the
        same feature tensors, nothing copied)."""
        first = inversions[0]
        for other in inversions[1:]:
            same = (other.timesteps, other.layers, other.store.mode, other.store.dtype, other.store.timesteps) == (
                first.timesteps, first.layers, first.store.mode, first.store.dtype, first.store.timesteps)
            if not same or not same_prompt(other.context, first.context):
                raise ConfigError("inversions made with other steps, layers, store or inversion prompt cannot be "
                                  "merged; invert the images with one configuration")
        return cls(torch.cat([i.z_T for i in inversions]), first.timesteps, first.layers,
                   FeatureStore.cat([i.store for i in inversions]), first.context)


def same_prompt(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two inversion contexts encode the same prompt.  Not bit for bit: a cache entry made on another machine
    (another GPU, another cuBLAS) carries the same prompt's embedding to within rounding."""
    return a.shape == b.shape and torch.allclose(a.float(), b.to(a.device).float(), rtol=1e-2, atol=1e-2)


# The config keys CSDI's result depends on (from the image file to the Inversion).  ffa.layers and ffa.timesteps only
# matter in memory mode: recompute mode keeps every step's latent, which serves any layer.
_INVERSION_KEYS = ("size", "steps", "model.dtype", "model.vae_dtype", "model.clip_layer", "inversion.prompt",
                   "inversion.guidance", "inversion.refine", "inversion.sample_posterior", "store.mode")
_MEMORY_KEYS = ("store.dtype", "ffa.layers", "ffa.timesteps")


def inversion_key(cfg: DictConfig, files: Mapping[str, str | Path] | None = None) -> str:
    """A stable digest (20 hex digits) of every config value that changes CSDI's result for a given image file.

    The model files count by what they hold where that is known, never by path (machines sharing a cache folder
    agree): ``files``, the run's resolved checkpoint and VAE (``models.hub.fetch_all``), by their SHA-256 (hashed
    once per file, then cached: the CLI hashes the checkpoint for its PNGs anyway).  Otherwise, and for the
    hyper-parameter file, a local file by name and size and an ``hf:`` reference by name and revision (not fetched for
    this).  The dtypes count as ``auto`` resolves them here (``dtype_names``), so the device counts only through
    them; the CPU paths (``model.prepack``, ``attention``, ``cpu_compute``) do not count (they change rounding, not
    the method).  Add the image's own content hash to key a single image.
    """
    values: dict[str, Any] = {"format": "magicstyle-inversion/1"}
    keys = _INVERSION_KEYS + (_MEMORY_KEYS if cfg.store.mode == "memory" else ())
    for key in keys:
        value = OmegaConf.select(cfg, key)
        values[key] = OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value
    values.update(dtype_names(cfg))  # auto as resolved here: a cache shared by a GPU and a CPU keeps them apart
    if cfg.inversion.sample_posterior:
        values["seed"] = cfg.seed
    for key, ref in {**model_refs(cfg), "model.hparams": cfg.model.hparams}.items():
        if files and key in files:
            values[key] = ["sha256", file_sha256(files[key])]
        elif ref:
            values[key] = _file_identity(ref)
    text = json.dumps(values, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _file_identity(ref: str) -> list:
    """[name, size] of a local file; [name, revision] of an ``hf:`` reference (which is not fetched for this)."""
    if is_hub_ref(ref):
        return [file_name(ref), parse_ref(ref).revision]
    path = Path(ref).expanduser()
    return [path.name, path.stat().st_size if path.is_file() else None]


@torch.no_grad()
def csdi(
    sd: SD15, z0: torch.Tensor, cfg: DictConfig, *, progress: Progress | None = None, stats: dict | None = None
) -> Inversion:
    """Content and Style DDIM Inversion (Sec. III-B) of the images z0 (N, 4, h, w), one batch, recording features.

    Image i of z0 is image i of the result: FFF's ``pairs`` refer to these indices.  ``stats``, if given, is updated
    with ``invert_unet_calls`` and ``invert_unet_rows``.
    """
    timesteps = ddim_timesteps(cfg.steps)
    memory = cfg.store.mode == "memory"
    all_layers = select_layers(sd.unet, "all")
    layers = select_layers(sd.unet, cfg.ffa.layers) if memory else all_layers
    store = FeatureStore(
        mode=cfg.store.mode, dtype=DTYPES[cfg.store.dtype], images=z0.shape[0], pairs=[],  # recording: no pairs
        timesteps=ffa_timesteps(timesteps, cfg.ffa.timesteps) if memory else set(timesteps),
    )
    context, uncond = encode_text(sd, [cfg.inversion.prompt, ""], cfg.model.clip_layer).chunk(2)
    model = CountedUNet(sd.unet)
    guided = cfg_eps_fn(model, context, uncond, cfg.inversion.guidance)

    def eps_fn(x: torch.Tensor, t: int) -> torch.Tensor:
        store.step(t)
        store.record_latents(x)  # recompute mode only
        return guided(x, t)

    if progress:
        progress.begin("invert", len(timesteps))
    with recipes(sd.unet, layers if memory else [], Record(store)):
        z_T = ddim_invert(eps_fn, z0, timesteps, refine=cfg.inversion.refine,
                          callback=progress and (lambda s: progress.update(s["i"] + 1)))
    store.step(None)
    if stats is not None:
        stats.update(invert_unet_calls=model.calls, invert_unet_rows=model.rows)
    return Inversion(z_T, timesteps, layers, store, context)
