"""The method: Feature Fusion Attention (Algorithm 1), its invariants, CSDI/FFF and the feature store modes."""
from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from _tiny import ASTRONAUT
from attention import RECIPES, FeatureStore, Record, adain, feature_fusion_attention, multihead_attention, plain, register
from conftest import ROOT, TINY_HPARAMS, TINY_WEIGHTS
from magicstyle import csdi, fff, load_config, load_model, stylize
from magicstyle import model as model_module
from magicstyle.config import ConfigError
from magicstyle.model import resolve_device, resolve_dtypes
from magicstyle.pipeline import (
    CountedUNet, decode_latents, encode_images, encode_text, load_image, recipes, select_layers,
)
from sampling import cfg_eps_fn, ddim_invert, ddim_sample, ddim_timesteps

STYLE = ROOT / "examples" / "ihc.png"
TINY = {"size": 64, "steps": 4, "model": {"weights": str(TINY_WEIGHTS), "hparams": str(TINY_HPARAMS), "dtype": "float32"}}


def config(**sections):
    merged = {**TINY, **{k: v for k, v in sections.items() if not isinstance(v, dict)}}
    for key, value in sections.items():
        if isinstance(value, dict):
            merged[key] = {**TINY.get(key, {}), **value}
    return load_config(None, merged)


@pytest.fixture(scope="module")
def sd():
    return load_model(config())


