"""Model files for faces and metrics: their entries in ``configs/eval.yaml``, and one-line errors for a file that is
missing, has the wrong hash, or cannot be loaded (damaged, or another model's).

An entry gives ``file`` (the expected path, or for ``.safetensors`` files a Hub reference ``hf:OWNER/REPO/FILE``,
fetched by ``models.hub`` and found in ``EVAL_LOCAL_DIR`` first), ``source`` (where to get it) and ``sha256`` (or
a prefix of it, or null).
"""
from __future__ import annotations

from contextlib import contextmanager
from importlib import resources
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from models.errors import MagicStyleError, first_line
from models.filehash import file_sha256
from models.hub import resolve_model_file

ROOT = Path(__file__).resolve().parents[1]
EVAL_CONFIG = ("configs", "eval.yaml")  # (package, resource), shipped as package data like configs/magicstyle.yaml
EVAL_LOCAL_DIR = "weights/eval"  # hf: references: a file of the same name here is used without the Hub
EVAL_OFFLINE_HINT = "run evaluate.py once with network access"  # HF_HUB_OFFLINE and not cached (hf: is eval's only)


class FaceModelError(MagicStyleError):
    """A model file for faces or metrics that is missing, has the wrong hash, or is not the expected model."""


def model_entry(name: str, config: DictConfig | None = None) -> DictConfig:
    """The ``models.<name>`` entry of ``config`` (default: ``configs/eval.yaml``)."""
    return (config if config is not None else eval_defaults()).models[name]


def eval_defaults() -> DictConfig:
    """``configs/eval.yaml`` as shipped in the package, in struct mode (unknown keys are errors)."""
    package, name = EVAL_CONFIG
    cfg = OmegaConf.create(resources.files(package).joinpath(name).read_text(encoding="utf-8"))
    OmegaConf.set_struct(cfg, True)
    return cfg


def resolve(value: str | Path) -> Path:
    """A path from a config: as given if absolute or present, else relative to the repository."""
    path = Path(value).expanduser()
    return path if path.is_absolute() or path.exists() else ROOT / path


def require_file(path: str | Path | None, name: str, config: DictConfig | None = None, *,
                 setting: str | None = None) -> Path:
    """The model file for entry ``name`` (``path`` or the entry's ``file``), checked: exists, and its SHA-256.

    ``setting``: the config key that gave ``path``, for the message (default ``models.<name>.file``).
    """
    entry = model_entry(name, config)
    setting = setting or _setting(name, entry)
    given = path if path is not None else entry.file
    if given is None:
        raise FaceModelError(f"no file is configured for the {name} model; set models.{name}.file "
                             f"(get it from {entry.source})")
    if not isinstance(given, (str, Path)) or not str(given):
        raise FaceModelError(f"{name} model file {given!r} is not a file path; check {setting}")
    if str(given).startswith("hf:"):
        # the local copy is looked up like every other entry's file: as given, else under the repository
        path = resolve_model_file(str(given), local_dir=resolve(EVAL_LOCAL_DIR), what=f"{name} model",
                                  offline_hint=EVAL_OFFLINE_HINT)
    else:
        path = resolve(given)
    if not path.is_file():
        sha = f", SHA-256 {entry.sha256}" if entry.get("sha256") else ""
        raise FaceModelError(f"{name} model file {path} not found; get {entry.source}{sha}, and put it there or "
                             f"set {setting}")
    expected = entry.get("sha256")
    if expected:
        try:
            digest = file_sha256(path)
        except OSError as e:
            raise FaceModelError(f"{name} model file {path} cannot be read ({e.strerror or first_line(e)}); check "
                                 f"its permissions, or set {setting}") from None
        if not digest.startswith(str(expected).lower()):
            raise FaceModelError(f"{name} model file {path} has the wrong SHA-256 (expected {expected}...); "
                                 f"download it again from {entry.source}")
    return path


def _setting(name: str, entry: DictConfig) -> str:
    """Where the user picks the model of entry ``name``: its file (and its name, for entries that have one)."""
    keys = f"models.{name}.file" + (f" and models.{name}.name" if "name" in entry else "")
    return f"{keys} in configs/eval.yaml"


@contextmanager
def loading(path: str | Path, name: str, config: DictConfig | None = None, *, setting: str | None = None):
    """Around a model loader: any error it raises (each library has its own: torch, onnxruntime, safetensors, timm,
    open_clip) becomes one ``FaceModelError`` line naming the file and what to do.  Our own errors pass through."""
    try:
        yield
    except (MagicStyleError, MemoryError):
        raise
    except Exception as e:
        import torch

        if isinstance(e, torch.cuda.OutOfMemoryError):  # the file is fine: the device is full (torch.OutOfMemoryError)
            raise
        entry = model_entry(name, config)
        detail = first_line(e, typed=True)
        detail = detail if len(detail) <= 160 else detail[:157] + "..."
        raise FaceModelError(f"{name} model file {path} cannot be loaded ({detail}); if it is damaged, delete it and "
                             f"get {entry.source} again; if it is another model's, check "
                             f"{setting or _setting(name, entry)}") from None


def read_state_dict(path: str | Path, name: str, config: DictConfig | None = None) -> dict:
    """A PyTorch weights file as a dict of tensors (``torch.load(weights_only=True)``; a ``state_dict`` key is
    unwrapped); a file that is not one is a one-line ``FaceModelError``."""
    import torch

    with loading(path, name, config):
        state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        entry = model_entry(name, config)
        raise FaceModelError(f"{name} model file {path} holds no state dict (a dict of tensors); get "
                             f"{entry.source} again, or check {_setting(name, entry)}")
    return state


def onnx_session(path: Path, name: str, input_shape: tuple[int, int, int], takes: str, *,
                 setting: str | None = None):
    """An onnxruntime CPU session for a face model file, checked: one float input (N, C, H, W) whose fixed sizes
    are ``input_shape`` (C, H, W) (a symbolic size takes any).  ``takes``: that input in words, for the message."""
    import onnxruntime

    with loading(path, name, setting=setting):
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()
    shape = inputs[0].shape if len(inputs) == 1 else []
    if (len(inputs) != 1 or inputs[0].type != "tensor(float)" or len(shape) != 4
            or any(isinstance(have, int) and have != want for have, want in zip(shape[1:], input_shape))):
        entry = model_entry(name)
        raise FaceModelError(f"{path} does not take {takes} (its input: {', '.join(str(i.shape) for i in inputs)}); "
                             f"use {entry.source}, and check {setting or _setting(name, entry)}")
    return session
