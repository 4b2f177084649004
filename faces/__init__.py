"""Faces: SCRFD detection with 5 landmarks, ArcFace alignment and identity embeddings (used by the small-face pass,
magicstyle/smallface.py, and by FaceSim, metrics/).

The models are insightface's ``buffalo_l`` pack (``det_10g.onnx``, ``w600k_r50.onnx``), run with onnxruntime; the
pre- and post-processing are ours.  The pack is for non-commercial research use only (see README).
"""
from .align import ARCFACE_TEMPLATE, norm_crop, similarity_transform, warp_affine
from .arcface import ArcFace
from .scrfd import SCRFD, Faces, decode, nms
from .weights import FaceModelError, require_file

__all__ = [
    "ARCFACE_TEMPLATE", "ArcFace", "FaceModelError", "Faces", "SCRFD", "decode", "nms", "norm_crop", "require_file",
    "similarity_transform", "warp_affine",
]