@pytest.fixture(scope="module")
def latents(sd):
    """Scaled latents of (content, style) and of (content, content)."""
    content, style = load_image(ASTRONAUT, 64), load_image(STYLE, 64)
    return encode_images(sd, torch.cat([content, style])), encode_images(sd, torch.cat([content, content]))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bit-identical on the CPU; on a GPU (``device: auto``) within float32 rounding."""
    if a.device.type == "cpu":
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Feature Fusion Attention


def algorithm_1(q_cs, q_c, k_c, v_c, k_s, v_s, alpha, beta, heads):
    """Algorithm 1, lines 3-6, transcribed loop by loop: one batch row, one head, one query at a time."""
    B, N, C = q_cs.shape
    d = C // heads

    def ada(v_c, v_s):  # per channel over tokens, population std, eps 1e-5 on the variance
        mu_c, mu_s = v_c.mean(0), v_s.mean(0)
        sd_c = ((v_c - mu_c) ** 2).mean(0).add(1e-5).sqrt()
        sd_s = ((v_s - mu_s) ** 2).mean(0).add(1e-5).sqrt()
        return sd_s * (v_c - mu_c) / sd_c + mu_s

    out = torch.zeros(B, N, C, dtype=torch.float64)
    for b in range(B):
        Q = alpha * q_c[0] + beta * q_cs[b]  # line 3
        K = torch.cat([k_c[0], k_s[0]])  # line 4
        V = torch.cat([ada(v_c[0], v_s[0]), v_s[0]])  # line 5
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            for n in range(N):
                scores = torch.stack([Q[n, cols] @ K[m, cols] / math.sqrt(d) for m in range(K.shape[0])])
                out[b, n, cols] = torch.softmax(scores, 0) @ V[:, cols]  # line 6, before the residual
    return out


def test_feature_fusion_attention_is_algorithm_1():
    g = torch.Generator().manual_seed(0)
    N, M, C, heads = 6, 5, 8, 2
    q_cs = torch.randn(2, N, C, generator=g, dtype=torch.float64)
    q_c, k_c, v_c = (torch.randn(1, N, C, generator=g, dtype=torch.float64) for _ in range(3))
    k_s, v_s = (torch.randn(1, M, C, generator=g, dtype=torch.float64) * 3 + 1 for _ in range(2))
    got = feature_fusion_attention(q_cs, q_c, k_c, v_c, k_s, v_s, alpha=0.8, beta=0.2, heads=heads)
    want = algorithm_1(q_cs, q_c, k_c, v_c, k_s, v_s, 0.8, 0.2, heads)
    assert got.shape == (2, N, C)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_adain_matches_eq_4_per_channel():
    g = torch.Generator().manual_seed(1)
    c, s = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g) * 2 + 3
    out = adain(c, s, dim=(2, 3))
    torch.testing.assert_close(out.mean((2, 3)), s.mean((2, 3)), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.var((2, 3), correction=0), s.var((2, 3), correction=0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(adain(c, c, dim=(2, 3)), c, rtol=0, atol=1e-6)


def test_style_equal_to_content_gives_the_content_attention():
    """K = [K^C, K^C], V = [V^C, V^C]: duplicated keys and values do not change softmax attention."""
    g = torch.Generator().manual_seed(2)
    q_cs, q_c, k_c, v_c = (torch.randn(1, 16, 8, generator=g) for _ in range(4))
    for adain_values in (True, False):
        got = feature_fusion_attention(q_cs, q_c, k_c, v_c, k_c, v_c, alpha=0.8, beta=0.2, heads=2,
                                       adain_values=adain_values)
        want = multihead_attention(0.8 * q_c + 0.2 * q_cs, k_c, v_c, heads=2)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_ffa_with_alpha_1_is_plain_attention_in_the_unet(sd, latents):
    """With content = style and a = 1, b = 0, FFA in every layer gives the UNet's own noise prediction.

    Run in float64 so that the only difference, rounding (AdaIN(V, V) = V, softmax over [K, K] = softmax over K), is
    far below what any real difference in the attention would show.
    """
    unet = copy.deepcopy(sd.unet).double()
    z = latents[1][:1].double()
    context = encode_text(sd, [""]).double()
    paths = select_layers(unet, "all")
    store = FeatureStore(t=500, dtype=torch.float64)
    with recipes(unet, paths, Record(store)):
        plain_eps = unet(torch.cat([z, z]), torch.tensor([500, 500]), context.expand(2, -1, -1))
    with recipes(unet, paths, RECIPES["ffa"](store, config(ffa={"alpha": 1.0, "beta": 0.0}))):
        ffa_eps = unet(z, torch.tensor([500]), context)
    assert len(store.features) == len(paths) == 16
    assert (ffa_eps - plain_eps[:1]).abs().max() <= 1e-9 * plain_eps.abs().max()


def test_fff_with_alpha_1_reproduces_the_reconstruction(sd, latents):
    """a = 1, b = 0, guidance 1, content = style: FFF retraces plain invert-then-sample.

    FFA then attends with the features CSDI recorded at each timestep, which the plain sampler recomputes from its own
    latent; the two latents coincide as far as the inversion is exact.  So the model is tamed (a random tiny UNet is
    far from smooth) and the inversion refined.  The gap (measured 0.003) must be small next to the effects of the
    attention alone (AdaIN of the start latents off): the features of the neighbouring timestep (the bug this guards,
    0.022) and the features of another image (0.035).
    """
    unet_out = sd.unet.out[2]
    saved = unet_out.weight.clone(), unet_out.bias.clone()
    unet_out.weight.mul_(0.01), unet_out.bias.mul_(0.01)
    try:
        base = dict(steps=10, generation={"guidance": 1.0, "prompt": ""}, inversion={"refine": 8})
        cfg = config(**base, ffa={"alpha": 1.0, "beta": 0.0, "layers": "all", "adain_latents": False})
        inversion = csdi(sd, latents[1], cfg)
        z_same = fff(sd, inversion, cfg)
        ts, recorded = inversion.timesteps, dict(inversion.store.features)
        neighbour = {t: ts[i + 1] if i + 1 < len(ts) else ts[i - 1] for i, t in enumerate(ts)}
        inversion.store.features = {(path, t): recorded[(path, neighbour[t])] for path, t in recorded}
        z_shifted = fff(sd, inversion, cfg)
        styled = config(**base, ffa={"alpha": 0.0, "beta": 1.0, "layers": "all", "adain_latents": False})
        z_styled = fff(sd, csdi(sd, latents[0], styled), styled)
        eps = cfg_eps_fn(CountedUNet(sd.unet), encode_text(sd, [""]), None, 1.0)
        ts = ddim_timesteps(10)
        # inverted as CSDI inverts, both images in one batch: a random tiny UNet amplifies the rounding of another
        # batch size (kernels may block the rows differently) into a gap of the size this test measures
        z_recon = ddim_sample(eps, ddim_invert(eps, latents[1], ts, refine=8)[:1], ts)
    finally:
        unet_out.weight.copy_(saved[0]), unet_out.bias.copy_(saved[1])
    gap = (z_same - z_recon).norm()
    assert gap < 0.5 * (z_shifted - z_recon).norm()
    assert gap < 0.25 * (z_styled - z_recon).norm()


# ---------------------------------------------------------------------------------------------------------------------
# CSDI, FFF and the store


def test_memory_and_recompute_give_the_same_image(sd, latents):
    images = {}
    for mode in ("memory", "recompute"):
        cfg = config(store={"mode": mode})
        images[mode] = decode_latents(sd, fff(sd, csdi(sd, latents[0], cfg), cfg))
    cfg = config(ffa={"recipe": "plain"})
    images["plain"] = decode_latents(sd, fff(sd, csdi(sd, latents[0], cfg), cfg))
    # the same image within 2/255 per pixel, on the [-1, 1] scale (measured: 0.01/255) ...
    assert (images["memory"] - images["recompute"]).abs().max() <= 2 / 255 * 2
    # ... where FFA itself moves pixels by up to 32/255 (3/255 on average) from plain attention
    assert (images["memory"] - images["plain"]).abs().max() > 10 * 2 / 255 * 2


def test_store_sizes_and_unet_rows(sd, latents):
    runs, counts = {}, {}
    for mode in ("memory", "recompute"):
        cfg = config(store={"mode": mode})
        counts[mode] = {}
        runs[mode] = csdi(sd, latents[0], cfg, stats=counts[mode])
        fff(sd, runs[mode], cfg, stats=counts[mode])
    memory, recompute = runs["memory"], runs["recompute"]
    steps, layers = 4, memory.layers
    assert layers == [f"output_blocks.{i}.1.transformer_blocks.0.attn1" for i in range(6, 12)]
    # memory: the content and style inputs (1, N, C) of the chosen layers only, per step, in float16
    assert {path for path, _ in memory.store.features} == set(layers)
    sizes = {p: sd.unet.get_submodule(p).to_q.in_features for p in layers}
    tokens = {p: (8 // 2 if p.split(".")[1] in ("6", "7", "8") else 8) ** 2 for p in layers}  # 64 px -> 8x8 latent
    assert memory.store.nbytes == steps * sum(2 * tokens[p] * sizes[p] * 2 for p in layers)
    # recompute: only the (content, style) latents per step, float32
    assert recompute.store.features == {} and recompute.store.nbytes == steps * 2 * 4 * 8 * 8 * 4
    # one UNet call per step in each phase; recompute adds two rows to each generation call (1.5x the rows)
    for c in counts.values():
        assert c["invert_unet_calls"] == c["generate_unet_calls"] == steps
    rows = {m: c["invert_unet_rows"] + c["generate_unet_rows"] for m, c in counts.items()}
    assert rows == {"memory": 4 * steps, "recompute": 6 * steps}


def test_ffa_timesteps_limit_what_is_kept_and_used(sd, latents):
    cfg = config(ffa={"timesteps": [0, 1]})
    inversion = csdi(sd, latents[0], cfg)
    assert {t for _, t in inversion.store.features} == set(ddim_timesteps(4)[:2])
    partial = fff(sd, inversion, cfg)
    full_cfg = config()
    full = fff(sd, csdi(sd, latents[0], full_cfg), full_cfg)
    plain_cfg = config(ffa={"recipe": "plain"})
    none = fff(sd, csdi(sd, latents[0], plain_cfg), plain_cfg)
    # between the two (measured 0.010 and 0.074), far beyond float32 rounding (1e-6); tests/test_method.py pins the
    # exact result of ffa.timesteps against the paper's transcription
    assert rel(partial, full) > 1e-3 and rel(partial, none) > 1e-3


def test_an_inversion_serves_many_fff_runs(sd, latents):
    """A beta sweep inverts once: the same Inversion gives the same result twice, and another beta another result."""
    cfg = config()
    inversion = csdi(sd, latents[0], cfg)
    first, again = fff(sd, inversion, cfg), fff(sd, inversion, cfg)
    other = fff(sd, inversion, config(ffa={"alpha": 0.5, "beta": 0.5}))
    assert_same(first, again)
    assert rel(first, other) > 1e-3  # measured 0.018
    with pytest.raises(ConfigError, match="steps"):
        fff(sd, inversion, config(steps=5))
    with pytest.raises(ConfigError, match="recorded no features"):
        fff(sd, inversion, config(ffa={"layers": "all"}))


def test_recipes_are_restored_after_a_run(sd, latents):
    cfg = config()
    fff(sd, csdi(sd, latents[0], cfg), cfg)
    assert all(layer.recipe is plain for layer in sd.unet.self_attention_layers())


def test_a_registered_recipe_runs_in_the_chosen_layers(sd, latents):
    calls = []

    def factory(store, cfg):
        def swap_only(layer, x):  # a researcher's recipe: plain attention, counting its calls
            calls.append(layer.path)
            return plain(layer, x)

        return swap_only

    register("counting", factory)
    try:
        cfg = config(ffa={"recipe": "counting", "layers": ["output_blocks.11"]})
        fff(sd, csdi(sd, latents[0], cfg), cfg)
    finally:
        del RECIPES["counting"]
    assert calls == ["output_blocks.11.1.transformer_blocks.0.attn1"] * 4


def test_select_layers():
    from models import SD15Config, UNet

    with torch.device("meta"):
        unet = UNet(SD15Config())
    assert len(select_layers(unet, "all")) == 16
    assert select_layers(unet, ["middle_block"]) == ["middle_block.1.transformer_blocks.0.attn1"]
    assert select_layers(unet, ["output_blocks.10", "output_blocks.3"]) == [
        "output_blocks.10.1.transformer_blocks.0.attn1", "output_blocks.3.1.transformer_blocks.0.attn1"
    ]


def test_select_layers_refuses_paths_without_attention():
    from models import SD15Config, UNet

    with torch.device("meta"):
        unet = UNet(SD15Config())
    with pytest.raises(ConfigError, match="output_blocks.1"):
        select_layers(unet, ["output_blocks.1"])


def test_stylize_api(sd):
    from PIL import Image

    stats = {}
    content = Image.open(ASTRONAUT)
    out = stylize(content, STYLE, config(), sd=sd, stats=stats)
    assert out.size == (64, 64) and out.mode == "RGB"
    assert set(stats["seconds"]) == {"encode", "invert", "generate", "decode"}
    assert stats["unet_evals"] == 8 and stats["feature_store_bytes"] > 0


# ---------------------------------------------------------------------------------------------------------------------
# Device and dtype


def test_resolve_dtypes(monkeypatch):
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    # vae_dtype auto: the UNet's dtype, except float32 under a float16 UNet (fp16 SD VAEs overflow into black images)
    assert resolve_dtypes("float16", "auto", cpu) == (f16, f32)
    assert resolve_dtypes("bfloat16", "auto", cpu) == (bf16, bf16)
    assert resolve_dtypes("float32", "auto", cuda) == (f32, f32)
    assert resolve_dtypes("float16", "float16", cuda) == (f16, f16)  # asked for explicitly
    # dtype auto: float16 on CUDA and MPS; on a CPU bfloat16 where it has bf16 instructions, else float32
    assert resolve_dtypes("auto", "auto", cuda) == resolve_dtypes("auto", "auto", mps) == (f16, f32)
    for has_bf16, want in ((True, (bf16, bf16)), (False, (f32, f32))):
        monkeypatch.setattr(model_module, "cpu_has_bf16", lambda: has_bf16)
        assert resolve_dtypes("auto", "auto", cpu) == want


def test_resolve_device(monkeypatch):
    for cuda, mps, auto in ((False, False, "cpu"), (True, False, "cuda"), (False, True, "mps"), (True, True, "cuda")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
        assert resolve_device("auto") == torch.device(auto)
        assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for name in ("cuda", "mps"):
        with pytest.raises(ConfigError) as e:
            resolve_device(name)
        message = str(e.value)
        assert len(message.splitlines()) == 1 and name in message and "--device cpu" in message


def test_float16_unet_gets_a_float32_vae():
    sd = load_model(config(model={"dtype": "float16", "device": "cpu"}))
    assert {p.dtype for m in (sd.unet, sd.text_encoder) for p in m.parameters()} == {torch.float16}
    assert {p.dtype for p in sd.vae.parameters()} == {torch.float32}
    z = encode_images(sd, load_image(ASTRONAUT, 64))
    assert z.dtype == torch.float32 and decode_latents(sd, z).dtype == torch.float32
    assert encode_text(sd, [""]).dtype == torch.float16


def test_a_sampled_latent_depends_on_the_image_and_the_seed_not_on_the_batch():
    """inversion.sample_posterior: stylize, a sweep, the demo and the inversion cache encode images in batches of
    different sizes; each image's noise comes from the seed alone, so they all agree."""
    sd = load_model(config(model={"device": "cpu"}))
    content, style = load_image(ASTRONAUT, 64), load_image(STYLE, 64)
    both = encode_images(sd, torch.cat([content, style]), seed=3)
    alone = torch.cat([encode_images(sd, content, seed=3), encode_images(sd, style, seed=3)])
    torch.testing.assert_close(both, alone, rtol=1e-5, atol=1e-6)
    mean = encode_images(sd, torch.cat([content, style]))
    assert (both - mean).abs().mean() > 100 * (both - alone).abs().max()  # the noise is there, and per image
    assert not torch.allclose(encode_images(sd, style, seed=4), alone[1:], atol=1e-4)  # another seed, other noise


