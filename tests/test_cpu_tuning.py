"""CPU fast paths: the model.prepack / model.attention decision (fake timings and caches, nothing timed) and the
attention kernels against PyTorch's SDPA."""
import json

import pytest
import torch
import torch.nn.functional as F

from attention.core import ATTENTION_KERNELS, chunked_attention, cpu_attention, multihead_attention, set_cpu_attention
from models import cpu_tuning as ct
from models.cpu_tuning import CPUChoice, CPUInfo

XEON_AMX = CPUInfo("Intel(R) Xeon(R) Platinum 8480+ (family 6, model 143)", amx=True, avx512_bf16=True)
EPYC = CPUInfo("AMD EPYC 9R14 (family 25, model 17)", amx=False, avx512_bf16=True)


def timings(prepacked=1.0, plain=1.0, sdpa=1.0, chunked=2.0, linear=None):
    t = {"conv": {"prepacked": prepacked, "plain": plain}, "attention": {"sdpa": sdpa, "chunked": chunked}}
    return {**t, "linear": {"prepacked": linear[0], "plain": linear[1]}} if linear else t


class FakeMeasure:
    """Stands in for the micro-benchmark: returns fixed timings (or raises; or per dtype: ``per_dtype``) and counts
    its calls."""

    def __init__(self, result=None, error=None, per_dtype=None):
        self.result, self.error, self.per_dtype, self.calls = result or timings(), error, per_dtype or {}, []

    def __call__(self, dtype):
        self.calls.append(dtype)
        if self.error:
            raise self.error
        return self.per_dtype.get(dtype, self.result)


def test_choose_prepacks_only_when_it_saves_the_margin():
    assert ct.choose(timings(prepacked=0.90, plain=1.0)).prepack
    assert not ct.choose(timings(prepacked=0.99, plain=1.0)).prepack  # within the 3% margin: save the memory
    assert not ct.choose(timings(prepacked=1.10, plain=1.0)).prepack  # the AMD EPYC case of issue 14
    # the linear maps count with the convolutions: one switch, decided on their total
    assert ct.choose(timings(prepacked=1.01, plain=1.0, linear=(0.5, 1.0))).prepack
    assert not ct.choose(timings(prepacked=0.95, plain=1.0, linear=(1.5, 1.0))).prepack


def test_choose_leaves_sdpa_only_for_a_clearly_faster_kernel():
    assert ct.choose(timings(sdpa=1.0, chunked=0.80)).attention == "chunked"
    assert ct.choose(timings(sdpa=1.0, chunked=0.97)).attention == "sdpa"
    assert ct.choose(timings(sdpa=1.0, chunked=3.0)).attention == "sdpa"


def test_tune_measures_once_then_reads_the_cache(tmp_path):
    path = tmp_path / "magicstyle" / "cpu_tuning.json"
    measure = FakeMeasure(timings(prepacked=1.5, plain=1.0, chunked=0.5))
    first = ct.tune(torch.bfloat16, info=EPYC, path=path, measure=measure)
    assert first == CPUChoice(prepack=False, attention="chunked", source="measured", compute=torch.bfloat16)
    entry = json.loads(path.read_text())[ct.cache_key(EPYC, torch.bfloat16)]
    assert entry["prepack"] is False and entry["attention"] == "chunked" and entry["seconds"]["conv"]["plain"] == 1.0
    again = ct.tune(torch.bfloat16, info=EPYC, path=path, measure=measure)
    assert again == CPUChoice(prepack=False, attention="chunked", source="cached", compute=torch.bfloat16)
    assert measure.calls == [torch.bfloat16, torch.float32]  # float32 too, to choose the compute dtype; once


@pytest.mark.parametrize("f32_seconds, compute", [(0.5, torch.float32), (0.97, torch.bfloat16), (1.5, torch.bfloat16)])
def test_bfloat16_computes_in_float32_only_where_that_saves_the_margin(tmp_path, f32_seconds, compute):
    """Compared on the paths each dtype would take (here: plain convolutions, SDPA): 0.5 of bfloat16's time is this
    session's Xeon without AMX; within 5% the model keeps bfloat16 arithmetic (float32 doubles the activations)."""
    f32 = timings(prepacked=9.0, plain=f32_seconds, sdpa=f32_seconds, chunked=9.0)
    measure = FakeMeasure(timings(prepacked=9.0, chunked=9.0), per_dtype={torch.float32: f32})
    path = tmp_path / "cpu_tuning.json"
    assert ct.tune(torch.bfloat16, info=EPYC, path=path, measure=measure).compute == compute
    assert ct.fast_paths("auto", "auto", torch.bfloat16, "cpu", compute="auto",
                         tuner=lambda d: ct.tune(d, info=EPYC, path=path, measure=measure)).compute == (
        None if compute == torch.bfloat16 else torch.float32)
    assert measure.calls == [torch.bfloat16, torch.float32]


