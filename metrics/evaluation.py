"""``python evaluate.py RUN_DIR``: Table I (CLIP-I, DINO, FaceSim, FID) and the StyleID protocol for a run folder.

Reads the run's ``index.json`` (format ``magicstyle-run/1``), embeds every output, content and style image once
(cached per image in ``RUN_DIR/eval/cache``), and gives one row per setting of the run:

    clip_content, clip_style   mean cosine of CLIP image embeddings, output vs content / output vs style
    dino_content               mean cosine of DINO ViT-S/16 CLS embeddings, output vs content
    facesim                    mean cosine of ArcFace embeddings of the largest face, content vs output, over the
                               jobs where both faces are found; ``faces_missing`` counts the others (never scored)
    fid_style, fid_content     FID of the setting's outputs against its style images / content images (each once)
    lpips                      mean LPIPS (AlexNet) output vs content (StyleID's content fidelity)
    fid_art, artfid            FID against the styles, one per output (StyleID's repeated style set), on ArtFID's
                               own Inception (``models.artfid_inception.file``; empty without it: never FID's
                               network under ArtFID's name);
                               ArtFID = (1 + LPIPS) (1 + FID_art)  (Wright and Ommer 2022, as StyleID reports it)
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from faces.weights import eval_defaults
from magicstyle.config import ConfigError, _dotlist, _load_yaml
from models.filehash import hash_file
from magicstyle.grid import RUN_CONFIG_LABEL
from magicstyle.model import resolve_device
from models.errors import MagicStyleError, first_line

from . import features
from .fid import fid_between

FORMAT = "magicstyle-run/1"
METRICS = ("clip", "dino", "face", "fid", "styleid")
# Below this many outputs per setting the note warns that FID is biased upward: 2048 is the Inception features'
# dimension, the least pytorch-fid advises (fewer images give singular covariances; the bias falls with N)
FID_MIN_N = 2048
COLUMNS = ("setting", "n", "not_done", "clip_content", "clip_style", "dino_content", "facesim", "faces_missing",
           "fid_style", "fid_content", "lpips", "fid_art", "artfid")


class EvalError(MagicStyleError):
    """A run folder that cannot be evaluated: no or a bad index.json, missing images."""


def load_eval_config(path: str | Path | None = None, dotlist: list[str] = ()) -> DictConfig:
    """``configs/eval.yaml``, then the YAML at ``path``, then ``key=value`` strings; unknown keys are errors."""
    cfg = eval_defaults()
    layers = ([] if path is None else [_eval_yaml(Path(path))]) + ([_dotlist(list(dotlist))] if dotlist else [])
    for layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as e:
            raise ConfigError(f"configuration: {first_line(e)} (see configs/eval.yaml for the keys)") from None
    if not isinstance(cfg.get("models"), DictConfig):
        raise ConfigError(f"models must be a mapping of model entries, as in configs/eval.yaml, not "
                          f"{cfg.get('models')!r}")
    for name, entry in cfg.models.items():
        if not isinstance(entry, DictConfig):
            raise ConfigError(f"models.{name} must be a mapping (file, source, sha256), as in configs/eval.yaml, "
                              f"not {entry!r}")
    metrics = cfg.metrics
    if not isinstance(metrics, ListConfig) or not metrics or any(m not in METRICS for m in metrics):
        raise ConfigError(f"metrics must be a non-empty list of {', '.join(METRICS)}, not {metrics!r}")
    if cfg.content_axis not in ("clip", "face"):
        raise ConfigError(f"content_axis must be clip or face, not {cfg.content_axis!r}")
    if cfg.content_axis == "face" and "face" not in metrics:  # the plot's x axis would be empty: no plot at all
        raise ConfigError(f"content_axis face (--content-axis face) plots FaceSim, which metrics "
                          f"[{', '.join(metrics)}] leave out: add face to --metrics, or use --content-axis clip")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, not {cfg.device!r}")
    return cfg


def _eval_yaml(path: Path) -> DictConfig:
    """A user's eval YAML; its relative ``models.*.file`` paths are relative to its folder (as in run configs)."""
    cfg = _load_yaml(path)
    models = cfg.get("models")
    if models is not None and not isinstance(models, DictConfig):
        raise ConfigError(f"models in {path} must be a mapping of model entries, as in configs/eval.yaml, not "
                          f"{models!r}")
    for entry in (models or {}).values():
        value = entry.get("file") if isinstance(entry, DictConfig) else None
        if isinstance(value, str) and not value.startswith("hf:") and not Path(value).expanduser().is_absolute():
            entry.file = str(path.resolve().parent / value)
    return cfg