def test_a_float16_vae_that_overflows_is_an_error_not_a_black_image(sd, monkeypatch):
    """``model.vae_dtype=float16``: SD1.5's VAE can overflow in float16; the result is a one-line error naming the
    switch, not NaNs turned into a black PNG.  A finite decode passes as before."""
    from magicstyle.pipeline import decode_latents

    half = copy.deepcopy(sd.vae).half()
    stand_in = dataclasses.replace(sd, vae=half)
    z = torch.zeros(1, 4, 8, 8)
    monkeypatch.setattr(half, "decode", lambda latents: torch.full((1, 3, 64, 64), math.inf, dtype=torch.float16))
    with pytest.raises(ConfigError, match="vae_dtype=float32"):
        decode_latents(stand_in, z)
    monkeypatch.setattr(half, "decode", lambda latents: torch.zeros(1, 3, 64, 64, dtype=torch.float16))
    assert decode_latents(stand_in, z).dtype == torch.float32


def test_fusion_qkv_keeps_the_content_keys_first_and_the_style_keys_last():
    """Alg. 1 lines 4-5 in their order: the diagnostics read the last M keys as the style's."""
    from attention.ffa import fusion_qkv
    g = torch.Generator().manual_seed(4)
    q_cs, q_c, k_c, v_c = (torch.randn(1, 6, 8, generator=g) for _ in range(4))
    k_s, v_s = (torch.randn(1, 5, 8, generator=g) for _ in range(2))
    _, k, v = fusion_qkv(q_cs, q_c, k_c, v_c, k_s, v_s, alpha=0.8, beta=0.2)
    assert torch.equal(k, torch.cat([k_c, k_s], dim=1)) and torch.equal(v[:, 6:], v_s)


