"""Deterministic DDIM sampling and inversion as pure functions.

Reference: J. Song, C. Meng, S. Ermon, "Denoising Diffusion Implicit Models",
ICLR 2021 (arXiv:2010.02502), eq. (12) with eta = 0 (sigma_t = 0).

Notation follows the paper: ``a_t`` is alpha-bar_t (the cumulative product of
(1 - beta)), so that the forward process is

    x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps,    eps ~ N(0, I).

A model is any callable ``eps_fn(x, t) -> eps`` that predicts the noise of the
latent ``x`` [B, C, H, W] at the integer timestep ``t`` (a python int); the
caller's wrapper turns ``t`` into a tensor and casts ``x`` to the model's dtype.

Conventions shared by :func:`ddim_sample` and :func:`ddim_invert`:

* The latent is carried in float32 whatever the model's dtype; the output of
  ``eps_fn`` is cast to float32 before the update, and float32 is returned.
* alpha-bar values are python floats taken from a float64 table on the CPU,
  so nothing here depends on, or synchronises with, the latent's device.
* Nothing here is random.
* ``callback``, if given, is called once per step with a dict
  ``{"i": step index (0-based, in the order the function walks),
     "t": the timestep the model was evaluated at,
     "x": the latent after the step,
     "x0": the predicted (denoised) x_0 used in the step}``.
"""

import math
import numbers

import torch

NUM_TRAIN_TIMESTEPS = 1000  # SD1.5 scheduler config
BETA_START = 0.00085
BETA_END = 0.012


def alphas_cumprod(dtype=torch.float64):
    """SD1.5's alpha-bar table, shape [1000].

    "scaled_linear" betas: linear in sqrt(beta) from sqrt(0.00085) to
    sqrt(0.012); alpha-bar_t = prod_{s <= t} (1 - beta_s). Computed in float64
    on the CPU and returned in ``dtype``.
    """
    betas = torch.linspace(math.sqrt(BETA_START), math.sqrt(BETA_END),
                           NUM_TRAIN_TIMESTEPS, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(dtype)


def ddim_timesteps(num_steps):
    """Descending DDIM timesteps with SD1.5's "leading" spacing, steps_offset 1.

    ratio = 1000 // num_steps;  ts = [0, 1, ..., num_steps - 1] * ratio + 1,
    reversed. E.g. 5 steps -> [801, 601, 401, 201, 1]; 30 steps -> [958, ..., 1].
    num_steps must lie in [1, 999] (ValueError otherwise).

    The step after the last timestep goes to alpha-bar[0] (the table's first
    entry, 1 - 0.00085), not to 1: SD1.5's scheduler config sets
    ``set_alpha_to_one=False``. See :func:`ddim_pairs`.
    """
    # 1000 steps would give ratio 1 and a first timestep of 1000, outside the
    # table [0, 999]; every num_steps up to 999 stays inside it.
    if not isinstance(num_steps, numbers.Integral) or not 1 <= num_steps < NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"num_steps must be an int in [1, {NUM_TRAIN_TIMESTEPS - 1}], "
                         f"got {num_steps!r}")
    ratio = NUM_TRAIN_TIMESTEPS // num_steps
    return [i * ratio + 1 for i in reversed(range(int(num_steps)))]


def ddim_pairs(timesteps):
    """The table of steps shared by the sampler and the inverter.

    For descending ``timesteps`` [t_0 > t_1 > ... > t_{n-1}] returns a list of
    n tuples ``(t_i, a_t, a_prev)`` with a_t = alpha-bar[t_i] and
    a_prev = alpha-bar[t_{i+1}], and for the last step a_prev = alpha-bar[0].

    The sampler walks this list forwards (a_t -> a_prev, eps evaluated at t_i);
    the inverter walks it backwards (a_prev -> a_t, eps evaluated at t_i).
    """
    ts = [int(t) for t in timesteps]
    if not ts:
        raise ValueError("timesteps is empty")
    if any(not 0 <= t < NUM_TRAIN_TIMESTEPS for t in ts):
        raise ValueError(f"timesteps must lie in [0, {NUM_TRAIN_TIMESTEPS}), got {ts}")
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"timesteps must be strictly descending, got {ts}")
    ac = alphas_cumprod(torch.float64).tolist()
    prev = ts[1:] + [0]  # set_alpha_to_one=False: the final step lands on alpha-bar[0]
    return [(t, ac[t], ac[p]) for t, p in zip(ts, prev)]


