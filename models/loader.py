"""Load an SD1.5 single-file checkpoint (the CompVis/LDM layout) straight from safetensors.

Loading is: read the header (keys and shapes; ``models/safetensors_file.py`` checks it), refuse files that are not
SD1.5, strip each component's prefix, apply the few checkpoint quirks (each in one small function below), build the
modules on the ``meta`` device and ``load_state_dict(strict=True, assign=True)`` the tensors, cast to ``dtype``.  Any
problem raises ``CheckpointError`` with a message that names it.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from .clip import CLIPTextEncoder
from .config import SD15Config
from .errors import CheckpointError
from .safetensors_file import SafetensorsFile
from .tokenizer import Tokenizer
from .unet import UNet
from .upload import Upload
from .vae import AutoencoderKL

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."


@dataclass
class SD15:
    unet: UNet
    vae: AutoencoderKL
    text_encoder: CLIPTextEncoder
    tokenizer: Tokenizer
    config: SD15Config
    path: Path
    vae_path: Path | None = None


# ---------------------------------------------------------------------------------------------------------------------
# The file


# ---------------------------------------------------------------------------------------------------------------------
# Which model is this?


def check_is_sd15(shapes: Mapping[str, tuple], cfg: SD15Config, path: Path) -> None:
    """Name the model family when the file is not an SD1.x text-to-image checkpoint."""
    keys = shapes.keys()

    def refuse(what: str) -> None:
        raise CheckpointError(f"{path} is {what}, not an SD1.5 checkpoint; use an SD1.5 model such as RealisticVisionV6")

    if any(k.startswith("conditioner.embedders.") for k in keys) or UNET_PREFIX + "label_emb.0.0.weight" in shapes:
        refuse("an SDXL checkpoint")
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        refuse("an SD2.x checkpoint (OpenCLIP ViT-H text encoder)")
    ctx = shapes.get(UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    if ctx is not None and ctx[1] != cfg.context_dim:
        refuse(f"a model with {ctx[1]}-wide text conditioning (SD2.x?)")
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in[1] != cfg.in_channels:
        refuse("an inpainting checkpoint (9-channel UNet input)" if conv_in[1] == 9 else f"a {conv_in[1]}-channel UNet")
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        if any(k.startswith(("down_blocks.", "unet.", "text_model.", "encoder.down_blocks.")) for k in keys):
            refuse("a diffusers-format model part")
        if any(k.startswith(("encoder.", "decoder.", VAE_PREFIX)) for k in keys):
            refuse("a VAE file (pass it with vae= / --vae)")
        refuse("not a Stable Diffusion file (no model.diffusion_model.* tensors; a LoRA or an embedding?)")


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoint quirks, one function each.  Each maps {checkpoint key: key of our module} for one component.


def is_extra(key: str) -> bool:
    """Tensors real checkpoints carry beside the weights, which we ignore.

    Schedule buffers (``betas``, ``alphas_cumprod``, ... : top-level names without a dot), the ``model_ema.*`` copy
    (the non-EMA weights under ``model.diffusion_model.`` are used), CLIP's ``position_ids`` (merges store them as
    floats; positions are computed with arange), and the training loss of standalone VAE files (``loss.*``).
    """
    return "." not in key or key.startswith(("model_ema.", "loss.")) or key.endswith("position_ids")


def text_encoder_key(key: str) -> str:
    """transformers >= 4.19 nests the CLIP text model under ``text_model.``; older checkpoints do not."""
    return key.removeprefix("text_model.")


def vae_attention_as_conv(key: str, tensor: torch.Tensor) -> torch.Tensor:
    """VAEs converted from diffusers store the mid-block attention q/k/v/proj_out as linear (C, C) weights."""
    if ".attn_1." in key and key.endswith(".weight") and tensor.dim() == 2:
        return tensor[:, :, None, None]
    return tensor


# ---------------------------------------------------------------------------------------------------------------------


def component_keys(shapes: Mapping[str, tuple], prefix: str, rename: Callable[[str], str] = str) -> dict[str, str]:
    """{module key: checkpoint key} of the tensors under ``prefix``, extras left out."""
    return {rename(k[len(prefix):]): k for k in shapes if k.startswith(prefix) and not is_extra(k)}


@contextmanager
def without_init() -> Iterator[None]:
    """Build modules without running ``torch.nn.init``: the checkpoint's tensors replace the values anyway, and an
    initialiser on the meta device runs PyTorch's Python reference kernels, which import TorchDynamo: 1-3 s of a
    one-shot run's start, for nothing."""
    names = [n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")]  # normal_, kaiming_uniform_, ...
    saved = {n: getattr(nn.init, n) for n in names}
    for n in names:
        setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def load_component(
    module_factory: Callable[[], nn.Module],
    file: SafetensorsFile,
    keys: dict[str, str],
    name: str,
    *,
    prefix: str = "",
    device: torch.device | str,
    dtype: torch.dtype,
    fix: Callable[[str, torch.Tensor], torch.Tensor] = lambda key, t: t,
) -> nn.Module:
    """Build ``module_factory()`` without memory, check its keys and shapes against ``keys``, load strictly.

    ``prefix`` is only used to name missing tensors by their full checkpoint key.
    """
    with torch.device("meta"), without_init():
        module = module_factory()
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(set(expected) - set(keys))
    unexpected = sorted(set(keys) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{file.path}: the {name} does not match SD1.5 ({_listing('missing', [prefix + k for k in missing])}"
            f"{'; ' if missing and unexpected else ''}{_listing('unexpected', [keys[k] for k in unexpected])})"
        )
    state, upload = {}, Upload(device)  # to a GPU: through pinned memory, copied asynchronously
    for key, ckpt_key in keys.items():
        tensor = fix(key, upload.read(file, ckpt_key))
        if tuple(tensor.shape) != expected[key]:
            raise CheckpointError(
                f"{file.path}: tensor {ckpt_key} has shape {tuple(tensor.shape)}, the {name} expects {expected[key]}"
                " (wrong model, or wrong hparams)"
            )
        state[key] = upload.to_device(tensor, dtype)
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def _listing(kind: str, names: list[str]) -> str:
    if not names:
        return ""
    shown = ", ".join(names[:5])
    return f"{len(names)} {kind} tensor(s): {shown}{', ...' if len(names) > 5 else ''}"


def load_sd15(
    path: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    vae: str | Path | None = None,
    hparams: SD15Config | Mapping[str, Any] | str | Path | None = None,
    vae_dtype: torch.dtype | None = None,
) -> SD15:
    """Load UNet, VAE and text encoder of an SD1.5 single-file ``.safetensors`` checkpoint.

    ``vae``: a separate VAE file (keys with or without ``first_stage_model.``), used instead of the baked one.
    ``hparams``: overrides of the SD1.5 hyper-parameters (mapping, ``SD15Config`` or YAML/JSON path).
    ``vae_dtype``: the VAE's dtype when it differs from ``dtype`` (fp16 SD VAEs overflow: run them in float32).
    """
    cfg = SD15Config.from_overrides(hparams)
    ckpt = SafetensorsFile(path)
    check_is_sd15(ckpt.shapes, cfg, ckpt.path)

    vae_file, vae_keys = ckpt, component_keys(ckpt.shapes, VAE_PREFIX)
    if vae is not None:
        vae_file = SafetensorsFile(vae, what="VAE")
        vae_keys = component_keys(vae_file.shapes, VAE_PREFIX) or component_keys(vae_file.shapes, "")
        if not any(k.startswith("decoder.") for k in vae_keys):
            raise CheckpointError(f"VAE {vae_file.path} holds no LDM-layout VAE (encoder.*/decoder.* tensors)")
    elif not vae_keys:
        raise CheckpointError(
            f"{ckpt.path} has no VAE weights (first_stage_model.*); pass a VAE file with vae= (CLI: --vae), "
            "e.g. vae-ft-mse-840000-ema-pruned.safetensors"
        )

    common = dict(device=device, dtype=dtype)
    unet_keys = component_keys(ckpt.shapes, UNET_PREFIX)
    unet = load_component(lambda: UNet(cfg), ckpt, unet_keys, "UNet", prefix=UNET_PREFIX, **common)
    text_keys = component_keys(ckpt.shapes, TEXT_PREFIX, rename=text_encoder_key)
    nested = any(k.startswith(TEXT_PREFIX + "text_model.") for k in text_keys.values())
    text_prefix = TEXT_PREFIX + ("text_model." if nested else "")
    text_encoder = load_component(lambda: CLIPTextEncoder(cfg), ckpt, text_keys, "text encoder", prefix=text_prefix,
                                  **common)
    vae_prefix = VAE_PREFIX if any(k.startswith(VAE_PREFIX) for k in vae_file.shapes) else ""
    autoencoder = load_component(
        lambda: AutoencoderKL(cfg), vae_file, vae_keys, "VAE", prefix=vae_prefix,
        device=device, dtype=vae_dtype or dtype, fix=vae_attention_as_conv,
    )
    return SD15(unet, autoencoder, text_encoder, Tokenizer(cfg.clip_positions), cfg, ckpt.path,
                vae_file.path if vae is not None else None)
