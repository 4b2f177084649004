"""Tests for models/loader.py: every refusal raises CheckpointError with a message naming the problem, and the
checkpoint quirks (float position_ids, model_ema.*, fp32/bf16 files, dtypes, separate VAE files, 2-D VAE attention
weights, text_model.-nested text encoder keys) load to the same model.

Variants of the tiny checkpoint are written into tmp_path by the small helpers of _ckpt_helpers.py; the reference
model is loaded once for the module."""
from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import pytest
import torch

from _ckpt_helpers import (CONV_IN, HPARAMS, POSITION_IDS, TINY, cast_floats, drop, load_tiny, rel_err, small_file,
                           text_out, tiny_state, unet_out, vae_out, variant, with_prefix, write)
from models import CheckpointError
from models.loader import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, SafetensorsFile, load_sd15


@pytest.fixture(scope="module")
def ref():
    return load_tiny()


@pytest.fixture(scope="module")
def ref_out(ref):
    """The reference model's outputs on small inputs: text, UNet eps (16x16), VAE (mean, logvar, decoded; 32x32)."""
    return {"text": text_out(ref), "unet": unet_out(ref), "vae": vae_out(ref)}


def refused(path, *words: str, what: Path | None = None, hparams=HPARAMS, **kwargs) -> str:
    """Load ``path`` (tiny hparams unless given), expect CheckpointError whose message holds ``words`` (any case) and
    the name of the file at fault (``what``, default ``path``); return the message."""
    with pytest.raises(CheckpointError) as info:
        load_sd15(path, hparams=hparams, **kwargs)
    msg = str(info.value)
    for word in words:
        assert word.lower() in msg.lower(), f"{word!r} not in: {msg}"
    assert Path(what or path).name in msg, msg
    return msg


# ---------------------------------------------------------------------------------------------------------------------
# Not a usable file


def test_missing_file(tmp_path):
    refused(tmp_path / "nowhere.safetensors", "does not exist")


def test_directory(tmp_path):
    folder = tmp_path / "model.safetensors"  # e.g. a diffusers folder
    folder.mkdir()
    refused(folder, "not a file")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    refused(path, "empty")


@pytest.mark.parametrize("keep", ["half", 100])
def test_truncated_file(tmp_path, keep):
    data = TINY.read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2 if keep == "half" else keep])
    refused(path, "truncated")


@pytest.mark.parametrize("content, words", [
    (bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).tolist()),
     ["not a safetensors file"]),
    (b"this is a text file, renamed\n" * 20, ["not a safetensors file"]),
    (struct.pack("<Q", 12) + b"not json!!!!" + b"\0" * 64, ["not a safetensors file"]),  # header is not JSON
    (b"abc", ["too short"]),
])
def test_not_a_safetensors_file(tmp_path, content, words):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(content)
    refused(path, *words)


@pytest.mark.parametrize("header", [b"[1, 2, 3]", b"12345678", b'"a string"'])
def test_header_json_that_is_not_an_object(tmp_path, header):
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    refused(path, "not a safetensors file")


