"""Classifier-free guidance (Ho & Salimans 2022) as an ``eps_fn`` for the DDIM functions.

    eps = eps(x, t, uncond) + scale * (eps(x, t, cond) - eps(x, t, uncond))
"""

import torch


def timestep_batch(t, x):
    """The int timestep ``t`` as a long tensor [B] on ``x``'s device (B = x.shape[0])."""
    return torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)


def _expand(context, batch):
    """Broadcast a context [1, 77, D] to [batch, 77, D]; a [batch, 77, D] one passes through."""
    if context.shape[0] == batch:
        return context
    if context.shape[0] != 1:
        raise ValueError(f"context batch {context.shape[0]} matches neither 1 nor {batch}")
    return context.expand(batch, *context.shape[1:])


def cfg_eps_fn(model, cond, uncond, scale):
    """Wrap a UNet-like ``model(x, t, context) -> eps`` into a guided ``eps_fn(x, t)``.

    Args:
        model: callable (x [N, C, H, W], t [N] long, context [N, 77, D]) -> eps [N, C, H, W].
        cond, uncond: text embeddings [1, 77, D] or [B, 77, D]; batch-1 ones are
            broadcast to the latent's batch B.
        scale: guidance scale s.
    Returns:
        eps_fn(x [B, C, H, W], t: int) -> uncond_eps + s * (cond_eps - uncond_eps).

    For s != 1 the model is called ONCE on the batch [2B] = cat([uncond, cond]).
    For s == 1 the formula reduces to the conditional prediction, so the
    unconditional branch is skipped entirely: one call on cond only (batch B),
    and ``uncond`` may be None. (The paper inverts with guidance 1.)
    """
    scale = float(scale)

    if scale == 1.0:
        def eps_fn(x, t):
            return model(x, timestep_batch(t, x), _expand(cond, x.shape[0]))
        return eps_fn

    if uncond is None:
        raise ValueError("uncond is required when scale != 1")

    def eps_fn(x, t):
        b = x.shape[0]
        x_in = torch.cat([x, x])                                             # [2B, C, H, W]
        context = torch.cat([_expand(uncond, b), _expand(cond, b)])          # [2B, 77, D]
        eps_uncond, eps_cond = model(x_in, timestep_batch(t, x_in), context).chunk(2)
        return eps_uncond + scale * (eps_cond - eps_uncond)

    return eps_fn
