"""Face alignment: the least-squares similarity taking 5 landmarks onto ArcFace's template, and the warp.

Matches insightface's ``face_align.norm_crop``: skimage's ``SimilarityTransform.estimate`` (Umeyama 1991) onto
``ARCFACE_TEMPLATE``, then ``cv2.warpAffine`` (bilinear, black border) to 112 x 112.  The warp here is our own
numpy bilinear sampler with OpenCV's convention (pixel centres at integer coordinates); OpenCV rounds its bilinear
weights to 1/32, so crops agree to about one grey level.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

# The standard 112 x 112 ArcFace points: left eye, right eye, nose tip, left and right mouth corners (x, y).
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)
ARCFACE_SIZE = 112


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The (2, 3) matrix [sR | t] minimising sum ||s R src_i + t - dst_i||^2, R a rotation (no reflection).

    Umeyama (1991), eq. 40-42: with centred points and Sigma = dst_c^T src_c / n = U D V^T,
    R = U S V^T (S = diag(1, det(U V^T))), s = trace(D S) / var(src), t = mean(dst) - s R mean(src).
    """
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_src, mu_dst = src.mean(0), dst.mean(0)
    src_c, dst_c = src - mu_src, dst - mu_dst
    sigma = dst_c.T @ src_c / len(src)  # (2, 2)
    U, D, Vt = np.linalg.svd(sigma)
    S = np.diag([1.0, np.sign(np.linalg.det(U) * np.linalg.det(Vt)) or 1.0])
    R = U @ S @ Vt
    var_src = (src_c ** 2).sum() / len(src)
    scale = np.trace(np.diag(D) @ S) / var_src if var_src > 0 else 1.0
    t = mu_dst - scale * R @ mu_src
    return np.hstack([scale * R, t[:, None]])


def warp_affine(img: np.ndarray, matrix: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, C) image -> (h, w, C): out[y, x] = img at matrix^-1 (x, y), bilinear, zeros outside (cv2.warpAffine)."""
    w, h = size
    inverse = np.linalg.inv(np.vstack([matrix, [0.0, 0.0, 1.0]]))[:2]
    ys, xs = np.mgrid[:h, :w].astype(np.float64)
    sx = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    sy = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
    src = img.astype(np.float64)
    H, W = img.shape[:2]

    def pixel(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        inside = ((xx >= 0) & (xx < W) & (yy >= 0) & (yy < H))[..., None]
        return np.where(inside, src[yy.clip(0, H - 1), xx.clip(0, W - 1)], 0.0)

    out = ((1 - fy) * ((1 - fx) * pixel(y0, x0) + fx * pixel(y0, x0 + 1))
           + fy * ((1 - fx) * pixel(y0 + 1, x0) + fx * pixel(y0 + 1, x0 + 1)))
    return out


def norm_crop(img: Image.Image, points: np.ndarray, size: int = ARCFACE_SIZE) -> np.ndarray:
    """The aligned (size, size, 3) uint8 RGB face crop for 5 landmarks (insightface ``norm_crop``)."""
    matrix = similarity_transform(points, ARCFACE_TEMPLATE * (size / ARCFACE_SIZE))
    out = warp_affine(np.asarray(img.convert("RGB")), matrix, (size, size))
    return np.clip(np.round(out), 0, 255).astype(np.uint8)
