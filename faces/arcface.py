"""Identity embeddings: ArcFace (Deng et al. 2019), the ``w600k_r50.onnx`` of insightface's ``buffalo_l`` pack.

Input: aligned 112 x 112 RGB crops (``faces.norm_crop``) as (N, 3, 112, 112), (RGB - 127.5) / 127.5 (insightface's
``ArcFaceONNX`` for this model).  Output: (N, 512), L2-normalised here (insightface's ``normed_embedding``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .align import ARCFACE_SIZE
from .weights import FaceModelError, onnx_session, require_file

MEAN, STD = 127.5, 127.5


class ArcFace:
    """``arcface(crops (N, 112, 112, 3) uint8) -> (N, 512)`` unit vectors."""

    def __init__(self, path: str | Path):
        path = require_file(path, "arcface")
        self.session = onnx_session(path, "arcface", (3, ARCFACE_SIZE, ARCFACE_SIZE), "(N, 3, 112, 112) face crops")
        self.input = self.session.get_inputs()[0].name
        if len(self.session.get_outputs()) != 1:  # SCRFD's dynamic input would pass the check above; its 9 outputs not
            raise FaceModelError(f"{path} has {len(self.session.get_outputs())} outputs, not ArcFace's one embedding; "
                                 "use w600k_r50.onnx of insightface's buffalo_l")

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        blob = ((crops.astype(np.float32) - MEAN) / STD).transpose(0, 3, 1, 2)
        embeddings = np.concatenate([self.session.run(None, {self.input: blob[i:i + 1]})[0] for i in range(len(blob))])
        return embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True).clip(1e-12)
