"""DDIM sampling / inversion (pure functions over an eps_fn) and classifier-free guidance."""

from .ddim import alphas_cumprod, ddim_invert, ddim_pairs, ddim_sample, ddim_timesteps
from .guidance import cfg_eps_fn, timestep_batch

__all__ = [
    "alphas_cumprod",
    "ddim_timesteps",
    "ddim_pairs",
    "ddim_sample",
    "ddim_invert",
    "cfg_eps_fn",
    "timestep_batch",
]