def test_the_cache_is_per_cpu_model_torch_version_and_dtype(tmp_path, monkeypatch):
    path = tmp_path / "cpu_tuning.json"
    measure = FakeMeasure()
    ct.tune(torch.bfloat16, info=EPYC, path=path, measure=measure)
    ct.tune(torch.float32, info=EPYC, path=path, measure=measure)
    ct.tune(torch.bfloat16, info=XEON_AMX, path=path, measure=measure)
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    ct.tune(torch.bfloat16, info=EPYC, path=path, measure=measure)
    assert len(json.loads(path.read_text())) == 6  # each bfloat16 measurement brings its float32 one
    assert measure.calls == [torch.bfloat16, torch.float32, torch.bfloat16, torch.float32, torch.bfloat16, torch.float32]


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"%s": {"prepack": "yes", "attention": "sdpa"}}',
                                     '{"%s": {"prepack": true, "attention": "sdpa"}}'])  # no compute: older format
def test_a_broken_cache_is_measured_again_and_rewritten(tmp_path, content):
    path = tmp_path / "cpu_tuning.json"
    path.write_text(content.replace("%s", ct.cache_key(EPYC, torch.float32)))
    measure = FakeMeasure(timings(prepacked=0.5, plain=1.0))
    assert ct.tune(torch.float32, info=EPYC, path=path, measure=measure).source == "measured"
    assert json.loads(path.read_text())[ct.cache_key(EPYC, torch.float32)]["prepack"] is True


@pytest.mark.parametrize("info, prepack", [(XEON_AMX, True), (EPYC, False)])
def test_without_a_measurement_the_capability_rule_decides(tmp_path, info, prepack):
    path = tmp_path / "cpu_tuning.json"
    measure = FakeMeasure(error=RuntimeError("no oneDNN"))
    assert ct.tune(torch.bfloat16, info=info, path=path, measure=measure) == CPUChoice(prepack, "sdpa", "capability")
    assert not path.exists()  # nothing cached: the next run tries again
    assert ct.tune(torch.float16, info=info, path=path, measure=measure).source == "capability"
    assert measure.calls == [torch.bfloat16]  # float16 has no oneDNN path to time


