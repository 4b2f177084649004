"""Identity embeddings: ArcFace (Deng et al. 2019), the ``w600k_r50.onnx`` of insightface's ``buffalo_l`` pack.

Input: aligned 112 x 112 RGB crops (``faces.norm_crop``) as (N, 3, 112, 112), (RGB - 127.5) / 127.5 (insightface's
``ArcFaceONNX`` for this model).  Output: (N, 512), L2-normalised here (insightface's ``normed_embedding``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .align import ARCFACE_SIZE
from .weights import FaceModelError, loading, require_file

MEAN, STD = 127.5, 127.5


class ArcFace:
    """``arcface(crops (N, 112, 112, 3) uint8) -> (N, 512)`` unit vectors."""

    def __init__(self, path: str | Path):
        import onnxruntime

        path = require_file(path, "arcface")
        with loading(path, "arcface"):
            self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or list(inputs[0].shape[1:]) != [3, ARCFACE_SIZE, ARCFACE_SIZE]:
            raise FaceModelError(f"{path} does not take (N, 3, 112, 112) face crops; use w600k_r50.onnx of "
                                 "insightface's buffalo_l")
        self.input = inputs[0].name

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        blob = ((crops.astype(np.float32) - MEAN) / STD).transpose(0, 3, 1, 2)
        embeddings = np.concatenate([self.session.run(None, {self.input: blob[i:i + 1]})[0] for i in range(len(blob))])
        return embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True).clip(1e-12)
