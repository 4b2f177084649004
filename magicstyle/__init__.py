"""MagicStyle (Deng et al.): portrait stylization from a reference image, CSDI + FFF on Stable Diffusion 1.5."""
__version__ = "0.1.0"

from .config import ConfigError, load_config  # noqa: E402
from .pipeline import Inversion, csdi, fff, inversion_key, load_model, stylize  # noqa: E402

__all__ = ["ConfigError", "Inversion", "__version__", "csdi", "fff", "inversion_key", "load_config", "load_model", "stylize"]
