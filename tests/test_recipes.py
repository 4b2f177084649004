"""The peer recipes of FFF (styleid, vsp, stylealigned), recipes of one's own, and the recipe switches
(ffa.timesteps on a reused inversion, ffa.cfg_rows)."""
from __future__ import annotations

import copy
import dataclasses
import math
import re

import pytest
import torch

from attention import (
    RECIPES, FeatureStore, Record, StoreRecipe, register, stylealigned_attention, styleid_attention, vsp_attention,
)
from attention.ffa import fusion_qkv
from attention.stylealigned import stylealigned_qkv
from attention.styleid import styleid_qkv
from conftest import ROOT
from magicstyle import ConfigError, csdi, fff
from magicstyle.pipeline import CountedUNet, encode_images, encode_text, load_image, recipes, select_layers
from sampling import cfg_eps_fn, ddim_sample, ddim_timesteps
from test_batch import IMAGES, config, sd  # noqa: F401  (sd is a fixture)


@pytest.fixture(scope="module")
def z0(sd):  # noqa: F811
    return encode_images(sd, torch.cat([load_image(path, 64) for path in IMAGES[:2]]))  # (content, style)


# ---------------------------------------------------------------------------------------------------------------------
# The pure functions against their formulas, transcribed one row, head and query at a time (float64)


def softmax_attention(Q, K, V, heads, scale=1.0):
    """out[n] = softmax(scale * Q[n] K^T / sqrt(d)) V, per head, for one batch row (N, C)."""
    d = Q.shape[-1] // heads
    out = torch.zeros(Q.shape, dtype=torch.float64)
    for h in range(heads):
        cols = slice(h * d, (h + 1) * d)
        for n in range(Q.shape[0]):
            scores = torch.stack([scale * (Q[n, cols] @ K[m, cols]) / math.sqrt(d) for m in range(K.shape[0])])
            out[n, cols] = torch.softmax(scores, 0) @ V[:, cols]
    return out


def ada(x, y):
    """AdaIN per channel over the tokens (N, C): population std, eps 1e-5 on the variance."""
    mx, my = x.mean(0), y.mean(0)
    sx, sy = ((x - mx) ** 2).mean(0).add(1e-5).sqrt(), ((y - my) ** 2).mean(0).add(1e-5).sqrt()
    return sy * (x - mx) / sx + my


def tensors(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=torch.float64) * (1 + i % 3) + i % 2 for i, s in enumerate(shapes)]


B, N, M, C, HEADS = 2, 6, 5, 8, 2


