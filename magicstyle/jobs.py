"""The jobs of a run: every content x style pair under every setting of a sweep (paper Fig. 4 and 5 in one command).

    --content A.png B.png --style dir/ --sweep ffa.beta=0,0.5 --sweep ffa.recipe=ffa,plain

gives 2 x len(dir) pairs x 4 settings.  This module turns the command line into that plan: the input images (files
or folders), the settings (the Cartesian product of the sweeps, plus any ``--setting``), one ``Job`` per (pair,
setting) with its output file name, and the run folder's ``index.json``.  ``magicstyle.run`` checks the plan and
``magicstyle.batch`` runs it.
"""
from __future__ import annotations

import itertools
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from PIL import Image

from models.errors import first_line

from .config import ConfigError, load_config, one_minus
from .images import ImageError, open_rgb
from .output import OutputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
INDEX_FORMAT = "magicstyle-run/1"
INDEX, GRID = "index.json", "grid.png"


# ---------------------------------------------------------------------------------------------------------------------
# Input images


# A dotted config key or a number: what a forgotten `=` leaves among the images (`--style s.png ffa.beta 0.3`)
OVERRIDE_LIKE = re.compile(r"[A-Za-z_]\w*(\.\w+)+|[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


@dataclass
class Source:
    """An input image: its absolute path, its size, or the one-line error that reading it gave."""

    path: Path
    size: tuple[int, int] | None = None
    error: str | None = None


def find_images(specs: Iterable[str], what: str) -> list[Source]:
    """Files and folders -> images.  A folder gives the image files inside it, sorted by name; one of them that
    cannot be read becomes a failed job.  A file the user named must be readable (``ImageError`` otherwise)."""
    sources: list[Source] = []
    for spec in specs:
        path = Path(spec)
        if not path.is_dir():
            looks_like_override = path.suffix.lower() not in IMAGE_SUFFIXES and OVERRIDE_LIKE.fullmatch(str(spec))
            if not path.exists() and looks_like_override:  # `--style s.png ffa.beta 0.3`
                raise ImageError(f"--{what} {spec}: no such image or folder; config overrides are KEY=VALUE, e.g. "
                                 "ffa.beta=0.3")
            with open_rgb(path) as img:  # raises ImageError: missing, unreadable, too large
                sources.append(Source(path.resolve(), img.size))
            continue
        files = sorted((f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()),
                       key=lambda f: f.name)
        if not files:
            raise ImageError(f"{what} folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        for f in files:
            try:
                with open_rgb(f) as img:
                    sources.append(Source(f.resolve(), img.size))
            except ImageError as e:
                sources.append(Source(f.resolve(), error=first_line(e)))
    return sources


def run_name(specs: list[str]) -> str:
    """A short name for the inputs: the file stem or folder name, ``+N`` for N more."""
    names = [Path(s).stem if not Path(s).is_dir() else Path(s).resolve().name for s in specs]
    return names[0] + (f"+{len(names) - 1}" if len(names) > 1 else "")


# ---------------------------------------------------------------------------------------------------------------------
# Settings


@dataclass
class Setting:
    """One column of the grid: the overrides it adds to the run's configuration."""

    label: str  # e.g. "ffa.beta=0.2, ffa.recipe=plain" ("" for the run's own configuration)
    overrides: dict[str, Any]  # dotted key -> value (typed as the config holds it), as index.json records them
    dotlist: list[str]  # the same as key=value strings, applied after the command line's own key=value overrides
    cfg: DictConfig | None = None


def split_values(text: str) -> list[str]:
    """``0,0.2,[a,b],"x, y"`` -> ['0', '0.2', '[a,b]', '"x, y"']: commas inside brackets or quotes do not split."""
    values, depth, quote, current = [], 0, "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(current.strip())
            current = ""
            continue
        current += ch
    return values + [current.strip()]


def typed_value(key: str, text: str) -> Any:
    """The value of ``key=text`` as an override on the command line gives it (0.2 -> float, plain -> str)."""
    try:
        node = OmegaConf.to_container(OmegaConf.from_dotlist([f"{key}={text}"]))
    except OmegaConfBaseException as e:
        raise ConfigError(f"--sweep {key}={text}: {first_line(e)}") from None
    for part in key.split("."):
        node = node[part]
    return node


def parse_sweep(item: str) -> tuple[str, list[str]]:
    key, sep, values = item.partition("=")
    key = key.strip()
    texts = split_values(values) if sep else []
    if not key or not texts or "" in texts:
        raise ConfigError(f"--sweep {item!r} is not of the form KEY=V1,V2,... (e.g. --sweep ffa.beta=0,0.5,1)")
    if key == "model" or key.startswith("model."):
        raise ConfigError(f"--sweep {key}: a run uses one model; run the command once per model instead")
    seen: list[tuple[str, Any]] = []  # 0.2 and 0.20 are one setting: refused rather than run twice
    for text in texts:
        value = typed_value(key, text)
        if same := next((t for t, v in seen if v == value and isinstance(v, bool) == isinstance(value, bool)), None):
            raise ConfigError(f"--sweep {key} gives the same value twice ({same} and {text}); give each value once")
        seen.append((text, value))
    return key, texts


def follow(keys: dict[str, str], free: set[str]) -> dict[str, str]:
    """Eq. 5 has alpha + beta = 1: a swept ffa.beta sets ffa.alpha = 1 - beta (and the other way round), as --beta
    alone does, unless the other is given (not in ``free``) or swept too."""
    for key, other in (("ffa.beta", "ffa.alpha"), ("ffa.alpha", "ffa.beta")):
        if other in free and key in keys and other not in keys:
            if (value := one_minus(typed_value(key, keys[key]))) is not None:
                return {other: repr(value)}
    return {}


def make_setting(items: list[tuple[str, str]], free: set[str]) -> Setting:
    keys = dict(items)
    if len(keys) < len(items):
        names = [k for k, _ in items]
        raise ConfigError(f"--setting gives {next(k for k in names if names.count(k) > 1)} twice")
    shown = dict(keys)
    keys.update({k: v for k, v in follow(keys, free).items() if k not in keys})
    label = ", ".join(f"{k}={v}" for k, v in shown.items())
    return Setting(label, {k: typed_value(k, v) for k, v in keys.items()}, [f"{k}={v}" for k, v in keys.items()])


def make_settings(sweeps: list[str], extra: list[str], free: set[str]) -> list[Setting]:
    """The Cartesian product of the ``--sweep``s, then each ``--setting`` as one more column.  ``free``: the keys
    of ffa.alpha/ffa.beta the command line leaves unset, which follow the other (see ``follow``)."""
    axes = [parse_sweep(s) for s in sweeps]
    names = [k for k, _ in axes]
    if dup := next((k for k in names if names.count(k) > 1), None):
        raise ConfigError(f"--sweep {dup} is given twice; put all its values in one --sweep")
    settings = []
    if axes:
        for combo in itertools.product(*[[(k, v) for v in values] for k, values in axes]):
            settings.append(make_setting(list(combo), free))
    for text in extra:
        try:
            items = [tuple(part.split("=", 1)) for part in shlex.split(text)]
        except ValueError as e:
            raise ConfigError(f"--setting {text!r}: {e}") from None
        if not items or any(len(i) != 2 or not i[0] for i in items):
            raise ConfigError(f"--setting {text!r} is not of the form 'KEY=V [KEY=V ...]' (e.g. ffa.recipe=plain)")
        settings.append(make_setting(items, free))
    return settings or [Setting("", {}, [])]


def load_settings(settings: list[Setting], path: str | None, flags: dict, overrides: list[str]) -> None:
    """Resolve and check every setting's configuration now, before any model is loaded."""
    for s in settings:
        try:
            s.cfg = load_config(path, flags, [*overrides, *s.dotlist])
        except ConfigError as e:
            raise ConfigError(f"{e}{f' (setting {s.label})' if s.label else ''}") from None


# ---------------------------------------------------------------------------------------------------------------------
# Jobs and the index


@dataclass
class Job:
    content: Source
    style: Source
    setting: int  # index into the run's settings
    output: str  # file name in the run folder
    status: str = "pending"  # pending | done | skipped | failed
    error: str | None = None
    seconds: float | None = None
    rank: int | None = None  # the torchrun rank that ran it (index.json has it only under torchrun)

    def fail(self, message: str) -> None:
        self.status, self.error = "failed", " ".join(message.split())


def slug(text: str, limit: int = 80) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "-", text.replace(", ", "_")).strip("-")[:limit]


def make_jobs(contents: list[Source], styles: list[Source], settings: list[Setting]) -> list[Job]:
    """Content-major order: every setting of a pair, then the next pair (rows of the grid are pairs)."""
    jobs, used = [], set()
    for c, s, (k, setting) in itertools.product(contents, styles, enumerate(settings)):
        base = f"{c.path.stem}_{s.path.stem}" + (f"_{slug(setting.label) or k}" if len(settings) > 1 else "")
        name, n = f"{base}.png", 1
        while name.lower() in used:
            n += 1
            name = f"{base}-{n}.png"
        used.add(name.lower())
        jobs.append(Job(c, s, k, name))
        if c.error or s.error:
            jobs[-1].fail(c.error or s.error)
    return jobs


# The config keys (and sections) that do not change a job's image, which resume does not compare: where and how the
# same arithmetic runs (device, torch.compile, the CPU kernels and whether a bfloat16 model computes in float32 there:
# like the device, they change rounding, not the method; the store's memory/recompute trade, pairs per batch, the
# inversion cache), where model files are looked up, and the diagnostics written beside the PNG.  model.dtype,
# model.vae_dtype and store.dtype change the numbers and are compared, ``auto`` as it resolved (so with model.dtype
# auto the device counts through the dtype it chose).  The checkpoint and the VAE are compared by
# what the PNG records of the files themselves (``BY_FILE``), not by the path or hub reference that named them.
UNCOMPARED = ("batch", "diagnostics", "model.device", "model.compile", "model.prepack", "model.attention",
              "model.cpu_compute", "model.local_dir", "store.mode")
BY_FILE = ("model.weights", "model.vae")


def compared(key: str) -> bool:
    """Whether resume compares the dotted config ``key`` (see ``UNCOMPARED``)."""
    return not any(key == k or key.startswith(k + ".") for k in UNCOMPARED + BY_FILE)


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def check_resumable(path: Path, cfg: DictConfig, files: dict[str, Path]) -> None:
    """An existing output is skipped only when it is this job's: same configuration in its ``parameters`` chunk and
    the same checkpoint and VAE files (by SHA-256) as the run's model ``files`` (``OutputError`` otherwise, so that a
    changed option or model file never leaves old images in a new run)."""
    from models.filehash import short_sha256  # hashed once per checkpoint file, then cached
    from .model import dtype_names

    try:
        with Image.open(path) as img:
            parameters = json.loads(img.text["parameters"])
        made = flat(parameters["config"])
    except Exception:  # noqa: BLE001 - not a PNG, or not ours
        raise OutputError(f"{path} exists and is not a MagicStyle output; move it, or choose another --output") from None
    weights, vae = Path(files["model.weights"]), files.get("model.vae")
    vae_name = Path(vae).name if vae else None
    if "vae_sha256" in parameters:
        vae_made, vae_now = parameters["vae_sha256"], short_sha256(vae) if vae else None
    else:  # a PNG from before the VAE's hash was recorded: its name
        vae_made, vae_now = parameters.get("vae"), vae_name
    for what, made_as, had, now_as, have in (
            ("checkpoint", parameters.get("checkpoint"), parameters.get("checkpoint_sha256"), weights.name,
             short_sha256(weights)),
            ("VAE", parameters.get("vae"), vae_made, vae_name, vae_now)):
        if had != have:
            raise OutputError(f"{path} exists but was made with another {what} ({made_as}: {had}; this run's is "
                              f"{now_as}: {have}); pass --overwrite to redo the run's jobs, or choose another --output")
    want = flat(OmegaConf.to_container(cfg, resolve=True))
    if isinstance(parameters.get("dtypes"), dict) and (resolved := dtype_names(cfg)):  # as resolved (auto: float16
        made.update(parameters["dtypes"])  # on a GPU, bfloat16 on most CPUs); else the config's text
        want.update(resolved)
    keys = [k for k in sorted(made.keys() | want.keys()) if compared(k)]
    if not (made.get("inversion.sample_posterior") or want.get("inversion.sample_posterior")):
        keys = [k for k in keys if k != "seed"]  # the seed only draws the posterior sample
    if diff := next((k for k in keys if made.get(k) != want.get(k)), None):
        raise OutputError(f"{path} exists but was made with {diff}={made.get(diff)!r}, not {want.get(diff)!r}; pass "
                          "--overwrite to redo the run's jobs, or choose another --output")


def check_run_folder(folder: Path) -> None:
    """A run folder may be new, or one this command wrote before (resume); never a file or someone else's index."""
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"--output {folder} is a file, but a run of several jobs writes a folder; give a folder")
    index = folder / INDEX
    if index.exists():
        try:
            ours = json.loads(index.read_text()).get("format") == INDEX_FORMAT
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise OutputError(f"{index} exists and is not a MagicStyle run index; choose another --output folder")
    elif (folder / GRID).exists():
        raise OutputError(f"{folder / GRID} exists without a run index; choose another --output folder")


def index(name: str, settings: list[Setting], jobs: list[Job]) -> dict:
    """The run folder's ``index.json`` (format ``magicstyle-run/1``)."""
    return {
        "format": INDEX_FORMAT,
        "run": name,
        "settings": [{"label": s.label, "overrides": s.overrides} for s in settings],
        "jobs": [
            {"content": str(j.content.path), "style": str(j.style.path), "setting": j.setting,
             "label": settings[j.setting].label, "overrides": settings[j.setting].overrides, "output": j.output,
             "status": j.status, "error": j.error, "seconds": j.seconds,
             **({"rank": j.rank} if j.rank is not None else {})}
            for j in jobs
        ],
    }