def _ddim_step(x, eps, a_from, a_to):
    """One deterministic DDIM move of x from level a_from to a_to (eq. 12, eta = 0).

        x0_pred = (x - sqrt(1 - a_from) eps) / sqrt(a_from)            # "predicted x_0"
        x_to    = sqrt(a_to) x0_pred + sqrt(1 - a_to) eps               # "direction to x_t"

    Returns (x_to, x0_pred). Used downwards by the sampler, upwards by the inverter.
    """
    x0_pred = (x - math.sqrt(1.0 - a_from) * eps) / math.sqrt(a_from)
    x_to = math.sqrt(a_to) * x0_pred + math.sqrt(1.0 - a_to) * eps
    return x_to, x0_pred


@torch.no_grad()
def ddim_sample(eps_fn, x_T, timesteps, *, callback=None):
    """Deterministic DDIM sampler (Song et al. 2020, eq. 12 with eta = 0).

    For each (t, a_t, a_prev) of :func:`ddim_pairs` (descending t):

        eps    = eps_fn(x_t, t)
        x0     = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
        x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps

    Args:
        eps_fn: callable (x [B, C, H, W] float32, t: int) -> eps [B, C, H, W].
        x_T: starting latent [B, C, H, W] at level alpha-bar[timesteps[0]].
        timesteps: strictly descending ints, e.g. ``ddim_timesteps(30)``.
        callback: optional, called with {"i", "t", "x", "x0"} after each step.
    Returns:
        x_0 [B, C, H, W], float32 (at level alpha-bar[0], see :func:`ddim_pairs`).
    """
    x = x_T.float()
    for i, (t, a_t, a_prev) in enumerate(ddim_pairs(timesteps)):
        eps = eps_fn(x, t).float()
        x, x0 = _ddim_step(x, eps, a_t, a_prev)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0})
    return x


@torch.no_grad()
def ddim_invert(eps_fn, x_0, timesteps, *, refine=0, callback=None):
    """DDIM inversion: run the eta = 0 update of eq. 12 backwards, x_0 -> x_T.

    Walks the pairs of :func:`ddim_pairs` in reverse (ascending t). The exact
    inverse of a sampler step a_t -> a_prev solves, for x_t, the implicit equation

        x_t = sqrt(a_t) (x_prev - sqrt(1 - a_prev) e) / sqrt(a_prev) + sqrt(1 - a_t) e,
        e   = eps_fn(x_t, t).

    The standard approximation (refine=0; the paper's setting, as in
    null-text inversion and diffusers' DDIMInverseScheduler) replaces the
    unknown x_t in e by the current latent: e = eps_fn(x_prev, t). Its error is
    first order in the step size.

    ``refine=k`` adds k fixed-point iterations per step, e = eps_fn(x_t_est, t)
    followed by recomputing x_t_est (cf. Pan et al. 2023, "Effective real image
    editing with accelerated iterative diffusion inversion"; Garibi et al.
    2024, "ReNoise"). When the iteration converges, inversion is the exact
    inverse of :func:`ddim_sample` for the same eps_fn. Each refinement costs
    one extra eps_fn call per step.

    Args:
        eps_fn: callable (x [B, C, H, W] float32, t: int) -> eps [B, C, H, W].
        x_0: clean latent [B, C, H, W], treated as living at level alpha-bar[0].
        timesteps: the same strictly descending ints the sampler gets.
        refine: number of fixed-point iterations per step, >= 0.
        callback: optional, called with {"i", "t", "x", "x0"} after each step;
            i counts the inverter's own steps (0 is the lowest timestep).
    Returns:
        x_T [B, C, H, W], float32, at level alpha-bar[timesteps[0]].
    """
    if not isinstance(refine, numbers.Integral) or refine < 0:
        raise ValueError(f"refine must be a non-negative int, got {refine!r}")
    x = x_0.float()
    for i, (t, a_t, a_prev) in enumerate(reversed(ddim_pairs(timesteps))):
        eps = eps_fn(x, t).float()                       # eps at the current (lower) level
        x_next, x0 = _ddim_step(x, eps, a_prev, a_t)
        for _ in range(refine):                          # fixed point x_next = F(x, eps(x_next))
            eps = eps_fn(x_next, t).float()
            x_next, x0 = _ddim_step(x, eps, a_prev, a_t)
        x = x_next
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0})
    return x