class MakesMarker:
    """Unpickling this runs os.mkdir(marker): proof that a file was (or was not) unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _write_pickle(path: Path, how: str, marker: Path) -> Path:
    payload = {"state_dict": {CONV_IN: torch.zeros(2, 4, 3, 3)}, "evil": MakesMarker(marker)}
    if how == "torch.save":
        torch.save(payload, path)
    elif how == "torch.save legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(payload))
    return path


@pytest.mark.parametrize("how", ["pickle", "torch.save", "torch.save legacy"])
def test_marker_pickle_would_run_code(tmp_path, how):
    """The pickles of the next tests are dangerous: unpickling them does create the marker."""
    marker = tmp_path / "ran"
    path = _write_pickle(tmp_path / "x.pkl", how, marker)
    if how == "pickle":
        pickle.loads(path.read_bytes())
    else:
        torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("name, how", [
    ("model.ckpt", "torch.save"), ("model.pt", "pickle"),
    ("model.safetensors", "pickle"), ("model.safetensors", "torch.save"), ("model.safetensors", "torch.save legacy"),
])
def test_pickle_checkpoint_refused_without_unpickling(tmp_path, name, how):
    marker = tmp_path / "ran"
    path = _write_pickle(tmp_path / name, how, marker)
    refused(path, "pickle", "safetensors")
    assert not marker.exists()


def test_pickle_vae_refused_without_unpickling(tmp_path):
    marker = tmp_path / "ran"
    vae = _write_pickle(tmp_path / "vae.safetensors", "pickle", marker)
    refused(TINY, "pickle", "VAE", what=vae, vae=vae)
    assert not marker.exists()


@pytest.mark.parametrize("header_len", [128 + 256 * 3, 0x4B50])
def test_valid_safetensors_with_pickle_like_first_bytes(tmp_path, header_len):
    path = tmp_path / "valid.safetensors"
    tensors = {"a": torch.arange(6, dtype=torch.float16)}

    def header_length(pad: int) -> int:
        write(path, tensors, metadata={"pad": "x" * pad})
        return struct.unpack("<Q", path.read_bytes()[:8])[0]

    pad = header_len - header_length(0)  # the header grows with the padding, 8 bytes at a time
    while header_length(pad) > header_len:
        pad -= 1
    assert header_length(pad) == header_len and path.read_bytes()[:1] in (b"\x80", b"P")
    assert SafetensorsFile(path).shapes == {"a": (6,)}


# ---------------------------------------------------------------------------------------------------------------------
# Not an SD1.5 checkpoint

W = (8, 4)
FAMILIES = {
    "sdxl": ({"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": W,
              UNET_PREFIX + "label_emb.0.0.weight": (1280, 2816), CONV_IN: (320, 4, 3, 3)}, ["SDXL"]),
    "sdxl_label_emb_only": ({UNET_PREFIX + "label_emb.0.0.weight": (1280, 2816), CONV_IN: (320, 4, 3, 3)}, ["SDXL"]),
    "sd2_openclip": ({"cond_stage_model.model.token_embedding.weight": W, CONV_IN: (320, 4, 3, 3)}, ["SD2"]),
    "sd2_width_1024": ({UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
                        CONV_IN: (320, 4, 3, 3)}, ["SD2", "1024"]),
    "diffusers_unet": ({"down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3)}, ["diffusers"]),
    "lora": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": W}, ["not a Stable Diffusion"]),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_other_model_families_are_named(tmp_path, family):
    shapes, words = FAMILIES[family]
    refused(small_file(tmp_path, f"{family}.safetensors", shapes), *words, hparams=None)


def test_inpainting_checkpoint(tmp_path):
    def nine_channels(s):
        s[CONV_IN] = torch.zeros(32, 9, 3, 3, dtype=torch.float16)

    refused(variant(tmp_path, "inpaint.safetensors", nine_channels), "inpainting")


@pytest.mark.parametrize("prefix", [VAE_PREFIX, ""])
def test_vae_file_passed_as_checkpoint(tmp_path, prefix):
    path = write(tmp_path / "vae.safetensors", with_prefix(tiny_state(), VAE_PREFIX, prefix))
    refused(path, "VAE file", "vae=")


def test_vae_option_without_a_vae(tmp_path):
    vae = small_file(tmp_path, "notavae.safetensors", {"vae.decoder_blocks.0.weight": W})
    refused(TINY, "no LDM-layout VAE", what=vae, vae=vae)


# ---------------------------------------------------------------------------------------------------------------------
# Tensors that do not fit

MISSING = [UNET_PREFIX + "middle_block.1.proj_in.weight",
           TEXT_PREFIX + "encoder.layers.1.mlp.fc2.bias",
           VAE_PREFIX + "decoder.up.0.block.0.conv1.weight"]


@pytest.mark.parametrize("key", MISSING)
def test_missing_tensor_is_named(tmp_path, key):
    path = variant(tmp_path, "missing.safetensors", lambda s: s.pop(key))
    msg = refused(path, "missing")
    part = next(p for p in (UNET_PREFIX, TEXT_PREFIX, VAE_PREFIX) if key.startswith(p))
    assert key[len(part):] in msg  # at least the key within its part


def test_missing_tensor_named_by_checkpoint_key(tmp_path):
    key = MISSING[0]
    msg = refused(variant(tmp_path, "missing.safetensors", lambda s: s.pop(key)), "missing")
    assert key in msg


def test_unexpected_tensor_is_named(tmp_path):
    key = UNET_PREFIX + "middle_block.1.proj_in.extra"
    path = variant(tmp_path, "extra.safetensors", lambda s: s.update({key: torch.zeros(3, dtype=torch.float16)}))
    msg = refused(path, "unexpected")
    assert key in msg


@pytest.mark.parametrize("key", [UNET_PREFIX + "middle_block.1.proj_in.weight", VAE_PREFIX + "decoder.conv_out.bias"])
def test_misshaped_tensor_names_key_and_both_shapes(tmp_path, key):
    shape = tuple(tiny_state()[key].shape)
    bad = (shape[0] + 1, *shape[1:])
    path = variant(tmp_path, "misshaped.safetensors", lambda s: s.update({key: torch.zeros(bad, dtype=torch.float16)}))
    msg = refused(path, "shape")
    assert key in msg and str(bad) in msg and str(shape) in msg


def test_checkpoint_without_vae_asks_for_one(tmp_path):
    refused(variant(tmp_path, "novae.safetensors", lambda s: drop(s, VAE_PREFIX)), "no VAE", "vae=")


def test_unknown_hparams_key():
    with pytest.raises(CheckpointError, match="model_channel"):
        load_sd15(TINY, hparams={"model_channel": 32})


def test_missing_hparams_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_sd15(TINY, hparams=tmp_path / "nope.json")


# ---------------------------------------------------------------------------------------------------------------------
# Quirks that load


def assert_same_model(sd, ref_out, parts=("text", "unet", "vae")):
    """Bit-identical outputs to the reference model."""
    if "text" in parts:
        assert torch.equal(text_out(sd), ref_out["text"])
    if "unet" in parts:
        assert torch.equal(unet_out(sd), ref_out["unet"])
    if "vae" in parts:
        for a, b in zip(vae_out(sd), ref_out["vae"]):
            assert torch.equal(a, b)


def test_float_position_ids(tmp_path, ref_out):
    def as_float(s):
        s[POSITION_IDS] = s[POSITION_IDS].to(torch.float32)

    sd = load_tiny(variant(tmp_path, "floatpos.safetensors", as_float))
    assert_same_model(sd, ref_out, parts=("text",))


def test_model_ema_is_ignored(tmp_path, ref, ref_out):
    def add_ema(s):
        s["model_ema.decay"] = torch.tensor(0.9999)
        s["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
        s["model_ema.diffusion_modelinput_blocks00weight"] = -s[CONV_IN]  # different values

    sd = load_tiny(variant(tmp_path, "ema.safetensors", add_ema))
    assert torch.equal(sd.unet.input_blocks[0][0].weight, ref.unet.input_blocks[0][0].weight)
    assert_same_model(sd, ref_out, parts=("unet",))


def test_fp32_file_gives_identical_model(tmp_path, ref, ref_out):
    sd = load_tiny(variant(tmp_path, "fp32.safetensors", lambda s: cast_floats(s, torch.float32)))
    for got, want in [(sd.unet, ref.unet), (sd.vae, ref.vae), (sd.text_encoder, ref.text_encoder)]:
        w = want.state_dict()
        assert all(torch.equal(v, w[k]) for k, v in got.state_dict().items())
    assert_same_model(sd, ref_out)


def test_bf16_file_loads_exactly(tmp_path, ref):
    """bf16 -> float32 is exact: the float32 model of a bf16 file holds the bf16-rounded reference weights, bit for bit."""
    sd = load_tiny(variant(tmp_path, "bf16.safetensors", lambda s: cast_floats(s, torch.bfloat16)))
    for got, want in [(sd.unet, ref.unet), (sd.vae, ref.vae), (sd.text_encoder, ref.text_encoder)]:
        assert {p.dtype for p in got.parameters()} == {torch.float32}
        w = want.state_dict()
        assert all(torch.equal(v, w[k].to(torch.bfloat16).float()) for k, v in got.state_dict().items())


def cpu_runs_float16() -> bool:
    """Whether this torch build has the CPU float16 kernels the models use."""
    x = torch.ones(1, 4, 4, 4, dtype=torch.float16)
    try:
        torch.nn.functional.conv2d(x, torch.ones(4, 4, 3, 3, dtype=torch.float16), padding=1)
        torch.nn.functional.group_norm(x, 2)
        torch.nn.functional.layer_norm(x, (4,))
        torch.nn.functional.scaled_dot_product_attention(x, x, x)
    except RuntimeError:  # "... not implemented for 'Half'"
        return False
    return True


# A model run in bfloat16 (8 significant bits) or float16 (11) rounds its weights once and every op's result: compared
# with the float32 run as max|diff| / max|float32 output|, the tiny model's outputs differ by 2.5 to 4.2 units of
# roundoff u (u = 2^-8 for bfloat16, 2^-11 for float16) for the UNet and text encoder, and by 4.3u to 6.8u for the VAE
# (deeper, two GroupNorm-heavy halves), measured on this CPU with and without oneDNN.  The bounds leave about 2x over
# that.  Bugs of the low-precision paths are far above them: a convolution bias dropped in bfloat16 is 52u, attention
# without its 1/sqrt(d) scale 18u (in float16: 420u and 144u).
ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
BOUND = {"unet": 8, "text": 8, "vae": 12}  # in units of roundoff


@pytest.mark.parametrize("vae_dtype", [None, torch.float32], ids=["same VAE dtype", "float32 VAE"])
@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bfloat16"), pytest.param(
    torch.float16, id="float16", marks=pytest.mark.skipif(not cpu_runs_float16(), reason="no CPU float16 kernels"))])
def test_load_and_run_in_low_precision(ref_out, dtype, vae_dtype):
    """bfloat16 is the default (``auto``) on CPUs with bf16 support: every part runs and matches the float32 run."""
    sd = load_tiny(dtype=dtype, vae_dtype=vae_dtype)
    for module in (sd.unet, sd.text_encoder):
        assert {p.dtype for p in module.parameters()} == {dtype}
    assert {p.dtype for p in sd.vae.parameters()} == {vae_dtype or dtype}
    u = ROUNDOFF[dtype]
    assert rel_err(text_out(sd), ref_out["text"]) < BOUND["text"] * u
    assert rel_err(unet_out(sd), ref_out["unet"]) < BOUND["unet"] * u
    if vae_dtype == torch.float32:  # the float32 VAE is the reference VAE
        assert_same_model(sd, ref_out, parts=("vae",))
    else:
        for got, want in zip(vae_out(sd), ref_out["vae"]):
            assert got.dtype == dtype and rel_err(got, want) < BOUND["vae"] * u


def _separate_vae(folder: Path, layout: str, scale: float = 2.0) -> Path:
    """The tiny VAE with decoder.conv_out scaled by ``scale``, as a VAE file of the given layout."""
    state = tiny_state()
    for k in ("decoder.conv_out.weight", "decoder.conv_out.bias"):
        state[VAE_PREFIX + k] = state[VAE_PREFIX + k] * scale
    if layout == "prefixed":
        vae = with_prefix(state, VAE_PREFIX, VAE_PREFIX)
    else:  # bare keys, and the training loss of a standalone VAE release
        vae = with_prefix(state, VAE_PREFIX, "")
        vae["loss.logvar"] = torch.zeros(())
        vae["loss.discriminator.main.0.weight"] = torch.zeros(64, 3, 4, 4)
    return write(folder / f"vae_{layout}.safetensors", vae)


@pytest.mark.parametrize("layout", ["prefixed", "bare_with_loss"])
def test_separate_vae_overrides_baked_one(tmp_path, ref_out, layout):
    path = _separate_vae(tmp_path, layout)
    sd = load_tiny(vae=path)
    assert sd.vae_path == path
    mean, logvar, decoded = vae_out(sd)
    assert torch.equal(mean, ref_out["vae"][0]) and torch.equal(logvar, ref_out["vae"][1])  # encoder unchanged
    assert torch.allclose(decoded, 2 * ref_out["vae"][2], rtol=1e-6, atol=1e-6)  # conv_out x2 -> image x2
    assert_same_model(sd, ref_out, parts=("text",))


def test_checkpoint_without_vae_loads_with_vae_option(tmp_path, ref_out):
    path = variant(tmp_path, "novae.safetensors", lambda s: drop(s, VAE_PREFIX))
    sd = load_tiny(path, vae=_separate_vae(tmp_path, "bare_with_loss", scale=1.0))
    assert_same_model(sd, ref_out, parts=("vae",))


def test_vae_attention_stored_2d(tmp_path, ref_out):
    def linear_attention(s):
        for k in [k for k in s if ".mid.attn_1." in k and k.endswith(".weight") and s[k].dim() == 4]:
            s[k] = s[k][:, :, 0, 0]

    sd = load_tiny(variant(tmp_path, "attn2d.safetensors", linear_attention))
    assert sd.vae.encoder.mid.attn_1.q.weight.shape[2:] == (1, 1)
    assert_same_model(sd, ref_out, parts=("vae",))


def test_text_encoder_nested_under_text_model(tmp_path, ref_out):
    def nest(s):
        for k in [k for k in s if k.startswith(TEXT_PREFIX) and not k.startswith(TEXT_PREFIX + "text_model.")]:
            s[TEXT_PREFIX + "text_model." + k[len(TEXT_PREFIX):]] = s.pop(k)

    path = variant(tmp_path, "nested.safetensors", nest)
    assert any(k.startswith(TEXT_PREFIX + "text_model.encoder.") for k in SafetensorsFile(path).shapes)
    sd = load_tiny(path)
    assert_same_model(sd, ref_out, parts=("text",))
