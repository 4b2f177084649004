"""Face detection with SCRFD (Guo et al. 2021), the ``det_10g.onnx`` of insightface's ``buffalo_l`` pack.

The network runs in onnxruntime; everything around it is ours and follows insightface's ``SCRFD.detect``:

    letterbox:   resize (keeping the aspect ratio) into the top-left of a 640 x 640 black canvas, scale s; the resize
                 is OpenCV's INTER_LINEAR (bilinear, half-pixel centres, no antialiasing when it shrinks), done
                 with torch's interpolate and rounded to 8 bits as cv2 does (within one grey level of cv2.resize)
    normalise:   (RGB - 127.5) / 128, (1, 3, 640, 640)
    outputs:     for strides 8, 16, 32: scores (K, 1), box distances (K, 4), landmark offsets (K, 10), all in
                 stride units, K = (640 / stride)^2 * 2 anchors; output order: 3 scores, 3 boxes, 3 landmarks
    decode:      anchor centres (x, y) * stride, each repeated for its 2 anchors; box = (cx - l, cy - t, cx + r,
                 cy + b) (``distance2bbox``); point k = (cx + dx_k, cy + dy_k) (``distance2kps``)
    keep:        score >= 0.5, divide by s, then greedy NMS at IoU 0.4 (insightface's "+1" pixel areas, so in the
                 original image's pixels, as insightface runs it)

Faces come back largest first (insightface orders by score; we sort the survivors of NMS by box area).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .weights import FaceModelError, onnx_session, require_file

INPUT_SIZE = 640
MEAN, STD = 127.5, 128.0
STRIDES = (8, 16, 32)
ANCHORS = 2  # anchors per feature-map position
NMS_IOU = 0.4
SCORE_THRESHOLD = 0.5


@dataclass
class Faces:
    """Detections in the coordinates of the image given, largest face first."""

    boxes: np.ndarray  # (F, 4) float32: x0, y0, x1, y1
    scores: np.ndarray  # (F,)
    points: np.ndarray  # (F, 5, 2): eyes (left, right in the image), nose, mouth corners (left, right)

    def __len__(self) -> int:
        return len(self.scores)

    def area(self, i: int = 0) -> float:
        x0, y0, x1, y1 = self.boxes[i]
        return float(max(x1 - x0, 0) * max(y1 - y0, 0))


def letterbox(img: Image.Image, size: int = INPUT_SIZE) -> tuple[np.ndarray, float]:
    """RGB image -> ((1, 3, size, size) float32 network input, scale s of the image in it)."""
    w, h = img.size
    if h / w > 1.0:  # taller than the square input: the height fills it
        new_h, new_w = size, max(int(size / (h / w)), 1)  # a sliver keeps one column (PIL cannot resize to 0)
    else:
        new_w, new_h = size, max(int(size * (h / w)), 1)
    canvas = np.zeros((size, size, 3), np.float32)
    canvas[:new_h, :new_w] = resize_bilinear(np.asarray(img.convert("RGB")), new_w, new_h)
    blob = ((canvas - MEAN) / STD).transpose(2, 0, 1)[None]
    return np.ascontiguousarray(blob, dtype=np.float32), new_h / h


def resize_bilinear(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (height, width, 3) uint8 as insightface's ``cv2.resize(img, size)`` (INTER_LINEAR): bilinear
    with half-pixel centres and no antialiasing (Pillow's BILINEAR averages over the whole footprint when it shrinks,
    which differs by up to tens of grey levels on a 1024-1536 px photo)."""
    x = torch.tensor(rgb, dtype=torch.float32).permute(2, 0, 1)[None]  # (1, 3, H, W), a copy (PIL's array is read-only)
    x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=False)
    return x.round().clamp(0, 255)[0].permute(1, 2, 0).to(torch.uint8).numpy()


