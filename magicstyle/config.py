"""The run configuration: ``configs/magicstyle.yaml`` merged with a user's YAML and ``key=value`` overrides.

The defaults file fixes the schema: OmegaConf struct mode turns an unknown key into an error, and ``validate`` checks
every value, so that a bad option fails before any model is loaded.  The defaults ship inside the package (the
``configs`` package's data, read with ``importlib.resources``), so an installed copy behaves like the checkout.

Relative file paths (``PATH_KEYS``) in a YAML file are relative to that file's folder; given on the command line or in
``overrides``, to the current folder.  ``hf:`` references (``models/hub.py``) are left as they are.
"""
from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from attention import RECIPES
from attention.core import ATTENTION_KERNELS
from models.errors import MagicStyleError, first_line
from models.hub import HubError, is_hub_ref, parse_ref

DEFAULTS = ("configs", "magicstyle.yaml")  # (package, resource): the defaults, which fix the schema
PATH_KEYS = (  # keys that hold file or folder paths
    "model.weights", "model.vae", "model.hparams", "model.local_dir", "face.detector", "batch.cache",
)
FILE_KEYS = {"model.weights": ".safetensors", "model.vae": ".safetensors", "model.hparams": "YAML or JSON",
             "face.detector": ".onnx"}  # keys that name one file (not a folder): key -> the kind of file, for errors
NO_FILE = ("", "none", "null", "auto")  # not paths (model.vae: none -> the checkpoint's own VAE)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # config name -> dtype
DEVICES = ("auto", "cpu", "cuda", "mps")
# model.compile: before torch 2.8 TorchDynamo drops a compiled UNet's graphs whenever a run's recipe objects are freed,
# so every run (every job, every demo request) compiled again; the eager path needs no more than setup.cfg's floor
COMPILE_MIN_TORCH = (2, 8)


class ConfigError(MagicStyleError):
    """An unknown key or a value out of range in the configuration."""


def load_config(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    dotlist: Iterable[str] = (),
) -> DictConfig:
    """Defaults, then the YAML file at ``path``, then ``overrides`` (a nested mapping), then ``key=value`` strings."""
    cfg = default_config()
    layers = [] if path is None else [_load_yaml(Path(path))]
    if overrides:
        layers.append(OmegaConf.create(dict(overrides)))
    dotlist = list(dotlist)
    if dotlist:
        bad = [o for o in dotlist if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not of the form key=value (e.g. ffa.beta=0.3)")
        layers.append(_dotlist(dotlist))
    for layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as e:
            raise ConfigError(f"configuration: {first_line(e)} (see configs/magicstyle.yaml for the keys)") from None
    if isinstance(cfg.model.vae, str) and cfg.model.vae.strip().lower() in NO_FILE[:-1]:
        cfg.model.vae = None
    validate(cfg)
    return cfg


def compile_supported() -> bool:
    """Whether this torch can run ``model.compile`` (``COMPILE_MIN_TORCH``, by its major and minor release: NVIDIA's
    containers ship builds such as 2.8.0a0+...nv25.05); ``auto`` stays off where it cannot."""
    release = tuple(int(n) for n in re.match(r"(\d+)\.(\d+)", torch.__version__).groups())
    return release >= COMPILE_MIN_TORCH


def one_minus(weight) -> float | None:
    """The other weight of eq. 5 (alpha + beta = 1: ``--beta`` alone sets alpha, a swept beta too, the demo's slider),
    when ``weight`` is a number in [0, 1]; else None, and validation names the weight that was given."""
    ok = isinstance(weight, (int, float)) and not isinstance(weight, bool) and 0.0 <= weight <= 1.0
    return round(1.0 - weight, 12) if ok else None


def default_config() -> DictConfig:
    """``configs/magicstyle.yaml`` as shipped in the package, in struct mode (unknown keys are errors)."""
    package, name = DEFAULTS
    cfg = OmegaConf.create(resources.files(package).joinpath(name).read_text(encoding="utf-8"))
    OmegaConf.set_struct(cfg, True)
    return cfg


def _load_yaml(path: Path) -> DictConfig:
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; give the YAML file inside it")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; check the path, or leave --config out for the defaults")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:
        raise ConfigError(f"config file {path} is not valid YAML ({first_line(e)})") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping of keys, like configs/magicstyle.yaml")
    for key in PATH_KEYS:  # relative to the file that names them, not to the current folder
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, str) and value.strip().lower() not in NO_FILE and not is_hub_ref(value):
            if not Path(value).expanduser().is_absolute():
                OmegaConf.update(cfg, key, str(path.resolve().parent / value))
    return cfg