def read_index(run_dir: Path) -> dict:
    """The run's index.json, checked against the ``magicstyle-run/1`` layout (README, "Sweeps"): every field that
    evaluation reads has its type, so that a hand-edited or damaged index is one line, not a traceback later."""
    path = run_dir / "index.json"
    if not path.is_file():
        raise EvalError(f"{path} not found; give a run folder written by the magicstyle command (it holds index.json)")
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EvalError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        found = index.get("format") if isinstance(index, dict) else None
        raise EvalError(f"{path} is not a {FORMAT} index (format {found!r})")
    problem = _index_problem(index)
    if problem:
        raise EvalError(f"{path}: {problem} (a hand-edited or damaged index: restore it, or run the sweep again to "
                        "rewrite it)")
    return index


def _index_problem(index: dict) -> str | None:
    """What is wrong with a ``magicstyle-run/1`` index's settings and jobs, or None."""
    for key in ("settings", "jobs"):
        if not isinstance(index.get(key), list):
            return f"no {key} list"
    for i, setting in enumerate(index["settings"]):
        if not isinstance(setting, dict):
            return f"setting {i} is not an object"
        if not isinstance(setting.get("label", ""), str):
            return f"setting {i}: label must be a string, not {type(setting['label']).__name__}"
        if not isinstance(setting.get("overrides", {}), dict):
            return f"setting {i}: overrides must be an object, not {type(setting['overrides']).__name__}"
    for i, job in enumerate(index["jobs"]):
        if not isinstance(job, dict):
            return f"job {i} is not an object"
        missing = [k for k in ("content", "style", "setting", "output", "status") if k not in job]
        if missing:
            return f"job {i} lacks {missing[0]!r}"
        for key in ("content", "style", "output"):
            if not isinstance(job[key], str) or not job[key]:
                return f"job {i}: {key} must be a file name, not {job[key]!r:.40}"
        if not isinstance(job["status"], str):
            return f"job {i}: status must be a string (done, skipped or failed), not {job['status']!r:.40}"
        s, n = job["setting"], len(index["settings"])
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < n:
            where = f"0 to {n - 1}" if n else "the settings list is empty"
            return f"job {i}: setting must be an index into settings ({where}), not {s!r:.40}"
    return None


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b))  # both unit length


def has_artfid(cfg: DictConfig) -> bool:
    """Whether ArtFID's Inception weights are configured (``models.artfid_inception.file``); without them FID (ArtFID)
    and ArtFID are not computed (they are defined on that network only)."""
    return bool(cfg.models.artfid_inception.get("file"))


def evaluate(run_dir: str | Path, cfg: DictConfig, progress=None) -> tuple[list[dict], dict]:
    """Rows (one per setting, keys ``COLUMNS``) and the index.  Model files are checked before any work."""
    run_dir = Path(run_dir)
    index = read_index(run_dir)
    metrics = list(cfg.metrics)
    art = "artfid" if has_artfid(cfg) else None  # no ArtFID weights: fid_art and artfid stay empty
    kinds = [k for k, m in (("clip", "clip"), ("dino", "dino"), ("face", "face"), ("inception", "fid"),
                            (art, "styleid"), ("lpips", "styleid")) if m in metrics and k]
    models = {kind: features.model_files(kind, cfg) for kind in kinds}  # a missing one fails before any work
    device = resolve_device(cfg.device, mps=False)  # auto: CUDA, else the CPU (the metrics' models are not run on MPS)

    # "skipped": a resumed run found the output made with the job's configuration (the run checks it), so it counts
    jobs = [j for j in index["jobs"] if j["status"] in ("done", "skipped") and (run_dir / j["output"]).is_file()]
    if not jobs:
        raise EvalError(f"{run_dir / 'index.json'}: none of its {len(index['jobs'])} jobs has an output to evaluate "
                        "(status done or skipped, its file in the run folder); run or resume the sweep first")
    digest, files = {}, {}  # path -> digest, digest -> path
    for job in jobs:
        for key in ("content", "style", "output"):
            path = run_dir / job[key] if key == "output" else Path(job[key])
            if not path.is_file():
                raise EvalError(f"{key} image {path} of the run is missing; evaluate needs every image of the run")
            if str(path) not in digest:
                try:
                    digest[str(path)] = hash_file(path)
                except OSError as e:
                    raise EvalError(f"cannot read {key} image {path} ({e.strerror or e}); evaluate needs to read every "
                                    "image of the run") from None
                files[digest[str(path)]] = path
    image = {(id(j), key): digest[str(run_dir / j[key] if key == "output" else Path(j[key]))]
             for j in jobs for key in ("content", "style", "output")}
    cache_dir = run_dir / "eval" / "cache"
    feats = {kind: features.compute(kind, files, models[kind], cfg, device, cache_dir, progress)
             for kind in kinds if kind != "lpips"}
    lpips = {}
    if "lpips" in kinds:
        pairs = {image[id(j), "output"] + image[id(j), "content"]: (files[image[id(j), "output"]],
                                                                    files[image[id(j), "content"]]) for j in jobs}
        lpips = features.compute_lpips(pairs, models["lpips"], cfg, device, cache_dir, progress)

    rows = []
    for s, setting in enumerate(index["settings"]):
        mine = [j for j in jobs if j["setting"] == s]
        out = [image[id(j), "output"] for j in mine]
        con = [image[id(j), "content"] for j in mine]
        sty = [image[id(j), "style"] for j in mine]
        row = dict.fromkeys(COLUMNS)
        row.update(setting=setting.get("label") or RUN_CONFIG_LABEL, n=len(mine),
                   not_done=sum(1 for j in index["jobs"] if j["setting"] == s) - len(mine))
        if "clip" in feats:
            row["clip_content"] = _mean([_cos(feats["clip"][o], feats["clip"][c]) for o, c in zip(out, con)])
            row["clip_style"] = _mean([_cos(feats["clip"][o], feats["clip"][t]) for o, t in zip(out, sty)])
        if "dino" in feats:
            row["dino_content"] = _mean([_cos(feats["dino"][o], feats["dino"][c]) for o, c in zip(out, con)])
        if "face" in feats:
            found = [(o, c) for o, c in zip(out, con)
                     if np.isfinite(feats["face"][o]).all() and np.isfinite(feats["face"][c]).all()]
            row["facesim"] = _mean([_cos(feats["face"][o], feats["face"][c]) for o, c in found])
            row["faces_missing"] = len(mine) - len(found)
        # Table I's FIDs take each reference image once; StyleID's FID (ArtFID) one style image per output (its
        # style set repeats each style once per content, 40 styles x 20 contents -> 800)
        for kind, column, refs in (("inception", "fid_style", list(dict.fromkeys(sty))),
                                   ("inception", "fid_content", list(dict.fromkeys(con))),
                                   (art, "fid_art", sty)):
            if kind in feats:
                row[column] = fid_between(np.stack([feats[kind][o] for o in out]) if out else np.zeros((0, 1)),
                                          np.stack([feats[kind][r] for r in refs]) if refs else np.zeros((0, 1)))
        if lpips:
            row["lpips"] = _mean([lpips[o + c] for o, c in zip(out, con)])
            if row["fid_art"] is not None and row["lpips"] is not None:
                row["artfid"] = (1 + row["lpips"]) * (1 + row["fid_art"])
        rows.append(row)
    return rows, index


