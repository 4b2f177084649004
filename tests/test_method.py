"""CSDI + FFF against an independent transcription of the paper, with content != style.

The transcription below is written from the paper alone (Sec. III-B/C, Algorithm 1, eq. 3-5) plus the README's
choices: SD1.5's DDIM table, AdaIN with population std and eps 1e-5 on the variance, FFA in both guidance branches
or only the conditional one (``ffa.cfg_rows``), the features of the last UNet call at each timestep.  It shares
nothing with the pipeline but the UNet's weights and its ``attn1`` swap point: its own alpha-bar table and timesteps,
its own DDIM steps (eq. 12 of Song et al., eta = 0), its own recording of the self-attention inputs, its own AdaIN,
softmax attention and guidance, each image and each guidance branch run on its own.  Both run in float32 on the CPU
(the feature store kept in float32 here), so that only the order of the arithmetic separates them.

Each case also runs the transcription with one plausible bug (content and style features swapped, AdaIN's arguments
swapped, an option ignored, the unconditional rows recorded) and checks that each bug moves the result by far more
than the tolerance: the tolerance is sized to what it guards, and the test shows it.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace

import pytest
import torch

from _tiny import ASTRONAUT
from conftest import ROOT, TINY_HPARAMS, TINY_WEIGHTS
from magicstyle import csdi, fff, load_config, load_model
from magicstyle.pipeline import encode_images, load_image

STYLE = ROOT / "examples" / "ihc.png"
# 128 px: a 16 x 16 latent, 2 x 2 at the UNet's deepest level.  At 64 px that level is 1 x 1, where the tiny model's
# GroupNorms (2 values per group) turn rounding into sign flips and float32 runs disagree by 1e-2.
SIZE = 128
# The pipeline against the transcription, both float32 on the CPU: the measured gap is about 1e-5 (relative, after
# 3 + 3 steps; the same with a float64 transcription); every bug below moves the result by 4e-3 to 1.
TOL = 1e-4


# ---------------------------------------------------------------------------------------------------------------------
# The transcription


@dataclass(frozen=True)
class Paper:
    """The settings of one run, named as in the paper; the last three fields are bugs to show the test bites."""

    steps: int = 3
    layers: tuple | str = tuple(f"output_blocks.{i}" for i in range(6, 12))  # StyleID's decoder layers
    alpha: float = 0.8  # eq. 5
    beta: float = 0.2
    inversion_prompt: str = ""
    inversion_guidance: float = 1.0
    refine: int = 0  # fixed-point refinements of each inversion step (README "DDIM")
    prompt: str = "a portrait"
    negative_prompt: str = ""
    guidance: float = 5.0
    ffa_steps: tuple | str = "all"  # generation step indices (0 = noisiest) at which FFA runs
    adain_values: bool = True  # Algorithm 1 line 5
    adain_latents: bool = True  # eq. 4
    cfg_rows: str = "both"  # under guidance 5, FFA in both branches' rows, or only in the conditional ones
    clip_layer: str = "last"
    swap_features: bool = False  # bug: h^S used where h^C belongs, and the other way round
    swap_start: bool = False  # bug: AdaIN(z_T^S, z_T^C)
    record_uncond: bool = False  # bug: under inversion guidance, keep the unconditional branch's features

    def config(self, **extra) -> dict:
        """The same run as pipeline overrides."""
        return {
            "size": SIZE, "steps": self.steps,
            "model": {"weights": str(TINY_WEIGHTS), "hparams": str(TINY_HPARAMS), "dtype": "float32", "device": "cpu",
                      "clip_layer": self.clip_layer},
            "inversion": {"prompt": self.inversion_prompt, "guidance": self.inversion_guidance, "refine": self.refine},
            "generation": {"prompt": self.prompt, "negative_prompt": self.negative_prompt, "guidance": self.guidance},
            "ffa": {"alpha": self.alpha, "beta": self.beta, "adain_values": self.adain_values,
                    "adain_latents": self.adain_latents, "cfg_rows": self.cfg_rows,
                    "layers": self.layers if isinstance(self.layers, str) else list(self.layers),
                    "timesteps": self.ffa_steps if isinstance(self.ffa_steps, str) else list(self.ffa_steps)},
            **extra,
        }


def alpha_bar() -> list[float]:
    """SD1.5: beta_t linear in sqrt from sqrt(0.00085) to sqrt(0.012) over 1000 steps; alpha-bar_t = prod (1 - beta)."""
    out, prod = [], 1.0
    for i in range(1000):
        beta = (math.sqrt(0.00085) + (math.sqrt(0.012) - math.sqrt(0.00085)) * i / 999) ** 2
        prod *= 1.0 - beta
        out.append(prod)
    return out


def sd15_timesteps(steps: int) -> list[int]:
    """Descending; "leading" spacing with offset 1: 3 steps -> 667, 334, 1."""
    return sorted((i * (1000 // steps) + 1 for i in range(steps)), reverse=True)


def ddim_move(x, eps, a_from, a_to):
    """Song et al. eq. 12, eta = 0: x0 = (x - sqrt(1 - a) eps) / sqrt(a), then re-noised to level a_to."""
    x0 = (x - math.sqrt(1 - a_from) * eps) / math.sqrt(a_from)
    return math.sqrt(a_to) * x0 + math.sqrt(1 - a_to) * eps


def ada_in(c, s, dims):
    """Eq. 4: sigma(s) (c - mu(c)) / sigma(c) + mu(s); population std, eps 1e-5 on the variance."""
    mu_c, mu_s = c.mean(dims, keepdim=True), s.mean(dims, keepdim=True)
    sd_c = ((c - mu_c) ** 2).mean(dims, keepdim=True).add(1e-5).sqrt()
    sd_s = ((s - mu_s) ** 2).mean(dims, keepdim=True).add(1e-5).sqrt()
    return sd_s * (c - mu_c) / sd_c + mu_s


def softmax_attention(q, k, v, heads):
    """Eq. 3 for one image, each head on its own d = C / heads channels: q (N, C), k and v (M, C) -> (N, C)."""
    d = q.shape[1] // heads
    q, k, v = (a.reshape(a.shape[0], heads, d).transpose(0, 1) for a in (q, k, v))  # (heads, N or M, d)
    weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d), dim=2)  # (heads, N, M)
    return (weights @ v).transpose(0, 1).reshape(-1, heads * d)


def transcription(unet, text_encoder, tokenizer, z0, p: Paper):
    """CSDI then FFF for z0 = [z^C, z^S] (2, 4, h, w) -> z_0^CS (1, 4, h, w), in the dtype of z0 and the UNet."""
    ab, ts = alpha_bar(), sd15_timesteps(p.steps)
    lower = {t: ab[ts[i + 1]] if i + 1 < len(ts) else ab[0] for i, t in enumerate(ts)}  # the level below t
    paths = [name for name, _ in unet.named_modules() if name.endswith(".attn1")]
    chosen = paths if p.layers == "all" else [q for q in paths if any(q.startswith(pre + ".") for pre in p.layers)]
    ffa_ts = set(ts) if p.ffa_steps == "all" else {ts[i] for i in p.ffa_steps}

    def embed(prompt):
        return text_encoder(tokenizer([prompt]), layer=p.clip_layer).to(z0.dtype)  # (1, 77, D)

    state = {"mode": "plain", "t": None}
    features = {}  # (path, t) -> (h^C, h^S), each (N, C): the inputs of the self-attention layer (eq. 3)

    def recipe(layer, x):  # x (B, N, C): the normalised input of attn1
        rows = []
        for b in range(x.shape[0]):
            if state["mode"] == "ffa" and layer.path in chosen and state["t"] in ffa_ts:
                h_c, h_s = features[(layer.path, state["t"])]
                if p.swap_features:
                    h_c, h_s = h_s, h_c
                q_c, k_c, v_c = layer.to_q(h_c), layer.to_k(h_c), layer.to_v(h_c)  # cached Q^C, K^C, V^C
                k_s, v_s = layer.to_k(h_s), layer.to_v(h_s)  # cached K^S, V^S
                q_cs = layer.to_q(x[b])  # Alg. 1 line 2
                q = p.alpha * q_c + p.beta * q_cs  # line 3, eq. 5
                k = torch.cat([k_c, k_s])  # line 4
                v = torch.cat([ada_in(v_c, v_s, 0) if p.adain_values else v_c, v_s])  # line 5
                rows.append(softmax_attention(q, k, v, layer.heads))  # line 6 (to_out and + F^R: the layer's)
            else:
                if state["mode"] == "record" and layer.path in chosen:
                    features.setdefault((layer.path, state["t"]), [None, None])[b] = x[b]  # b: 0 content, 1 style
                rows.append(softmax_attention(layer.to_q(x[b]), layer.to_k(x[b]), layer.to_v(x[b]), layer.heads))
        return torch.stack(rows)

    def eps(x, t, context, mode):
        state["mode"], state["t"] = mode, t
        return unet(x, torch.full((x.shape[0],), t), context.expand(x.shape[0], -1, -1))

    def guided(x, t, cond, uncond, scale, mode_cond, mode_uncond):
        """Classifier-free guidance, each branch run on its own; scale 1 is the conditional branch alone."""
        if scale == 1:
            return eps(x, t, cond, mode_cond)
        e_u, e_c = eps(x, t, uncond, mode_uncond), eps(x, t, cond, mode_cond)
        return e_u + scale * (e_c - e_u)

    for layer in unet.modules():
        if getattr(layer, "path", "").endswith(".attn1"):
            layer.recipe = recipe

    # CSDI (Sec. III-B): invert content and style, keeping the attention inputs of the last UNet call at each t
    cond, uncond = embed(p.inversion_prompt), embed("")
    x = z0
    for t in reversed(ts):
        modes = ("record", "plain") if t in ffa_ts else ("plain", "plain")  # (cond, uncond): record the cond branch
        if p.record_uncond:
            modes = modes[::-1]
        e = guided(x, t, cond, uncond, p.inversion_guidance, *modes)
        x_next = ddim_move(x, e, lower[t], ab[t])
        for _ in range(p.refine):
            e = guided(x_next, t, cond, uncond, p.inversion_guidance, *modes)
            x_next = ddim_move(x, e, lower[t], ab[t])
        x = x_next
    z_c, z_s = x[0:1], x[1:2]

    # FFF (Sec. III-C): start from AdaIN(Z_T^C, Z_T^S) (eq. 4), DDIM-sample with FFA (Algorithm 1)
    if p.swap_start:
        z_c, z_s = z_s, z_c
    z = ada_in(z_c, z_s, (2, 3)) if p.adain_latents else z_c
    cond, uncond = embed(p.prompt), embed(p.negative_prompt)
    for t in ts:
        e = guided(z, t, cond, uncond, p.guidance, "ffa", "ffa" if p.cfg_rows == "both" else "plain")
        z = ddim_move(z, e, ab[t], lower[t])
    return z


# ---------------------------------------------------------------------------------------------------------------------
# The tests (pinned to the CPU: a GPU's TF32 convolutions would round more than the tolerance allows)


@pytest.fixture(scope="module")
def sd():
    return load_model(load_config(None, Paper().config()))


@pytest.fixture(scope="module")
def reference(sd):
    """The transcription's model: a copy of the same weights, whose recipes it may replace."""
    return copy.deepcopy(sd.unet), sd.text_encoder, sd.tokenizer