def test_an_unwritable_cache_folder_does_not_fail_the_run(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    path = blocker / "magicstyle" / "cpu_tuning.json"
    choice = ct.tune(torch.float32, info=EPYC, path=path, measure=FakeMeasure())
    assert choice.source == "measured"
    # bfloat16 still compares with the float32 timings it just measured, though neither could be cached
    measure = FakeMeasure(per_dtype={torch.float32: timings(prepacked=0.1, plain=0.1, sdpa=0.1)})
    assert ct.tune(torch.bfloat16, info=EPYC, path=path, measure=measure).compute == torch.float32


def test_cache_folder_follows_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert ct.cache_file() == tmp_path / "xdg" / "magicstyle" / "cpu_tuning.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert ct.cache_file() == tmp_path / "home" / ".cache" / "magicstyle" / "cpu_tuning.json"


def test_fast_paths_forced_values_win_and_auto_asks_the_tuner():
    tuner = FakeMeasure(CPUChoice(prepack=False, attention="chunked", source="cached", compute=torch.bfloat16))
    assert ct.fast_paths(True, "sdpa", torch.bfloat16, "cpu", tuner=tuner) == CPUChoice(True, "sdpa", "config")
    assert ct.fast_paths("auto", "sdpa", torch.bfloat16, "cpu", tuner=tuner) == CPUChoice(False, "sdpa", "cached")
    assert ct.fast_paths(True, "auto", torch.bfloat16, "cpu", tuner=tuner) == CPUChoice(True, "chunked", "cached")
    assert ct.fast_paths("auto", "auto", torch.float16, "cuda", tuner=tuner) == CPUChoice(True, "sdpa", "config")
    assert tuner.calls == [torch.bfloat16, torch.bfloat16]  # never timed for a GPU


def test_fast_paths_compute_float32_takes_float32s_kernels():
    """cpu_compute=float32 (or auto choosing it): the prepack and attention choices are the float32 ones, which are
    the kernels that then run; native keeps bfloat16; a float32 model has nothing to choose."""
    choices = {torch.float32: CPUChoice(True, "chunked", "cached", torch.float32),
               torch.bfloat16: CPUChoice(False, "sdpa", "cached", torch.float32)}
    tuner = FakeMeasure(per_dtype=choices)
    tuner.result = None
    f32, bf16 = torch.float32, torch.bfloat16
    assert ct.fast_paths("auto", "auto", bf16, "cpu", compute="float32", tuner=tuner) == CPUChoice(
        True, "chunked", "cached", f32)
    assert ct.fast_paths("auto", "auto", bf16, "cpu", compute="auto", tuner=tuner) == CPUChoice(
        True, "chunked", "cached", f32)
    assert ct.fast_paths("auto", "auto", bf16, "cpu", compute="native", tuner=tuner) == CPUChoice(
        False, "sdpa", "cached", None)
    assert ct.fast_paths(False, "sdpa", bf16, "cpu", compute="float32", tuner=tuner) == CPUChoice(
        False, "sdpa", "config", f32)
    assert ct.fast_paths("auto", "auto", f32, "cpu", compute="auto", tuner=tuner).compute is None
    assert ct.fast_paths("auto", "auto", bf16, "cuda", compute="float32", tuner=tuner).compute is None


def test_best_times_alternates_and_keeps_the_best_with_a_fake_clock():
    clock, order = [0.0], []
    durations = {"a": iter([5, 3, 4]), "b": iter([9, 1, 2])}  # warm-up, then two timed calls each

    def run(name):
        order.append(name)
        clock[0] += next(durations[name])

    best = ct.best_times({"a": lambda: run("a"), "b": lambda: run("b")}, timer=lambda: clock[0], repeats=2)
    assert best == {"a": 3, "b": 1} and order == ["a", "b", "a", "b", "a", "b"]


def test_the_micro_benchmark_runs_on_tiny_shapes_with_a_fake_timer():
    ticks = iter(range(10**6))
    convs = ct.measure_convs(torch.float32, shapes=((4, 8, 6, 3, 1),), timer=lambda: next(ticks), repeats=1)
    attention = ct.measure_attention(torch.float32, shape=(1, 2, 16, 4), timer=lambda: next(ticks), repeats=1)
    assert set(convs) == {"prepacked", "plain"} and set(attention) == set(ATTENTION_KERNELS)
    assert all(v == 1 for v in (*convs.values(), *attention.values()))


# ---------------------------------------------------------------------------------------------------------------------
# Attention kernels


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("nq, nk", [(300, 300), (300, 77)])
def test_chunked_attention_matches_sdpa(dtype, tol, nq, nk):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, nq, 8, generator=g)
    k, v = torch.randn(2, 3, nk, 8, generator=g), torch.randn(2, 3, nk, 8, generator=g)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    out = chunked_attention(q.to(dtype), k.to(dtype), v.to(dtype), block=128)  # 300 rows: blocks of 128, 128, 44
    assert out.dtype == dtype and out.shape == ref.shape
    sdpa = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype))
    err, sdpa_err = ((out.double() - ref).norm() / ref.norm()).item(), ((sdpa.double() - ref).norm() / ref.norm()).item()
    assert err < tol and err < 2 * sdpa_err + 1e-6  # no worse than SDPA itself, up to a factor


def test_multihead_attention_runs_the_chosen_cpu_kernel():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 40, 16, generator=g, dtype=torch.float64) for _ in range(3))
    before = cpu_attention()
    try:
        set_cpu_attention("sdpa")
        ref = multihead_attention(q, k, v, heads=4)
        set_cpu_attention("chunked")
        out = multihead_attention(q, k[:1], v[:1], heads=4)  # batch-1 keys broadcast
        assert torch.allclose(out, multihead_attention(q, k[:1].expand(2, -1, -1), v[:1].expand(2, -1, -1), 4))
        assert (multihead_attention(q, k, v, heads=4) - ref).abs().max() < 1e-12
        with pytest.raises(ValueError, match="unknown attention kernel"):
            set_cpu_attention("flash")
    finally:
        set_cpu_attention(before)


# ---------------------------------------------------------------------------------------------------------------------
# Configuration