@pytest.mark.parametrize("cached", [1, B])  # cached features broadcast over the rows, or one per row
def test_styleid_attention_is_its_formula(cached):
    q_cs, q_c, k_s, v_s = tensors((B, N, C), (cached, N, C), (cached, M, C), (cached, M, C))
    got = styleid_attention(q_cs, q_c, k_s, v_s, gamma=0.75, temperature=1.5, heads=HEADS)
    for b in range(B):
        c = b % cached
        Q = 0.75 * q_c[c] + 0.25 * q_cs[b]
        want = softmax_attention(Q, k_s[c], v_s[c], HEADS, scale=1.5)
        torch.testing.assert_close(got[b], want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("cached", [1, B])
def test_vsp_attention_is_its_formula(cached):
    q_cs, k_s, v_s = tensors((B, N, C), (cached, M, C), (cached, M, C), seed=1)
    got = vsp_attention(q_cs, k_s, v_s, heads=HEADS)
    for b in range(B):
        torch.testing.assert_close(got[b], softmax_attention(q_cs[b], k_s[b % cached], v_s[b % cached], HEADS),
                                   rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("cached", [1, B])
def test_stylealigned_attention_is_its_formula(cached):
    q_cs, k_cs, v_cs = tensors((B, N, C), (B, N, C), (B, N, C), seed=2)
    q_s, k_s, v_s = tensors((cached, M, C), (cached, M, C), (cached, M, C), seed=3)
    got = stylealigned_attention(q_cs, k_cs, v_cs, q_s, k_s, v_s, heads=HEADS)
    for b in range(B):
        c = b % cached
        Q = ada(q_cs[b], q_s[c])
        K = torch.cat([ada(k_cs[b], k_s[c]), k_s[c]])
        V = torch.cat([v_cs[b], v_s[c]])
        torch.testing.assert_close(got[b], softmax_attention(Q, K, V, HEADS), rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# Invariants in the UNet


@pytest.mark.parametrize("name, over", [
    ("styleid", {"styleid": {"gamma": 1.0, "temperature": 1.0}}),
    ("vsp", {}),
    ("stylealigned", {}),
])
def test_recipes_on_content_equal_to_style_are_plain_attention(sd, z0, name, over):  # noqa: F811
    """Content = style = the image being denoised: styleid with gamma = temperature = 1, vsp and stylealigned all
    reduce to the UNet's own attention in every layer (float64, so only rounding is left)."""
    unet = copy.deepcopy(sd.unet).double()
    z = z0[:1].double()
    context = encode_text(sd, [""]).double()
    paths = select_layers(unet, "all")
    store = FeatureStore(t=500, dtype=torch.float64, pairs=[(0, 1)])
    with recipes(unet, paths, Record(store)):
        plain_eps = unet(torch.cat([z, z]), torch.tensor([500, 500]), context.expand(2, -1, -1))
    with recipes(unet, paths, RECIPES[name](store, config(ffa={"recipe": name}, **over))):
        eps = unet(z, torch.tensor([500]), context)
    assert (eps - plain_eps[:1]).abs().max() <= 1e-9 * plain_eps.abs().max()


STEPS = 6


def test_styleid_with_gamma_1_reproduces_the_plain_reconstruction(sd, z0):  # noqa: F811
    """gamma = 1, temperature = 1, content = style: FFF with styleid retraces plain invert-then-sample, as far as the
    inversion is exact (the random tiny UNet is tamed and the inversion refined, as for FFA with alpha = 1)."""
    tame = dataclasses.replace(sd, unet=copy.deepcopy(sd.unet))
    tame.unet.out[2].weight.data.mul_(0.01), tame.unet.out[2].bias.data.mul_(0.01)
    base = dict(steps=STEPS, generation={"guidance": 1.0, "prompt": ""}, inversion={"refine": 8})
    cfg = config(**base, ffa={"recipe": "styleid", "layers": "all"}, styleid={"gamma": 1.0, "temperature": 1.0})
    inversion = csdi(tame, torch.cat([z0[:1], z0]), cfg)  # images: content, content again, style
    z_same = fff(tame, inversion, cfg, pairs=[(0, 1)])
    z_styled = fff(tame, inversion, config(**base, ffa={"recipe": "styleid", "layers": "all"}), pairs=[(0, 2)])
    # plain invert-then-sample: CSDI's inversion is plain DDIM inversion (recording does not change the attention)
    eps = cfg_eps_fn(CountedUNet(tame.unet), encode_text(tame, [""]), None, 1.0)
    z_recon = ddim_sample(eps, inversion.z_T[:1], ddim_timesteps(STEPS))
    assert (z_same - z_recon).norm() < 0.1 * (z_styled - z_recon).norm()


@pytest.mark.parametrize("name", ["styleid", "vsp", "stylealigned"])
def test_each_recipe_runs_and_styles(sd, z0, name):  # noqa: F811
    cfg = config(ffa={"recipe": name})
    inversion = csdi(sd, z0, cfg)
    z = fff(sd, inversion, cfg)
    assert z.shape == (1, 4, 8, 8) and torch.isfinite(z).all()
    assert not torch.equal(z, fff(sd, inversion, config(ffa={"recipe": "plain"})))


def test_bad_styleid_settings_are_config_errors():
    with pytest.raises(ConfigError, match="styleid.gamma"):
        config(styleid={"gamma": 1.5})
    with pytest.raises(ConfigError, match="styleid.temperature"):
        config(styleid={"temperature": 0})


# ---------------------------------------------------------------------------------------------------------------------
# Recipes of one's own


class FirstKeysOnly(StoreRecipe):
    """A researcher's recipe, defined outside the package: the content's keys and values only."""

    def qkv(self, layer, x, h_c, h_s):
        return layer.to_q(x), layer.to_k(h_c), layer.to_v(h_c), 0


def test_a_recipe_defined_in_a_test_file_runs_by_name(sd, z0):  # noqa: F811
    register("firstkeys", lambda store, cfg: FirstKeysOnly(store))
    try:
        cfg = config(ffa={"recipe": "firstkeys"})
        inversion = csdi(sd, z0, cfg)
        mine, ffa = fff(sd, inversion, cfg), fff(sd, inversion, config())
    finally:
        del RECIPES["firstkeys"]
    assert torch.isfinite(mine).all() and not torch.equal(mine, ffa)
    with pytest.raises(ConfigError, match="ffa.recipe"):
        config(ffa={"recipe": "firstkeys"})  # unregistered: refused


def test_the_readme_recipe_runs(sd, z0):  # noqa: F811
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Write your own recipe"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    name = re.search(r'register\("(\w+)"', code).group(1)
    exec(compile(code, "README.md", "exec"), {})
    try:
        cfg = config(ffa={"recipe": name})
        z = fff(sd, csdi(sd, z0, cfg), cfg)
    finally:
        del RECIPES[name]
    assert torch.isfinite(z).all()


# ---------------------------------------------------------------------------------------------------------------------
# Switches


def test_fff_applies_its_own_ffa_timesteps_to_a_reused_inversion(sd, z0):  # noqa: F811
    """An inversion recorded at steps 0 and 1 serves FFF at step 0 only, and FFF then applies step 0 only: the same
    result as an inversion recorded at step 0 alone.  Steps it did not record are refused, named."""
    recorded = csdi(sd, z0, config(ffa={"timesteps": [0, 1]}))
    first = config(ffa={"timesteps": [0]})
    reused = fff(sd, recorded, first)
    assert torch.equal(reused, fff(sd, csdi(sd, z0, first), first))
    assert not torch.equal(reused, fff(sd, recorded, config(ffa={"timesteps": [0, 1]})))
    with pytest.raises(ConfigError, match=r"steps \[2\]"):
        fff(sd, recorded, config(ffa={"timesteps": [0, 1, 2]}))


def test_cfg_rows_cond_runs_the_recipe_in_the_conditional_rows_only(sd, z0):  # noqa: F811
    rows = []

    class Counting(StoreRecipe):
        def qkv(self, layer, x, h_c, h_s):
            rows.append(x.shape[0])
            return layer.to_q(x), layer.to_k(h_s), layer.to_v(h_s), h_s.shape[1]

    register("counting", lambda store, cfg: Counting(store))
    try:
        results = {}
        for cfg_rows in ("both", "cond"):
            rows.clear()
            cfg = config(ffa={"recipe": "counting", "layers": ["output_blocks.11"], "cfg_rows": cfg_rows})
            results[cfg_rows] = fff(sd, csdi(sd, z0, cfg), cfg, pairs=[(0, 1), (1, 0)])
            assert rows == [{"both": 4, "cond": 2}[cfg_rows]] * 3  # 2 pairs x (2 guidance branches or 1), 3 steps
        guidance_1 = {}
        for cfg_rows in ("both", "cond"):  # without guidance every row is conditional: the switch changes nothing
            cfg = config(ffa={"recipe": "counting", "cfg_rows": cfg_rows}, generation={"guidance": 1.0})
            guidance_1[cfg_rows] = fff(sd, csdi(sd, z0, cfg), cfg)
    finally:
        del RECIPES["counting"]
    assert not torch.equal(results["both"], results["cond"])
    assert torch.equal(guidance_1["both"], guidance_1["cond"])


@pytest.mark.parametrize("name", ["ffa", "styleid", "vsp", "stylealigned"])
def test_each_recipe_class_feeds_content_and_style_to_their_own_slots(sd, name):  # noqa: F811
    """With h^C != h^S, each recipe class's Q, K, V are those of its pure formula with Q^C, K^C, V^C projected from h^C
    and Q^S, K^S, V^S from h^S (the content = style tests above cannot see a swap), and the style keys it reports for
    the diagnostics are the last M."""
    cfg = config(**{"styleid": {"gamma": 0.6, "temperature": 1.3}, "ffa": {"alpha": 0.7, "beta": 0.3}})
    layer = next(iter(sd.unet.self_attention_layers()))
    C = layer.to_q.in_features
    x, h_c, h_s = tensors((2, 6, C), (1, 6, C), (1, 5, C), seed=3)
    x, h_c, h_s = (t.to(next(layer.parameters()).dtype) for t in (x, h_c, h_s))
    q, k, v, style_keys = RECIPES[name](FeatureStore(), cfg).qkv(layer, x, h_c, h_s)
    (q_cs, k_cs, v_cs), (q_c, k_c, v_c), (q_s, k_s, v_s) = layer.qkv(x), layer.qkv(h_c), layer.qkv(h_s)
    expected = {
        "ffa": lambda: fusion_qkv(q_cs, q_c, k_c, v_c, k_s, v_s, alpha=0.7, beta=0.3),
        "styleid": lambda: styleid_qkv(q_cs, q_c, k_s, v_s, gamma=0.6, temperature=1.3),
        "vsp": lambda: (q_cs, k_s, v_s),
        "stylealigned": lambda: stylealigned_qkv(q_cs, k_cs, v_cs, q_s, k_s, v_s),
    }[name]()
    for got, want in zip((q, k, v), expected):
        torch.testing.assert_close(got.expand_as(want), want)
    assert style_keys == 5