@pytest.fixture(scope="module")
def z0(sd):
    """[z^C, z^S]: two different images, scaled to unit variance as SD1.5's latents are (the tiny random VAE gives
    a std of 0.05, at which the UNet's normalisations amplify rounding 60-fold)."""
    z = encode_images(sd, torch.cat([load_image(ASTRONAUT, SIZE), load_image(STYLE, SIZE)]))
    return z / z.std()


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


CASES = {
    # the paper's setting, as the defaults give it (the feature store in float32, so that only rounding differs)
    "paper": (Paper(), {}, {"swap_features": True, "swap_start": True}),
    # recompute mode, FFA at the first and last of three steps, one refinement per inversion step
    "recompute": (Paper(ffa_steps=(0, 2), refine=1, inversion_prompt="a photo of a face"), {"store": {"mode": "recompute"}},
                  {"ffa_steps": "all", "refine": 0, "swap_features": True}),
    # inversion under guidance (features of the conditional rows), no AdaIN anywhere, clip skip 2, every layer, FFA
    # in the conditional rows only
    "options": (Paper(inversion_prompt="an oil painting of a cat, by a master", inversion_guidance=3.0,
                      adain_latents=False, adain_values=False, clip_layer="penultimate", layers="all",
                      alpha=0.6, beta=0.7, cfg_rows="cond"), {},
                {"record_uncond": True, "adain_latents": True, "adain_values": True, "clip_layer": "last",
                 "inversion_guidance": 1.0, "cfg_rows": "both"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_csdi_and_fff_follow_the_paper(case, sd, reference, z0):
    p, extra, bugs = CASES[case]
    cfg = load_config(None, p.config(**({"store": {"dtype": "float32"}} | extra)))
    inversion = csdi(sd, z0, cfg)
    got = fff(sd, inversion, cfg)
    with torch.no_grad():
        want = transcription(*reference, z0, p)
        gaps = {bug: rel(transcription(*reference, z0, replace(p, **{bug: v})), want) for bug, v in bugs.items()}
    assert got.shape == want.shape == (1, 4, SIZE // 8, SIZE // 8)
    assert rel(got, want) < TOL, f"pipeline vs transcription: {rel(got, want):.2e}"
    for bug, gap in gaps.items():  # each bug moves the result far beyond the tolerance
        assert gap > 10 * TOL, f"{bug} changes the result by only {gap:.2e}"
    if case == "paper":  # both pairs of one inversion in one batch: (content, style) and the two images swapped
        both = fff(sd, inversion, cfg, pairs=[(0, 1), (1, 0)])
        with torch.no_grad():
            want_swapped = transcription(*reference, z0.flip(0), p)
        assert rel(both[:1], want) < TOL and rel(both[1:], want_swapped) < TOL
        assert rel(want_swapped, want) > 10 * TOL  # swapping the images is far beyond the tolerance