def _dotlist(items: list[str]) -> DictConfig:
    try:
        return OmegaConf.from_dotlist(items)
    except OmegaConfBaseException as e:
        raise ConfigError(f"override: {first_line(e)}") from None


def validate(cfg: DictConfig) -> None:
    def check(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    def number(key: str) -> float:
        value = OmegaConf.select(cfg, key)
        check(isinstance(value, (int, float)) and not isinstance(value, bool), f"{key} must be a number, not {value!r}")
        return value

    def integer(key: str) -> int:
        value = OmegaConf.select(cfg, key)
        check(isinstance(value, int) and not isinstance(value, bool), f"{key} must be an integer, not {value!r}")
        return value

    def choice(key: str, options: tuple) -> None:
        value = OmegaConf.select(cfg, key)
        check(value in options, f"{key} must be one of {', '.join(map(str, options))}, not {value!r}")

    size = integer("size")
    check(size > 0 and size % 64 == 0, f"size must be a positive multiple of 64 (e.g. 512), not {size}")
    steps = integer("steps")
    check(1 <= steps <= 999, f"steps must be between 1 and 999, not {steps}")
    integer("seed")
    for key in ("alpha", "beta"):
        value = number(f"ffa.{key}")
        check(0.0 <= value <= 1.0, f"ffa.{key} must lie in [0, 1], not {value}")
    check(0.0 <= number("styleid.gamma") <= 1.0, f"styleid.gamma must lie in [0, 1], not {cfg.styleid.gamma}")
    check(number("styleid.temperature") > 0, f"styleid.temperature must be positive, not {cfg.styleid.temperature}")
    for key in ("inversion.guidance", "generation.guidance"):
        check(number(key) >= 0, f"{key} must not be negative")
    check(integer("inversion.refine") >= 0, "inversion.refine must be 0 or more")
    choice("model.device", DEVICES)
    choice("model.dtype", ("auto", *DTYPES))
    choice("model.vae_dtype", ("auto", *DTYPES))
    choice("model.clip_layer", ("last", "penultimate"))
    value = cfg.model.compile
    check(value == "auto" or isinstance(value, bool), f"model.compile must be auto, true or false, not {value!r}")
    needs = ".".join(map(str, COMPILE_MIN_TORCH))
    check(value is not True or compile_supported(), f"model.compile=true needs torch {needs} or newer (this is torch "
          f"{torch.__version__}): older TorchDynamo compiles again on every run; upgrade torch or set "
          "model.compile=false")
    choice("store.mode", ("memory", "recompute"))
    choice("store.dtype", tuple(DTYPES))
    choice("ffa.recipe", tuple(RECIPES))
    choice("ffa.cfg_rows", ("both", "cond"))
    prepack = cfg.model.prepack
    check(isinstance(prepack, bool) or prepack == "auto", f"model.prepack must be auto, true or false, not {prepack!r}")
    choice("model.attention", ("auto", *ATTENTION_KERNELS))
    choice("model.cpu_compute", ("auto", "native", "float32"))
    for key in ("ffa.adain_values", "ffa.adain_latents", "inversion.sample_posterior",
                "batch.cache_features"):
        check(isinstance(OmegaConf.select(cfg, key), bool), f"{key} must be true or false")
    for key in ("inversion.prompt", "generation.prompt", "generation.negative_prompt"):
        check(isinstance(OmegaConf.select(cfg, key), str), f"{key} must be a string")
    layers = cfg.ffa.layers
    check(
        layers == "all" or (isinstance(layers, ListConfig) and all(isinstance(p, str) for p in layers) and len(layers)),
        f"ffa.layers must be 'all' or a non-empty list of layer paths, not {layers!r}",
    )
    ts = cfg.ffa.timesteps
    check(
        ts == "all" or (isinstance(ts, ListConfig) and all(isinstance(i, int) and 0 <= i < steps for i in ts)),
        f"ffa.timesteps must be 'all' or a list of step indices in [0, {steps}), not {ts!r}",
    )
    check(isinstance(cfg.model.weights, str) and cfg.model.weights != "",
          "model.weights must be a file path or a Hub reference hf:OWNER/REPO/FILE.safetensors")
    for key in PATH_KEYS:
        value = OmegaConf.select(cfg, key)
        check(value is None or isinstance(value, str), f"{key} must be a path or null, not {value!r}")
        if is_hub_ref(value):
            check(key in ("model.weights", "model.vae"), f"{key} must be a local path, not a Hub reference")
            try:
                parse_ref(value)
            except HubError as e:
                raise ConfigError(f"{key}: {e}") from None
    for key, kind in FILE_KEYS.items():
        value = OmegaConf.select(cfg, key)
        if isinstance(value, str) and not is_hub_ref(value) and Path(os.path.expanduser(value)).is_dir():
            raise ConfigError(f"{key} {value} is a folder; give the {kind} file inside it{_inside(value, kind)}")
    check(isinstance(cfg.face.refine, bool), "face.refine must be true or false")
    check(0.0 < number("face.min_share") <= 1.0, "face.min_share must lie in (0, 1]")
    check(number("face.margin") >= 0.0, "face.margin must not be negative")
    check(0.0 <= number("face.feather") <= 0.5, "face.feather must lie in [0, 0.5]")
    check(isinstance(cfg.face.detector, str) and cfg.face.detector != "", "face.detector must be a file path")
    pairs = cfg.batch.pairs
    check(pairs == "auto" or (isinstance(pairs, int) and not isinstance(pairs, bool) and pairs >= 1),
          f"batch.pairs must be auto or a number of pairs >= 1, not {pairs!r}")
    check(cfg.batch.cache is None or (isinstance(cfg.batch.cache, str) and cfg.batch.cache != ""),
          "batch.cache must be a folder path or null")
    check(not cfg.batch.cache or not Path(os.path.expanduser(cfg.batch.cache)).is_file(),  # (~unknown: as given)
          f"batch.cache {cfg.batch.cache} is a file; give a folder (it is made when missing)")
    diagnostics_region(cfg)


def _inside(folder: str, kind: str) -> str:
    """`` (it holds a.safetensors, b.safetensors)``: the files of that kind in ``folder``, for an error message."""
    if not kind.startswith("."):  # a kind without one suffix (YAML or JSON): nothing to list
        return ""
    try:
        names = sorted(f.name for f in Path(os.path.expanduser(folder)).iterdir()
                       if f.is_file() and f.suffix.lower() == kind)
    except OSError:
        return ""
    if not names:
        return ""
    return f" (it holds {', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"


def diagnostics_region(cfg: DictConfig) -> tuple[int, int, int, int] | None:
    """``diagnostics.region``: null, "x0,y0,x1,y1" or [x0, y0, x1, y1] in output pixels -> a checked tuple, or None."""
    value = cfg.diagnostics.region
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, ListConfig) else [value]
    try:
        box = tuple(int(str(v).strip()) for v in items)
    except ValueError:
        box = ()
    x0, y0, x1, y1 = box if len(box) == 4 else (0, 0, 0, 0)
    if not (0 <= x0 < x1 <= cfg.size and 0 <= y0 < y1 <= cfg.size):
        raise ConfigError(f"diagnostics.region must be x0,y0,x1,y1 in pixels of the {cfg.size}x{cfg.size} output "
                          f"with x0 < x1 and y0 < y1, not {value!r}")
    return box