def anchor_centers(height: int, width: int, stride: int, anchors: int = ANCHORS) -> np.ndarray:
    """(height * width * anchors, 2) anchor centres (x, y) in input pixels, row-major, each repeated per anchor."""
    yx = np.mgrid[:height, :width].astype(np.float32)  # (2, H, W)
    centers = (np.stack([yx[1], yx[0]], axis=-1) * stride).reshape(-1, 2)
    return np.repeat(centers, anchors, axis=0)


def distance2bbox(points: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """(K, 2) centres, (K, 4) distances to the left, top, right and bottom edges -> (K, 4) boxes x0, y0, x1, y1."""
    return np.stack([points[:, 0] - distance[:, 0], points[:, 1] - distance[:, 1],
                     points[:, 0] + distance[:, 2], points[:, 1] + distance[:, 3]], axis=-1)


def distance2kps(points: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """(K, 2) centres, (K, 2P) offsets -> (K, P, 2) points."""
    return points[:, None, :] + distance.reshape(len(distance), -1, 2)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float = NMS_IOU) -> list[int]:
    """Greedy non-maximum suppression, highest score first; insightface's areas count pixels inclusively (+1)."""
    x0, y0, x1, y1 = boxes.T
    areas = (x1 - x0 + 1) * (y1 - y0 + 1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(int(i))
        w = np.maximum(0.0, np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]) + 1)
        inter = w * h
        order = rest[inter / (areas[i] + areas[rest] - inter) <= iou]
    return keep


def decode(outputs: list[np.ndarray], input_size: int = INPUT_SIZE, threshold: float = SCORE_THRESHOLD,
           iou: float = NMS_IOU, scale: float = 1.0) -> Faces:
    """The 9 SCRFD outputs (3 scores, 3 boxes, 3 landmark sets) -> detections, largest first, in the pixels of the
    image letterboxed at ``scale`` (1: input pixels).  Boxes and points are divided by ``scale`` before NMS, as
    insightface does: its "+1" areas count the image's pixels, not the network input's."""
    outputs = [o[0] if o.ndim == 3 else o for o in outputs]  # a batched export has a leading batch axis of 1
    n = len(STRIDES)
    boxes, scores, points = [], [], []
    for i, stride in enumerate(STRIDES):
        centers = anchor_centers(input_size // stride, input_size // stride, stride)
        score = outputs[i].reshape(-1)
        keep = score >= threshold
        scores.append(score[keep])
        boxes.append(distance2bbox(centers, outputs[i + n] * stride)[keep])
        points.append(distance2kps(centers, outputs[i + 2 * n] * stride)[keep])
    boxes, scores, points = np.concatenate(boxes) / scale, np.concatenate(scores), np.concatenate(points) / scale
    kept = nms(boxes, scores, iou)
    boxes, scores, points = boxes[kept], scores[kept], points[kept]
    by_area = np.argsort(-(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), kind="stable")
    return Faces(boxes[by_area].astype(np.float32), scores[by_area].astype(np.float32),
                 points[by_area].astype(np.float32))


class SCRFD:
    """``detector(image) -> Faces``; the model file is checked when the detector is made."""

    def __init__(self, path: str | Path, *, threshold: float = SCORE_THRESHOLD, iou: float = NMS_IOU,
                 setting: str | None = None):
        """``setting``: the config key that gave ``path``, for the messages (default ``models.scrfd.file``)."""
        path = require_file(path, "scrfd", setting=setting)
        self.session = onnx_session(path, "scrfd", (3, INPUT_SIZE, INPUT_SIZE), "(1, 3, 640, 640) images",
                                    setting=setting)
        self.input = self.session.get_inputs()[0].name
        self.outputs = [o.name for o in self.session.get_outputs()]
        if len(self.outputs) != 9:
            raise FaceModelError(f"{path} has {len(self.outputs)} outputs, not SCRFD's 9 (scores, boxes and "
                                 "landmarks for 3 strides); use det_10g.onnx of insightface's buffalo_l")
        self.threshold, self.iou = threshold, iou

    def __call__(self, img: Image.Image) -> Faces:
        blob, scale = letterbox(img)
        return decode(self.session.run(self.outputs, {self.input: blob}), INPUT_SIZE, self.threshold, self.iou, scale)
