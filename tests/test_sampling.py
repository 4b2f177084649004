"""Tests for sampling/: SD1.5 schedule, DDIM timesteps, sampler/inverter, guidance."""

import math

import pytest
import torch

from sampling import (alphas_cumprod, cfg_eps_fn, ddim_invert, ddim_pairs, ddim_sample,
                      ddim_timesteps)

S = 0.5  # std of the toy data distribution N(0, S^2 I)


def gaussian_eps_fn(s=S):
    """Exact noise predictor for data x_0 ~ N(0, s^2 I):
    x_t = sqrt(a) x_0 + sqrt(1-a) eps  =>  E[eps | x_t] = sqrt(1-a) x_t / (a s^2 + 1 - a)."""
    ac = alphas_cumprod().tolist()

    def eps_fn(x, t):
        a = ac[t]
        return math.sqrt(1 - a) * x / (a * s * s + 1 - a)

    return eps_fn


def gaussian_x0(shape=(4, 4, 16, 16), seed=0):
    return S * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def round_trip(num_steps, refine):
    eps_fn, x0, ts = gaussian_eps_fn(), gaussian_x0(), ddim_timesteps(num_steps)
    return rel_err(ddim_sample(eps_fn, ddim_invert(eps_fn, x0, ts, refine=refine), ts), x0)


# ---------------------------------------------------------------- schedule


def hand_alphas_cumprod(indices):
    """alpha-bar by a plain python product loop over scaled_linear betas."""
    lo, hi, n = math.sqrt(0.00085), math.sqrt(0.012), 1000
    out, prod = {}, 1.0
    for i in range(max(indices) + 1):
        beta = (lo + (hi - lo) * i / (n - 1)) ** 2
        prod *= 1.0 - beta
        if i in indices:
            out[i] = prod
    return out


def test_alphas_cumprod_values():
    ac = alphas_cumprod()
    assert ac.dtype == torch.float64 and ac.shape == (1000,)
    assert ac[0].item() == 1 - 0.00085
    for i, v in hand_alphas_cumprod({0, 1, 250, 500, 958, 999}).items():
        assert ac[i].item() == pytest.approx(v, rel=1e-12)
    assert ac[999].item() == pytest.approx(0.0046601, rel=1e-4)
    assert bool((ac[1:] < ac[:-1]).all())
    assert alphas_cumprod(torch.float32).dtype == torch.float32


# ---------------------------------------------------------------- timesteps


def test_ddim_timesteps():
    assert ddim_timesteps(5) == [801, 601, 401, 201, 1]
    for n, first, gap in [(30, 958, 33), (50, 981, 20)]:
        ts = ddim_timesteps(n)
        assert len(ts) == n and ts[0] == first and ts[-1] == 1
        assert all(a - b == gap for a, b in zip(ts, ts[1:]))
    assert ddim_timesteps(1) == [1]
    assert ddim_timesteps(999) == list(range(999, 0, -1))
    assert ddim_timesteps(500)[0] == 999


@pytest.mark.parametrize("bad", [0, -1, 1000, 1001, 2.5])
def test_ddim_timesteps_rejects(bad):
    with pytest.raises(ValueError):
        ddim_timesteps(bad)


def test_pairs_end_at_alpha_bar_0():
    ac = alphas_cumprod().tolist()
    pairs = ddim_pairs([801, 601, 1])
    assert pairs == [(801, ac[801], ac[601]), (601, ac[601], ac[1]), (1, ac[1], ac[0])]
    with pytest.raises(ValueError):
        ddim_pairs([1, 801])  # not descending


# ---------------------------------------------------------------- sampler / inverter


def test_sample_matches_eq12_by_hand():
    ac = alphas_cumprod().tolist()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    eps_fn = lambda x, t: 0.1 * x + t / 1000  # noqa: E731
    out = ddim_sample(eps_fn, x, [501, 1])
    ref = x.clone()
    for t, prev in [(501, 1), (1, 0)]:
        e = eps_fn(ref, t)
        x0 = (ref - math.sqrt(1 - ac[t]) * e) / math.sqrt(ac[t])
        ref = math.sqrt(ac[prev]) * x0 + math.sqrt(1 - ac[prev]) * e
    torch.testing.assert_close(out, ref)