def test_latents_are_scaled_by_0_18215_on_the_way_in_and_out(sd):
    image = load_image(ASTRONAUT, 64)
    z = encode_images(sd, image)
    torch.testing.assert_close(z, 0.18215 * sd.vae.encode(image).mean.float())
    torch.testing.assert_close(decode_latents(sd, z), sd.vae.decode(z / 0.18215).float())


def test_the_defaults_are_the_papers_settings():
    """Sec. IV-A: 30-step DDIM, CFG 1 for CSDI and 5 for FFF, alpha 0.8 and beta 0.2; StyleID's decoder layers."""
    cfg = load_config()
    assert (cfg.steps, cfg.inversion.guidance, cfg.generation.guidance) == (30, 1.0, 5.0)
    assert (cfg.ffa.alpha, cfg.ffa.beta, cfg.ffa.recipe) == (0.8, 0.2, "ffa")
    assert list(cfg.ffa.layers) == [f"output_blocks.{i}" for i in range(6, 12)]
    assert (cfg.inversion.refine, cfg.ffa.adain_values, cfg.ffa.adain_latents) == (0, True, True)


def test_encode_text_builds_no_autograd_graph(sd):
    """The encoders run under no_grad, as the samplers do: a text encoder left trainable records nothing."""
    sd.text_encoder.requires_grad_(True)
    try:
        assert not encode_text(sd, [""]).requires_grad
    finally:
        sd.text_encoder.requires_grad_(False)
