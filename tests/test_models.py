"""Tests for models/: golden parity of the tiny checkpoint, tokenizer conventions, the full-size SD1.5 architecture
(keys and shapes of a real checkpoint, built on the meta device) and the attn1 recipe swap point."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _ckpt_helpers import (FULL_MANIFEST, HPARAMS, SCHEDULE_BUFFERS, TINY_MANIFEST, load_tiny, manifest, refs,
                           rel_err)
from models import Attention, AutoencoderKL, CLIPTextEncoder, SD15Config, UNet, set_recipe
from models.loader import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, component_keys, is_extra, text_encoder_key
from models.tokenizer import BOS, EOS
from conftest import ROOT

TOL = 1e-4
ATTN1 = "output_blocks.6.1.transformer_blocks.0.attn1"


@pytest.fixture(scope="module")
def sd():
    return load_tiny()


# ---------------------------------------------------------------------------------------------------------------------
# Golden parity with the reference outputs stored beside the tiny checkpoint


def test_loaded_model_is_ready(sd):
    for module in (sd.unet, sd.vae, sd.text_encoder):
        assert not module.training
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            assert t.device.type == "cpu", name  # nothing left on the meta device
            assert t.dtype == torch.float32, name
            assert not t.requires_grad, name


def test_tokens_match_reference(sd):
    tokens = sd.tokenizer(["a photo of a cat", ""])
    assert tokens.dtype == torch.long
    assert torch.equal(tokens, refs()["text.tokens"])


@pytest.mark.parametrize("layer, ref", [("last", "text.hidden"), ("penultimate", "text.hidden_penultimate")])
def test_text_encoder_matches_reference(sd, layer, ref):
    tokens = refs()["text.tokens"]
    with torch.no_grad():
        out = sd.text_encoder(tokens) if layer == "last" else sd.text_encoder(tokens, layer=layer)
    assert out.shape == refs()[ref].shape
    assert rel_err(out, refs()[ref]) < TOL


def test_text_encoder_layers_differ(sd):
    """The penultimate layer is not the last one under another name (guards the parity test against a mix-up)."""
    r = refs()
    assert rel_err(r["text.hidden_penultimate"], r["text.hidden"]) > 1e-2


@pytest.mark.parametrize("size", [16, 32])
def test_unet_matches_reference(sd, size):
    r = refs()
    with torch.no_grad():
        eps = sd.unet(r[f"unet.x{size}"], r[f"unet.t{size}"], r["text.hidden"])
    assert eps.shape == r[f"unet.eps{size}"].shape
    assert rel_err(eps, r[f"unet.eps{size}"]) < TOL


def test_vae_encode_matches_reference(sd):
    r = refs()
    with torch.no_grad():
        posterior = sd.vae.encode(r["vae.img"])
    assert rel_err(posterior.mean, r["vae.mean"]) < TOL
    assert rel_err(posterior.logvar, r["vae.logvar"]) < TOL


def test_vae_decode_matches_reference(sd):
    r = refs()
    with torch.no_grad():
        img = sd.vae.decode(r["vae.z"])
    assert img.shape == r["vae.decoded"].shape
    assert rel_err(img, r["vae.decoded"]) < TOL


def test_unet_takes_timesteps_and_context_of_any_dtype(sd):
    """The UNet moves and casts ``t``, ``x`` and ``context`` itself; one timestep may be given for the whole batch."""
    r = refs()
    x, t, context, ref = r["unet.x16"], r["unet.t16"], r["text.hidden"], r["unet.eps16"]
    with torch.no_grad():
        for tt, ctx, tol in ((t.int(), context, TOL), (t.float(), context.double(), TOL),
                             (t.double(), context.half(), 1e-2)):  # 1e-2: the context rounded to float16
            assert rel_err(sd.unet(x.double(), tt, ctx), ref) < tol
        one = sd.unet(x[:1], int(t[0]), context[:1])
        assert torch.equal(one, sd.unet(x[:1], t[:1], context[:1]))
        assert torch.equal(sd.unet(x[:1], t[0], context[:1]), one)


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer conventions (SD1.5's, not open_clip's)


def test_tokenizer_bos_eos_and_eos_padding(sd):
    tokens = sd.tokenizer(["a photo of a cat", ""])
    assert tokens.shape == (2, 77) and tokens.dtype == torch.long
    assert (tokens[:, 0] == BOS).all()
    assert not (tokens == 0).any(), "padding must be EOS (49407), not 0"
    # "a photo of a cat" is 5 BPE tokens: BOS, 5 tokens, then EOS up to the end
    assert (tokens[0, 1:6] < BOS).all()
    assert (tokens[0, 6:] == EOS).all()
    # the empty prompt: BOS then EOS everywhere
    assert (tokens[1, 1:] == EOS).all()


def test_tokenizer_single_string(sd):
    one = sd.tokenizer("a photo of a cat")
    assert one.shape == (1, 77) and one.dtype == torch.long
    assert torch.equal(one[0], refs()["text.tokens"][0])


def test_tokenizer_cleans_case_and_whitespace(sd):
    assert torch.equal(sd.tokenizer("  A   Photo of a CAT "), sd.tokenizer("a photo of a cat"))


def test_tokenizer_truncates_long_prompt_with_eos_last(sd):
    cat = sd.tokenizer("cat")[0, 1].item()
    tokens = sd.tokenizer(["cat " * 200, "dog"])
    assert tokens.shape == (2, 77)
    assert tokens[0, 0] == BOS and tokens[0, 76] == EOS
    assert (tokens[0, 1:76] == cat).all()  # 75 prompt tokens kept


def test_tokenizer_exactly_75_tokens_fit(sd):
    cat = sd.tokenizer("cat")[0, 1].item()
    t75 = sd.tokenizer("cat " * 75)[0]
    assert t75[0] == BOS and (t75[1:76] == cat).all() and t75[76] == EOS
    assert torch.equal(sd.tokenizer("cat " * 76)[0], t75)


# ---------------------------------------------------------------------------------------------------------------------
# The architecture against the key manifests of real checkpoints


def _expected_component_keys(shapes: dict[str, tuple]) -> dict[str, dict[str, tuple]]:
    """{component: {module key: shape}} that a checkpoint with these shapes provides, as the loader maps them."""
    out = {}
    for name, prefix, rename in [("unet", UNET_PREFIX, str), ("vae", VAE_PREFIX, str),
                                 ("text", TEXT_PREFIX, text_encoder_key)]:
        out[name] = {k: shapes[ck] for k, ck in component_keys(shapes, prefix, rename).items()}
    return out


@pytest.mark.parametrize("which", ["full", "tiny"])
def test_architecture_matches_checkpoint_manifest(which):
    if which == "full":
        path, cfg = FULL_MANIFEST, SD15Config()
    else:
        path, cfg = TINY_MANIFEST, SD15Config.from_overrides(HPARAMS)
    shapes = {k: shape for k, (shape, _) in manifest(path).items()}
    expected = _expected_component_keys(shapes)
    with torch.device("meta"):
        modules = {"unet": UNet(cfg), "vae": AutoencoderKL(cfg), "text": CLIPTextEncoder(cfg)}
    for name, module in modules.items():
        got = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        assert sorted(set(expected[name]) - set(got)) == [], f"{name}: checkpoint tensors the module lacks"
        assert sorted(set(got) - set(expected[name])) == [], f"{name}: module tensors the checkpoint lacks"
        wrong = {k: (got[k], expected[name][k]) for k in got if got[k] != expected[name][k]}
        assert wrong == {}, f"{name}: shapes differ (module, checkpoint)"
    # every tensor of the checkpoint is accounted for: in one component, or an ignored extra
    used = sum(len(v) for v in expected.values())
    assert used + sum(map(is_extra, shapes)) == len(shapes)


def test_full_manifest_extras_are_only_schedule_and_position_ids():
    """Nothing real is silently ignored: the extras of a real SD1.5 checkpoint are the schedule and position_ids."""
    extras = {k for k in manifest(FULL_MANIFEST) if is_extra(k)}
    assert extras == SCHEDULE_BUFFERS | {TEXT_PREFIX + "text_model.embeddings.position_ids"}


def test_full_size_parameter_count():
    """SD1.5: UNet 859.5M, VAE 83.7M, CLIP-L text 123.1M parameters."""
    with torch.device("meta"):
        counts = [sum(p.numel() for p in m.parameters()) for m in
                  (UNet(SD15Config()), AutoencoderKL(SD15Config()), CLIPTextEncoder(SD15Config()))]
    assert counts == [859_520_964, 83_653_863, 123_060_480]


# ---------------------------------------------------------------------------------------------------------------------
# The attn1 swap point

SD15_ATTN1 = [f"input_blocks.{i}.1.transformer_blocks.0.attn1" for i in (1, 2, 4, 5, 7, 8)] + \
             ["middle_block.1.transformer_blocks.0.attn1"] + \
             [f"output_blocks.{i}.1.transformer_blocks.0.attn1" for i in range(3, 12)]


@pytest.mark.parametrize("which", ["full", "tiny"])
def test_self_attention_layers_carry_their_paths(which, sd):
    if which == "full":
        with torch.device("meta"):
            unet = UNet(SD15Config())
    else:
        unet = sd.unet
    layers = list(unet.self_attention_layers())
    assert [layer.path for layer in layers] == SD15_ATTN1
    assert len(layers) == 16
    named = dict(unet.named_modules())
    for layer in layers:
        assert isinstance(layer, Attention) and named[layer.path] is layer
    # cross-attention layers carry no path
    assert all(not m.path for n, m in named.items() if n.endswith(".attn2"))


def _any_shape_recipe(calls):
    """A recipe that records its calls and computes plain attention, whatever the recipe signature is."""
    from attention.plain import plain

    def recipe(layer, *args):
        calls.append(layer)
        return plain(layer, *args)

    return recipe


def test_set_recipe_calls_the_installed_recipe(sd):
    r = refs()
    x, t, context, ref = r["unet.x16"][:1], r["unet.t16"][:1], r["text.hidden"][:1], r["unet.eps16"][:1]
    layer = sd.unet.get_submodule(ATTN1)
    before = layer.recipe
    calls = []
    try:
        set_recipe(sd.unet, ATTN1, _any_shape_recipe(calls))
        with torch.no_grad():
            eps = sd.unet(x, t, context)
        assert calls == [layer]  # called once, by that layer only
        assert rel_err(eps, ref) < TOL  # plain attention: the reference output
        # the layer does use what the recipe returns
        set_recipe(sd.unet, ATTN1, lambda layer, first, *rest: torch.zeros_like(first))
        with torch.no_grad():
            eps0 = sd.unet(x, t, context)
        assert rel_err(eps0, ref) > 1e-3
    finally:
        layer.recipe = before
    assert all(m.recipe is before for m in sd.unet.self_attention_layers())


@pytest.mark.parametrize("path", ["output_blocks.6.1.transformer_blocks.0.attn2", "output_blocks.6.1",
                                  "output_blocks.6.1.transformer_blocks.0", "out.2"])
def test_set_recipe_refuses_non_attn1_path(sd, path):
    with pytest.raises(KeyError, match="attn1"):
        set_recipe(sd.unet, path, lambda *a: None)


@pytest.mark.parametrize("path", ["output_blocks.6.1.transformer_blocks.0.attn9", "output_blocks.99.1"])
def test_set_recipe_refuses_unknown_path_with_keyerror(sd, path):
    with pytest.raises(KeyError):
        set_recipe(sd.unet, path, lambda *a: None)


def test_sd15_yaml_holds_the_dataclass_defaults():
    from models import SD15Config

    assert SD15Config.from_overrides(ROOT / "configs" / "model" / "sd15.yaml") == SD15Config()


def test_prepack_off_gives_the_same_outputs_without_the_cache(sd):
    import copy

    from models.layers import Conv2d, _packed_weights, set_prepack

    r = refs()
    unet = copy.deepcopy(sd.unet)
    with torch.no_grad():
        packed = unet(r["unet.x16"], r["unet.t16"], r["text.hidden"])
        assert any(m in _packed_weights for m in unet.modules() if isinstance(m, Conv2d))
        set_prepack(unet, False)
        assert not any(m in _packed_weights for m in unet.modules() if isinstance(m, Conv2d))
        unpacked = unet(r["unet.x16"], r["unet.t16"], r["text.hidden"])
    assert not any(m in _packed_weights for m in unet.modules() if isinstance(m, Conv2d))
    assert rel_err(unpacked, packed) < 1e-5


# ---------------------------------------------------------------------------------------------------------------------
# One-line errors

def test_a_bfloat16_unet_computing_in_float32_is_the_float32_unet_of_its_weights(sd):
    """model.cpu_compute=float32: weights stay bfloat16 in memory, every layer casts them to float32 (models/layers.py),
    so the result is bit for bit the float32 UNet holding the same (bfloat16-rounded) weights, prepacked or not."""
    import copy

    from models.layers import set_prepack

    r = refs()
    bf16 = copy.deepcopy(sd.unet).cpu().to(torch.bfloat16)
    f32 = copy.deepcopy(bf16).float()
    bf16.compute_dtype = torch.float32
    for prepack in (True, False):
        set_prepack(bf16, prepack), set_prepack(f32, prepack)
        with torch.no_grad():
            out = bf16(r["unet.x16"], r["unet.t16"], r["text.hidden"])
            ref = f32(r["unet.x16"], r["unet.t16"], r["text.hidden"])
        assert out.dtype == torch.float32 and torch.equal(out, ref)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert bf16.state_dict().keys() == sd.unet.state_dict().keys()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fused_geglu_and_prepacked_linear_match_the_plain_ops(dtype, tol):
    """The CPU paths of models/layers.py (GELU and product fused into two prepacked products; a prepacked linear map
    with its bias inside) against F.linear + chunk + gelu, in float64; and the unfused path with prepack off."""
    from models.layers import Linear, geglu, linear

    torch.manual_seed(0)
    proj = Linear(16, 2 * 24).to(dtype).requires_grad_(False)
    x = torch.randn(3, 10, 16).to(dtype)
    a, g = F.linear(x.double(), proj.weight.double(), proj.bias.double()).chunk(2, dim=-1)
    ref = a * F.gelu(g)
    with torch.inference_mode():
        for prepack in (True, False):
            proj.prepack = prepack
            assert geglu(proj, x).dtype == dtype
            assert ((geglu(proj, x).double() - ref).norm() / ref.norm()) < tol
            out = linear(proj, x).double()
            full = F.linear(x.double(), proj.weight.double(), proj.bias.double())
            assert ((out - full).norm() / full.norm()) < tol


def test_a_weight_packed_for_a_convolution_is_never_handed_to_a_linear_map():
    """The cache keeps one packed copy per module, keyed by its kind: a 1x1 Conv2d asked for oneDNN's convolution
    layout and then for its linear layout gets each in turn (the other layout ran, but took seconds per call)."""
    from models.layers import Conv2d, _packed_weights, linear

    conv = Conv2d(8, 4, 1).requires_grad_(False)
    x = torch.randn(2, 5, 8)
    with torch.inference_mode():
        conv.packed_weight()
        assert _packed_weights[conv][0][-1] == "conv"
        out = linear(conv, x)
        assert _packed_weights[conv][0][-1] == "linear"
        conv.packed_weight()
        assert _packed_weights[conv][0][-1] == "conv"
    torch.testing.assert_close(out, F.linear(x, conv.weight.flatten(1), conv.bias), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls, args", [("Linear", (6, 5)), ("GroupNorm", (2, 6)), ("LayerNorm", (6,))])
def test_layers_compute_in_their_inputs_dtype(cls, args):
    import models.layers as layers

    torch.manual_seed(0)
    layer = getattr(layers, cls)(*args).to(torch.bfloat16).requires_grad_(False)
    plain = getattr(torch.nn, cls)(*args).requires_grad_(False)
    plain.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    x = torch.randn(3, 6, 4, 4) if cls == "GroupNorm" else torch.randn(3, 4, 6)
    with torch.inference_mode():
        out = layer(x)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, plain(x), rtol=1e-6, atol=1e-6)
        assert layer(x.bfloat16()).dtype == torch.bfloat16



def test_first_line_of_an_exception():
    from models.errors import CheckpointError, first_line

    assert first_line(RuntimeError("CUDA out of memory.\n  more detail\n")) == "CUDA out of memory."
    assert first_line(RuntimeError("\n  indented first line  \nsecond")) == "indented first line"
    assert first_line(ValueError()) == first_line(ValueError("  \n ")) == "ValueError"  # an empty message: its type
    assert first_line(KeyboardInterrupt()) == "KeyboardInterrupt"
    assert first_line(OSError(28, "No space left on device"), typed=True) == "OSError: [Errno 28] No space left on device"
    assert first_line(TimeoutError(), typed=True) == "TimeoutError"
    assert first_line(CheckpointError("not SD1.5\nhint"), typed=True) == "not SD1.5"  # says it all without its type


def test_a_posterior_sample_is_the_mean_plus_its_std_times_the_noise():
    import math
    from models.vae import DiagonalGaussian
    mean, logvar = torch.zeros(1, 4, 8, 8), torch.full((1, 4, 8, 8), math.log(4.0))  # std 2
    z = DiagonalGaussian(mean, logvar).sample(torch.Generator().manual_seed(0))
    torch.testing.assert_close(z, 2.0 * torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)))