def test_invert_is_exact_for_x_independent_eps():
    # eps not depending on x makes the implicit inversion equation explicit.
    e = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    eps_fn = lambda x, t: e * (1 + t / 1000)  # noqa: E731
    x0, ts = gaussian_x0((1, 4, 8, 8)), ddim_timesteps(30)
    torch.testing.assert_close(ddim_sample(eps_fn, ddim_invert(eps_fn, x0, ts), ts), x0,
                               rtol=1e-5, atol=1e-5)


def test_round_trip_error_first_order():
    # eps_fn is linear and elementwise, so the round trip multiplies x_0 by a scalar:
    # the relative error does not depend on the seed. Measured: 0.197, 0.0962, 0.0622, 0.0370.
    errs = {n: round_trip(n, refine=0) for n in (10, 20, 30, 50)}
    assert errs[10] > errs[20] > errs[30] > errs[50]
    assert 1.8 < errs[10] / errs[20] < 2.3          # first order: halves when steps double
    assert 5.5e-2 < errs[30] < 7e-2                  # the paper's setting: ~6e-2


def test_round_trip_with_refine():
    # Measured at 30 steps: refine 1 -> 5.7e-3, 2 -> 5.2e-4, 4 -> 5.1e-6.
    errs = [round_trip(30, refine=k) for k in (0, 1, 2, 4)]
    assert all(a > b for a, b in zip(errs, errs[1:]))
    assert errs[-1] < 1e-3
    with pytest.raises(ValueError):
        ddim_invert(gaussian_eps_fn(), gaussian_x0(), ddim_timesteps(5), refine=-1)


def test_callback_order():
    ts = ddim_timesteps(5)
    seen_s, seen_i = [], []
    x0 = gaussian_x0((1, 4, 8, 8))
    xT = ddim_invert(gaussian_eps_fn(), x0, ts, callback=seen_i.append)
    x = ddim_sample(gaussian_eps_fn(), xT, ts, callback=seen_s.append)
    for seen, order in [(seen_s, ts), (seen_i, ts[::-1])]:
        assert [d["i"] for d in seen] == list(range(5))
        assert [d["t"] for d in seen] == order
        assert all(set(d) == {"i", "t", "x", "x0"} for d in seen)
    assert seen_i[-1]["x"] is xT and seen_s[-1]["x"] is x


def test_float32_output_for_bf16_model():
    eps = gaussian_eps_fn()
    bf16 = lambda x, t: eps(x.to(torch.bfloat16), t)  # noqa: E731
    ts = ddim_timesteps(5)
    xT = ddim_invert(bf16, gaussian_x0((1, 4, 8, 8)).to(torch.bfloat16), ts)
    assert xT.dtype == torch.float32
    assert ddim_sample(bf16, xT.to(torch.bfloat16), ts).dtype == torch.float32


# ---------------------------------------------------------------- guidance


class ToyModel:
    """model(x, t, context) -> eps; counts calls and records batch sizes."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, t, c):
        assert t.dtype == torch.long and t.shape == (x.shape[0],) and c.shape[0] == x.shape[0]
        self.batches.append(x.shape[0])
        return x * c.mean(dim=(1, 2)).view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1)


def test_cfg_scale_1_is_conditional_only():
    model = ToyModel()
    x = torch.randn(3, 4, 8, 8)
    cond = torch.full((1, 77, 16), 2.0)
    eps = cfg_eps_fn(model, cond, None, 1.0)(x, 7)
    torch.testing.assert_close(eps, x * 2.0 + 7)
    assert model.batches == [3]


def test_cfg_scale_s_is_one_batched_call():
    model = ToyModel()
    x = torch.randn(3, 4, 8, 8)
    cond, uncond = torch.full((1, 77, 16), 2.0), torch.full((3, 77, 16), -1.0)
    eps = cfg_eps_fn(model, cond, uncond, 5.0)(x, 7)
    e_c, e_u = x * 2.0 + 7, x * -1.0 + 7
    torch.testing.assert_close(eps, e_u + 5.0 * (e_c - e_u))
    assert model.batches == [6]