def run_evaluation(run_dir: str | Path, *, config: str | None = None, dotlist: list[str] = (),
                   out: str | Path | None = None, overwrite: bool = False, progress=None) -> dict[str, Path]:
    """Evaluate a run folder and write ``metrics.md``, ``metrics.csv`` and ``scatter.png`` (default: RUN_DIR/eval).

    Everything is checked (config, index, model files, outputs writable) before any image is embedded.
    """
    from magicstyle.output import check_writable, write_atomic

    from .report import csv_text, markdown, scatter_png

    cfg = load_eval_config(config, dotlist)
    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise EvalError(f"{run_dir} is a file; give the run folder (the one that holds index.json)")
    if not run_dir.is_dir():
        raise EvalError(f"run folder {run_dir} does not exist")
    out = Path(out) if out is not None else run_dir / "eval"
    paths = {"markdown": out / "metrics.md", "csv": out / "metrics.csv", "plot": out / "scatter.png"}
    for path in paths.values():
        check_writable(path, overwrite=overwrite, what="evaluation output")
    rows, index = evaluate(run_dir, cfg, progress)
    shown = {"clip": ("clip_content", "clip_style"), "dino": ("dino_content",), "face": ("facesim", "faces_missing"),
             "fid": ("fid_style", "fid_content"), "styleid": ("lpips", "fid_art", "artfid")}
    columns = ["setting", "n", "not_done"] + [c for m in METRICS if m in cfg.metrics for c in shown[m]]
    n = sorted({r["n"] for r in rows})
    note = f"Run {index.get('run', run_dir.name)}"
    if "fid" in cfg.metrics or "styleid" in cfg.metrics:
        note += f": N = {', '.join(map(str, n))} outputs per setting."
        if n[0] < FID_MIN_N:
            note += (f" FID on fewer than {FID_MIN_N} images (the Inception features' dimension, the least pytorch-fid "
                     "advises) is biased upward, the more so the smaller N.")
        note += " Compare FIDs only at the same N."
    else:
        note += "."
    if "styleid" in cfg.metrics and not has_artfid(cfg):
        note += (" FID (ArtFID) and ArtFID are empty: they need ArtFID's Inception weights (models.artfid_inception."
                 f"file, {cfg.models.artfid_inception.source}).")
    for key, text in (("markdown", markdown(rows, columns, note)), ("csv", csv_text(rows, columns))):
        write_atomic(paths[key], text.encode(), overwrite=overwrite, what="evaluation output")
    plot = scatter_png(rows, index["settings"], cfg.content_axis) if "clip" in cfg.metrics else None
    if plot is not None:
        write_atomic(paths["plot"], plot, overwrite=overwrite, what="evaluation output")
    else:  # no plot (no CLIP-I): an earlier evaluation's (--overwrite let it pass the checks) would pass for this one's
        paths.pop("plot").unlink(missing_ok=True)
    return paths
