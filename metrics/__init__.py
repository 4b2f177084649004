"""Evaluation of a run (``python evaluate.py RUN_DIR``): Table I's CLIP-I, DINO, FaceSim and FID, and StyleID's
LPIPS / ArtFID, one row per setting of the run.  Needs the ``[eval]`` extra (timm, onnxruntime, scipy, ...)."""
from .artfid import ArtInception, load_art_inception
from .evaluation import EvalError, evaluate, load_eval_config, read_index, run_evaluation
from .fid import FIDInception, fid_between, frechet_distance, gaussian, load_inception
from .lpips import LPIPS, load_lpips

__all__ = [
    "ArtInception", "EvalError", "FIDInception", "LPIPS", "evaluate", "fid_between", "frechet_distance", "gaussian",
    "load_art_inception", "load_eval_config", "load_inception", "load_lpips", "read_index", "run_evaluation",
]
