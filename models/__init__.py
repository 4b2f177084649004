"""Hand-written Stable Diffusion 1.5: UNet, KL autoencoder, CLIP text encoder, tokenizer, the checkpoint loader, and
where checkpoint files come from (a path or a Hub reference, hub.py) and their cached SHA-256 (filehash.py)."""
from .clip import CLIPTextEncoder
from .config import SD15Config
from .errors import CheckpointError, MagicStyleError
from .loader import SD15, load_sd15
from .tokenizer import Tokenizer
from .unet import Attention, UNet, set_recipe
from .vae import AutoencoderKL, DiagonalGaussian

__all__ = [
    "AutoencoderKL", "Attention", "CLIPTextEncoder", "CheckpointError", "DiagonalGaussian", "MagicStyleError",
    "SD15", "SD15Config", "Tokenizer", "UNet", "load_sd15", "set_recipe",
]