def test_config_keys_accept_auto_true_false_and_kernel_names():
    from magicstyle import load_config
    from magicstyle.config import ConfigError

    assert load_config().model.prepack == "auto" and load_config().model.attention == "auto"
    for value in ("auto", "true", "false"):
        load_config(dotlist=[f"model.prepack={value}"])
    for name in ATTENTION_KERNELS:
        load_config(dotlist=[f"model.attention={name}"])
    with pytest.raises(ConfigError, match="model.prepack must be auto, true or false"):
        load_config(dotlist=["model.prepack=sometimes"])
    with pytest.raises(ConfigError, match="model.attention must be one of auto, sdpa, chunked"):
        load_config(dotlist=["model.attention=flash"])
    assert load_config().model.cpu_compute == "auto"
    with pytest.raises(ConfigError, match="model.cpu_compute must be one of auto, native, float32"):
        load_config(dotlist=["model.cpu_compute=float16"])


@pytest.mark.parametrize("compute, expected", [("float32", torch.float32), ("native", None), ("auto", torch.float32)])
def test_load_model_sets_the_compute_dtype_of_a_bfloat16_model(tmp_path, monkeypatch, compute, expected):
    """auto reads the cache (here: this CPU measured bfloat16 slower); the UNet and VAE keep bfloat16 weights."""
    from conftest import TINY_HPARAMS, TINY_WEIGHTS
    from magicstyle import load_config, load_model

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    ct.write_cache(ct.cache_file(), {ct.cache_key(ct.cpu_info(), d): {"prepack": True, "attention": "sdpa",
                                                                     "compute": "float32"}
                                     for d in (torch.float32, torch.bfloat16)})
    model = {"weights": str(TINY_WEIGHTS), "hparams": str(TINY_HPARAMS), "dtype": "bfloat16", "device": "cpu",
             "cpu_compute": compute}
    sd = load_model(load_config(None, {"model": model}))
    assert sd.unet.compute_dtype == expected and sd.vae.compute_dtype == expected
    assert sd.unet.out[2].weight.dtype == sd.vae.quant_conv.weight.dtype == torch.bfloat16
    with torch.no_grad():
        eps = sd.unet(torch.zeros(1, 4, 8, 8), 500, torch.zeros(1, 77, sd.unet.input_blocks[1][1].transformer_blocks[0]
                                                                   .attn2.to_k.in_features))
    assert eps.dtype == (expected or torch.bfloat16)


def test_load_model_applies_the_cached_choice(tmp_path, monkeypatch):
    from conftest import TINY_HPARAMS, TINY_WEIGHTS
    from magicstyle import load_config, load_model
    from models.layers import Conv2d

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    ct.write_cache(ct.cache_file(), {ct.cache_key(ct.cpu_info(), torch.float32): {
        "prepack": False, "attention": "chunked", "compute": "float32"}})
    model = {"weights": str(TINY_WEIGHTS), "hparams": str(TINY_HPARAMS), "dtype": "float32", "device": "cpu"}
    before = cpu_attention()
    try:
        sd = load_model(load_config(None, {"model": model}))
        convs = [m for m in (*sd.unet.modules(), *sd.vae.modules()) if isinstance(m, Conv2d)]
        assert convs and not any(m.prepack for m in convs) and cpu_attention() == "chunked"
        sd = load_model(load_config(None, {"model": {**model, "prepack": True, "attention": "sdpa"}}))
        assert all(m.prepack for m in sd.unet.modules() if isinstance(m, Conv2d)) and cpu_attention() == "sdpa"
    finally:
        set_cpu_attention(before)


# ---------------------------------------------------------------------------------------------------------------------
# Convolutions


@pytest.mark.parametrize("channels_last", [True, False])
def test_pointwise_conv_runs_as_a_linear_map_with_the_same_result(channels_last):
    from models.layers import Conv2d, _packed_weights

    torch.manual_seed(0)
    conv = Conv2d(24, 16, 1, dtype=torch.bfloat16).requires_grad_(False)
    x = torch.randn(2, 24, 5, 7, dtype=torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    out = conv(x)
    assert conv.is_pointwise() and conv not in _packed_weights  # never prepacked
    assert out.is_contiguous(memory_format=torch.channels_last)
    ref = F.conv2d(x.contiguous().double(), conv.weight.double(), conv.bias.double())
    assert ((out.double() - ref).norm() / ref.norm()) < 1e-2
    assert not Conv2d(24, 16, 1, stride=2).is_pointwise() and not Conv2d(24, 16, 3, padding=1).is_pointwise()
